"""The estimator contract (:class:`Method`, :class:`Draw`), the raw view of a distribution's parameters
(:class:`Params`), and the machinery estimator files share: the temperature schedule of the relaxations, the rows
view of an enumerable distribution, plain Monte Carlo draws and their log-probabilities, and the variance-training
step of the learned control variates. Every estimator file imports only this module and :mod:`fastgrad.functional`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Type

import torch
from torch import distributions as D

from .. import _state
from .. import functional as F
from .._graph import reduce_plates
from ..functional._validate import check_n as check_count
from .._tensor import AncestralPlate, Plate, StochasticTensor, Tensor, align, resolve_ancestral, union_plates

ENUMERABLE = (D.Categorical, D.OneHotCategorical, D.Bernoulli)


def step_generation() -> int:
    """The current step's number (it changes at every reset): per-step state of a method is live while it holds."""
    return _state.generation


def check_n_samples(n_samples: object) -> int:
    return check_count(n_samples, "n_samples")


def monte_carlo_samples(sampling_method: object, plate_name: str, n_samples: object,
                        what: str = "Monte Carlo sampling") -> object:
    """Storchastic's ``sampling_method`` argument, where Storchastic's constructor has it, for a method that draws
    i.i.d. (or antithetic) samples: ``None`` (``n_samples``) or ``fastgrad.sampling.MonteCarlo(plate_name, n)`` (its
    ``n``), anything else a ValueError. Returns the number of samples."""
    if sampling_method is None:
        return n_samples
    if type(sampling_method).__name__ == "MonteCarlo" and hasattr(sampling_method, "n_samples"):
        if getattr(sampling_method, "plate_name", None) != plate_name:
            raise ValueError("The plate name of the sampling method and the storch method should match.")
        return sampling_method.n_samples
    raise ValueError(f"sampling_method: only None or fastgrad.sampling.MonteCarlo ({what}) is supported; "
                     "ScoreFunction takes the other sampling methods")


def check_plate_name(plate_name: object) -> str:
    if not isinstance(plate_name, str) or not plate_name:
        raise TypeError(f"plate_name must be a non-empty str, got {plate_name!r}")
    return plate_name


