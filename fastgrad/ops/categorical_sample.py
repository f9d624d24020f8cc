"""``fastgrad::categorical_sample``: n categorical draws per row by inverse CDF, fused with the one-hot.

Algorithm (every backend): per row, ``p_k = exp(l_k - max l)`` (the difference in the logits' precision, float64
for float64 logits; the exponential in float32) accumulated into a float64 CDF;
draw ``s`` of row ``r`` uses the uniform of element ``s * R + r`` of the Philox stream and picks the first
``k`` with ``cdf_k > u * cdf_K``. A category with zero probability never satisfies that (its CDF step is
empty), so it is never drawn. One softmax pass per row serves all n draws, where Gumbel-max needs n*K random
numbers and logarithms: O(K + n log K) work per row in the C++ kernel (a CDF and a binary search per draw) and the
CUDA kernel (a block scan per tile of 256 categories, a shared-memory binary search per draw); the Triton kernel
counts ``cdf <= target`` for all n draws at once per tile, O(n K) compares but one pass of exponentials, which
is the cheaper trade at the small n of estimators on a GPU.
"""
from __future__ import annotations

from typing import Tuple

import torch

from . import _checks, _philox, _registry

KERNEL_CHECKS_VALUES = ("cpp",)  # backends whose kernel rejects invalid rows itself


def reference(logits: torch.Tensor, n: int, seed: int, offset: int, one_hot: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    R, K = logits.shape
    u = _philox.uniform(seed, offset, n * R, logits.device).view(n, R)
    # subtract the row max in the logits' precision (float64 logits far from 0 keep their differences), then
    # exponentiate in float32 as every kernel does
    la = logits.to(_checks.acc_dtype(logits.dtype))
    p = torch.exp((la - la.amax(-1, keepdim=True)).float()).double()
    cdf = torch.cumsum(p, -1)  # [R, K]
    target = u.double().t().contiguous() * cdf[:, -1:]  # [R, n]
    idx = torch.searchsorted(cdf, target, right=True).clamp_(max=K - 1).t().contiguous()
    if one_hot:
        oh = torch.zeros(n, R, K, dtype=logits.dtype, device=logits.device)
        oh.scatter_(-1, idx.unsqueeze(-1), 1)
    else:
        oh = logits.new_empty(0)
    return idx, oh


def check(backend: str, logits, n, seed, offset, one_hot):
    _checks.tensor(logits, "logits", 2)
    _checks.categories(logits.shape[1])
    _checks.count(n)
    _checks.seed_offset(seed, offset)
    if backend not in KERNEL_CHECKS_VALUES:
        _checks.logits_rows(logits)


def fake(logits, n, seed, offset, one_hot):
    torch._check(logits.dim() == 2, lambda: "logits must be 2-D [R, K]")
    R, K = logits.shape
    idx = logits.new_empty((n, R), dtype=torch.int64)
    oh = logits.new_empty((n, R, K)) if one_hot else logits.new_empty(0)
    return idx, oh


def sample_inputs(device, dtype):
    """Valid calls: K = 1, K = 2, odd sizes, an empty batch, a row spanning several 1024-blocks, masked (-inf)
    categories."""
    return [(f"{R}x{K} n={n}", (_registry.random_rows(device, dtype, R, K, R + K, masked=True), n, 1234, 5, True))
            for R, K, n in ((1, 1, 1), (3, 2, 5), (37, 11, 5), (0, 5, 2), (2, 4099, 3))] + \
        [("no one-hot", (_registry.random_rows(device, dtype, 4, 7), 3, 9, 0, False))]


# logits [R, K] (float16/bfloat16/float32/float64, contiguous) -> (indices int64 [n, R], one-hot [n, R, K] in the
# logits' dtype, or an empty tensor when one_hot is False)
OP = _registry.define(
    "categorical_sample",
    "(Tensor logits, SymInt n, SymInt seed, SymInt offset, bool one_hot) -> (Tensor, Tensor)",
    reference, check, fake, sample_inputs=sample_inputs)
categorical_sample = OP.op
eager = OP.call  # what fastgrad.functional calls: the backend directly in eager mode
__getattr__ = _registry.renamed(__name__, "sample", "eager", eager)  # the old name, for a release

