"""Storchastic's ``storch.nn``: losses that reduce over event dimensions and, by name, over plates."""
from __future__ import annotations

from typing import List, Optional, Union

import torch
import torch.nn.functional as TF

from . import _api
from ._tensor import Tensor

__all__ = ["b_binary_cross_entropy"]


def b_binary_cross_entropy(input: Tensor, target: Tensor, dims: Union[None, str, List[str]] = None,
                           weight: Optional[torch.Tensor] = None, reduction: str = "mean") -> Tensor:
    """Binary cross entropy of plate tensors, ``reduction`` ("mean", "sum", "none") over the event dimensions
    and the plates named in ``dims`` (unweighted, as Storchastic's)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    dims = [] if not dims else ([dims] if isinstance(dims, str) else list(dims))
    target = target.expand_as(input) if isinstance(target, (Tensor, torch.Tensor)) else target
    unreduced = _api.deterministic(TF.binary_cross_entropy, expand_plates=True)(input, target, weight,
                                                                                reduction="none")
    if reduction == "none":
        return unreduced
    if not isinstance(unreduced, Tensor):
        unreduced = Tensor(unreduced, ())
    indices = list(unreduced.event_dim_indices) + dims
    if not indices:
        return unreduced
    return (_api.mean if reduction == "mean" else _api.sum)(unreduced, indices)
