"""Philox 4x32-10 in Triton, word for word the stream of ``fastgrad/ops/_philox.py`` and ``csrc/philox.h``."""
import triton
import triton.language as tl


@triton.jit
def philox_uniform(seed, offset, e):
    """float32 uniforms in (0, 1) for int64 element indices ``e`` of the stream (seed, offset)."""
    ctr = offset + (e >> 2)
    c0 = (ctr & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((ctr >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    seed64 = seed.to(tl.int64)
    k0 = (seed64 & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed64 >> 32) & 0xFFFFFFFF).to(tl.uint32)
    M0: tl.constexpr = 0xD2511F53
    M1: tl.constexpr = 0xCD9E8D57
    for _ in tl.static_range(10):
        a0 = c0
        a2 = c2
        hi0 = tl.umulhi(a0, M0)
        lo0 = a0 * M0
        hi1 = tl.umulhi(a2, M1)
        lo1 = a2 * M1
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    w = e & 3
    x = tl.where(w == 0, c0, tl.where(w == 1, c1, tl.where(w == 2, c2, c3)))
    return (((x >> 9) << 1) | 1).to(tl.float32) * 5.9604644775390625e-08
