"""Gumbel-softmax (Concrete) relaxation, optionally straight-through.

The math is :func:`fastgrad.functional.gumbel_softmax`."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import distributions as D

from .. import functional as F
from ._base import Draw, Method, Params, refuse_sampling_method


def check_temperature(name: str, v: object) -> float:
    """A temperature: a positive finite float (a ValueError naming ``name`` otherwise)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite float, got {v!r}")
    return float(v)


def check_schedule(initial_temperature: object, min_temperature: object, annealing_rate: object) -> None:
    """The temperature schedule of the relaxed estimators: positive finite temperatures, a rate in [0, 1)."""
    check_temperature("initial_temperature", initial_temperature)
    check_temperature("min_temperature", min_temperature)
    if isinstance(annealing_rate, bool) or not isinstance(annealing_rate, (int, float)) \
            or not 0 <= annealing_rate < 1:
        raise ValueError(f"annealing_rate must be in [0, 1), got {annealing_rate!r}")


class GumbelSoftmax(Method):
    """Reparameterized relaxed samples of a ``OneHotCategorical`` (or ``Bernoulli``).

    The temperature starts at ``initial_temperature`` and after each backward is multiplied by
    ``1 - annealing_rate``, floored at ``min_temperature`` (Storchastic's schedule). With
    ``straight_through=True`` the forward value is one-hot and the gradient is the relaxed one.
    """

    def __init__(self, plate_name: str, sampling_method: Any = None, n_samples: int = 1,
                 straight_through: bool = False, initial_temperature: float = 1.0,
                 min_temperature: float = 1.0e-4, annealing_rate: float = 1.0e-5):
        super().__init__(plate_name, n_samples)
        refuse_sampling_method(sampling_method)
        check_schedule(initial_temperature, min_temperature, annealing_rate)
        self.straight_through = bool(straight_through)
        self.register_buffer("temperature", torch.tensor(float(initial_temperature)))
        self.register_buffer("min_temperature", torch.tensor(float(min_temperature)))
        self.register_buffer("annealing_rate", torch.tensor(float(annealing_rate)))

    def _sample(self, params: Params):
        n, tau, hard = self.n_samples, float(self.temperature), self.straight_through
        d = params.distr
        if isinstance(d, D.OneHotCategorical):
            return Draw(F.gumbel_softmax(params.logits(), tau, n, hard), n)
        if isinstance(d, D.Bernoulli):
            logits = params.bernoulli_logits()
            two = torch.stack([torch.zeros_like(logits), logits], -1)
            y = F.gumbel_softmax(two, tau, n, hard)[..., 1]
            return Draw(y, n)
        raise ValueError(f"GumbelSoftmax needs a OneHotCategorical or Bernoulli distribution, got "
                         f"{type(d).__name__}")

    def _update_parameters(self) -> None:
        with torch.no_grad():
            self.temperature.copy_(torch.clamp(self.temperature * (1 - self.annealing_rate),
                                               min=self.min_temperature))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", straight_through={self.straight_through}"