class Params:
    """A distribution's parameters as plain tensors aligned to the distribution's plates.

    ``plates``: plates of the parameters (the sample gets its own plate in front of them).
    ``given``: ``{name: (wrapper_or_tensor, raw)}`` for the parameters the user passed (``probs``/``logits``
    for categoricals and Bernoulli, all tensor parameters otherwise).
    """

    def __init__(self, distr: D.Distribution):
        if not isinstance(distr, D.Distribution):
            raise TypeError(f"a method must be called on a torch.distributions.Distribution, got "
                            f"{type(distr).__name__}")
        # Independent(base, n): the same samples and parameters as base; every method sums the log-probabilities
        # over all non-plate dimensions anyway, so only raw_distribution rebuilds the wrapper
        self.reinterpreted = 0
        while isinstance(distr, D.Independent):
            self.reinterpreted += distr.reinterpreted_batch_ndims
            distr = distr.base_dist
        self.distr = distr
        self.cat = None  # the inner Categorical for categorical families
        if isinstance(distr, D.OneHotCategorical):
            self.cat = distr._categorical
        elif isinstance(distr, D.Categorical):
            self.cat = distr
        elif isinstance(distr, D.RelaxedOneHotCategorical):
            self.cat = distr.base_dist._categorical
        src = self.cat if self.cat is not None else distr
        if self.cat is not None or isinstance(distr, D.Bernoulli):
            name = "probs" if src._param is src.__dict__.get("probs") else "logits"
            tensors = {name: src._param}
        else:
            tensors = {k: v for k, v in ((k, distr.__dict__.get(k)) for k in distr.arg_constraints)
                       if isinstance(v, (torch.Tensor, Tensor))}
        wrapped = [k for k, v in tensors.items() if isinstance(v, Tensor)]
        for k, v in zip(wrapped, resolve_ancestral([tensors[k] for k in wrapped])):
            tensors[k] = v  # parameters computed from several draws of a sampling sequence: its newest version
        self.plates: Tuple[Plate, ...] = union_plates(
            v.plates for v in tensors.values() if isinstance(v, Tensor))
        self.given: Dict[str, Tuple[Any, torch.Tensor]] = {}
        for k, v in tensors.items():
            raw = align(v, self.plates, v.event_dims) if isinstance(v, Tensor) else v
            self.given[k] = (v, raw)

    # -- categorical helpers -----------------------------------------------------------------------------
    def logits(self) -> torch.Tensor:
        """Normalized logits ``[plates..., extra..., K]`` (differentiable) of a categorical family."""
        name, (user, raw) = next(iter(self.given.items()))
        if name != "probs":
            return raw
        # torch.distributions' own conversion (probs clamped to [eps, 1 - eps]): samples, log-probs and
        # enumeration weights see the distribution exactly as its log_prob (and Storchastic) does. The
        # distribution caches it (lazy ``logits``; argument validation already computed it): share that one
        # value, so the step's graph holds one clamp/log instead of two (kl_divergence reads it too).
        cache = self.cat.__dict__ if self.cat is not None else {}
        cached = cache.get("logits")
        if isinstance(cached, Tensor) and isinstance(user, Tensor) and cached.plates == user.plates:
            return align(cached, self.plates, cached.event_dims)
        if isinstance(cached, torch.Tensor) and not isinstance(user, Tensor):
            return cached
        logits = D.utils.probs_to_logits(raw)
        if self.cat is not None and cached is None:
            cache["logits"] = Tensor(logits, user.plates) if isinstance(user, Tensor) else logits
        return logits

    def bernoulli_logits(self) -> torch.Tensor:
        name, (_, raw) = next(iter(self.given.items()))
        if name == "probs":
            eps = torch.finfo(raw.dtype).eps
            p = raw.clamp(eps, 1 - eps)
            return torch.log(p) - torch.log1p(-p)
        return raw

    def raw_distribution(self) -> D.Distribution:
        """The same distribution over plain tensors (for sampling and log_prob outside the graph API)."""
        d = self.distr
        kw = {k: raw for k, (_, raw) in self.given.items()}
        if isinstance(d, D.RelaxedOneHotCategorical):
            out = D.RelaxedOneHotCategorical(d.temperature, validate_args=False, **kw)
        elif isinstance(d, D.RelaxedBernoulli):
            out = D.RelaxedBernoulli(d.temperature, validate_args=False, **kw)
        else:
            out = type(d)(validate_args=False, **kw)
        return D.Independent(out, self.reinterpreted, validate_args=False) if self.reinterpreted else out

    # -- param_grads hooks ---------------------------------------------------------------------------------
    def hook_param_grads(self, sample: StochasticTensor) -> None:
        """Fill ``sample.param_grads[name]`` with the gradient w.r.t. each user-given parameter during backward."""
        store = sample.param_grads
        for name, (user, raw) in self.given.items():
            if not raw.requires_grad:
                continue
            plates = user.plates if isinstance(user, Tensor) else ()
            target = user._tensor if isinstance(user, Tensor) else user

            def record(grad: torch.Tensor, name: str = name, plates: Tuple[Plate, ...] = plates) -> None:
                old = store.get(name)
                store[name] = Tensor(grad if old is None else old._tensor + grad, plates, name + "_grad")

            if self.cat is not None or isinstance(self.distr, D.Bernoulli):
                # torch.distributions normalizes probs/logits; the gradient wanted is the one w.r.t. the
                # tensor the user passed, which is the first input of the normalizing op.
                fn = target.grad_fn
                if fn is not None and fn.next_functions and fn.next_functions[0][0] is not None \
                        and type(fn).__name__ in ("DivBackward0", "SubBackward0"):
                    node, out_nr = fn.next_functions[0]
                    h = node.register_prehook(lambda gos, record=record, out_nr=out_nr: record(gos[out_nr]))
                    _state.hooks.append(h)
                    continue
            _state.hooks.append(target.register_hook(record))


