"""The functional estimators: definitions and unbiasedness against exact enumeration."""
import itertools

import torch

import fastgrad.functional as F


def test_sample_categorical_shapes_and_one_hot():
    l = torch.randn(4, 3, 6)
    idx, oh = F.sample_categorical(l, 5, one_hot=True, seed=1)
    assert idx.shape == (5, 4, 3) and idx.dtype == torch.int64
    assert oh.shape == (5, 4, 3, 6) and torch.equal(oh.argmax(-1), idx)
    assert torch.equal(F.sample_categorical(probs=l.softmax(-1), n=5, seed=1), idx)


def test_non_contiguous_and_expanded_inputs():
    base = torch.randn(6, 8)
    nc = base.t()  # non-contiguous [8, 6]
    a = F.sample_categorical(nc, 3, seed=2)
    b = F.sample_categorical(nc.contiguous(), 3, seed=2)
    assert torch.equal(a, b)
    ex = torch.randn(1, 5).expand(4, 5)
    y = F.gumbel_softmax(ex, 0.5, 2, seed=3)
    assert y.shape == (2, 4, 5) and torch.allclose(y.sum(-1), torch.ones(2, 4))


def test_score_function_surrogate_value_and_grad():
    l = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 5, (4, 3))
    cost = torch.randn(4, 3, dtype=torch.float64)
    s = F.score_function_surrogate(l, idx, cost, baseline="batch_average")
    lp = torch.log_softmax(l, -1).gather(-1, idx.t()).t()
    b = (cost.sum(0, keepdim=True) - cost) / 3
    torch.testing.assert_close(s, (cost - b) * lp)
    s.sum().backward()
    g1 = l.grad.clone()
    l.grad = None
    ((cost - b) * torch.log_softmax(l, -1).gather(-1, idx.t()).t()).sum().backward()
    torch.testing.assert_close(g1, l.grad)


def test_score_function_unbiased_against_exact():
    torch.manual_seed(0)
    l = torch.randn(2, 4)
    f = torch.randn(4)
    exact_l = l.clone().requires_grad_()
    (torch.softmax(exact_l, -1) @ f).sum().backward()
    gs = []
    for _ in range(400):
        x = l.clone().requires_grad_()
        idx = F.sample_categorical(x, 8)
        F.score_function_surrogate(x, idx, f[idx], baseline="batch_average").mean(0).sum().backward()
        gs.append(x.grad)
    g = torch.stack(gs)
    assert ((g.mean(0) - exact_l.grad).abs() <= 4 * g.std(0) / 400**0.5 + 1e-6).all()


def test_enumeration_and_expectation_brute_force():
    l = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    cfg = F.enumerate_configurations(2, 4)
    assert cfg.tolist() == [list(c) for c in itertools.product(range(4), repeat=2)]
    cost = torch.randn(16, 3, dtype=torch.float64)
    e = F.expectation(l, cost)
    lp = torch.log_softmax(l, -1)
    brute = sum((lp[:, 0, a] + lp[:, 1, b]).exp() * cost[4 * a + b] for a, b in itertools.product(range(4), repeat=2))
    torch.testing.assert_close(e, brute)
    g = torch.autograd.grad(e.sum(), l)[0]
    g2 = torch.autograd.grad(brute.sum(), l)[0]
    torch.testing.assert_close(g, g2)


def test_gumbel_softmax_straight_through():
    l = torch.randn(5, 7, requires_grad=True)
    y = F.gumbel_softmax(l, 0.5, 3, hard=True, seed=9)
    assert torch.equal(y.sum(-1), torch.ones(3, 5))
    ys = F.gumbel_softmax(l, 0.5, 3, hard=False, seed=9)
    assert torch.equal(y.argmax(-1), ys.argmax(-1))
    w = torch.randn(3, 5, 7)
    ga = torch.autograd.grad((y * w).sum(), l)[0]
    gb = torch.autograd.grad((ys * w).sum(), l)[0]
    torch.testing.assert_close(ga, gb)
