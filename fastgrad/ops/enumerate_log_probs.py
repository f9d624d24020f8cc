"""``fastgrad::enumerate_log_probs``: log-probabilities of all K**k joint configurations of k categoricals.

Configuration ``c`` assigns category ``digit_i(c) = (c // K**(k-1-i)) % K`` to latent ``i`` (the order of
``itertools.product``). ``out[c, b] = sum_i log_softmax(l[b, i])[digit_i(c)]``. Backward:
``dl[b, i, j] = sum_{c: digit_i(c) = j} g[c, b] - softmax(l[b, i])_j * sum_c g[c, b]``. Neither direction
materializes the ``[K**k, B, k, K]`` one-hot tensor.
"""
from __future__ import annotations

import torch

from . import _checks, _registry

DEFAULT_BUDGET = 10000  # Storchastic's Expect(budget=10000): the method and the functions agree
MAX_CONFIGURATIONS = 1 << 62  # K**k above this overflows the int64 sizes of every backend


def _configurations(logits) -> int:
    B, k, K = logits.shape
    _checks.categories(K)
    if k < 1:
        raise ValueError(f"logits must have at least one latent (k >= 1) in [B, k, K], got {tuple(logits.shape)}")
    C = K**k  # a Python int: exact
    if C > MAX_CONFIGURATIONS:
        raise ValueError(f"enumerating {K}**{k} configurations overflows int64; use a sampling estimator")
    return C


def check(backend: str, logits):
    _checks.tensor(logits, "logits", 3)
    _configurations(logits)
    _checks.logits_rows(logits)  # no kernel checks the rows


def check_backward(backend: str, grad, logits):
    _checks.tensor(logits, "logits", 3)
    C = _configurations(logits)
    _checks.tensor(grad, "grad", 2, (logits.dtype,))
    _checks.shape(grad, "grad", (C, logits.shape[0]), "[K**k, B]")
    _checks.same_device("grad", grad, logits)


def digits(k: int, K: int, device=None) -> torch.Tensor:
    """int64 ``[K**k, k]``: category of each latent in each configuration (itertools.product order)."""
    c = torch.arange(K**k, device=device)
    powers = K ** torch.arange(k - 1, -1, -1, device=device)
    return (c.unsqueeze(-1) // powers) % K


def reference(logits: torch.Tensor) -> torch.Tensor:
    B, k, K = logits.shape
    acc = _checks.acc_dtype(logits.dtype)
    lp = torch.log_softmax(logits.to(acc), -1)  # [B, k, K]
    d = digits(k, K, logits.device)  # [C, k]
    out = lp.new_zeros((K**k, B))
    for i in range(k):
        out += lp[:, i, :].t()[d[:, i]]  # [C, B]
    return out.to(logits.dtype)


def reference_backward(grad: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    B, k, K = logits.shape
    acc = _checks.acc_dtype(logits.dtype)
    g = grad.to(acc)  # [C, B]
    d = digits(k, K, logits.device)
    p = torch.softmax(logits.to(acc), -1)
    gl = torch.zeros(B, k, K, dtype=acc, device=logits.device)
    for i in range(k):
        gl[:, i, :].t().index_add_(0, d[:, i], g)
    gl -= p * g.sum(0).view(B, 1, 1)
    return gl.to(logits.dtype)


def fake(logits):
    torch._check(logits.dim() == 3, lambda: "logits must be 3-D [B, k, K]")
    B, k, K = logits.shape
    return logits.new_empty((K**k, B))


def fake_backward(grad, logits):
    return torch.empty_like(logits)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _formula(backward_op):
    def _backward(ctx, grad):
        (logits,) = ctx.saved_tensors
        return backward_op(grad.contiguous(), logits)

    return _backward


def sample_inputs(device, dtype):
    """Valid calls: one categorical of one class, an empty batch, several latents of a few classes."""
    g = torch.Generator().manual_seed(5)
    return [(f"B={B} k={k} K={K}", (torch.randn(B, k, K, generator=g).to(device=device, dtype=dtype),))
            for B, k, K in ((1, 1, 1), (5, 2, 10), (0, 2, 3), (3, 3, 4), (7, 1, 2))]


# logits [B, k, K] -> log q(c) [K**k, B] in the logits' dtype
OP = _registry.define(
    "enumerate_log_probs", "(Tensor logits) -> Tensor", reference, check, fake,
    _registry.Backward("(Tensor grad, Tensor logits) -> Tensor", reference_backward, check_backward, fake_backward,
                       _setup, _formula), sample_inputs=sample_inputs)
enumerate_log_probs, enumerate_log_probs_backward = OP.op, OP.backward_op
eager = OP.call  # what fastgrad.functional calls: the backend directly in eager mode
__getattr__ = _registry.renamed(__name__, "log_probs", "eager", eager)  # the old name, for a release

