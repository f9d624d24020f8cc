"""Every raise of the graph API leaves no state behind: after the error, the next step equals a fresh one.

Each case first half-builds a step (a sampled latent, a registered cost), then triggers one raise site. The next
step (deterministic: Expect) must give the same loss and gradients as the same step run from a clean state.
"""
import pytest
import torch
from torch.distributions import Bernoulli, Normal, OneHotCategorical

import fastgrad as storch
from fastgrad import _state


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 4)


def _step(model):
    """One deterministic step: exact expectation over a 2x2 categorical latent."""
    model.zero_grad()
    x = storch.denote_independent(torch.linspace(-1, 1, 6).view(2, 3), 0, "data")
    q = OneHotCategorical(logits=model(x).view(x.shape[0], 2, 2))
    z = storch.method.Expect("z")(q)
    storch.add_cost(((z - 0.3) ** 2).sum((-1, -2)), "cost")
    loss = storch.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _half_step():
    """Registers a cost and a sample (with its param_grads hook), as a step that fails midway does."""
    p = torch.full((2, 3), 0.3, requires_grad=True)
    x = storch.denote_independent(p, 0, "data")
    s = storch.method.ScoreFunction("w", n_samples=2)(Bernoulli(probs=x))
    storch.add_cost(s.sum(-1) * 5.0, "leftover")
    assert _state.costs and _state.samples and _state.hooks
    return x, s


def _nan_categorical():
    # torch.distributions refuses NaN logits at construction; they arise later (a diverged encoder)
    d = OneHotCategorical(logits=torch.zeros(2, 3))
    d._categorical._param.fill_(float("nan"))
    return d


RAISE_SITES = {
    # constructors (checks of every Method subclass)
    "ScoreFunction n_samples=0": (lambda x, s: storch.method.ScoreFunction("w2", n_samples=0), ValueError),
    "ScoreFunction baseline": (lambda x, s: storch.method.ScoreFunction("w2", baseline_factory="bad"), ValueError),
    "batch_average n=1": (lambda x, s: storch.method.ScoreFunction("w2", baseline_factory="batch_average"),
                          ValueError),
    "GumbelSoftmax temperature": (lambda x, s: storch.method.GumbelSoftmax("g", initial_temperature=-1.0),
                                  ValueError),
    "Expect budget": (lambda x, s: storch.method.Expect("e", budget=0), ValueError),
    "plate_name": (lambda x, s: storch.method.Expect(""), TypeError),
    "Reparameterization sampling_method": (lambda x, s: storch.method.Reparameterization("r", "x"), ValueError),
    # method calls
    "not a distribution": (lambda x, s: storch.method.Expect("e")(torch.ones(3)), TypeError),
    "plate already present": (lambda x, s: storch.method.Expect("data")(Bernoulli(probs=x)), ValueError),
    "Expect over budget": (lambda x, s: storch.method.Expect("e", budget=3)(OneHotCategorical(logits=torch.zeros(
        2, 4))), ValueError),
    "GumbelSoftmax on Normal": (lambda x, s: storch.method.GumbelSoftmax("g")(Normal(x, 1.0)), ValueError),
    "Reparameterization on Bernoulli": (lambda x, s: storch.method.Reparameterization("r")(Bernoulli(probs=x)),
                                        ValueError),
    "NaN logits of a second latent": (lambda x, s: storch.method.ScoreFunction("w2")(_nan_categorical()),
                                      ValueError),
    # graph functions
    "denote_independent dim": (lambda x, s: storch.denote_independent(torch.ones(3), 5, "d"), ValueError),
    "denote_independent name": (lambda x, s: storch.denote_independent(torch.ones(3), 0, ""), TypeError),
    "add_cost name": (lambda x, s: storch.add_cost(s.sum(-1), ""), ValueError),
    "add_cost event shape": (lambda x, s: storch.add_cost(s, "c"), ValueError),
    "add_cost int": (lambda x, s: storch.add_cost(torch.ones(3, dtype=torch.long), "c"), TypeError),
    "reduce_plates unknown": (lambda x, s: storch.reduce_plates(s, "nope"), ValueError),
    "variance plate": (lambda x, s: storch.variance(s, "nope"), ValueError),
    "gather_samples empty": (lambda x, s: storch.gather_samples([], "g"), TypeError),
    "gather_samples name": (lambda x, s: storch.gather_samples([x, x], "data"), ValueError),
    # plate tensors
    "plate dim removed": (lambda x, s: s.sum(), ValueError),
    "plate sizes": (lambda x, s: x + storch.denote_independent(torch.ones(3, 3), 0, "data"), ValueError),
    "bool": (lambda x, s: bool(s > 0), storch.IllegalStorchExposeError),
    "float": (lambda x, s: float(s), storch.IllegalStorchExposeError),
    "index": (lambda x, s: range(s), storch.IllegalStorchExposeError),
    "item": (lambda x, s: s.item(), storch.IllegalStorchExposeError),
    "allclose": (lambda x, s: torch.allclose(s, s), storch.IllegalStorchExposeError),
    "iter": (lambda x, s: list(s), TypeError),
    "get_plate": (lambda x, s: s.get_plate("nope"), ValueError),
    "torch error inside a torch function": (lambda x, s: torch.matmul(x, torch.ones(5, 5)), RuntimeError),
    "Tensor constructor": (lambda x, s: storch.Tensor(torch.ones(2, 3), [], [storch.Plate("p", 5)]), ValueError),
    "Plate constructor": (lambda x, s: storch.Plate("p", 0), ValueError),
    # backward itself: a cost the surrogate cannot use (NaN) raises, then the step is gone
    "backward NaN cost": (lambda x, s: (storch.add_cost(s.sum(-1) * float("nan"), "nan"), storch.backward()),
                          ValueError),
}


