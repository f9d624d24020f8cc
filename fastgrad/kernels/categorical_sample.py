"""Triton kernel of ``fastgrad::categorical_sample`` (inverse CDF; see fastgrad/ops/categorical_sample.py).

One program per row and chunk of up to 64 draws: pass 1 computes the row max and the float64 total of
``exp(l - max)``; pass 2 counts, for all the chunk's targets at once, the categories whose running CDF is still
``<= u * total``: that count is the first category whose CDF exceeds the target.
"""
import torch
import triton
import triton.language as tl

from ._common import acc_tl, block, row_max

from ._philox import philox_uniform


@triton.jit
def _sample_kernel(logits_ptr, idx_ptr, oh_ptr, R, K, n, seed, offset, ONE_HOT: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    # the row max is subtracted in ACC (float64 for float64 logits), the exponential taken in float32
    r = tl.program_id(0).to(tl.int64)
    s0 = tl.program_id(1).to(tl.int64) * BLOCK_N  # this program's chunk of draws
    row = logits_ptr + r * K
    ks = tl.arange(0, BLOCK_K)
    mx = row_max(row, K, ACC, BLOCK_K)
    total = tl.zeros([BLOCK_K], tl.float64)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(row + k0 + ks, mask=k0 + ks < K, other=float("-inf")).to(ACC)
        total += tl.exp((x - mx).to(tl.float32)).to(tl.float64)
    tot = tl.sum(total, 0)
    ss = s0 + tl.arange(0, BLOCK_N)
    smask = ss < n
    u = philox_uniform(seed, offset, ss.to(tl.int64) * R + r)
    target = u.to(tl.float64) * tot
    count = tl.zeros([BLOCK_N], tl.int64)
    run = tl.zeros([1], tl.float64)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(row + k0 + ks, mask=k0 + ks < K, other=float("-inf")).to(ACC)
        p = tl.exp((x - mx).to(tl.float32)).to(tl.float64)
        cdf = tl.cumsum(p, 0) + run
        valid = (k0 + ks) < K
        le = (cdf[None, :] <= target[:, None]) & valid[None, :]
        count += tl.sum(le.to(tl.int64), 1)
        run += tl.sum(p, 0)
    idx = tl.minimum(count, K - 1)
    tl.store(idx_ptr + ss.to(tl.int64) * R + r, idx, mask=smask)
    if ONE_HOT:
        for j in range(0, BLOCK_N):
            s = s0 + j
            if s < n:
                i_s = tl.sum(tl.where(ss == s, idx, 0), 0)
                out = oh_ptr + (s * R + r) * K
                for k0 in range(0, K, BLOCK_K):
                    val = (k0 + ks == i_s).to(tl.float32).to(oh_ptr.dtype.element_ty)
                    tl.store(out + k0 + ks, val, mask=k0 + ks < K)


def categorical_sample(logits: torch.Tensor, n: int, seed: int, offset: int, one_hot: bool):
    R, K = logits.shape
    idx = torch.empty((n, R), dtype=torch.int64, device=logits.device)
    oh = torch.empty((n, R, K) if one_hot else (0,), dtype=logits.dtype, device=logits.device)
    if R == 0:
        return idx, oh
    BLOCK_K = block(K, 1024)
    # draws in chunks of at most 64 per program: the [BLOCK_N, BLOCK_K] compare tile stays in registers for any n
    BLOCK_N = block(n, 64)
    acc = acc_tl(logits.dtype)
    _sample_kernel[(R, triton.cdiv(n, BLOCK_N))](logits, idx, oh, R, K, n, seed, offset, ONE_HOT=one_hot, ACC=acc,
                                                 BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N)
    return idx, oh
