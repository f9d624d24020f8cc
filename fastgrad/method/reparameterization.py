"""Reparameterization (pathwise) gradients for distributions with ``rsample``."""
from __future__ import annotations

from typing import Any

from ._base import Draw, Facts, Method, Params, monte_carlo_samples


class Reparameterization(Method):
    """``distribution.rsample`` samples; gradients flow along differentiable paths to the costs."""
    facts = Facts("Kingma & Welling, ICLR 2014 (the reparameterization trick)", unbiased=True, evaluations="n",
                  differentiable_cost=True, storchastic="Reparameterization", storchastic_correct=True,
                  takes="reparameterizable (rsample)")

    def __init__(self, plate_name: str, sampling_method: Any = None, n_samples: int = 1):
        super().__init__(plate_name, monte_carlo_samples(sampling_method, plate_name, n_samples))

    def _sample(self, params: Params):
        d = params.raw_distribution()
        if not d.has_rsample:
            raise ValueError(
                f"{type(d).__name__} has no rsample: Reparameterization needs a reparameterizable distribution "
                "(use GumbelSoftmax or ScoreFunction for discrete ones)")
        return Draw(d.rsample((self.n_samples,)), self.n_samples)

