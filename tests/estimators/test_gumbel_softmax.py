"""GumbelSoftmax and straight-through Gumbel: fastgrad/method/gumbel_softmax.py and F.gumbel_softmax of
fastgrad/functional/sampling.py."""
import torch

import fastgrad as storch
import fastgrad.functional as F

from .._oracles import LOGITS, TARGET, B, K, k, story, story_cost, story_dist, story_exact, story_logits
from .._stats import grad_estimates, mean_and_se


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


def test_straight_through_is_biased_but_finite():
    # straight-through Gumbel is biased: its mean gradient misses the exact one by many standard errors (600
    # estimates from one step over a plate of repetitions)
    torch.manual_seed(3)
    _, eg = story_exact(LOGITS)
    mean, se = mean_and_se(grad_estimates(lambda: storch.method.GumbelSoftmax("z", straight_through=True),
                                          story_dist, story_cost, LOGITS, 600, plate=True, logits_of=story_logits))
    assert torch.isfinite(mean).all() and (se > 0).all()
    z = (mean - eg).abs() / se
    assert z.max() > 8, z.max()


def test_straight_through_forward_is_one_hot():
    z, _ = story(storch.method.GumbelSoftmax("z", n_samples=5, straight_through=True), LOGITS)
    assert torch.equal(z._tensor.sum(-1), torch.ones(5, B, k))
    assert set(z._tensor.unique().tolist()) <= {0.0, 1.0}


def test_gumbel_softmax_matches_hand_computation():
    torch.manual_seed(4)
    m = storch.method.GumbelSoftmax("z", n_samples=3, initial_temperature=0.7)
    state = torch.random.get_rng_state()
    z, leaf = story(m, LOGITS, by="logits")
    storch.backward()
    # same noise: re-draw the seed the op drew, and compute with plain torch from the same Philox uniforms
    torch.random.set_rng_state(state)
    seed = int(torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64).item())
    u = storch.ops._philox.uniform(seed, 0, 3 * B * k * K).view(3, B, k, K)
    leaf2 = LOGITS.clone().requires_grad_()
    lg = torch.log_softmax(leaf2, -1)
    y = torch.softmax((lg - torch.log(-torch.log(u))) / 0.7, -1)
    assert torch.allclose(z._tensor, y.detach(), atol=1e-6)
    yy = y.reshape(3, B, k * K)
    (((yy - TARGET) ** 2).sum(-1) * 3 + yy[..., 0] * 5).mean().backward()
    assert torch.allclose(leaf.grad, leaf2.grad, atol=1e-5)
    assert torch.isclose(m.temperature, torch.tensor(0.7 * (1 - 1e-5)))
