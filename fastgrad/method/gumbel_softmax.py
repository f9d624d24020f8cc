"""Gumbel-softmax (Concrete) relaxation, optionally straight-through.

The math is :func:`fastgrad.functional.gumbel_softmax`."""
from __future__ import annotations

from typing import Any

import torch
from torch import distributions as D

from .. import functional as F
from ._base import Draw, Facts, Method, Params, TemperatureSchedule, monte_carlo_samples


class GumbelSoftmax(TemperatureSchedule, Method):
    """Reparameterized relaxed samples of a ``OneHotCategorical`` (or ``Bernoulli``).

    The temperature starts at ``initial_temperature`` and after each backward is multiplied by
    ``1 - annealing_rate``, floored at ``min_temperature`` (Storchastic's schedule). With
    ``straight_through=True`` the forward value is one-hot and the gradient is the relaxed one. Jang, Gu & Poole
    2017 and Maddison, Mnih & Teh 2017; biased (the relaxation's), one cost evaluation per sample.
    """
    facts = Facts("Jang, Gu & Poole, ICLR 2017; Maddison, Mnih & Teh, ICLR 2017", unbiased=False, evaluations="n",
                  differentiable_cost=True, storchastic="GumbelSoftmax", storchastic_correct=True,
                  benchmark=("estimator_variance_cpu", "gumbel-softmax"))

    accepts = (D.OneHotCategorical, D.Bernoulli)

    def __init__(self, plate_name: str, sampling_method: Any = None, n_samples: int = 1,
                 straight_through: bool = False, initial_temperature: float = 1.0,
                 min_temperature: float = 1.0e-4, annealing_rate: float = 1.0e-5):
        super().__init__(plate_name, monte_carlo_samples(sampling_method, plate_name, n_samples))
        self.init_schedule(initial_temperature, min_temperature, annealing_rate)
        self.straight_through = bool(straight_through)

    def _sample(self, params: Params):
        n, tau, hard = self.n_samples, float(self.temperature), self.straight_through
        if isinstance(params.distr, D.OneHotCategorical):
            return Draw(F.gumbel_softmax(params.logits(), tau, n, hard), n)
        logits = params.bernoulli_logits()
        two = torch.stack([torch.zeros_like(logits), logits], -1)
        return Draw(F.gumbel_softmax(two, tau, n, hard)[..., 1], n)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", straight_through={self.straight_through}"
