"""``fastgrad::categorical_sample``: n categorical draws per row by inverse CDF, fused with the one-hot.

Algorithm (every backend): per row, ``p_k = exp(l_k - max l)`` in float32 accumulated into a float64 CDF;
draw ``s`` of row ``r`` uses the uniform of element ``s * R + r`` of the Philox stream and picks the first
``k`` with ``cdf_k > u * cdf_K``. A category with zero probability never satisfies that (its CDF step is
empty), so it is never drawn. One softmax pass per row serves all n draws: O(K + n log K) work per row, where
Gumbel-max needs n*K random numbers and logarithms.
"""
from __future__ import annotations

from typing import Tuple

import torch

from . import _backend, _philox


def reference(logits: torch.Tensor, n: int, seed: int, offset: int, one_hot: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    R, K = logits.shape
    u = _philox.uniform(seed, offset, n * R, logits.device).view(n, R)
    lf = logits.float()
    p = torch.exp(lf - lf.amax(-1, keepdim=True)).double()
    cdf = torch.cumsum(p, -1)  # [R, K]
    target = u.double().t().contiguous() * cdf[:, -1:]  # [R, n]
    idx = torch.searchsorted(cdf, target, right=True).clamp_(max=K - 1).t().contiguous()
    if one_hot:
        oh = torch.zeros(n, R, K, dtype=logits.dtype, device=logits.device)
        oh.scatter_(-1, idx.unsqueeze(-1), 1)
    else:
        oh = logits.new_empty(0)
    return idx, oh


@torch.library.custom_op("fastgrad::categorical_sample", mutates_args=())
def categorical_sample(logits: torch.Tensor, n: int, seed: int, offset: int,
                       one_hot: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """logits ``[R, K]`` (float16/bfloat16/float32/float64, contiguous) -> (indices int64 ``[n, R]``, one-hot
    ``[n, R, K]`` in the logits' dtype, or an empty tensor when ``one_hot`` is False)."""
    return _backend.run("categorical_sample", "categorical_sample", reference, logits, n, seed, offset, one_hot)


@categorical_sample.register_fake
def _(logits, n, seed, offset, one_hot):
    torch._check(logits.dim() == 2, lambda: "logits must be 2-D [R, K]")
    R, K = logits.shape
    idx = logits.new_empty((n, R), dtype=torch.int64)
    oh = logits.new_empty((n, R, K)) if one_hot else logits.new_empty(0)
    return idx, oh


sample = _backend.entry(categorical_sample, "categorical_sample", "categorical_sample", reference)
