"""fastgrad: fast gradient estimation through discrete random variables.

Storchastic-compatible: ``import fastgrad as storch`` runs Storchastic code (plates, ``denote_independent``,
``add_cost``, ``backward``, methods). The estimators are also plain functions in :mod:`fastgrad.functional`,
backed by fused ops (:mod:`fastgrad.ops`) with C++, CUDA and Triton kernels.
"""
from . import exceptions, functional, method, ops
from ._api import (cat, deterministic, gather, grad, ignore_wrapping, logsumexp, make_left_broadcastable, mean,
                   print_graph, reduce, sum)
from ._graph import (NoCostError, add_cost, backward, costs, denote_independent, gather_samples, reduce_plates,
                     reset, surrogate_loss, variance)
from ._tensor import (AncestralPlate, CostTensor, IllegalStorchExposeError, IndependentTensor, Plate, StochasticTensor,
                      Tensor, is_tensor)
from .ops._backend import backend, cpu_cache_bytes, empty_cache, get_backend, set_backend
from . import nn, sampling  # noqa: E402  (after the names they use)
from ._env import collect_env  # noqa: E402

from ._version import __version__  # noqa: E402,F401

__all__ = [
    "Plate", "AncestralPlate", "Tensor", "StochasticTensor", "CostTensor", "IndependentTensor",
    "denote_independent", "add_cost", "backward", "reset", "costs", "gather_samples", "variance",
    "reduce_plates", "NoCostError", "functional", "method", "ops", "set_backend", "get_backend", "backend",
    "collect_env", "empty_cache", "cpu_cache_bytes", "IllegalStorchExposeError", "is_tensor", "exceptions",
    "surrogate_loss",
    "cat", "gather", "mean", "sum", "logsumexp", "grad", "print_graph", "deterministic", "reduce",
    "make_left_broadcastable", "ignore_wrapping", "nn", "sampling",
]
