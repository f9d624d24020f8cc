"""The one piece of global state: what the current step has registered (costs, samples, methods).

Cleared by :func:`reset` after every :func:`fastgrad.backward`, and whenever an exception leaves a graph-API
call: every public entry point of the graph API (the functions of ``fastgrad._graph``, methods' constructors
and calls, torch functions and operators on plate tensors) is wrapped by :func:`resets_on_error`, the one place
that does it. So an error never leaves a half-built step's costs or samples behind for the next step.
"""
import functools
from typing import Any, Callable, List, TypeVar

costs: List[Any] = []  # CostTensor, in registration order
samples: List[Any] = []  # StochasticTensor, in sampling order
hooks: List[Any] = []  # autograd hook handles that fill StochasticTensor.param_grads
generation = 0  # counts resets: a method's per-step state (a set method's beam) is live while this is unchanged

F = TypeVar("F", bound=Callable[..., Any])


def reset() -> None:
    global generation
    generation += 1
    for h in hooks:
        h.remove()
    hooks.clear()
    costs.clear()
    samples.clear()


def resets_on_error(fn: F) -> F:
    """Wrap a graph-API entry point: any exception escaping it resets the step first, then propagates.

    ``AttributeError`` is not an error of the step (``hasattr``/``getattr(x, name, default)`` use it to
    probe) and passes through untouched."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AttributeError:
            raise
        except BaseException:
            reset()
            raise

    wrapper.__wrapped_resets__ = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]
