"""``fastgrad::linear_policy_loss``: the LM head fused with a policy-gradient loss and its gradients, in one pass.

``linear_policy_loss(...) -> (loss, logp, entropy, token_stats, dhidden, dweight, dbias)``: 3 GEMMs (logits, dX,
dW; the design of Liger-Kernel's fused linear cross-entropy); the backward only scales the stored gradients by the
upstream scalar. The losses are one table, :data:`LOSSES` (value and derivative per token), read by the op and by
:func:`fastgrad.functional.linear_policy_loss`'s validation; the sequence-level parts (normalization, GSPO's
sequence ratio) live in :mod:`fastgrad.functional.lm_head`. The slab driver is :mod:`._lm_head`'s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from . import _checks, _registry
from ._lm_head import (Driver, backprop, check_devices, check_head, check_index_values, grad_buffers,
                       rows_stats_reference, rows_to_visit, safe_index)


# -- the losses, one entry each ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenLoss:
    """A policy loss per token as a function of the token's log-probability ``logp``: ``value(logp, A, old, eps_low,
    eps_high, c) -> (l_t, clipped, ratio)`` (differentiable in ``logp``; ``old`` is ``logp.detach()`` when no
    behaviour log-probs were given) and its closed-form derivative ``dlogp(...) -> dl_t/dlogp`` with plain tensors
    (``old`` is then ``logp`` itself when none were given). The op runs below autograd and uses ``dlogp``; the tests
    check it against autograd through ``value``. A new token-level loss is one entry of :data:`LOSSES`."""

    value: Callable[..., Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    dlogp: Callable[..., torch.Tensor]


def _reinforce(logp, adv, old, eps_low, eps_high, c):
    return -adv * logp, torch.zeros_like(logp), torch.ones_like(logp)


def _reinforce_dlogp(logp, adv, old, eps_low, eps_high, c):
    return -adv


def _ppo_clip(logp, adv, old, eps_low, eps_high, c):
    ratio = torch.exp(logp - old)
    clip = ratio.clamp(1 - eps_low, 1 + eps_high)
    l_t = -torch.minimum(ratio * adv, clip * adv)
    clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    if c:  # dual clip: for A < 0 the loss is also capped at -c A
        cap = -c * adv
        dual = (adv < 0) & (l_t > cap)
        l_t = torch.where(dual, cap, l_t)
        clipped = clipped | dual
    return l_t, clipped.to(logp.dtype), ratio.detach()


def _ppo_clip_dlogp(logp, adv, old, eps_low, eps_high, c):
    ratio = torch.exp(logp - old)
    clip = ratio.clamp(1 - eps_low, 1 + eps_high)
    # -min(rA, clip(r)A): the unclipped branch carries -A r; the clipped one is constant in logp
    d = torch.where(ratio * adv <= clip * adv, -adv * ratio, 0)
    if c:  # the dual clip's cap -c A is constant in logp
        ppo = -torch.minimum(ratio * adv, clip * adv)
        d = torch.where((adv < 0) & (ppo > -c * adv), 0, d)
    return d


def _cispo(logp, adv, old, eps_low, eps_high, c):
    ratio = torch.exp(logp.detach() - old)
    clipped = ((ratio < 1 - eps_low) | (ratio > 1 + eps_high)).to(logp.dtype)
    return -ratio.clamp(1 - eps_low, 1 + eps_high) * adv * logp, clipped, ratio


def _cispo_dlogp(logp, adv, old, eps_low, eps_high, c):
    return -adv * torch.exp(logp - old).clamp(1 - eps_low, 1 + eps_high)


LOSSES: Dict[str, TokenLoss] = {
    "reinforce": TokenLoss(_reinforce, _reinforce_dlogp),
    "ppo_clip": TokenLoss(_ppo_clip, _ppo_clip_dlogp),
    "cispo": TokenLoss(_cispo, _cispo_dlogp),
}


@dataclass(frozen=True)
class KLEstimator:
    """Schulman's estimators of ``KL(pi || ref)`` per token as functions of ``d = logp - ref_logp``: ``value(d)``
    and ``dvalue(d) = d value / d logp``."""

    value: Callable[[torch.Tensor], torch.Tensor]
    dvalue: Callable[[torch.Tensor], torch.Tensor]


KLS: Dict[str, KLEstimator] = {
    "k1": KLEstimator(lambda d: d, lambda d: torch.ones_like(d)),
    "k2": KLEstimator(lambda d: 0.5 * d * d, lambda d: d),
    "k3": KLEstimator(lambda d: torch.exp(-d) + d - 1, lambda d: 1 - torch.exp(-d)),
}


def token_loss(logp: torch.Tensor, entropy: Optional[torch.Tensor], advantages: torch.Tensor,
               old_logp: Optional[torch.Tensor], ref_logp: Optional[torch.Tensor], loss: str, eps_low: float,
               eps_high: float, beta: float, kl: str, entropy_coef: float, clip_ratio_c: float = 0.0):
    """Per-token policy loss ``l_t`` (before the token weights) and its statistics ``[3, n]`` (KL to the reference,
    clipped indicator, importance ratio), as differentiable functions of ``logp`` and ``entropy``:

    * ``"reinforce"``: ``-A logp`` (Williams 1992; RLOO and GRPO's unclipped on-policy form, by the advantages).
    * ``"ppo_clip"``: ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``, ``r = exp(logp - old_logp)``
      (Schulman et al. 2017; decoupled clip bounds as in DAPO, Yu et al. 2025); ``old_logp=None`` is on-policy
      (``r = 1`` with the gradient of ``exp(logp - sg(logp))``). ``clip_ratio_c > 1``: dual-clip PPO (Ye et al.
      2020, "Mastering Complex Control in MOBA Games with Deep Reinforcement Learning"): for ``A < 0`` the loss is
      also capped at ``-c A``, so a token whose ratio exploded (``r > c``) stops pushing; ``0`` turns it off.
    * ``"cispo"``: ``-sg(clip(r, 1 - eps_low, 1 + eps_high)) A logp`` (MiniMax-M1, Chen et al. 2025: the importance
      weight is clipped and detached instead of the update, so every token keeps its gradient).
    * KL to the reference policy, ``beta * kl``: ``"k1"`` ``logp - ref``, ``"k2"`` ``(logp - ref)^2 / 2``,
      ``"k3"`` ``exp(ref - logp) - (ref - logp) - 1`` (Schulman's estimators, as in GRPO, Shao et al. 2024).
    * entropy bonus: ``-entropy_coef * H``.
    """
    old = logp.detach() if old_logp is None else old_logp
    l_t, clipped, ratio = LOSSES[loss].value(logp, advantages, old, eps_low, eps_high, clip_ratio_c)
    kl_t = torch.zeros_like(logp)
    if ref_logp is not None:
        kl_t = KLS[kl].value(logp - ref_logp)
        if beta != 0:
            l_t = l_t + beta * kl_t
    if entropy_coef != 0:
        l_t = l_t - entropy_coef * entropy
    return l_t, torch.stack([kl_t.detach(), clipped, ratio.detach()])


def token_loss_grad(logp: torch.Tensor, advantages: torch.Tensor, old_logp: Optional[torch.Tensor],
                    ref_logp: Optional[torch.Tensor], loss: str, eps_low: float, eps_high: float, beta: float,
                    kl: str, entropy_coef: float, clip_ratio_c: float = 0.0) -> Tuple[torch.Tensor, float]:
    """``(dl_t/dlogp [n], dl_t/dH)`` of :func:`token_loss` in closed form, from the table's ``dlogp``."""
    old = logp if old_logp is None else old_logp
    c = LOSSES[loss].dlogp(logp, advantages, old, eps_low, eps_high, clip_ratio_c)
    if ref_logp is not None and beta != 0:
        c = c + beta * KLS[kl].dvalue(logp - ref_logp)
    return c, -entropy_coef


# -- the op --------------------------------------------------------------------------------------------------------
def _loss_coefficients(logp, entropy, token_weight, advantages, old_logp, ref_logp, loss, eps_low, eps_high, beta,
                       kl, entropy_coef, clip_ratio_c):
    """(sum_t w_t l_t, dL/dlogp [M], dL/dH [M] or None, stats [3, M]) for one block."""
    l_t, stats = token_loss(logp, entropy, advantages, old_logp, ref_logp, loss, eps_low, eps_high, beta, kl,
                            entropy_coef, clip_ratio_c)
    c, g = token_loss_grad(logp, advantages, old_logp, ref_logp, loss, eps_low, eps_high, beta, kl, entropy_coef,
                           clip_ratio_c)
    return ((token_weight * l_t).sum(), c * token_weight,
            g * token_weight if entropy_coef != 0 else None, stats)


def _policy_impl(hidden, weight, bias, index, advantages, token_weight, old_logp, ref_logp, temperature, ignore_index,
                 loss, eps_low, eps_high, beta, kl, entropy_coef, want_entropy, chunk, output_mask, clip_ratio_c=0.0):
    check_head(hidden, weight, bias, index, temperature, chunk, index_dim=1)
    V = weight.shape[0]
    N = hidden.shape[0]
    acc = _checks.acc_dtype(hidden.dtype)
    for name, t in (("advantages", advantages), ("token_weight", token_weight), ("old_logp", old_logp),
                    ("ref_logp", ref_logp)):
        if t is not None:
            _checks.tensor(t, name, 1, _checks.FLOATS)
            _checks.shape(t, name, (N,), "[N] (one per token)")
            _checks.same_device(name, t, hidden)
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {tuple(LOSSES)}, got {loss!r}")
    if kl not in KLS:
        raise ValueError(f"kl must be one of {tuple(KLS)}, got {kl!r}")
    check_index_values(index, V, ignore_index)
    need_x, need_w, need_b = output_mask
    safe, valid = safe_index(index, ignore_index)
    w = torch.where(valid, token_weight.to(acc), 0)
    adv = advantages.to(acc)
    old = old_logp.to(acc) if old_logp is not None else None
    ref = ref_logp.to(acc) if ref_logp is not None else None
    want_entropy = bool(want_entropy) or entropy_coef != 0
    logp = hidden.new_zeros((N,), dtype=acc)
    ent = hidden.new_zeros((N if want_entropy else 0,), dtype=acc)
    stats = hidden.new_zeros((3, N), dtype=acc)
    stats[2] = 1  # the ratio of tokens not visited
    total = hidden.new_zeros((), dtype=acc)
    drv = Driver(hidden, weight, bias, index, temperature, chunk, rows_to_visit(w != 0))
    dx, dw, db = grad_buffers(hidden, weight, bias, need_x, need_w, need_b, drv)
    empty = w.new_empty(0)
    for i, (sel, x, slab) in enumerate(drv):
        idx = safe[sel].contiguous().unsqueeze(1)
        lp, lse, e = drv.stats(slab, idx, drv.inv_t, want_entropy)
        drv.check_rows(lse)
        lp = lp.squeeze(1)
        part_loss, c, g, st = _loss_coefficients(
            lp, e if want_entropy else None, w[sel], adv[sel], None if old is None else old[sel],
            None if ref is None else ref[sel], loss, eps_low, eps_high, beta, kl, entropy_coef, clip_ratio_c)
        total += part_loss
        logp[sel] = lp
        stats[:, sel] = st
        if want_entropy:
            ent[sel] = e
        drv.grad_(slab, idx, c.unsqueeze(1).contiguous(), g.contiguous() if g is not None else empty, lse,
                  e if g is not None else empty, drv.inv_t)
        part = backprop(slab, x, weight, drv.blocks, dw, db, need_x, i == 0)
        if need_x:
            dx[sel] = part.to(dx.dtype)
    return (total, logp, ent, stats, dx, dw.to(weight.dtype) if need_w else weight.new_empty(0),
            db.to(bias.dtype) if db is not None else weight.new_empty(0))


def _policy_fake(hidden, weight, bias, index, advantages, token_weight, old_logp, ref_logp, temperature,
                 ignore_index, loss, eps_low, eps_high, beta, kl, entropy_coef, want_entropy, chunk, output_mask,
                 clip_ratio_c=0.0):
    check_devices(hidden, weight=weight, bias=bias, index=index, advantages=advantages, token_weight=token_weight,
                  old_logp=old_logp, ref_logp=ref_logp)
    acc = _checks.acc_dtype(hidden.dtype)
    N = hidden.shape[0]
    need_x, need_w, need_b = output_mask
    want_entropy = bool(want_entropy) or entropy_coef != 0
    return (hidden.new_empty((), dtype=acc), hidden.new_empty((N,), dtype=acc),
            hidden.new_empty((N if want_entropy else 0,), dtype=acc), hidden.new_empty((3, N), dtype=acc),
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
    grads = [None] * 20  # one per input of the schema
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
                     clip_ratio_c=0.0):
    """The unfused loss: full logits, ``log_softmax``, :func:`token_loss` summed with the token weights, and its
    gradients by autograd: the op's seven outputs."""
    acc = _checks.acc_dtype(hidden.dtype)
    with torch.enable_grad():
        h, w_, b_ = (t.detach().requires_grad_() if t is not None else None for t in (hidden, weight, bias))
        z = h.to(acc) @ w_.to(acc).t() + (b_.to(acc) if b_ is not None else 0)
        safe, valid = safe_index(index, ignore_index)
        logp, _, ent = rows_stats_reference(z, safe[:, None], 1.0 / temperature, True)  # the row passes' oracle
        logp = logp.squeeze(1)
        tw = torch.where(valid, token_weight.to(acc), 0)
        l_t, stats = token_loss(logp, ent, advantages.to(acc), None if old_logp is None else old_logp.to(acc),
                                None if ref_logp is None else ref_logp.to(acc), loss, eps_low, eps_high, beta, kl,
                                entropy_coef, clip_ratio_c)
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
    stats = torch.where(visited, stats.detach(), torch.tensor([0.0, 0.0, 1.0], dtype=acc, device=tw.device)[:, None])
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
    out.append(("one token", (t(1, H), t(V, H), None, idx[:1], f(1), tw[:1], None, None, 1.0, -100, "reinforce",
                              0.2, 0.2, 0.0, "k3", 0.0, False, 0, [True, True, False], 0.0)))
    out.append(("chunk 2 < N", (t(N, H), t(V, H), t(V), idx, f(N), tw, None, None, 0.8, -100, "ppo_clip", 0.2, 0.2,
                                0.0, "k3", 0.0, False, 2, [True, True, True], 0.0)))
    return out


# hidden [N, H], weight [V, H], bias [V]?, index/advantages/token_weight/old_logp?/ref_logp? [N] -> (loss [],
# logp [N], entropy [N] or [0], stats [3, N], dhidden, dweight, dbias): the loss and its gradients in one pass
OP = _registry.define_driver(
    "linear_policy_loss",
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor index, Tensor advantages, Tensor token_weight, "
    "Tensor? old_logp, Tensor? ref_logp, float temperature, SymInt ignore_index, str loss, float eps_low, "
    "float eps_high, float beta, str kl, float entropy_coef, bool want_entropy, SymInt chunk, "
    "bool[] output_mask, float clip_ratio_c=0.0) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    _policy_impl, _policy_fake, reference=policy_reference, setup=_policy_setup, formula=_policy_formula,
    sample_inputs=sample_inputs)
linear_policy_loss = OP.op
