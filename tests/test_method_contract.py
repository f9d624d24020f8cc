"""The public estimator contract of :class:`fastgrad.method.Method`: ``accepts`` / ``min_samples`` declared as data
and checked in one place, the draw kept on the sample, the cost aligned by the framework before ``_surrogate``, and
an estimator written only against that contract."""
import pytest
import torch
from torch.distributions import Bernoulli, Categorical, Normal, OneHotCategorical

import fastgrad as storch
from fastgrad import _state
from fastgrad import functional as F
from fastgrad.method import Draw, Method


class PlainReinforce(Method):
    """A score-function estimator written against the public contract alone (the contributor guide's example)."""

    accepts = (Categorical, OneHotCategorical)
    uses_score = True

    def _sample(self, params):
        logits = params.logits().detach()
        idx = F.sample_categorical(logits, self.n_samples)
        one_hot = isinstance(params.distr, OneHotCategorical)
        value = torch.nn.functional.one_hot(idx, logits.shape[-1]).to(logits.dtype) if one_hot else idx
        return Draw(value, self.n_samples, state=idx)

    def _surrogate(self, sample, cost):
        logits = sample.params.logits()
        return F.score_function_surrogate(logits.expand(sample.draw.state.shape[1:] + logits.shape[-1:]),
                                          sample.draw.state, cost)


def _step(method, logits, target):
    x = storch.denote_independent(logits, 0, "data")
    z = method(OneHotCategorical(logits=x))
    storch.add_cost(((z - target) ** 2).sum(-1), "c")
    storch.backward()
    return z


def test_an_estimator_written_against_the_contract_equals_score_function():
    target = torch.tensor([0.0, 1.0, 0.0])
    grads = []
    for make in (lambda: PlainReinforce("z", n_samples=4), lambda: storch.method.ScoreFunction("z", n_samples=4)):
        logits = torch.randn(5, 3, generator=torch.Generator().manual_seed(1)).requires_grad_()
        torch.manual_seed(7)
        z = _step(make(), logits, target)
        assert isinstance(z.draw, Draw) and z.draw.n == 4 and z.params.distr.__class__ is OneHotCategorical
        grads.append(logits.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-7)
    assert grads[0].abs().sum() > 0


def test_cost_reaches_surrogate_aligned_and_detached():
    seen = {}

    class Spy(PlainReinforce):
        def _surrogate(self, sample, cost):
            seen["cost"] = cost
            return super()._surrogate(sample, cost)

    logits = torch.zeros(5, 3, requires_grad=True)
    x = storch.denote_independent(logits, 0, "data")
    z = Spy("z", n_samples=2)(OneHotCategorical(logits=x))
    # the cost carries a plate the sample lacks ("extra") and lacks none of the sample's: reduced over "extra"
    extra = storch.denote_independent(torch.arange(4.0), 0, "extra")
    storch.add_cost(z.sum(-1) * extra, "c")
    storch.backward()
    c = seen["cost"]
    assert type(c) is torch.Tensor and c.shape == (2, 5) and not c.requires_grad
    torch.testing.assert_close(c, torch.full((2, 5), 1.5))  # mean of 0..3 times the one-hot's sum 1


@pytest.mark.parametrize("method, distr, words", [
    (lambda: storch.method.ARM("z"), Normal(torch.zeros(3), 1.0), "ARM needs a Bernoulli distribution, got Normal"),
    (lambda: storch.method.DisARM("z"), Normal(torch.zeros(3), 1.0),
     "DisARM needs a Bernoulli, Categorical or OneHotCategorical distribution, got Normal"),
    (lambda: storch.method.GumbelSoftmax("z"), Categorical(logits=torch.zeros(3)),
     "GumbelSoftmax needs a OneHotCategorical or Bernoulli distribution, got Categorical"),
    (lambda: storch.method.UnorderedSetEstimator("z", k=2), Normal(torch.zeros(3), 1.0),
     "UnorderedSetEstimator needs an enumerable distribution (Categorical, OneHotCategorical or Bernoulli), got "
     "Normal"),
    (lambda: PlainReinforce("z"), Bernoulli(logits=torch.zeros(3)),
     "PlainReinforce needs a Categorical or OneHotCategorical distribution, got Bernoulli"),
])
def test_accepts_is_checked_once_and_leaves_no_state(method, distr, words):
    m = method()
    with pytest.raises(ValueError) as e:
        m(distr)
    assert str(e.value) == words
    assert not _state.samples and not _state.costs


def test_accepts_is_declared_on_every_estimator():
    # capabilities as data: every estimator of the catalogue says which families it takes (() = any distribution)
    for name in storch.method.__all__:
        cls = getattr(storch.method, name)
        if isinstance(cls, type) and issubclass(cls, Method) and cls is not Method:
            assert isinstance(cls.accepts, tuple) and all(issubclass(c, torch.distributions.Distribution)
                                                          for c in cls.accepts), name
    assert storch.method.ScoreFunction.accepts == ()  # any distribution with log_prob
    assert storch.method.ARMS.min_samples == 2 and storch.method.VIMCO.min_samples == 2


@pytest.mark.parametrize("cls", [storch.method.ARMS, storch.method.VIMCO, storch.method.DoubleCV,
                                 storch.method.RODEO])
def test_min_samples_names_the_estimator_and_the_reason(cls):
    with pytest.raises(ValueError, match=f"{cls.__name__} needs n_samples >= 2 \\(.+\\), got 1"):
        cls("z", n_samples=1)


@pytest.mark.parametrize("in_dim, shape", [(3, (3,)), ((3, 4), (3, 4)), ([2, 3, 2], (2, 3, 2))])
def test_relax_lax_rebar_take_storchastic_dims(in_dim, shape):
    # Storchastic's in_dim is Dims (an int or a shape, flattened): RELAX(plate, in_dim=(3, 4)) builds its default
    # control network over the 12 inputs of each sample
    for m in (storch.method.RELAX("z", in_dim=in_dim), storch.method.REBAR("z", in_dim=in_dim),
              storch.method.LAX("z", in_dim=in_dim)):
        out = m.c_phi(torch.zeros((5,) + shape))
        assert out.shape == (5, 1), type(m).__name__
    logits = torch.zeros(shape, requires_grad=True)
    z = storch.method.RELAX("z", n_samples=2, in_dim=in_dim)(Bernoulli(logits=logits))
    storch.add_cost(z.sum(tuple(range(1, z.dim()))), "c")
    storch.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("bad", [0, -1, (3, 0), (), "3", 2.5, True])
def test_in_dim_bad_values(bad):
    with pytest.raises(ValueError, match="in_dim must be a positive int or a shape of positive ints"):
        storch.method.RELAX("z", in_dim=bad)
