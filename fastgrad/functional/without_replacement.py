"""Sampling without replacement over joint configurations, and the estimators built on it.

The math of the without-replacement family lives here once; :mod:`fastgrad.functional` re-exports it and the graph
API (:mod:`fastgrad.method.without_replacement`) calls it.

Conventions: ``logits`` ``[R, D, K]`` are the rows of ``R`` independent groups of ``D`` independent categoricals of
``K`` classes each; a *configuration* is one value per categorical (``K**D`` of them per row). Sets of ``k``
configurations are ``[k, R, D]`` int64 indices with their joint log-probabilities ``[k, R]``.
"""
from __future__ import annotations

import itertools
import math
from typing import NamedTuple, Optional, Tuple

import torch

from ..ops import _checks, _philox
from ._validate import check_logits, check_n, check_real, expand_to
from .sampling import gumbel_topk


# -- stochastic beam search -----------------------------------------------------------------------------------
def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stable at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _truncated_gumbel(phi: torch.Tensor, g: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Gumbels ``g`` (location ``phi``), shifted so that their maximum becomes ``top``: the children's perturbed
    values conditioned on their parent's (Kool, van Hoof & Welling 2019, "Stochastic beams and where to find them",
    eq. 23, in the stable form of their appendix B). ``g``/``phi`` ``[R, b, K]``, ``top`` ``[R, b, 1]``."""
    z = g.amax(-1, keepdim=True)
    v = top - g + _log1mexp(g - z)
    out = top - torch.relu(v) - torch.log1p(torch.exp(-v.abs()))
    # a padded parent (top = -inf) has only impossible children; a child of zero probability stays impossible
    return torch.where(torch.isfinite(top) & torch.isfinite(g), out, torch.full_like(out, -math.inf))


def _gumbel(seed: int, offset: int, shape, device, dtype) -> torch.Tensor:
    u = _philox.uniform(seed, offset, math.prod(shape), device).view(shape).to(dtype)
    return -torch.log(-torch.log(u))


def _beam(logp: torch.Tensor, k: int, seed: Optional[int], offset: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Beam search over the ``D`` categoricals of every row (``logp`` ``[R, D, K]`` normalized log-probabilities in
    the accumulation dtype): with ``seed``, stochastic beam search (the ``k`` configurations of largest perturbed
    joint log-probability: a sample without replacement, in the order of successive draws); without, the ``k``
    most probable configurations (exact for independent categoricals: a prefix of a top-k configuration is a top-k
    prefix). Returns ``(indices [R, k, D], perturbed or joint log-probabilities [R, k])``."""
    R, D, K = logp.shape
    if seed is not None and D == 1:  # one categorical: the fused Gumbel-top-k op (k <= its nonzero categories)
        idx, val = gumbel_topk(logp[:, 0], k, seed=seed, offset=offset)
    elif seed is not None:  # the first of several: the same noise (stream element r * K + i), padded past the
        # nonzero categories with impossible prefixes (-inf), which the later steps never extend
        g = logp[:, 0] + _gumbel(seed, offset, (R, K), logp.device, logp.dtype)
        offset += _philox.counters_used(R * K)
        val, idx = torch.topk(g, min(k, K), dim=-1)
    else:
        val, idx = torch.topk(logp[:, 0], min(k, K), dim=-1)
    beam_idx = idx.unsqueeze(-1)                     # [R, b, d]
    beam_lp = logp[:, 0].gather(-1, idx)             # [R, b] joint log-prob of the prefix
    beam_val = val.to(logp.dtype)                    # [R, b] its perturbed value (or the log-prob itself)
    for d in range(1, D):
        b = beam_idx.shape[1]
        child_lp = beam_lp.unsqueeze(-1) + logp[:, d].unsqueeze(1)  # [R, b, K]
        if seed is not None:
            g = child_lp + _gumbel(seed, offset, (R, b, K), logp.device, logp.dtype)
            offset += _philox.counters_used(R * b * K)
            child_val = _truncated_gumbel(child_lp, g, beam_val.unsqueeze(-1))
        else:
            child_val = child_lp
        m = min(k, b * K)
        beam_val, flat = torch.topk(child_val.reshape(R, b * K), m, dim=-1)
        parent = torch.div(flat, K, rounding_mode="floor")
        beam_idx = torch.cat([beam_idx.gather(1, parent.unsqueeze(-1).expand(-1, -1, d)),
                              (flat % K).unsqueeze(-1)], -1)
        beam_lp = child_lp.reshape(R, b * K).gather(-1, flat)
    return beam_idx, beam_val


