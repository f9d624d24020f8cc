"""torch.library ops (``torch.ops.fastgrad.*``).

One module per op holds its reference, input contract, fake, autograd formula, sample inputs and the one
:mod:`._registry` declaration that registers it: ``categorical_sample``, ``gumbel_softmax``, ``score_surrogate``,
``enumerate_log_probs`` and ``gumbel_topk`` (kernels: ``csrc/cpu/<op>.cpp``, ``csrc/cuda/<op>.cu``,
``fastgrad/kernels/<op>.py``), and the fused LM head's ``linear_log_prob`` and ``linear_policy_loss`` (one Python
driver, :mod:`._lm_head`, over the row kernels ``linear_rows``: C++ on the CPU, Triton on CUDA tensors, torch
otherwise; no CUDA kernel of their own). ``_registry`` follows an op to its kernel and records every op (:data:`OPS`
lists their names), ``_backend`` chooses the backend, ``_extension`` loads the compiled library, ``_checks`` is the
input contract. :mod:`fastgrad.functional` is the user-facing layer.
"""
from . import (_backend, _philox, categorical_sample, enumerate_log_probs, gumbel_softmax,  # noqa: F401
               gumbel_topk, linear_log_prob, linear_policy_loss, score_surrogate)
from ._registry import REGISTRY

OPS = tuple(REGISTRY)  # every op's name, in declaration order
