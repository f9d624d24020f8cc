"""ScoreFunction (REINFORCE, its baselines) and the methods' shared checks: fastgrad/method/score_function.py and
fastgrad/functional/score_function.py."""
import pytest
import torch
from torch.distributions import Bernoulli, OneHotCategorical

import fastgrad as storch
import fastgrad.functional as F

from .._oracles import LOGITS, TARGET, K, k, story, story_cost, story_dist, story_exact, story_logits
from .._stats import grad_estimates, mean_and_se


# -- the functional layer -------------------------------------------------------------------------------------------
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


# -- the graph API: each estimator against its definition, unbiasedness against Expect within standard errors ----
def _mean_and_se(method, reps, by="probs", plate=True):
    """Mean and standard error of ``reps`` estimates on the story: one step over a plate of repetitions, or (a method
    that keeps state across steps) ``reps`` steps of one ``method``."""
    return mean_and_se(grad_estimates(lambda: method, lambda l: story_dist(l, by), story_cost, LOGITS, reps,
                                      plate=plate, logits_of=story_logits))


@pytest.mark.parametrize("n,baseline", [(1, None), pytest.param(1, "moving_average", marks=pytest.mark.slow),
                                        (10, None), (10, "batch_average"),
                                        pytest.param(10, "moving_average", marks=pytest.mark.slow)])
def test_score_function_unbiased(n, baseline):
    # the moving average moves across steps: 1500 steps of one method (slow); the others in one step
    torch.manual_seed(1)
    _, eg = story_exact(LOGITS)
    mean, se = _mean_and_se(storch.method.ScoreFunction("z", n_samples=n, baseline_factory=baseline), 1500,
                            plate=baseline != "moving_average")
    assert ((mean - eg).abs() <= 4 * se + 1e-4).all(), ((mean - eg).abs() / se).max()


def test_moving_average_baseline_holds_only_earlier_costs():
    # a baseline that includes this step's cost depends on the sample (biased; Storchastic updates before use):
    # the first step's baseline is the initial 0, so its gradient is plain REINFORCE's at the same seed, and the
    # moving average after it is 0.05 times the first step's cost
    grads = {}
    for baseline in (None, "moving_average"):
        torch.manual_seed(5)
        method = storch.method.ScoreFunction("z", n_samples=3, baseline_factory=baseline)
        z, leaf = story(method)
        storch.backward()
        grads[baseline] = (leaf.grad.clone(), method)
    torch.testing.assert_close(grads[None][0], grads["moving_average"][0])
    assert float(grads["moving_average"][1].moving_average) != 0.0  # updated after use


def test_score_function_by_logits_unbiased():
    torch.manual_seed(2)
    _, eg = story_exact(LOGITS)
    mean, se = _mean_and_se(storch.method.ScoreFunction("z", n_samples=4, baseline_factory="batch_average"),
                            1500, by="logits")
    assert ((mean - eg).abs() <= 4 * se + 1e-4).all()


def test_bernoulli_score_and_expect_agree():
    p0 = torch.tensor([0.3, 0.6, 0.9])

    def cost(b):
        return ((b - torch.tensor([1.0, 0.0, 1.0])) ** 2).sum(-1) * 2

    def run(m):
        p = p0.clone().requires_grad_()
        b = m(Bernoulli(probs=p))
        storch.add_cost(cost(b), "c")
        v = storch.backward()
        return v, p.grad

    ev, eg = run(storch.method.Expect("b"))
    torch.manual_seed(6)
    # 800 estimates from one step over a plate of repetitions
    gs = grad_estimates(lambda: storch.method.ScoreFunction("b", n_samples=5, baseline_factory="batch_average"),
                        lambda p: Bernoulli(probs=p), cost, p0, 800, plate=True)
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
                       z.method.surrogate(z, storch.add_cost(((zz - TARGET) ** 2).sum(-1), "c"))
                       if z.method.uses_score else storch.reduce_plates(zz.sum(-1), detach_weights=False)._tensor]
    storch.reset()
    nodes = _graph_nodes(sum(surrogate_parts))
    assert nodes.count("ClampBackward1") == 1 and nodes.count("LogBackward0") == 1, nodes
