"""Score function (REINFORCE) with optional baselines.

The math is :func:`fastgrad.functional.score_function_surrogate`."""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch

from .. import functional as F
from .._tensor import reindex
from ._base import (Facts, Method, Params, Tensor, align, aligned_cost, extra_dims, reduce_plates, reduce_term,
                    sample_log_prob, sample_plain, stale_versions, sum_latents)
from .._samplers import MonteCarlo, SamplingMethod, Weighted

_BASELINES = ("none", "batch_average", "moving_average")


class ScoreFunction(Method):
    """Score-function estimator ``(cost - b) * grad log p(z)``.

    Args:
        plate_name: name of the sample plate.
        sampling_method: ``None`` (``n_samples`` Monte Carlo samples) or one of Storchastic's sampling methods
            (:mod:`fastgrad.sampling`: ``MonteCarlo``, ``Enumerate``, ``ImportanceSampling``,
            ``SampleWithoutReplacement``, ``UnorderedSet``, ``RaoBlackwellizedSample``, ``MAPOSample``) on the same
            plate: the estimate is then the weighted score function ``sum_i w_i (f(z_i) - b) grad log p(z_i)``
            over its weighted draw (unbiased for each of them except ``SampleWithoutReplacement(biased_iw=True)``);
            the set samplers continue a sequence when sampling again on the plate.
        n_samples: samples per draw (int >= 1).
        baseline_factory: ``None``/``"None"``, ``"batch_average"`` (leave-one-out mean of the other samples,
            needs n_samples > 1) or ``"moving_average"`` (EMA, decay 0.95, of earlier steps' plate-reduced costs), or a
            callable ``(sample, cost) -> baseline tensor``.
    """
    facts = Facts("Williams, Machine Learning 1992 (REINFORCE)", unbiased=True, evaluations="n",
                  storchastic="ScoreFunction", storchastic_correct=False,
                  storchastic_bug="its moving_average baseline holds the current cost (biased)",
                  benchmark=("estimator_variance_cpu", "score-function (loo)"))

    uses_score = True

    def __init__(self, plate_name: str, sampling_method: Any = None, n_samples: int = 1,
                 baseline_factory: Union[None, str, Callable] = None, exponential_decay: float = 0.95):
        if sampling_method is not None and not isinstance(sampling_method, SamplingMethod):
            raise TypeError(f"sampling_method must be None or a fastgrad.sampling sampling method, got "
                            f"{type(sampling_method).__name__}")
        if sampling_method is not None and sampling_method.plate_name != plate_name:
            raise ValueError("The plate name of the sampling method and the storch method should match.")
        if isinstance(sampling_method, MonteCarlo):
            n_samples, sampling_method = sampling_method.n_samples, None
        super().__init__(plate_name, n_samples)
        self.sampling_method = sampling_method
        self._baseline_fn: Optional[Callable] = None
        self.baseline = "none"
        if isinstance(baseline_factory, str):
            key = baseline_factory.lower()
            if key not in _BASELINES:
                raise ValueError(f"baseline_factory must be one of {_BASELINES} (or None), got {baseline_factory!r}")
            if key == "batch_average" and self.sampling_method is not None:
                raise ValueError("baseline_factory 'batch_average' averages i.i.d. samples; with a weighted "
                                 "sampling_method use None, 'moving_average' or a callable")
            if key == "batch_average" and self.n_samples <= 1:
                raise ValueError("baseline_factory 'batch_average' can only be used for n_samples > 1.")
            self.baseline = key
        elif callable(baseline_factory):
            self.baseline = "custom"
            self._baseline_fn = baseline_factory
        elif baseline_factory is not None:
            raise TypeError("baseline_factory must be None, a str or a callable, "
                            f"got {type(baseline_factory).__name__}")
        self.register_buffer("exponential_decay", torch.tensor(float(exponential_decay)))
        self.register_buffer("moving_average", torch.tensor(0.0))

    def _sample(self, params: Params):
        if self.sampling_method is not None:
            return self.sampling_method._draw(params, type(self).__name__)
        return sample_plain(params, self.n_samples)

    def _continues(self, plate) -> bool:
        return self.sampling_method is not None and self.sampling_method._continues(plate)

    def _baseline(self, sample, cost: Tensor, weight: torch.Tensor):
        if self.baseline == "batch_average":
            return "batch_average"
        if self.baseline == "moving_average":
            # the average of earlier steps' costs: one that already holds this step's cost depends on the sample
            # and biases the estimate (by a factor 1 - (1 - decay) / n; Storchastic updates first)
            b = self.moving_average.clone()
            avg = reduce_plates(cost)._tensor.detach()
            self.moving_average = (self.exponential_decay * self.moving_average
                                   + (1 - self.exponential_decay) * avg.to(self.moving_average))
            return b.to(weight)
        if self.baseline == "custom":
            b = self._baseline_fn(sample, cost)
            return b._tensor if isinstance(b, Tensor) else b
        return None

    def surrogate(self, sample, cost: Tensor) -> torch.Tensor:
        # the baselines see the registered cost (reduced only over the plates the sample lacks, Storchastic's
        # baseline-factory argument; reducing the aligned cost instead would weigh a plate the cost was already
        # reduced over, whose weights need not sum to 1); the term sees it aligned
        stale = stale_versions(sample, cost)
        if stale:
            return self._per_sequence(sample, cost, stale)
        c, w = aligned_cost(sample, cost)
        return reduce_term(sample, self._term(sample, w, self._baseline(sample, c, w)))

    def _per_sequence(self, sample, cost: Tensor, stale) -> torch.Tensor:
        """A sample drawn given an earlier draw of a sampling sequence, and a cost on a later draw: each final
        sequence's cost with the score of the sample of its own prefix (``sum_j w_j (c_j - b) grad log p(a_anc(j))``,
        unbiased: the sample is drawn independently given each prefix)."""
        lp = Tensor(self._log_prob(sample), sample.draw_plates)
        for old, new in stale.items():
            lp = reindex(lp, new)                                        # each final sequence: its prefix's sample
        others = [p for p in cost.plates if not any(p is q for q in lp.plates)]
        c = reduce_plates(cost, others) if others else cost
        w = align(c, lp.plates, 0).detach().expand(lp._tensor.shape)
        term = F.score_function_surrogate_from_log_prob(lp._tensor, w, self._baseline(sample, c, w))
        return reduce_plates(Tensor(term - term.detach(), lp.plates), detach_weights=False)._tensor

    def _log_prob(self, sample) -> torch.Tensor:
        """``log p(z)`` of each element ``[n, plates...]`` (summed over the latents inside one draw)."""
        state = sample.draw.state
        return state.log_p if isinstance(state, Weighted) else sample_log_prob(sample)

    def _surrogate(self, sample, cost: torch.Tensor) -> torch.Tensor:
        return self._term(sample, cost, self._baseline(sample, Tensor(cost, sample.draw_plates), cost))

    def _term(self, sample, w: torch.Tensor, baseline) -> torch.Tensor:
        params, idx = sample.params, sample.draw.state  # w: [n, plate dims...]
        npl = len(sample.plates)
        if isinstance(idx, Weighted):  # a sampling method's weighted draw: its log-probabilities, its weights
            return F.score_function_surrogate_from_log_prob(idx.log_p, w, baseline)
        if idx is not None:
            logits = params.logits()
            extra = extra_dims(params, logits, 1)
            w = w.reshape(w.shape + (1,) * len(extra)).expand(idx.shape)
            if isinstance(baseline, torch.Tensor) and baseline.dim():
                baseline = baseline.reshape(baseline.shape + (1,) * len(extra))
            term = F.score_function_surrogate(logits.expand(idx.shape[1:] + logits.shape[-1:]), idx, w, baseline)
            return sum_latents(term, npl)  # independent latents inside one draw: their log-probs add up
        lp = sum_latents(params.raw_distribution().log_prob(sample._tensor), npl)
        return F.score_function_surrogate_from_log_prob(lp, w, baseline)

    def extra_repr(self) -> str:
        sm = "" if self.sampling_method is None else f", sampling_method={self.sampling_method!r}"
        return super().extra_repr() + f", baseline_factory={self.baseline!r}" + sm
