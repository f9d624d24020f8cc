"""Estimators on sets sampled without replacement: ScoreFunctionWOR, UnorderedSetEstimator, RaoBlackwellSF and
UnorderedSetGumbelSoftmax. The math is in :mod:`fastgrad.functional` (``sample_set``, ``extend_set``,
``unordered_set_surrogate``, ``sf_wor_surrogate``; implemented in :mod:`fastgrad.functional.without_replacement`).

The sets are of *joint* configurations: every non-plate batch dimension of the distribution is one more
independent latent, and a set holds ``k`` distinct joint values of all of them (Storchastic's
``SampleWithoutReplacement``), drawn by stochastic beam search without enumerating the ``K**D`` configurations.

**Sequences** (Storchastic's ancestral sampling): a set method that samples again on its plate within one step
extends its beam over the joint configuration of all its draws, whether the new distribution depends on the
earlier draws (its parameters carry the method's plate: one conditional per set member) or not. Each draw gets a
new version of the plate (:class:`~fastgrad._tensor.AncestralPlate`); tensors of earlier draws follow the
sequences they belong to when they meet later ones, and every cost is estimated on the final set with the joint
log-probability of the whole sequences. With ``eos``, a sequence that drew the class ``eos`` is finished: its
later draws are ``eos`` with probability 1.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import distributions as D

from .. import functional as F
from .. import _samplers as S
from .._samplers import SetDraw, SetSampler, _Beam, _check_eos, _check_k, check_integration, priority_set_weights
from ._base import ENUMERABLE, Draw, Facts, Method, Params, StochasticTensor, TemperatureSchedule


class SetMethod(Method):
    """What the set estimators share: a :class:`SetSampler` on the method's plate (its sampling sequence, ``eos``).
    Subclasses turn a :class:`SetDraw` into plate weights."""

    accepts, accepts_name = ENUMERABLE, "enumerable"
    count_name = "k"
    uses_score = True

    def __init__(self, plate_name: str, n_samples: int):
        super().__init__(plate_name, n_samples)
        self._sampler = SetSampler(self.plate_name)

    @property
    def eos(self) -> Optional[int]:
        return self._sampler.eos

    @eos.setter
    def eos(self, value: Optional[int]) -> None:
        self._sampler.eos = _check_eos(value)

    def _live_beam(self) -> Optional[_Beam]:
        return self._sampler.live()

    def _continues(self, plate: Any) -> bool:
        return self._sampler.continues(plate)

    def _draw_set(self, params: Params, k: int) -> SetDraw:
        return self._sampler.draw(params, k, type(self).__name__)

    @property
    def sampling_method(self) -> Any:
        """Storchastic's ``method.sampling_method``: the :mod:`fastgrad.sampling` sampler this method draws with."""
        return self._sampling_method(S)

    def _sampling_method(self, S: Any) -> Any:
        raise NotImplementedError


class ScoreFunctionWOR(SetMethod):
    """The score function on ``k`` samples without replacement with the built-in baseline (Kool, van Hoof & Welling,
    ICLR 2019 DeepRL workshop, "Buy 4 REINFORCE samples, get a baseline for free!"); math in
    :func:`fastgrad.functional.sf_wor_surrogate`.

    Storchastic's conventions: the plate has ``k`` entries; the first ``k - 1`` are weighted by their importance
    weights ``p / q(kappa)`` (divided by their sum when ``biased``), the k-th weighs 0 and only supplies the
    threshold ``kappa`` (its cost is still evaluated). Unbiased when ``biased=False``; ``biased=True`` (the
    normalized estimator, the default) is consistent and exactly invariant to a shift of the cost. ``k`` cost
    evaluations per draw. Categorical, OneHotCategorical and Bernoulli distributions, several latents jointly, and
    sequences of draws (sampling again on the plate; ``eos`` ends a sequence: see the module). Unlike Storchastic
    0.3.7, the cost enters once (doubling the cost doubles the gradient).
    """
    facts = Facts("Kool, van Hoof & Welling, ICLR 2019 workshop", unbiased=False, evaluations="n",
                  storchastic="ScoreFunctionWOR", storchastic_correct=False,
                  storchastic_bug="the cost enters twice: doubling it quadruples the gradient",
                  benchmark=("estimator_variance_cpu", "sf-wor (normalized)"))

    min_samples, min_samples_reason = 2, "the k-th sample is the threshold"

    def __init__(self, plate_name: str, k: int, biased: bool = True, use_baseline: bool = True, *,
                 eos: Optional[int] = None):
        super().__init__(plate_name, _check_k(k))
        self.k = self.n_samples
        self.biased = bool(biased)
        self.use_baseline = bool(use_baseline)
        self.eos = _check_eos(eos)

    def _sample(self, params: Params) -> Draw:
        sd = self._draw_set(params, self.k)
        dtype = sd.rows.logits.dtype
        weight = priority_set_weights(sd, self.biased, "ScoreFunctionWOR").to(dtype)
        return sd.draw(sd.rows.value(sd.idx, dtype), sd.view(weight), state=(sd.view(sd.log_p), sd.view(sd.key)))

    def _sampling_method(self, S: Any) -> Any:
        return S.SampleWithoutReplacement(self.plate_name, self.k, self.biased, eos=self.eos)

    def _surrogate(self, sample: StochasticTensor, cost: torch.Tensor) -> torch.Tensor:
        log_p, pert = sample.draw.state
        surrogate = F.sf_wor_surrogate(log_p, pert, cost, self.use_baseline, self.biased)
        return _on_first(surrogate, sample)

    def extra_repr(self) -> str:
        return f"plate_name={self.plate_name!r}, k={self.k}, biased={self.biased}, use_baseline={self.use_baseline}"


