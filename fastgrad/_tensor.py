"""Plates and plate-aware tensors: the Storchastic-compatible data model.

A :class:`Tensor` wraps a ``torch.Tensor`` whose leading dimensions are *plate* dimensions (independent
copies: data points, samples). Every plate owns exactly one dimension, in the order of ``plates``; a plate
dimension has either the plate's size ``n`` or size 1 (the value does not vary along that plate, e.g. an
enumerated latent that is the same for every data point). Torch functions reach :meth:`Tensor.__torch_function__`
through torch's own override protocol, so nothing in torch is patched.

The per-op cost is kept small: when all plate-aware arguments share one plate tuple (the common case), the
arguments are unwrapped and the result re-wrapped without any alignment work.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import _state
from ._plates import TENSOR_TYPES, AncestralPlate, Plate, _index_of, check_plates, union_plates

__all__ = ["Plate", "AncestralPlate", "Tensor", "StochasticTensor", "CostTensor", "IndependentTensor",
           "IllegalStorchExposeError", "is_tensor", "check_plates", "union_plates"]

_resets = _state.resets_on_error


class IllegalStorchExposeError(ValueError):
    """A value with plates was exposed to Python (``bool``, ``int``, ``float``, an index, ``item()``,
    ``numpy()``, ``in``, ``torch.equal``/``allclose``), where its plates would be silently lost.
    Storchastic's exception of the same name; a ValueError too. Reduce the plates first
    (:func:`fastgrad.reduce_plates`) or use ``._tensor`` explicitly."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def is_tensor(obj: Any) -> bool:
    """True for a ``torch.Tensor`` or a :class:`fastgrad.Tensor` (Storchastic's ``storch.is_tensor``)."""
    return isinstance(obj, (torch.Tensor, Tensor))


def _gather_step(t: "Tensor", step: AncestralPlate) -> "Tensor":
    """``t`` (on ``step.parent``) as seen by the sequences of ``step``: each element picks its parent's value."""
    # other sequences that continued in between: the tensor and the selection at their newest versions
    t, sel = resolve_ancestral([t, step.selected], skip=step.lineage)
    i = _index_of(t.plates, step.parent)
    extra = tuple(p for p in sel.plates[1:] if _index_of(t.plates, p) < 0)
    src = t.plates + extra
    dst = src[:i] + (step,) + src[i + 1:]
    ev = t.event_dims
    x = align(t, src, ev)
    if x.shape[i] == 1:  # t does not vary along the parent plate: nothing to pick
        return Tensor(x, dst)
    idx = align(sel, dst, 0)
    npl = len(dst)
    sizes = [max(a, b) for a, b in zip(x.shape[:npl], idx.shape[:npl])]
    x = x.expand(*sizes[:i], x.shape[i], *sizes[i + 1:], *x.shape[npl:])
    idx = idx.reshape(idx.shape + (1,) * ev).expand(*sizes[:i], step.n, *sizes[i + 1:], *x.shape[npl:])
    return Tensor(x.gather(i, idx), dst)


def reindex(t: "Tensor", new: AncestralPlate) -> "Tensor":
    """``t``, which carries an older version of ``new``'s plate, re-indexed to ``new`` (Storchastic's
    ``on_unwrap_tensor``): each of ``new``'s sequences takes the value of the prefix it extends."""
    old = next(p for p in t.plates if p.name == new.name)
    chain = []
    p: Optional[AncestralPlate] = new
    while p is not None and p is not old:
        chain.append(p)
        p = p.parent
    if p is None:
        raise ValueError(f"plate {new.name!r}: a tensor of another sampling sequence with the same plate name")
    for step in reversed(chain):
        t = _gather_step(t, step)
    return t


def resolve_ancestral(tensors: Sequence["Tensor"], skip: Any = None) -> List["Tensor"]:
    """The tensors with every ancestral plate at the newest version among them (older versions re-indexed), except
    the plates of the lineage ``skip``."""
    newest: Dict[int, AncestralPlate] = {}
    for t in tensors:
        for p in t.plates:
            if isinstance(p, AncestralPlate) and p.lineage is not skip:
                q = newest.get(id(p.lineage))
                if q is None or p.version > q.version:
                    newest[id(p.lineage)] = p
    if not newest:
        return list(tensors)
    out = []
    for t in tensors:
        for p in t.plates:
            if isinstance(p, AncestralPlate) and p.lineage is not skip and newest[id(p.lineage)] is not p:
                t = reindex(t, newest[id(p.lineage)])
        out.append(t)
    return out


