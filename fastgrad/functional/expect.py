"""Exact expectations by enumerating every joint configuration (the oracle the estimators are tested against)."""
from __future__ import annotations

import numbers

import torch

from ..ops import enumerate_log_probs as _enum
from ._validate import check_budget, check_logits, check_real


def enumerate_configurations(k: int, K: int, budget: int = _enum.DEFAULT_BUDGET, device=None) -> torch.Tensor:
    """All ``K**k`` joint configurations of ``k`` categoricals with ``K`` choices: int64 ``[K**k, k]``,
    in ``itertools.product`` order (latent 0 varies slowest)."""
    for name, v in (("k", k), ("K", K)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    check_budget(k, K, budget)
    return _enum.digits(k, K, device)


def enumerate_log_probs(logits: torch.Tensor, budget: int = _enum.DEFAULT_BUDGET) -> torch.Tensor:
    """``log q(c)`` of every joint configuration: logits ``[B, k, K]`` -> ``[K**k, B]`` (differentiable)."""
    logits = check_logits(logits, min_dim=3, values=False)  # values: checked by the op
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape [B, k, K], got {tuple(logits.shape)}")
    check_budget(logits.shape[1], logits.shape[2], budget)
    return _enum.eager(logits.contiguous())


def expectation(logits: torch.Tensor, cost: torch.Tensor, budget: int = _enum.DEFAULT_BUDGET) -> torch.Tensor:
    """Exact ``E_q[f] = sum_c q(c) f(c)`` per batch element: logits ``[B, k, K]``, cost ``[K**k, B]`` -> ``[B]``.

    Differentiable w.r.t. ``logits`` (through q) and ``cost`` (through f)."""
    logq = enumerate_log_probs(logits, budget)
    cost = check_real(cost, "cost")
    if cost.shape != logq.shape:
        raise ValueError(f"cost must be a tensor of shape {tuple(logq.shape)} ([K**k, B]), got {tuple(cost.shape)}")
    return (logq.exp() * cost).sum(0)
