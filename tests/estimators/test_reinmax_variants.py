"""ReinMax-Rao and ReinMax-CV (Wang & Bui 2026): fastgrad/{functional,method}/relaxed.py. Their backward passes
against the formulas written out here with explicit Jacobian matrices and the same noise (read from the Philox
stream independently of the conditional sampler), ReinMax-Rao's conditional Jacobian against a quadrature of the
conditional logistic at two classes (the check that it is conditioned at ReinMax's midpoint, not at pi), exact
forward samples, the reductions (eta = 0 is ReinMax at temperature 1), homogeneity through the graph API, Bernoulli
latents, masked classes and errors. Their bias and variance beside ReinMax and Gumbel-Rao on the seed VAE:
benchmarks/results/estimator_variance_reinmax_cpu.json."""
import math

import pytest
import torch
from torch import distributions as D

import fastgrad.functional as F
import fastgrad.method as M
from fastgrad.ops import _philox

from .._stats import chi2_pvalue, grads_at_scales


def _jac(p):
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


def _conditional_perturbed(center, b, u):
    """Tucker et al.'s conditional Gumbels, written out: ``center`` normalized log-probs [..., K], ``b`` [...],
    ``u`` uniforms [..., K] -> perturbed log-probs whose argmax is ``b``."""
    b = b.expand(u.shape[:-1])
    lv = torch.log(u)
    lvb = lv.gather(-1, b.unsqueeze(-1))
    z = -torch.log(-lv / center.exp() - lvb)
    return z.scatter(-1, b.unsqueeze(-1), -torch.log(-lvb))