class UnorderedSetEstimator(SetMethod):
    """The unordered-set policy gradient estimator (Kool, van Hoof & Welling, ICLR 2020, "Estimating gradients for
    discrete random variables by sampling without replacement"); math in
    :func:`fastgrad.functional.unordered_set_surrogate`.

    The plate has ``k`` entries weighted ``p(s) R(S, s)`` (the unbiased unordered-set estimate of the expectation);
    with ``use_baseline`` (needs k >= 2) each sample's score carries the built-in leave-one-out baseline. Unbiased;
    ``k`` cost evaluations per draw; Categorical, OneHotCategorical and Bernoulli, several latents jointly.

    ``exact_integration=True`` computes ``R`` by the sum over the ``k!`` orderings (k <= 7) instead of the float64
    integral on ``num_int_points`` points (Storchastic's default is 1000; here 200 already put ``log R`` within 1e-10
    of the exact sum, at a fifth of the cost); ``a`` (the integration shift of Storchastic's integral) is accepted for
    compatibility and not needed (the window of the integral is fitted per set). Sequences of draws and ``eos``:
    see the module.
    """
    facts = Facts("Kool, van Hoof & Welling, ICLR 2020", unbiased=True, evaluations="n",
                  storchastic="UnorderedSetEstimator", storchastic_correct=True,
                  benchmark=("estimator_variance_cpu", "unordered-set"))

    def __init__(self, plate_name: str, k: int, use_baseline: bool = True, exact_integration: bool = False,
                 num_int_points: int = 200, a: float = 5.0, eos: Optional[int] = None):
        super().__init__(plate_name, _check_k(k))
        self.eos = _check_eos(eos)
        self.k = self.n_samples
        self.use_baseline = bool(use_baseline)
        if self.use_baseline and self.k < 2:
            raise ValueError("UnorderedSetEstimator's baseline leaves one sample out: use_baseline=True needs k >= 2")
        self.exact_integration, self.num_int_points = check_integration(exact_integration, num_int_points, self.k)
        self.a = float(a)

    def _sample(self, params: Params) -> Draw:
        sd = self._draw_set(params, self.k)
        if self.use_baseline and sd.idx.shape[0] < 2:
            raise ValueError(f"UnorderedSetEstimator's baseline needs 2 sequences or more, got {sd.idx.shape[0]}")
        log_p = sd.log_p.detach()
        ratios = F.unordered_set_log_ratios(log_p, self.num_int_points, self.exact_integration)
        w = (log_p.double() + ratios[0]).exp()  # p(s) R(S, s): unordered_set_weights, ratios kept
        dtype = sd.rows.logits.dtype
        return sd.draw(sd.rows.value(sd.idx, dtype), sd.view(w.to(dtype)), state=(sd.view(sd.log_p), ratios))

    def _sampling_method(self, S: Any) -> Any:
        return S.UnorderedSet(self.plate_name, self.k, exact_integration=self.exact_integration,
                              num_int_points=self.num_int_points, a=self.a, eos=self.eos)

    def _surrogate(self, sample: StochasticTensor, cost: torch.Tensor) -> torch.Tensor:
        (lp, ratios), w = sample.draw.state, cost
        ratios = tuple(r.view(r.shape[: r.dim() - 1] + w.shape[1:]) for r in ratios)
        surrogate = F.unordered_set_surrogate(lp, w, self.use_baseline, self.num_int_points, self.exact_integration,
                                              log_ratios=ratios)
        return _on_first(surrogate, sample)

    def extra_repr(self) -> str:
        return f"plate_name={self.plate_name!r}, k={self.k}, use_baseline={self.use_baseline}"


