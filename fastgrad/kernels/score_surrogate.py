"""Triton kernels of ``fastgrad::score_surrogate``: online logsumexp forward, one-write backward."""
import torch
import triton
import triton.language as tl

from ._common import acc_tl, acc_torch, block


@triton.jit
def _fwd_kernel(logits_ptr, idx_ptr, w_ptr, out_ptr, lse_ptr, R, K, n, ACC: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_N: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    row = logits_ptr + r * K
    ks = tl.arange(0, BLOCK_K)
    m = tl.full([BLOCK_K], float("-inf"), ACC)
    s = tl.zeros([BLOCK_K], ACC)
    for k0 in range(0, K, BLOCK_K):  # online max / sum-exp: one read of the row
        x = tl.load(row + k0 + ks, mask=k0 + ks < K, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(tl.where(m_new == float("-inf"), 0.0, m - m_new)) + tl.where(
            x == float("-inf"), 0.0, tl.exp(x - m_new))
        m = m_new
    mx = tl.max(m, 0)
    tot = tl.sum(s * tl.exp(tl.where(m == float("-inf"), float("-inf"), m - mx)), 0)
    lse = mx + tl.log(tot)
    tl.store(lse_ptr + r, lse)
    ss = tl.arange(0, BLOCK_N)
    smask = ss < n
    idx = tl.load(idx_ptr + ss * R + r, mask=smask, other=0)
    w = tl.load(w_ptr + ss * R + r, mask=smask, other=0.0).to(ACC)
    picked = tl.load(row + idx, mask=smask, other=0.0).to(ACC)
    tl.store(out_ptr + ss * R + r, (w * (picked - lse)).to(out_ptr.dtype.element_ty), mask=smask)


@triton.jit
def _bwd_kernel(a_ptr, logits_ptr, idx_ptr, lse_ptr, gl_ptr, R, K, n, ACC: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_N: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    ss = tl.arange(0, BLOCK_N)
    smask = ss < n
    a = tl.load(a_ptr + ss * R + r, mask=smask, other=0.0).to(ACC)
    idx = tl.load(idx_ptr + ss * R + r, mask=smask, other=-1)
    asum = tl.sum(a, 0)
    lse = tl.load(lse_ptr + r).to(ACC)
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + ks < K
        x = tl.load(logits_ptr + r * K + k0 + ks, mask=mask, other=float("-inf")).to(ACC)
        hit = tl.sum(tl.where(idx[:, None] == (k0 + ks)[None, :], a[:, None], 0.0), 0)
        tl.store(gl_ptr + r * K + k0 + ks, (hit - asum * tl.exp(x - lse)).to(gl_ptr.dtype.element_ty), mask=mask)


def _blocks(K, n):
    return block(K, 2048), block(n, 1 << 30)


def score_surrogate(logits, index, weight):
    R, K = logits.shape
    n = index.shape[0]
    acc = acc_torch(logits.dtype)
    out = torch.empty_like(weight)
    lse = torch.empty(R, dtype=acc, device=logits.device)
    if R:
        BLOCK_K, BLOCK_N = _blocks(K, n)
        _fwd_kernel[(R,)](logits, index, weight, out, lse, R, K, n, ACC=acc_tl(logits.dtype), BLOCK_K=BLOCK_K,
                          BLOCK_N=BLOCK_N)
    return out, lse


def score_surrogate_backward(grad, logits, index, weight, lse):
    R, K = logits.shape
    n = index.shape[0]
    acc = acc_torch(logits.dtype)
    a = (grad.to(acc) * weight.to(acc)).contiguous()
    gl = torch.empty_like(logits)
    if R:
        BLOCK_K, BLOCK_N = _blocks(K, n)
        _bwd_kernel[(R,)](a, logits, index, lse.to(acc).contiguous(), gl, R, K, n, ACC=acc_tl(logits.dtype),
                          BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N)
    return gl
