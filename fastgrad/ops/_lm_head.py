"""The driver of the fused LM head, shared by its two ops (:mod:`.linear_log_prob`, :mod:`.linear_policy_loss`)
and every backend: the ``[tokens, vocab]`` logits never exist; one ``[chunk, V]`` fp32 slab at a time does.

Ops (registered with fakes and autograd, so ``torch.compile(fullgraph=True)`` and ``opcheck`` see them):

* ``fastgrad::linear_log_prob(hidden [N, H], weight [V, H], bias?, index [N, S], T, ignore_index, want_entropy,
  chunk) -> (logp [N, S], lse [N], entropy [N] or [0])``; its backward ``linear_log_prob_backward`` recomputes
  each slab (4 GEMMs in all: the general path, for losses computed outside in torch).
* ``fastgrad::linear_policy_loss(...) -> (loss, logp, entropy, token_stats, dhidden, dweight, dbias)``: the loss
  and its gradients in one pass (3 GEMMs: logits, dX, dW, the design of Liger-Kernel's fused linear
  cross-entropy); the backward only scales the stored gradients by the upstream scalar.

Per token block (the driver below, shared by every backend): ``slab = x_blk @ W^T (+ b)`` in fp32 (float64 for
float64 inputs; bf16/fp16 weights are converted per vocabulary block, never a half-precision GEMM), then the
row passes (``linear_rows_stats``: the row max and the log-sum-exp relative to it, target log-probs, entropy,
``sum p^2``; ``linear_rows_grad_``: the slab overwritten with dL/dlogits in place; C++ on the CPU, Triton on the
GPU, torch otherwise), then
``dX_blk = dz W`` and ``dW += dz^T x_blk`` into an fp32 accumulator cast once at the end. Rows that carry no
loss (``index == ignore_index``, zero token weight, zero upstream gradient) are compacted out before the GEMMs:
time scales with the valid tokens. ``logp <= 0`` and ``lse`` come out in fp32.

The unfused computation (``hidden @ weight.T / T``, ``log_softmax``, ``gather``) is the oracle in the tests; the
GEMMs are ATen's (MKL/oneDNN, cuBLAS). On the CPU, blocks below 16 rows are padded so that no small-M GEMM kernel
runs: a token's log-prob is then the same bits whatever the chunk size or the batch (where the probe
:func:`cpu_gemm_rows_independent` holds); on a GPU, ~1e-6.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from typing import List, Optional, Tuple

import torch

from . import _backend, _checks
from . import _vocab_parallel as _vp

_CPU_SLAB_BYTES = 256 << 20  # CPU: a [chunk, V] fp32 slab of about this size (chunk 128..512)
_WEIGHT_BLOCK_BYTES = 64 << 20  # half-precision weights are converted to fp32 in vocabulary blocks this large


# -- row passes -------------------------------------------------------------------------------------------------
def rows_stats_reference(slab: torch.Tensor, index: torch.Tensor, inv_t: float, want_entropy: bool,
                         want_sum_sq: bool = False):
    """``(logp [M, S], norm [M, 2], entropy [M] or [0], sum p^2 [M] or [0])`` of the slab's rows, ``norm`` holding
    the row max of ``z = slab / T`` and ``log sum exp(z - max)`` (their sum is the lse)."""
    # everything relative to the row max (as the C++ and Triton passes): z - lse loses ulp(lse), and the entropy
    # as lse - sum p z loses eps z^2
    z = slab * inv_t
    mx = z.amax(-1, keepdim=True)
    d = torch.where(torch.isfinite(mx), z - mx, z)  # an all -inf row keeps its NaN/inf (the driver refuses it)
    ls = torch.logsumexp(d, -1)
    norm = torch.stack([mx.squeeze(-1), ls], 1)
    logp = (d.gather(1, index) - ls[:, None]).clamp(max=0)
    p = torch.exp(d - ls[:, None]) if (want_entropy or want_sum_sq) else None
    # p = 0 (a -inf logit) adds nothing, and no 0 * inf in autograd either
    ent = ls - (p * torch.where(p > 0, d, 0)).sum(-1) if want_entropy else slab.new_empty(0)
    sq = (p * p).sum(-1) if want_sum_sq else slab.new_empty(0)
    return logp, norm, ent, sq


def rows_grad_reference_(slab, index, coef, p_coef, g_ent, norm, ent, inv_t: float) -> None:
    logp = (slab * inv_t - norm[:, :1]) - norm[:, 1:]
    p = torch.exp(logp)
    d = -p_coef[:, None] * p
    if g_ent.numel():
        d -= g_ent[:, None] * torch.where(p > 0, p * (logp + ent[:, None]), 0)
    d.scatter_add_(1, index, coef)
    slab.copy_(d.mul_(inv_t))


def row_kernels(device: torch.device):
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


_CPU_BF16_PLAN: dict = {}
BF16_MIN_SPEEDUP = 1.3  # bf16 gradient GEMMs where a bf16 mm is at least this much faster than fp32
BF32_MIN_SPEEDUP = 1 / 0.9  # oneDNN's bf16 arithmetic for the logits GEMM where it is at least this much faster


def cpu_bf16_plan() -> dict:
    """How bf16 LM heads run on this CPU, decided once per process by measuring (``FASTGRAD_CPU_BF16`` = ``bf16`` or
    ``fp32`` forces it): ``{"grads": "bf16" | "fp32", "logits": "bf32" | "fp32", "speedup": bf16/fp32 GEMM}``.
    The bf32 logits flip the process-wide ``torch.backends.mkldnn.matmul.fp32_precision`` around the LM head's own
    GEMMs (and back): an fp32 matmul another thread runs at that moment would use bf16 arithmetic too.

    ``grads="bf16"`` where a bf16 ``torch.mm`` beats fp32 by 1.3x or more (AVX512-BF16 or AMX through oneDNN): dX and
    dW are bf16 GEMMs of ``dL/dlogits`` rounded to bf16, as torch's own bf16 backward computes them, each token
    block's dW added into the fp32 accumulator. The logits GEMM must keep fp32 outputs (a bf16 output loses 2e-3 of
    every log-prob) and ATen exposes no fast bf16-input fp32-output CPU GEMM, so the logits use the converted fp32
    weight block, through
    oneDNN's bf16 arithmetic (``fp32_precision="bf16"``, exact: the inputs are bf16 values, products are exact in
    fp32) where that measured faster than the fp32 GEMM (``logits="bf32"``), else the fp32 GEMM."""
    if _CPU_BF16_PLAN:
        return _CPU_BF16_PLAN
    force = os.environ.get("FASTGRAD_CPU_BF16", "auto")
    if force not in ("auto", "bf16", "fp32"):
        raise ValueError(f"FASTGRAD_CPU_BF16 must be auto, bf16 or fp32, got {force!r}")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(256, 1024, generator=g)
    b = torch.randn(1024, 2048, generator=g)
    ab, bb = a.bfloat16(), b.bfloat16()
    mk = torch.backends.mkldnn.matmul

    def best(f, reps=3):
        f()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    t32 = best(lambda: a @ b)
    t16 = best(lambda: ab @ bb)
    prev = getattr(mk, "fp32_precision", None)
    tb32 = math.inf  # an ATen without oneDNN's bf16 arithmetic for fp32 GEMMs
    if prev is not None:
        try:
            mk.fp32_precision = "bf16"
            tb32 = best(lambda: a @ b)
        except Exception:
            pass
        finally:
            mk.fp32_precision = prev
    speedup = t32 / t16
    grads = force if force != "auto" else ("bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32")
    logits = "bf32" if (grads == "bf16" and t32 / tb32 > BF32_MIN_SPEEDUP) else "fp32"
    _CPU_BF16_PLAN.update(grads=grads, logits=logits, speedup=round(speedup, 2), bf32_speedup=round(t32 / tb32, 2))
    return _CPU_BF16_PLAN


@contextlib.contextmanager
def _bf32(on: bool):
    """oneDNN's bf16 arithmetic for fp32 GEMMs inside the block (exact for inputs that are bf16 values)."""
    if not on:
        yield
        return
    mk = torch.backends.mkldnn.matmul
    prev = mk.fp32_precision
    mk.fp32_precision = "bf16"
    try:
        yield
    finally:
        mk.fp32_precision = prev


