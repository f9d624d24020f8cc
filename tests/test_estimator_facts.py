"""Each estimator's declared :class:`fastgrad.method.Facts` (what the documentation's estimator table shows)
checked against what the estimator does, through the graph API:

* ``unbiased``: the mean of independent gradient estimates equals the exact gradient (tests/_oracles.py) within
  4.5 standard errors when declared unbiased, and misses it by more than 8 when declared biased;
* ``evaluations``: the formula gives the size of the sample's plate (where the user's cost is evaluated);
* ``differentiable_cost``: when declared needed, a black-box cost (the sample detached) makes the estimator raise a
  ValueError or miss the exact gradient by more than 8 standard errors; when not, the unbiasedness check runs on a
  black-box cost;
* ``objective``: VIMCO's is checked against the exact gradient of its K-sample bound;
* ``benchmark``: names a row of a committed result file.
"""
import inspect
import itertools
import json
import math
import os

import pytest
import torch
from torch import distributions as D

import fastgrad as storch
import fastgrad.method as M
from tests import _oracles
from tests._stats import grad_estimates

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ESTIMATORS = sorted({c for c in (getattr(M, n) for n in M.__all__)
                     if isinstance(c, type) and issubclass(c, M.Method) and c.facts is not None},
                    key=lambda c: c.__name__)
N = 3  # n_samples (or k) of every estimator here
REPS = 20000

# the toys: 3 Bernoulli latents, 3 one-hot categoricals of 4 classes, 3 Normal latents. The costs are far from
# quadratic: ReinMax's second-order (Heun) backward is exact on quadratics, so its bias shows only beyond them
def f_bern(b):
    return _oracles.f3(b) + 0.5 * torch.exp(b[..., 0] + b[..., 1] + b[..., 2]) - b[..., 0] * b[..., 2]



CAT = _oracles.THETA_CAT
CAT_T = torch.linspace(-1, 1, 12).view(3, 4)


def f_onehot(z):
    return ((z - CAT_T) ** 2).sum((-1, -2)) * 0.5 + 1.5 * z[..., 0, 1] * z[..., 1, 2] - z[..., 2, 3] \
        + 0.5 * torch.exp(z[..., 0, 1] + z[..., 1, 2] + z[..., 2, 0])


MU, SIGMA, NC = torch.tensor([0.3, -0.5, 1.0]), 0.7, torch.tensor([0.2, 0.1, -0.4])


def f_normal(z):
    return ((z - NC) ** 2).sum(-1) + z[..., 0] * z[..., 1]


RSAMPLE = tuple(c for c in ESTIMATORS if "rsample" in c.facts.takes)  # a continuous toy for these
EXTRA = {M.RELAX: dict(in_dim=3), M.LAX: dict(in_dim=3),  # a control variate network (no default)
         M.SIMPLE: dict(k=2),  # 2 ones among the 3 Bernoulli latents
         # fewer conditional Gumbels than the default 100: the facts do not depend on it, the run time does
         M.ReinMaxRao: dict(conditional_samples=10), M.ReinMaxCV: dict(conditional_samples=10)}


def toy(cls):
    """(param, dist(logits) -> distribution, cost, exact gradient, D, K) for the first family the class takes."""
    if cls not in RSAMPLE and (not cls.accepts or D.Bernoulli in cls.accepts):
        exact = _oracles.exact_grad(f_bern, _oracles.TH3)
        return _oracles.TH3, lambda l: D.Bernoulli(logits=l), f_bern, exact, 3, 2
    if cls not in RSAMPLE and D.OneHotCategorical in cls.accepts:
        exact = _oracles.exact_grad(f_onehot, CAT, "categorical", one_hot=True)
        return CAT, lambda l: D.OneHotCategorical(logits=l), f_onehot, exact, 3, 4
    # reparameterizable (Reparameterization, LAX): E[f] = sum (mu - c)^2 + sigma^2 + mu0 mu1
    exact = 2 * (MU - NC) + torch.stack([MU[1], MU[0], torch.tensor(0.0)])
    return MU, lambda m: D.Normal(m, SIGMA * torch.ones_like(m)), f_normal, exact.double(), 3, None


def make(cls):
    takes_count = cls.count_name in inspect.signature(cls.__init__).parameters  # Expect enumerates: no count
    kw = dict(EXTRA.get(cls, {}), **({cls.count_name: N} if takes_count else {}))
    return lambda: cls("z", **kw)


def estimates(cls, cost, blackbox):
    param, dist, _, _, _, _ = toy(cls)
    torch.manual_seed(0)
    wrapped = (lambda z: cost(z.detach())) if blackbox else cost
    return grad_estimates(make(cls), dist, wrapped, param, REPS, plate=True)


def z_scores(g, exact):
    se = g.std(0) / math.sqrt(g.shape[0])
    diff = (g.mean(0) - exact).abs()
    return torch.where(se > 0, diff / se.clamp_min(1e-300), torch.where(diff > 1e-5, math.inf, 0.0))


