"""Triton row passes of the fused LM-head ops over a logits slab ``[M, V]`` (see ``csrc/cpu/linear_rows.cpp`` for
the formulas): one program per row, the vocabulary visited in masked blocks (V need not be a multiple)."""
import triton
import triton.language as tl

from ._common import acc_tl, block, row_max


@triton.jit
def _stats_kernel(z_ptr, idx_ptr, logp_ptr, norm_ptr, ent_ptr, sq_ptr, V, S, inv_t, WANT_ENT: tl.constexpr,
                  WANT_SQ: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    row = z_ptr + r * V
    cols = tl.arange(0, BLOCK_V)
    m = row_max(row, V, ACC, BLOCK_V) * inv_t
    s = tl.zeros([BLOCK_V], ACC)
    t = tl.zeros([BLOCK_V], ACC)
    q = tl.zeros([BLOCK_V], ACC)
    for v0 in range(0, V, BLOCK_V):
        x = tl.load(row + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(ACC)
        d = x * inv_t - m
        e = tl.exp(d)
        s += e
        if WANT_ENT:
            t += tl.where(e > 0, e * d, 0.0)
        if WANT_SQ:
            q += e * e
    ssum = tl.sum(s, 0)
    ls = tl.log(ssum)  # ssum >= 1: the max's own term
    tl.store(norm_ptr + 2 * r, m)
    tl.store(norm_ptr + 2 * r + 1, ls)
    if WANT_ENT:
        tl.store(ent_ptr + r, ls - tl.sum(t, 0) / ssum)
    if WANT_SQ:
        tl.store(sq_ptr + r, tl.sum(q, 0) / (ssum * ssum))
    ss = tl.arange(0, BLOCK_S)
    smask = ss < S
    idx = tl.load(idx_ptr + r * S + ss, mask=smask, other=0)
    picked = tl.load(row + idx, mask=smask, other=0.0).to(ACC)
    # relative to the max, as the C++ (and never above 0, whatever the compiler fuses)
    tl.store(logp_ptr + r * S + ss, tl.minimum((picked * inv_t - m) - ls, 0.0), mask=smask)


@triton.jit
def _grad_kernel(z_ptr, idx_ptr, coef_ptr, pcoef_ptr, g_ptr, norm_ptr, ent_ptr, V, S, inv_t,
                 WITH_ENT: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    row = z_ptr + r * V
    ss = tl.arange(0, BLOCK_S)
    smask = ss < S
    c = tl.load(coef_ptr + r * S + ss, mask=smask, other=0.0).to(ACC)
    idx = tl.load(idx_ptr + r * S + ss, mask=smask, other=-1)
    a = -tl.load(pcoef_ptr + r).to(ACC) * inv_t
    m = tl.load(norm_ptr + 2 * r).to(ACC)
    ls = tl.load(norm_ptr + 2 * r + 1).to(ACC)
    if WITH_ENT:
        b = -tl.load(g_ptr + r).to(ACC) * inv_t
        h = tl.load(ent_ptr + r).to(ACC)
    cols = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        mask = v0 + cols < V
        x = tl.load(row + v0 + cols, mask=mask, other=float("-inf")).to(ACC)
        lp = (x * inv_t - m) - ls
        p = tl.exp(lp)
        d = a * p
        if WITH_ENT:
            d += tl.where(p > 0, b * p * (lp + h), 0.0)
        hit = tl.sum(tl.where(idx[:, None] == (v0 + cols)[None, :], c[:, None], 0.0), 0)
        tl.store(row + v0 + cols, (d + hit * inv_t).to(z_ptr.dtype.element_ty), mask=mask)


def _meta(slab, S):
    return acc_tl(slab.dtype), block(slab.shape[1], 2048), block(S, 1 << 30)


def rows_stats(slab, index, inv_t, want_entropy, want_sum_sq):
    M, V = slab.shape
    S = index.shape[1]
    logp = slab.new_empty((M, S))
    norm = slab.new_empty((M, 2))
    ent = slab.new_empty((M if want_entropy else 0,))
    sq = slab.new_empty((M if want_sum_sq else 0,))
    if M:
        acc, BV, BS = _meta(slab, S)
        _stats_kernel[(M,)](slab, index, logp, norm, ent if want_entropy else norm, sq if want_sum_sq else norm, V,
                            S, float(inv_t), WANT_ENT=bool(want_entropy), WANT_SQ=bool(want_sum_sq), ACC=acc,
                            BLOCK_V=BV, BLOCK_S=BS)
    return logp, norm, ent, sq


def rows_grad_(slab, index, coef, p_coef, g_ent, norm, ent, inv_t):
    M, V = slab.shape
    S = index.shape[1]
    if M:
        acc, BV, BS = _meta(slab, S)
        with_ent = g_ent.numel() > 0
        _grad_kernel[(M,)](slab, index, coef, p_coef, g_ent if with_ent else p_coef, norm,
                           ent if with_ent else p_coef, V, S, float(inv_t), WITH_ENT=with_ent, ACC=acc, BLOCK_V=BV,
                           BLOCK_S=BS)