_MIN_GEMM_ROWS = 16  # CPU blocks of fewer rows are padded to this many before the logits GEMM
_ROW_INDEPENDENT: dict = {}


def cpu_gemm_rows_independent() -> bool:
    """Whether this CPU's fp32 GEMM computes each row of ``x @ W^T`` bit for bit the same whatever the number of rows
    ``M >= 16`` in the call and the row's position (MKL/oneDNN do, except small-M kernels below 8 rows on the
    machines measured), probed once per process. Where it holds, the CPU log-probs of a token do not depend on
    ``chunk_size`` or on which other tokens share the batch: blocks below 16 rows are padded to 16."""
    if "fp32" not in _ROW_INDEPENDENT:
        g = torch.Generator().manual_seed(0)
        # bf16 values, so that the same probe covers the bf16 plan's GEMM (oneDNN's bf16 arithmetic) exactly
        x = torch.randn(600, 1024, generator=g).bfloat16().float()
        w = torch.randn(700, 1024, generator=g).bfloat16().float()
        ok = True
        for bf32 in (False, True) if cpu_bf16_plan()["logits"] == "bf32" else (False,):
            with _bf32(bf32):
                full = x @ w.t()
                ok &= all(torch.equal(x[a:a + m] @ w.t(), full[a:a + m])
                          for a, m in ((0, 16), (3, 17), (5, 31), (1, 64), (7, 200), (0, 512)))
        _ROW_INDEPENDENT["fp32"] = bool(ok)
    return _ROW_INDEPENDENT["fp32"]


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
        bf32 = weight.dtype == torch.bfloat16 and acc == torch.float32 and cpu_bf16_plan()["logits"] == "bf32"
        with _bf32(bf32):
            for v0, v1 in blocks:
                slab[:, v0:v1] = x @ weight[v0:v1].to(acc).t()
    if bias is not None:
        slab += bias.to(acc)


