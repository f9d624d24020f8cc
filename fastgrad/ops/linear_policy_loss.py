"""``fastgrad::linear_policy_loss``: the LM head fused with a policy-gradient loss and its gradients, in one pass.

``linear_policy_loss(...) -> (loss, logp, entropy, token_stats, dhidden, dweight, dbias)``: 3 GEMMs (logits, dX,
dW; the design of Liger-Kernel's fused linear cross-entropy); the backward only scales the stored gradients by the
upstream scalar. The losses are one table, :data:`LOSSES` (value and derivative per token), read by the op and by
:func:`fastgrad.functional.linear_policy_loss`'s validation; the sequence-level parts (normalization, GSPO's
sequence ratio) live in :mod:`fastgrad.functional.lm_head`. The slab driver is :mod:`._lm_head`'s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch

from . import _checks, _registry
from ._lm_head import (Driver, _half_on_gpu, _logits_into, _vocab_blocks, backprop, check_devices, check_head,
                       check_index_values, check_support, grad_buffers, reduce_hidden_grad, rows_stats_reference,
                       rows_to_visit, safe_index, support_mask, vocab_size)


# -- the losses, one entry each ----------------------------------------------------------------------------------
class LossParams(NamedTuple):
    """The scalar settings of the token losses: PPO's clip bounds, dual-clip PPO's ``c`` (0: off) and SAPO's gate
    temperatures for positive and non-positive advantages."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    clip_ratio_c: float = 0.0
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05


