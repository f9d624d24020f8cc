"""The ops' input contract, checked the same way on every backend before any kernel runs.

Users call ``torch.ops.fastgrad.*`` directly, and under ``torch.compile`` nothing else runs, so each op checks
what it relies on: ranks, shapes, dtypes, contiguity and scalar ranges (free: no pass over the data), and the
values it reads (NaN/inf rows, indices in range: one reduction each). A backend whose kernel validates the values
it reads itself (the C++ CPU kernels listed in each op's ``KERNEL_CHECKS_VALUES``) skips the Python pass. Every
failure is a ValueError or TypeError naming the argument; the messages are the functional layer's.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
WEIGHT_FLOATS = (torch.float32, torch.float64)
ROWS_MESSAGE = ("must not contain NaN or +inf, and each row needs a finite entry "
                "(-inf marks a zero-probability category)")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of every op: float64 for float64 inputs, else float32 (the one spelling)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tensor(t: object, name: str, dim: int, dtypes: Sequence[torch.dtype] = FLOATS) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in ({', '.join(str(d).replace('torch.', '') for d in dtypes)}), "
                        f"got {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be a {dim}-D tensor, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous()), got strides {t.stride()}")
    return t


def shape(t: torch.Tensor, name: str, expected: Sequence[int], what: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {what} = {tuple(expected)}, got {tuple(t.shape)}")


def same_device(name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str = "the logits'") -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name} device {ref.device}, got {t.device}")


def count(n: object, name: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    return n


def categories(K: int, name: str = "logits") -> None:
    if K < 1:
        raise ValueError(f"{name} must have at least one category (K >= 1), got K = {K}")


def seed_offset(seed: object, offset: object) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < 2**62:
        raise ValueError(f"offset must be a non-negative int below 2**62, got {offset!r}")


def temperature(tau: object, dtype: torch.dtype) -> float:
    """tau > 0, finite, and 1/tau finite in the accumulation dtype (the kernels multiply by 1/tau)."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"tau must be a positive float, got {type(tau).__name__}")
    tau = float(tau)
    if not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau must be a positive finite float, got {tau}")
    big = torch.finfo(acc_dtype(dtype)).max
    if 1.0 / tau > big:
        raise ValueError(f"tau must be at least {1.0 / big:.3g} for {dtype} logits (1/tau overflows "
                         f"{acc_dtype(dtype)}), got {tau}")
    return tau


def _skip_values(t: torch.Tensor) -> bool:
    return t.numel() == 0 or t.device.type == "meta" or torch.compiler.is_compiling()


def _has_nonfinite(t: torch.Tensor) -> bool:
    # x * 0 is 0 for finite x and NaN for NaN/inf: one small reduction instead of isfinite's three kernels
    return not _skip_values(t) and float(t.detach().mul(0).sum()) != 0


def rows(row_stat: torch.Tensor, name: str = "logits") -> None:
    """``row_stat`` (row max or logsumexp) is finite exactly when its row has no NaN/+inf and a finite entry."""
    if _has_nonfinite(row_stat):
        raise ValueError(f"{name} {ROWS_MESSAGE}")


def logits_rows(logits: torch.Tensor, name: str = "logits") -> None:
    if not _skip_values(logits):
        rows(logits.detach().amax(-1), name)


def finite(t: torch.Tensor, name: str) -> None:
    if _has_nonfinite(t):
        raise ValueError(f"{name} must be finite (no NaN or inf)")


def indices(index: torch.Tensor, K: int, name: str = "samples") -> None:
    if _skip_values(index):
        return
    lo, hi = torch.aminmax(index)
    if int(lo) < 0 or int(hi) >= K:
        raise ValueError(f"{name} must lie in [0, {K})")
