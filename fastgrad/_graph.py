"""The stochastic computation graph API (Storchastic's names, arguments and semantics)."""
from __future__ import annotations

import warnings
from typing import List, Optional, Sequence, Tuple, Union

import torch

from . import _state
from ._tensor import AncestralPlate, CostTensor, IndependentTensor, Plate, Tensor, align, apply, to_heads

__all__ = ["denote_independent", "add_cost", "backward", "surrogate_loss", "reset", "costs", "gather_samples",
           "variance", "reduce_plates", "NoCostError"]

PlatesArg = Union[None, str, Plate, Sequence[Union[str, Plate]]]


class NoCostError(ValueError, RuntimeError):
    """``backward()`` was called with no cost registered (a ValueError, and a RuntimeError as in Storchastic)."""


def _unwrap(x: object, name: str) -> Tuple[torch.Tensor, Tuple[Plate, ...]]:
    """A fastgrad.Tensor or torch.Tensor as (raw tensor, plates); anything else is a TypeError naming ``name``."""
    if isinstance(x, Tensor):
        return x._tensor, x.plates
    if isinstance(x, torch.Tensor):
        return x, ()
    raise TypeError(f"{name} must be a torch.Tensor or fastgrad.Tensor, got {type(x).__name__}")


@_state.resets_on_error
def denote_independent(tensor: Union[torch.Tensor, Tensor], dim: int, plate_name: str,
                       weight: Optional[Tensor] = None) -> IndependentTensor:
    """Mark dimension ``dim`` of ``tensor`` as independent (a plate named ``plate_name``); it moves to the left."""
    if not isinstance(plate_name, str) or not plate_name:
        raise TypeError(f"plate_name must be a non-empty str, got {plate_name!r}")
    raw, plates = _unwrap(tensor, "tensor")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    nd = raw.dim()
    d = dim + nd if dim < 0 else dim
    if not len(plates) <= d < nd:
        raise ValueError(f"dim must index an event dimension of the tensor (shape {tuple(raw.shape)}, "
                         f"{len(plates)} plate dims), got {dim}")
    if any(p.name == plate_name for p in plates):
        raise ValueError(f"plate_name {plate_name!r} is already a plate of this tensor")
    if d != 0:
        raw = raw.movedim(d, 0)
    return IndependentTensor(raw, (Plate(plate_name, raw.shape[0], weight),) + plates, plate_name)


@_state.resets_on_error
def add_cost(cost: Union[torch.Tensor, Tensor], name: str) -> CostTensor:
    """Register ``cost`` (one value per element of its plates; event shape ``()`` or ``(1,)``)."""
    if not isinstance(name, str) or not name:
        raise ValueError("No name provided to register cost node. Make sure to register an unique name "
                         "with the cost (name must be a non-empty str).")
    raw, plates = _unwrap(cost, "cost")
    if not raw.is_floating_point():
        raise TypeError(f"cost must be a floating tensor, got {raw.dtype}")
    ev = raw.shape[len(plates):]
    if tuple(ev) == (1,):
        raw = raw.squeeze(-1)
    elif len(ev):
        raise ValueError(
            f"Can only register cost functions with empty event shapes: cost {name!r} has plates "
            f"{list(plates)} and event shape {tuple(ev)}. A cost that lost a plate dimension, or that still has "
            "event dimensions, must be reduced explicitly (sum over event dims, reduce_plates over plates).")
    c = CostTensor(raw, plates, name)
    if torch.is_grad_enabled():
        _state.costs.append(c)
    return c


def costs() -> List[CostTensor]:
    """The costs registered since the last :func:`backward` / :func:`reset`."""
    return list(_state.costs)


def reset() -> None:
    """Forget registered costs and samples (``backward`` does this itself)."""
    _state.reset()


