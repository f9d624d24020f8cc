"""Gapped Straight-Through (Fan et al. 2022) and Decoupled Straight-Through (Shah et al. 2024): exact forward samples
(chi-square against the distribution each samples), the backward each defines (against its formula, written
independently here), the reductions (Decoupled at both temperatures 1 = straight-through Gumbel-softmax with the
same noise), homogeneity through the graph API, and errors. Their bias and variance beside straight-through,
ReinMax and Gumbel-Rao: benchmarks/results/estimator_variance_st_cpu.json."""
import pytest
import torch
from torch import distributions as D

import fastgrad.functional as F
import fastgrad.method as M

from .._stats import chi2_pvalue, grads_at_scales


def _chi2_ok(samples, probs):
    return chi2_pvalue(samples.reshape(-1, samples.shape[-1]).sum(0), probs) > 1e-3


def test_gst_forward_is_an_exact_sample():
    logits = torch.tensor([0.5, -1.0, 1.5, 0.0])
    y = F.gapped_straight_through(logits, 20000, 0.5, seed=0)
    assert bool((y.sum(-1) == 1).all())
    assert _chi2_ok(y, torch.softmax(logits, -1))


@pytest.mark.parametrize("gap", [1.0, 2.5, "p"])
def test_gst_backward_is_the_gapped_softmax_jacobian(gap):
    torch.manual_seed(0)
    logits = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    tau = 0.7
    y = F.gapped_straight_through(logits, 3, tau, gap, seed=2)
    up = torch.randn(y.shape, dtype=torch.float64)
    (g,) = torch.autograd.grad((y * up).sum(), logits)
    # the formula: theta~ = theta + m, m constant; d/dtheta of softmax(theta~ / tau) = J(s) / tau
    one = y.detach()
    th = logits.detach()
    top = th.amax(-1, keepdim=True)
    if gap == "p":
        pd = (torch.softmax(th, -1) * one).sum(-1, keepdim=True) * (1 - 1e-5)
        kappa = -torch.log1p(-pd) / pd
    else:
        kappa = gap
    tt = th + (top - th) * one - torch.relu(th - top + kappa) * (1 - one)
    assert bool((tt.argmax(-1) == one.argmax(-1)).all())  # the sample leads ...
    lead = (tt * one).sum(-1) - tt.masked_fill(one.bool(), -1e9).amax(-1)
    assert bool((lead >= (kappa if gap != "p" else kappa[..., 0]) - 1e-12).all())  # ... by at least the gap
    s = torch.softmax(tt / tau, -1)
    want = ((s * (up - (s * up).sum(-1, keepdim=True))) / tau).sum(0)
    torch.testing.assert_close(g, want, atol=1e-12, rtol=0)


def test_dst_forward_samples_the_tempered_distribution():
    logits = torch.tensor([0.5, -1.0, 1.5, 0.0])
    y = F.decoupled_straight_through(logits, 20000, 2.0, 0.5, seed=1)
    assert _chi2_ok(y, torch.softmax(logits / 2.0, -1))


def test_dst_at_unit_temperatures_is_straight_through_gumbel_softmax():
    torch.manual_seed(0)  # inputs independent of the tests before
    logits = torch.randn(4, 6, requires_grad=True)
    a = F.decoupled_straight_through(logits, 3, 1.0, 1.0, seed=5)
    b = F.gumbel_softmax(logits, 1.0, 3, hard=True, seed=5)
    assert torch.equal(a.detach(), b.detach())
    up = torch.randn(3, 4, 6)
    (ga,) = torch.autograd.grad((a * up).sum(), logits)
    (gb,) = torch.autograd.grad((b * up).sum(), logits)
    torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-5)


def test_dst_backward_uses_the_backward_temperature():
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = F.decoupled_straight_through(logits, 2, 3.0, 0.5, seed=3)
    up = torch.randn(y.shape, dtype=torch.float64)
    (g,) = torch.autograd.grad((y * up).sum(), logits)
    # recompute with the same noise: the forward's argmax (tau_f) picks the sample, the relaxation uses tau_b
    from fastgrad.functional.relaxed import _gumbel_like
    gum = _gumbel_like(tuple(y.shape), logits.device, None, 3, None).double()
    assert torch.equal(y.detach().argmax(-1), (logits.detach() / 3.0 + gum).argmax(-1))
    s = torch.softmax(logits.detach() / 0.5 + gum, -1)
    torch.testing.assert_close(g, ((s * (up - (s * up).sum(-1, keepdim=True))) / 0.5).sum(0), atol=1e-12, rtol=0)


@pytest.mark.parametrize("make", [lambda: M.GappedStraightThrough("z", n_samples=3, temperature=0.5),
                                  lambda: M.DecoupledStraightThrough("z", n_samples=3, forward_temperature=1.5,
                                                                     backward_temperature=0.5)],
                         ids=["gst", "dst"])
def test_homogeneity_through_the_graph_api(make):
    theta = torch.tensor([[0.3, -0.2, 0.5, 0.1]], requires_grad=True)
    grads = grads_at_scales(lambda: make()(D.OneHotCategorical(logits=theta)),
                            lambda z: ((z - 0.2) ** 2 * torch.arange(4.0)).sum(-1).sum(-1), theta)
    torch.testing.assert_close(grads[1], 2 * grads[0])
    assert float(grads[0].abs().sum()) > 0


def test_bad_input():
    with pytest.raises(ValueError, match="gap must be"):
        F.gapped_straight_through(torch.zeros(3), 1, 1.0, gap=-1.0)
    with pytest.raises(ValueError, match="gap must be"):
        M.GappedStraightThrough("z", gap="q")
    with pytest.raises(ValueError, match="forward_temperature"):
        M.DecoupledStraightThrough("z", forward_temperature=0.0)
    with pytest.raises(ValueError, match="backward_temperature"):
        M.DecoupledStraightThrough("z", backward_temperature=-1.0)


def test_gst_with_an_impossible_class():
    logits = torch.tensor([[0.0, -float("inf"), 1.0], [0.5, 0.2, -float("inf")]], requires_grad=True)
    for gap in (1.0, "p"):
        y = F.gapped_straight_through(logits, 50, 0.5, gap, seed=1)
        assert bool(torch.isfinite(y).all()) and not bool(y[..., 1][:, 0].any()) and not bool(y[..., 2][:, 1].any())
        (g,) = torch.autograd.grad((y * torch.randn(y.shape)).sum(), logits)
        assert bool(torch.isfinite(g).all())
