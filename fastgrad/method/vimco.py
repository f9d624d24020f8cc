"""VIMCO: the multi-sample leave-one-out estimator of the importance-weighted bound. The math is
:func:`fastgrad.functional.vimco_surrogate`."""
from __future__ import annotations

from typing import Any

import torch

from .. import functional as F
from ._base import Draw, Facts, Method, Params, monte_carlo_samples, sample_log_prob, sample_plain


class VIMCO(Method):
    """VIMCO (Mnih & Rezende, ICML 2016, "Variational inference for Monte Carlo objectives").

    The cost registered for the sample is read as the negative log importance weight of each of the K samples,
    ``cost_k = -log w_k = -(log p(x, z_k) - log q(z_k))``; the objective is the K-sample bound
    ``L = log mean_k w_k`` (IWAE), and the gradient ``backward()`` produces is ``-`` VIMCO's estimate of
    ``grad E[L]``: the pathwise gradient of ``L`` (self-normalized weights on ``grad log w_k``) plus
    ``sum_k (L - L_-k) grad log q(z_k)`` with the leave-one-out baselines ``L_-k`` (``log w_k`` replaced by the
    mean of the others). Unbiased for ``grad E[L]``; K = ``n_samples`` >= 2 samples, one cost evaluation each;
    any distribution with ``log_prob`` (samples are not reparameterized; categorical families use the fused
    sampler). ``backward()`` reports the plate mean of the cost (the mean ``-log w``), not ``-L``: compute ``L``
    from the costs for monitoring (``torch.logsumexp(-cost, 0) - log K``). Register one cost per VIMCO sample: each
    registered cost is treated as its own ``-log w``.
    """
    facts = Facts("Mnih & Rezende, ICML 2016", unbiased=True, evaluations="n", objective="E[log mean_k exp(-f_k)]")

    min_samples, min_samples_reason = 2, "its baselines leave one sample out"
    uses_score = True
    detach_cost = False  # -log w_k keeps its pathwise graph

    def __init__(self, plate_name: str, n_samples: int = 2, sampling_method: Any = None):
        super().__init__(plate_name, monte_carlo_samples(sampling_method, plate_name, n_samples))

    def _sample(self, params: Params) -> Draw:
        return sample_plain(params, self.n_samples)

    def _surrogate(self, sample, cost: torch.Tensor) -> torch.Tensor:
        w = cost  # [K, plates...]: -log w_k, with its pathwise graph
        log_q = sample_log_prob(sample)
        bound = F.vimco_surrogate(log_q, -w, dim=0)  # [plates...]: value L, gradient VIMCO's
        # backward() already adds the plate mean of the cost (gradient mean_k grad(-log w_k)); this term turns the
        # total into -grad L: its gradient is that of (-L - mean_k cost_k), its value zero
        return (-bound - w.mean(0)).unsqueeze(0).expand(w.shape)
