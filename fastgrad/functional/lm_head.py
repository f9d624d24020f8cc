"""The LM head fused with the log-probability and the policy-gradient losses (plain functions over the ops of
:mod:`fastgrad.ops.linear_log_prob` and :mod:`fastgrad.ops.linear_policy_loss`)."""
from __future__ import annotations

import collections
import functools
import math
import numbers
from typing import Optional, Tuple

import torch

from ..ops import _checks
from ..ops import _lm_head
from ..ops import linear_log_prob as _llp
from ..ops import linear_policy_loss as _plp
from ._validate import Baseline, check_real, expand_to
from .score_function import subtract_baseline


def _lm_inputs(hidden, weight, index, bias, temperature, chunk_size, memory_budget, index_extra: int = 0):
    """Validate and flatten: hidden [N, H] or [B, T, H] -> [N, H]; index (hidden's leading shape) -> [N]."""
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating torch.Tensor, got {getattr(hidden, 'dtype', type(hidden).__name__)}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [N, H] or [B, T, H], got shape {tuple(hidden.shape)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D [V, H] tensor, got {getattr(weight, 'shape', type(weight).__name__)}")
    if not isinstance(index, torch.Tensor) or index.dtype != torch.int64:
        raise TypeError(f"index must be an int64 tensor of token ids, got "
                        f"{getattr(index, 'dtype', type(index).__name__)}")
    lead = tuple(hidden.shape[:-1])
    if tuple(index.shape[index_extra:]) != lead:
        raise ValueError(f"index must have shape {lead} (hidden's leading dims), got {tuple(index.shape)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, int)
                                      or memory_budget < 1):
        raise ValueError(f"memory_budget must be a positive int (bytes) or None, got {memory_budget!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    h2 = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    _checks.finite(h2, "hidden")
    chunk = chunk_size or 0
    if chunk == 0 and memory_budget is not None:
        chunk = _lm_head.default_chunk(h2.shape[0], weight.shape[0], h2.device, memory_budget)
    return h2, weight.contiguous(), None if bias is None else bias.contiguous(), float(temperature), chunk


_LOG_PROB_FIELDS = ("logp", "entropy", "sum_pi_squared", "lse")


@functools.lru_cache(maxsize=None)
def _log_prob_result(fields: Tuple[str, ...]):
    return collections.namedtuple("LinearLogProb", fields)


def linear_log_prob(hidden: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, *,
                    bias: Optional[torch.Tensor] = None, temperature: float = 1.0, ignore_index: int = -100,
                    return_entropy: bool = False, return_sum_pi_squared: bool = False, return_lse: bool = False,
                    chunk_size: Optional[int] = None, memory_budget: Optional[int] = None):
    """Log-probabilities of the given tokens under the LM head, without the ``[tokens, V]`` logits.

    ``logp[t] = log_softmax((hidden[t] @ weight.T + bias) / temperature)[index[t]]``, computed one ``[chunk, V]``
    fp32 slab at a time; differentiable w.r.t. ``hidden``, ``weight`` and ``bias`` (the backward recomputes each
    slab: 4 GEMMs). For losses written in torch on the log-probs; :func:`linear_policy_loss` is the 3-GEMM path.
    Every row works relative to its maximum logit: the log-probs are those of the float64 ``log_softmax`` of the
    same fp32 logits to ~1e-6, whatever the logits' offset.

    Args:
        hidden: ``[N, H]`` or ``[B, T, H]``, float32/bfloat16/float16/float64 (the weight's dtype).
        weight: ``[V, H]`` (``lm_head.weight``); bias: ``[V]`` or None.
        index: int64 token ids with hidden's leading shape; ``ignore_index`` entries give logp 0 and no gradient.
        return_entropy: also the entropy ``H = -sum_v p_v log p_v`` of each row's distribution (differentiable,
            exact gradient; one more multiply-add per logit, only when asked).
        return_sum_pi_squared: also ``sum_v p_v^2`` per row (the collision probability; verl's optimal token
            baseline and its variance metrics read it), **detached** (no gradient); one multiply-add per logit.
        return_lse: also the logsumexp of the (tempered) logits per row (differentiable, exact gradient:
            ``softmax / T``).
        chunk_size: rows per slab; None chooses from ``memory_budget`` (bytes of slab), or the default
            (:func:`fastgrad.ops.linear_log_prob.default_chunk`).

    Returns:
        fp32 (float64 for float64 inputs) ``logp`` of index's shape (``logp <= 0``) when nothing else is asked;
        otherwise a named tuple ``LinearLogProb`` whose fields are the requested outputs in the order ``logp``,
        ``entropy``, ``sum_pi_squared``, ``lse`` (each of index's shape, 0 at ignored tokens), so
        ``logp, ent = linear_log_prob(..., return_entropy=True)`` unpacks.
    """
    h2, w, b, t, chunk = _lm_inputs(hidden, weight, index, bias, temperature, chunk_size, memory_budget)
    lead = tuple(hidden.shape[:-1])
    logp, lse, ent, sq, _norm = _llp.linear_log_prob(h2, w, b, index.reshape(-1, 1).contiguous(), t,
                                                    int(ignore_index), bool(return_entropy), chunk,
                                                    bool(return_sum_pi_squared))
    values = {"logp": logp.view(lead), "entropy": ent.view(lead) if return_entropy else None,
              "sum_pi_squared": sq.view(lead) if return_sum_pi_squared else None,
              "lse": lse.view(lead) if return_lse else None}
    fields = tuple(f for f in _LOG_PROB_FIELDS if values[f] is not None)
    if fields == ("logp",):
        return values["logp"]
    return _log_prob_result(fields)(*(values[f] for f in fields))


def _per_token(t: Optional[torch.Tensor], name: str, lead: Tuple[int, ...], allow_sequence: bool) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"{name} must be a floating torch.Tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if tuple(t.shape) == lead:
        out = t
    elif allow_sequence and len(lead) == 2 and tuple(t.shape) in ((lead[0],), (lead[0], 1)):
        out = t.reshape(lead[0], 1).expand(lead)  # one value per sequence, broadcast over its tokens
    else:
        seq = f" or [{lead[0]}] (one per sequence)" if allow_sequence and len(lead) == 2 else ""
        raise ValueError(f"{name} must have shape {lead} (index's){seq}, got {tuple(t.shape)}")
    _checks.finite(out, name)
    return out.detach().reshape(-1).contiguous()


def linear_policy_loss(hidden: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, advantages: torch.Tensor, *,
                       mask: Optional[torch.Tensor] = None, old_logp: Optional[torch.Tensor] = None,
                       ref_logp: Optional[torch.Tensor] = None, beta: float = 0.0, kl: str = "k3",
                       loss: str = "reinforce", eps_low: float = 0.2, eps_high: float = 0.2,
                       entropy_coef: float = 0.0, normalize: str = "token", num_items: Optional[float] = None,
                       max_length: Optional[int] = None, clip_ratio_c: Optional[float] = None,
                       bias: Optional[torch.Tensor] = None,
                       temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False,
                       chunk_size: Optional[int] = None, memory_budget: Optional[int] = None):
    """Policy-gradient loss of sampled tokens through the LM head: the loss and its gradients in one pass over
    ``[chunk, V]`` slabs (3 GEMMs: logits, dX, dW); the logits never exist.

    ``loss = sum_t w_t l_t`` with the per-token loss ``l_t`` of :func:`fastgrad.ops.linear_policy_loss.token_loss`
    (``"reinforce"``: ``-A logp``; ``"ppo_clip"``: PPO/GRPO's clipped ratio, ``eps_low``/``eps_high`` as in DAPO;
    ``"cispo"``: MiniMax-M1's clipped, detached importance weight times ``-A logp``; ``"gspo"``: GSPO's
    sequence-level ratio (Zheng et al. 2025, "Group Sequence Policy Optimization", the GSPO-token form):
    ``s_b = exp(mean_t (logp - old_logp))`` over each sequence's loss tokens, clipped like PPO's ratio and shared by
    every token of the sequence, ``l_t = -min(s_b A, clip(s_b) A)`` with gradient ``-A s_b grad logp_t`` where the
    sequence is not clipped; the paper averages per sequence: use ``normalize="sequence"``. It costs one more GEMM
    (the sequence ratios need every log-prob before the first gradient). Plus ``beta`` times the ``kl``
    estimator to ``ref_logp`` and ``-entropy_coef`` times the entropy) and token weights ``w_t = mask_t / Z``:

    * ``normalize="token"`` (DAPO, BNPO): ``Z = num_items`` (global number of loss tokens; default the local
      ``mask.sum()``);
    * ``"sequence"`` (GRPO): ``Z = len_b * num_items`` (each sequence's mean, then the mean over ``num_items``
      sequences; default B); needs ``[B, T]`` inputs;
    * ``"constant"`` (Dr. GRPO): ``Z = num_items`` if given, else ``B * max_length`` (default T).

    RLOO is ``"reinforce"`` with leave-one-out advantages (:func:`batch_average_baseline` on the rewards); GRPO's
    group baseline is ``(r - mean) / std`` on ``[B]``, outside. No collective runs inside: under DDP/FSDP pass the
    global ``num_items`` and the per-rank sum of losses is the global loss's share.

    Args:
        hidden: ``[N, H]`` or ``[B, T, H]``, fp32, bf16 or fp16.
        weight: the LM head's ``[V, H]``, hidden's dtype (``bias``: optional ``[V]``).
        index: the sampled tokens, int64, hidden's leading shape.
        advantages: per token (index's shape) or per sequence ``[B]``.
        mask: loss mask (index's shape), default ``index != ignore_index``; masked tokens cost nothing (compacted
            out before the GEMMs).
        old_logp: fp32 per-token log-probs of the behaviour policy (``None``: on-policy, ratio 1).
        ref_logp: fp32 per-token log-probs of the reference policy; ``beta > 0`` requires it.
        clip_ratio_c: dual-clip PPO's bound ``c > 1`` (Ye et al. 2020; verl's ``clip_ratio_c``, typically 3): with
            ``"ppo_clip"`` or ``"gspo"``, tokens with ``A < 0`` lose at most ``-c A``. None: off.

    Returns:
        ``(loss, stats)``: the fp32 scalar loss (differentiable w.r.t. hidden, weight, bias; its backward scales the
        gradients computed in the forward) and detached stats: ``logp`` (index's shape, 0 at masked tokens),
        ``entropy`` (when computed: ``entropy_coef != 0`` or ``return_entropy``; else None), ``kl_mean``,
        ``clip_frac``, ``ratio_mean`` (means over the loss tokens).
    """
    h2, w, b, t, chunk = _lm_inputs(hidden, weight, index, bias, temperature, chunk_size, memory_budget)
    lead = tuple(index.shape)
    if normalize not in ("token", "sequence", "constant"):
        raise ValueError(f"normalize must be 'token', 'sequence' or 'constant', got {normalize!r}")
    if normalize == "sequence" and len(lead) != 2:
        raise ValueError(f"normalize='sequence' needs [B, T] inputs (hidden [B, T, H]), got index {lead}")
    for name, v in (("beta", beta), ("eps_low", eps_low), ("eps_high", eps_high), ("entropy_coef", entropy_coef)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite float, got {v!r}")
    if beta < 0 or eps_low < 0 or eps_high < 0:
        raise ValueError(f"beta, eps_low and eps_high must be >= 0, got {beta}, {eps_low}, {eps_high}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (the reference policy's per-token log-probs)")
    if loss not in tuple(_plp.LOSSES) + ("gspo",):
        raise ValueError(f"loss must be one of {tuple(_plp.LOSSES) + ('gspo',)}, got {loss!r}")
    if loss == "gspo" and len(lead) != 2:
        raise ValueError(f"loss='gspo' needs [B, T] inputs (its ratio is per sequence), got index {lead}")
    if clip_ratio_c is not None:
        if isinstance(clip_ratio_c, bool) or not isinstance(clip_ratio_c, (int, float)) \
                or not math.isfinite(clip_ratio_c) or not clip_ratio_c > 1:
            raise ValueError(f"clip_ratio_c must be a finite float > 1 (dual-clip PPO's bound), got {clip_ratio_c!r}")
        if loss not in ("ppo_clip", "gspo"):
            raise ValueError(f"clip_ratio_c applies to loss='ppo_clip' or 'gspo', not {loss!r}")
    adv = _per_token(advantages, "advantages", lead, allow_sequence=True)
    if adv is None:
        raise TypeError("advantages must be a floating torch.Tensor, got None")
    old = _per_token(old_logp, "old_logp", lead, False)
    ref = _per_token(ref_logp, "ref_logp", lead, False)
    if mask is None:
        m = (index != ignore_index)
    else:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != lead:
            raise ValueError(f"mask must be a tensor of shape {lead} (index's), got "
                             f"{getattr(mask, 'shape', type(mask).__name__)}")
        m = mask.detach().bool() & (index != ignore_index)
    acc = _checks.acc_dtype(h2.dtype)
    mf = m.to(acc)
    if num_items is not None and (isinstance(num_items, bool) or not isinstance(num_items, numbers.Real)
                                  or not num_items > 0):
        raise ValueError(f"num_items must be a positive number, got {num_items!r}")
    if normalize == "token":
        tw = mf / (float(num_items) if num_items is not None else mf.sum().clamp(min=1))
    elif normalize == "sequence":
        lengths = mf.sum(1, keepdim=True).clamp(min=1)
        tw = mf / (lengths * (float(num_items) if num_items is not None else lead[0]))
    else:
        if num_items is not None:
            z = float(num_items)
        else:
            if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                           or max_length < 1):
                raise ValueError(f"max_length must be a positive int, got {max_length!r}")
            z = (lead[0] if len(lead) == 2 else 1) * (max_length or lead[-1])
        tw = mf / z
    op_loss = loss
    if loss == "gspo":
        # PPO-clip on a shifted old_logp, old'_t = logp_t - log s_b, whose token ratio is the sequence's ratio s_b:
        # the same value, clip decisions and gradient -A s_b grad logp_t as GSPO-token
        with torch.no_grad():
            live = torch.where(m, index, int(ignore_index)).reshape(-1, 1).contiguous()  # loss tokens only
            lp0 = _llp.linear_log_prob(h2, w, b, live, t, int(ignore_index), False, chunk)[0].view(lead)
        dl = (lp0 - old.view(lead)) * mf if old is not None else torch.zeros_like(mf)
        log_s = dl.sum(1, keepdim=True) / mf.sum(1, keepdim=True).clamp(min=1)
        old = torch.where(m, lp0 - log_s, 0).reshape(-1).contiguous()
        op_loss = "ppo_clip"
    needs = [torch.is_grad_enabled() and x is not None and x.requires_grad for x in (hidden, weight, bias)]
    total, logp, ent, st, *_ = _plp.linear_policy_loss(
        h2, w, b, index.reshape(-1).contiguous(), adv, tw.reshape(-1).contiguous(), old, ref, t, int(ignore_index),
        op_loss, float(eps_low), float(eps_high), float(beta), kl, float(entropy_coef), bool(return_entropy), chunk,
        needs, float(clip_ratio_c or 0.0))
    mflat = mf.detach().reshape(-1)  # the stats are reports: no graph (float() on them must not warn)
    count = mflat.sum().clamp(min=1)
    stats = {
        "logp": logp.detach().view(lead),
        "entropy": ent.detach().view(lead) if ent.numel() or (return_entropy or entropy_coef != 0) else None,
        "kl_mean": (st[0].detach() * mflat).sum() / count,
        "clip_frac": (st[1].detach() * mflat).sum() / count,
        "ratio_mean": (st[2].detach() * mflat).sum() / count,
    }
    return total, stats


def linear_score_function_surrogate(hidden: torch.Tensor, weight: torch.Tensor, samples: torch.Tensor,
                                    cost: torch.Tensor, baseline: Baseline = None, *,
                                    bias: Optional[torch.Tensor] = None, temperature: float = 1.0,
                                    chunk_size: Optional[int] = None) -> torch.Tensor:
    """:func:`score_function_surrogate` with the LM head fused in: ``(cost - baseline) * log p(samples)`` ``[n, R]``
    for ``logits = hidden @ weight.T (+ bias)``, without the ``[R, V]`` logits.

    Args:
        hidden: ``[R, H]``.
        weight: ``[V, H]``.
        samples: int64 ``[n, R]``.
        cost: ``[n, R]`` (or broadcastable), a constant.
        baseline: as in :func:`score_function_surrogate` (``"batch_average"``: leave-one-out, n >= 2).

    The gradient w.r.t. the logits is ``sum_s a_s onehot(y_s) - (sum_s a_s) softmax`` per row (one slab pass for
    all n samples); the backward recomputes each slab (4 GEMMs).
    """
    if not isinstance(samples, torch.Tensor) or samples.dtype != torch.int64 or samples.dim() != 2:
        raise TypeError(f"samples must be an int64 [n, R] tensor, got "
                        f"{getattr(samples, 'dtype', type(samples).__name__)} {tuple(getattr(samples, 'shape', ()))}")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"hidden must be [R, H], got {tuple(getattr(hidden, 'shape', ()))}")
    h2, w, b, t, chunk = _lm_inputs(hidden, weight, samples, bias, temperature, chunk_size, None, index_extra=1)
    cost = check_real(cost, "cost")
    acc = _checks.acc_dtype(h2.dtype)
    a = subtract_baseline(expand_to(cost.to(acc), tuple(samples.shape), "cost", "the samples' shape"), baseline)
    logp = _llp.linear_log_prob(h2, w, b, samples.t().contiguous(), t, -100, False, chunk)[0]
    return a * logp.t()