@dataclass
class Draw:
    """What a method's ``_sample`` returns: the typed record of one draw.

    ``value``: ``[n, plates..., batch..., event...]``, the sample the user gets; ``n``: the size of the method's
    plate (``2n`` for antithetic pairs, ``K**k`` for an enumeration); ``weight``: the per-element plate weight
    (``None`` for uniform ``1/n``; e.g. ``q(c)`` for Expect, ``(1/n, 0)`` for antithetic halves) over
    ``[n, plates...]``; ``state``: what the method's ``_surrogate`` needs later (sample indices, noise). A set
    method's draw in a sampling sequence also gives its ``plate`` (an :class:`~fastgrad._tensor.AncestralPlate`),
    the ``others`` plates it is batched over (default: the parameters' plates), and ``plate_last`` (the user's
    sample shows its plate after the others, as Storchastic's)."""

    value: torch.Tensor
    n: int
    weight: Optional[torch.Tensor] = None
    state: Any = None
    plate: Optional[Plate] = None
    others: Optional[Tuple[Plate, ...]] = None
    plate_last: bool = False


@dataclass(frozen=True)
class Facts:
    """What an estimator is, declared once as data on its class (``Method.facts``), as ``torch.distributions``
    declares ``arg_constraints``: the documentation's estimator table is rendered from it
    (``docs/_ext/fastgrad_docs.py``) and ``tests/test_estimator_facts.py`` checks each field against the
    estimator's behaviour (unbiasedness against exact enumeration, the plate size, the cost's graph).

    * ``paper``: who introduced it (authors, venue, year).
    * ``unbiased``: whether ``E[gradient] = grad E[cost]`` (of ``objective``) with the default arguments.
    * ``evaluations``: cost evaluations per draw as a formula in ``n`` (``n_samples``, or ``k`` for the set
      estimators), ``D`` (latents) and ``K`` (classes), e.g. ``"2*n"``, ``"n*D*K"``, ``"K**D"``: the size of the
      sample's plate, on which the user's cost is evaluated.
    * ``differentiable_cost``: whether the cost must be differentiable in the sample (pathwise estimators and those
      that read the cost's gradient); ``False`` means any black-box cost.
    * ``objective``: what the gradient is of: ``"E[f]"``, or ``"E[log mean_k exp(-f_k)]"`` for VIMCO's
      K-sample bound.
    * ``storchastic``: Storchastic 0.3.7's class of that name, or ``None`` when Storchastic has none;
      ``storchastic_correct``: whether Storchastic's computes what its paper does (``storchastic_bug`` says how
      it does not).
    * ``benchmark``: ``(result file stem, row label)`` of its measured variance in ``benchmarks/results/``.
    * ``takes``: the distributions it takes, in words, where ``accepts`` (empty: any) says less, e.g.
      "reparameterizable (rsample)".
    """
    paper: str
    unbiased: bool
    evaluations: str
    differentiable_cost: bool = False
    objective: str = "E[f]"
    storchastic: Optional[str] = None
    storchastic_correct: Optional[bool] = None
    storchastic_bug: str = ""
    benchmark: Optional[Tuple[str, str]] = None
    takes: str = ""


def stale_versions(sample: StochasticTensor, cost: Tensor) -> Dict[Plate, Plate]:
    """The sampling-sequence plates the sample was drawn on (given an earlier draw of a sequence) that the cost
    carries a newer version of: ``{the sample's version: the cost's}``."""
    out = {}
    for p in sample.draw_plates[1:]:
        if isinstance(p, AncestralPlate):
            newer = next((q for q in cost.plates if isinstance(q, AncestralPlate) and q.lineage is p.lineage
                          and q.version > p.version), None)
            if newer is not None:
                out[p] = newer
    return out


def refuse_stale(method: "Method", stale: Dict[Plate, Plate]) -> None:
    p = next(iter(stale))
    raise ValueError(
        f"{type(method).__name__}({method.plate_name!r}) sampled given draw {p.version} of the sampling sequence on "
        f"plate {p.name!r}, which continued after it: its estimate per final sequence is supported for ScoreFunction "
        f"and the pathwise methods. Sample it given the sequence's last draw (its parameters from tensors on the "
        f"newest plate {p.name!r}), or before the sequence continues and register a cost without the later draws")