class BeamSearchResult(NamedTuple):
    """:func:`stochastic_beam_search`'s output: ``tokens`` int64 ``[B, k, t0 + L]`` (the prefix, then each sequence,
    padded with ``pad`` after it ends), ``log_p`` ``[B, k]`` (each sequence's log-probability under ``step``, float64,
    detached: recompute it with your model for gradients), ``perturbed`` ``[B, k]`` (its Gumbel key, decreasing:
    the order of successive draws without replacement; :func:`unordered_set_log_ratios` and priority sampling read
    ``log_p`` and the k-th key), ``lengths`` int64 ``[B, k]`` (generated tokens, the ``eos`` included)."""

    tokens: torch.Tensor
    log_p: torch.Tensor
    perturbed: torch.Tensor
    lengths: torch.Tensor


def _children(logp: torch.Tensor, kk: int, seed: int, offset: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``kk`` children of largest perturbed conditional log-probability ``logp + Gumbel`` (the fused
    Gumbel-top-k op when every row has ``kk`` possible tokens; else the same Philox noise in torch, where impossible
    tokens stay -inf)."""
    finite = torch.isfinite(logp).sum(-1)
    if bool((finite >= kk).all()):
        idx, val = gumbel_topk(logp, kk, seed=seed, offset=offset)
        return idx, val.to(logp.dtype)
    g = logp + _gumbel(seed, offset, tuple(logp.shape), logp.device, logp.dtype)  # the op's stream: r * V + i
    val, idx = torch.topk(g, kk, dim=-1)
    return idx, val


def stochastic_beam_search(step, prefix: torch.Tensor, k: int, max_len: int, eos: Optional[int] = None, *,
                           pad: Optional[int] = None, generator: Optional[torch.Generator] = None,
                           seed: Optional[int] = None, offset: Optional[int] = None) -> BeamSearchResult:
    """``k`` distinct sequences per row of an autoregressive model, sampled without replacement by stochastic beam
    search (Kool, van Hoof & Welling, ICML 2019, "Stochastic Beams and Where to Find Them"): exactly the Gumbel-top-k
    of the model's distribution over sequences, in the order of successive draws, never enumerated.

    Each step calls ``step(tokens)`` once on every unfinished beam (``tokens`` int64 ``[rows, t]``, the prefix and the
    tokens so far) for next-token logits ``[rows, V]`` (``-inf``: impossible), draws each beam's best ``k``
    children with one fused :func:`gumbel_topk` over the beams' rows, shifts the children's Gumbels so that their
    maximum is their parent's key (the truncated Gumbel of the paper), and keeps the ``k`` best keys of each row.
    A beam that emitted ``eos`` is finished: it keeps its key and competes with the others' children until the end.
    The noise comes from the Philox stream ``(seed, offset)``: the same seed gives the same sets on every backend.

    Args:
        step: the model, ``tokens [rows, t] -> logits [rows, V]`` (rows are a subset of ``B * k`` beams; keep it
            free of state that depends on the row order, or key it on the tokens).
        prefix: int64 ``[B, t0]`` (``t0 >= 1``), the rows' prompts.
        k: sequences per row, >= 1 (``k = 1`` is ancestral sampling); at most the row's number of sequences of
            nonzero probability within ``max_len``.
        max_len: generated tokens at most, >= 1. eos: the end-of-sequence id, or None (every sequence has
            ``max_len`` tokens). pad: the id written after a finished sequence (default ``eos``, else 0).

    Returns :class:`BeamSearchResult`. Cost: ``max_len`` calls of ``step`` on at most ``B k`` rows and ``max_len``
    Gumbel-top-k draws of ``[B k, V]``; no sequence is enumerated. Sampling only: no gradient flows.
    """
    if not isinstance(prefix, torch.Tensor) or prefix.dtype != torch.int64 or prefix.dim() != 2 \
            or prefix.shape[1] < 1:
        raise ValueError(f"prefix must be an int64 tensor [B, t0] with t0 >= 1, got "
                         f"{getattr(prefix, 'dtype', type(prefix).__name__)} {tuple(getattr(prefix, 'shape', ()))}")
    k = check_n(k, "k")
    max_len = check_n(max_len, "max_len")
    if eos is not None and (isinstance(eos, bool) or not isinstance(eos, int) or eos < 0):
        raise ValueError(f"eos must be a non-negative int or None, got {eos!r}")
    pad = (eos if eos is not None else 0) if pad is None else pad
    seed, offset = _philox.draw_seed_offset(0, generator, seed, offset)
    B, t0 = prefix.shape
    dev = prefix.device
    tokens = prefix.unsqueeze(1)                                            # [B, b, t]
    lp = torch.zeros(B, 1, dtype=torch.float64, device=dev)
    key = torch.zeros(B, 1, dtype=torch.float64, device=dev)                # the root's key (its children: untruncated)
    done = torch.zeros(B, 1, dtype=torch.bool, device=dev)
    lengths = torch.zeros(B, 1, dtype=torch.int64, device=dev)
    for t in range(max_len):
        b = tokens.shape[1]
        alive = ~done
        rows = alive.reshape(-1).nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        logits = step(tokens.reshape(B * b, -1).index_select(0, rows))
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != rows.numel():
            raise ValueError(f"step must return logits [rows, V] = [{rows.numel()}, V], got "
                             f"{tuple(getattr(logits, 'shape', ()))}")
        V = logits.shape[1]
        logp = torch.log_softmax(logits.detach().double(), -1)
        if bool(torch.isnan(logp).any()) or not bool(torch.isfinite(logp).any(-1).all()):
            raise ValueError("step's logits must be finite or -inf, with a possible token in every row")
        kk = min(k, V)
        c_idx, c_val = _children(logp, kk, seed, offset)
        offset += _philox.counters_used(rows.numel() * V)
        c_lp = lp.reshape(-1)[rows, None] + logp.gather(-1, c_idx)          # [rows, kk] joint log-probs
        c_key = lp.reshape(-1)[rows, None] + c_val                          # Gumbel(c_lp) keys
        if t > 0:  # children conditioned on their parent's key: their maximum becomes it
            parent = key.reshape(-1)[rows, None]
            z = c_key[:, :1]
            v = parent - c_key + _log1mexp(c_key - z)
            c_key = torch.where(torch.isfinite(c_key), parent - torch.relu(v) - torch.log1p(torch.exp(-v.abs())),
                                c_key)
        # candidates per row: every alive beam's kk children, and every finished beam as itself
        n_cand = b * kk + b
        cand_key = torch.full((B * b, kk + 1), -math.inf, dtype=torch.float64, device=dev)
        cand_lp = torch.zeros_like(cand_key)
        cand_tok = torch.full((B * b, kk + 1), pad, dtype=torch.int64, device=dev)
        cand_key[rows, :kk] = c_key
        cand_lp[rows, :kk] = c_lp
        cand_tok[rows, :kk] = c_idx
        fin = done.reshape(-1).nonzero().squeeze(1)
        cand_key[fin, kk] = key.reshape(-1)[fin]
        cand_lp[fin, kk] = lp.reshape(-1)[fin]
        # each row keeps its own k best (a row with fewer possible sequences gets -inf keys: dead beams, never
        # extended, never chosen over a live one)
        m = min(k, int(torch.isfinite(cand_key.view(B, n_cand)).sum(-1).max()))
        if m < 1:
            raise ValueError("a row has no sequence of nonzero probability left")
        new_key, pick = torch.topk(cand_key.view(B, n_cand), m, dim=-1)
        par = torch.div(pick, kk + 1, rounding_mode="floor")                # the parent beam of each survivor
        slot = pick % (kk + 1)
        was_done = done.gather(1, par)
        tok = cand_tok.view(B, n_cand).gather(1, pick)
        tokens = torch.cat([tokens.gather(1, par[..., None].expand(-1, -1, tokens.shape[2])), tok[..., None]], -1)
        lp = cand_lp.view(B, n_cand).gather(1, pick)
        key = new_key
        lengths = lengths.gather(1, par) + (~was_done).long()
        done = was_done | (slot == kk) | ((tok == eos) if eos is not None else torch.zeros_like(was_done))
        done = done | ~torch.isfinite(key)
    if tokens.shape[1] < k or not bool(torch.isfinite(key).all()):
        raise ValueError(f"k = {k} exceeds the number of sequences of nonzero probability of a row "
                         f"({int(torch.isfinite(key).sum(-1).min())})")
    return BeamSearchResult(tokens, lp, key, lengths)


def _check_set_logits(logits: object, k: object) -> Tuple[torch.Tensor, int]:
    logits = check_logits(logits, min_dim=3, values=True)
    k = check_n(k, "k")
    if logits.shape[0] and logits.numel():
        # the number of configurations of nonzero probability, in logs (K**D overflows)
        finite = torch.isfinite(logits).sum(-1).clamp(min=1).double().log().sum(-1)
        if float(finite.min()) < math.log(k) - 1e-9:
            raise ValueError(f"k = {k} exceeds the number of configurations of nonzero probability of a row "
                             f"(at most K**D = {logits.shape[-1]}**{logits.shape[-2]})")
    return logits, k


def sample_set(logits: torch.Tensor, k: int, *, generator: Optional[torch.Generator] = None,
               seed: Optional[int] = None, offset: Optional[int] = None
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``k`` distinct joint configurations of every row, sampled without replacement by stochastic beam search
    (Kool, van Hoof & Welling, ICML 2019): exactly Gumbel-top-k over the ``K**D`` configurations, which are never
    enumerated (``O(D k K)`` work per row).

    Args:
        logits: ``[R, D, K]`` float (``R`` rows of ``D`` independent categoricals; ``-inf`` = zero probability).
        k: 1 <= k <= the number of configurations of nonzero probability of every row.

    Returns:
        ``(indices, log_p, perturbed)``: int64 ``[k, R, D]`` in the order of successive draws, their joint
        log-probabilities ``[k, R]`` (differentiable w.r.t. ``logits``, accumulation dtype) and perturbed joint
        log-probabilities ``[k, R]`` (decreasing; the k-th is the threshold ``kappa`` of priority sampling). With
        ``D = 1`` the sets are :func:`fastgrad.functional.gumbel_topk`'s for the same seed.
    """
    logits, k = _check_set_logits(logits, k)
    seed, offset = _philox.draw_seed_offset(0, generator, seed, offset)
    acc = _checks.acc_dtype(logits.dtype)
    logp = torch.log_softmax(logits.to(acc), -1)
    with torch.no_grad():
        idx, val = _beam(logp.detach(), k, seed, offset)
    idx = idx.permute(1, 0, 2)
    return idx, joint_log_prob(logp, idx), val.t()


class SetExtension(NamedTuple):
    """:func:`extend_set`'s output, ``n = min(k, b * K**D)`` members per row (fewer where every row has fewer
    sequences of nonzero probability): ``parent`` int64 ``[n, R]`` (the member of the previous set each one extends),
    ``indices`` int64 ``[n, R, D]`` (the new draw), ``log_p`` ``[n, R]`` (joint log-probabilities of the whole
    sequences, differentiable w.r.t. the previous ``log_p`` and ``logits``), ``perturbed`` ``[n, R]`` (their Gumbel
    keys, decreasing), ``finished`` bool ``[n, R]`` (``None`` without ``eos``)."""

    parent: torch.Tensor
    indices: torch.Tensor
    log_p: torch.Tensor
    perturbed: torch.Tensor
    finished: Optional[torch.Tensor]


def extend_set(log_p: torch.Tensor, perturbed: torch.Tensor, logits: torch.Tensor, k: int, *,
               finished: Optional[torch.Tensor] = None, eos: Optional[int] = None,
               generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
               offset: Optional[int] = None) -> SetExtension:
    """Extend sets of sequences sampled without replacement by one more draw of ``D`` categoricals that may depend
    on the sequence so far: one step of stochastic beam search (Kool, van Hoof & Welling, ICML 2019), so that
    :func:`sample_set` followed by any number of ``extend_set`` calls is exactly a Gumbel-top-k sample of the joint
    distribution over the whole sequences, never enumerated. Each child's Gumbel is truncated so that the maximum
    over a member's children is the member's key; the set keeps the ``k`` largest keys.

    Start from :func:`sample_set`'s ``(indices, log_p, perturbed)`` (with ``eos``: ``finished = indices[..., 0] ==
    eos``), then pass each call's ``log_p``, ``perturbed`` and ``finished`` to the next. ``indices`` holds the new
    draw only: the earlier draws of each member are the previous ones gathered along ``parent``
    (``prev_indices.gather(0, parent[..., None].expand(...))``).

    Args:
        log_p: ``[b, R]`` joint log-probabilities of the ``b`` current members of ``R`` rows.
        perturbed: ``[b, R]`` their keys (``-inf``: an impossible member, never extended).
        logits: ``[b, R, D, K]`` (the next draw given each member) or ``[1, R, D, K]`` (the same for all).
        k: the set size to keep, >= 1.
        finished: bool ``[b, R]``, members whose sequence has ended (needs ``eos``).
        eos: the class that ends a sequence (needs ``D = 1``): a finished member extends by ``eos`` with
            probability 1, its log-probability and key unchanged.
        generator, seed, offset: the Philox stream of the Gumbel noise (as every sampler of this module).

    Returns :class:`SetExtension`. Cost: ``O(D b K)`` per row. The estimators read it as they read
    :func:`sample_set`'s: pass ``log_p`` and ``perturbed`` to :func:`unordered_set_weights`,
    :func:`priority_weights`, :func:`unordered_set_surrogate` or :func:`sf_wor_surrogate`.
    """
    if not isinstance(log_p, torch.Tensor) or not isinstance(perturbed, torch.Tensor) or log_p.dim() != 2 \
            or perturbed.shape != log_p.shape:
        raise ValueError(f"log_p and perturbed must be tensors [b, R] of one shape, got "
                         f"{tuple(getattr(log_p, 'shape', ()))} and {tuple(getattr(perturbed, 'shape', ()))}")
    logits = check_logits(logits, min_dim=4, values=False)
    b, R = log_p.shape
    if logits.dim() != 4 or logits.shape[0] not in (1, b) or logits.shape[1] != R:
        raise ValueError(f"logits must be [{b} or 1, {R}, D, K], got {tuple(logits.shape)}")
    k = check_n(k, "k")
    D, K = logits.shape[2], logits.shape[3]
    if eos is not None:
        if isinstance(eos, bool) or not isinstance(eos, int) or not 0 <= eos < K:
            raise ValueError(f"eos must be a class index in [0, {K}), got {eos!r}")
        if D != 1:
            raise ValueError(f"eos ends a sequence of single categoricals: the draw must have D = 1, got D = {D}")
    if finished is not None and (not isinstance(finished, torch.Tensor) or finished.dtype != torch.bool
                                 or finished.shape != log_p.shape):
        raise ValueError(f"finished must be a bool tensor [{b}, {R}]")
    if finished is not None and eos is None:
        raise ValueError("finished needs eos (the class a finished sequence repeats)")
    seed, offset = _philox.draw_seed_offset(0, generator, seed, offset)
    acc = _checks.acc_dtype(logits.dtype)
    logp = torch.log_softmax(logits.to(acc), -1)                      # [b|1, R, D, K]
    if finished is not None:
        forced = torch.full((K,), -math.inf, dtype=acc, device=logp.device)
        forced[eos] = 0.0
        logp = torch.where(finished[..., None, None], forced, logp)  # [b, R, D, K]
    with torch.no_grad():
        lpd = logp.detach().transpose(0, 1)                            # [R, b|1, D, K]
        origin = torch.arange(b, device=logp.device).expand(R, b)
        beam_lp = log_p.detach().to(acc).t()
        beam_val = perturbed.detach().to(acc).t()
        beam_idx = torch.empty(R, b, 0, dtype=torch.int64, device=logp.device)
        for d in range(D):
            cur = lpd[:, :, d]
            cur = cur.gather(1, origin[..., None].expand(-1, -1, K)) if cur.shape[1] != 1 \
                else cur.expand(R, origin.shape[1], K)
            child_lp = beam_lp.unsqueeze(-1) + cur                       # [R, w, K]
            w = child_lp.shape[1]
            g = child_lp + _gumbel(seed, offset, (R, w, K), logp.device, acc)
            offset += _philox.counters_used(R * w * K)
            child_val = _truncated_gumbel(child_lp, g, beam_val.unsqueeze(-1))
            beam_val, flat = torch.topk(child_val.reshape(R, w * K), min(k, w * K), dim=-1)
            par = torch.div(flat, K, rounding_mode="floor")
            beam_idx = torch.cat([beam_idx.gather(1, par.unsqueeze(-1).expand(-1, -1, d)),
                                  (flat % K).unsqueeze(-1)], -1)
            origin = origin.gather(1, par)
            beam_lp = child_lp.reshape(R, w * K).gather(-1, flat)
        possible = torch.isfinite(beam_val).sum(-1)                     # [R]
        n = int(possible.min()) if R else beam_val.shape[1]
        if R and n != int(possible.max()):
            raise ValueError(f"k = {k} exceeds the number of sequences of nonzero probability of some rows "
                             f"({n}) but not of others ({int(possible.max())})")
        if n < 1:
            raise ValueError("a row has no sequence of nonzero probability")
    parent, idx, key = origin[:, :n].t(), beam_idx[:, :n].permute(1, 0, 2), beam_val[:, :n].t()
    # the joint log-probability, differentiable: the parent's plus the draw's (0 for a finished sequence)
    chosen = logp.expand(b, R, D, K).gather(0, parent[..., None, None].expand(n, R, D, K))
    step = chosen.gather(-1, idx.unsqueeze(-1)).squeeze(-1).sum(-1)
    new_lp = log_p.to(acc).gather(0, parent) + step
    fin = None
    if eos is not None:
        fin = idx[..., 0] == eos
        if finished is not None:
            fin = fin | finished.gather(0, parent)
    return SetExtension(parent, idx, new_lp, key, fin)


def top_set(logits: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most probable joint configurations of every row (beam search, exact for independent
    categoricals): ``(indices [k, R, D], log_p [k, R])`` in decreasing probability, log-probabilities
    differentiable. Ties are broken by :func:`torch.topk`."""
    logits, k = _check_set_logits(logits, k)
    logp = torch.log_softmax(logits.to(_checks.acc_dtype(logits.dtype)), -1)
    with torch.no_grad():
        idx, _ = _beam(logp.detach(), k, None, 0)
    idx = idx.permute(1, 0, 2)
    return idx, joint_log_prob(logp, idx)


def joint_log_prob(logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``sum_d logp[r, d, idx[n, r, d]]``: ``logp`` ``[R, D, K]`` normalized, ``idx`` ``[n, R, D]`` -> ``[n, R]``."""
    return logp.unsqueeze(0).expand(idx.shape + logp.shape[-1:]).gather(-1, idx.unsqueeze(-1)).squeeze(-1).sum(-1)


# -- the unordered-set ratios ---------------------------------------------------------------------------------
def _check_set_log_p(log_p: object, name: str = "log_p") -> torch.Tensor:
    if not isinstance(log_p, torch.Tensor) or not log_p.is_floating_point():
        raise TypeError(f"{name} must be a floating torch.Tensor, got {type(log_p).__name__}")
    if log_p.dim() < 1 or log_p.shape[0] < 1:
        raise ValueError(f"{name} must be [k, ...] with k >= 1, got shape {tuple(log_p.shape)}")
    _checks.finite(log_p, name)
    slack = 8 * log_p.shape[0] * torch.finfo(log_p.dtype).eps  # rounding of probabilities that sum to 1
    log_p_d = log_p.detach()
    if log_p.numel() and float(log_p_d.max()) > slack:
        raise ValueError(f"{name} must be log-probabilities (<= 0)")
    if log_p.numel() and float(torch.logsumexp(log_p_d.double(), 0).max()) > slack:
        raise ValueError(f"{name}: the probabilities of a set must sum to at most 1 (distinct configurations)")
    return log_p


def _log_integrals(log_p: torch.Tensor, num_points: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``log I(A)`` for ``A`` = the whole set, the set less one element and less two, where
    ``I(A) = int_0^inf b exp(-b t) prod_{i in A} (1 - exp(-p_i t)) dt`` and ``b = 1 - sum_S p``: the probability
    that Gumbel-top-|A| of the distribution restricted to ``D \\ (S \\ A)`` is the set ``A`` (Kool, van Hoof &
    Welling, ICLR 2020, eq. 7, with ``u = exp(-b t)``). Computed in float64 on a log-spaced grid ``t = e^s`` by the
    trapezoid rule: the integrand is log-concave in ``s`` with its mode in ``[-log b, -log b + log(k + 1)]`` and
    decays faster than ``e^{s - s*} e^{k+1}`` to the left and doubly exponentially to the right, so a window of
    ``k + 40`` nats on the left and ``log(k + 1) + 5`` on the right holds all of it to float64 precision.

    ``log_p`` ``[k, B]`` -> ``([B], [k, B], [k, k, B])``; the two-out diagonal ``[i, i]`` is meaningless."""
    k = log_p.shape[0]
    lp = log_p.double().t().clamp(max=0.0)                             # [B, k]
    log_b = _log1mexp(torch.logsumexp(lp, -1).clamp(max=0.0))          # [B]
    # b = 0 (the set holds all the mass) is the limit b -> 0: every ratio is 1 there; 700 nats is that limit
    log_b = torch.where(torch.isfinite(log_b), log_b, torch.full_like(log_b, -700.0))
    lo, hi = -log_b - (k + 40.0), -log_b + math.log(k + 1) + 5.0
    grid = torch.linspace(0.0, 1.0, num_points, dtype=torch.float64, device=lp.device)
    s = lo.unsqueeze(-1) + (hi - lo).unsqueeze(-1) * grid                # [B, N]
    y = lp.unsqueeze(-1) + s.unsqueeze(1)                              # [B, k, N]: log(p_i t)
    term = torch.where(y < -20.0, y - 0.5 * torch.exp(y), _log1mexp(-torch.exp(y.clamp(max=700.0))))
    base = s - torch.exp(log_b.unsqueeze(-1) + s)                      # [B, N]: log(t e^{-b t})
    full = term.sum(1)                                                 # [B, N]
    one = full.unsqueeze(1) - term                                     # [B, k, N]
    two = one.unsqueeze(2) - term.unsqueeze(1)                         # [B, k, k, N] (diagonal unused)
    h = (hi - lo) / (num_points - 1)                                   # [B]
    wts = torch.zeros(num_points, dtype=torch.float64, device=lp.device)  # log trapezoid weights: 1/2 at the ends
    wts[0] = wts[-1] = math.log(0.5)

    def integral(log_f: torch.Tensor) -> torch.Tensor:  # the trapezoid rule in logs, over the last dim
        hh = h.view((-1,) + (1,) * (log_f.dim() - 2))
        return torch.logsumexp(log_f + wts, -1) + torch.log(hh)

    b1 = base.unsqueeze(1)
    return (integral(base + full), integral(b1 + one).t(),
            integral(b1.unsqueeze(1) + two).permute(1, 2, 0))


def unordered_set_log_ratios(log_p: torch.Tensor, num_points: int = 200, exact: bool = False
                             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The leave-one-out and leave-two-out ratios of the unordered-set estimator (Kool, van Hoof & Welling, ICLR
    2020, "Estimating gradients for discrete random variables by sampling without replacement"), in logs.

    For a set ``S`` of ``k`` distinct configurations with log-probabilities ``log_p``:
    ``log_r1[i] = log p^{D\\i}(S\\i) - log p(S)`` (``R(S, s_i)``) and, for ``i != j``,
    ``log_r2[i, j] = log p^{D\\{i,j}}(S\\{i,j}) - log p^{D\\i}(S\\i)`` (``R^{D\\s_i}(S, s_j)``), with
    ``log_r2[i, i] = 0``; ``p^{A}(T)`` is the probability that Gumbel-top-``|T|`` of the distribution restricted to ``A``
    draws the set ``T`` in any order.

    Args:
        log_p: ``[k, ...]`` joint log-probabilities of the set's configurations (constants).
        num_points: grid size of the numerical integral (float64 trapezoid rule on a window fitted per row: the
            integrand is analytic and decays at both ends, so the error falls exponentially with the points; at 200
            it is below 1e-10 in ``log R`` against the sum over orderings,
            tests/estimators/test_without_replacement.py).
        exact: sum over the ``k!`` orderings instead (for tests and k <= 7).

    Returns ``(log_r1 [k, ...], log_r2 [k, k, ...])`` float64, detached.
    """
    log_p = _check_set_log_p(log_p)
    num_points = check_n(num_points, "num_points")
    if num_points < 2:
        raise ValueError(f"num_points must be >= 2, got {num_points}")
    k, batch = log_p.shape[0], log_p.shape[1:]
    lp = log_p.detach().reshape(k, -1)
    if exact:
        if k > 7:
            raise ValueError(f"exact=True sums over k! orderings; use it for k <= 7, got k = {k}")
        one, two, full = _exact_log_probs(lp)
    else:
        full, one, two = _log_integrals(lp, num_points)
    log_r1 = one - full
    log_r2 = two - one.unsqueeze(1)
    eye = torch.eye(k, dtype=torch.bool, device=lp.device).unsqueeze(-1)
    log_r2 = log_r2.masked_fill(eye, 0.0)
    return log_r1.view((k,) + batch), log_r2.view((k, k) + batch)


def _set_log_prob(lp: torch.Tensor, members, removed) -> torch.Tensor:
    """``log p^{D \\ removed}(members)`` by the sum over orderings (float64, ``lp`` ``[k, B]``)."""
    B = lp.shape[1]
    if not members:
        return torch.zeros(B, dtype=torch.float64, device=lp.device)
    log_rest = _log1mexp(torch.logsumexp(lp[list(removed)], 0).clamp(max=0.0)) if removed else 0.0
    terms = []
    for order in itertools.permutations(members):
        acc, used = torch.zeros(B, dtype=torch.float64, device=lp.device), []
        for i in order:
            left = log_rest if not used else _log1mexp(
                torch.logsumexp(lp[list(removed) + used], 0).clamp(max=0.0))
            acc = acc + lp[i] - left
            used.append(i)
        terms.append(acc)
    return torch.logsumexp(torch.stack(terms), 0)


def _exact_log_probs(lp: torch.Tensor):
    lp = lp.double()
    k = lp.shape[0]
    idx = list(range(k))
    full = _set_log_prob(lp, idx, [])
    one = torch.stack([_set_log_prob(lp, [j for j in idx if j != i], [i]) for i in idx])
    two = torch.stack([torch.stack([one[i] if i == j else
                                    _set_log_prob(lp, [l for l in idx if l not in (i, j)], [i, j])
                                    for j in idx]) for i in idx])
    return one, two, full


# -- estimators -------------------------------------------------------------------------------------------------
def _check_set_cost(cost: object, log_p: torch.Tensor) -> torch.Tensor:
    cost = check_real(cost, "cost")
    return expand_to(cost, tuple(log_p.shape), "cost", "the set's log-probabilities")


def unordered_set_weights(log_p: torch.Tensor, num_points: int = 200, exact: bool = False) -> torch.Tensor:
    """``p(s) R(S, s)``: the weights of the unordered-set estimator ``sum_{s in S} p(s) R(S, s) f(s)`` of ``E[f]``
    (unbiased; Kool et al. 2020, eq. 9), ``[k, ...]`` float64 detached."""
    log_r1, _ = unordered_set_log_ratios(log_p, num_points, exact)
    return (log_p.detach().double() + log_r1).exp()


def unordered_set_surrogate(log_p: torch.Tensor, cost: torch.Tensor, use_baseline: bool = True,
                            num_points: int = 200, exact: bool = False,
                            log_ratios: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """The unordered-set policy gradient estimator (Kool, van Hoof & Welling, ICLR 2020), as a surrogate.

    ``sum_{s in S} grad p(s) R(S, s) [f(s) - b(S, s)]`` with, when ``use_baseline``, the built-in baseline
    ``b(S, s) = sum_{s' in S} p(s') R^{D\\s}(S, s') f(s')`` (``p(s) f(s)`` plus the unordered-set estimate of the
    rest of the expectation from ``S \\ s``: its expected contribution is ``E[f] sum_s grad p(s) = 0``). Unbiased for
    ``grad E[f]``; with the baseline it needs ``k >= 2``. ``k`` cost evaluations.

    Args:
        log_p: ``[k, ...]`` joint log-probabilities of a :func:`sample_set` set, differentiable.
        cost: broadcastable to ``[k, ...]``, constants.
        log_ratios: :func:`unordered_set_log_ratios` of ``log_p`` when already computed (the graph API computes
            them once for the plate weights).
    Returns ``[...]``: value ``sum_s p(s) R(S, s) f(s)`` (the estimate of ``E[f]``), gradient the estimator's.
    """
    cost = _check_set_cost(cost, log_p).detach().double()
    if use_baseline and log_p.shape[0] < 2:
        raise ValueError("the unordered-set baseline leaves one sample out: it needs k >= 2")
    log_r1, log_r2 = log_ratios if log_ratios is not None else unordered_set_log_ratios(log_p, num_points, exact)
    lpd = log_p.detach().double()
    w = (lpd + log_r1).exp()                                              # [k, ...]
    adv = cost
    if use_baseline:
        base = ((lpd.unsqueeze(0) + log_r2).exp() * cost.unsqueeze(0)).sum(1)  # b[i] = sum_j p_j R2[i, j] f_j
        adv = cost - base
    value = (w * cost).sum(0)
    score = (w * adv).to(log_p.dtype) * (log_p - log_p.detach())
    return value.to(log_p.dtype) + score.sum(0)


def priority_weights(log_p: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
    """``p_i / q_i`` with ``q_i = 1 - exp(-exp(log p_i - kappa))``: the importance weights of priority sampling
    with threshold ``kappa`` (the k-th perturbed log-probability; Kool, van Hoof & Welling 2019, "Buy 4 REINFORCE
    samples, get a baseline for free!"). float64, detached; ``log_p`` ``[n, ...]``, ``kappa`` ``[...]``."""
    lp = log_p.detach().double()
    log_q = _log1mexp(-torch.exp(lp - kappa.detach().double()))
    return (lp - log_q).exp()


def sf_wor_surrogate(log_p: torch.Tensor, perturbed: torch.Tensor, cost: torch.Tensor, use_baseline: bool = True,
                     normalized: bool = True) -> torch.Tensor:
    """The score function without replacement (Kool, van Hoof & Welling, ICLR 2019 DeepRL workshop, "Buy 4
    REINFORCE samples, get a baseline for free!") on a set of ``k`` samples of which the first ``k - 1`` are used
    and the k-th supplies the threshold ``kappa`` (Storchastic's convention: its cost is evaluated, weight 0).

    With ``iw_i = p_i / q_i(kappa)``, ``W = sum_i iw_i`` and ``B = sum_i iw_i f_i`` over the ``k - 1`` samples, the
    gradient is ``sum_i a_i grad log p_i`` with:

    * ``use_baseline=False``: ``a_i = iw_i f_i`` (eq. 9; ``/ W`` when ``normalized``: biased, consistent);
    * ``use_baseline=True, normalized=False``: ``a_i = iw_i [f_i (1 - p_i + iw_i) - B]`` (eq. 10, unbiased; not
      robust to a shift of the cost);
    * ``use_baseline=True, normalized=True``: ``a_i = iw_i / W^i (f_i - B / W)`` with ``W^i = W - iw_i + p_i``
      (eq. 11, biased, consistent, invariant to a shift of the cost; Storchastic's default).

    ``k`` cost evaluations (the last one unused). ``log_p``/``perturbed`` ``[k, ...]`` from :func:`sample_set`,
    ``cost`` broadcastable to ``[k, ...]``; returns ``[...]``: value ``sum_i iw_i f_i`` (``/ W``), gradient the
    estimator's.
    """
    log_p = _check_set_log_p(log_p)
    cost = _check_set_cost(cost, log_p).detach().double()
    k = log_p.shape[0]
    if k < 2:
        raise ValueError("the score function without replacement uses k - 1 samples and the k-th as threshold: "
                         "it needs k >= 2")
    if not isinstance(perturbed, torch.Tensor) or perturbed.shape != log_p.shape:
        raise ValueError(f"perturbed must be a tensor of the shape of log_p {tuple(log_p.shape)}")
    _checks.finite(perturbed, "perturbed")
    iw = priority_weights(log_p[:-1], perturbed[-1])                     # [k-1, ...]
    f = cost[:-1]
    p = log_p[:-1].detach().double().exp()
    W = iw.sum(0)
    B = (iw * f).sum(0)
    if not use_baseline:
        a = iw * f / W if normalized else iw * f
    elif normalized:
        a = iw / (W - iw + p) * (f - B / W)
    else:
        a = iw * (f * (1 - p + iw) - B)
    value = (iw * f).sum(0) / W if normalized else (iw * f).sum(0)
    lp = log_p[:-1]
    return value.to(log_p.dtype) + (a.to(log_p.dtype) * (lp - lp.detach())).sum(0)
