"""The samplers of the graph API's set estimators and Storchastic's sampling methods (``storch.sampling``).

:class:`SetSampler` draws sets without replacement on a plate: the first draw of a step
(:func:`fastgrad.functional.sample_set`) or one more in the plate's sampling sequence
(:func:`fastgrad.functional.extend_set`), with ``eos`` ending sequences; the set estimators of
:mod:`fastgrad.method.without_replacement` and the set sampling methods below share it.

The sampling methods are how :class:`~fastgrad.method.ScoreFunction` draws its samples through its
``sampling_method=`` argument, with Storchastic's constructors (re-exported by :mod:`fastgrad.sampling`). Each
draws a weighted sample: values, plate weights ``w_i`` (detached) and the log-probabilities ``log p(z_i)`` the score
function differentiates, so that ``sum_i w_i (f(z_i) - b) grad log p(z_i)`` is the gradient estimate. The
estimators named after the set samplers (:class:`~fastgrad.method.ScoreFunctionWOR`,
:class:`~fastgrad.method.UnorderedSetEstimator`, :class:`~fastgrad.method.RaoBlackwellSF`) add their built-in
baselines; passed to ``ScoreFunction``, these samplers give the weighted score function without those baselines.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Tuple

import torch
from torch import distributions as D

from . import functional as F
from .functional._validate import check_n
from ._tensor import AncestralPlate, Tensor, align, reindex, resolve_ancestral, union_plates
from .method._base import Draw, Params, Rows, check_n_samples, check_plate_name, step_generation, sum_latents
from .method.expect import enumerate_draw

__all__ = ["SamplingMethod", "MonteCarlo", "Enumerate", "ImportanceSampling", "SampleWithoutReplacement",
           "UnorderedSet", "GumbelSoftmaxWOR", "RaoBlackwellizedSample", "MAPOSample", "Weighted"]


def _check_k(k: object, name: str = "k") -> int:
    return check_n(k, name)


def _check_eos(eos: object) -> Optional[int]:
    if eos is not None and (isinstance(eos, bool) or not isinstance(eos, int) or eos < 0):
        raise ValueError(f"eos must be None or a class index (a non-negative int), got {eos!r}")
    return eos


def _set_size(logits: torch.Tensor, k: int) -> int:
    """``min(k, configurations)`` when every row has the same number of configurations of nonzero probability (as
    Storchastic's ``min(k, |D|**D)``: a first draw smaller than the beam a sequence grows to); otherwise ``k`` (and
    :func:`~fastgrad.functional.sample_set` names the rows that have too few)."""
    if not logits.numel():
        return k
    logc = torch.isfinite(logits).sum(-1).clamp(min=1).double().log().sum(-1)   # [R]
    if float(logc.min()) >= math.log(k) - 1e-9:
        return k
    c = logc.exp().round()
    return int(c.min()) if float(c.min()) == float(c.max()) else k


def priority_set_weights(sd: "SetDraw", biased: bool, owner: str) -> torch.Tensor:
    """A set's priority-sampling weights ``[n, R]`` (Kool, van Hoof & Welling 2019): ``p / q(kappa)`` on the first
    ``n - 1`` members (divided by their sum when ``biased``), 0 on the n-th, whose key is the threshold ``kappa``."""
    log_p = sd.log_p.detach()
    if log_p.shape[0] < 2:
        raise ValueError(f"{owner} needs 2 sequences or more for its threshold, got {log_p.shape[0]}")
    iw = F.priority_weights(log_p[:-1], sd.key[-1])
    if biased:
        iw = iw / iw.sum(0)
    return torch.cat([iw, torch.zeros_like(iw[:1])], 0)


def check_integration(exact_integration: object, num_int_points: object, k: int) -> Tuple[bool, int]:
    """The unordered-set ratio's options: ``exact_integration`` (the k! orderings, k <= 7) and ``num_int_points``
    (>= 2) of the numerical integral."""
    exact = bool(exact_integration)
    if exact and k > 7:
        raise ValueError(f"exact_integration sums over k! orderings: k <= 7, got {k}")
    points = _check_k(num_int_points, "num_int_points")
    if points < 2:
        raise ValueError(f"num_int_points must be >= 2, got {num_int_points}")
    return exact, points


class _Beam(NamedTuple):
    """A set method's sampling sequence in the current step: the newest plate, the plates the sets are batched over
    (``others``), and per member ``[n, others...]`` the joint log-probability (differentiable), the Gumbel key and
    whether its sequence has ended."""
    generation: int
    plate: AncestralPlate
    others: Tuple[Any, ...]
    log_p: torch.Tensor
    key: torch.Tensor
    finished: Optional[torch.Tensor]


class SetDraw(NamedTuple):
    """One draw of a set method (first or continuing a sequence): ``idx`` ``[n, R, D]``, joint ``log_p`` ``[n, R]``
    (differentiable), ``key`` ``[n, R]``, the ``rows`` view (for values), each member's ``logits`` ``[n or 1, R, D,
    K]`` (differentiable), and where the sample goes: ``plate``, ``others``, ``continued``."""
    idx: torch.Tensor
    log_p: torch.Tensor
    key: torch.Tensor
    rows: Rows
    logits: torch.Tensor
    plate: AncestralPlate
    others: Tuple[Any, ...]
    continued: bool

    def view(self, t: torch.Tensor) -> torch.Tensor:
        return self.rows.plate_view(t)

    def draw(self, value: torch.Tensor, weight: Optional[torch.Tensor], state: Any = None) -> Draw:
        return Draw(value, self.idx.shape[0], weight, state, plate=self.plate, others=self.others,
                    plate_last=self.continued)


class SetSampler:
    """Draws sets without replacement on one plate: the first draw of a step (:func:`fastgrad.functional.
    sample_set`) or one more in the plate's sampling sequence (:func:`~fastgrad.functional.extend_set`), ``eos``
    ending sequences. Used by the set estimators and by ``ScoreFunction(sampling_method=...)``."""

    def __init__(self, plate_name: str):
        self.plate_name = plate_name
        self.eos: Optional[int] = None
        self._beam: Optional[_Beam] = None

    def live(self) -> Optional[_Beam]:
        beam = self._beam
        return beam if beam is not None and beam.generation == step_generation() else None

    def continues(self, plate: Any) -> bool:
        beam = self.live()
        return beam is not None and isinstance(plate, AncestralPlate) and plate.lineage is beam.plate.lineage

    def draw(self, params: Params, k: int, owner: str) -> SetDraw:
        beam = self.live()
        if beam is None:
            rows = Rows(params)
            if self.eos is not None and rows.logits.shape[1] != 1:
                raise ValueError(f"eos ends sequences of single categoricals: {owner} got "
                                 f"{rows.logits.shape[1]} latents per draw")
            k = _set_size(rows.logits, k)
            idx, log_p, key = F.sample_set(rows.logits.detach(), k)
            lp = rows.log_prob(idx).reshape(log_p.shape)                      # differentiable
            plate = AncestralPlate(self.plate_name, k)
            others, continued, logits = params.plates, False, rows.logits.unsqueeze(0)
            fin = (idx[..., 0] == self.eos) if self.eos is not None else None
        else:
            rows, lp, key, fin, logits, plate, others, idx = self._extend(params, beam, k, owner)
            continued = True
        fin_view = None if fin is None else fin.reshape((fin.shape[0],) + rows.pshape)
        self._beam = _Beam(step_generation(), plate, others, rows.plate_view(lp), rows.plate_view(key), fin_view)
        return SetDraw(idx, lp, key, rows, logits, plate, others, continued)

    def _extend(self, params: Params, beam: _Beam, k: int, owner: str):
        head = beam.plate
        cl = Rows.class_logits(params)                                        # [plates..., latents..., K]
        t = Tensor(cl, params.plates)
        if any(p.name == self.plate_name and p is not head for p in t.plates):
            t = reindex(t, head)                                              # parameters of an earlier draw
        state = [Tensor(x, (head,) + beam.others) for x in (beam.log_p, beam.key, beam.finished) if x is not None]
        # another sequence that continued since the last draw: the sets follow its sequences (each its own beam)
        t, *state = resolve_ancestral([t] + state)
        # the sets split over plates the new parameters bring (a plate name reused with another size: an error)
        others = union_plates((state[0].plates[1:], tuple(p for p in t.plates if p is not head)))
        sizes = tuple(p.n for p in others)
        ev = t.event_dims
        raw = align(t, (head,) + others, ev)
        conditional = raw.shape[0] != 1                                       # one conditional per set member
        raw = raw.expand((raw.shape[0],) + sizes + raw.shape[1 + len(others):])
        extra = tuple(raw.shape[1 + len(others):-1])
        R, Dn, K = int(torch.Size(sizes).numel()), int(torch.Size(extra).numel()), raw.shape[-1]
        logits = raw.reshape(raw.shape[0], R, Dn, K)                          # [n|1, R, D, K]
        if self.eos is not None and Dn != 1:
            raise ValueError(f"eos ends sequences of single categoricals: {owner} got {Dn} latents "
                             "per draw")

        def prev(x: Optional[Tensor]) -> Optional[torch.Tensor]:
            if x is None:
                return None
            return align(x, (head,) + others, 0).expand((head.n,) + sizes).reshape(head.n, R)

        lp, key = state[0], state[1]
        fin = state[2] if len(state) > 2 else None
        ext = F.extend_set(prev(lp), prev(key), logits, k, finished=prev(fin), eos=self.eos)
        n = ext.indices.shape[0]
        plate = AncestralPlate(self.plate_name, n, parent=head)
        plate.selected = Tensor(ext.parent.reshape((n,) + sizes), (plate,) + others)
        rows = Rows.of(params.distr.__class__, logits[0], sizes, extra, per_member=True)
        member = logits if not conditional else logits.gather(
            0, ext.parent[..., None, None].expand(n, R, Dn, K))
        return rows, ext.log_p, ext.perturbed, ext.finished, member, plate, others, ext.indices


@dataclass
class Weighted:
    """The state of a weighted draw: ``log_p`` ``[n, plates...]``, each element's log-probability (differentiable;
    the joint one over a sequence)."""
    log_p: torch.Tensor


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
        return priority_set_weights(sd, self.biased_iw, type(self).__name__)

    def _draw(self, params: Params, owner: str) -> Draw:
        sd = self._set(params, owner)
        dtype = sd.rows.logits.dtype
        w = sd.view(self._weights(sd).to(dtype))
        return sd.draw(sd.rows.value(sd.idx, dtype), w, state=Weighted(sd.view(sd.log_p)))

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
        self.exact_integration, self.num_int_points = check_integration(exact_integration, num_int_points, self.k)
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

    def __init__(self, plate_name: str, k: int, eos: Optional[int] = None):
        super().__init__(plate_name, k, eos=eos)  # Storchastic's constructor: no importance-weight option

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
