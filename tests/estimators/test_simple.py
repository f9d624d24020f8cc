"""SIMPLE and the k-subset distribution (fastgrad.functional.k_subset_marginals / k_subset_sample / simple,
fastgrad.method.SIMPLE) against enumeration of the subsets: the marginals exactly (and their gradient: gradcheck),
the sampler's law (chi-square, fixed seed), exactly k ones, SIMPLE exact for linear costs and biased otherwise (its
exact expectation by enumeration), homogeneity, and errors."""
import itertools

import pytest
import torch
from torch import distributions as D

import fastgrad.functional as F
import fastgrad.method as M

from .._stats import chi2_pvalue, grads_at_scales


def _subsets(n, k):
    return torch.tensor([c for c in itertools.product([0.0, 1.0], repeat=n) if sum(c) == k], dtype=torch.float64)


def _law(theta, k):
    z = _subsets(theta.shape[-1], k)
    return z, torch.softmax(theta @ z.t(), -1)  # [S, n], [..., S]


@pytest.mark.parametrize("n,k", [(1, 1), (5, 1), (5, 2), (6, 3), (7, 7), (9, 4)])
def test_marginals_equal_enumeration(n, k):
    theta = torch.randn(3, n, generator=torch.Generator().manual_seed(n * 10 + k), dtype=torch.float64) * 2
    z, p = _law(theta, k)
    mu = F.k_subset_marginals(theta, k)
    torch.testing.assert_close(mu, p @ z, atol=1e-12, rtol=0)
    torch.testing.assert_close(mu.sum(-1), torch.full((3,), float(k), dtype=torch.float64))
    torch.testing.assert_close(F.k_subset_marginals(theta.float(), k).double(), p @ z, atol=1e-5, rtol=0)


def test_marginals_gradcheck():
    theta = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: F.k_subset_marginals(t, 3), (theta,))


def test_sampler_law_and_exactly_k_ones():
    theta = torch.tensor([0.5, -1.0, 0.2, 1.3, -0.4], dtype=torch.float64)
    z_all, p = _law(theta, 2)
    n = 20000
    z = F.k_subset_sample(theta, 2, n, seed=0)
    assert z.shape == (n, 5) and bool((z.sum(-1) == 2).all())
    ids = (z[:, None, :] == z_all[None]).all(-1).double().argmax(-1)
    counts = torch.bincount(ids, minlength=z_all.shape[0]).double()
    assert chi2_pvalue(counts, p) > 1e-3
    assert torch.equal(F.k_subset_sample(theta, 2, 7, seed=3, offset=2), F.k_subset_sample(theta, 2, 7, seed=3, offset=2))


def test_simple_is_exact_for_linear_costs_every_sample():
    theta = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    c = torch.randn(6, dtype=torch.float64)
    y = F.simple(theta, 3, 4, seed=1)
    assert bool((y.detach().sum(-1) == 3).all())
    (g,) = torch.autograd.grad((y * c).sum(-1).mean(0).sum(), theta)
    z, _ = _law(theta.detach(), 3)
    (exact,) = torch.autograd.grad((torch.softmax(theta @ z.t(), -1) @ (z @ c)).sum(), theta)
    torch.testing.assert_close(g, exact, atol=1e-12, rtol=0)


def test_simple_is_biased_for_a_nonlinear_cost_by_exact_enumeration():
    """Its expectation is E[df/dz(z)] J_mu: by enumeration of the subsets, not the exact gradient (the paper's
    estimator is biased beyond linear costs)."""
    theta = torch.tensor([0.4, -0.3, 0.9, 0.1], dtype=torch.float64, requires_grad=True)
    z, p = _law(theta.detach(), 2)

    def f(x):
        return torch.exp(x[..., 0] + 2 * x[..., 2]) - 3 * x[..., 1] * x[..., 3]

    mu = F.k_subset_marginals(theta, 2)
    zz = z.clone().requires_grad_(True)
    (dfdz,) = torch.autograd.grad(f(zz).sum(), zz)
    (expected,) = torch.autograd.grad((p @ dfdz * mu).sum(), theta)  # E[grad] = sum_z p(z) df/dz(z) J_mu
    (exact,) = torch.autograd.grad((torch.softmax(theta @ z.t(), -1) @ f(z)), theta)
    assert float((expected - exact).norm() / exact.norm()) > 0.05


def test_homogeneity_and_graph_api():
    theta = torch.tensor([[0.3, -0.2, 0.5, 0.1]], requires_grad=True)
    grads = grads_at_scales(lambda: M.SIMPLE("z", k=2, n_samples=3)(D.Bernoulli(logits=theta)),
                            lambda z: ((z - 0.3) ** 2 * torch.arange(4.0)).sum(-1).sum(-1), theta)
    torch.testing.assert_close(grads[1], 2 * grads[0])
    assert float(grads[0].abs().sum()) > 0


def test_bad_input():
    with pytest.raises(ValueError, match="k must lie in"):
        F.k_subset_marginals(torch.zeros(3), 4)
    with pytest.raises(ValueError, match="k must"):
        F.k_subset_sample(torch.zeros(3), 0)
    with pytest.raises(ValueError, match="k must"):
        M.SIMPLE("z", k=0)
    with pytest.raises(ValueError):
        F.simple(torch.tensor([0.0, float("nan")]), 1)


def test_k_above_the_possible_items_is_an_error():
    with pytest.raises(ValueError, match="at least k = 3 items"):
        F.k_subset_marginals(torch.tensor([0.0, -float("inf"), 1.0]), 3)
    with pytest.raises(ValueError, match="at least k = 3 items"):
        F.k_subset_sample(torch.tensor([0.0, -float("inf"), 1.0]), 3)
