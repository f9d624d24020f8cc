"""Storchastic's top-level helpers (``storch.cat``, ``storch.sum``, ``storch.deterministic``, ...), on fastgrad's
plate tensors and without patching torch.

Torch functions already reach plate tensors through ``__torch_function__`` (:func:`fastgrad._tensor.apply`), so
the wrappers here are thin: they name that dispatch for user functions, and reduce over plates by name.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from . import _state
from ._tensor import _EXPAND, _PLAIN, Plate, StochasticTensor, Tensor, _apply_general, apply

__all__ = ["cat", "gather", "mean", "sum", "logsumexp", "grad", "print_graph", "deterministic", "reduce",
           "make_left_broadcastable", "ignore_wrapping"]

Dims = Union[int, str, Plate, Sequence[Union[int, str, Plate]]]


def deterministic(fn: Optional[Callable] = None, *, expand_plates: bool = False, **_: Any) -> Callable:
    """Decorator: run ``fn`` on the torch values of its plate-tensor arguments, aligned to the union of their
    plates (one dimension per plate, in front), and wrap the result with those plates. ``expand_plates=True``
    expands every plate dimension to its full size first (functions that want equal shapes, e.g. losses).
    Usable as ``@deterministic`` or ``@deterministic(expand_plates=True)``, as Storchastic's."""

    def wrap(f: Callable) -> Callable:
        kind = _EXPAND if expand_plates else _PLAIN

        @functools.wraps(f)
        @_state.resets_on_error
        def run(*args: Any, **kwargs: Any) -> Any:
            if not any(_holds(a) for a in args) and not any(_holds(v) for v in kwargs.values()):
                return f(*args, **kwargs)
            return _apply_general(f, args, kwargs, kind)

        return run

    return wrap(fn) if fn is not None else wrap


def _holds(v: Any) -> bool:
    return isinstance(v, Tensor) or (isinstance(v, (list, tuple)) and any(isinstance(x, Tensor) for x in v))


make_left_broadcastable = deterministic  # plates always broadcast from the left here


def reduce(fn: Callable, plates: Union[str, Sequence[str]]) -> Callable:
    """Decorator: ``fn`` removes the dimensions of ``plates`` (e.g. a sum over samples); the result keeps the
    other plates. The reduction is unweighted: :func:`fastgrad.reduce_plates` weights by the plates' weights."""
    names = [plates] if isinstance(plates, str) else [p.name if isinstance(p, Plate) else p for p in plates]

    @functools.wraps(fn)
    @_state.resets_on_error
    def run(*args: Any, **kwargs: Any) -> Any:
        found = [a for a in list(args) + list(kwargs.values()) if isinstance(a, Tensor)]
        if not found:
            return fn(*args, **kwargs)
        from ._tensor import align, resolve_ancestral, union_plates

        resolved = resolve_ancestral(found)
        plates = union_plates(t.plates for t in resolved)
        ev = max(t.event_dims for t in resolved)
        raw = {id(t): align(r, plates, ev) for t, r in zip(found, resolved)}
        out = fn(*[raw.get(id(a), a) if isinstance(a, Tensor) else a for a in args],
                 **{k: raw.get(id(v), v) if isinstance(v, Tensor) else v for k, v in kwargs.items()})
        keep = tuple(p for p in plates if p.name not in names)
        return Tensor(out, keep) if isinstance(out, torch.Tensor) else out

    return run


@contextlib.contextmanager
def ignore_wrapping() -> Iterator[None]:
    """Storchastic's switch for running torch code on plate tensors unwrapped. fastgrad never patches torch and
    has nothing to switch off: plain torch tensors inside the block are plain already."""
    yield