def backprop(dz: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, blocks, dw: Optional[torch.Tensor],
              db: Optional[torch.Tensor], need_x: bool, first: bool) -> Optional[torch.Tensor]:
    """dz [M, V] -> dX [M, H] (when need_x); dW [V, H] and db [V] accumulated in place (fp32), or written by the
    first block (``first``: no zero-fill pass over dW)."""
    dx = None
    if _bf16_grads_on_cpu(weight, dz.dtype):
        # bf16 GEMMs on the CPU's bf16 units: dz rounded to bf16 as torch's bf16 backward does; each token block's
        # dW (bf16 output, one vocabulary block at a time) added into the fp32 accumulator: accumulating in bf16
        # would round once per token block (1.75x torch's error at 128 blocks)
        d = dz.to(weight.dtype)
        if need_x:
            dx = d @ weight
        if dw is not None:
            xb = x.to(weight.dtype)  # exact: x holds bf16 values
            for v0, v1 in blocks:
                part = torch.mm(d[:, v0:v1].t(), xb)
                if first:
                    dw[v0:v1].copy_(part)
                else:
                    dw[v0:v1] += part
    elif _half_on_gpu(weight, dz.dtype):
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


def _bf16_grads_on_cpu(weight: torch.Tensor, acc: torch.dtype) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and acc == torch.float32
            and cpu_bf16_plan()["grads"] == "bf16")


