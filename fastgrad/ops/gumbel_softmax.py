"""``fastgrad::gumbel_softmax``: n relaxed one-hot samples per row, forward and backward fused.

Sample ``s`` of row ``r`` uses the Gumbel noise ``g = -log(-log u)`` of elements ``(s * R + r) * K + k`` of the
Philox stream; ``y = softmax((l + g) / tau)`` in float32 (float64 for float64 logits). ``hard`` returns
``one_hot(argmax(l + g))`` (a Gumbel-max sample) while its gradient is the soft one (straight-through). The
backward regenerates the noise from (seed, offset) instead of storing it: memory stays at the size of the output.
"""
from __future__ import annotations

import torch

from . import _checks, _philox, _registry


def perturbed_softmax(logits: torch.Tensor, n: int, tau: float, seed: int, offset: int):
    """``(z, softmax(z / tau))`` for the Gumbel-perturbed logits ``z`` ``[n, R, K]`` of the stream (seed, offset),
    in the accumulation dtype: the reference's formula, and the learned-temperature path of
    :func:`fastgrad.functional.gumbel_softmax`, which differentiates ``tau`` through it."""
    R, K = logits.shape
    acc = _checks.acc_dtype(logits.dtype)
    u = _philox.uniform(seed, offset, n * R * K, logits.device).view(n, R, K).to(acc)
    z = logits.to(acc).unsqueeze(0) - torch.log(-torch.log(u))
    return z, torch.softmax(z / tau, dim=-1)


def reference(logits: torch.Tensor, n: int, tau: float, hard: bool, seed: int, offset: int) -> torch.Tensor:
    z, y = perturbed_softmax(logits, n, tau, seed, offset)
    if hard:
        y = torch.zeros_like(y).scatter_(-1, z.argmax(-1, keepdim=True), 1.0)
    return y.to(logits.dtype)


def reference_backward(grad: torch.Tensor, logits: torch.Tensor, tau: float, seed: int, offset: int) -> torch.Tensor:
    n = grad.shape[0]
    _, y = perturbed_softmax(logits, n, tau, seed, offset)
    g = grad.to(y.dtype)
    gl = y * (g - (g * y).sum(-1, keepdim=True)) / tau
    return gl.sum(0).to(logits.dtype)


def check(backend: str, logits, n, tau, hard, seed, offset):
    _checks.tensor(logits, "logits", 2)
    _checks.categories(logits.shape[1])
    _checks.count(n)
    _checks.temperature(tau, logits.dtype)
    _checks.seed_offset(seed, offset)
    _checks.logits_rows(logits)  # no kernel checks the rows: NaN logits would give NaN samples silently


def check_backward(backend: str, grad, logits, tau, seed, offset):
    _checks.tensor(logits, "logits", 2)
    _checks.tensor(grad, "grad", 3, (logits.dtype,))
    _checks.shape(grad, "grad", (grad.shape[0],) + tuple(logits.shape), "[n, R, K]")
    _checks.same_device("grad", grad, logits)
    _checks.temperature(tau, logits.dtype)
    _checks.seed_offset(seed, offset)


def fake(logits, n, tau, hard, seed, offset):
    torch._check(logits.dim() == 2, lambda: "logits must be 2-D [R, K]")
    return logits.new_empty((n,) + tuple(logits.shape))


def fake_backward(grad, logits, tau, seed, offset):
    return torch.empty_like(logits)


def _setup(ctx, inputs, output):
    logits, n, tau, hard, seed, offset = inputs
    ctx.save_for_backward(logits)
    ctx.tau, ctx.seed, ctx.offset = tau, seed, offset


def _formula(backward_op):
    def _backward(ctx, grad):
        (logits,) = ctx.saved_tensors
        gl = None
        if ctx.needs_input_grad[0]:
            gl = backward_op(grad.contiguous(), logits, ctx.tau, ctx.seed, ctx.offset)
        return gl, None, None, None, None, None

    return _backward


def sample_inputs(device, dtype):
    """Valid calls: K = 1, K = 2, odd sizes, an empty batch, a row spanning several 1024-blocks, masked (-inf)
    categories."""
    return [(f"{R}x{K} hard={hard}",
             (_registry.random_rows(device, dtype, R, K, R + K, masked=True), 3, 0.6, hard, 99, 2))
            for R, K in ((1, 1), (3, 2), (37, 11), (0, 5), (2, 4099)) for hard in (False, True)]


# logits [R, K] -> samples [n, R, K] in the logits' dtype; backward: grad [n, R, K] -> grad of logits [R, K]
# (the soft gradient, noise regenerated)
OP = _registry.define(
    "gumbel_softmax",
    "(Tensor logits, SymInt n, float tau, bool hard, SymInt seed, SymInt offset) -> Tensor",
    reference, check, fake,
    _registry.Backward("(Tensor grad, Tensor logits, float tau, SymInt seed, SymInt offset) -> Tensor",
                       reference_backward, check_backward, fake_backward, _setup, _formula),
    sample_inputs=sample_inputs)
gumbel_softmax, gumbel_softmax_backward = OP.op, OP.backward_op
eager = OP.call  # what fastgrad.functional calls: the backend directly in eager mode
__getattr__ = _registry.renamed(__name__, "sample", "eager", eager)  # the old name, for a release