@pytest.fixture(scope="module")
def fresh():
    _state.reset()
    return _step(_model())


@pytest.mark.parametrize("site", sorted(RAISE_SITES))
def test_raise_leaves_no_state(site, fresh):
    _state.reset()
    fn, exc = RAISE_SITES[site]
    x, s = _half_step()
    with pytest.raises(exc):
        fn(x, s)
    assert not _state.costs and not _state.samples and not _state.hooks, site
    loss, grads = _step(_model())
    assert torch.equal(loss, fresh[0]), site
    for g, h in zip(grads, fresh[1]):
        assert torch.equal(g, h), site


def test_hasattr_probe_does_not_reset():
    # AttributeError is how Python probes attributes; it is not an error of the step
    _state.reset()
    x, s = _half_step()
    assert not hasattr(s, "no_such_attribute")
    assert _state.costs and _state.samples
    _state.reset()


def test_backward_returns_surrogate_with_grad_fn():
    _state.reset()
    p = torch.full((3,), 0.4, requires_grad=True)
    s = storch.method.ScoreFunction("s", n_samples=4, baseline_factory="batch_average")(Bernoulli(probs=p))
    storch.add_cost(((s - 0.2) ** 2).sum(-1), "c")
    value = storch.backward()
    assert value.grad_fn is not None and value.dim() == 0
    # its value is the estimated cost (the score terms enter with value zero)
    torch.testing.assert_close(value.detach(), ((s._tensor - 0.2) ** 2).mean(0).sum(), rtol=0, atol=1e-6)


def test_backward_is_linear_in_samples_and_costs():
    # 2000 GumbelSoftmax samples with one cost each: the old nested loop visited 4 million pairs; count the
    # surrogate-term lookups instead of timing (one per plate of each cost)
    _state.reset()
    calls = []
    orig = storch.method.ScoreFunction.surrogate

    def counting(self, sample, cost):
        calls.append(1)
        return orig(self, sample, cost)

    storch.method.ScoreFunction.surrogate = counting
    try:
        p = torch.full((2,), 0.5, requires_grad=True)
        for i in range(200):
            g = storch.method.GumbelSoftmax(f"g{i}")(Bernoulli(probs=p))
            storch.add_cost(g.sum(-1), f"c{i}")
        s = storch.method.ScoreFunction("sf")(Bernoulli(probs=p))
        storch.add_cost(s.sum(-1), "sf_cost")
        storch.backward()
    finally:
        storch.method.ScoreFunction.surrogate = orig
    assert len(calls) == 1  # only the one cost that carries the score-function sample's plate