def to_heads(t: "Tensor") -> "Tensor":
    """``t`` with each ancestral plate re-indexed to its lineage's newest version (what costs are estimated on)."""
    for p in t.plates:
        if isinstance(p, AncestralPlate) and p.lineage.head is not p:
            t = reindex(t, p.lineage.head)
    return t


def align(t: "Tensor", plates: Tuple[Plate, ...], event_dims: int) -> torch.Tensor:
    """View of ``t._tensor`` with one dimension per plate of ``plates`` (in that order), then ``event_dims``
    event dimensions (missing leading event dims inserted as size 1)."""
    x = t._tensor
    own = t.plates
    if own != plates:
        idx = [_index_of(own, p) for p in plates]
        present = [i for i in idx if i >= 0]
        if present != list(range(len(own))):
            x = x.permute(*present, *range(len(own), x.dim()))
        for pos, i in enumerate(idx):
            if i < 0:  # a plate t does not vary along
                x = x.unsqueeze(pos)
    for _ in range(event_dims - (x.dim() - len(plates))):
        x = x.unsqueeze(len(plates))
    return x


# Functions whose result legitimately drops plate dimensions: argument checks (torch.distributions'
# validation calls these), never costs. Their results are returned as plain tensors.
_CHECK_FUNCS = frozenset({"all", "any", "_is_all_true", "_is_any_true"})
# Functions that hand a plate tensor's values to Python (Storchastic refuses the same ones).
_EXPOSE_FUNCS = frozenset({"equal", "allclose", "is_nonzero", "item", "tolist", "numpy", "__index__"})
# Functions that need all plate dimensions expanded to equal sizes.
_EXPAND_FUNCS = frozenset(
    {"binary_cross_entropy", "binary_cross_entropy_with_logits", "mse_loss", "l1_loss", "smooth_l1_loss",
     "huber_loss", "kl_div", "cross_entropy", "nll_loss", "cat", "stack", "concat", "concatenate", "gather"}
)


def _wrap_out(out: Any, plates: Tuple[Plate, ...]) -> Any:
    if isinstance(out, torch.Tensor):
        check_plates(out, plates)
        return Tensor(out, plates)
    if isinstance(out, (tuple, list)) and out and any(isinstance(o, torch.Tensor) for o in out):
        items = [_wrap_out(o, plates) for o in out]
        if isinstance(out, list):
            return items
        try:
            return type(out)(items)  # structseq return types (max, sort, ...)
        except TypeError:
            return tuple(items)
    return out


_PLAIN, _CHECK, _INPLACE, _EXPAND, _EXPOSE = 0, 1, 2, 3, 4
_KINDS: Dict[Any, int] = {}


def _kind(func: Callable) -> int:
    """What ``func`` needs from :func:`apply` (cached per function object)."""
    k = _KINDS.get(func)
    if k is None:
        name = getattr(func, "__name__", "")
        if name in _CHECK_FUNCS:
            k = _CHECK
        elif name in _EXPOSE_FUNCS:
            k = _EXPOSE
        elif name == "__setitem__" or (name.endswith("_") and not name.startswith("__")):
            k = _INPLACE
        elif name in _EXPAND_FUNCS:
            k = _EXPAND
        else:
            k = _PLAIN
        try:
            _KINDS[func] = k
        except TypeError:  # unhashable callables are simply not cached
            pass
    return k


def _new(cls: type, t: torch.Tensor, plates: Tuple[Plate, ...]) -> "Tensor":
    obj = object.__new__(cls)
    obj._tensor = t
    obj.plates = plates
    obj.name = None
    return obj


def _holds_tensor(v: Any) -> bool:
    return isinstance(v, Tensor) or (isinstance(v, (list, tuple)) and any(isinstance(x, Tensor) for x in v))


