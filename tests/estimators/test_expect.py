"""Expect (exact enumeration): fastgrad/method/expect.py and fastgrad/functional/expect.py."""
import itertools

import pytest
import torch

import fastgrad as storch
import fastgrad.functional as F

from .._oracles import LOGITS, B, K, enumerate_latents, k, story, story_exact


def test_enumeration_and_expectation_brute_force():
    l = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    cfg = F.enumerate_configurations(2, 4)
    assert cfg.tolist() == [list(c) for c in itertools.product(range(4), repeat=2)]
    cost = torch.randn(16, 3, dtype=torch.float64)
    e = F.expectation(l, cost)
    z, lp = enumerate_latents(l, "categorical", batch_dims=1)    # the configurations in the same order
    brute = (lp.exp() * cost[4 * z[:, 0, 0] + z[:, 0, 1]]).sum(0)
    torch.testing.assert_close(e, brute)
    g = torch.autograd.grad(e.sum(), l)[0]
    g2 = torch.autograd.grad(brute.sum(), l)[0]
    torch.testing.assert_close(g, g2)


def test_expect_equals_brute_force():
    z, leaf = story(storch.method.Expect("z"), LOGITS)
    assert z.shape == (K**k, 1, k, K)  # broadcast over the data plate
    value = storch.backward()
    ev, eg = story_exact(LOGITS)
    assert torch.allclose(value, ev, rtol=1e-5)
    assert torch.allclose(leaf.grad, eg, rtol=1e-4, atol=1e-5)
    # param_grads: gradient w.r.t. the probs the user passed, with the data plate
    pg = z.param_grads["probs"]
    assert pg.shape == (B, k, K) and [p.name for p in pg.plates] == ["data"]
    assert z.grad is z.param_grads


def test_expect_budget():
    with pytest.raises(ValueError, match="budget"):
        story(storch.method.Expect("z", budget=10), LOGITS)
    assert storch.costs() == []
