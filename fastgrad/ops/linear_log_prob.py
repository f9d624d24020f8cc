"""The LM head fused with the log-probability and the policy-gradient losses: the ``[tokens, vocab]`` logits never
exist; one ``[chunk, V]`` fp32 slab at a time does.

Ops (registered with fakes and autograd, so ``torch.compile(fullgraph=True)`` and ``opcheck`` see them):

* ``fastgrad::linear_log_prob(hidden [N, H], weight [V, H], bias?, index [N, S], T, ignore_index, want_entropy,
  chunk) -> (logp [N, S], lse [N], entropy [N] or [0])``; its backward ``linear_log_prob_backward`` recomputes
  each slab (4 GEMMs in all: the general path, for losses computed outside in torch).
* ``fastgrad::linear_policy_loss(...) -> (loss, logp, entropy, token_stats, dhidden, dweight, dbias)``: the loss
  and its gradients in one pass (3 GEMMs: logits, dX, dW, the design of Liger-Kernel's fused linear
  cross-entropy); the backward only scales the stored gradients by the upstream scalar.

Per token block (the driver below, shared by every backend): ``slab = x_blk @ W^T (+ b)`` in fp32 (float64 for
float64 inputs; bf16/fp16 weights are converted per vocabulary block, never a half-precision GEMM), then the
row passes (``linear_rows_stats``: logsumexp, target log-prob, entropy; ``linear_rows_grad_``: the slab
overwritten with dL/dlogits in place; C++ on the CPU, Triton on the GPU, torch otherwise), then
``dX_blk = dz W`` and ``dW += dz^T x_blk`` into an fp32 accumulator cast once at the end. Rows that carry no
loss (``index == ignore_index``, zero token weight, zero upstream gradient) are compacted out before the GEMMs:
time scales with the valid tokens. ``logp <= 0`` and ``lse`` come out in fp32.

The unfused computation (``hidden @ weight.T / T``, ``log_softmax``, ``gather``) is the oracle in the tests; the
GEMMs are ATen's (MKL/oneDNN, cuBLAS), whose reduction order may depend on the block's row count, so log-probs
agree across chunk sizes to ~1e-6, not bit for bit.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

from . import _backend, _checks

LOSSES = ("reinforce", "ppo_clip", "cispo")
KLS = ("k1", "k2", "k3")
_CPU_SLAB_BYTES = 256 << 20  # CPU: a [chunk, V] fp32 slab of about this size (chunk 128..512)
_WEIGHT_BLOCK_BYTES = 64 << 20  # half-precision weights are converted to fp32 in vocabulary blocks this large


# -- row passes -------------------------------------------------------------------------------------------------
def rows_stats_reference(slab: torch.Tensor, index: torch.Tensor, inv_t: float, want_entropy: bool):
    z = slab * inv_t
    lse = torch.logsumexp(z, -1)
    logp = z.gather(1, index) - lse[:, None]
    if want_entropy:
        p = torch.exp(z - lse[:, None])
        ent = lse - torch.where(p > 0, p * z, 0).sum(-1)  # a -inf logit (p = 0) adds nothing
    else:
        ent = slab.new_empty(0)
    return logp, lse, ent


def rows_grad_reference_(slab, index, coef, g_ent, lse, ent, inv_t: float) -> None:
    logp = slab * inv_t - lse[:, None]
    p = torch.exp(logp)
    d = -coef.sum(1, keepdim=True) * p
    if g_ent.numel():
        d -= g_ent[:, None] * torch.where(p > 0, p * (logp + ent[:, None]), 0)
    d.scatter_add_(1, index, coef)
    slab.copy_(d.mul_(inv_t))


def _row_kernels(device: torch.device):
    b = _backend.choose(device)
    if b == "cpp":
        return torch.ops.fastgrad_C.linear_rows_stats.default, torch.ops.fastgrad_C.linear_rows_grad_.default
    if b == "triton":
        from ..kernels import linear_rows

        return linear_rows.rows_stats, linear_rows.rows_grad_
    return rows_stats_reference, rows_grad_reference_  # "reference", and "cuda" (no CUDA row kernel: torch ops)


# -- GEMMs and blocking -----------------------------------------------------------------------------------------
def default_chunk(N: int, V: int, device: torch.device, memory_budget: Optional[int] = None) -> int:
    """Rows per slab: CPU ``clamp(256 MiB / 4V, 128, 512)`` rounded down to 64; GPU up to 4 chunks of at least
    2048 rows, shrunk until the slab fits ``min(2 GiB, 10 % of free memory)``; ``memory_budget`` (bytes) caps the
    slab on either. Never more than N."""
    if device.type == "cuda":
        tb = max(2048, 1 << max(0, math.ceil(math.log2(max(1, N / 4)))))
        free = torch.cuda.mem_get_info(device)[0]
        cap = min(2 << 30, free // 10) if memory_budget is None else memory_budget
        while tb > 64 and tb * V * 4 > cap:
            tb //= 2
    else:
        cap = _CPU_SLAB_BYTES if memory_budget is None else memory_budget
        tb = max(128, min(512, cap // (4 * max(1, V)) // 64 * 64))
        if memory_budget is not None:
            tb = max(1, min(tb, memory_budget // (4 * max(1, V))))
    return max(1, min(tb, N))


def _vocab_blocks(weight: torch.Tensor) -> List[Tuple[int, int]]:
    V, H = weight.shape
    vb = max(1, _WEIGHT_BLOCK_BYTES // (4 * max(1, H)))
    return [(v0, min(V, v0 + vb)) for v0 in range(0, V, vb)]


def _half_on_gpu(weight: torch.Tensor, acc: torch.dtype) -> bool:
    """bf16/fp16 on CUDA: tensor-core GEMMs with fp32 outputs (``out_dtype``) instead of converting to fp32."""
    return weight.device.type == "cuda" and weight.dtype in (torch.bfloat16, torch.float16) and acc == torch.float32


def _logits_into(slab: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 blocks) -> None:
    """slab = x W^T (+ b) in the slab's dtype; ``x`` is in the accumulation dtype, or the weight's on a GPU."""
    acc = slab.dtype
    if weight.dtype == acc:
        torch.mm(x, weight.t(), out=slab)
    elif _half_on_gpu(weight, acc):
        torch.mm(x, weight.t(), out_dtype=acc, out=slab)
    else:  # half-precision weights on the CPU: converted one vocabulary block at a time, the GEMM in fp32
        for v0, v1 in blocks:
            slab[:, v0:v1] = x @ weight[v0:v1].to(acc).t()
    if bias is not None:
        slab += bias.to(acc)


def _backprop(dz: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, blocks, dw: Optional[torch.Tensor],
              db: Optional[torch.Tensor], need_x: bool, first: bool) -> Optional[torch.Tensor]:
    """dz [M, V] -> dX [M, H] (when need_x); dW [V, H] and db [V] accumulated in place (fp32), or written by the
    first block (``first``: no zero-fill pass over dW)."""
    dx = None
    if _half_on_gpu(weight, dz.dtype):
        # as torch's own bf16 backward does, dz enters the GEMMs in the weight's dtype; dW accumulates in fp32
        d = dz.to(weight.dtype)
        if need_x:
            dx = d @ weight
        if dw is not None:
            if first:
                torch.mm(d.t(), x, out_dtype=dw.dtype, out=dw)
            else:
                torch.addmm(dw, d.t(), x, out_dtype=dw.dtype, out=dw)
    else:
        same = weight.dtype == dz.dtype
        for v0, v1 in ([(0, weight.shape[0])] if same else blocks):
            d = dz if same else dz[:, v0:v1]
            wb = weight if same else weight[v0:v1].to(dz.dtype)
            if need_x:
                part = d @ wb
                dx = part if dx is None else dx.add_(part)
            if dw is not None:
                if first:
                    torch.mm(d.t(), x, out=dw[v0:v1])
                else:
                    dw[v0:v1].addmm_(d.t(), x)
    if db is not None:
        if first:
            torch.sum(dz, 0, out=db)
        else:
            db += dz.sum(0)
    return dx


class _Driver:
    """The per-call state: rows to visit, their blocks, one reusable slab, the row kernels."""

    def __init__(self, hidden, weight, bias, index, temperature, chunk, rows: Optional[torch.Tensor]):
        self.hidden, self.weight, self.bias, self.index = hidden, weight, bias, index
        self.acc = _checks.acc_dtype(hidden.dtype)
        self.inv_t = 1.0 / temperature
        self.blocks = _vocab_blocks(weight)
        self.half_gpu = _half_on_gpu(weight, self.acc)
        self.rows = rows  # None: every row
        M = hidden.shape[0] if rows is None else rows.numel()
        V = weight.shape[0]
        self.M = M
        self.tb = chunk if chunk > 0 else default_chunk(M, V, hidden.device)
        self.slab_buf = hidden.new_empty((min(self.tb, M), V), dtype=self.acc) if M else None
        self.stats, self.grad_ = _row_kernels(hidden.device)

    def __iter__(self):
        """(row ids or a slice, x_blk in the accumulation dtype, slab with the block's logits)."""
        for b0 in range(0, self.M, self.tb):
            b1 = min(self.M, b0 + self.tb)
            if self.rows is None:
                sel = slice(b0, b1)
                x = self.hidden[sel]
            else:
                sel = self.rows[b0:b1]
                x = self.hidden.index_select(0, sel)
            x = x.to(self.weight.dtype if self.half_gpu else self.acc)
            slab = self.slab_buf[: b1 - b0]
            _logits_into(slab, x, self.weight, self.bias, self.blocks)
            yield sel, x, slab

    def check_rows(self, lse: torch.Tensor) -> None:
        if not bool(torch.isfinite(lse).all()):
            raise ValueError("hidden, weight and bias must be finite: a row's logits contain NaN or inf")


def _grad_buffers(hidden, weight, bias, need_x: bool, need_w: bool, need_b: bool, drv: "_Driver"):
    """dX (zeros unless every row is visited), and the fp32 dW / db accumulators: written by the first block,
    zeros only when no row is visited."""
    acc = drv.acc
    if need_x:
        dx = torch.empty_like(hidden) if drv.rows is None else torch.zeros_like(hidden)
    else:
        dx = hidden.new_empty(0)
    alloc = torch.empty if drv.M else torch.zeros
    dw = alloc(weight.shape, dtype=acc, device=weight.device) if need_w else None
    db = alloc(weight.shape[:1], dtype=acc, device=weight.device) if (need_b and bias is not None) else None
    return dx, dw, db


def _rows_to_visit(keep: torch.Tensor) -> Optional[torch.Tensor]:
    """None when every row is kept (no gather), else the kept rows' ids."""
    if bool(keep.all()):
        return None
    return keep.nonzero().squeeze(1)


def _safe_index(index: torch.Tensor, ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    valid = index != ignore_index
    return torch.where(valid, index, 0), valid


# -- linear_log_prob ------------------------------------------------------------------------------------------
def _check_head(hidden, weight, bias, index, temperature, chunk: int, index_dim: int = 2) -> None:
    _checks.tensor(hidden, "hidden", 2)
    _checks.tensor(weight, "weight", 2)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must have shape [V, H] with H = {hidden.shape[1]} (hidden's last dim), got "
                         f"{tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one row (V >= 1)")
    _checks.same_device("weight", weight, hidden)
    if bias is not None:
        _checks.tensor(bias, "bias", 1)
        _checks.shape(bias, "bias", weight.shape[:1], "[V]")
        _checks.same_device("bias", bias, hidden)
    _checks.tensor(index, "index", index_dim, (torch.int64,))
    if index.shape[0] != hidden.shape[0]:
        raise ValueError(f"index must have {hidden.shape[0]} rows (hidden's), got shape {tuple(index.shape)}")
    _checks.same_device("index", index, hidden)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite float, got {temperature!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
        raise ValueError(f"chunk_size must be a positive int (0 or None: chosen from the memory budget), got {chunk!r}")


def _check_index_values(index: torch.Tensor, V: int, ignore_index: int) -> None:
    if _checks._skip_values(index):
        return
    bad = (index != ignore_index) & ((index < 0) | (index >= V))
    if bool(bad.any()):
        raise ValueError(f"index must lie in [0, {V}) or equal ignore_index = {ignore_index}")


def log_prob_reference(hidden, weight, bias, index, temperature: float, ignore_index: int, want_entropy: bool,
                       chunk: int):
    """The unfused computation: logits, log_softmax, gather (and the entropy)."""
    acc = _checks.acc_dtype(hidden.dtype)
    z = hidden.to(acc) @ weight.to(acc).t()
    if bias is not None:
        z = z + bias.to(acc)
    safe, valid = _safe_index(index, ignore_index)
    logp, lse, ent = rows_stats_reference(z, safe, 1.0 / temperature, want_entropy)
    logp = torch.where(valid, logp, 0)
    keep = valid.any(1)
    lse = torch.where(keep, lse, 0)
    if want_entropy:
        ent = torch.where(keep, ent, 0)
    return logp, lse, ent


def _log_prob_impl(hidden, weight, bias, index, temperature, ignore_index, want_entropy, chunk):
    _check_head(hidden, weight, bias, index, temperature, chunk)
    V = weight.shape[0]
    _check_index_values(index, V, ignore_index)
    N, S = index.shape
    acc = _checks.acc_dtype(hidden.dtype)
    logp = hidden.new_zeros((N, S), dtype=acc)
    lse = hidden.new_zeros((N,), dtype=acc)
    ent = hidden.new_zeros((N if want_entropy else 0,), dtype=acc)
    safe, valid = _safe_index(index, ignore_index)
    drv = _Driver(hidden, weight, bias, index, temperature, chunk, _rows_to_visit(valid.any(1)))
    for sel, _x, slab in drv:
        lp, l, e = drv.stats(slab, safe[sel].contiguous(), drv.inv_t, want_entropy)
        drv.check_rows(l)
        logp[sel] = lp
        lse[sel] = l
        if want_entropy:
            ent[sel] = e
    logp.masked_fill_(~valid, 0)
    return logp, lse, ent


def _log_prob_fake(hidden, weight, bias, index, temperature, ignore_index, want_entropy, chunk):
    acc = _checks.acc_dtype(hidden.dtype)
    N = hidden.shape[0]
    return (hidden.new_empty(index.shape, dtype=acc), hidden.new_empty((N,), dtype=acc),
            hidden.new_empty((N if want_entropy else 0,), dtype=acc))


def _log_prob_backward_impl(grad_logp, grad_ent, hidden, weight, bias, index, lse, ent, temperature, ignore_index,
                            chunk, output_mask: Sequence[bool]):
    need_x, need_w, need_b = output_mask
    acc = _checks.acc_dtype(hidden.dtype)
    safe, valid = _safe_index(index, ignore_index)
    coef = torch.where(valid, grad_logp.to(acc), 0)
    with_ent = grad_ent.numel() > 0
    keep = (coef != 0).any(1)
    if with_ent:
        grad_ent = grad_ent.to(acc)
        keep |= (grad_ent != 0) & valid.any(1)
    drv = _Driver(hidden, weight, bias, index, temperature, chunk, _rows_to_visit(keep))
    dx, dw, db = _grad_buffers(hidden, weight, bias, need_x, need_w, need_b, drv)
    empty = coef.new_empty(0)
    for i, (sel, x, slab) in enumerate(drv):
        drv.grad_(slab, safe[sel].contiguous(), coef[sel].contiguous(),
                  grad_ent[sel].contiguous() if with_ent else empty, lse[sel].contiguous(),
                  ent[sel].contiguous() if with_ent else empty, drv.inv_t)
        part = _backprop(slab, x, weight, drv.blocks, dw, db, need_x, i == 0)
        if need_x:
            dx[sel] = part.to(dx.dtype)
    return (dx, dw.to(weight.dtype) if need_w else weight.new_empty(0),
            db.to(bias.dtype) if db is not None else weight.new_empty(0))


def _log_prob_backward_fake(grad_logp, grad_ent, hidden, weight, bias, index, lse, ent, temperature, ignore_index,
                            chunk, output_mask):
    need_x, need_w, need_b = output_mask
    return (torch.empty_like(hidden) if need_x else hidden.new_empty(0),
            torch.empty_like(weight) if need_w else weight.new_empty(0),
            torch.empty_like(bias) if (need_b and bias is not None) else weight.new_empty(0))


linear_log_prob = torch.library.custom_op(
    "fastgrad::linear_log_prob", _log_prob_impl, mutates_args=(),
    schema="(Tensor hidden, Tensor weight, Tensor? bias, Tensor index, float temperature, int ignore_index, "
           "bool want_entropy, int chunk) -> (Tensor, Tensor, Tensor)")
linear_log_prob.register_fake(_log_prob_fake)
linear_log_prob_backward = torch.library.custom_op(
    "fastgrad::linear_log_prob_backward", _log_prob_backward_impl, mutates_args=(),
    schema="(Tensor grad_logp, Tensor grad_entropy, Tensor hidden, Tensor weight, Tensor? bias, Tensor index, "
           "Tensor lse, Tensor entropy, float temperature, int ignore_index, int chunk, bool[] output_mask) -> "
           "(Tensor, Tensor, Tensor)")
linear_log_prob_backward.register_fake(_log_prob_backward_fake)


def _log_prob_setup(ctx, inputs, output):
    hidden, weight, bias, index, temperature, ignore_index, want_entropy, chunk = inputs
    _logp, lse, ent = output
    ctx.save_for_backward(hidden, weight, bias, index, lse, ent)
    ctx.args = (temperature, ignore_index, chunk)
    ctx.has_bias = bias is not None
    ctx.set_materialize_grads(False)  # unused outputs (lse, entropy) get no zero gradient buffers


def _log_prob_formula(ctx, grad_logp, _grad_lse, grad_ent):
    hidden, weight, bias, index, lse, ent = ctx.saved_tensors
    temperature, ignore_index, chunk = ctx.args
    need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    if not any(need):
        return None, None, None, None, None, None, None, None
    if grad_logp is None:
        grad_logp = torch.zeros(index.shape, dtype=lse.dtype, device=lse.device)
    if grad_ent is None or ent.numel() == 0:
        grad_ent = lse.new_empty(0)
    dx, dw, db = linear_log_prob_backward(grad_logp.contiguous(), grad_ent.contiguous(), hidden, weight, bias,
                                          index, lse, ent, temperature, ignore_index, chunk, need)
    return (dx if need[0] else None, dw if need[1] else None, db if need[2] else None,
            None, None, None, None, None)


linear_log_prob.register_autograd(_log_prob_formula, setup_context=_log_prob_setup)


# -- linear_policy_loss ---------------------------------------------------------------------------------------
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
    if loss == "reinforce":
        ratio = torch.ones_like(logp)
        l_t = -advantages * logp
        clipped = torch.zeros_like(logp)
    elif loss == "cispo":
        old = logp.detach() if old_logp is None else old_logp
        ratio = torch.exp(logp.detach() - old)
        l_t = -ratio.clamp(1 - eps_low, 1 + eps_high) * advantages * logp
        clipped = ((ratio < 1 - eps_low) | (ratio > 1 + eps_high)).to(logp.dtype)
    else:
        old = logp.detach() if old_logp is None else old_logp
        ratio = torch.exp(logp - old)
        clip = ratio.clamp(1 - eps_low, 1 + eps_high)
        l_t = -torch.minimum(ratio * advantages, clip * advantages)
        clipped = ((ratio < 1 - eps_low) & (advantages < 0)) | ((ratio > 1 + eps_high) & (advantages > 0))
        if clip_ratio_c:
            cap = -clip_ratio_c * advantages
            dual = (advantages < 0) & (l_t > cap)
            l_t = torch.where(dual, cap, l_t)
            clipped = clipped | dual
        clipped = clipped.to(logp.dtype)
    kl_t = torch.zeros_like(logp)
    if ref_logp is not None:
        d = logp - ref_logp
        kl_t = d if kl == "k1" else (0.5 * d * d if kl == "k2" else torch.exp(-d) + d - 1)
        if beta != 0:
            l_t = l_t + beta * kl_t
    if entropy_coef != 0:
        l_t = l_t - entropy_coef * entropy
    return l_t, torch.stack([kl_t.detach(), clipped, ratio.detach()])


def token_loss_grad(logp: torch.Tensor, advantages: torch.Tensor, old_logp: Optional[torch.Tensor],
                    ref_logp: Optional[torch.Tensor], loss: str, eps_low: float, eps_high: float, beta: float,
                    kl: str, entropy_coef: float, clip_ratio_c: float = 0.0) -> Tuple[torch.Tensor, float]:
    """``(dl_t/dlogp [n], dl_t/dH)`` of :func:`token_loss` in closed form (the ops run below autograd; the tests
    check these against autograd through :func:`token_loss`)."""
    if loss == "reinforce":
        c = -advantages
    elif loss == "cispo":
        old = logp if old_logp is None else old_logp
        c = -advantages * torch.exp(logp - old).clamp(1 - eps_low, 1 + eps_high)
    else:
        old = logp if old_logp is None else old_logp
        ratio = torch.exp(logp - old)
        clip = ratio.clamp(1 - eps_low, 1 + eps_high)
        # -min(rA, clip(r)A): the unclipped branch carries -A r; the clipped one is constant in logp
        c = torch.where(ratio * advantages <= clip * advantages, -advantages * ratio, 0)
        if clip_ratio_c:  # the dual clip's cap -c A is constant in logp
            ppo = -torch.minimum(ratio * advantages, clip * advantages)
            c = torch.where((advantages < 0) & (ppo > -clip_ratio_c * advantages), 0, c)
    if ref_logp is not None and beta != 0:
        d = logp - ref_logp
        c = c + beta * (torch.ones_like(d) if kl == "k1" else (d if kl == "k2" else 1 - torch.exp(-d)))
    return c, -entropy_coef


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
    _check_head(hidden, weight, bias, index, temperature, chunk, index_dim=1)
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
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if kl not in KLS:
        raise ValueError(f"kl must be one of {KLS}, got {kl!r}")
    _check_index_values(index, V, ignore_index)
    need_x, need_w, need_b = output_mask
    safe, valid = _safe_index(index, ignore_index)
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
    drv = _Driver(hidden, weight, bias, index, temperature, chunk, _rows_to_visit(w != 0))
    dx, dw, db = _grad_buffers(hidden, weight, bias, need_x, need_w, need_b, drv)
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
        part = _backprop(slab, x, weight, drv.blocks, dw, db, need_x, i == 0)
        if need_x:
            dx[sel] = part.to(dx.dtype)
    return (total, logp, ent, stats, dx, dw.to(weight.dtype) if need_w else weight.new_empty(0),
            db.to(bias.dtype) if db is not None else weight.new_empty(0))


def _policy_fake(hidden, weight, bias, index, advantages, token_weight, old_logp, ref_logp, temperature,
                 ignore_index, loss, eps_low, eps_high, beta, kl, entropy_coef, want_entropy, chunk, output_mask,
                 clip_ratio_c=0.0):
    acc = _checks.acc_dtype(hidden.dtype)
    N = hidden.shape[0]
    need_x, need_w, need_b = output_mask
    want_entropy = bool(want_entropy) or entropy_coef != 0
    return (hidden.new_empty((), dtype=acc), hidden.new_empty((N,), dtype=acc),
            hidden.new_empty((N if want_entropy else 0,), dtype=acc), hidden.new_empty((3, N), dtype=acc),
            torch.empty_like(hidden) if need_x else hidden.new_empty(0),
            torch.empty_like(weight) if need_w else weight.new_empty(0),
            torch.empty_like(bias) if (need_b and bias is not None) else weight.new_empty(0))


linear_policy_loss = torch.library.custom_op(
    "fastgrad::linear_policy_loss", _policy_impl, mutates_args=(),
    schema="(Tensor hidden, Tensor weight, Tensor? bias, Tensor index, Tensor advantages, Tensor token_weight, "
           "Tensor? old_logp, Tensor? ref_logp, float temperature, int ignore_index, str loss, float eps_low, "
           "float eps_high, float beta, str kl, float entropy_coef, bool want_entropy, int chunk, "
           "bool[] output_mask, float clip_ratio_c=0.0) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
linear_policy_loss.register_fake(_policy_fake)


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


linear_policy_loss.register_autograd(_policy_formula, setup_context=_policy_setup)