def _as_plates(t: Tensor, plates: PlatesArg) -> List[Plate]:
    if plates is None:
        return list(t.plates)
    if isinstance(plates, (str, Plate)):
        plates = [plates]
    out = []
    for p in plates:
        if isinstance(p, Plate):
            p = p.name
        if not isinstance(p, str):
            raise TypeError(f"plates must be plate names or Plates, got {type(p).__name__}")
        out.append(t.get_plate(p))
    return out


@_state.resets_on_error
def reduce_plates(tensor: Union[Tensor, torch.Tensor], plates: PlatesArg = None,
                  detach_weights: bool = True) -> Tensor:
    """Reduce ``tensor`` over ``plates`` (default: all), weighting elements by the plates' weights
    (the mean for sampled and data plates, ``q(z)`` for enumerated ones)."""
    if not isinstance(tensor, Tensor):
        if isinstance(tensor, torch.Tensor):
            tensor = Tensor(tensor, ())
        else:
            raise TypeError(f"tensor must be a fastgrad.Tensor, got {type(tensor).__name__}")
    t = tensor
    for p in _reduction_order(_as_plates(tensor, plates)):
        t = _reduce_one(t, p, detach_weights)
    return t


def _reduction_order(todo: List[Plate]) -> List[Plate]:
    """A plate is reduced before every plate its weight varies along (an enumerated plate's weights ``q(c | x)`` vary
    along the data plate ``x``); among the plates free to go, the newest first. The versions of a sampling sequence
    count as one plate (a weight on an earlier version varies along the newest once aligned)."""
    def key(q: Plate) -> object:
        return ("sequence", id(q.lineage)) if isinstance(q, AncestralPlate) else id(q)

    deps = {id(p): {key(q) for q in (p._weight.plates if p._weight is not None else ()) if key(q) != key(p)}
            for p in todo}
    left = sorted(todo, key=lambda p: -p.order)
    out: List[Plate] = []
    while left:
        waiting = set().union(*(deps[id(p)] for p in left))
        ready = [p for p in left if key(p) not in waiting] or left[:1]  # a cycle cannot come from the graph API
        out.append(ready[0])
        left.remove(ready[0])
    return out


def _reduce_one(t: Tensor, p: Plate, detach_weights: bool) -> Tensor:
    i = t.get_plate_dim_index(p.name)
    rest = t.plates[:i] + t.plates[i + 1:]
    if p._weight is None:
        return Tensor(t._tensor.mean(i), rest)
    w = p._weight.detach() if detach_weights else p._weight
    prod = apply(torch.mul, (t, w), {})  # aligns plates
    j = prod.get_plate_dim_index(p.name)
    return Tensor(prod._tensor.sum(j), prod.plates[:j] + prod.plates[j + 1:])


@_state.resets_on_error
def gather_samples(samples: Sequence[Union[Tensor, torch.Tensor]], plate_name: str,
                   weight: Optional[Tensor] = None) -> IndependentTensor:
    """Stack ``samples`` (e.g. gradient estimates of repeated steps) along a new plate ``plate_name``."""
    if not isinstance(samples, (list, tuple)) or not samples:
        raise TypeError("samples must be a non-empty list of tensors")
    first = samples[0]
    plates = first.plates if isinstance(first, Tensor) else ()
    raws = []
    for s in samples:
        if isinstance(s, Tensor):
            raws.append(align(s, plates, s._tensor.dim() - len(s.plates)) if s.plates != plates else s._tensor)
        elif isinstance(s, torch.Tensor):
            raws.append(s)
        else:
            raise TypeError(f"samples must hold tensors, got {type(s).__name__}")
    if any(p.name == plate_name for p in plates):
        raise ValueError(f"plate_name {plate_name!r} is already a plate of the samples")
    raw = torch.stack(torch.broadcast_tensors(*raws), 0)
    return IndependentTensor(raw, (Plate(plate_name, len(raws), weight),) + plates, plate_name)


