"""Triton kernels of ``fastgrad::enumerate_log_probs``: gather-and-add over the k latents per configuration,
and the backward that sums the upstream gradient of the configurations sharing a category."""
import torch
import triton
import triton.language as tl

from ._common import acc_torch


@triton.jit
def _fwd_kernel(lp_ptr, out_ptr, B, k, K, C, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr):
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    bs = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    cmask = cs < C
    bmask = bs < B
    acc = tl.zeros([BLOCK_C, BLOCK_B], tl.float64 if lp_ptr.dtype.element_ty == tl.float64 else tl.float32)
    rest = cs.to(tl.int64)
    for ii in range(0, k):
        i = k - 1 - ii  # the last latent varies fastest
        d = rest % K
        rest = rest // K
        v = tl.load(lp_ptr + (bs[None, :].to(tl.int64) * k + i) * K + d[:, None], mask=cmask[:, None] & bmask[None, :],
                    other=0.0)
        acc += v
    tl.store(out_ptr + cs[:, None].to(tl.int64) * B + bs[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=cmask[:, None] & bmask[None, :])


@triton.jit
def _bwd_kernel(g_ptr, gsum_ptr, p_ptr, gl_ptr, B, k, K, C, BLOCK_B: tl.constexpr):
    # one program per (i, j, b-block): G[b, i, j] = sum over configurations with digit_i = j
    ij = tl.program_id(0)
    i = ij // K
    j = ij % K
    bs = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = bs < B
    acc = tl.zeros([BLOCK_B], tl.float64 if gl_ptr.dtype.element_ty == tl.float64 else tl.float32)
    inner = 1
    for t in range(0, k - 1 - i):
        inner *= K
    outer = C // (inner * K)
    for a in range(0, outer):
        for t in range(0, inner):
            c = (a * K + j) * inner + t
            acc += tl.load(g_ptr + c.to(tl.int64) * B + bs, mask=bmask, other=0.0).to(acc.dtype)
    p = tl.load(p_ptr + (bs.to(tl.int64) * k + i) * K + j, mask=bmask, other=0.0).to(acc.dtype)
    s = tl.load(gsum_ptr + bs, mask=bmask, other=0.0).to(acc.dtype)
    tl.store(gl_ptr + (bs.to(tl.int64) * k + i) * K + j, (acc - p * s).to(gl_ptr.dtype.element_ty), mask=bmask)


def enumerate_log_probs(logits):
    B, k, K = logits.shape
    C = K**k
    out = torch.empty((C, B), dtype=logits.dtype, device=logits.device)
    if B:
        lp = torch.log_softmax(logits.to(acc_torch(logits.dtype)), -1).contiguous()  # [B, k, K], tiny
        grid = (triton.cdiv(C, 32), triton.cdiv(B, 64))
        _fwd_kernel[grid](lp, out, B, k, K, C, BLOCK_C=32, BLOCK_B=64)
    return out


def enumerate_log_probs_backward(grad, logits):
    B, k, K = logits.shape
    C = grad.shape[0]
    acc = acc_torch(logits.dtype)
    gl = torch.empty(logits.shape, dtype=acc, device=logits.device)
    if B:
        p = torch.softmax(logits.to(acc), -1).contiguous()
        gsum = grad.to(acc).sum(0).contiguous()
        _bwd_kernel[(k * K, triton.cdiv(B, 64))](grad, gsum, p, gl, B, k, K, C, BLOCK_B=64)
    return gl.to(logits.dtype)
