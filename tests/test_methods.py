"""Each estimator against its definition; unbiasedness against Expect within standard errors."""
import itertools

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, Normal, OneHotCategorical

import fastgrad as storch
import fastgrad.functional as F

B, k, K = 3, 2, 4
TARGET = torch.linspace(-1, 1, B * k * K).view(B, k * K)


def story(method, logits, by="probs"):
    leaf = logits.clone().requires_grad_()
    l = storch.denote_independent(leaf, 0, "data")
    q = OneHotCategorical(probs=l.softmax(-1)) if by == "probs" else OneHotCategorical(logits=l)
    z = method(q)
    zz = z.reshape(z.shape[:-2] + (k * K,))
    storch.add_cost(((zz - TARGET) ** 2).sum(-1) * 3 + zz[..., 0] * 5, "c")
    return z, leaf


def exact_cost_and_grad(logits):
    leaf = logits.clone().requires_grad_()
    lp = torch.log_softmax(leaf, -1)
    total = 0
    for cfg in itertools.product(range(K), repeat=k):
        oh = torch.nn.functional.one_hot(torch.tensor(cfg), K).float().view(k * K)
        c = ((oh - TARGET) ** 2).sum(-1) * 3 + oh[0] * 5
        total = total + (lp[:, 0, cfg[0]] + lp[:, 1, cfg[1]]).exp() * c
    value = total.mean()
    value.backward()
    return value.detach(), leaf.grad


LOGITS = torch.randn(B, k, K, generator=torch.Generator().manual_seed(0))


def test_expect_equals_brute_force():
    z, leaf = story(storch.method.Expect("z"), LOGITS)
    assert z.shape == (K**k, 1, k, K)  # broadcast over the data plate
    value = storch.backward()
    ev, eg = exact_cost_and_grad(LOGITS)
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


def _mean_and_se(method, reps, by="probs"):
    gs = []
    for _ in range(reps):
        _, leaf = story(method, LOGITS, by)
        storch.backward()
        gs.append(leaf.grad)
    g = torch.stack(gs)
    return g.mean(0), g.std(0) / reps**0.5


@pytest.mark.parametrize("n,baseline", [(1, None), (1, "moving_average"), (10, None), (10, "batch_average"),
                                        (10, "moving_average")])
def test_score_function_unbiased(n, baseline):
    torch.manual_seed(1)
    _, eg = exact_cost_and_grad(LOGITS)
    mean, se = _mean_and_se(storch.method.ScoreFunction("z", n_samples=n, baseline_factory=baseline), 1500)
    assert ((mean - eg).abs() <= 4 * se + 1e-4).all(), ((mean - eg).abs() / se).max()


def test_score_function_by_logits_unbiased():
    torch.manual_seed(2)
    _, eg = exact_cost_and_grad(LOGITS)
    mean, se = _mean_and_se(storch.method.ScoreFunction("z", n_samples=4, baseline_factory="batch_average"),
                            1500, by="logits")
    assert ((mean - eg).abs() <= 4 * se + 1e-4).all()


def test_straight_through_is_biased_but_finite():
    # straight-through Gumbel is biased: its mean gradient misses the exact one by many standard errors
    torch.manual_seed(3)
    _, eg = exact_cost_and_grad(LOGITS)
    mean, se = _mean_and_se(storch.method.GumbelSoftmax("z", straight_through=True), 600)
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


def test_reparameterization_variance_shrinks_10x():
    def est(n):
        torch.manual_seed(5)
        out = []
        for _ in range(400):
            mu = torch.tensor([0.5, -1.0], requires_grad=True)
            x = storch.method.Reparameterization("x", n_samples=n)(Normal(mu, torch.ones(2)))
            storch.add_cost(((x - 2) ** 2).sum(-1), "c")
            storch.backward()
            out.append(mu.grad.clone())
        return torch.stack(out).var(0).sum()

    ratio = est(1) / est(10)
    assert 6 < ratio < 16, ratio


