"""Plates: named independent dimensions (:class:`Plate`), the versions of a sampling sequence's plate
(:class:`AncestralPlate`), and the checks and unions of plate tuples that :mod:`fastgrad._tensor` builds on."""
from __future__ import annotations

import itertools
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import torch

from . import _state

_resets = _state.resets_on_error
# the plate-aware tensor class, registered by fastgrad._tensor (which imports this module): a plate's weight is one
TENSOR_TYPES: List[type] = []


class Plate:
    """An independent dimension: ``name``, size ``n`` and the ``weight`` of each of its elements.

    ``weight`` is ``None`` for uniform weighting (each element weighs ``1/n``), or a :class:`Tensor` whose plates
    include this plate (e.g. the probabilities of enumerated configurations for :class:`~fastgrad.method.Expect`).
    """

    __slots__ = ("name", "n", "_weight", "order")
    _counter = itertools.count()

    @_resets
    def __init__(self, name: str, n: int, *args: Any, weight: Any = None):
        # Storchastic's form ``Plate(name, n, parents, weight=None)`` and fastgrad's ``Plate(name, n, weight)``
        if len(args) > 2:
            raise TypeError(f"Plate takes (name, n, weight) or (name, n, parents, weight), got {2 + len(args)} "
                            "positional arguments")
        if args and isinstance(args[0], (list, tuple)):
            args = args[1:]  # Storchastic's parents: plates here carry no parent links
        if args:
            if weight is not None:
                raise TypeError("Plate got weight twice (positionally and by keyword)")
            weight = args[0]
        if weight is not None and not isinstance(weight, tuple(TENSOR_TYPES)):
            raise TypeError(f"weight must be None or a fastgrad.Tensor, got {type(weight).__name__}")
        if not isinstance(name, str) or not name:
            raise TypeError(f"plate_name must be a non-empty str, got {name!r}")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"plate size n must be a positive int, got {n!r}")
        self.name = name
        self.n = n
        self._weight = weight
        # creation order: among plates free to be reduced, newer ones first (fastgrad._graph._reduction_order)
        self.order = next(Plate._counter)

    @property
    def weight(self):
        """Per-element weight: a tensor, or ``torch.tensor(1/n)`` for uniform plates (as Storchastic)."""
        if self._weight is None:
            return torch.tensor(1.0 / self.n)
        return self._weight

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        return isinstance(other, Plate) and self.name == other.name and self.n == other.n and (
            self._weight is other._weight
        )

    def __hash__(self) -> int:
        return hash((self.name, self.n))

    def __repr__(self) -> str:
        return f"({self.name!r}, {self.n})"

    __str__ = __repr__


class AncestralPlate(Plate):
    """The plate of a set sampled without replacement over a *sequence* of draws (Storchastic's ``AncestralPlate``).

    When a set method (:class:`~fastgrad.method.ScoreFunctionWOR`, ...) samples again on its plate in the same step,
    its beam grows over the joint configuration of all its draws: the new plate (one more ``version`` of the same
    ``name``) holds ``n`` sequences, and ``selected`` (a :class:`Tensor` of int64 over ``(self, others...)``) says
    which element of the ``parent`` plate each one extends. A tensor on an older version meeting one on a newer
    version is re-indexed along the chain (:func:`reindex`): its values follow the sequences they belong to.
    ``lineage`` is shared by all versions; ``lineage.head`` is the newest, the one costs are estimated on."""

    __slots__ = ("parent", "selected", "lineage", "version")

    def __init__(self, name: str, n: int, parent: Optional["AncestralPlate"] = None):
        super().__init__(name, n)
        self.parent = parent
        self.selected: Any = None  # a fastgrad.Tensor over (self, others...)
        self.version = 0 if parent is None else parent.version + 1
        self.lineage = _Lineage() if parent is None else parent.lineage
        self.lineage.head = self

    def __eq__(self, other: object) -> bool:
        return self is other  # two versions of one name are different plates, even at equal sizes

    __hash__ = Plate.__hash__

    def __repr__(self) -> str:
        return f"({self.name!r}, {self.n}, version {self.version})"

    __str__ = __repr__


class _Lineage:
    __slots__ = ("head",)

    def __init__(self) -> None:
        self.head: Optional[AncestralPlate] = None


def check_plates(t: torch.Tensor, plates: Tuple[Plate, ...]) -> None:
    """Raise the fail-quick ValueError when ``t`` does not carry one dimension per plate."""
    nd = t.dim()
    if nd < len(plates):
        raise ValueError(
            "Got an input tensor with too few dimensions. We expected "
            f"{len(plates)} plate dimensions. Instead, we found only {nd} dimensions. "
            f"Violated at dimension {nd}"
        )
    shape = t.shape
    for i, p in enumerate(plates):
        s = shape[i]
        if s != p.n and s != 1:
            raise ValueError(
                "Storch Tensors should take into account their surrounding plates. Violated at dimension "
                f"{i} and plate {p.name} with size {p.n}. Instead, it was {s}. Batch links: {list(plates)} "
                f"Tensor shape: {tuple(shape)}"
            )


def union_plates(plate_lists: Iterable[Tuple[Plate, ...]]) -> Tuple[Plate, ...]:
    """Plates of several tensors, in order of first appearance; same name with another size is an error."""
    out: List[Plate] = []
    for plates in plate_lists:
        for p in plates:
            for q in out:
                if q is p:
                    break
                if q.name == p.name:
                    if isinstance(q, AncestralPlate) and isinstance(p, AncestralPlate):
                        if q.lineage is not p.lineage:
                            raise ValueError(f"plate_name {p.name!r} is used by two sampling sequences (two set "
                                             "methods, or the draws of an earlier step): give each its own plate name")
                        raise ValueError(f"plate {p.name!r}: versions {q.version} and {p.version} of a sampling "
                                         "sequence met unresolved (fastgrad._tensor.resolve_ancestral first)")
                    if q.n != p.n:
                        raise ValueError(
                            f"plate_name {p.name!r} is used with two sizes ({q.n} and {p.n}); "
                            "a plate name may only be reused with the same size"
                        )
                    break
            else:
                out.append(p)
    return tuple(out)


def _index_of(plates: Sequence[Plate], p: Plate) -> int:
    for i, q in enumerate(plates):
        if q is p or (q.name == p.name and q.n == p.n and not isinstance(q, AncestralPlate)
                      and not isinstance(p, AncestralPlate)):
            return i
    return -1
