"""Triton kernel of ``fastgrad::gumbel_topk`` (Gumbel-top-k; see fastgrad/ops/gumbel_topk.py).

One program per block of rows: pass 1 computes each row's logsumexp; then k selection passes over the row, each
recomputing the perturbed values ``log_softmax + G`` from the Philox stream (element ``r * K + i``, as every backend)
and taking the largest one below the previous pick (ties broken by the smaller index, as a stable sort would), so
nothing ``[R, K]`` is stored: registers hold one ``[BLOCK_R, BLOCK_K]`` tile. ``k`` passes cost ``k`` reads of the
logits: meant for the small k of the estimators (k <= 32 or so).
"""
import torch
import triton
import triton.language as tl

from ._common import acc_tl, acc_torch, block

from ._philox import philox_uniform


@triton.jit
def _topk_kernel(logits_ptr, idx_ptr, val_ptr, R, K, k, seed, offset, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    rmask = rows < R
    ks = tl.arange(0, BLOCK_K)
    base = logits_ptr + rows[:, None] * K
    # logsumexp in ACC: max, then the sum of exp(l - max)
    m = tl.full([BLOCK_R], float("-inf"), ACC)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + ks
        msk = rmask[:, None] & (cols[None, :] < K)
        x = tl.load(base + cols[None, :], mask=msk, other=float("-inf")).to(ACC)
        m = tl.maximum(m, tl.max(x, 1))
    m = tl.where(rmask, m, 0.0)
    s = tl.zeros([BLOCK_R], ACC)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + ks
        msk = rmask[:, None] & (cols[None, :] < K)
        x = tl.load(base + cols[None, :], mask=msk, other=float("-inf")).to(ACC)
        s += tl.sum(tl.exp(x - m[:, None]), 1)
    lse = m + tl.log(tl.where(rmask, s, 1.0))
    prev_v = tl.full([BLOCK_R], float("inf"), ACC)
    prev_i = tl.full([BLOCK_R], -1, tl.int64)
    for j in range(0, k):
        best_v = tl.full([BLOCK_R], float("-inf"), ACC)
        best_i = tl.full([BLOCK_R], K, tl.int64)
        for k0 in range(0, K, BLOCK_K):
            cols = (k0 + ks).to(tl.int64)
            msk = rmask[:, None] & (cols[None, :] < K)
            x = tl.load(base + cols[None, :], mask=msk, other=float("-inf")).to(ACC)
            u = philox_uniform(seed, offset, rows[:, None] * K + cols[None, :]).to(ACC)
            z = (x - lse[:, None]) - tl.log(-tl.log(u))
            ok = msk & ((z < prev_v[:, None]) | ((z == prev_v[:, None]) & (cols[None, :] > prev_i[:, None])))
            zc = tl.where(ok, z, float("-inf"))
            bv = tl.max(zc, 1)
            bi = tl.min(tl.where(ok & (zc == bv[:, None]), cols[None, :], K), 1)
            take = (bv > best_v) | ((bv == best_v) & (bi < best_i))
            best_v = tl.where(take, bv, best_v)
            best_i = tl.where(take, bi, best_i)
        tl.store(idx_ptr + rows * k + j, best_i, mask=rmask)
        tl.store(val_ptr + rows * k + j, best_v.to(val_ptr.dtype.element_ty), mask=rmask)
        prev_v = best_v
        prev_i = best_i


def gumbel_topk(logits: torch.Tensor, k: int, seed: int, offset: int):
    R, K = logits.shape
    acc_t = acc_torch(logits.dtype)
    idx = torch.empty((R, k), dtype=torch.int64, device=logits.device)
    val = torch.empty((R, k), dtype=acc_t, device=logits.device)
    if R == 0 or k == 0:
        return idx, val
    BLOCK_K = block(K, 512)
    BLOCK_R = block(R, 4096 // BLOCK_K)
    acc = acc_tl(logits.dtype)
    _topk_kernel[(triton.cdiv(R, BLOCK_R),)](logits, idx, val, R, K, k, seed, offset, ACC=acc, BLOCK_R=BLOCK_R,
                                             BLOCK_K=BLOCK_K)
    return idx, val
