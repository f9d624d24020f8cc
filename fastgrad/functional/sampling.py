"""Samplers: categorical draws, Gumbel top-k, Gumbel-softmax, the Philox uniforms, and the conditional Gumbels
of REBAR/RELAX. Every one takes ``generator=None`` and optional ``seed``/``offset`` (the same samples on every
backend for the same ``seed``/``offset``)."""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Optional, Tuple, Union

import torch

from ..ops import _checks, _philox
from ..ops import categorical_sample as _cs
from ..ops import gumbel_softmax as _gs
from ..ops import gumbel_topk as _gtk
from ._validate import check_bernoulli_logits, check_logits, check_n, check_tau, flat_rows, logits_from


def _draw_categorical(logits, n, probs, one_hot, generator, seed, offset):
    # values checked here, before a seed is drawn: a call that raises leaves the generator untouched
    logits = check_logits(logits_from(logits, probs))
    n = check_n(n)
    batch = logits.shape[:-1]
    K = logits.shape[-1]
    rows = flat_rows(logits.detach())
    seed, offset = _philox.draw_seed_offset(n * rows.shape[0], generator, seed, offset)
    idx, oh = _cs.eager(rows, n, seed, offset, one_hot)
    return idx.view((n,) + batch), (oh.view((n,) + batch + (K,)) if one_hot else None)