# -- sampling-support replay: the row passes over each token's kept vocabulary ids only ---------------------------
def support_rows(crow: torch.Tensor, col: torch.Tensor, sel, V: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """For the block's rows ``sel`` (a slice or row ids) of the CSR support ``(crow [N + 1], col [nnz])``: each kept
    entry's block row ``seg`` and its offset ``flat = seg * V + col`` into the block's slab."""
    rows = torch.arange(sel.start, sel.stop, device=crow.device) if isinstance(sel, slice) else sel
    starts = crow[rows]
    lens = crow[rows + 1] - starts
    seg = torch.repeat_interleave(torch.arange(rows.numel(), device=crow.device), lens)
    first = torch.cumsum(lens, 0) - lens  # each row's first entry in the block's list
    pos = torch.arange(seg.numel(), device=crow.device) - first[seg] + starts[seg]
    return seg, seg * V + col[pos]


def support_stats(slab, index, inv_t: float, want_entropy: bool, want_sum_sq: bool, seg, flat):
    """:func:`rows_stats_reference` over each row's support: the max, the log-sum-exp, the entropy and ``sum p^2``
    of the renormalized distribution; the [M, V] rest of the slab is never read."""
    M = slab.shape[0]
    zs = slab.view(-1)[flat] * inv_t
    mx = zs.new_full((M,), -math.inf).scatter_reduce_(0, seg, zs, "amax")
    d = zs - mx[seg]
    e = torch.exp(d)
    s = zs.new_zeros(M).index_add_(0, seg, e)
    ls = torch.log(s)
    logp = ((slab.gather(1, index) * inv_t - mx[:, None]) - ls[:, None]).clamp(max=0)
    ent = ls - zs.new_zeros(M).index_add_(0, seg, e * d) / s if want_entropy else slab.new_empty(0)
    sq = zs.new_zeros(M).index_add_(0, seg, e * e) / (s * s) if want_sum_sq else slab.new_empty(0)
    return logp, torch.stack([mx, ls], 1), ent, sq


def support_grad_(slab, index, coef, p_coef, g_ent, norm, ent, inv_t: float, seg, flat) -> None:
    """:func:`rows_grad_reference_` over each row's support; zero elsewhere (a logit outside the support has no
    influence on the renormalized log-probs)."""
    zs = slab.view(-1)[flat] * inv_t
    lp = (zs - norm[seg, 0]) - norm[seg, 1]
    p = torch.exp(lp)
    dv = -p_coef[seg] * p
    if g_ent.numel():
        dv -= g_ent[seg] * torch.where(p > 0, p * (lp + ent[seg]), 0)
    slab.zero_()
    slab.view(-1)[flat] = dv * inv_t
    slab.scatter_add_(1, index, coef * inv_t)


def support_mask(z: torch.Tensor, crow: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """-inf outside each row's support (the oracle's [N, V] mask; the op never builds it). A row with an empty
    support (a token without a loss) stays whole, so that it holds no NaN."""
    rows = torch.repeat_interleave(torch.arange(z.shape[0], device=z.device), crow.diff())
    keep = torch.zeros_like(z, dtype=torch.bool)
    keep[rows, col] = True
    keep[crow.diff() == 0] = True
    return z.masked_fill(~keep, -math.inf)


def check_support(support, N: int, V: int, index: torch.Tensor, valid: torch.Tensor):
    """``support = (crow_indices int64 [N + 1], col_indices int64 [nnz])``: per token the kept vocabulary ids,
    sorted and unique (vLLM's top-k / top-p support), containing the token's target. Returns the two tensors."""
    if not (isinstance(support, (tuple, list)) and len(support) == 2
            and all(isinstance(t, torch.Tensor) for t in support)):
        raise TypeError("support must be a pair (crow_indices, col_indices) of int64 tensors (CSR over the tokens)")
    crow, col = support
    for name, t in (("support's crow_indices", crow), ("support's col_indices", col)):
        if t.dtype != torch.int64 or t.dim() != 1:
            raise TypeError(f"{name} must be a 1-D int64 tensor, got {t.dtype} of shape {tuple(t.shape)}")
        _checks.same_device(name, t, index, "the tokens'")
    if crow.numel() != N + 1:
        raise ValueError(f"support's crow_indices must have N + 1 = {N + 1} entries (one row per token), got "
                         f"{crow.numel()}")
    lens = crow.diff()
    if int(crow[0]) != 0 or bool((lens < 0).any()) or int(crow[-1]) != col.numel():
        raise ValueError("support's crow_indices must start at 0, never decrease and end at len(col_indices)")
    if col.numel() and (bool((col < 0).any()) or bool((col >= V).any())):
        raise ValueError(f"support's col_indices must lie in [0, {V})")
    seg = torch.repeat_interleave(torch.arange(N, device=col.device), lens)
    if col.numel() > 1 and not bool(((col[1:] > col[:-1]) | (seg[1:] != seg[:-1])).all()):
        raise ValueError("support's col_indices must be sorted and unique within each token's row")
    hit = torch.zeros(N, dtype=torch.int64, device=col.device).index_add_(0, seg, (col == index[seg]).long())
    if bool((valid & (hit == 0)).any()):
        t = int((valid & (hit == 0)).nonzero()[0])
        raise ValueError(f"every target must lie in its token's support: token {t}'s target {int(index[t])} does not")
    return crow.contiguous(), col.contiguous()


def _tp_rows(tp, stats, grad_):
    def tp_stats(slab, index, inv_t, want_entropy, want_sum_sq):
        loc, owned = _vp.local_index(tp, index)
        lp, norm, ent, sq = stats(slab, loc, inv_t, want_entropy, want_sum_sq)
        return _vp.merge_stats(tp, lp, norm, ent, sq, owned, want_entropy, want_sum_sq)

    def tp_grad_(slab, index, coef, p_coef, g_ent, norm, ent, inv_t):
        loc, owned = _vp.local_index(tp, index)
        grad_(slab, loc, torch.where(owned, coef, 0), p_coef, g_ent, norm, ent, inv_t)

    return tp_stats, tp_grad_


def vocab_size(weight: torch.Tensor) -> int:
    """The whole vocabulary's size: the weight's rows, or the group's under a vocabulary-parallel head."""
    tp = _vp.current()
    return weight.shape[0] if tp is None else tp.v_global


def reduce_hidden_grad(dx: torch.Tensor) -> None:
    """Under a vocabulary-parallel head, dX summed over the group (unless the caller reduces it itself)."""
    tp = _vp.current()
    if tp is not None and tp.reduce_hidden_grad and dx.numel():
        import torch.distributed as dist

        tp.all_reduce(dx, dist.ReduceOp.SUM)


class Driver:
    """The per-call state: rows to visit, their blocks, one reusable slab, the row kernels (or, with a sampling
    support, the row passes over each token's support)."""

    def __init__(self, hidden, weight, bias, index, temperature, chunk, rows: Optional[torch.Tensor],
                 support: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
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
        # CPU: no logits GEMM of fewer than 16 rows (a small-M BLAS kernel sums in another order), so that a token's
        # log-prob does not depend on the chunk size or on the other tokens of the batch
        self.pad = hidden.device.type == "cpu" and cpu_gemm_rows_independent()
        rows_buf = max(min(self.tb, M), _MIN_GEMM_ROWS if self.pad else 0)
        self.slab_buf = hidden.new_empty((rows_buf, V), dtype=self.acc) if M else None
        self.stats, self.grad_ = row_kernels(hidden.device)
        self.tp = _vp.current()
        if support is not None and self.tp is not None:  # this rank's columns of each token's support
            support = _vp.local_support(self.tp, *support)
        self.support = support
        self._seg = self._flat = None
        if support is not None:
            self.stats = lambda *a: support_stats(*a, self._seg, self._flat)
            self.grad_ = lambda *a: support_grad_(*a, self._seg, self._flat)
        if self.tp is not None:  # a vocabulary shard: local row passes, merged over the group (O(1) per token)
            self.stats, self.grad_ = _tp_rows(self.tp, self.stats, self.grad_)

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
            m = b1 - b0
            if self.pad and m < _MIN_GEMM_ROWS:
                xp = torch.cat([x, x.new_zeros((_MIN_GEMM_ROWS - m, x.shape[1]))])
                _logits_into(self.slab_buf[:_MIN_GEMM_ROWS], xp, self.weight, self.bias, self.blocks)
                slab = self.slab_buf[:m]
            else:
                slab = self.slab_buf[:m]
                _logits_into(slab, x, self.weight, self.bias, self.blocks)
            if self.support is not None:
                self._seg, self._flat = support_rows(*self.support, sel, self.weight.shape[0])
            yield sel, x, slab

    def check_rows(self, norm: torch.Tensor) -> None:
        if not bool(torch.isfinite(norm).all()):
            raise ValueError("hidden, weight and bias must be finite: a row's logits contain NaN or inf")


def grad_buffers(hidden, weight, bias, need_x: bool, need_w: bool, need_b: bool, drv: "Driver"):
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


def rows_to_visit(keep: torch.Tensor) -> Optional[torch.Tensor]:
    """None when every row is kept (no gather), else the kept rows' ids."""
    if bool(keep.all()):
        return None
    return keep.nonzero().squeeze(1)


def safe_index(index: torch.Tensor, ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    valid = index != ignore_index
    return torch.where(valid, index, 0), valid


# -- linear_log_prob ------------------------------------------------------------------------------------------
def check_head(hidden, weight, bias, index, temperature, chunk: int, index_dim: int = 2) -> None:
    _checks.tensor(hidden, "hidden", 2)
    _checks.tensor(weight, "weight", 2)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must have shape [V, H] with H = {hidden.shape[1]} (hidden's last dim), got "
                         f"{tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one row (V >= 1)")
    _checks.same_device("weight", weight, hidden, "hidden's")
    if bias is not None:
        _checks.tensor(bias, "bias", 1)
        _checks.shape(bias, "bias", weight.shape[:1], "[V]")
        _checks.same_device("bias", bias, hidden, "hidden's")
    _checks.tensor(index, "index", index_dim, (torch.int64,))
    if index.shape[0] != hidden.shape[0]:
        raise ValueError(f"index must have {hidden.shape[0]} rows (hidden's), got shape {tuple(index.shape)}")
    _checks.same_device("index", index, hidden, "hidden's")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite float, got {temperature!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
        raise ValueError(f"chunk_size must be a positive int (0 or None: chosen from the memory budget), got {chunk!r}")


def check_devices(hidden: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    """The fakes' share of the input contract: one device. A meta weight beside CPU hidden states (an ``lm_head``
    left on meta after deferred initialization) dispatches to the fake, which would return uninitialized memory."""
    for name, t in others.items():
        if t is not None:
            _checks.same_device(name, t, hidden, "hidden's")


def check_index_values(index: torch.Tensor, V: int, ignore_index: int) -> None:
    if _checks._skip_values(index):
        return
    bad = (index != ignore_index) & ((index < 0) | (index >= V))
    if bool(bad.any()):
        raise ValueError(f"index must lie in [0, {V}) or equal ignore_index = {ignore_index}")
