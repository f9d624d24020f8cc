"""``fastgrad::score_surrogate``: the REINFORCE surrogate ``w * log_softmax(l)[index]`` at vocabulary scale.

Forward: one pass over each row of logits (online max/sum-exp) gives ``lse``; the output is
``w[s, r] * (l[r, index[s, r]] - lse[r])``. Backward writes the gradient once:
``dl[r, :] = sum_s g[s, r] w[s, r] (onehot(index[s, r]) - softmax(l[r]))``. The full log_softmax is never
materialized; only ``lse`` (one float per row) is saved.
"""
from __future__ import annotations

from typing import Tuple

import torch

from . import _checks, _registry

KERNEL_CHECKS_VALUES = ("cpp",)  # backends whose forward kernel rejects invalid rows and indices itself


def _acc(logits: torch.Tensor) -> torch.dtype:
    return _checks.acc_dtype(logits.dtype)


def _check_common(logits, index, weight, weight_name: str) -> None:
    _checks.tensor(logits, "logits", 2)
    _checks.categories(logits.shape[1])
    _checks.tensor(index, "index", 2, (torch.int64,))
    R = logits.shape[0]
    if index.shape[1] != R:
        raise ValueError(f"index must have shape [n, R] with R = {R} (the logits' rows), got {tuple(index.shape)}")
    _checks.tensor(weight, weight_name, 2, _checks.WEIGHT_FLOATS)
    _checks.shape(weight, weight_name, index.shape, "[n, R] (the index's shape)")
    _checks.same_device("index", index, logits)
    _checks.same_device(weight_name, weight, logits)


def check(backend: str, logits, index, weight):
    _check_common(logits, index, weight, "weight")
    if backend in KERNEL_CHECKS_VALUES:
        return None
    _checks.indices(index, logits.shape[1])
    return lambda out: _checks.rows(out[1])  # the op's per-row logsumexp doubles as the NaN/inf check


def check_backward(backend: str, grad, logits, index, weight, lse):
    _check_common(logits, index, weight, "weight")
    _checks.tensor(grad, "grad", 2, _checks.WEIGHT_FLOATS)
    _checks.shape(grad, "grad", index.shape, "[n, R] (the index's shape)")
    _checks.tensor(lse, "lse", 1, (_acc(logits),))
    _checks.shape(lse, "lse", logits.shape[:1], "[R]")
    _checks.indices(index, logits.shape[1])  # every backward kernel writes at these indices


def reference(logits: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    lf = logits.to(_acc(logits))
    lse = torch.logsumexp(lf, -1)  # [R]
    picked = lf.gather(-1, index.t()).t()  # [n, R]
    out = weight.to(lf.dtype) * (picked - lse)
    return out.to(weight.dtype), lse


def reference_backward(grad: torch.Tensor, logits: torch.Tensor, index: torch.Tensor, weight: torch.Tensor,
                       lse: torch.Tensor) -> torch.Tensor:
    acc = _acc(logits)
    a = grad.to(acc) * weight.to(acc)  # [n, R]
    p = torch.exp(logits.to(acc) - lse.to(acc).unsqueeze(-1))
    gl = -a.sum(0).unsqueeze(-1) * p
    gl.scatter_add_(-1, index.t(), a.t())
    return gl.to(logits.dtype)


def fake(logits, index, weight):
    torch._check(logits.dim() == 2, lambda: "logits must be 2-D [R, K]")
    return torch.empty_like(weight), logits.new_empty(logits.shape[:1], dtype=_acc(logits))


def fake_backward(grad, logits, index, weight, lse):
    return torch.empty_like(logits)


def _setup(ctx, inputs, output):
    logits, index, weight = inputs
    ctx.save_for_backward(logits, index, weight, output[1])


def _formula(backward_op):
    def _backward(ctx, grad, _grad_lse):
        logits, index, weight, lse = ctx.saved_tensors
        gl = gw = None
        if grad is None:  # only lse was used
            return None, None, None
        if ctx.needs_input_grad[0]:
            gl = backward_op(grad.contiguous(), logits, index, weight, lse)
        if ctx.needs_input_grad[2]:
            # out = w * logp  =>  d out / d w = logp
            logp = logits.to(lse.dtype).gather(-1, index.t()).t() - lse
            gw = (grad.to(lse.dtype) * logp).to(weight.dtype)
        return gl, None, gw

    return _backward


def sample_inputs(device, dtype):
    """Valid calls: K = 1, K = 2, odd sizes, an empty batch, a row spanning several 1024-blocks."""
    g = torch.Generator().manual_seed(4)
    wdt = torch.float64 if dtype == torch.float64 else torch.float32
    out = []
    for R, K in ((1, 1), (3, 2), (37, 11), (0, 5), (2, 4099)):
        logits = (2 * torch.randn(R, K, generator=g)).to(device=device, dtype=dtype)
        idx = torch.randint(0, K, (4, R), generator=g).to(device)
        out.append((f"{R}x{K}", (logits, idx, torch.randn(4, R, generator=g, dtype=wdt).to(device))))
    return out


# logits [R, K], index int64 [n, R], weight [n, R] (float32/float64) -> (surrogate [n, R] in the weight's dtype,
# lse [R]: float64 for float64 logits, else float32)
OP = _registry.define(
    "score_surrogate",
    "(Tensor logits, Tensor index, Tensor weight) -> (Tensor, Tensor)",
    reference, check, fake,
    _registry.Backward("(Tensor grad, Tensor logits, Tensor index, Tensor weight, Tensor lse) -> Tensor",
                       reference_backward, check_backward, fake_backward, _setup, _formula),
    sample_inputs=sample_inputs)
score_surrogate, score_surrogate_backward = OP.op, OP.backward_op
eager = OP.call  # what fastgrad.functional calls: the backend directly in eager mode
__getattr__ = _registry.renamed(__name__, "surrogate", "eager", eager)  # the old name, for a release

