"""CARMS (Dimitriev & Zhou 2021): the copula samples' marginals and pairwise law (chi-square against
``carms_pair_pmf``), unbiasedness exactly at n = 2 (every pair weighted by its exact probability), the reduction
to ARMS at two classes (the same samples and gradients), homogeneity through the graph API, and errors. Its
statistical unbiasedness at n = 3 on the categorical toy: tests/test_estimator_facts.py; its variance beside RLOO
and categorical DisARM: benchmarks/results/estimator_variance_carms_cpu.json."""
import pytest
import torch
from torch import distributions as D

import fastgrad.functional as F
import fastgrad.method as M

from .._stats import chi2_pvalue, grads_at_scales

LOGITS = torch.tensor([0.3, -0.5, 1.0, 0.1], dtype=torch.float64)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_marginals_and_pairwise_law(n):
    N = 100000
    idx = F.carms_sample(LOGITS.expand(N, 4), n, seed=n)
    p = torch.softmax(LOGITS, -1)
    for s in range(n):
        counts = torch.bincount(idx[s], minlength=4).double()
        assert chi2_pvalue(counts, p) > 1e-3
    q = F.carms_pair_pmf(LOGITS, n)
    torch.testing.assert_close(q.sum(-1), p)  # its marginals are the categorical's
    pair = torch.bincount(idx[0] * 4 + idx[1], minlength=16).double()
    assert int(pair[q.reshape(-1) == 0].sum()) == 0  # pairs the copula cannot draw never occur
    assert chi2_pvalue(pair, q.reshape(-1)) > 1e-3
    if n == 2:  # antithetic: the two samples agree less often than independent ones
        assert float(torch.diagonal(q).sum()) < float((p * p).sum())


def test_unbiased_exactly_at_two_samples():
    logits = LOGITS.clone().requires_grad_(True)
    f = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    q = F.carms_pair_pmf(LOGITS, 2)
    expected = torch.zeros(4, dtype=torch.float64)
    for a in range(4):
        for b in range(4):
            if q[a, b] == 0:
                continue
            idx = torch.tensor([a, b])
            (g,) = torch.autograd.grad(F.carms_surrogate(logits, idx, f[idx]).mean(0), logits)
            expected += q[a, b] * g
    (exact,) = torch.autograd.grad((torch.softmax(logits, -1) * f).sum(), logits)
    torch.testing.assert_close(expected, exact, atol=1e-12, rtol=0)


def test_two_classes_is_arms():
    l = torch.tensor([0.4, 1.3, 0.05, 2.0], dtype=torch.float64, requires_grad=True)  # p1 > 1/2: ARMS not inverted
    n = 4
    b = F.arms_sample(l.detach(), n, seed=3)
    cat = torch.stack([torch.zeros_like(l), l], -1)
    idx = F.carms_sample(cat.detach(), n, seed=3)
    assert torch.equal(idx.double(), b)
    cost = torch.randn(n, 4, dtype=torch.float64)
    (g1,) = torch.autograd.grad(F.arms_surrogate(l, b, cost).mean(0).sum(), l)
    (g2,) = torch.autograd.grad(F.carms_surrogate(cat, idx, cost).mean(0).sum(), l)
    torch.testing.assert_close(g1, g2, atol=1e-12, rtol=0)


@pytest.mark.parametrize("family", [D.OneHotCategorical, D.Categorical])
def test_homogeneity_through_the_graph_api(family):
    theta = torch.tensor([[0.3, -0.2, 0.5, 0.1], [0.0, 0.4, -0.3, 0.2]], requires_grad=True)
    target = torch.arange(4.0)

    def cost(z):
        v = (z * target).sum(-1) if family is D.OneHotCategorical else z.float()
        return ((v - 1.2) ** 2).sum(-1)

    grads = grads_at_scales(lambda: M.CARMS("z", n_samples=3)(family(logits=theta)), cost, theta)
    torch.testing.assert_close(grads[1], 2 * grads[0])
    assert float(grads[0].abs().sum()) > 0


def test_bad_input():
    with pytest.raises(ValueError, match="n >= 2"):
        F.carms_sample(LOGITS, 1)
    with pytest.raises(ValueError, match="idx must be"):
        F.carms_surrogate(LOGITS, torch.tensor([1]), torch.zeros(1))
    with pytest.raises(ValueError, match="cost must have shape"):
        F.carms_surrogate(LOGITS, torch.tensor([1, 2]), torch.zeros(3))
    with pytest.raises(ValueError):
        M.CARMS("z", n_samples=1)


def test_one_class():
    idx = F.carms_sample(torch.zeros(3, 1), 2, seed=0)
    assert idx.shape == (2, 3) and bool((idx == 0).all())
    torch.testing.assert_close(F.carms_pair_pmf(torch.zeros(3, 1), 2), torch.ones(3, 1, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="n >= 2"):
        F.carms_pair_pmf(torch.zeros(3), 1)