@dataclass(frozen=True)
class TokenLoss:
    """A policy loss per token as a function of the token's log-probability ``logp``: ``value(logp, A, old, p) ->
    (l_t, clipped, ratio)`` (differentiable in ``logp``; ``old`` is ``logp.detach()`` when no behaviour log-probs
    were given; ``p`` a :class:`LossParams`) and its closed-form derivative ``dlogp(logp, A, old, p) -> dl_t/dlogp``
    with plain tensors (``old`` is then ``logp`` itself when none were given). The op runs below autograd and uses
    ``dlogp``; the tests check it against autograd through ``value``. A new token-level loss is one entry of
    :data:`LOSSES`."""

    value: Callable[..., Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    dlogp: Callable[..., torch.Tensor]


def _reinforce(logp, adv, old, p):
    return -adv * logp, torch.zeros_like(logp), torch.ones_like(logp)


def _reinforce_dlogp(logp, adv, old, p):
    return -adv


def _ppo_clip(logp, adv, old, p):
    ratio = torch.exp(logp - old)
    clip = ratio.clamp(1 - p.eps_low, 1 + p.eps_high)
    l_t = -torch.minimum(ratio * adv, clip * adv)
    clipped = ((ratio < 1 - p.eps_low) & (adv < 0)) | ((ratio > 1 + p.eps_high) & (adv > 0))
    if p.clip_ratio_c:  # dual clip: for A < 0 the loss is also capped at -c A
        cap = -p.clip_ratio_c * adv
        dual = (adv < 0) & (l_t > cap)
        l_t = torch.where(dual, cap, l_t)
        clipped = clipped | dual
    return l_t, clipped.to(logp.dtype), ratio.detach()


def _ppo_clip_dlogp(logp, adv, old, p):
    ratio = torch.exp(logp - old)
    clip = ratio.clamp(1 - p.eps_low, 1 + p.eps_high)
    # -min(rA, clip(r)A): the unclipped branch carries -A r; the clipped one is constant in logp
    d = torch.where(ratio * adv <= clip * adv, -adv * ratio, 0)
    if p.clip_ratio_c:  # the dual clip's cap -c A is constant in logp
        ppo = -torch.minimum(ratio * adv, clip * adv)
        d = torch.where((adv < 0) & (ppo > -p.clip_ratio_c * adv), 0, d)
    return d


def _cispo(logp, adv, old, p):
    ratio = torch.exp(logp.detach() - old)
    clipped = ((ratio < 1 - p.eps_low) | (ratio > 1 + p.eps_high)).to(logp.dtype)
    return -ratio.clamp(1 - p.eps_low, 1 + p.eps_high) * adv * logp, clipped, ratio


def _cispo_dlogp(logp, adv, old, p):
    return -adv * torch.exp(logp - old).clamp(1 - p.eps_low, 1 + p.eps_high)


def _sapo_gate(ratio, adv, p):
    # A = 0 takes the negative side, as TRL and verl (full_like: Python scalars in where would give float32)
    tau = torch.where(adv > 0, torch.full_like(ratio, p.sapo_tau_pos), torch.full_like(ratio, p.sapo_tau_neg))
    return torch.sigmoid(tau * (ratio - 1)), tau


def _sapo(logp, adv, old, p):
    ratio = torch.exp(logp - old)
    s, tau = _sapo_gate(ratio, adv, p)
    return -s * (4 / tau) * adv, torch.zeros_like(logp), ratio.detach()


def _sapo_dlogp(logp, adv, old, p):
    ratio = torch.exp(logp - old)
    s, _ = _sapo_gate(ratio, adv, p)
    return -adv * 4 * s * (1 - s) * ratio  # d/dlogp sigma(tau (r - 1)) 4 / tau = 4 s (1 - s) r


LOSSES: Dict[str, TokenLoss] = {
    "reinforce": TokenLoss(_reinforce, _reinforce_dlogp),
    "ppo_clip": TokenLoss(_ppo_clip, _ppo_clip_dlogp),
    "cispo": TokenLoss(_cispo, _cispo_dlogp),
    "sapo": TokenLoss(_sapo, _sapo_dlogp),
}


@dataclass(frozen=True)
class KLEstimator:
    """Schulman's estimators of ``KL(pi || ref)`` per token as functions of ``d = logp - ref_logp``: ``value(d)``
    and ``dvalue(d) = d value / d logp``. ``times_ratio``: the estimate is multiplied by the token's importance
    ratio ``r = exp(logp - old_logp)``, differentiable (value ``r v(d)``, derivative ``r (v'(d) + v(d))``)."""

    value: Callable[[torch.Tensor], torch.Tensor]
    dvalue: Callable[[torch.Tensor], torch.Tensor]
    times_ratio: bool = False


def _low_var_kl(d):
    x = (-d).clamp(-20, 20)
    return (torch.exp(x) - x - 1).clamp(-10, 10)


def _low_var_kl_grad(d):
    x = -d
    k = torch.exp(x.clamp(-20, 20)) - x.clamp(-20, 20) - 1
    live = (x >= -20) & (x <= 20) & (k <= 10)  # a clamp passes no gradient where it binds
    return torch.where(live, 1 - torch.exp(x.clamp(-20, 20)), 0)


KLS: Dict[str, KLEstimator] = {
    "k1": KLEstimator(lambda d: d, lambda d: torch.ones_like(d)),
    "k2": KLEstimator(lambda d: 0.5 * d * d, lambda d: d),
    "k3": KLEstimator(lambda d: torch.exp(-d) + d - 1, lambda d: 1 - torch.exp(-d)),
    # verl's "low_var_kl": k3 with its log-ratio clamped to [-20, 20] and the value to [-10, 10]
    "low_var_kl": KLEstimator(_low_var_kl, _low_var_kl_grad),
    # verl's "k3+": the value of its clamped k3 (low_var_kl), the gradient of k2 (unbiased for the KL's gradient
    # on-policy; TRL's default bias-corrected k3 has the same gradient on-policy, with the unclamped value)
    "k3+": KLEstimator(lambda d: _low_var_kl(d).detach() + (0.5 * d * d - (0.5 * d * d).detach()), lambda d: d),
    # k3 times the importance ratio (DeepSeek-AI 2025, DeepSeek-V3.2, arXiv:2512.02556: the unbiased reverse-KL
    # gradient off-policy; TRL 1.16's default use_bias_correction_kl=True). On-policy its value is k3's and its
    # gradient k3' + k3 = d, k2's.
    "k3_is": KLEstimator(lambda d: torch.exp(-d) + d - 1, lambda d: 1 - torch.exp(-d), times_ratio=True),
}

ROLLOUT_MODES = ("token_truncate", "token_mask")  # the op's; the sequence modes reduce to these in the functional


def rollout_weight(base_logp: torch.Tensor, rollout_logp: torch.Tensor, mode: str, cap: float,
                   cap_min: float) -> torch.Tensor:
    """The rollout-trainer mismatch weight of the policy term per token (a constant): ``r = exp(base - rollout)``;
    ``"token_truncate"``: ``clamp(r, cap_min, cap)`` (truncated importance sampling, Yao et al. 2025);
    ``"token_mask"``: ``r`` where ``cap_min <= r <= cap``, else 0 (masked importance sampling; IcePop's band).
    ``cap = 0``: no upper bound; ``cap_min = 0``: no lower bound; a NaN rollout log-prob (the engine returned none)
    gives ``r = 1``. TRL 1.16's ``vllm_importance_sampling_mode``."""
    d = base_logp.detach() - rollout_logp
    r = torch.exp(torch.where(torch.isnan(d), 0, d))
    hi = cap if cap > 0 else math.inf
    if mode == "token_truncate":
        return r.clamp(cap_min if cap_min > 0 else None, hi if cap > 0 else None)
    return torch.where((r < cap_min) | (r > hi), 0, r)


def token_loss(logp: torch.Tensor, entropy: Optional[torch.Tensor], advantages: torch.Tensor,
               old_logp: Optional[torch.Tensor], ref_logp: Optional[torch.Tensor], loss: str, params: LossParams,
               beta: float, kl: str, entropy_coef: float, rollout: Optional[torch.Tensor] = None):
    """Per-token policy loss ``l_t`` (before the token weights) and its statistics ``[4, n]`` (KL to the reference,
    clipped indicator, importance ratio, rollout weight), as differentiable functions of ``logp`` and ``entropy``:

    * ``"reinforce"``: ``-A logp`` (Williams 1992; RLOO and GRPO's unclipped on-policy form, by the advantages).
    * ``"ppo_clip"``: ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``, ``r = exp(logp - old_logp)``
      (Schulman et al. 2017; decoupled clip bounds as in DAPO, Yu et al. 2025); ``old_logp=None`` is on-policy
      (``r = 1`` with the gradient of ``exp(logp - sg(logp))``). ``clip_ratio_c > 1``: dual-clip PPO (Ye et al.
      2020, "Mastering Complex Control in MOBA Games with Deep Reinforcement Learning"): for ``A < 0`` the loss is
      also capped at ``-c A``, so a token whose ratio exploded (``r > c``) stops pushing; ``0`` turns it off.
    * ``"cispo"``: ``-sg(clip(r, 1 - eps_low, 1 + eps_high)) A logp`` (MiniMax-M1, Chen et al. 2025: the importance
      weight is clipped and detached instead of the update, so every token keeps its gradient).
    * ``"sapo"``: ``-sigmoid(tau (r - 1)) 4 / tau A`` with ``tau = sapo_tau_pos`` if ``A > 0`` else
      ``sapo_tau_neg`` (Gao et al. 2025, "Soft Adaptive Policy Optimization", arXiv:2511.20347: a smooth gate in
      place of the hard clip; gradient ``-A 4 s (1 - s) r grad logp``, ``-A grad logp`` at ``r = 1``).
    * ``rollout`` (a constant per token, :func:`rollout_weight`) multiplies the policy term above only.
    * KL to the reference policy, ``beta * kl``: ``"k1"`` ``logp - ref``, ``"k2"`` ``(logp - ref)^2 / 2``,
      ``"k3"`` ``exp(ref - logp) - (ref - logp) - 1`` (Schulman's estimators, as in GRPO, Shao et al. 2024; TRL's),
      ``"low_var_kl"`` (verl's k3: log-ratio clamped to [-20, 20], value to [-10, 10]), ``"k3+"`` (verl: k3's
      value, k2's gradient) and ``"k3_is"`` (k3 times the importance ratio ``exp(logp - old_logp)``, differentiable:
      DeepSeek-V3.2's unbiased KL gradient off-policy, TRL's ``use_bias_correction_kl``).
    * entropy bonus: ``-entropy_coef * H``.
    """
    old = logp.detach() if old_logp is None else old_logp
    l_t, clipped, ratio = LOSSES[loss].value(logp, advantages, old, params)
    if rollout is not None:
        l_t = l_t * rollout
    kl_t = torch.zeros_like(logp)
    if ref_logp is not None:
        kl_t = KLS[kl].value(logp - ref_logp)
        if KLS[kl].times_ratio:
            kl_t = kl_t * torch.exp(logp - old)
        if beta != 0:
            l_t = l_t + beta * kl_t
    if entropy_coef != 0:
        l_t = l_t - entropy_coef * entropy
    rw = rollout if rollout is not None else torch.ones_like(logp)
    return l_t, torch.stack([kl_t.detach(), clipped, ratio.detach(), rw])


def token_loss_grad(logp: torch.Tensor, advantages: torch.Tensor, old_logp: Optional[torch.Tensor],
                    ref_logp: Optional[torch.Tensor], loss: str, params: LossParams, beta: float, kl: str,
                    entropy_coef: float, rollout: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, float]:
    """``(dl_t/dlogp [n], dl_t/dH)`` of :func:`token_loss` in closed form, from the table's ``dlogp``."""
    old = logp if old_logp is None else old_logp
    c = LOSSES[loss].dlogp(logp, advantages, old, params)
    if rollout is not None:
        c = c * rollout
    if ref_logp is not None and beta != 0:
        est = KLS[kl]
        dk = est.dvalue(logp - ref_logp)
        c = c + beta * (torch.exp(logp - old) * (dk + est.value(logp - ref_logp)) if est.times_ratio else dk)
    return c, -entropy_coef


# -- the op --------------------------------------------------------------------------------------------------------
def _loss_coefficients(logp, entropy, token_weight, advantages, old_logp, ref_logp, loss, params, beta, kl,
                       entropy_coef, rollout):
    """(sum_t w_t l_t, dL/dlogp [M], dL/dH [M] or None, stats [4, M]) for one block."""
    l_t, stats = token_loss(logp, entropy, advantages, old_logp, ref_logp, loss, params, beta, kl, entropy_coef,
                            rollout)
    c, g = token_loss_grad(logp, advantages, old_logp, ref_logp, loss, params, beta, kl, entropy_coef, rollout)
    return ((token_weight * l_t).sum(), c * token_weight,
            g * token_weight if entropy_coef != 0 else None, stats)


def _check_rollout(rollout_logp, rollout_mode, rollout_cap, rollout_cap_min):
    if rollout_logp is None:
        return
    if rollout_mode not in ROLLOUT_MODES:
        raise ValueError(f"rollout_mode must be one of {ROLLOUT_MODES} with rollout_logp, got {rollout_mode!r}")
    if not (rollout_cap >= 0 and rollout_cap_min >= 0) or (rollout_cap and rollout_cap_min > rollout_cap):
        raise ValueError(f"rollout caps must satisfy 0 <= cap_min <= cap (0: none), got {rollout_cap_min}, "
                         f"{rollout_cap}")


def _check_reference_head(ref_hidden, ref_weight, ref_bias, hidden, V: int) -> None:
    if ref_hidden is None or ref_weight is None:
        raise ValueError("kl='full' needs ref_hidden and ref_weight (the reference model's last hidden states and LM "
                         "head)")
    _checks.tensor(ref_hidden, "ref_hidden", 2)
    _checks.tensor(ref_weight, "ref_weight", 2)
    if ref_hidden.shape[0] != hidden.shape[0]:
        raise ValueError(f"ref_hidden must have {hidden.shape[0]} rows (hidden's), got {tuple(ref_hidden.shape)}")
    if ref_weight.shape != (V, ref_hidden.shape[1]):
        raise ValueError(f"ref_weight must have shape [V, H_ref] = {(V, ref_hidden.shape[1])} (the policy head's rows), "
                         f"got {tuple(ref_weight.shape)}")
    if ref_weight.dtype != ref_hidden.dtype:
        raise TypeError(f"ref_weight must have ref_hidden's dtype {ref_hidden.dtype}, got {ref_weight.dtype}")
    for name, t in (("ref_hidden", ref_hidden), ("ref_weight", ref_weight), ("ref_bias", ref_bias)):
        if t is not None:
            _checks.same_device(name, t, hidden, "hidden's")
    if ref_bias is not None:
        _checks.tensor(ref_bias, "ref_bias", 1)
        _checks.shape(ref_bias, "ref_bias", (V,), "[V]")


def full_kl_rows_(slab, norm, ref_slab, drv, sel, ref_hidden, ref_weight, ref_bias, coef) -> torch.Tensor:
    """The exact ``KL(pi || pi_ref)`` of each row of the block, both at the policy's temperature, from the policy's
    logits ``slab`` (its normalizer ``norm``) and the reference's, computed into ``ref_slab`` (one more GEMM);
    ``ref_slab`` is left holding ``coef_t d KL_t / d slab = coef_t pi (log pi - log pi_ref - KL_t) / T``."""
    inv_t = drv.inv_t
    xr = ref_hidden[sel] if isinstance(sel, slice) else ref_hidden.index_select(0, sel)
    acc = ref_slab.dtype
    xr = xr.to(ref_weight.dtype if _half_on_gpu(ref_weight, acc) else acc)
    _logits_into(ref_slab, xr, ref_weight, ref_bias, _vocab_blocks(ref_weight))
    _, ref_norm, _, _ = drv.stats(ref_slab, ref_slab.new_zeros((ref_slab.shape[0], 1), dtype=torch.int64), inv_t,
                                  False, False)  # the reference's row max and log-sum-exp (no temporary)
    if not bool(torch.isfinite(ref_norm).all()):
        raise ValueError("ref_hidden, ref_weight and ref_bias must be finite: a reference row's logits contain NaN "
                         "or inf")
    ref_slab.mul_(inv_t).sub_(ref_norm[:, :1]).sub_(ref_norm[:, 1:])  # log pi_ref
    lp = (slab * inv_t).sub_(norm[:, :1]).sub_(norm[:, 1:])  # log pi, relative to the row max: the one temporary
    ref_slab.neg_().add_(lp)  # log pi - log pi_ref
    p = lp.exp_()
    kl_t = torch.linalg.vecdot(p, ref_slab)
    if drv.tp is not None:  # a vocabulary shard: the KL's partial sums over the group (O(1) per token)
        import torch.distributed as dist

        drv.tp.all_reduce(kl_t, dist.ReduceOp.SUM)
    ref_slab.sub_(kl_t[:, None]).mul_(p).mul_((coef * inv_t)[:, None])
    return kl_t


# the schema's trailing arguments, with defaults
_EXTRA = ("clip_ratio_c", "want_sum_sq", "want_lse", "sapo_tau_pos", "sapo_tau_neg", "rollout_logp", "rollout_mode",
          "rollout_cap", "rollout_cap_min", "support_crow", "support_col", "ref_hidden", "ref_weight", "ref_bias")


def _policy_impl(hidden, weight, bias, index, advantages, token_weight, old_logp, ref_logp, temperature, ignore_index,
                 loss, eps_low, eps_high, beta, kl, entropy_coef, want_entropy, chunk, output_mask, clip_ratio_c=0.0,
                 want_sum_sq=False, want_lse=False, sapo_tau_pos=1.0, sapo_tau_neg=1.05, rollout_logp=None,
                 rollout_mode="none", rollout_cap=0.0, rollout_cap_min=0.0, support_crow=None, support_col=None,
                 ref_hidden=None, ref_weight=None, ref_bias=None):
    check_head(hidden, weight, bias, index, temperature, chunk, index_dim=1)
    V = vocab_size(weight)
    N = hidden.shape[0]
    acc = _checks.acc_dtype(hidden.dtype)
    for name, t in (("advantages", advantages), ("token_weight", token_weight), ("old_logp", old_logp),
                    ("ref_logp", ref_logp), ("rollout_logp", rollout_logp)):
        if t is not None:
            _checks.tensor(t, name, 1, _checks.FLOATS)
            _checks.shape(t, name, (N,), "[N] (one per token)")
            _checks.same_device(name, t, hidden)
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {tuple(LOSSES)}, got {loss!r}")
    full_kl = kl == "full"
    if kl not in KLS and not full_kl:
        raise ValueError(f"kl must be one of {tuple(KLS) + ('full',)}, got {kl!r}")
    if full_kl:
        _check_reference_head(ref_hidden, ref_weight, ref_bias, hidden, weight.shape[0])  # this rank's rows
        if support_crow is not None:
            raise ValueError("kl='full' with a sampling support is not supported")
    _check_rollout(rollout_logp, rollout_mode, rollout_cap, rollout_cap_min)
    check_index_values(index, V, ignore_index)
    params = LossParams(eps_low, eps_high, clip_ratio_c, sapo_tau_pos, sapo_tau_neg)
    need_x, need_w, need_b = output_mask
    safe, valid = safe_index(index, ignore_index)
    w = torch.where(valid, token_weight.to(acc), 0)
    adv = advantages.to(acc)
    old = old_logp.to(acc) if old_logp is not None else None
    ref = ref_logp.to(acc) if ref_logp is not None else None
    roll = rollout_logp.to(acc) if rollout_logp is not None else None
    want_entropy = bool(want_entropy) or entropy_coef != 0
    logp = hidden.new_zeros((N,), dtype=acc)
    ent = hidden.new_zeros((N if want_entropy else 0,), dtype=acc)
    stats = hidden.new_zeros((4 + want_sum_sq + want_lse, N), dtype=acc)
    stats[2:4] = 1  # the ratio and rollout weight of tokens not visited
    total = hidden.new_zeros((), dtype=acc)
    support = None
    if support_crow is not None or support_col is not None:
        support = check_support((support_crow, support_col), N, V, safe, w != 0)
    drv = Driver(hidden, weight, bias, index, temperature, chunk, rows_to_visit(w != 0), support)
    dx, dw, db = grad_buffers(hidden, weight, bias, need_x, need_w, need_b, drv)
    empty = w.new_empty(0)
    ref_buf = torch.empty_like(drv.slab_buf) if (full_kl and drv.M) else None
    for i, (sel, x, slab) in enumerate(drv):
        idx = safe[sel].contiguous().unsqueeze(1)
        lp, norm, e, q = drv.stats(slab, idx, drv.inv_t, want_entropy, want_sum_sq)
        drv.check_rows(norm)
        lp = lp.squeeze(1)
        o = None if old is None else old[sel]
        rw = None if roll is None else rollout_weight(lp if o is None else o, roll[sel], rollout_mode, rollout_cap,
                                                      rollout_cap_min)
        part_loss, c, g, st = _loss_coefficients(
            lp, e if want_entropy else None, w[sel], adv[sel], o, None if (ref is None or full_kl) else ref[sel],
            loss, params, beta, "k1" if full_kl else kl, entropy_coef, rw)
        if full_kl:  # the exact KL(pi || pi_ref) per token; its gradient through the logits in ref_buf
            ref_slab = ref_buf[: slab.shape[0]]
            kl_t = full_kl_rows_(slab, norm, ref_slab, drv, sel, ref_hidden, ref_weight, ref_bias, beta * w[sel])
            part_loss = part_loss + beta * (w[sel] * kl_t).sum()
            st[0] = kl_t
        total += part_loss
        logp[sel] = lp
        stats[:4, sel] = st
        if want_sum_sq:
            stats[4, sel] = q
        if want_lse:
            stats[-1, sel] = norm.sum(1)
        if want_entropy:
            ent[sel] = e
        c = c.contiguous()
        drv.grad_(slab, idx, c.unsqueeze(1), c, g.contiguous() if g is not None else empty, norm,
                  e if g is not None else empty, drv.inv_t)
        if full_kl:
            slab += ref_slab
        part = backprop(slab, x, weight, drv.blocks, dw, db, need_x, i == 0)
        if need_x:
            dx[sel] = part.to(dx.dtype)
    if need_x:
        reduce_hidden_grad(dx)
    return (total, logp, ent, stats, dx, dw.to(weight.dtype) if need_w else weight.new_empty(0),
            db.to(bias.dtype) if db is not None else weight.new_empty(0))


def _policy_fake(hidden, weight, bias, index, advantages, token_weight, old_logp, ref_logp, temperature,
                 ignore_index, loss, eps_low, eps_high, beta, kl, entropy_coef, want_entropy, chunk, output_mask,
                 clip_ratio_c=0.0, want_sum_sq=False, want_lse=False, sapo_tau_pos=1.0, sapo_tau_neg=1.05,
                 rollout_logp=None, rollout_mode="none", rollout_cap=0.0, rollout_cap_min=0.0, support_crow=None,
                 support_col=None, ref_hidden=None, ref_weight=None, ref_bias=None):
    check_devices(hidden, weight=weight, bias=bias, index=index, advantages=advantages, token_weight=token_weight,
                  old_logp=old_logp, ref_logp=ref_logp, rollout_logp=rollout_logp, support_crow=support_crow,
                  support_col=support_col, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias)
    acc = _checks.acc_dtype(hidden.dtype)
    N = hidden.shape[0]
    need_x, need_w, need_b = output_mask
    want_entropy = bool(want_entropy) or entropy_coef != 0
    return (hidden.new_empty((), dtype=acc), hidden.new_empty((N,), dtype=acc),
            hidden.new_empty((N if want_entropy else 0,), dtype=acc),
            hidden.new_empty((4 + want_sum_sq + want_lse, N), dtype=acc),
            torch.empty_like(hidden) if need_x else hidden.new_empty(0),
            torch.empty_like(weight) if need_w else weight.new_empty(0),
            torch.empty_like(bias) if (need_b and bias is not None) else weight.new_empty(0))


def _policy_setup(ctx, inputs, output):
    # The gradients were computed in the forward. An upstream gradient of 1 (loss.backward()) hands them over:
    # the backward then holds the only reference, so autograd takes dW as the weight's .grad without a copy (no
    # second [V, H] buffer); backward through the same loss again is then an error. Any other upstream gradient
    # scales out of place and keeps them (retain_graph works).
    ctx.grads = list(output[4:])
    ctx.has_bias = inputs[2] is not None
    ctx.set_materialize_grads(False)  # else autograd hands the backward a zero [V, H] gradient for the dW output


def _policy_formula(ctx, grad_loss, *_unused):
    grads = [None] * (19 + len(_EXTRA))  # one per input of the schema
    if grad_loss is None:
        return tuple(grads)
    if ctx.grads is None:
        raise RuntimeError("linear_policy_loss: backward ran again after loss.backward() handed its gradients over "
                           "(they are computed in the forward); recompute the loss to backward through it again")
    dx, dw, db = ctx.grads
    # eager tensors only (a traced grad is a fake/functional subclass); on a GPU this costs one sync, as the
    # forward's checks already do
    scale_one = type(grad_loss) is torch.Tensor and not torch.compiler.is_compiling() and float(grad_loss) == 1.0
    if scale_one:
        ctx.grads = None
    for i, (g, need) in enumerate(((dx, ctx.needs_input_grad[0]), (dw, ctx.needs_input_grad[1]),
                                   (db, ctx.has_bias and ctx.needs_input_grad[2]))):
        if need:
            grads[i] = g if scale_one else g * grad_loss.to(g.dtype)
    return tuple(grads)


def policy_reference(hidden, weight, bias, index, advantages, token_weight, old_logp, ref_logp, temperature,
                     ignore_index, loss, eps_low, eps_high, beta, kl, entropy_coef, want_entropy, chunk, output_mask,
                     clip_ratio_c=0.0, want_sum_sq=False, want_lse=False, sapo_tau_pos=1.0, sapo_tau_neg=1.05,
                     rollout_logp=None, rollout_mode="none", rollout_cap=0.0, rollout_cap_min=0.0, support_crow=None,
                     support_col=None, ref_hidden=None, ref_weight=None, ref_bias=None):
    """The unfused loss: full logits, ``log_softmax``, :func:`token_loss` summed with the token weights, and its
    gradients by autograd: the op's seven outputs."""
    acc = _checks.acc_dtype(hidden.dtype)
    params = LossParams(eps_low, eps_high, clip_ratio_c, sapo_tau_pos, sapo_tau_neg)
    with torch.enable_grad():
        h, w_, b_ = (t.detach().requires_grad_() if t is not None else None for t in (hidden, weight, bias))
        z = h.to(acc) @ w_.to(acc).t() + (b_.to(acc) if b_ is not None else 0)
        if support_crow is not None:
            z = support_mask(z, support_crow, support_col)
        safe, valid = safe_index(index, ignore_index)
        # the row passes' oracle
        logp, norm, ent, sq = rows_stats_reference(z, safe[:, None], 1.0 / temperature, True, want_sum_sq)
        logp = logp.squeeze(1)
        tw = torch.where(valid, token_weight.to(acc), 0)
        old = None if old_logp is None else old_logp.to(acc)
        rw = None if rollout_logp is None else rollout_weight(logp if old is None else old, rollout_logp.to(acc),
                                                              rollout_mode, rollout_cap, rollout_cap_min)
        full_kl = kl == "full"
        l_t, stats = token_loss(logp, ent, advantages.to(acc), old,
                                None if (ref_logp is None or full_kl) else ref_logp.to(acc), loss, params, beta,
                                "k1" if full_kl else kl, entropy_coef, rw)
        if full_kl:  # the exact KL(pi || pi_ref) at the policy's temperature; no gradient to the reference
            zr = ref_hidden.detach().to(acc) @ ref_weight.detach().to(acc).t()
            if ref_bias is not None:
                zr = zr + ref_bias.detach().to(acc)
            lq = torch.log_softmax(zr / temperature, -1)
            lpf = torch.log_softmax(z / temperature, -1)
            kl_t = (lpf.exp() * (lpf - lq)).sum(-1)
            l_t = l_t + beta * kl_t
            stats = torch.cat([kl_t.detach()[None], stats[1:]])
        total = (tw * l_t).sum()
        wanted = [t for t, need in zip((h, w_, b_), output_mask) if need and t is not None]
        grads = iter(torch.autograd.grad(total, wanted, allow_unused=True) if wanted else ())
    d = [next(grads) if need and t is not None else None for t, need in zip((h, w_, b_), output_mask)]
    d = [torch.zeros_like(t) if g is None and t is not None and need else g
         for g, t, need in zip(d, (hidden, weight, bias), output_mask)]
    want_entropy = bool(want_entropy) or entropy_coef != 0
    # the op visits only the tokens that carry a loss: the others report logp = entropy = 0 and ratio 1
    visited = tw != 0
    logp, ent = torch.where(visited, logp, 0).detach(), torch.where(visited, ent, 0).detach()
    rows = [stats.detach()] + ([sq[None].detach()] if want_sum_sq else []) + (
        [norm.sum(1)[None].detach()] if want_lse else [])
    unvisited = torch.zeros(len(rows) - 1 + 4, dtype=acc, device=tw.device)
    unvisited[2:4] = 1
    stats = torch.where(visited, torch.cat(rows), unvisited[:, None])
    return (total.detach(), logp, ent if want_entropy else hidden.new_empty(0, dtype=acc), stats,
            d[0] if d[0] is not None else hidden.new_empty(0), d[1] if d[1] is not None else weight.new_empty(0),
            d[2] if d[2] is not None else weight.new_empty(0))


def sample_inputs(device, dtype):
    """Valid calls: every loss with and without behaviour/reference log-probs, a bias, ignored tokens, zero token
    weights, one token, and a chunk smaller than the tokens."""
    g = torch.Generator().manual_seed(0)

    def t(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)

    def f(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(device=device, dtype=torch.float32)

    N, H, V = 6, 8, 11
    idx = torch.randint(0, V, (N,), generator=g).to(device)
    idx[2] = -100
    tw = torch.ones(N, device=device)
    tw[4] = 0
    out = []
    for loss in LOSSES:
        for kl in KLS:
            old = None if kl == "k1" else f(N, scale=0.1) - 2.5
            ref = None if kl == "k2" else f(N, scale=0.1) - 2.5
            out.append((f"{loss} {kl}", (t(N, H), t(V, H), t(V) if kl == "k3" else None, idx, f(N), tw, old, ref,
                                         1.0, -100, loss, 0.2, 0.28, 0.05, kl, 0.01, True, 0, [True, True, True],
                                         3.0 if loss == "ppo_clip" else 0.0)))
    roll = f(N, scale=0.3) - 2.5
    out.append(("sapo, rollout truncate, statistics", (t(N, H), t(V, H), None, idx, f(N), tw, f(N, scale=0.1) - 2.5,
                f(N, scale=0.1) - 2.5, 0.9, -100, "sapo", 0.2, 0.2, 0.05, "low_var_kl", 0.0, True, 2,
                [True, True, False], 0.0, True, True, 1.0, 1.05, roll, "token_truncate", 1.2, 0.0)))
    out.append(("rollout mask on-policy", (t(N, H), t(V, H), None, idx, f(N), tw, None, None, 1.0, -100, "reinforce",
                0.2, 0.2, 0.0, "k3", 0.0, False, 0, [True, True, False], 0.0, False, False, 1.0, 1.05, roll,
                "token_mask", 1.5, 0.5)))
    # a sampling support per token (the target in it; the ignored token's row empty)
    crow = torch.tensor([0, 3, 5, 5, 8, 10, 13], device=device)
    col = torch.cat([torch.tensor(sorted([v, (v + 3) % V, (v + 5) % V][:n]) if v >= 0 else [], dtype=torch.int64,
                                  device=device) for v, n in zip(idx.tolist(), (3, 2, 0, 3, 2, 3))])
    out.append(("support", (t(N, H), t(V, H), None, idx, f(N), tw, None, None, 1.0, -100, "reinforce", 0.2, 0.2, 0.0,
                            "k3", 0.01, True, 2, [True, True, False], 0.0, True, True, 1.0, 1.05, None, "none", 0.0,
                            0.0, crow, col)))
    out.append(("full KL", (t(N, H), t(V, H), t(V), idx, f(N), tw, f(N, scale=0.1) - 2.5, None, 0.8, -100,
                            "ppo_clip", 0.2, 0.2, 0.1, "full", 0.0, False, 2, [True, True, True], 0.0, False, False,
                            1.0, 1.05, None, "none", 0.0, 0.0, None, None, t(N, 5), t(V, 5), t(V))))
    out.append(("one token", (t(1, H), t(V, H), None, idx[:1], f(1), tw[:1], None, None, 1.0, -100, "reinforce",
                              0.2, 0.2, 0.0, "k3", 0.0, False, 0, [True, True, False], 0.0)))
    out.append(("chunk 2 < N", (t(N, H), t(V, H), t(V), idx, f(N), tw, None, None, 0.8, -100, "ppo_clip", 0.2, 0.2,
                                0.0, "k3", 0.0, False, 2, [True, True, True], 0.0)))
    return out


# hidden [N, H], weight [V, H], bias [V]?, index/advantages/token_weight/old_logp?/ref_logp? [N] -> (loss [],
# logp [N], entropy [N] or [0], stats [4 (+ sum p^2, lse), N], dhidden, dweight, dbias): the loss and its
# gradients in one pass
OP = _registry.define_driver(
    "linear_policy_loss",
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor index, Tensor advantages, Tensor token_weight, "
    "Tensor? old_logp, Tensor? ref_logp, float temperature, SymInt ignore_index, str loss, float eps_low, "
    "float eps_high, float beta, str kl, float entropy_coef, bool want_entropy, SymInt chunk, "
    "bool[] output_mask, float clip_ratio_c=0.0, bool want_sum_sq=False, bool want_lse=False, "
    "float sapo_tau_pos=1.0, float sapo_tau_neg=1.05, Tensor? rollout_logp=None, str rollout_mode=\"none\", "
    "float rollout_cap=0.0, float rollout_cap_min=0.0, Tensor? support_crow=None, Tensor? support_col=None, "
    "Tensor? ref_hidden=None, Tensor? ref_weight=None, Tensor? ref_bias=None) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    _policy_impl, _policy_fake, reference=policy_reference, setup=_policy_setup, formula=_policy_formula,
    sample_inputs=sample_inputs)
linear_policy_loss = OP.op
