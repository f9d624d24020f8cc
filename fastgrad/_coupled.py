"""Coupled (antithetic) estimators for categorical variables: DisARM through stick breaking.

Dong, Mnih & Tucker, NeurIPS 2021, "Coupled Gradient Estimators for Discrete Latent Variables". A categorical of
``K`` classes is written as ``K - 1`` binary decisions taken in turn on the classes in a fixed order: at stage ``i``
the class ``i`` is chosen with probability ``sigmoid(phi_i) = p_i / sum_{j >= i} p_j`` (stick breaking), so the
stage logits are ``phi_i = theta_i - logsumexp_{j > i} theta_j``. Two samples are coupled by one uniform per stage,
``u`` and ``1 - u`` (DisARM's antithetic pair), and the estimator is DisARM on the stage decisions. The math lives
here once; :mod:`fastgrad.functional` re-exports it and :class:`fastgrad.method.DisARM` calls it.

Conventions: ``logits`` ``[..., K]`` (any batch shape; every row one categorical), ``n`` antithetic pairs;
samples ``[2n, ...]`` int64 labels (the ``n`` first samples, then their partners); noise ``u`` ``[n, ..., K - 1]``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import functional as _F
from .ops import _checks

ORDERS = ("ascending", "descending", None)


def _check_order(order: object) -> Optional[str]:
    if order not in ORDERS:
        raise ValueError(f"order must be one of 'ascending', 'descending' or None (the classes' own order), "
                         f"got {order!r}")
    return order


def stick_breaking_logits(logits: torch.Tensor, order: Optional[str] = "ascending"
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The stage logits of the stick-breaking construction of ``Categorical(logits=logits)``.

    The classes are first put in ``order`` of their logits (``"ascending"``, Dong et al.'s choice, keeps every stage
    probability at or below 1/2, which the importance-weighted estimator needs; ``None`` keeps the classes' order).
    Returns ``(phi [..., K - 1], perm [..., K])``: ``phi_i = l_i - logsumexp_{j > i} l_j`` with ``l`` the sorted
    logits (differentiable w.r.t. ``logits``; ``-inf`` for a class of probability 0), and ``perm[..., i]`` the class
    at position ``i``. Computed in the accumulation dtype (float32 for 16-bit logits)."""
    order = _check_order(order)
    logits = _F._check_logits(logits, values=False)
    t = logits.to(_checks.acc_dtype(logits.dtype))
    K = t.shape[-1]
    if order is None:
        perm = torch.arange(K, device=t.device).expand(t.shape)
    else:
        perm = torch.argsort(t.detach(), dim=-1, descending=order == "descending", stable=True)
    # a class of probability 0 becomes a very negative finite logit: its stage probability underflows to 0 exactly
    # and no gradient of logsumexp over an all-impossible tail becomes 0 * inf
    sl = torch.gather(t, -1, perm).clamp_min(torch.finfo(t.dtype).min / 4)
    tail = torch.logcumsumexp(sl.flip(-1), -1).flip(-1)   # tail[i] = logsumexp(l[i:])
    phi = sl[..., :-1] - tail[..., 1:]
    impossible = torch.gather(torch.isneginf(t), -1, perm)[..., :-1]
    return phi.masked_fill(impossible, float("-inf")), perm


def _stages(phi: torch.Tensor, u: torch.Tensor):
    """The stage decisions of both chains and where each stops: ``b1 = 1[u > sigmoid(-phi)]``,
    ``b2 = 1[u < sigmoid(phi)]`` (each marginally ``Bernoulli(sigmoid(phi))``, as in :func:`arm_sample`), and the
    sorted positions ``s1``, ``s2`` ``[n, ...]`` of the first stage that says yes (``K - 1`` if none does)."""
    p = phi.detach()
    uu = u.to(p.dtype)
    b1 = uu > torch.sigmoid(-p)
    b2 = uu < torch.sigmoid(p)
    yes = torch.ones(b1.shape[:-1] + (1,), dtype=torch.bool, device=b1.device)
    s1 = torch.cat([b1, yes], -1).to(torch.uint8).argmax(-1)   # the first maximum: the first "yes"
    s2 = torch.cat([b2, yes], -1).to(torch.uint8).argmax(-1)
    return b1, b2, s1, s2


def _check_u(u: object, logits: torch.Tensor) -> torch.Tensor:
    want = tuple(logits.shape[:-1]) + (logits.shape[-1] - 1,)
    if not isinstance(u, torch.Tensor) or u.dim() < 1 or tuple(u.shape[1:]) != want:
        raise ValueError(f"u must have shape [n, {', '.join(map(str, want))}] (one uniform per pair and stage), got "
                         f"{tuple(getattr(u, 'shape', ()))}")
    return u


