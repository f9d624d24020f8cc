"""``fastgrad::linear_log_prob``: the LM head fused with the log-probabilities of target tokens (and the entropy,
``sum_v p_v^2``, the logsumexp), for losses computed outside in torch.

``linear_log_prob(hidden [N, H], weight [V, H], bias?, index [N, S], T, ignore_index, want_entropy, chunk,
want_sum_sq=False) -> (logp [N, S], lse [N], entropy [N] or [0], sum_pi_squared [N] or [0], norm [N, 2])``:
``logp``, ``lse`` and ``entropy`` are differentiable (exact gradients), ``sum_pi_squared`` is not (a statistic:
verl's optimal-token baseline reads it detached), ``norm`` (the row max and the log-sum-exp relative to it, what
the backward needs: their rounded sum ``lse`` would lose ulp(lse)) is internal. The backward
``linear_log_prob_backward`` recomputes each slab (4 GEMMs in all). The slab driver is :mod:`._lm_head`'s, shared
with :mod:`.linear_policy_loss`; the unfused computation :func:`log_prob_reference` is the tests' oracle.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import _checks, _registry
from ._lm_head import (Driver, backprop, check_devices, check_head, check_index_values,  # noqa: F401
                       check_support, default_chunk, grad_buffers, reduce_hidden_grad, rows_stats_reference,
                       rows_to_visit, safe_index, support_mask, vocab_size)
from . import _vocab_parallel as _vp


def log_prob_reference(hidden, weight, bias, index, temperature: float, ignore_index: int, want_entropy: bool,
                       chunk: int, want_sum_sq: bool = False, support_crow=None, support_col=None):
    """The unfused computation: logits, log_softmax, gather (and the entropy, sum p^2), over each row's support
    when one is given."""
    acc = _checks.acc_dtype(hidden.dtype)
    z = hidden.to(acc) @ weight.to(acc).t()
    if bias is not None:
        z = z + bias.to(acc)
    if support_crow is not None:
        z = support_mask(z, support_crow, support_col)
    safe, valid = safe_index(index, ignore_index)
    logp, norm, ent, sq = rows_stats_reference(z, safe, 1.0 / temperature, want_entropy, want_sum_sq)
    logp = torch.where(valid, logp, 0)
    keep = valid.any(1)
    norm = torch.where(keep[:, None], norm, 0)
    lse = norm.sum(1)
    if want_entropy:
        ent = torch.where(keep, ent, 0)
    if want_sum_sq:
        sq = torch.where(keep, sq, 0)
    return logp, lse, ent, sq, norm


def _log_prob_impl(hidden, weight, bias, index, temperature, ignore_index, want_entropy, chunk, want_sum_sq=False,
                   support_crow=None, support_col=None):
    check_head(hidden, weight, bias, index, temperature, chunk)
    V = vocab_size(weight)
    check_index_values(index, V, ignore_index)
    N, S = index.shape
    support = None
    if support_crow is not None or support_col is not None:
        if S != 1:
            raise ValueError(f"support takes one target per row, got index of shape {tuple(index.shape)}")
        support = check_support((support_crow, support_col), N, V, index[:, 0], index[:, 0] != ignore_index)
    acc = _checks.acc_dtype(hidden.dtype)
    logp = hidden.new_zeros((N, S), dtype=acc)
    norm = hidden.new_zeros((N, 2), dtype=acc)
    ent = hidden.new_zeros((N if want_entropy else 0,), dtype=acc)
    sq = hidden.new_zeros((N if want_sum_sq else 0,), dtype=acc)
    safe, valid = safe_index(index, ignore_index)
    drv = Driver(hidden, weight, bias, index, temperature, chunk, rows_to_visit(valid.any(1)), support)
    for sel, _x, slab in drv:
        lp, nm, e, q = drv.stats(slab, safe[sel].contiguous(), drv.inv_t, want_entropy, want_sum_sq)
        drv.check_rows(nm)
        logp[sel] = lp
        norm[sel] = nm
        if want_entropy:
            ent[sel] = e
        if want_sum_sq:
            sq[sel] = q
    logp.masked_fill_(~valid, 0)
    return logp, norm.sum(1), ent, sq, norm


def _log_prob_fake(hidden, weight, bias, index, temperature, ignore_index, want_entropy, chunk, want_sum_sq=False,
                   support_crow=None, support_col=None):
    check_devices(hidden, weight=weight, bias=bias, index=index, support_crow=support_crow, support_col=support_col)
    acc = _checks.acc_dtype(hidden.dtype)
    N = hidden.shape[0]
    return (hidden.new_empty(index.shape, dtype=acc), hidden.new_empty((N,), dtype=acc),
            hidden.new_empty((N if want_entropy else 0,), dtype=acc),
            hidden.new_empty((N if want_sum_sq else 0,), dtype=acc), hidden.new_empty((N, 2), dtype=acc))


def _log_prob_backward_impl(grad_logp, grad_ent, grad_lse, hidden, weight, bias, index, norm, ent, temperature,
                            ignore_index, chunk, output_mask: Sequence[bool], support_crow=None, support_col=None):
    need_x, need_w, need_b = output_mask
    acc = _checks.acc_dtype(hidden.dtype)
    safe, valid = safe_index(index, ignore_index)
    coef = torch.where(valid, grad_logp.to(acc), 0)
    rows = valid.any(1)
    # dL/dz_j = sum_s c_s [j = y_s] - (sum_s c_s - g_lse) p_j - g_H p_j (log p_j + H), over T
    p_coef = coef.sum(1)
    if grad_lse.numel():
        p_coef = p_coef - torch.where(rows, grad_lse.to(acc), 0)
    keep = (coef != 0).any(1) | (p_coef != 0)
    with_ent = grad_ent.numel() > 0
    if with_ent:
        grad_ent = grad_ent.to(acc)
        keep |= (grad_ent != 0) & rows
    support = None if support_crow is None else (support_crow, support_col)  # checked by the forward
    drv = Driver(hidden, weight, bias, index, temperature, chunk, rows_to_visit(keep), support)
    dx, dw, db = grad_buffers(hidden, weight, bias, need_x, need_w, need_b, drv)
    empty = coef.new_empty(0)
    for i, (sel, x, slab) in enumerate(drv):
        drv.grad_(slab, safe[sel].contiguous(), coef[sel].contiguous(), p_coef[sel].contiguous(),
                  grad_ent[sel].contiguous() if with_ent else empty, norm[sel].contiguous(),
                  ent[sel].contiguous() if with_ent else empty, drv.inv_t)
        part = backprop(slab, x, weight, drv.blocks, dw, db, need_x, i == 0)
        if need_x:
            dx[sel] = part.to(dx.dtype)
    if need_x:
        reduce_hidden_grad(dx)
    return (dx, dw.to(weight.dtype) if need_w else weight.new_empty(0),
            db.to(bias.dtype) if db is not None else weight.new_empty(0))


def _log_prob_backward_fake(grad_logp, grad_ent, grad_lse, hidden, weight, bias, index, norm, ent, temperature,
                            ignore_index, chunk, output_mask, support_crow=None, support_col=None):
    check_devices(hidden, weight=weight, bias=bias, index=index)
    need_x, need_w, need_b = output_mask
    return (torch.empty_like(hidden) if need_x else hidden.new_empty(0),
            torch.empty_like(weight) if need_w else weight.new_empty(0),
            torch.empty_like(bias) if (need_b and bias is not None) else weight.new_empty(0))


def _log_prob_setup(ctx, inputs, output):
    hidden, weight, bias, index, temperature, ignore_index, want_entropy, chunk = inputs[:8]
    crow, col = (inputs[9], inputs[10]) if len(inputs) > 10 else (None, None)
    _logp, _lse, ent, sq, norm = output
    ctx.mark_non_differentiable(sq, norm)
    ctx.save_for_backward(hidden, weight, bias, index, norm, ent, crow, col)
    ctx.args = (temperature, ignore_index, chunk)
    ctx.has_bias = bias is not None
    ctx.tp = _vp.current()  # the backward runs later, outside the functional's context
    ctx.set_materialize_grads(False)  # unused outputs (lse, entropy) get no zero gradient buffers


def _log_prob_formula(ctx, grad_logp, grad_lse, grad_ent, _grad_sq, _grad_norm):
    hidden, weight, bias, index, norm, ent, crow, col = ctx.saved_tensors
    temperature, ignore_index, chunk = ctx.args
    need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    nones = (None,) * 11
    if not any(need) or (grad_logp is None and grad_lse is None and grad_ent is None):
        return nones
    if grad_logp is None:
        grad_logp = torch.zeros(index.shape, dtype=norm.dtype, device=norm.device)
    if grad_ent is None or ent.numel() == 0:
        grad_ent = norm.new_empty(0)
    if grad_lse is None:
        grad_lse = norm.new_empty(0)
    with _vp.vocab_parallel(ctx.tp):
        dx, dw, db = OP.backward_op(grad_logp.contiguous(), grad_ent.contiguous(), grad_lse.contiguous(), hidden,
                                    weight, bias, index, norm, ent, temperature, ignore_index, chunk, need, crow, col)
    return (dx if need[0] else None, dw if need[1] else None, db if need[2] else None) + nones[3:]


def sample_inputs(device, dtype):
    """Valid calls: plain, with a bias and the entropy, several targets per row with ignored ones, one row, one
    vocabulary entry, and a chunk smaller than the rows (several slabs)."""
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    def i(hi, *shape):
        return torch.randint(0, hi, shape, generator=g).to(device)

    idx = i(11, 6, 2)
    idx[1, 0] = -100
    return [("plain", (t(5, 8), t(11, 8), None, i(11, 5, 1), 1.0, -100, False, 0)),
            ("bias, entropy, T", (t(5, 8), t(11, 8), t(11), i(11, 5, 1), 0.7, -100, True, 0)),
            ("2 targets, ignored", (t(6, 8), t(11, 8), None, idx, 1.0, -100, True, 0)),
            ("one row", (t(1, 4), t(3, 4), None, i(3, 1, 1), 1.0, -100, True, 0)),
            ("V = 1", (t(3, 4), t(1, 4), None, i(1, 3, 1), 1.0, -100, True, 0)),
            ("chunk 2 < N", (t(7, 8), t(11, 8), t(11), i(11, 7, 1), 1.0, -100, True, 2)),
            ("sum p^2", (t(5, 8), t(11, 8), None, idx[:5], 0.9, -100, True, 2, True)),
            ("support", (t(4, 8), t(11, 8), t(11), torch.tensor([[3], [0], [-100], [10]], device=device), 1.0, -100,
                         True, 3, True, torch.tensor([0, 3, 5, 5, 9], device=device),
                         torch.tensor([1, 3, 7, 0, 4, 2, 5, 8, 10], device=device)))]


# hidden [N, H], weight [V, H], bias [V]?, index int64 [N, S] -> (logp [N, S], lse [N], entropy [N] or [0],
# sum_pi_squared [N] or [0], norm [N, 2]) in the accumulation dtype; its backward op recomputes each slab (4 GEMMs)
OP = _registry.define_driver(
    "linear_log_prob",
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor index, float temperature, SymInt ignore_index, "
    "bool want_entropy, SymInt chunk, bool want_sum_sq=False, Tensor? support_crow=None, Tensor? support_col=None) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    _log_prob_impl, _log_prob_fake, reference=log_prob_reference, setup=_log_prob_setup, formula=_log_prob_formula,
    backward=("(Tensor grad_logp, Tensor grad_entropy, Tensor grad_lse, Tensor hidden, Tensor weight, Tensor? bias, "
              "Tensor index, Tensor norm, Tensor entropy, float temperature, SymInt ignore_index, SymInt chunk, "
              "bool[] output_mask, Tensor? support_crow=None, Tensor? support_col=None) -> (Tensor, Tensor, Tensor)",
              _log_prob_backward_impl, _log_prob_backward_fake),
    sample_inputs=sample_inputs)
linear_log_prob, linear_log_prob_backward = OP.op, OP.backward_op


def _policy(name):
    def get():
        from . import linear_policy_loss
        return getattr(linear_policy_loss, name)
    return (f"fastgrad.ops.linear_policy_loss.{name}", get)


# the policy loss lived in this module until it got its own: its names, for a release
__getattr__ = _registry.moved(__name__, {n: _policy(n) for n in ("linear_policy_loss", "token_loss", "token_loss_grad",
                                                                  "LOSSES", "KLS")})