def aligned_cost(sample: StochasticTensor, cost, detach: bool = True) -> Tuple[Tensor, torch.Tensor]:
    """The cost as the sample sees it: ``cost`` reduced over the plates the sample does not have, then aligned and
    expanded to the sample's plates: ``(reduced cost Tensor, [n, plates...] tensor)``, detached unless asked
    (REBAR differentiates the cost of its relaxed samples). The one place that does this bookkeeping; an
    estimator's ``_surrogate`` writes only its per-sample term."""
    others = [p for p in cost.plates if not any(p is q for q in sample.plates)]
    c = reduce_plates(cost, others, detach_weights=detach) if others else cost
    w = align(c, sample.draw_plates, 0)
    w = (w.detach() if detach else w).expand(tuple(p.n for p in sample.draw_plates))
    return c, w


def reduce_term(sample: StochasticTensor, term: torch.Tensor) -> torch.Tensor:
    """A per-element surrogate term ``[n, plates...]`` with value zero (``term - term.detach()``), reduced over
    the sample's plates with their weights: the number ``backward()`` adds to the loss."""
    term = term - term.detach()  # zero value: backward() reports the cost, not the surrogate
    return reduce_plates(Tensor(term, sample.draw_plates), detach_weights=False)._tensor


class Method(torch.nn.Module):
    """A gradient estimator: ``method(distribution)`` samples and returns a :class:`StochasticTensor`.

    **The estimator contract.** An estimator is its math in ``fastgrad/functional/<family>.py`` (plain functions
    of tensors) and a subclass of this class in ``fastgrad/method/<family>.py`` that declares what it takes and
    implements two methods:

    * ``accepts`` (class attribute): the ``torch.distributions`` families it samples, as data (as
      ``torch.distributions`` declares ``arg_constraints``). :meth:`forward` checks it once, on the distribution
      inside any ``Independent``, and raises a ValueError naming them; ``()`` takes any distribution.
      ``accepts_name`` words the error where the list of classes says less (e.g. "an enumerable distribution").
    * ``min_samples``, ``min_samples_reason`` (class attributes): the least ``n_samples`` it is defined for (e.g.
      2 for leave-one-out baselines), checked in ``__init__``.
    * ``uses_score`` (class attribute): ``backward()`` hands every cost that depends on the sample to
      :meth:`_surrogate`. ``detach_cost``: whether that cost arrives detached (``False`` for estimators that
      differentiate the cost itself: REBAR, VIMCO, Double CV). ``create_graph``: ``backward()`` builds the
      gradient's own graph (estimators that train a control variate on the gradient's variance).
    * ``_sample(params: Params) -> Draw``: draw from the distribution whose parameters ``params`` holds; the
      :class:`Draw` says the sample, the plate size, the plate weights, and the ``state`` the surrogate needs.
      The framework keeps it on the sample: ``sample.draw`` (and ``sample.params``).
    * ``_surrogate(sample, cost) -> term``: ``cost`` is the plain tensor ``[n, plates...]`` of the cost as the
      sample sees it (reduced over plates the sample lacks, aligned and expanded to the sample's plates, by
      :meth:`surrogate`); return the per-element term ``[n, plates...]`` whose gradient is the estimator's. The
      framework zeroes its value and reduces it over the plates with their weights (:func:`reduce_term`).
    * ``facts`` (class attribute): a :class:`Facts` (paper, unbiased or not, cost evaluations, ...), rendered
      into the documentation's estimator table and checked by the tests.
    * optionally ``_update_parameters()`` (after each ``backward()``: temperature schedules, baselines) or
      ``_after_backward(samples)`` (with the step's samples and their ``param_grads``).

    A constructor or call that raises leaves no state behind (:mod:`fastgrad._state`).
    """

    accepts: Tuple[Type[D.Distribution], ...] = ()
    accepts_name: Optional[str] = None
    min_samples = 1  # the least n_samples the estimator is defined for, and why (checked in __init__)
    min_samples_reason = ""
    count_name = "n_samples"  # the constructor's name for it (the set estimators say k)
    uses_score = False  # whether backward adds a score-function term for costs depending on the sample
    detach_cost = True  # whether the cost reaches _surrogate detached
    create_graph = False  # whether backward() must build the gradient's own graph (variance-trained methods)
    facts: Optional[Facts] = None  # what the estimator is, as data (see Facts); every public estimator declares it

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # a constructor or call that raises leaves no state behind (the one rule, see fastgrad._state)
        super().__init_subclass__(**kwargs)
        for name in ("__init__", "forward"):
            fn = cls.__dict__.get(name)
            if fn is not None and not getattr(fn, "__wrapped_resets__", False):
                setattr(cls, name, _state.resets_on_error(fn))

    @_state.resets_on_error
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return super().__call__(*args, **kwargs)

    @_state.resets_on_error
    def __init__(self, plate_name: str, n_samples: int = 1):
        super().__init__()
        self.plate_name = check_plate_name(plate_name)
        self.n_samples = check_n_samples(n_samples)
        if self.n_samples < self.min_samples:
            raise ValueError(f"{type(self).__name__} needs {self.count_name} >= {self.min_samples} "
                             f"({self.min_samples_reason}), got {self.n_samples}")

    def forward(self, distr: D.Distribution) -> StochasticTensor:
        params = Params(distr)
        if self.accepts and not isinstance(params.distr, self.accepts):
            names = [c.__name__ for c in self.accepts]
            listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
            what = f"{self.accepts_name} distribution ({listed})" if self.accepts_name else f"{listed} distribution"
            raise ValueError(f"{type(self).__name__} needs a{'n' if what[0] in 'aeiou' else ''} {what}, got "
                             f"{type(params.distr).__name__}")
        for p in params.plates:
            if p.name == self.plate_name and not self._continues(p):
                raise ValueError(
                    f"plate_name {self.plate_name!r} is already a plate of the distribution's parameters; "
                    "give each sampled variable its own plate name")
        d = self._sample(params)
        if not isinstance(d, Draw):
            raise TypeError(f"{type(self).__name__}._sample must return a fastgrad.method.Draw, got "
                            f"{type(d).__name__}")
        plate = Plate(self.plate_name, d.n) if d.plate is None else d.plate
        others = params.plates if d.others is None else d.others
        plates = (plate,) + others
        if d.weight is not None:
            plate._weight = Tensor(d.weight, plates)
        value, shown = d.value, plates
        if d.plate_last and others:
            value, shown = value.movedim(0, len(others)), others + (plate,)
        s = StochasticTensor(value, shown, self.plate_name, d.n, distr, self, draw=d, params=params,
                             draw_plates=plates)
        params.hook_param_grads(s)
        _state.samples.append(s)
        return s

    def sample(self, distr: D.Distribution) -> StochasticTensor:
        """Storchastic's name for calling the method: samples ``distr`` with this method's scheme."""
        return self(distr)

    def _continues(self, plate: Plate) -> bool:
        """Whether a distribution whose parameters carry ``plate`` (named as this method's plate) continues this
        method's sampling sequence (the set methods' ancestral sampling); otherwise sampling it is an error."""
        return False

    # subclasses implement:
    def _sample(self, params: Params) -> Draw:
        """Draw from the distribution whose parameters are ``params``: a :class:`Draw`."""
        raise NotImplementedError

    def _surrogate(self, sample: StochasticTensor, cost: torch.Tensor) -> torch.Tensor:
        """For methods with ``uses_score``: the per-element term ``[n, plates...]`` for ``cost``, the plain tensor
        ``[n, plates...]`` of a cost that depends on ``sample`` (see the class docstring)."""
        raise NotImplementedError

    def surrogate(self, sample: StochasticTensor, cost: Tensor) -> torch.Tensor:
        """The term ``backward()`` adds for ``cost`` (a registered cost carrying ``sample``'s plate): 0-dim, value
        zero, its gradient the estimator's. Aligns the cost (:func:`aligned_cost`), calls :meth:`_surrogate` and
        reduces its term (:func:`reduce_term`)."""
        stale = stale_versions(sample, cost)
        if stale:
            refuse_stale(self, stale)
        _, w = aligned_cost(sample, cost, detach=self.detach_cost)
        return reduce_term(sample, self._surrogate(sample, w))

    def _after_backward(self, samples: List[StochasticTensor]) -> None:
        """Called once after each ``backward()`` in which this method sampled, with its samples of the step (their
        ``param_grads`` filled; with :attr:`create_graph`, differentiable). Default: :meth:`_update_parameters`."""
        self._update_parameters()

    def _update_parameters(self) -> None:
        """Called once after each backward in which this method sampled."""

    def extra_repr(self) -> str:
        return f"plate_name={self.plate_name!r}, n_samples={self.n_samples}"


