"""Storchastic's :class:`Infer`: not an estimator but a picker that hands each distribution to one (so, unlike the
estimator files, it imports them)."""
from __future__ import annotations

from typing import Any, Optional, Type

from torch import distributions as D

from ._base import Method, monte_carlo_samples
from .gumbel_softmax import GumbelSoftmax
from .reparameterization import Reparameterization
from .score_function import ScoreFunction


class Infer(Method):
    """Picks an estimator per distribution: reparameterization when available, Gumbel-softmax for
    ``OneHotCategorical``/``Bernoulli``, else the score function (moving-average baseline for one sample,
    batch average for several)."""

    def __init__(self, plate_name: str, distribution_type: Optional[Type[D.Distribution]] = None,
                 sampling_method: Any = None, n_samples: int = 1):
        super().__init__(plate_name, monte_carlo_samples(sampling_method, plate_name, n_samples))
        self.distribution_type = distribution_type
        self._choices = {}

    def _pick(self, distr: D.Distribution) -> Method:
        t = type(distr)
        if t not in self._choices:
            if t.has_rsample:
                m = Reparameterization(self.plate_name, n_samples=self.n_samples)
            elif issubclass(t, (D.OneHotCategorical, D.Bernoulli)):
                m = GumbelSoftmax(self.plate_name, n_samples=self.n_samples)
            else:
                m = ScoreFunction(self.plate_name, n_samples=self.n_samples,
                                  baseline_factory="moving_average" if self.n_samples == 1 else "batch_average")
            self._choices[t] = m
            self.add_module(t.__name__, m)
        return self._choices[t]

    def forward(self, distr: D.Distribution):
        if not isinstance(distr, D.Distribution):
            raise TypeError(f"a method must be called on a torch.distributions.Distribution, got "
                            f"{type(distr).__name__}")
        return self._pick(distr)(distr)
