"""torch.library ops (``torch.ops.fastgrad.*``): schema, reference, fake, autograd and backend dispatch.

One module per op: ``categorical_sample``, ``gumbel_softmax``, ``score_surrogate``, ``enumerate_log_probs``.
They take flat, validated, contiguous inputs; :mod:`fastgrad.functional` is the user-facing layer.
"""
from . import _backend, _philox, categorical_sample, enumerate_log_probs, gumbel_softmax, score_surrogate  # noqa: F401

OPS = ("categorical_sample", "gumbel_softmax", "score_surrogate", "enumerate_log_probs")