# the two ways the backward keeps J_GR: the softmaxes' moments (2 (K + 1) <= m) or the m softmaxes
@pytest.mark.parametrize("K,m", [(4, 10), (4, 9), (6, 3)], ids=["moments", "softmaxes-at-boundary", "softmaxes"])
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_reinmax_rao_backward_is_its_formula(tau, K, m):
    torch.manual_seed(0)
    n, R = 2, 5
    logits = torch.randn(R, K, dtype=torch.float64, requires_grad=True)
    up = torch.randn(n, R, K, dtype=torch.float64)
    y = F.reinmax_rao(logits, n, tau, m, seed=11, offset=3)
    ref = F.reinmax(logits, n, seed=11, offset=3)
    assert torch.equal(y.detach(), ref.detach())  # the same exact samples as ReinMax
    (g,) = torch.autograd.grad((y * up).sum(), logits)
    with torch.no_grad():
        b = y.argmax(-1)                                                          # [n, R]
        pi = logits.softmax(-1).expand(n, R, K)
        center = torch.log((pi + y) / 2)
        u = F.uniform((m, n, R, K), seed=11, offset=3 + _philox.counters_used(n * R)).double()
        p = torch.softmax(_conditional_perturbed(center, b, u) / tau, -1)            # [m, n, R, K]
        j_gr = _jac(p).mean(0) / tau                                                 # [n, R, K, K]
        want = ((2 * j_gr - 0.5 * _jac(pi)) @ up.unsqueeze(-1)).squeeze(-1).sum(0)
    torch.testing.assert_close(g, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("fn", [F.reinmax_rao, F.gumbel_rao], ids=["reinmax_rao", "gumbel_rao"])
def test_backward_keeps_the_mean_jacobian_not_the_m_softmaxes(fn):
    """At 2 (K + 1) <= m the graph keeps mean p and mean p p^T (K + 1 samples' worth), not the m softmaxes."""
    n, R, K, m = 2, 8, 10, 100
    logits = torch.randn(R, K, generator=torch.Generator().manual_seed(0), requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(logits, n, m=m, seed=0)
    assert max(saved) <= n * R * K * K
    assert sum(saved) <= 3 * (K + 1) * n * R * K < m * n * R * K


def _logistic_cond_mean(mu: float, tau: float) -> float:
    """E[s (1 - s) | x > 0] for x ~ Logistic(mu, 1), s = sigmoid(x / tau), by the trapezoid rule."""
    x = torch.linspace(0, 60, 600_001, dtype=torch.float64)
    dens = torch.sigmoid(x - mu) * torch.sigmoid(mu - x)
    s = torch.sigmoid(x / tau)
    return float(torch.trapezoid(s * (1 - s) * dens, x) / torch.trapezoid(dens, x))


def test_reinmax_rao_jacobian_is_conditioned_at_the_midpoint():
    # two classes: the conditional perturbation difference is a logistic with mean log(pi_1[D] / pi_1[other]),
    # truncated to > 0, and J_GR = E[s (1 - s)] / tau [[1, -1], [-1, 1]]; the gradient of (y * c).sum() at
    # logit 0 is 2 J_GR (c0 - c1) - pi0 pi1 (c0 - c1) / 2 for either sample
    R, tau, m = 4000, 0.7, 50
    base = torch.tensor([0.4, -0.6], dtype=torch.float64)
    logits = base.expand(R, 2).clone().requires_grad_()
    c = torch.tensor([1.0, -0.5], dtype=torch.float64)
    y = F.reinmax_rao(logits, 1, tau, m, seed=5)
    (g,) = torch.autograd.grad((y * c).sum(), logits)
    pi = base.softmax(-1)
    dc = float(c[0] - c[1])
    for d in (0, 1):
        rows = y[0, :, d].detach() == 1
        pi1 = (pi + torch.nn.functional.one_hot(torch.tensor(d), 2)) / 2
        mu = float(torch.log(pi1[d] / pi1[1 - d]))
        a = _logistic_cond_mean(mu, tau) / tau
        want = 2 * a * dc - 0.5 * float(pi[0] * pi[1]) * dc
        got = g[rows, 0]
        se = float(got.std()) / math.sqrt(int(rows.sum()))
        assert abs(float(got.mean()) - want) < 4.5 * se + 1e-12, (d, float(got.mean()), want, se)
        # conditioned at pi instead of the midpoint: a different number, outside the same bound
        wrong = 2 * _logistic_cond_mean(float(torch.log(pi[d] / pi[1 - d])), tau) / tau * dc \
            - 0.5 * float(pi[0] * pi[1]) * dc
        assert abs(wrong - want) > 10 * se


@pytest.mark.parametrize("tau,eta", [(1.0, 0.7), (0.5, 1.5)])
def test_reinmax_cv_backward_is_its_formula(tau, eta):
    torch.manual_seed(1)
    n, R, K, m = 3, 4, 5, 12  # the moments branch (the softmaxes' is covered by the ReinMax-Rao test)
    logits = torch.randn(R, K, dtype=torch.float64, requires_grad=True)
    up = torch.randn(n, R, K, dtype=torch.float64)
    y = F.reinmax_cv(logits, n, tau, eta, m, seed=7)
    (g,) = torch.autograd.grad((y * up).sum(), logits)
    with torch.no_grad():
        gum = (-torch.log(-torch.log(F.uniform((n, R, K), seed=7)))).double()  # float32 Gumbels, as drawn
        b = (logits + gum).argmax(-1)
        assert torch.equal(y.detach().argmax(-1), b)                             # Gumbel-max
        one = torch.nn.functional.one_hot(b, K).double()
        pi = logits.softmax(-1).expand(n, R, K)
        mid = (pi + one) / 2
        u = F.uniform((m, n, R, K), seed=7, offset=_philox.counters_used(n * R * K)).double()
        j_gr = _jac(torch.softmax(_conditional_perturbed(mid.log(), b, u) / tau, -1)).mean(0) / tau
        j_gs = _jac(torch.softmax((mid.log() + gum) / tau, -1)) / tau
        jac = 2 * _jac(mid) - 0.5 * _jac(pi) + eta * (j_gr - j_gs)
        want = (jac @ up.unsqueeze(-1)).squeeze(-1).sum(0)
    torch.testing.assert_close(g, want, atol=1e-12, rtol=0)


def test_reinmax_cv_at_eta_zero_is_reinmax_at_unit_temperature():
    torch.manual_seed(2)
    logits = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    up = torch.randn(4, 6, 3, dtype=torch.float64)
    y = F.reinmax_cv(logits, 4, 0.5, 0.0, seed=3)
    (g,) = torch.autograd.grad((y * up).sum(), logits)
    with torch.no_grad():
        pi = logits.softmax(-1).expand(4, 6, 3)
        want = ((2 * _jac((pi + y) / 2) - 0.5 * _jac(pi)) @ up.unsqueeze(-1)).squeeze(-1).sum(0)
    torch.testing.assert_close(g, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("m", [3, 12], ids=["softmaxes", "moments"])
@pytest.mark.parametrize("fn", [lambda l, n, s, m: F.reinmax_rao(l, n, seed=s, m=m),
                                lambda l, n, s, m: F.reinmax_cv(l, n, seed=s, m=m)], ids=["rao", "cv"])
def test_forward_is_an_exact_sample_and_masked_classes_stay_out(fn, m):
    logits = torch.tensor([0.5, -math.inf, 1.5, 0.0])
    y = fn(logits, 20000, 4, m)
    assert bool((y.sum(-1) == 1).all()) and not bool(y[:, 1].any())
    counts = y.sum(0)
    live = torch.tensor([0, 2, 3])
    assert chi2_pvalue(counts[live], torch.softmax(logits, -1)[live]) > 1e-3
    lg = logits.clone().requires_grad_()
    (g,) = torch.autograd.grad((fn(lg, 50, 1, m) * torch.randn(50, 4)).sum(), lg)
    assert bool(torch.isfinite(g).all()) and float(g[1]) == 0


@pytest.mark.parametrize("make", [lambda: M.ReinMaxRao("z", n_samples=3, conditional_samples=8),
                                  lambda: M.ReinMaxCV("z", n_samples=3, temperature=0.8, eta=1.5,
                                                      conditional_samples=8)], ids=["rao", "cv"])
@pytest.mark.parametrize("family", ["onehot", "bernoulli"])
def test_homogeneity_through_the_graph_api(make, family):
    if family == "onehot":
        theta = torch.tensor([[0.3, -0.2, 0.5, 0.1]], requires_grad=True)
        dist, cost = (lambda: D.OneHotCategorical(logits=theta)), \
            (lambda z: ((z - 0.2) ** 2 * torch.arange(4.0)).sum(-1).sum(-1))
    else:
        theta = torch.tensor([0.3, -0.7], requires_grad=True)
        dist, cost = (lambda: D.Bernoulli(logits=theta)), (lambda z: ((z - 0.3) ** 2).sum(-1) + z[..., 0] * z[..., 1])
    grads = grads_at_scales(lambda: make()(dist()), cost, theta)
    torch.testing.assert_close(grads[1], 2 * grads[0])
    assert float(grads[0].abs().sum()) > 0


def test_bad_input():
    with pytest.raises(ValueError, match="m must"):
        F.reinmax_rao(torch.zeros(3), 1, 1.0, 0)
    with pytest.raises(ValueError, match="eta must"):
        F.reinmax_cv(torch.zeros(3), 1, 1.0, float("nan"))
    with pytest.raises(ValueError, match="eta must"):
        M.ReinMaxCV("z", eta="big")
    with pytest.raises(ValueError, match="temperature"):
        M.ReinMaxRao("z", temperature=0.0)
    with pytest.raises(ValueError, match="conditional_samples"):
        M.ReinMaxCV("z", conditional_samples=0)
    with pytest.raises(ValueError, match="OneHotCategorical or Bernoulli"):
        M.ReinMaxRao("z")(D.Categorical(logits=torch.zeros(3)))


@pytest.mark.parametrize("which", ["rao", "cv"])
@pytest.mark.parametrize("family", ["onehot", "bernoulli"])
def test_methods_compute_the_functional_forms(which, family):
    # the graph API's gradient equals the functional form's with the method's arguments, from the same seed (a
    # swapped eta and temperature, or a dropped conditional_samples, changes it)
    import fastgrad as storch
    kw = dict(n_samples=2, temperature=0.8, conditional_samples=5, **({"eta": 1.5} if which == "cv" else {}))
    cls, fn = (M.ReinMaxRao, lambda l: F.reinmax_rao(l, 2, 0.8, 5)) if which == "rao" else \
        (M.ReinMaxCV, lambda l: F.reinmax_cv(l, 2, 0.8, 1.5, 5))
    if family == "onehot":
        init = torch.tensor([[0.3, -0.2, 0.5], [0.0, 0.4, -0.3]])
        dist, to_logits, from_one_hot = D.OneHotCategorical, (lambda t: t), (lambda y: y)
        target = torch.tensor([0.2, -0.1, 0.7])
    else:
        init = torch.tensor([0.3, -0.6, 0.1])
        dist, from_one_hot = D.Bernoulli, (lambda y: y[..., 1])
        to_logits = lambda t: torch.stack([torch.zeros_like(t), t], -1)  # noqa: E731
        target = torch.tensor(0.3)

    def cost(z):  # [n, ...latents] -> [n]
        c = (((z - target) ** 2) * (1 + torch.arange(z.shape[-1]))).sum(-1)
        return c.sum(-1) if family == "onehot" else c

    theta = init.clone().requires_grad_()
    torch.manual_seed(0)
    z = cls("z", **kw)(dist(logits=theta))
    storch.add_cost(cost(z), "c")
    storch.backward()
    theta2 = init.clone().requires_grad_()
    torch.manual_seed(0)
    cost(from_one_hot(fn(to_logits(theta2)))).mean(0).backward()
    torch.testing.assert_close(theta.grad, theta2.grad)
    assert float(theta.grad.abs().sum()) > 0


@pytest.mark.parametrize("m", [4, 12], ids=["softmaxes", "moments"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fn", [F.reinmax_rao, F.reinmax_cv], ids=["rao", "cv"])
def test_half_precision_logits(fn, dtype, m):
    # the math runs in float32: the same samples as float32 logits of the same values, the input's dtype out
    base = torch.randn(6, 5).to(dtype)
    lo = base.clone().requires_grad_()
    y = fn(lo, 3, seed=2, m=m)
    y32 = fn(base.float(), 3, seed=2, m=m)
    assert y.dtype == dtype and torch.equal(y.detach().float(), y32)
    (g,) = torch.autograd.grad((y.float() * torch.randn(3, 6, 5)).sum(), lo)
    assert g.dtype == dtype and bool(torch.isfinite(g).all()) and float(g.abs().sum()) > 0


def test_eta_takes_any_real_scalar():
    import numpy as np
    assert M.ReinMaxCV("z", eta=torch.tensor(0.5)).eta == 0.5 and M.ReinMaxCV("z", eta=np.float32(2)).eta == 2.0
    with pytest.raises(ValueError, match="eta must"):
        M.ReinMaxCV("z", eta=torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="eta must"):
        M.ReinMaxCV("z", eta=True)