def vimco_exact(param):
    """grad E[-log mean_k exp(-f_bern(z_k))] over K = N independent draws, by enumerating every N-tuple."""
    p = param.double().requires_grad_()
    z, lp = _oracles.enumerate_latents(p)
    f = f_bern(z)
    total = 0.0
    for t in itertools.product(range(z.shape[0]), repeat=N):
        t = list(t)
        total = total + lp[t].sum().exp() * -(torch.logsumexp(-f[t], 0) - math.log(N))
    (g,) = torch.autograd.grad(total, p)
    return g


def k_subset_exact(param, k=2):
    """grad E[f_bern(z)] under the k-subset distribution p(z) ∝ exp(<param, z>), sum z = k, by enumeration."""
    p = param.double().requires_grad_()
    z = torch.tensor([c for c in itertools.product([0.0, 1.0], repeat=p.numel()) if sum(c) == k],
                     dtype=torch.float64)
    w = torch.softmax(z @ p, 0)
    (g,) = torch.autograd.grad((w * f_bern(z)).sum(), p)
    return g


def test_every_public_estimator_declares_its_facts():
    missing = [n for n in M.__all__ if isinstance(getattr(M, n), type) and issubclass(getattr(M, n), M.Method)
               and getattr(M, n) not in (M.Method, M.Infer) and getattr(M, n).facts is None]
    assert not missing
    assert M.Infer.facts is None  # a picker, not an estimator: it delegates to one of the others
    assert len(ESTIMATORS) >= 20


@pytest.mark.parametrize("cls", ESTIMATORS, ids=lambda c: c.__name__)
def test_declared_unbiasedness_holds(cls):
    facts = cls.facts
    param, _, cost, exact, _, _ = toy(cls)
    if facts.objective == "E_k[f]":  # SIMPLE: the k-subset distribution's expectation
        assert cls is M.SIMPLE
        exact = k_subset_exact(param)
    elif facts.objective != "E[f]":
        assert cls is M.VIMCO and facts.objective == "E[log mean_k exp(-f_k)]"
        exact = vimco_exact(param)
    g = estimates(cls, cost, blackbox=not facts.differentiable_cost)
    z = z_scores(g, exact)
    if facts.unbiased:
        assert (z < 4.5).all(), (cls.__name__, g.mean(0), exact, z)
    else:
        assert z.max() > 8, (cls.__name__, "declared biased, but its mean is the exact gradient", z)


@pytest.mark.parametrize("cls", [c for c in ESTIMATORS if c.facts.differentiable_cost], ids=lambda c: c.__name__)
def test_declared_need_for_a_differentiable_cost_holds(cls):
    param, _, cost, exact, _, _ = toy(cls)
    if cls.facts.objective == "E_k[f]":
        exact = k_subset_exact(param)
    try:
        g = estimates(cls, cost, blackbox=True)
    except ValueError:
        return
    assert z_scores(g, exact).max() > 8, f"{cls.__name__} works with a black-box cost: differentiable_cost=False"


@pytest.mark.parametrize("cls", ESTIMATORS, ids=lambda c: c.__name__)
def test_declared_evaluations_are_the_plate_size(cls):
    param, dist, cost, _, D_, K = toy(cls)
    z = make(cls)()(dist(param.clone().requires_grad_()))
    try:
        expected = eval(cls.facts.evaluations, {"n": N, "D": D_, "K": K})
        assert z.shape[0] == expected, (cls.facts.evaluations, tuple(z.shape))
    finally:
        storch.reset()


ACCEPTED = [(c, d) for c in ESTIMATORS for d in c.accepts]


@pytest.mark.parametrize("cls,family", ACCEPTED, ids=[f"{c.__name__}-{d.__name__}" for c, d in ACCEPTED])
def test_declared_distributions_are_taken(cls, family):
    # what `accepts` lists (and the docs' table shows) samples and gives a finite gradient
    logits = torch.tensor([[0.3, -0.2, 0.5], [0.1, 0.4, -0.6]], requires_grad=True)
    distr = family(logits=logits)
    z = make(cls)()(distr)
    c = z.float() if family is D.Categorical else z
    while c.event_dims:
        c = c.sum(-1)
    storch.add_cost(c * 0.5 + 0.1, "c")
    storch.backward()
    assert logits.grad is not None and bool(torch.isfinite(logits.grad).all())


@pytest.mark.parametrize("cls", [c for c in ESTIMATORS if c.facts.benchmark], ids=lambda c: c.__name__)
def test_declared_benchmark_row_exists(cls):
    stem, label = cls.facts.benchmark
    data = json.load(open(os.path.join(ROOT, "benchmarks", "results", stem + ".json")))
    labels = {r.get("estimator") for cp in data.get("checkpoints", []) for r in cp["rows"]} \
        | {r.get("method") for r in data.get("runs", [])} | {r.get("estimator") for r in data.get("rows", [])}
    assert label in labels, (stem, sorted(l for l in labels if l))


@pytest.mark.parametrize("cls", [c for c in ESTIMATORS if c.facts.storchastic], ids=lambda c: c.__name__)
def test_storchastic_names_are_kept(cls):
    # the graph API keeps Storchastic's names: its class of that name is this one (or an alias of it)
    assert getattr(M, cls.facts.storchastic) is cls
    assert (cls.facts.storchastic_correct is False) == bool(cls.facts.storchastic_bug)