def _on_first(per_set: torch.Tensor, sample: StochasticTensor) -> torch.Tensor:
    """A per-set surrogate ``[plates...]`` as a per-element term ``[n, plates...]`` that the framework (which
    reduces the sample's plates with their weights) turns back into ``per_set``: all of it on an entry of nonzero
    weight, divided by that weight."""
    plate = sample.plate
    n = plate.n
    if plate._weight is None:
        return per_set.unsqueeze(0).expand((n,) + per_set.shape) * 1.0
    w = plate._weight._tensor.detach().to(per_set.dtype).expand((n,) + per_set.shape)
    j = w.abs().argmax(0, keepdim=True)  # the entry of largest weight: never 0 (the weights sum to > 0)
    out = torch.zeros_like(w)
    return out.scatter(0, j, (per_set.unsqueeze(0) / w.gather(0, j)))


class RaoBlackwellSF(SetMethod):
    """Sum-and-sample (Liu, Regier, Tripuraneni, Jordan & McAuliffe, ICML 2019, "Rao-Blackwellized stochastic
    gradients for discrete distributions"): the ``n_samples - 1`` most probable configurations are summed exactly
    (plate weights ``p(c)``, differentiable) and one more is sampled from the distribution restricted to the rest
    (weight ``1 - sum p(c)``, score function). Unbiased; ``n_samples`` cost evaluations; Categorical,
    OneHotCategorical and Bernoulli, several latents jointly (the top set by beam search, exact for independent
    latents; the sampled one is the first of a Gumbel-top-``n_samples`` set outside it, an exact draw from the
    rest).

    Beyond Storchastic (keyword-only): ``summed="sampled"`` sums a *sampled* set (the first ``n_samples - 1`` of a
    Gumbel-top-k set; Kool et al. 2020's ``sasbl``), and ``use_baseline=True`` subtracts from the sampled term the
    probability-weighted mean cost of the summed set ``b`` (and ``b`` from the summed terms, which keeps it
    unbiased: ``E[grad log p | not summed] (1 - P) = -grad P``).

    Over a sequence of draws (sampling again on the plate; see the module) the summed sequences are sampled:
    ``summed="sampled"`` is needed there, since the most probable sequences are not known without evaluating the
    conditionals of sequences that were not drawn.
    """
    facts = Facts("Liu, Regier, Tripuraneni, Jordan & McAuliffe, ICML 2019", unbiased=True, evaluations="n",
                  storchastic="RaoBlackwellSF", storchastic_correct=True,
                  benchmark=("estimator_variance_cpu", "rao-blackwell"))

    min_samples, min_samples_reason = 2, "n_samples - 1 summed, one sampled"
    count_name = "n_samples"

    def __init__(self, plate_name: str, n_samples: int, *, summed: str = "top", use_baseline: bool = False,
                 eos: Optional[int] = None):
        super().__init__(plate_name, n_samples)
        if summed not in ("top", "sampled"):
            raise ValueError(f"summed must be 'top' or 'sampled', got {summed!r}")
        self.summed = summed
        self.use_baseline = bool(use_baseline)
        self.eos = _check_eos(eos)

    def _sample(self, params: Params) -> Draw:
        k = self.n_samples
        if self.summed == "top" and self._live_beam() is not None:
            raise ValueError(f"RaoBlackwellSF(summed='top') sums the most probable configurations of one draw; "
                             f"sampling again on plate {self.plate_name!r} continues a sequence, which needs "
                             "summed='sampled'")
        sd = self._draw_set(params, k)
        rows, sidx = sd.rows, sd.idx                                      # [k, R, D]
        if sd.idx.shape[0] < 2:
            raise ValueError(f"RaoBlackwellSF needs 2 sequences or more, got {sd.idx.shape[0]}")
        k = sd.idx.shape[0]
        if self.summed == "sampled":
            idx, lp = sidx, sd.view(sd.log_p)
        else:
            top, _ = F.top_set(rows.logits.detach(), k - 1)                # [k-1, R, D]
            inside = (sidx.unsqueeze(1) == top.unsqueeze(0)).all(-1).any(1)  # [k, R]: drawn config in the top set
            first_out = (~inside).to(torch.int8).argmax(0)                 # [R]: k-1 top configs leave one outside
            rest = sidx.gather(0, first_out.view(1, -1, 1).expand(1, *sidx.shape[1:]))
            idx = torch.cat([top, rest], 0)
            lp = rows.log_prob(idx)                                         # [k, plates...], differentiable
        p = lp[:-1].exp()
        weight = torch.cat([p, (1 - p.sum(0, keepdim=True)).detach().clamp(min=0)], 0)
        dtype = rows.logits.dtype
        return sd.draw(rows.value(idx, dtype), weight.to(dtype), state=lp)

    def _sampling_method(self, S: Any) -> Any:
        # the sampler of summed="sampled" (fastgrad's RaoBlackwellizedSample sums sampled members; the top set of
        # summed="top" has no sampler object)
        return S.RaoBlackwellizedSample(self.plate_name, self.n_samples, eos=self.eos)

    def _surrogate(self, sample: StochasticTensor, cost: torch.Tensor) -> torch.Tensor:
        lp, w = sample.draw.state, cost  # w: [k, plates...]
        pw = sample.plate._weight._tensor.detach()  # [p_1..p_{k-1}, 1 - P]
        score = torch.zeros_like(w)
        adv = w[-1]
        if self.use_baseline:
            summed = pw[:-1].sum(0)
            b = (pw[:-1] * w[:-1]).sum(0) / summed.clamp(min=torch.finfo(summed.dtype).tiny)
            adv = adv - b
            score[:-1] = -b * pw[:-1]
        score[-1] = pw[-1] * adv
        # each term is divided by its plate weight: the framework's reduction multiplies it back in
        safe = torch.where(pw > 0, pw, torch.ones_like(pw))
        return torch.where(pw > 0, score / safe, torch.zeros_like(score)).to(lp.dtype) * lp

    def extra_repr(self) -> str:
        return super().extra_repr() + f", summed={self.summed!r}, use_baseline={self.use_baseline}"


