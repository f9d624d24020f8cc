"""ARM, DisARM, ARMS and CARMS: antithetic samples. The math is :func:`fastgrad.functional.arm_surrogate`,
:func:`fastgrad.functional.disarm_surrogate` and, for categoricals, :func:`fastgrad.functional.categorical_disarm_surrogate`."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import distributions as D

from .. import functional as F
from ..functional._validate import check_order
from ._base import Draw, Facts, Method, Params, monte_carlo_samples, sum_latents


class ARM(Method):
    """ARM (Yin & Zhou, ICLR 2019): unbiased, 2 cost evaluations per pair, Bernoulli distributions only.

    Storchastic's conventions, which user code sees: the plate has ``2 * n_samples`` entries (the samples, then
    their antithetic partners), weighted ``1/n`` and ``0``, so a plate-reduced cost is the mean over the first
    half; samples are floats in the distribution's dtype.
    """
    facts = Facts("Yin & Zhou, ICLR 2019", unbiased=True, evaluations="2*n", storchastic="ARM",
                  storchastic_correct=True, benchmark=("relax_toy_cpu", "arm"))

    accepts = (D.Bernoulli,)
    uses_score = True

    def __init__(self, plate_name: str, sampling_method: Any = None, n_samples: int = 1):
        super().__init__(plate_name, monte_carlo_samples(sampling_method, plate_name, n_samples,
                                                         "antithetic Monte Carlo pairs"))

    def _sample(self, params: Params) -> Draw:
        logits = params.bernoulli_logits()
        n = self.n_samples
        b, u = F.arm_sample(logits.detach(), n)
        npl = len(params.plates)
        half = torch.full((n,) + (1,) * npl, 1.0 / n, dtype=b.dtype, device=b.device)
        weight = torch.cat([half, torch.zeros_like(half)], 0)  # [2n, 1...]: the antithetic half weighs 0
        return Draw(b, 2 * n, weight, state=u)

    def _pair_term(self, params: Params, b: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.arm_surrogate(params.bernoulli_logits(), u, w)

    def _surrogate(self, sample, cost: torch.Tensor) -> torch.Tensor:
        # cost [2n, plates...] -> the pair's term [n, plates...]
        term = sum_latents(self._pair_term(sample.params, sample._tensor, sample.draw.state, cost), len(sample.plates))
        # the antithetic half carries no weight of its own: the pair's term sits on its first sample
        return torch.cat([term, torch.zeros_like(term)], 0)


class DisARM(ARM):
    """DisARM (Dong, Mnih & Tucker, NeurIPS 2020): ARM with its noise integrated out; unbiased, variance never
    above ARM's at the same 2 evaluations per pair. Same plate conventions as :class:`ARM`.
    (Storchastic's DisARM returns bool samples and adds the antithetic cost instead of subtracting it.)

    Bernoulli distributions, and beyond Storchastic Categorical and OneHotCategorical ones: the coupled estimator
    of Dong, Mnih & Tucker (NeurIPS 2021), DisARM on the stick-breaking decisions of each categorical, with the
    classes in ``logits_order`` (:func:`fastgrad.functional.categorical_disarm_surrogate`);
    ``importance_weighting=True`` is their DisARM-IW. Both unbiased, 2 cost evaluations per pair."""
    facts = Facts("Dong, Mnih & Tucker, NeurIPS 2020; categorical: NeurIPS 2021", unbiased=True, evaluations="2*n",
                  storchastic="DisARM", storchastic_correct=False,
                  storchastic_bug="returns bool samples and adds the antithetic cost: mean 0",
                  benchmark=("estimator_variance_cpu", "disarm (stick breaking)"))

    accepts = (D.Bernoulli, D.Categorical, D.OneHotCategorical)

    def __init__(self, plate_name: str, sampling_method: Any = None, n_samples: int = 1, *,
                 importance_weighting: bool = False, logits_order: Optional[str] = "ascending"):
        super().__init__(plate_name, sampling_method, n_samples)
        self.importance_weighting = bool(importance_weighting)
        self.logits_order = check_order(logits_order)
        if self.importance_weighting and self.logits_order != "ascending":
            raise ValueError("importance_weighting needs logits_order='ascending' (the weighted estimator is "
                             "biased in another order)")

    def _sample(self, params: Params) -> Draw:
        if isinstance(params.distr, D.Bernoulli):
            return super()._sample(params)
        logits = params.logits()
        n = self.n_samples
        z, u = F.categorical_disarm_sample(logits.detach(), n, order=self.logits_order)
        if isinstance(params.distr, D.OneHotCategorical):
            z = torch.nn.functional.one_hot(z, logits.shape[-1]).to(logits.dtype)
        npl = len(params.plates)
        half = torch.full((n,) + (1,) * npl, 1.0 / n, dtype=logits.dtype, device=logits.device)
        return Draw(z, 2 * n, torch.cat([half, torch.zeros_like(half)], 0), state=u)

    def _pair_term(self, params, b, u, w):
        if isinstance(params.distr, D.Bernoulli):
            return F.disarm_surrogate(params.bernoulli_logits(), b, w)
        return F.categorical_disarm_surrogate(params.logits(), u, w, order=self.logits_order,
                                              importance_weighting=self.importance_weighting)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", importance_weighting={self.importance_weighting}, "
                f"logits_order={self.logits_order!r}")


class ARMS(Method):
    """ARMS (Dimitriev & Zhou, ICML 2021): ``n_samples >= 2`` mutually antithetic Bernoulli samples from a
    Dirichlet copula and a correlation-corrected leave-one-out baseline; unbiased, n cost evaluations, Bernoulli
    only; DisARM at n = 2. The plate has ``n_samples`` equally weighted entries (every sample is a real draw)."""
    facts = Facts("Dimitriev & Zhou, ICML 2021", unbiased=True, evaluations="n",
                  benchmark=("double_cv_toy_cpu", "arms n=4"))

    accepts = (D.Bernoulli,)
    min_samples, min_samples_reason = 2, "mutually antithetic samples"
    uses_score = True

    def __init__(self, plate_name: str, sampling_method: Any = None, n_samples: int = 2):
        super().__init__(plate_name, monte_carlo_samples(sampling_method, plate_name, n_samples,
                                                         "a Dirichlet copula over the samples"))

    def _sample(self, params: Params) -> Draw:
        return Draw(F.arms_sample(params.bernoulli_logits().detach(), self.n_samples), self.n_samples)

    def _surrogate(self, sample, cost: torch.Tensor) -> torch.Tensor:
        term = F.arms_surrogate(sample.params.bernoulli_logits(), sample._tensor, cost)  # cost [n, plates...]
        return sum_latents(term, len(sample.plates))


class CARMS(ARMS):
    """CARMS (Dimitriev & Zhou, NeurIPS 2021, "CARMS: Categorical-Antithetic-REINFORCE Multi-Sample Gradient
    Estimator", CARMS-I): ``n_samples >= 2`` mutually antithetic samples of each categorical from a Dirichlet
    copula through the inverse CDF, and every ordered pair's cost difference reweighted from the pair's antithetic
    law to the independent one (:func:`fastgrad.functional.carms_surrogate`); unbiased, n cost evaluations;
    Categorical and OneHotCategorical; ARMS at two classes. The plate has ``n_samples`` equally weighted
    entries (every sample is a real draw)."""
    facts = Facts("Dimitriev & Zhou, NeurIPS 2021", unbiased=True, evaluations="n",
                  benchmark=("estimator_variance_carms_cpu", "carms"))

    accepts = (D.Categorical, D.OneHotCategorical)  # ARMS's constructor and plate (the same copula)

    def _sample(self, params: Params) -> Draw:
        logits = params.logits()
        idx = F.carms_sample(logits.detach(), self.n_samples)
        z = torch.nn.functional.one_hot(idx, logits.shape[-1]).to(logits.dtype) \
            if isinstance(params.distr, D.OneHotCategorical) else idx
        return Draw(z, self.n_samples, state=idx)

    def _surrogate(self, sample, cost: torch.Tensor) -> torch.Tensor:
        term = F.carms_surrogate(sample.params.logits(), sample.draw.state, cost)  # cost [n, plates...]
        return sum_latents(term, len(sample.plates))


__all__ = ["ARM", "DisARM", "ARMS", "CARMS"]
