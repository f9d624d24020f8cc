"""Counter-based Philox 4x32-10 in plain torch: the reference every backend reproduces bit for bit.

Stream layout (identical in ``csrc/philox.h`` and ``fastgrad/kernels/_philox.py``): the uniform for global
element index ``e`` of an op is word ``e % 4`` of ``philox(key=seed, counter=(offset + e // 4) as two uint32,
0, 0)``. A uint32 word ``x`` maps to the float32 ``((x >> 9) * 2 + 1) * 2**-24``, which lies strictly inside
(0, 1) and is exact in float32, so ``log(u)`` and ``log(-log(u))`` are always finite.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

M0 = 0xD2511F53
M1 = 0xCD9E8D57
W0 = 0x9E3779B9
W1 = 0xBB67AE85
MASK = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    # 32x32 -> 64-bit product without int64 overflow: split b in 16-bit halves.
    a_lo, a_hi = a & 0xFFFF, a >> 16
    b_lo, b_hi = b & 0xFFFF, b >> 16
    lo_lo = a_lo * b_lo
    mid1 = a_hi * b_lo
    mid2 = a_lo * b_hi
    hi_hi = a_hi * b_hi
    mid = (lo_lo >> 16) + (mid1 & 0xFFFF) + (mid2 & 0xFFFF)
    lo = (lo_lo & 0xFFFF) | ((mid & 0xFFFF) << 16)
    hi = hi_hi + (mid1 >> 16) + (mid2 >> 16) + (mid >> 16)
    return hi & MASK, lo & MASK


def philox4x32(seed: int, counter: torch.Tensor) -> torch.Tensor:
    """Philox 4x32-10 of the 64-bit ``counter`` (int64 tensor) with key ``seed``: int64 tensor ``[..., 4]``
    holding the four uint32 words."""
    c0 = counter & MASK
    c1 = (counter >> 32) & MASK
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & MASK, (seed >> 32) & MASK
    for _ in range(10):
        hi0, lo0 = _mulhilo(M0, c0)
        hi1, lo1 = _mulhilo(M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + W0) & MASK
        k1 = (k1 + W1) & MASK
    return torch.stack([c0, c1, c2, c3], dim=-1)


def uniform(seed: int, offset: int, numel: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """float32 uniforms in (0, 1) for element indices ``0 .. numel-1`` of the stream (seed, offset)."""
    ncounters = (numel + 3) // 4
    counters = torch.arange(ncounters, dtype=torch.int64, device=device) + offset
    words = philox4x32(seed, counters).reshape(-1)[:numel]
    return ((words >> 9) * 2 + 1).to(torch.float32) * (2.0 ** -24)


def counters_used(numel: int) -> int:
    """How far an op consuming ``numel`` uniforms advances the offset."""
    return (numel + 3) // 4


def draw_seed_offset(numel: int, generator: Optional[torch.Generator], seed: Optional[int],
                     offset: Optional[int]) -> Tuple[int, int]:
    """Resolve (seed, offset). Explicit values win; otherwise draw a fresh 63-bit seed from ``generator`` (or
    torch's default generator), so ``torch.manual_seed`` makes every op reproducible."""
    if seed is None:
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator, dtype=torch.int64).item())
        offset = 0 if offset is None else offset
    elif offset is None:
        offset = 0
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset < 2**62:
        raise ValueError(f"offset must be a non-negative int, got {offset!r}")
    return seed, offset
