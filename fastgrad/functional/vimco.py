"""VIMCO: the leave-one-out score function of the multi-sample importance-weighted bound."""
from __future__ import annotations

import math
import numbers

import torch

from ..ops import _checks


def vimco_surrogate(log_q: torch.Tensor, log_w: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """VIMCO (Mnih & Rezende 2016, "Variational inference for Monte Carlo objectives"): a surrogate of the
    K-sample importance-weighted bound ``L = log mean_k exp(log_w_k)`` whose value is ``L`` and whose gradient is
    VIMCO's unbiased estimate of ``grad E[L]``: ``sum_k (L - L_-k) grad log q(z_k) + grad L``, where ``L_-k`` is
    the bound with ``log_w_k`` replaced by the mean of the other ``log_w`` (the leave-one-out baseline of each
    sample; ``L - L_-k`` is treated as a constant). K >= 2 samples, 1 evaluation of ``log_w`` per sample.

    Args: ``log_q`` ``[..., K, ...]`` the samples' ``log q(z_k)`` (differentiable w.r.t. the variational
    parameters; the samples themselves are not reparameterized), ``log_w`` the same shape, ``log p(x, z_k) -
    log q(z_k)`` (differentiable w.r.t. the model and through ``log q``), ``dim`` the samples' dimension.
    Returns the bound per element of the other dims: maximise it (minimise its negative)."""
    for name, t in (("log_q", log_q), ("log_w", log_w)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating torch.Tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if log_q.shape != log_w.shape:
        raise ValueError(f"log_q and log_w must have the same shape, got {tuple(log_q.shape)} and "
                         f"{tuple(log_w.shape)}")
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or not -log_w.dim() <= dim < log_w.dim():
        raise ValueError(f"dim must index a dimension of log_w (shape {tuple(log_w.shape)}), got {dim}")
    K = log_w.shape[dim]
    if K < 2:
        raise ValueError(f"VIMCO needs at least 2 samples along dim {dim}, got {K}")
    _checks.finite(log_w, "log_w")
    lw = log_w.detach()
    bound = torch.logsumexp(log_w, dim) - math.log(K)
    # L_-k: log_w_k replaced by the mean of the others, for each k (K x K work per element: K is small)
    others_mean = (lw.sum(dim, keepdim=True) - lw) / (K - 1)
    lw_e, om_e = lw.movedim(dim, -1), others_mean.movedim(dim, -1)  # [..., K]
    eye = torch.eye(K, dtype=torch.bool, device=lw.device)
    replaced = torch.where(eye, om_e.unsqueeze(-1), lw_e.unsqueeze(-2))  # [..., k, j]: row k has log_w_k replaced
    loo = torch.logsumexp(replaced, -1) - math.log(K)  # [..., K]
    signal = (bound.detach().unsqueeze(-1) - loo).movedim(-1, dim)
    score = (signal * log_q).sum(dim)
    return bound + score - score.detach()
