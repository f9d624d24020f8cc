"""Triton kernels of ``fastgrad::gumbel_softmax`` and its backward (noise regenerated from seed/offset)."""
import torch
import triton
import triton.language as tl

from ._common import acc_tl, block

from ._philox import philox_uniform


@triton.jit
def _perturbed(row, k0, ks, K, seed, offset, e0, ACC: tl.constexpr):
    mask = k0 + ks < K
    x = tl.load(row + k0 + ks, mask=mask, other=float("-inf")).to(ACC)
    u = philox_uniform(seed, offset, e0 + k0 + ks).to(ACC)
    return tl.where(mask, x - tl.log(-tl.log(u)), float("-inf")), mask


@triton.jit
def _fwd_kernel(logits_ptr, out_ptr, R, K, inv_tau, seed, offset, HARD: tl.constexpr, ACC: tl.constexpr,
                BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)  # b = s * R + r
    r = b % R
    row = logits_ptr + r * K
    e0 = b * K
    ks = tl.arange(0, BLOCK_K)
    m = tl.full([BLOCK_K], float("-inf"), ACC)
    am = tl.zeros([BLOCK_K], tl.int64)
    for k0 in range(0, K, BLOCK_K):
        z, mask = _perturbed(row, k0, ks, K, seed, offset, e0, ACC)
        better = z > m
        am = tl.where(better, k0 + ks, am)
        m = tl.where(better, z, m)
    mx = tl.max(m, 0)
    out = out_ptr + b * K
    if HARD:
        arg = tl.min(tl.where(m == mx, am, K), 0)  # first maximal index
        for k0 in range(0, K, BLOCK_K):
            tl.store(out + k0 + ks, (k0 + ks == arg).to(tl.float32).to(out_ptr.dtype.element_ty), mask=k0 + ks < K)
    else:
        s = tl.zeros([BLOCK_K], ACC)
        for k0 in range(0, K, BLOCK_K):
            z, mask = _perturbed(row, k0, ks, K, seed, offset, e0, ACC)
            s += tl.where(mask, tl.exp((z - mx) * inv_tau), 0.0)
        tot = tl.sum(s, 0)
        for k0 in range(0, K, BLOCK_K):
            z, mask = _perturbed(row, k0, ks, K, seed, offset, e0, ACC)
            y = tl.exp((z - mx) * inv_tau) / tot
            tl.store(out + k0 + ks, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(grad_ptr, logits_ptr, gl_ptr, R, K, n, inv_tau, seed, offset, ACC: tl.constexpr,
                BLOCK_K: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    row = logits_ptr + r * K
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        tl.store(gl_ptr + r * K + k0 + ks, tl.zeros([BLOCK_K], gl_ptr.dtype.element_ty), mask=k0 + ks < K)
    for s in range(0, n):
        b = s * R + r
        e0 = b * K
        m = tl.full([BLOCK_K], float("-inf"), ACC)
        for k0 in range(0, K, BLOCK_K):
            z, mask = _perturbed(row, k0, ks, K, seed, offset, e0, ACC)
            m = tl.maximum(m, z)
        mx = tl.max(m, 0)
        sm = tl.zeros([BLOCK_K], ACC)
        dot = tl.zeros([BLOCK_K], ACC)
        for k0 in range(0, K, BLOCK_K):
            z, mask = _perturbed(row, k0, ks, K, seed, offset, e0, ACC)
            ez = tl.where(mask, tl.exp((z - mx) * inv_tau), 0.0)
            g = tl.load(grad_ptr + b * K + k0 + ks, mask=mask, other=0.0).to(ACC)
            sm += ez
            dot += ez * g
        tot = tl.sum(sm, 0)
        d = tl.sum(dot, 0) / tot
        for k0 in range(0, K, BLOCK_K):
            z, mask = _perturbed(row, k0, ks, K, seed, offset, e0, ACC)
            y = tl.exp((z - mx) * inv_tau) / tot
            g = tl.load(grad_ptr + b * K + k0 + ks, mask=mask, other=0.0).to(ACC)
            prev = tl.load(gl_ptr + r * K + k0 + ks, mask=mask, other=0.0).to(ACC)
            tl.store(gl_ptr + r * K + k0 + ks, (prev + y * (g - d) * inv_tau).to(gl_ptr.dtype.element_ty), mask=mask)


def gumbel_softmax(logits, n, tau, hard, seed, offset):
    R, K = logits.shape
    out = torch.empty((n, R, K), dtype=logits.dtype, device=logits.device)
    if R and K:
        BLOCK_K = block(K, 1024)
        _fwd_kernel[(n * R,)](logits, out, R, K, 1.0 / tau, seed, offset, HARD=hard, ACC=acc_tl(logits.dtype),
                              BLOCK_K=BLOCK_K)
    return out


def gumbel_softmax_backward(grad, logits, tau, seed, offset):
    R, K = logits.shape
    n = grad.shape[0]
    gl = torch.empty_like(logits) if logits.dtype in (torch.float32, torch.float64) else \
        torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    if R and K:
        BLOCK_K = block(K, 1024)
        _bwd_kernel[(R,)](grad, logits, gl, R, K, n, 1.0 / tau, seed, offset, ACC=acc_tl(logits.dtype),
                          BLOCK_K=BLOCK_K)
    return gl.to(logits.dtype)