def sample_categorical(
    logits: Optional[torch.Tensor] = None,
    n: int = 1,
    *,
    probs: Optional[torch.Tensor] = None,
    one_hot: bool = False,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    offset: Optional[int] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Draw ``n`` samples from ``Categorical(logits)`` for every row (inverse CDF on fastgrad's Philox stream).

    Args:
        logits: ``[..., K]`` float tensor (unnormalized; ``-inf`` = zero probability). Or pass ``probs``.
        n: number of samples (int >= 1).
        one_hot: deprecated (it changed the return type): use :func:`sample_categorical_one_hot`.

    Returns:
        int64 indices ``[n, ...]``. Not differentiable; cost: one pass over the logits per row plus ``O(n log K)``.
    """
    if one_hot:
        warnings.warn("sample_categorical(one_hot=True) is deprecated: it returns a tuple where the function "
                      "returns indices; use fastgrad.functional.sample_categorical_one_hot", DeprecationWarning,
                      stacklevel=2)
        return sample_categorical_one_hot(logits, n, probs=probs, generator=generator, seed=seed, offset=offset)
    return _draw_categorical(logits, n, probs, False, generator, seed, offset)[0]


def sample_categorical_one_hot(
    logits: Optional[torch.Tensor] = None,
    n: int = 1,
    *,
    probs: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    offset: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_categorical`'s draws with their one-hot encoding, written by the same fused pass:
    ``(indices int64 [n, ...], one_hot [n, ..., K] in the logits' dtype)``; the same samples as
    :func:`sample_categorical` for the same ``seed``/``offset``."""
    return _draw_categorical(logits, n, probs, True, generator, seed, offset)


def gumbel_topk(logits: torch.Tensor, k: int, *, generator: Optional[torch.Generator] = None,
                seed: Optional[int] = None, offset: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sample ``k`` distinct categories of every row without replacement (Gumbel-top-k).

    Args:
        logits: ``[..., K]`` float (unnormalized; ``-inf`` = zero probability, never chosen).
        k: 1 <= k <= K (and no more than a row's categories of nonzero probability).

    Returns:
        ``(indices, values)``, both ``[..., k]``: int64 categories in the order of successive draws without
        replacement (decreasing perturbed value), and their perturbed log-probabilities
        ``log_softmax(logits) + Gumbel`` (float32; float64 for float64 logits). The same seed gives the same sets on
        every backend (:mod:`fastgrad.ops.gumbel_topk`).
    """
    logits = check_logits(logits, values=False)  # values: checked by the op
    k = check_n(k, "k")
    if k > logits.shape[-1]:  # before a seed is drawn: a call that raises leaves the generator untouched
        raise ValueError(f"k must lie in [1, K] = [1, {logits.shape[-1]}], got {k}")
    rows = flat_rows(logits.detach())
    seed, offset = _philox.draw_seed_offset(rows.numel(), generator, seed, offset)
    idx, val = _gtk.eager(rows, k, seed, offset)
    batch = logits.shape[:-1]
    return idx.view(batch + (idx.shape[-1],)), val.view(batch + (val.shape[-1],))


def gumbel_softmax(
    logits: torch.Tensor,
    tau: float = 1.0,
    n: int = 1,
    hard: bool = False,
    *,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    offset: Optional[int] = None,
) -> torch.Tensor:
    """Gumbel-softmax (Concrete) relaxation: ``n`` samples ``softmax((logits + G) / tau)``, ``[n, ..., K]``.

    ``hard=True`` returns one-hot samples (``argmax(logits + G)``, exact categorical draws) whose gradient is
    the soft one (straight-through). Differentiable w.r.t. ``logits``; dtype follows ``logits``.

    ``tau``: a positive float, or a one-element tensor. A tensor that requires grad is a learned temperature:
    the result is differentiable w.r.t. it as well (computed in torch autograd from the same noise, so the
    samples equal the fused kernel's for the same seed). ``1/tau`` must be finite in float32 (float64 logits:
    float64).
    """
    logits = check_logits(logits)
    tau = check_tau(tau, logits.dtype)
    n = check_n(n)
    shape = logits.shape
    rows = flat_rows(logits)
    seed, offset = _philox.draw_seed_offset(n * rows.numel(), generator, seed, offset)
    if isinstance(tau, torch.Tensor):
        y = _gumbel_softmax_learned_tau(rows, n, tau, bool(hard), seed, offset)
    else:
        y = _gs.eager(rows, n, tau, bool(hard), seed, offset)
    return y.view((n,) + tuple(shape))


def _gumbel_softmax_learned_tau(rows: torch.Tensor, n: int, tau: torch.Tensor, hard: bool, seed: int,
                                offset: int) -> torch.Tensor:
    """The op's computation in torch autograd, differentiable w.r.t. ``tau`` too: the same Philox noise, so the
    same samples as the fused kernels for the same (seed, offset)."""
    z, _ = _gs.perturbed_softmax(rows, n, 1.0, seed, offset)
    y = torch.softmax(z / tau.to(z.dtype), dim=-1)
    if hard:
        y = torch.zeros_like(y).scatter_(-1, z.argmax(-1, keepdim=True), 1.0) - y.detach() + y
    return y.to(rows.dtype)


def uniform(shape, *, generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
            offset: Optional[int] = None, device=None) -> torch.Tensor:
    """float32 uniforms in (0, 1) of ``shape`` from fastgrad's Philox stream (element ``e`` in row-major order is
    the stream's element ``e``): the same numbers on every device for the same ``seed``/``offset``, the noise
    every antithetic and conditional sampler is built on."""
    shape = tuple(shape)
    if any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 0 for d in shape):
        raise ValueError(f"shape must be non-negative ints, got {shape}")
    numel = math.prod(shape)
    seed, offset = _philox.draw_seed_offset(numel, generator, seed, offset)
    return _philox.uniform(seed, offset, numel, device).view(shape)


def conditional_gumbel_bernoulli(logits: torch.Tensor, b: torch.Tensor, *, generator: Optional[torch.Generator] = None,
                                 seed: Optional[int] = None, offset: Optional[int] = None) -> torch.Tensor:
    """The relaxed variable given its hard sample: ``z~ ~ p(z | H(z) = b)`` for ``z = logits + Logistic noise``,
    reparameterized (differentiable w.r.t. ``logits``). Tucker et al. 2017 (REBAR), appendix; with
    ``v ~ U(0, 1)``: ``v' = v (1 - sigmoid(logits))`` for ``b = 0`` and ``v sigmoid(logits) + 1 - sigmoid(logits)``
    for ``b = 1``, then ``z~ = logits + logit(v')``. ``H(z~) = b`` always. (Storchastic's Bernoulli branch adds
    ``log1p(p)`` where ``-log1p(-p)`` is meant: its ``z~`` contradicts ``b = 1`` in every draw.)

    ``logits`` ``[...]``, ``b`` ``[n, ...]`` of 0/1 -> ``z~`` ``[n, ...]`` in the accumulation dtype."""
    logits = check_bernoulli_logits(logits)
    if not isinstance(b, torch.Tensor) or b.dim() < 1 or tuple(b.shape[1:]) != tuple(logits.shape):
        raise ValueError(f"b must have shape [n, {', '.join(map(str, logits.shape))}], got "
                         f"{tuple(getattr(b, 'shape', ()))}")
    acc = _checks.acc_dtype(logits.dtype)
    v = uniform(tuple(b.shape), generator=generator, seed=seed, offset=offset, device=logits.device).to(acc)
    t = logits.to(acc)
    p = torch.sigmoid(t)
    bb = b.to(acc)
    vp = bb * (v * p + 1 - p) + (1 - bb) * (v * (1 - p))
    # logit(v') in a stable form: the clamp keeps v' inside (0, 1) where float rounding reaches 0 or 1
    tiny = torch.finfo(acc).tiny
    vp = vp.clamp(tiny, 1 - torch.finfo(acc).eps / 2)
    z = t + torch.log(vp) - torch.log1p(-vp)
    # rounding can put z~ on the wrong side of 0 by an ulp: keep H(z~) = b exactly
    return torch.where(bb > 0, z.clamp_min(tiny), z.clamp_max(-tiny))


def conditional_gumbel_categorical(logits: torch.Tensor, b: torch.Tensor, *,
                                   generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
                                   offset: Optional[int] = None) -> torch.Tensor:
    """Gumbel-perturbed log-probabilities given their argmax: ``z~ ~ p(z | argmax z = b)`` for
    ``z = log_softmax(logits) + Gumbel``, reparameterized (differentiable w.r.t. ``logits``). Tucker et al. 2017
    (REBAR), appendix: with ``v ~ U(0, 1)^K`` and ``p = softmax(logits)``, ``z~_b = -log(-log v_b)`` and
    ``z~_k = -log(-log(v_k) / p_k - log v_b)`` for ``k != b``, so ``argmax z~ = b`` always. For RELAX/REBAR on
    categoricals and Gumbel-Rao.

    ``logits`` ``[..., K]``, ``b`` int64 ``[n, ...]`` -> ``z~`` ``[n, ..., K]`` in the accumulation dtype."""
    logits = check_logits(logits, values=True)
    if not isinstance(b, torch.Tensor) or b.dtype != torch.int64 or b.dim() < 1 \
            or tuple(b.shape[1:]) != tuple(logits.shape[:-1]):
        raise ValueError(f"b must be an int64 tensor of shape [n, {', '.join(map(str, logits.shape[:-1]))}], got "
                         f"{getattr(b, 'dtype', None)} {tuple(getattr(b, 'shape', ()))}")
    K = logits.shape[-1]
    if b.numel() and (int(b.min()) < 0 or int(b.max()) >= K):
        raise ValueError(f"b must lie in [0, {K})")
    acc = _checks.acc_dtype(logits.dtype)
    v = uniform(tuple(b.shape) + (K,), generator=generator, seed=seed, offset=offset, device=logits.device).to(acc)
    logp = torch.log_softmax(logits.to(acc), -1).expand(v.shape)
    log_vb = torch.log(v.gather(-1, b.unsqueeze(-1)))  # [n, ..., 1]
    # -log(v_k) / p_k = -log(v_k) * exp(-log p_k): a masked category (p_k = 0) goes to -inf, never the argmax
    others = -torch.log(-torch.log(v) * torch.exp(-logp) - log_vb)
    top = -torch.log(-log_vb)
    return others.scatter(-1, b.unsqueeze(-1), top)
