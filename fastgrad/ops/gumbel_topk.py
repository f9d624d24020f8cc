"""``fastgrad::gumbel_topk``: k distinct categories per row, sampled without replacement by Gumbel-top-k.

Perturbed log-probabilities ``phi[r, i] = log_softmax(l[r])_i + G[r, i]``, ``G = -log(-log u)`` with ``u`` the
uniform of element ``r * K + i`` of the Philox stream (seed, offset); the op returns the indices of the k largest
in decreasing order and their values. The top-k of ``phi`` is a sample of k categories without replacement, in
the order of successive draws (Vieira 2014, "Gumbel-max trick and weighted reservoir sampling"; Kool, van Hoof &
Welling 2019, "Stochastic beams and where to find them"), and the values are what the unordered-set and
without-replacement estimators need (the k-th and (k+1)-th perturbed values are the thresholds). Categories of
zero probability (``-inf`` logits) are never chosen; k larger than a row's number of finite logits is a ValueError.

Backends: the C++ CPU kernel (a max pass, one exp-noise-and-select pass, nothing ``[R, K]`` allocated), the CUDA
and Triton kernels (GPU; k selection passes recomputing the noise, nothing ``[R, K]`` stored; compiled and, for
Triton, run under the interpreter here, never yet on a GPU) and the pure-torch reference (CPU fallback and test
oracle; it materializes the ``[R, K]`` noise). Not differentiable: the indices are samples and the values are used as
constants.
"""
from __future__ import annotations

from typing import Tuple

import torch

from . import _checks, _philox, _registry


def reference(logits: torch.Tensor, k: int, seed: int, offset: int) -> Tuple[torch.Tensor, torch.Tensor]:
    R, K = logits.shape
    acc = _checks.acc_dtype(logits.dtype)
    la = logits.to(acc)
    u = _philox.uniform(seed, offset, R * K, logits.device).view(R, K).to(acc)
    z = (la - torch.logsumexp(la, -1, keepdim=True)) - torch.log(-torch.log(u))
    val, idx = torch.topk(z, k, dim=-1, sorted=True)
    return idx, val


def check(backend: str, logits, k, seed, offset) -> None:
    _checks.tensor(logits, "logits", 2)
    K = logits.shape[1]
    _checks.categories(K)
    _checks.count(k, "k")
    if k > K:
        raise ValueError(f"k must lie in [1, K] = [1, {K}], got {k}")
    _checks.seed_offset(seed, offset)
    if backend not in ("cpp",) and not _checks._skip_values(logits):  # the C++ kernel checks what it reads
        _checks.logits_rows(logits)
        if int(torch.isfinite(logits).sum(-1).min()) < k:
            raise ValueError("k must not exceed the number of categories with nonzero probability (finite logits) "
                             "in any row")


def fake(logits, k, seed, offset):
    R = logits.shape[0]
    return (logits.new_empty((R, k), dtype=torch.int64),
            logits.new_empty((R, k), dtype=_checks.acc_dtype(logits.dtype)))


def sample_inputs(device, dtype):
    """Valid calls: k = K = 1, k = K, odd sizes, an empty batch, a row spanning several 1024-blocks, masked
    categories, a row whose picks lie far below its maximum (the exponential domain's limit), and k above the
    partial-sort threshold."""
    far = torch.tensor([[0., -95., -100., -102., -90., -89.]]).to(device=device, dtype=dtype)
    return [(f"{R}x{K} k={k}", (_registry.random_rows(device, dtype, R, K, R + K, masked=m), k, 7, 3))
            for R, K, k, m in ((1, 1, 1, False), (3, 2, 2, False), (37, 11, 4, True), (0, 5, 2, False),
                               (2, 4099, 8, True), (2, 300, 100, False))] + [("far below the max", (far, 6, 3, 0))]


# logits [R, K] float (contiguous) -> (indices int64 [R, k], perturbed values [R, k] float32/float64), decreasing
OP = _registry.define("gumbel_topk", "(Tensor logits, SymInt k, SymInt seed, SymInt offset) -> (Tensor, Tensor)",
                      reference, check, fake, sample_inputs=sample_inputs)
gumbel_topk = OP.op
eager = OP.call  # what fastgrad.functional calls: the backend directly in eager mode