def categorical_disarm_sample(logits: torch.Tensor, n: int = 1, *, order: Optional[str] = "ascending",
                              generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
                              offset: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` antithetic pairs of ``Categorical(logits=logits)`` samples by stick breaking (Dong et al. 2021).

    One uniform per pair, row and stage from fastgrad's Philox stream (:func:`fastgrad.functional.uniform`); each
    sample is marginally exact. ``logits`` ``[..., K]`` -> ``(samples [2n, ...] int64, u [n, ..., K - 1] float32)``;
    pass ``u`` (and the same ``logits`` and ``order``) to :func:`categorical_disarm_surrogate`."""
    logits = _F._check_logits(logits)
    n = _F._check_n(n)
    phi, perm = stick_breaking_logits(logits.detach(), order)
    u = _F.uniform((n,) + tuple(phi.shape), generator=generator, seed=seed, offset=offset, device=logits.device)
    _, _, s1, s2 = _stages(phi, u)
    perm = perm.expand((n,) + tuple(perm.shape))
    z1 = torch.gather(perm, -1, s1.unsqueeze(-1)).squeeze(-1)
    z2 = torch.gather(perm, -1, s2.unsqueeze(-1)).squeeze(-1)
    return torch.cat([z1, z2], 0), u


def categorical_disarm_surrogate(logits: torch.Tensor, u: torch.Tensor, cost: torch.Tensor, *,
                                 order: Optional[str] = "ascending",
                                 importance_weighting: bool = False) -> torch.Tensor:
    """DisARM for categorical variables (Dong, Mnih & Tucker 2021): the per-pair surrogate whose gradient w.r.t.
    ``logits`` is the coupled estimator. Unbiased; 2 cost evaluations per pair.

    Stick breaking (default): DisARM on every stage both samples reach,
    ``1/2 (f1 - f2) 1[b1 != b2] (-1)^b2 sigmoid(|phi_i|)``; at a stage only one sample reaches, that sample's
    score function with the other's cost as baseline, ``1/2 (f_j - f_other) (b_j - sigmoid(phi_i))``; nothing past
    both stops. With ``importance_weighting``: ``1/2 w (f1 - f2) (grad log q(z1) - grad log q(z2))`` with
    ``w = q(z1) q(z2) / p(z1, z2)`` the weight from the coupled pair to an independent one (the paper's DisARM-IW);
    it needs ``order="ascending"`` (every coupled pair then has the independent pair's support).

    Args: ``logits`` ``[..., K]``, ``u`` ``[n, ..., K - 1]`` from :func:`categorical_disarm_sample` (same ``order``),
    ``cost`` ``[2n, *batch]`` of the samples (broadcast over trailing latent dims). Returns ``[n, ...]``: average
    over the pairs and sum over the latents for the loss."""
    order = _check_order(order)
    if importance_weighting and order != "ascending":
        raise ValueError("importance_weighting needs order='ascending': in another order a coupled pair can miss "
                         "pairs of the independent one, and the weighted estimator is biased")
    logits = _F._check_logits(logits, values=False)
    u = _check_u(u, logits)
    n = u.shape[0]
    f1, f2 = _F._pair_costs(cost, n, u.dim() - 1)
    phi, perm = stick_breaking_logits(logits, order)
    b1, b2, s1, s2 = _stages(phi, u)
    acc = phi.dtype
    if phi.shape[-1] == 0:  # K = 1: nothing is random
        return (logits.to(acc).sum(-1) * 0).expand((n,) + tuple(logits.shape[:-1]))
    df = 0.5 * (f1 - f2).to(acc)                                         # [n, ...]
    sig = torch.sigmoid(phi.detach())
    if importance_weighting:
        m = torch.minimum(s1, s2).unsqueeze(-1)                          # the stage where the pair parts
        stage = torch.arange(phi.shape[-1], device=phi.device)
        p = phi.detach()
        # both say no at a stage before m: q(0) q(0) / p(0, 0) = sigmoid(-phi)^2 / (sigmoid(-phi) - sigmoid(phi))
        tiny = torch.finfo(acc).tiny
        log_both_no = 2 * torch.nn.functional.logsigmoid(-p) - torch.log(torch.tanh(-p / 2).clamp_min(tiny))
        log_w = torch.where(stage < m, log_both_no, torch.zeros_like(p)).sum(-1)
        # they part at m < K - 1: q(1) q(0) / p(1, 0) = sigmoid(|phi_m|); z1 = z2 (m = K - 1 included) weighs 0
        p_m = torch.gather(p.expand(m.shape[:-1] + p.shape[-1:]), -1, m.clamp_max(p.shape[-1] - 1)).squeeze(-1)
        parted = s1 != s2
        w = torch.where(parted, torch.exp(torch.where(parted, log_w, 0.0) + torch.nn.functional.logsigmoid(p_m.abs())),
                        torch.zeros_like(log_w))
        logq = torch.log_softmax(logits.to(acc), -1).expand((n,) + tuple(logits.shape))
        lq1 = torch.gather(logq, -1, torch.gather(perm.expand(logq.shape), -1, s1.unsqueeze(-1))).squeeze(-1)
        lq2 = torch.gather(logq, -1, torch.gather(perm.expand(logq.shape), -1, s2.unsqueeze(-1))).squeeze(-1)
        return (df * w) * (lq1 - lq2)
    stage = torch.arange(phi.shape[-1], device=phi.device)
    r1 = stage <= s1.unsqueeze(-1)                                       # the stages each sample reaches
    r2 = stage <= s2.unsqueeze(-1)
    b1f, b2f = b1.to(acc), b2.to(acc)
    coef = torch.where(r1 & r2, (b1 != b2).to(acc) * (1 - 2 * b2f) * torch.sigmoid(phi.detach().abs()),
                       torch.where(r1, b1f - sig, torch.where(r2, sig - b2f, torch.zeros_like(sig))))
    coef = df.unsqueeze(-1) * coef
    safe = torch.where(torch.isfinite(phi), phi, torch.zeros_like(phi))  # impossible stages carry no gradient
    return (coef * safe).sum(-1)


__all__ = ["stick_breaking_logits", "categorical_disarm_sample", "categorical_disarm_surrogate"]
