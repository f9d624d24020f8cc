"""Storchastic's sampling methods (``storch.sampling``): how :class:`~fastgrad.method.ScoreFunction` draws its
samples, through its ``sampling_method=`` argument, with Storchastic's constructors. Each draws a weighted sample:
values, plate weights ``w_i`` (detached) and the log-probabilities ``log p(z_i)`` the score function
differentiates, so that ``sum_i w_i (f(z_i) - b) grad log p(z_i)`` is the gradient estimate.

The set samplers share the set estimators' sampling (:class:`~fastgrad.method.without_replacement.SetSampler`):
sampling again on the plate continues the sequence, ``eos`` ends one. The estimators named after these samplers
(:class:`~fastgrad.method.ScoreFunctionWOR`, :class:`~fastgrad.method.UnorderedSetEstimator`,
:class:`~fastgrad.method.RaoBlackwellSF`) add their built-in baselines; these give the plain weighted score function.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import distributions as D

from .. import functional as F
from ._base import Draw, Params, check_n_samples, check_plate_name, sum_latents
from .without_replacement import SetSampler, _check_eos, _check_k

__all__ = ["SamplingMethod", "MonteCarlo", "Enumerate", "ImportanceSampling", "SampleWithoutReplacement",
           "UnorderedSet", "GumbelSoftmaxWOR", "RaoBlackwellizedSample", "MAPOSample", "Weighted"]


@dataclass
class Weighted:
    """The state of a weighted draw: ``log_p`` ``[n, plates...]`` (differentiable) and which elements carry a score
    term (``scored`` bool ``[n]``, ``None``: all)."""
    log_p: torch.Tensor
    scored: Optional[torch.Tensor] = None


class SamplingMethod:
    """Base of the sampling methods: the plate they sample on (it must be the method's)."""

    def __init__(self, plate_name: str):
        self.plate_name = check_plate_name(plate_name)

    def _draw(self, params: Params, owner: str) -> Draw:
        raise NotImplementedError

    def _continues(self, plate: Any) -> bool:
        return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(plate_name={self.plate_name!r})"


class MonteCarlo(SamplingMethod):
    """``n_samples`` independent samples (the default of every method)."""

    def __init__(self, plate_name: str, n_samples: int = 1):
        super().__init__(plate_name)
        self.n_samples = check_n_samples(n_samples)


class Enumerate(SamplingMethod):
    """Every joint configuration of a categorical or Bernoulli's latents, weighted by its probability (detached):
    the weighted score function is then the exact gradient. ``K**D`` evaluations, at most ``budget``."""

    def __init__(self, plate_name: str, budget: int = 10000):
        super().__init__(plate_name)
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget must be a positive int, got {budget!r}")
        self.budget = budget

    def _draw(self, params: Params, owner: str) -> Draw:
        from .expect import enumerate_draw
        d = enumerate_draw(params, self.budget, f"{owner}({self.plate_name!r})")
        lp = torch.where(torch.isfinite(d.state), d.state, torch.zeros_like(d.state))  # weight 0: no term
        return Draw(d.value, d.n, d.weight.detach(), state=Weighted(lp))


class ImportanceSampling(SamplingMethod):
    """``n`` samples from ``proposal`` (a distribution over the same values, not differentiated), weighted
    ``p(z) / (n q(z))`` (detached): unbiased when ``q > 0`` wherever ``p > 0``. ``n`` evaluations."""

    def __init__(self, plate_name: str, n: int, proposal: D.Distribution):
        super().__init__(plate_name)
        self.n = check_n_samples(n)
        if not isinstance(proposal, D.Distribution):
            raise TypeError(f"proposal must be a torch.distributions.Distribution, got {type(proposal).__name__}")
        self.proposal = proposal

    def _draw(self, params: Params, owner: str) -> Draw:
        npl = len(params.plates)
        p = params.raw_distribution()
        qb, pb = tuple(self.proposal.batch_shape), tuple(p.batch_shape)
        if len(qb) > len(pb) or tuple(self.proposal.event_shape) != tuple(p.event_shape):
            raise ValueError(f"ImportanceSampling: the proposal's samples {qb + tuple(self.proposal.event_shape)} do "
                             f"not fit the distribution's shape {pb + tuple(p.event_shape)}")
        lead = pb[:len(pb) - len(qb)]  # independent draws per element of the dims the proposal does not have
        with torch.no_grad():
            value = self.proposal.sample((self.n,) + lead)
            log_q = self.proposal.log_prob(value)
        try:
            value = value.expand((self.n,) + pb + tuple(p.event_shape))
            log_q = log_q.expand((self.n,) + pb)
        except RuntimeError:
            raise ValueError(f"ImportanceSampling: the proposal's samples {qb + tuple(self.proposal.event_shape)} do "
                             f"not fit the distribution's shape {pb + tuple(p.event_shape)}") from None
        lp = sum_latents(p.log_prob(value), npl + 1)
        log_w = (lp.detach() - sum_latents(log_q, npl + 1)) - math.log(self.n)
        return Draw(value, self.n, log_w.exp().to(lp.dtype), state=Weighted(lp))

    def __repr__(self) -> str:
        return f"ImportanceSampling(plate_name={self.plate_name!r}, n={self.n}, proposal={self.proposal!r})"


class SampleWithoutReplacement(SamplingMethod):
    """``k`` distinct configurations (sequences, when sampling again on the plate) by stochastic beam search, each
    of the first ``k - 1`` weighted by its priority-sampling weight ``p / q(kappa)`` (Kool, van Hoof & Welling
    2019; Duffield et al. 2007), the k-th 0; ``biased_iw`` divides by their sum (consistent, not unbiased). The
    weighted score function is unbiased without ``biased_iw``. ``k`` evaluations."""

    min_k = 2

    def __init__(self, plate_name: str, k: int, biased_iw: bool = False, eos: Optional[int] = None):
        super().__init__(plate_name)
        self.k = _check_k(k)
        if self.k < self.min_k:
            raise ValueError(f"{type(self).__name__} needs k >= {self.min_k}, got {self.k}")
        self.biased_iw = bool(biased_iw)
        self.eos = _check_eos(eos)
        self._sampler = SetSampler(self.plate_name)

    def _continues(self, plate: Any) -> bool:
        return self._sampler.continues(plate)

    def _set(self, params: Params, owner: str):
        self._sampler.eos = self.eos
        return self._sampler.draw(params, self.k, owner)

    def _weights(self, sd) -> torch.Tensor:
        log_p = sd.log_p.detach()
        if log_p.shape[0] < 2:
            raise ValueError(f"{type(self).__name__} needs 2 sequences or more, got {log_p.shape[0]}")
        iw = F.priority_weights(log_p[:-1], sd.key[-1])
        if self.biased_iw:
            iw = iw / iw.sum(0)
        return torch.cat([iw, torch.zeros_like(iw[:1])], 0)

    def _draw(self, params: Params, owner: str) -> Draw:
        sd = self._set(params, owner)
        dtype = sd.rows.logits.dtype
        w = sd.view(self._weights(sd).to(dtype))
        return sd.draw(sd.rows.value(sd.idx, dtype), w, state=Weighted(sd.view(sd.log_p), self._scored(sd)))

    def _scored(self, sd) -> Optional[torch.Tensor]:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(plate_name={self.plate_name!r}, k={self.k})"


class UnorderedSet(SampleWithoutReplacement):
    """``k`` distinct configurations (or sequences) weighted ``p(s) R(S, s)``, the unordered-set estimator's weights
    (Kool, van Hoof & Welling, ICLR 2020): the weighted score function is unbiased. ``num_int_points`` as
    :class:`~fastgrad.method.UnorderedSetEstimator`'s; ``comp_leave_two_out`` and ``a`` are accepted for
    compatibility (the leave-two-out ratios feed only that estimator's baseline)."""

    min_k = 1

    def __init__(self, plate_name: str, k: int, comp_leave_two_out: bool = False, exact_integration: bool = False,
                 num_int_points: int = 1000, a: float = 5.0, eos: Optional[int] = None):
        super().__init__(plate_name, k, eos=eos)
        self.comp_leave_two_out = bool(comp_leave_two_out)
        self.exact_integration = bool(exact_integration)
        if self.exact_integration and self.k > 7:
            raise ValueError(f"exact_integration sums over k! orderings: k <= 7, got {self.k}")
        self.num_int_points = _check_k(num_int_points, "num_int_points")
        if self.num_int_points < 2:
            raise ValueError(f"num_int_points must be >= 2, got {num_int_points}")
        self.a = float(a)

    def _weights(self, sd) -> torch.Tensor:
        return F.unordered_set_weights(sd.log_p.detach(), self.num_int_points, self.exact_integration)


class GumbelSoftmaxWOR(UnorderedSet):
    """The relaxed unordered set of :class:`~fastgrad.method.UnorderedSetGumbelSoftmax` (that method's sampler;
    Storchastic's constructor). A pathwise sampler: the score function does not take it."""

    def __init__(self, plate_name: str, k: int, initial_temperature: float = 1.0, min_temperature: float = 1.0e-4,
                 annealing_rate: float = 1.0e-5, eos: Optional[int] = None):
        super().__init__(plate_name, k, eos=eos)
        self.initial_temperature = float(initial_temperature)
        self.min_temperature = float(min_temperature)
        self.annealing_rate = float(annealing_rate)

    def _draw(self, params: Params, owner: str) -> Draw:
        raise ValueError(f"{owner}: GumbelSoftmaxWOR draws relaxed samples for a pathwise estimator; use "
                         "fastgrad.method.UnorderedSetGumbelSoftmax")


class RaoBlackwellizedSample(SampleWithoutReplacement):
    """Sum and sample (Liu et al., ICML 2019): the first ``k - 1`` members of a set without replacement summed with
    weights ``p`` (detached here; their score terms give ``sum grad p f``), the k-th sampled from the rest, weighted
    ``1 - P``. Over one draw Storchastic sums the ``k - 1`` most probable configurations; here the summed ones are
    sampled (:class:`~fastgrad.method.RaoBlackwellSF` ``summed="sampled"``), which stays unbiased over sequences.
    Unbiased; ``k`` evaluations."""

    def _weights(self, sd) -> torch.Tensor:
        p = sd.log_p.detach()[:-1].exp()
        return torch.cat([p, (1 - p.sum(0, keepdim=True)).clamp(min=0)], 0)


class MAPOSample(SampleWithoutReplacement):
    """Storchastic's ``MAPOSample(plate_name, buffer_size, eos)``: its buffer of high-reward sequences was never
    implemented there (it samples ``buffer_size + 1`` sequences without replacement); the same here, with the
    priority-sampling weights of :class:`SampleWithoutReplacement`."""

    def __init__(self, plate_name: str, buffer_size: int, eos: Optional[int] = None):
        super().__init__(plate_name, _check_k(buffer_size, "buffer_size") + 1, eos=eos)
        self.buffer_size = self.k - 1