class UnorderedSetGumbelSoftmax(TemperatureSchedule, SetMethod):
    """Storchastic's ``UnorderedSetGumbelSoftmax`` (no paper defines it): a set of ``k`` configurations without
    replacement, each replaced by a relaxed sample ``softmax(z~ / temperature)`` with ``z~`` the Gumbel-perturbed
    log-probabilities conditioned on their argmax being that configuration (per latent; REBAR's conditional Gumbel,
    :func:`fastgrad.functional.conditional_gumbel_categorical`), plate weights ``p(s) R(S, s)`` detached.

    What it estimates: the pathwise gradient of ``sum_s p(s) R(S, s) f(relaxed s)``. It is **biased** twice over:
    the relaxation (as Gumbel-softmax's, vanishing only as the temperature goes to 0) and the dropped gradient of
    the weights ``p(s) R(S, s)``, which depend on the parameters (the score-function part of the unordered-set
    estimator is missing). The conditional draw ignores the without-replacement constraint (each relaxed sample is
    conditioned on its own configuration only). One cost evaluation per set member; OneHotCategorical and
    Bernoulli. The temperature anneals as :class:`GumbelSoftmax`'s (Storchastic's sampler kept it fixed).
    """
    facts = Facts("none: Storchastic's heuristic", unbiased=False, evaluations="n", differentiable_cost=True,
                  storchastic="UnorderedSetGumbelSoftmax", storchastic_correct=None,
                  benchmark=("estimator_variance_cpu", "gumbel-softmax-wor"))

    accepts, accepts_name = (D.OneHotCategorical, D.Bernoulli), None
    uses_score = False

    def __init__(self, plate_name: str, k: int, initial_temperature: float = 1.0, min_temperature: float = 1.0e-4,
                 annealing_rate: float = 1.0e-5, eos: Optional[int] = None):
        super().__init__(plate_name, _check_k(k))
        self.eos = _check_eos(eos)
        self.k = self.n_samples
        self.init_schedule(initial_temperature, min_temperature, annealing_rate)

    def _sample(self, params: Params) -> Draw:
        sd = self._draw_set(params, self.k)
        rows, idx = sd.rows, sd.idx
        n = idx.shape[0]
        w = F.unordered_set_weights(sd.log_p.detach())
        if sd.logits.shape[0] == 1:                                          # one conditional for every member
            z = F.conditional_gumbel_categorical(sd.logits[0], idx)         # [n, R, D, K], differentiable
        else:                                                                # each member's own conditional
            z = F.conditional_gumbel_categorical(sd.logits.reshape(-1, rows.K), idx.reshape(1, -1))
        y = torch.softmax(z / self.temperature.to(z.dtype), -1).to(rows.logits.dtype)
        y = y.reshape((n,) + rows.pshape + rows.extra + (rows.K,))
        if issubclass(rows.kind, D.Bernoulli):
            y = y[..., 1]
        return sd.draw(y, sd.view(w.to(rows.logits.dtype)))

    def _sampling_method(self, S: Any) -> Any:
        return S.GumbelSoftmaxWOR(self.plate_name, self.k, float(self.temperature), float(self.min_temperature),
                                  float(self.annealing_rate), eos=self.eos)

    def extra_repr(self) -> str:
        return f"plate_name={self.plate_name!r}, k={self.k}"


GumbelSoftmaxWOR = UnorderedSetGumbelSoftmax  # Storchastic's name of the sampler this method is built on
