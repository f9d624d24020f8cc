"""Base class of gradient estimation methods, and the raw view of a distribution's parameters."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import distributions as D

from .. import _state
from .._graph import reduce_plates
from ..functional._validate import check_n as check_count
from .._tensor import Plate, StochasticTensor, Tensor, align, union_plates

_CATEGORICALS = (D.OneHotCategorical, D.Categorical, D.RelaxedOneHotCategorical)



def check_n_samples(n_samples: object) -> int:
    return check_count(n_samples, "n_samples")


def refuse_sampling_method(sampling_method: object, what: str = "Monte Carlo sampling") -> None:
    """Storchastic's ``sampling_method`` argument: accepted in every constructor, only ``None`` supported."""
    if sampling_method is not None:
        raise ValueError(f"sampling_method: only None ({what}) is supported")


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
        self.plates: Tuple[Plate, ...] = union_plates(
            v.plates for v in tensors.values() if isinstance(v, Tensor))
        self.given: Dict[str, Tuple[Any, torch.Tensor]] = {}
        for k, v in tensors.items():
            raw = align(v, self.plates, v.event_dims) if isinstance(v, Tensor) else v
            self.given[k] = (v, raw)
        self.param_name = next(iter(self.given)) if self.given else None

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

    @property
    def plate_shape(self) -> torch.Size:
        raw = next(iter(self.given.values()))[1]
        return raw.shape[: len(self.plates)]

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
    ``[n, plates...]``; ``state``: what the method's ``_surrogate`` needs later (sample indices, noise)."""

    value: torch.Tensor
    n: int
    weight: Optional[torch.Tensor] = None
    state: Any = None


def aligned_cost(sample: StochasticTensor, cost, detach: bool = True) -> Tuple[Tensor, torch.Tensor]:
    """The cost as the sample sees it: ``cost`` reduced over the plates the sample does not have, then aligned and
    expanded to the sample's plates: ``(reduced cost Tensor, [n, plates...] tensor)``, detached unless asked
    (REBAR differentiates the cost of its relaxed samples). The one place that does this bookkeeping; an
    estimator's ``_surrogate`` writes only its per-sample term."""
    others = [p for p in cost.plates if not any(p is q for q in sample.plates)]
    c = reduce_plates(cost, others, detach_weights=detach) if others else cost
    npl = len(sample.plates)
    w = align(c, sample.plates, 0)
    w = (w.detach() if detach else w).expand(sample._tensor.shape[:npl])
    return c, w


def reduce_term(sample: StochasticTensor, term: torch.Tensor) -> torch.Tensor:
    """A per-element surrogate term ``[n, plates...]`` with value zero (``term - term.detach()``), reduced over
    the sample's plates with their weights: the number ``backward()`` adds to the loss."""
    term = term - term.detach()  # zero value: backward() reports the cost, not the surrogate
    return reduce_plates(Tensor(term, sample.plates), detach_weights=False)._tensor


class Method(torch.nn.Module):
    """A gradient estimator: ``method(distribution)`` samples and returns a :class:`StochasticTensor`."""

    uses_score = False  # whether backward adds a score-function term for costs depending on the sample
    create_graph = False  # whether backward() must build the gradient's own graph (variance-trained methods)

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

    def forward(self, distr: D.Distribution) -> StochasticTensor:
        params = Params(distr)
        for p in params.plates:
            if p.name == self.plate_name:
                raise ValueError(
                    f"plate_name {self.plate_name!r} is already a plate of the distribution's parameters; "
                    "give each sampled variable its own plate name")
        d = self._sample(params)
        if not isinstance(d, Draw):
            raise TypeError(f"{type(self).__name__}._sample must return a fastgrad.method.Draw, got "
                            f"{type(d).__name__}")
        plate = Plate(self.plate_name, d.n)
        plates = (plate,) + params.plates
        if d.weight is not None:
            plate._weight = Tensor(d.weight, plates)
        s = StochasticTensor(d.value, plates, self.plate_name, d.n, distr, self, info=(params, d.state))
        params.hook_param_grads(s)
        _state.samples.append(s)
        return s

    def sample(self, distr: D.Distribution) -> StochasticTensor:
        """Storchastic's name for calling the method: samples ``distr`` with this method's scheme."""
        return self(distr)

    # subclasses implement:
    def _sample(self, params: Params) -> Draw:
        """Draw from the distribution whose parameters are ``params``: a :class:`Draw`."""
        raise NotImplementedError

    def _surrogate(self, sample: StochasticTensor, cost) -> torch.Tensor:
        """For methods with ``uses_score``: the term ``backward()`` adds for a cost that depends on ``sample``
        (value zero; its gradient is the estimator's). Use :func:`aligned_cost` and :func:`reduce_term`."""
        raise NotImplementedError

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