def extra_dims(params: Params, raw: torch.Tensor, event_dims: int) -> List[int]:
    """Sizes of the batch dims that are not plates (independent latents inside one draw)."""
    return list(raw.shape[len(params.plates): raw.dim() - event_dims])


# -- what estimator files share --------------------------------------------------------------------------------
def check_temperature(name: str, v: object) -> float:
    """A temperature: a positive finite float (a ValueError naming ``name`` otherwise)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite float, got {v!r}")
    return float(v)


class TemperatureSchedule:
    """Storchastic's annealing of a relaxation's temperature, mixed into a :class:`Method`: it starts at
    ``initial_temperature`` and after each ``backward()`` is multiplied by ``1 - annealing_rate``, floored at
    ``min_temperature``. The three are buffers (saved with the method's ``state_dict``)."""

    def init_schedule(self, initial_temperature: object, min_temperature: object, annealing_rate: object) -> None:
        check_temperature("initial_temperature", initial_temperature)
        check_temperature("min_temperature", min_temperature)
        if isinstance(annealing_rate, bool) or not isinstance(annealing_rate, (int, float)) \
                or not 0 <= annealing_rate < 1:
            raise ValueError(f"annealing_rate must be in [0, 1), got {annealing_rate!r}")
        self.register_buffer("temperature", torch.tensor(float(initial_temperature)))
        self.register_buffer("min_temperature", torch.tensor(float(min_temperature)))
        self.register_buffer("annealing_rate", torch.tensor(float(annealing_rate)))

    def _update_parameters(self) -> None:
        with torch.no_grad():
            self.temperature.copy_(torch.clamp(self.temperature * (1 - self.annealing_rate),
                                               min=self.min_temperature))


class Rows:
    """An enumerable distribution (:data:`ENUMERABLE`) as rows of independent categoricals: ``logits``
    ``[R, D, K]`` (differentiable; a Bernoulli as ``K = 2`` with logits ``[0, l]``), the plate shape, the latents'
    shape, and how to turn configuration indices back into samples. The view of the set estimators and IndeCateR."""

    def __init__(self, params: Params):
        logits = self.class_logits(params)
        npl = len(params.plates)
        self.kind = type(params.distr)
        self.pshape = tuple(logits.shape[:npl])
        self.extra = tuple(logits.shape[npl:-1])
        self.K = logits.shape[-1]
        self.logits = logits.reshape(math.prod(self.pshape), math.prod(self.extra), self.K)

    per_member = False  # the logits are one set member's of per-member conditionals: no log_prob from them

    @classmethod
    def of(cls, kind: type, logits: torch.Tensor, pshape: Tuple[int, ...], extra: Tuple[int, ...],
           per_member: bool = False) -> "Rows":
        """Rows of ``logits`` ``[R, D, K]`` given directly, over plates of shape ``pshape`` and latents ``extra``."""
        rows = cls.__new__(cls)
        rows.kind, rows.pshape, rows.extra, rows.K = kind, tuple(pshape), tuple(extra), logits.shape[-1]
        rows.logits, rows.per_member = logits, per_member
        return rows

    @staticmethod
    def class_logits(params: Params) -> torch.Tensor:
        """``[plates..., latents..., K]`` logits of the parameters (a Bernoulli as ``K = 2``, logits ``[0, l]``)."""
        if isinstance(params.distr, D.Bernoulli):
            bl = params.bernoulli_logits()
            return torch.stack([torch.zeros_like(bl), bl], -1)
        return params.logits()

    def value(self, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``idx`` ``[n, R, D]`` -> samples ``[n, plates..., latents...(, K)]`` as the distribution writes them."""
        v = idx.reshape((idx.shape[0],) + self.pshape + self.extra)
        if issubclass(self.kind, D.OneHotCategorical):
            return torch.nn.functional.one_hot(v, self.K).to(dtype)
        if issubclass(self.kind, D.Bernoulli):
            return v.to(dtype)
        return v

    def log_prob(self, idx: torch.Tensor) -> torch.Tensor:
        """Joint log-probabilities ``[n, plates...]`` of configurations ``idx`` ``[n, R, D]``, differentiable."""
        if self.per_member:
            raise RuntimeError("these rows hold one member's conditional of a sequence: use the draw's log_p")
        lp = F.joint_log_prob(torch.log_softmax(self.logits, -1), idx)
        return lp.view((idx.shape[0],) + self.pshape)

    def plate_view(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape((t.shape[0],) + self.pshape)


def sample_plain(params: Params, n: int) -> Draw:
    """n Monte Carlo samples, not reparameterized: categorical families by the fused sampler (the indices kept as
    the state, for the fused log-probability), others by ``distribution.sample``."""
    if params.cat is not None and not isinstance(params.distr, D.RelaxedOneHotCategorical):
        logits = params.logits().detach()
        if isinstance(params.distr, D.OneHotCategorical):
            idx, value = F.sample_categorical_one_hot(logits, n)
        else:
            idx = value = F.sample_categorical(logits, n)
        return Draw(value, n, state=idx)
    with torch.no_grad():
        value = params.raw_distribution().sample((n,))
    return Draw(value, n)


def sample_log_prob(sample: StochasticTensor) -> torch.Tensor:
    """``log q(z)`` of a :func:`sample_plain` draw, summed over the latents inside one draw: ``[n, plates...]``
    (differentiable w.r.t. the distribution's parameters)."""
    params, idx = sample.params, sample.draw.state
    npl = len(sample.plates)
    if idx is not None:
        logits = params.logits()
        lp = F.categorical_log_prob(logits.expand(idx.shape[1:] + logits.shape[-1:]), idx)
    else:
        lp = params.raw_distribution().log_prob(sample._tensor)
    return sum_latents(lp, npl)


def sum_latents(t: torch.Tensor, npl: int) -> torch.Tensor:
    """``t`` ``[n, plates..., latents...]`` summed over the latents inside one draw: ``[n, plates...]``."""
    return t.sum(tuple(range(npl, t.dim()))) if t.dim() > npl else t


def default_control(in_dim: object, what: str) -> torch.nn.Module:
    """Storchastic's default control network for ``in_dim`` (its ``Dims``: an int, or a shape whose product is the
    input width): ``Linear(in_dim, 50)-ReLU-Linear(50, 1)``."""
    dims = (in_dim,) if isinstance(in_dim, int) and not isinstance(in_dim, bool) else in_dim
    try:
        ok = len(dims) > 0 and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{what} must be a positive int or a shape of positive ints, got {in_dim!r}")
    width = math.prod(dims)
    return torch.nn.Sequential(torch.nn.Flatten(-len(dims), -1) if len(dims) > 1 else torch.nn.Identity(),
                               torch.nn.Linear(width, 50), torch.nn.ReLU(), torch.nn.Linear(50, 1))


def train_on_second_moment(method: Method, samples: List[StochasticTensor]) -> None:
    """The variance-training step of the learned control variates (RELAX, LAX, RODEO; Grathwohl et al. 2018): set
    the ``.grad`` of the method's trainable parameters to the gradient of ``sum(param_grads ** 2)``, the estimate's
    second moment (its mean does not depend on them when the estimator is unbiased), so an optimizer over
    ``method.parameters()`` lowers its variance. ``backward()`` built the gradient's graph (``create_graph``)."""
    control = [p for p in method.parameters() if p.requires_grad]
    if not control:
        return
    loss = None
    for s in samples:
        for g in s.param_grads.values():
            if g._tensor.requires_grad:
                v = (g._tensor ** 2).sum()
                loss = v if loss is None else loss + v
    if loss is None:
        return
    grads = torch.autograd.grad(loss, control, allow_unused=True)
    with torch.no_grad():
        # replace, not add: the step's own backward() also reached these parameters through the surrogate,
        # a gradient they must not follow (Storchastic clears it the same way)
        for p, g in zip(control, grads):
            p.grad = None if g is None else g.detach()
