"""torch.library ops (``torch.ops.fastgrad.*``).

One module per op (``categorical_sample``, ``gumbel_softmax``, ``score_surrogate``, ``enumerate_log_probs``;
``gumbel_topk``; ``linear_log_prob`` holds the fused LM-head ops ``linear_log_prob`` and ``linear_policy_loss``) holds its reference, input contract, fake and autograd formula, and one :func:`_registry.define` call that
registers it. ``_registry`` follows an op to its kernel, ``_backend`` chooses the backend, ``_extension`` loads the
compiled library, ``_checks`` is the contract. :mod:`fastgrad.functional` is the user-facing layer.
"""
from . import (_backend, _philox, categorical_sample, enumerate_log_probs, gumbel_softmax,  # noqa: F401
               gumbel_topk, linear_log_prob, score_surrogate)

OPS = ("categorical_sample", "gumbel_softmax", "score_surrogate", "enumerate_log_probs", "linear_log_prob",
       "linear_policy_loss", "gumbel_topk")