def apply(func: Callable, args: tuple, kwargs: Dict[str, Any]) -> Any:
    """Run a torch function on plate-aware arguments and wrap the result (the one dispatch routine).

    Any exception resets the step (as :func:`fastgrad._state.resets_on_error`; written inline because this is
    the hot path: a try block costs nothing in CPython 3.11 until it raises, a wrapper call would)."""
    try:
        kind = _kind(func)
        if kind == _EXPOSE:
            _refuse_expose(getattr(func, "__name__", "this function"), args, kwargs)
        # Fast path (the common case, a few microseconds): plate-aware tensors only among the positional arguments,
        # all sharing one plate tuple and one rank, none inside lists, no expansion needed.
        if not kwargs or not any(_holds_tensor(v) for v in kwargs.values()):
            plates = None
            nd = -1
            count = 0
            raw_args = []
            for a in args:
                if isinstance(a, Tensor):
                    t = a._tensor
                    if plates is None:
                        plates, nd = a.plates, t.dim()
                    elif (a.plates is not plates and a.plates != plates) or t.dim() != nd:
                        break
                    count += 1
                    raw_args.append(t)
                elif _holds_tensor(a):  # a list holding plate tensors: the aligning path
                    break
                else:
                    raw_args.append(a)
            else:
                if plates is not None and not (kind == _EXPAND and count > 1):
                    out = func(*raw_args, **kwargs)
                    if kind == _CHECK:
                        return out
                    if kind == _INPLACE and out is raw_args[0]:
                        return args[0]
                    if type(out) is torch.Tensor:
                        check_plates(out, plates)
                        return _new(Tensor, out, plates)
                    return _wrap_out(out, plates)
        return _apply_general(func, args, kwargs, kind)
    except AttributeError:
        raise
    except BaseException:
        _state.reset()
        raise


def _refuse_expose(name: str, args: tuple, kwargs: Dict[str, Any]) -> None:
    for a in itertools.chain(args, kwargs.values()):
        held = a if isinstance(a, (list, tuple)) else (a,)
        if any(isinstance(x, Tensor) and x.plates for x in held):
            raise IllegalStorchExposeError(
                f"Calling method {name} with storch tensors is not allowed: it exposes the values of a tensor "
                "with plates to Python. Reduce its plates first (fastgrad.reduce_plates) or use ._tensor.")


def _apply_general(func: Callable, args: tuple, kwargs: Dict[str, Any], kind: int) -> Any:
    found: List[Tensor] = []
    for a in itertools.chain(args, kwargs.values()):
        if isinstance(a, Tensor):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found.extend(x for x in a if isinstance(x, Tensor))
    resolved = resolve_ancestral(found)  # tensors on older versions of a sampling sequence follow its sequences
    plates = union_plates(t.plates for t in resolved)
    ev = max(t._tensor.dim() - len(t.plates) for t in resolved)
    aligned = {id(t): align(r, plates, ev) for t, r in zip(found, resolved)}
    if kind == _EXPAND and len(aligned) > 1:
        # functions such as binary_cross_entropy want equal shapes: expand plate dims (views, no copies)
        npl = len(plates)
        sizes = [max(a.shape[i] for a in aligned.values()) for i in range(npl)]
        aligned = {k: a.expand(*sizes, *a.shape[npl:]) for k, a in aligned.items()}

    def unwrap(a: Any) -> Any:
        if isinstance(a, Tensor):
            return aligned[id(a)]
        if _holds_tensor(a):
            return type(a)(aligned[id(x)] if isinstance(x, Tensor) else x for x in a)
        return a

    raw_args = tuple(unwrap(a) for a in args)
    raw_kwargs = {k: unwrap(v) for k, v in kwargs.items()}
    out = func(*raw_args, **raw_kwargs)
    if kind == _CHECK:
        return out
    if kind == _INPLACE and out is raw_args[0]:
        # in-place: the first argument was modified through its raw view
        return args[0] if isinstance(args[0], Tensor) else found[0]
    return _wrap_out(out, plates)


def _method(name: str) -> Callable:
    torch_fn = getattr(torch.Tensor, name)

    def op(self, *args, **kwargs):
        return apply(torch_fn, (self,) + args, kwargs)

    op.__name__ = name
    return op


