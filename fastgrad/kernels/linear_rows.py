"""Triton row passes of the fused LM-head ops over a logits slab ``[M, V]`` (see ``csrc/cpu/linear_rows.cpp`` for
the formulas): one program per row, the vocabulary visited in masked blocks (V need not be a multiple)."""
import triton
import triton.language as tl

from ._common import acc_tl, block, row_max


@triton.jit
def _stats_kernel(z_ptr, idx_ptr, logp_ptr, lse_ptr, ent_ptr, V, S, inv_t, WANT_ENT: tl.constexpr,
                  ACC: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    row = z_ptr + r * V
    cols = tl.arange(0, BLOCK_V)
    m = row_max(row, V, ACC, BLOCK_V) * inv_t
    s = tl.zeros([BLOCK_V], ACC)
    t = tl.zeros([BLOCK_V], ACC)
    for v0 in range(0, V, BLOCK_V):
        x = tl.load(row + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(ACC)
        d = x * inv_t - m
        e = tl.exp(d)
        s += e
        if WANT_ENT:
            t += tl.where(e > 0, e * d, 0.0)
    ssum = tl.sum(s, 0)
    ls = tl.log(ssum)  # ssum >= 1: the max's own term
    tl.store(lse_ptr + r, m + ls)
    if WANT_ENT:
        tl.store(ent_ptr + r, ls - tl.sum(t, 0) / ssum)
    ss = tl.arange(0, BLOCK_S)
    smask = ss < S
    idx = tl.load(idx_ptr + r * S + ss, mask=smask, other=0)
    picked = tl.load(row + idx, mask=smask, other=0.0).to(ACC)
    # relative to the max, as the C++ (and never above 0, whatever the compiler fuses)
    tl.store(logp_ptr + r * S + ss, tl.minimum((picked * inv_t - m) - ls, 0.0), mask=smask)


@triton.jit
def _grad_kernel(z_ptr, idx_ptr, coef_ptr, g_ptr, lse_ptr, ent_ptr, V, S, inv_t, WITH_ENT: tl.constexpr,
                 ACC: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    row = z_ptr + r * V
    ss = tl.arange(0, BLOCK_S)
    smask = ss < S
    c = tl.load(coef_ptr + r * S + ss, mask=smask, other=0.0).to(ACC)
    idx = tl.load(idx_ptr + r * S + ss, mask=smask, other=-1)
    a = -tl.sum(c, 0) * inv_t
    lse = tl.load(lse_ptr + r).to(ACC)
    if WITH_ENT:
        b = -tl.load(g_ptr + r).to(ACC) * inv_t
        h = tl.load(ent_ptr + r).to(ACC)
    cols = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        mask = v0 + cols < V
        x = tl.load(row + v0 + cols, mask=mask, other=float("-inf")).to(ACC)
        lp = x * inv_t - lse
        p = tl.exp(lp)
        d = a * p
        if WITH_ENT:
            d += tl.where(p > 0, b * p * (lp + h), 0.0)
        hit = tl.sum(tl.where(idx[:, None] == (v0 + cols)[None, :], c[:, None], 0.0), 0)
        tl.store(row + v0 + cols, (d + hit * inv_t).to(z_ptr.dtype.element_ty), mask=mask)


def _meta(slab, S):
    return acc_tl(slab.dtype), block(slab.shape[1], 2048), block(S, 1 << 30)


def rows_stats(slab, index, inv_t, want_entropy):
    M, V = slab.shape
    S = index.shape[1]
    logp = slab.new_empty((M, S))
    lse = slab.new_empty((M,))
    ent = slab.new_empty((M if want_entropy else 0,))
    if M:
        acc, BV, BS = _meta(slab, S)
        _stats_kernel[(M,)](slab, index, logp, lse, ent if want_entropy else lse, V, S, float(inv_t),
                            WANT_ENT=bool(want_entropy), ACC=acc, BLOCK_V=BV, BLOCK_S=BS)
    return logp, lse, ent


def rows_grad_(slab, index, coef, g_ent, lse, ent, inv_t):
    M, V = slab.shape
    S = index.shape[1]
    if M:
        acc, BV, BS = _meta(slab, S)
        with_ent = g_ent.numel() > 0
        _grad_kernel[(M,)](slab, index, coef, g_ent if with_ent else lse, lse, ent if with_ent else lse, V, S,
                           float(inv_t), WITH_ENT=with_ent, ACC=acc, BLOCK_V=BV, BLOCK_S=BS)