@_state.resets_on_error
def variance(tensor: Tensor, variance_plate: Union[str, Plate], plates: PlatesArg = None,
             detach_weights: bool = True) -> Tensor:
    """Variance along ``variance_plate``, summed over event dims, then reduced over the remaining plates."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"tensor must be a fastgrad.Tensor, got {type(tensor).__name__}")
    name = variance_plate.name if isinstance(variance_plate, Plate) else variance_plate
    if not any(p.name == name for p in _as_plates(tensor, plates)):
        raise ValueError("Should pass a variance_plate that is included in the passed plates.")
    mean = reduce_plates(tensor, name, detach_weights)
    sq = (tensor - mean) ** 2
    if sq.event_dims:
        sq = Tensor(sq._tensor.sum(tuple(sq.event_dim_indices)), sq.plates)
    return reduce_plates(sq, plates, detach_weights)


@_state.resets_on_error
def surrogate_loss(debug: bool = False) -> Tensor:
    """The surrogate loss of the registered costs, without running autograd or resetting (Storchastic's
    ``storch.surrogate_loss``): the sum over costs of the plate-reduced cost plus each score-function term (of
    value zero). Linear in the number of costs and samples: each cost visits only the samples whose plates it
    carries."""
    if not _state.costs:
        raise NoCostError("No cost nodes registered for backward call: register costs with add_cost(cost, name).")
    # every descendant of a sample carries the sample's own plate (s.plate)
    scored = {id(s.plate): s for s in _state.samples if s.method is not None and s.method.uses_score}
    loss = None
    for cost in _state.costs:
        # a cost on an earlier draw of a sampling sequence is estimated on the sequence's final set (its newest
        # plate), whose sample holds the joint log-probability of every draw
        c = to_heads(cost)
        red = reduce_plates(c, detach_weights=False)._tensor
        loss = red if loss is None else loss + red
        if scored:
            for p in c.plates:
                s = scored.get(id(p))
                if s is not None:
                    loss = loss + s.method.surrogate(s, c)
        if debug:
            print(f"cost {cost.name}: {float(red.detach()):.6g}")
    return Tensor(loss, ())


def _leaves(loss: torch.Tensor) -> List[torch.Tensor]:
    """The leaf tensors autograd accumulates ``.grad`` into from ``loss`` (its graph's AccumulateGrad nodes)."""
    out, seen, stack = [], set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None:
            out.append(var)
        stack.extend(f for f, _ in fn.next_functions)
    return out


def backward(debug: bool = False, create_graph: bool = False, update_estimator_params: bool = True) -> torch.Tensor:
    """Build the surrogate loss of all registered costs (:func:`surrogate_loss`), run autograd, reset the graph.

    Returns the surrogate loss as a 0-dim tensor, as Storchastic does (with its ``grad_fn`` when it required
    grad). Its value is the estimated total cost (sum over costs of the plate-reduced cost): the score-function
    terms enter with value zero.
    """
    try:
        loss = surrogate_loss(debug)._tensor
        # a method that trains on the gradient estimate itself (RELAX's control variate) asks for its graph
        higher = create_graph or any(s.method is not None and s.method.create_graph for s in _state.samples)
        leaves = []
        if loss.requires_grad and higher and not create_graph:
            # the estimator wants the gradient's graph, the user does not: once the estimator has read it, each
            # leaf's .grad is detached, which breaks the parameter <-> .grad cycle torch warns about
            leaves = _leaves(loss)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
                loss.backward(create_graph=True)
        elif loss.requires_grad:
            loss.backward(create_graph=higher)
        if update_estimator_params:
            by_method = {}
            for s in _state.samples:
                if s.method is not None:
                    by_method.setdefault(id(s.method), (s.method, []))[1].append(s)
            for method, samples in by_method.values():
                method._after_backward(samples)
        for leaf in leaves:
            if leaf.grad is not None and leaf.grad.requires_grad:
                leaf.grad = leaf.grad.detach()
        return loss
    finally:
        _state.reset()