class Tensor:
    """A ``torch.Tensor`` with plates. ``._tensor`` is the torch value; its first ``len(plates)`` dims are plates.

    Behaves like a ``torch.Tensor`` under torch functions, methods and operators. Removing a plate dimension
    (e.g. ``.sum()`` without ``dim``) raises a ValueError: reduce plates with :func:`fastgrad.reduce_plates`.
    """

    __slots__ = ("_tensor", "plates", "name", "__weakref__")
    _kind = "Deterministic"

    @_resets
    def __init__(self, tensor: torch.Tensor, *args: Any, name: Optional[str] = None):
        # fastgrad's ``Tensor(tensor, plates=(), name=None)`` and Storchastic's ``Tensor(tensor, parents, plates,
        # name=None)`` (parents: the tensors it was computed from; plates carry no parent links here)
        if isinstance(tensor, Tensor):
            raise TypeError("storch.Tensors should be constructed with torch.Tensors, not other storch.Tensors.")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
        plates: Sequence[Plate] = ()
        if len(args) >= 2 and not isinstance(args[1], (str, type(None))):  # (tensor, parents, plates[, name])
            if len(args) > 3:
                raise TypeError(f"Tensor takes at most 4 positional arguments, got {1 + len(args)}")
            plates = args[1]
            args = args[2:]
        elif args:
            plates, args = args[0], args[1:]
        if len(args) > 1:
            raise TypeError(f"Tensor takes (tensor, plates, name) or (tensor, parents, plates, name), got "
                            f"{2 + len(args)} positional arguments")
        if args:
            if name is not None:
                raise TypeError("Tensor got name twice (positionally and by keyword)")
            name = args[0]
        if not isinstance(plates, (list, tuple)) or not all(isinstance(p, Plate) for p in plates):
            raise TypeError(f"plates must be a list or tuple of Plates, got {plates!r}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be None or a str, got {type(name).__name__}")
        plates = tuple(plates)
        if len({p.name for p in plates}) != len(plates):
            raise ValueError(f"plates must have distinct names, got {list(plates)}")
        check_plates(tensor, plates)
        self._tensor = tensor
        self.plates = plates
        self.name = name

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return apply(func, args, kwargs or {})

    # -- torch.Tensor-like attributes -------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return self._tensor.shape

    @property
    def dtype(self) -> torch.dtype:
        return self._tensor.dtype

    @property
    def device(self) -> torch.device:
        return self._tensor.device

    @property
    def ndim(self) -> int:
        return self._tensor.dim()

    @property
    def requires_grad(self) -> bool:
        return self._tensor.requires_grad

    @property
    def is_cuda(self) -> bool:
        return self._tensor.is_cuda

    @property
    def plate_dims(self) -> int:
        return len(self.plates)

    @property
    def event_shape(self) -> torch.Size:
        return self._tensor.shape[len(self.plates):]

    @property
    def event_dims(self) -> int:
        return self._tensor.dim() - len(self.plates)

    @property
    def event_dim_indices(self) -> List[int]:
        return list(range(len(self.plates), self._tensor.dim()))

    @property
    def is_cost(self) -> bool:
        return False

    @property
    def stochastic(self) -> bool:
        return False

    def size(self, *args):
        return self._tensor.size(*args)

    def dim(self) -> int:
        return self._tensor.dim()

    ndimension = dim

    def numel(self) -> int:
        return self._tensor.numel()

    @_resets
    def get_plate(self, plate_name: str) -> Plate:
        for p in self.plates:
            if p.name == plate_name:
                return p
        raise ValueError(f"plate {plate_name!r} is not among this tensor's plates {list(self.plates)}")

    @_resets
    def get_plate_dim_index(self, plate_name: str) -> int:
        for i, p in enumerate(self.plates):
            if p.name == plate_name:
                return i
        raise ValueError(f"plate {plate_name!r} is not among this tensor's plates {list(self.plates)}")

    def detach(self) -> "Tensor":
        return Tensor(self._tensor.detach(), self.plates, self.name)

    def __getattr__(self, item: str) -> Any:
        attr = getattr(torch.Tensor, item)  # AttributeError for unknown names, as torch
        if callable(attr):
            # install the wrapper on the class once: later lookups are plain method lookups
            fn = _method(item)
            setattr(Tensor, item, fn)
            return fn.__get__(self)
        if hasattr(attr, "__get__"):  # properties such as .T, .mT
            return apply(attr.__get__, (self,), {})
        return attr

    # -- Python protocol ------------------------------------------------------------------------------------
    def _expose(self, what: str) -> torch.Tensor:
        if self.plates:
            raise IllegalStorchExposeError(
                f"It is not allowed to convert storch tensors to {what}: a tensor with plates "
                f"{list(self.plates)} would lose them. Reduce its plates first with fastgrad.reduce_plates, or "
                f"unwrap it explicitly (._tensor) to use it as a {what}.")
        return self._tensor

    @_resets
    def __bool__(self) -> bool:
        # always, plates or not (as Storchastic): Python control flow on a tensor's value would hide the branch's
        # dependence on it from the graph
        raise IllegalStorchExposeError(
            "It is not allowed to convert storch tensors to boolean: Python control flow on a tensor's value hides "
            "that dependence from the graph. Unwrap it explicitly (._tensor) to use it as a boolean.")

    @_resets
    def __float__(self) -> float:
        return float(self._expose("float"))

    @_resets
    def __int__(self) -> int:
        return int(self._expose("int"))

    @_resets
    def __index__(self) -> int:
        if self.plates:
            raise IllegalStorchExposeError("Cannot use storch tensors as index.")
        return self._tensor.__index__()

    @_resets
    def item(self) -> Any:
        return self._expose("Python number").item()

    @_resets
    def tolist(self) -> Any:
        return self._expose("list").tolist()

    @_resets
    def numpy(self) -> Any:
        return self._expose("np.array").numpy()

    @_resets
    def __contains__(self, item: Any) -> bool:
        return item in self._expose("membership test (in)")

    def __len__(self) -> int:
        return len(self._tensor)

    def __hash__(self) -> int:
        return object.__hash__(self)

    @_resets
    def __iter__(self):
        raise TypeError("cannot iterate over a fastgrad.Tensor; index it or use its ._tensor explicitly")

    def __str__(self) -> str:
        prefix = f"{self.name}: " if self.name and self._kind != "Deterministic" else ""
        return f"{prefix}{self._kind} {str(self._tensor)} Batch links: {list(self.plates)}"

    def __repr__(self) -> str:
        return f"fastgrad.{type(self).__name__}({self._tensor!r}, plates={list(self.plates)})"

    def __format__(self, spec: str) -> str:
        return str(self) if not spec else format(self._tensor, spec)


