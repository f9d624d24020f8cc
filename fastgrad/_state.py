"""The one piece of global state: what the current step has registered (costs, samples, methods).

Cleared by :func:`reset` after every :func:`fastgrad.backward` and before any fastgrad exception propagates,
so an error never leaves stale costs or samples behind for the next step.
"""
from typing import Any, List

costs: List[Any] = []  # CostTensor, in registration order
samples: List[Any] = []  # StochasticTensor, in sampling order
hooks: List[Any] = []  # autograd hook handles that fill StochasticTensor.param_grads


def reset() -> None:
    for h in hooks:
        h.remove()
    hooks.clear()
    costs.clear()
    samples.clear()


def fail(exc: Exception) -> Exception:
    """Reset, then return ``exc`` for the caller to raise: no fastgrad error leaves a half-built step behind."""
    reset()
    return exc