def _dims(t: Tensor, dims: Dims) -> Tuple[Tuple[int, ...], List[str]]:
    """Storchastic's rule: ints index event dimensions (negative from the right, or >= the plate count); plate
    names (or Plates) index their plate dimension, which the reduction removes."""
    if not isinstance(dims, (list, tuple)):
        dims = [dims]
    out, plates = [], []
    for d in dims:
        if isinstance(d, bool):
            raise TypeError("dims must be ints, plate names or Plates, got a bool")
        if isinstance(d, int):
            if not (d >= t.plate_dims or -t.event_dims <= d < 0) or not -t.dim() <= d < t.dim():
                raise ValueError(f"Can only pass indexes for event dimensions: tensor with plates {list(t.plates)} "
                                 f"and event shape {tuple(t.event_shape)}, index {d}")
            out.append(d)
        elif isinstance(d, (str, Plate)):
            name = d.name if isinstance(d, Plate) else d
            out.append(t.get_plate_dim_index(name))
            plates.append(name)
        else:
            raise TypeError(f"dims must be ints, plate names or Plates, got {type(d).__name__}")
    return tuple(out), plates


def _reducer(torch_fn: Callable, doc: str) -> Callable:
    @_state.resets_on_error
    def fn(tensor: Tensor, dims: Dims) -> Tensor:
        if not isinstance(tensor, Tensor):
            if isinstance(tensor, torch.Tensor):
                return torch_fn(tensor, dims)
            raise TypeError(f"tensor must be a fastgrad.Tensor or torch.Tensor, got {type(tensor).__name__}")
        idx, plates = _dims(tensor, dims)
        keep = tuple(p for p in tensor.plates if p.name not in plates)
        return Tensor(torch_fn(tensor._tensor, idx), keep)

    fn.__name__ = fn.__qualname__ = torch_fn.__name__
    fn.__doc__ = doc
    return fn


mean = _reducer(torch.mean, "Unweighted mean over ``dims`` (event dims by int, plates by name); use "
                "reduce_plates for the plate-weighted mean.")
sum = _reducer(torch.sum, "Unweighted sum over ``dims`` (event dims by int, plates by name).")  # noqa: A001
logsumexp = _reducer(torch.logsumexp, "logsumexp over ``dims`` (event dims by int, plates by name).")


@_state.resets_on_error
def cat(tensors: Sequence[Union[Tensor, torch.Tensor]], dim: int = 0) -> Tensor:
    """``torch.cat`` of plate tensors along the event dimension ``dim`` (plates aligned and expanded)."""
    return torch.cat(tensors, dim)


@_state.resets_on_error
def gather(input: Tensor, dim: Union[str, int], index: Tensor) -> Tensor:
    """``torch.gather`` along ``dim`` (a plate name, or an event dim), plates aligned and expanded."""
    if isinstance(dim, str):
        if not isinstance(input, Tensor):
            raise TypeError("gather by plate name needs a fastgrad.Tensor input")
        dim = input.get_plate_dim_index(dim)
    return apply(torch.gather, (input, dim, index), {})


def grad(outputs: Sequence[Any], inputs: Sequence[Any], grad_outputs: Optional[Sequence[Any]] = None,
         retain_graph: Optional[bool] = None, create_graph: bool = False, only_inputs: bool = True,
         allow_unused: bool = False) -> Tuple[Tensor, ...]:
    """``torch.autograd.grad`` on plate tensors; each gradient carries its input's plates."""
    del only_inputs  # deprecated in torch, kept for Storchastic's signature

    def raw(x: Any) -> Any:
        return x._tensor if isinstance(x, Tensor) else x

    outs = [raw(o) for o in outputs]
    ins = [raw(i) for i in inputs]
    gos = None if grad_outputs is None else [raw(g) for g in grad_outputs]
    grads = torch.autograd.grad(outs, ins, grad_outputs=gos, retain_graph=retain_graph, create_graph=create_graph,
                                allow_unused=allow_unused)
    res = []
    for g, i in zip(grads, inputs):
        plates = i.plates if isinstance(i, Tensor) else ()
        name = (i.name or "input") + "_grad" if isinstance(i, Tensor) else "grad"
        res.append(None if g is None else Tensor(g, plates, name))
    return tuple(res)


def print_graph(costs: Optional[Sequence[Tensor]] = None) -> None:
    """Print the registered samples (method, plates, shape) and costs of the current step."""
    for s in _state.samples:
        s: StochasticTensor
        print(f"sample {s.name}: {type(s.method).__name__ if s.method else None} plates {list(s.plates)} "
              f"shape {tuple(s.shape)}")
    for c in (costs if costs is not None else _state.costs):
        print(f"cost {c.name}: plates {list(c.plates)}")