TENSOR_TYPES.append(Tensor)

_OPERATORS = (
    "__add__ __radd__ __sub__ __rsub__ __mul__ __rmul__ __matmul__ __rmatmul__ __pow__ __rpow__ "
    "__truediv__ __rtruediv__ __floordiv__ __rfloordiv__ __mod__ __rmod__ __neg__ __pos__ __abs__ "
    "__invert__ __and__ __rand__ __or__ __ror__ __xor__ __rxor__ __lt__ __le__ __gt__ __ge__ __eq__ __ne__ "
    "__getitem__ __setitem__ __iadd__ __isub__ __imul__ __itruediv__"
).split()
for _name in _OPERATORS:
    if hasattr(torch.Tensor, _name):
        setattr(Tensor, _name, _method(_name))
del _name


class IndependentTensor(Tensor):
    """Result of :func:`fastgrad.denote_independent` and :func:`fastgrad.gather_samples`."""

    __slots__ = ()


class CostTensor(Tensor):
    """A registered cost node (:func:`fastgrad.add_cost`)."""

    __slots__ = ()
    _kind = "Cost"

    @property
    def is_cost(self) -> bool:
        return True


class StochasticTensor(Tensor):
    """A sample drawn by a :class:`fastgrad.method.Method`; its first plate is the sample plate (a set method's
    later draws in a sequence put it after the plates they are batched over, as Storchastic does; :attr:`plate`).

    ``param_grads[name]`` holds, after :func:`fastgrad.backward`, the estimated gradient of the total cost
    with respect to the distribution parameter ``name`` (e.g. ``"probs"``), as a :class:`Tensor`.
    """

    __slots__ = ("distribution", "method", "n", "param_grads", "draw", "params", "draw_plates")
    _kind = "Stochastic"

    def __init__(self, tensor: torch.Tensor, plates: Sequence[Plate], name: str, n: int, distribution, method,
                 draw: Any = None, params: Any = None, draw_plates: Optional[Sequence[Plate]] = None):
        super().__init__(tensor, plates, name)
        # the layout of the method's Draw: the sample's own plate first (``plates`` may order them otherwise)
        self.draw_plates = self.plates if draw_plates is None else tuple(draw_plates)
        self.distribution = distribution
        self.method = method
        self.n = n
        self.param_grads: Dict[str, Tensor] = {}
        self.draw = draw  # the method's Draw (fastgrad.method.Draw): what its surrogate needs
        self.params = params  # the distribution's parameters as plain tensors (fastgrad.method._base.Params)

    @property
    def stochastic(self) -> bool:
        return True

    @property
    def grad(self) -> Dict[str, Tensor]:
        """Alias of :attr:`param_grads`."""
        return self.param_grads

    @property
    def plate(self) -> Plate:
        """The sample's own plate."""
        return self.draw_plates[0]