def test_infer_picks_reparameterization_for_normal_and_score_for_categorical():
    m = storch.method.Infer("x")
    mu = torch.zeros(2, requires_grad=True)
    x = m(Normal(mu, torch.ones(2)))
    storch.add_cost((x ** 2).sum(-1), "c")
    storch.backward()
    assert isinstance(m._choices[Normal], storch.method.Reparameterization)
    logits = torch.zeros(3, requires_grad=True)
    c = storch.method.Infer("c", n_samples=4)(Categorical(logits=logits))
    assert c.shape == (4,) and c.dtype == torch.int64
    storch.add_cost(c.float() * 1.0, "c")
    storch.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_bernoulli_score_and_expect_agree():
    p0 = torch.tensor([0.3, 0.6, 0.9])

    def run(m):
        p = p0.clone().requires_grad_()
        b = m(Bernoulli(probs=p))
        storch.add_cost(((b - torch.tensor([1.0, 0.0, 1.0])) ** 2).sum(-1) * 2, "c")
        v = storch.backward()
        return v, p.grad

    ev, eg = run(storch.method.Expect("b"))
    torch.manual_seed(6)
    gs = torch.stack([run(storch.method.ScoreFunction("b", n_samples=5, baseline_factory="batch_average"))[1]
                      for _ in range(800)])
    assert ((gs.mean(0) - eg).abs() <= 4 * gs.std(0) / 800**0.5 + 1e-5).all()
    assert torch.allclose(ev, torch.tensor(2 * (0.7 + 0.6 + 0.1)))


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-1, ValueError), (1.5, TypeError), ("3", TypeError)])
def test_bad_n_samples(bad, exc):
    with pytest.raises(exc, match="n_samples"):
        storch.method.ScoreFunction("z", n_samples=bad)


def test_bad_baseline_and_temperature():
    with pytest.raises(ValueError, match="baseline_factory"):
        storch.method.ScoreFunction("z", baseline_factory="mean")
    with pytest.raises(ValueError, match="n_samples > 1"):
        storch.method.ScoreFunction("z", n_samples=1, baseline_factory="batch_average")
    with pytest.raises(ValueError, match="initial_temperature"):
        storch.method.GumbelSoftmax("z", initial_temperature=0.0)


def test_non_finite_or_negative_probs():
    with pytest.raises(ValueError, match="logits"):
        storch.method.ScoreFunction("z")(OneHotCategorical(logits=torch.tensor([0.0, float("nan")]),
                                                           validate_args=False))
    assert storch._state.samples == []
    with pytest.raises(ValueError, match="probs"):
        F.sample_categorical(probs=torch.tensor([0.5, -0.1]), n=2)


def test_method_needs_distribution():
    with pytest.raises(TypeError, match="Distribution"):
        storch.method.ScoreFunction("z")(torch.zeros(3))


def _graph_nodes(t):
    seen, todo, names = set(), [t.grad_fn], []
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("method", [lambda: storch.method.ScoreFunction("z", n_samples=2),
                                    lambda: storch.method.GumbelSoftmax("z"), lambda: storch.method.Expect("z")])
def test_probs_to_logits_computed_once_and_shared_with_kl(method, validate):
    # the method reads the distribution's own (lazily cached) logits: one clamp/log in the step's graph, the
    # one torch.distributions' kl_divergence and log_prob use, whether or not validation computed it first
    leaf = LOGITS.clone().requires_grad_()
    x = storch.denote_independent(leaf, 0, "data")
    q = OneHotCategorical(probs=x.softmax(-1), validate_args=validate)
    z = method()(q)
    prior = OneHotCategorical(probs=torch.ones_like(q.probs) / K, validate_args=validate)
    kl = torch.distributions.kl_divergence(q, prior).sum(-1)
    zz = z.reshape(z.shape[:-2] + (k * K,))
    surrogate_parts = [storch.reduce_plates(kl, detach_weights=False)._tensor,
                       z.method._surrogate(z, storch.add_cost(((zz - TARGET) ** 2).sum(-1), "c"))
                       if z.method.uses_score else storch.reduce_plates(zz.sum(-1), detach_weights=False)._tensor]
    storch.reset()
    nodes = _graph_nodes(sum(surrogate_parts))
    assert nodes.count("ClampBackward1") == 1 and nodes.count("LogBackward0") == 1, nodes
