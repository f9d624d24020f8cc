"""Argument checks shared by the estimator families (a leaf: it imports only :mod:`fastgrad.ops`).

Validate once, at the boundary: each public function of :mod:`fastgrad.functional` checks its arguments with
these and hands contiguous tensors to the ops, which check the values they read themselves."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import torch

from ..ops import _checks


FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
Baseline = Union[None, str, torch.Tensor]


def check_n(n: object, name: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    return int(n)


def check_logits(logits: object, name: str = "logits", min_dim: int = 1, values: bool = True) -> torch.Tensor:
    """Type, dtype and shape checks; with ``values``, also the finiteness of every row (one pass over the data).

    The ops check the values they read themselves (:mod:`fastgrad.ops._checks`, the same on every backend), so
    only the samplers ask for ``values`` here: they must raise before a seed is drawn, so that a call that
    raises leaves the generator untouched."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOATS:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32, float64), got {logits.dtype}")
    if logits.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s) [..., K], got shape {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one category (K >= 1), got shape {tuple(logits.shape)}")
    if values:
        _checks.logits_rows(logits, name)
    return logits


def check_real(t: object, name: str) -> torch.Tensor:
    """A real (not complex) tensor whose values are finite (a NaN cost would turn every gradient into NaN)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_complex():
        raise TypeError(f"{name} must be a real tensor, got {t.dtype}")
    _checks.finite(t, name)
    return t


def expand_to(t: torch.Tensor, shape: Tuple[int, ...], name: str, what: str) -> torch.Tensor:
    try:
        return t.expand(shape)
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to {what} {tuple(shape)}") from None


def is_compiling() -> bool:
    return torch.compiler.is_compiling()


def logits_from(logits: Optional[torch.Tensor], probs: Optional[torch.Tensor]) -> torch.Tensor:
    if (logits is None) == (probs is None):
        raise ValueError("pass exactly one of logits or probs")
    if probs is not None:
        if not isinstance(probs, torch.Tensor):
            raise TypeError(f"probs must be a torch.Tensor, got {type(probs).__name__}")
        if probs.dtype not in FLOATS:
            raise TypeError(f"probs must be a floating tensor, got {probs.dtype}")
        _checks.finite(probs, "probs")
        if probs.numel() and probs.device.type != "meta" and not is_compiling() and bool((probs < 0).any()):
            raise ValueError("probs must be non-negative")
        return torch.log(probs)
    return logits


def check_finite_float(v: object, name: str) -> float:
    """A finite real number (a Python or numpy scalar, or a one-element real tensor), as a float."""
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_complex() and v.dtype != torch.bool:
        v = float(v)
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        raise ValueError(f"{name} must be a finite float, got {v!r}")
    return float(v)


def check_tau(tau: object, dtype: torch.dtype) -> Union[float, torch.Tensor]:
    """A positive float; or a one-element tensor (returned as a 0-dim tensor when it requires grad: a learned
    temperature, as RELAX trains)."""
    if isinstance(tau, torch.Tensor):
        if tau.numel() != 1 or tau.is_complex() or not tau.is_floating_point():
            raise TypeError(f"tau must be a positive float or a one-element floating tensor, got a {tau.dtype} "
                            f"tensor of shape {tuple(tau.shape)}")
        if tau.requires_grad:
            _checks.temperature(float(tau.detach()), dtype)
            return tau.reshape(())
        tau = float(tau)
    if isinstance(tau, numbers.Real) and not isinstance(tau, bool):
        tau = float(tau)
    return _checks.temperature(tau, dtype)


def flat_rows(logits: torch.Tensor) -> torch.Tensor:
    return logits.reshape(-1, logits.shape[-1]).contiguous()


def check_samples(samples: object, logits: torch.Tensor) -> torch.Tensor:
    if not isinstance(samples, torch.Tensor) or samples.dtype != torch.int64:
        raise TypeError(f"samples must be an int64 tensor of category indices, got "
                        f"{getattr(samples, 'dtype', type(samples).__name__)}")
    if samples.dim() == 0 or tuple(samples.shape[1:]) != tuple(logits.shape[:-1]):
        raise ValueError(f"samples must have shape [n, {', '.join(map(str, logits.shape[:-1]))}] to match "
                         f"logits {tuple(logits.shape)}, got {tuple(samples.shape)}")
    return samples


def check_budget(k: int, K: int, budget: int) -> int:
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget < 1:
        raise ValueError(f"budget must be a positive int, got {budget!r}")
    size = K**k
    if size > budget:
        raise ValueError(f"enumerating {K}**{k} = {size} configurations exceeds the budget of {budget}; "
                         "raise budget= or use a sampling estimator")
    return size


def check_bernoulli_logits(logits: object) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.dtype not in FLOATS:
        raise TypeError(f"logits must be a floating torch.Tensor (Bernoulli logits), got "
                        f"{getattr(logits, 'dtype', type(logits).__name__)}")
    _checks.finite(logits, "logits")
    return logits


def pair_costs(cost: torch.Tensor, n: int, ndim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    cost = check_real(cost, "cost")
    if cost.dim() < 1 or cost.shape[0] != 2 * n:
        raise ValueError(f"cost must have a leading dimension of 2n = {2 * n} (each sample, then its antithetic "
                         f"partner), got shape {tuple(cost.shape)}")
    if cost.dim() > ndim:
        raise ValueError(f"cost has more dimensions than the samples ({cost.dim()} > {ndim})")
    c = cost.detach().reshape(tuple(cost.shape) + (1,) * (ndim - cost.dim()))  # per-sample cost over latents
    if c.dtype in (torch.float16, torch.bfloat16):
        # the estimators form f1 - f2: in half precision a difference of two finite costs can overflow (65504)
        c = c.float()
    return c[:n], c[n:]


def check_samples_and_cost(logits: object, b: object, cost: object, min_b_dim: int = 1
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The inputs of the multi-sample binary estimators: Bernoulli ``logits`` ``[...]``, samples ``b``
    ``[n >= 2, ...]`` and a real ``cost`` ``[n, *batch]`` (broadcast over ``b``'s trailing latent dims)."""
    logits = check_bernoulli_logits(logits)
    if not isinstance(b, torch.Tensor) or b.dim() < min_b_dim or b.shape[0] < 2 \
            or tuple(b.shape[1:]) != tuple(logits.shape):
        raise ValueError(f"b must have shape [n >= 2, {', '.join(map(str, logits.shape))}], got "
                         f"{tuple(getattr(b, 'shape', ()))}")
    return logits, check_sample_costs(cost, b)


def check_sample_costs(cost: object, samples: torch.Tensor) -> torch.Tensor:
    """A real ``cost`` ``[n, *batch]`` of the ``n`` samples ``[n, ...]`` (broadcast over their trailing dims)."""
    n = samples.shape[0]
    cost = check_real(cost, "cost")
    if cost.dim() < 1 or cost.shape[0] != n or cost.dim() > samples.dim():
        raise ValueError(f"cost must have shape [n = {n}, *batch], got {tuple(cost.shape)}")
    return cost


def check_cost_grad(cost_grad: object, b: torch.Tensor) -> torch.Tensor:
    cost_grad = check_real(cost_grad, "cost_grad")
    if tuple(cost_grad.shape) != tuple(b.shape):
        raise ValueError(f"cost_grad must have the shape of b {tuple(b.shape)}, got {tuple(cost_grad.shape)}")
    return cost_grad


ORDERS = ("ascending", "descending", None)


def check_order(order: object) -> Optional[str]:
    if order not in ORDERS:
        raise ValueError(f"order must be one of 'ascending', 'descending' or None (the classes' own order), "
                         f"got {order!r}")
    return order


def check_alpha(alpha: object) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise TypeError(f"alpha must be a finite float, got {alpha!r}")
    if alpha <= 1:
        raise ValueError(f"alpha must be > 1 (alpha = 1 is softmax; use gumbel_softmax), got {alpha}")
    return float(alpha)
