"""Pathwise estimators beyond Gumbel-softmax: Gumbel-entmax and Gumbel-sparsemax (sparse relaxations), ReinMax (with
its Gumbel-Rao-averaged and control-variate variants), Gumbel-Rao, Gapped and Decoupled Straight-Through
(straight-through with better backward passes), IndeCateR (per-variable exact sums) and SIMPLE (k-subsets). The math
is in :mod:`fastgrad.functional` (``gumbel_entmax``, ``reinmax``, ``reinmax_rao``, ``reinmax_cv``, ``gumbel_rao``,
``gapped_straight_through``, ``decoupled_straight_through``, ``indecater_weights``, ``simple``)."""
from __future__ import annotations

from typing import Any

import torch
from torch import distributions as D

from .. import functional as F
from ..functional._validate import check_alpha, check_finite_float, check_n
from ._base import Draw, Facts, Method, Params, Rows, TemperatureSchedule, check_temperature, monte_carlo_samples


class GumbelEntmax(TemperatureSchedule, Method):
    """Gumbel-entmax: ``entmax_alpha((log p + Gumbel) / temperature)`` samples of a ``OneHotCategorical`` (Paulus et
    al., NeurIPS 2020, "Gradient estimation with stochastic softmax tricks", appendix; entmax: Peters, Niculae &
    Martins 2019). A pathwise, biased relaxation with exact zeros; one cost evaluation per sample. With
    ``straight_through`` the forward value is the one-hot argmax and the gradient the relaxed one (Storchastic
    0.3.7 ignores the flag). Storchastic's signature: the third positional argument is ``alpha``; the temperature
    anneals as :class:`GumbelSoftmax`'s, by default not at all (``annealing_rate=0``). ``adaptive=True`` (a learned
    alpha) is not supported."""
    facts = Facts(
                  "Paulus, Choi, Tarlow, Krause & Maddison, NeurIPS 2020 (appendix); "
                  "entmax: Peters, Niculae & Martins, ACL 2019",
                  unbiased=False, evaluations="n", differentiable_cost=True, storchastic="GumbelEntmax",
                  storchastic_correct=False, storchastic_bug="ignores straight_through",
                  benchmark=("estimator_variance_cpu", "gumbel-entmax"))

    accepts = (D.OneHotCategorical,)

    def __init__(self, plate_name: str, sampling_method: Any = None, alpha: float = 1.5, adaptive: bool = False,
                 n_samples: int = 1, straight_through: bool = False, initial_temperature: float = 1.0,
                 min_temperature: float = 1.0e-4, annealing_rate: float = 0.0):
        super().__init__(plate_name, monte_carlo_samples(sampling_method, plate_name, n_samples))
        if adaptive:
            raise ValueError("adaptive=True (a learned alpha) is not supported; pass a fixed alpha")
        self.alpha = check_alpha(alpha)
        self.init_schedule(initial_temperature, min_temperature, annealing_rate)
        self.straight_through = bool(straight_through)

    def _sample(self, params: Params) -> Draw:
        y = F.gumbel_entmax(params.logits(), self.alpha, float(self.temperature), self.n_samples,
                            self.straight_through)
        return Draw(y, self.n_samples)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", alpha={self.alpha}, straight_through={self.straight_through}"


class GumbelSparseMax(GumbelEntmax):
    """Gumbel-sparsemax: :class:`GumbelEntmax` with ``alpha = 2`` (sparsemax, Martins & Astudillo 2016)."""
    facts = Facts("Paulus et al., NeurIPS 2020 (appendix); sparsemax: Martins & Astudillo, ICML 2016", unbiased=False,
                  evaluations="n", differentiable_cost=True, storchastic="GumbelSparseMax", storchastic_correct=False,
                  storchastic_bug="ignores straight_through", benchmark=("estimator_variance_cpu", "gumbel-sparsemax"))

    def __init__(self, plate_name: str, sampling_method: Any = None, n_samples: int = 1,
                 straight_through: bool = False, initial_temperature: float = 1.0, min_temperature: float = 1.0e-4,
                 annealing_rate: float = 0.0):
        super().__init__(plate_name, sampling_method, 2.0, n_samples=n_samples, straight_through=straight_through,
                         initial_temperature=initial_temperature, min_temperature=min_temperature,
                         annealing_rate=annealing_rate)


def _one_hot_logits(params: Params):
    """Logits ``[..., K]`` of a OneHotCategorical, or ``[..., 2]`` (``[0, l]``) of a Bernoulli, and how to map a
    one-hot sample back."""
    if isinstance(params.distr, D.OneHotCategorical):
        return params.logits(), lambda y: y
    bl = params.bernoulli_logits()
    return torch.stack([torch.zeros_like(bl), bl], -1), lambda y: y[..., 1]


class ReinMax(Method):
    """ReinMax (Liu et al., NeurIPS 2023, "Bridging discrete and backpropagation: straight-through and beyond"):
    hard samples forward, a second-order (Heun) straight-through backward; math in
    :func:`fastgrad.functional.reinmax`. Biased; one cost evaluation per sample; OneHotCategorical and Bernoulli.
    ``temperature`` (>= 1 recommended by the paper) enters the backward only."""
    facts = Facts("Liu, Dong, Liu, Yu & Gao, NeurIPS 2023", unbiased=False, evaluations="n",
                  differentiable_cost=True, benchmark=("estimator_variance_cpu", "reinmax"))

    accepts = (D.OneHotCategorical, D.Bernoulli)

    def __init__(self, plate_name: str, sampling_method: Any = None, n_samples: int = 1, temperature: float = 1.0):
        super().__init__(plate_name, monte_carlo_samples(sampling_method, plate_name, n_samples))
        self.temperature = check_temperature("temperature", temperature)

    def _sample(self, params: Params) -> Draw:
        logits, back = _one_hot_logits(params)
        return Draw(back(F.reinmax(logits, self.n_samples, self.temperature)), self.n_samples)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", temperature={self.temperature}"


class ReinMaxRao(Method):
    """ReinMax-Rao (Wang & Bui 2026, arXiv 2603.08257, "Beyond ReinMax"): ReinMax with its first Jacobian replaced
    by a Gumbel-Rao average over ``conditional_samples`` Gumbels conditioned on the sample, at the midpoint
    ``(pi + D) / 2`` (which changes its expected gradient: not a Rao-Blackwellization of ReinMax); math in
    :func:`fastgrad.functional.reinmax_rao`. Biased; one cost evaluation per sample; OneHotCategorical and
    Bernoulli. ``temperature``: the conditional Gumbel-softmax's (the authors use 1); unlike :class:`ReinMax`'s, it
    does not enter the midpoint."""
    facts = Facts("Wang & Bui, 2026 (arXiv 2603.08257)", unbiased=False, evaluations="n", differentiable_cost=True,
                  benchmark=("estimator_variance_reinmax_cpu", "reinmax-rao"))

    accepts = (D.OneHotCategorical, D.Bernoulli)

    def __init__(self, plate_name: str, sampling_method: Any = None, n_samples: int = 1, temperature: float = 1.0,
                 conditional_samples: int = 100):
        super().__init__(plate_name, monte_carlo_samples(sampling_method, plate_name, n_samples))
        self.temperature = check_temperature("temperature", temperature)
        self.conditional_samples = check_n(conditional_samples, "conditional_samples")

    def _sample(self, params: Params) -> Draw:
        logits, back = _one_hot_logits(params)
        y = F.reinmax_rao(logits, self.n_samples, self.temperature, self.conditional_samples)
        return Draw(back(y), self.n_samples)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", temperature={self.temperature}, " \
                                      f"conditional_samples={self.conditional_samples}"


class ReinMaxCV(ReinMaxRao):
    """ReinMax-CV (Wang & Bui 2026, arXiv 2603.08257, "Beyond ReinMax"): Gumbel-max samples, ReinMax's backward plus
    ``eta`` times the difference of the Gumbel-Rao and the Gumbel-softmax Jacobians at ReinMax's midpoint; math in
    :func:`fastgrad.functional.reinmax_cv`. Biased; one cost evaluation per sample; OneHotCategorical and
    Bernoulli. ``temperature``: the control variate's (the ReinMax part runs at 1, as the authors'); ``eta = 0`` is
    ``ReinMax(temperature=1)`` with Gumbel-max samples (other samples than ReinMax's for the same seed)."""
    facts = Facts("Wang & Bui, 2026 (arXiv 2603.08257)", unbiased=False, evaluations="n", differentiable_cost=True,
                  benchmark=("estimator_variance_reinmax_cpu", "reinmax-cv"))

    def __init__(self, plate_name: str, sampling_method: Any = None, n_samples: int = 1, temperature: float = 1.0,
                 eta: float = 0.7, conditional_samples: int = 100):
        super().__init__(plate_name, sampling_method, n_samples, temperature, conditional_samples)
        self.eta = check_finite_float(eta, "eta")

    def _sample(self, params: Params) -> Draw:
        logits, back = _one_hot_logits(params)
        y = F.reinmax_cv(logits, self.n_samples, self.temperature, self.eta, self.conditional_samples)
        return Draw(back(y), self.n_samples)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", eta={self.eta}"


class GumbelRao(Method):
    """Gumbel-Rao (Paulus, Maddison & Krause, ICLR 2021, "Rao-Blackwellizing the straight-through Gumbel-softmax
    gradient estimator"): hard samples forward, the straight-through Gumbel-softmax Jacobian averaged over
    ``conditional_samples`` Gumbels conditioned on the sample; math in :func:`fastgrad.functional.gumbel_rao`. The
    same expectation as straight-through Gumbel-softmax at the same temperature (so as biased), lower variance; one
    cost evaluation per sample; OneHotCategorical and Bernoulli."""
    facts = Facts("Paulus, Maddison & Krause, ICLR 2021", unbiased=False, evaluations="n", differentiable_cost=True,
                  benchmark=("estimator_variance_cpu", "gumbel-rao"))

    accepts = (D.OneHotCategorical, D.Bernoulli)

    def __init__(self, plate_name: str, sampling_method: Any = None, n_samples: int = 1, temperature: float = 1.0,
                 conditional_samples: int = 10):
        super().__init__(plate_name, monte_carlo_samples(sampling_method, plate_name, n_samples))
        self.temperature = check_temperature("temperature", temperature)
        self.conditional_samples = check_n(conditional_samples, "conditional_samples")

    def _sample(self, params: Params) -> Draw:
        logits, back = _one_hot_logits(params)
        y = F.gumbel_rao(logits, self.n_samples, self.temperature, self.conditional_samples)
        return Draw(back(y), self.n_samples)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", temperature={self.temperature}, " \
                                      f"conditional_samples={self.conditional_samples}"


class IndeCateR(Method):
    """IndeCateR (De Smet, Sansone & Zuidberg Dos Martires, NeurIPS 2023, "Differentiable sampling of categorical
    distributions using the CatLog-derivative trick"): for each of ``n_samples`` samples and each of the ``D``
    independent latents, the cost is evaluated at all ``K`` values of that latent with the others kept, and the
    gradient is ``sum_d sum_c grad p_d(c) mean_s f(x_-d, c)``; math in :func:`fastgrad.functional.indecater_weights`.
    Unbiased, Rao-Blackwellized per latent; ``n_samples * D * K`` cost evaluations, all in one call of the user's
    cost (the plate holds the ``S D K`` neighbours, ordered ``[s, d, c]``, weighted so that the plate-reduced cost is
    the estimate of ``E[f]``). Categorical, OneHotCategorical and Bernoulli (``K = 2``)."""
    facts = Facts("De Smet, Sansone & Zuidberg Dos Martires, NeurIPS 2023", unbiased=True, evaluations="n*D*K",
                  benchmark=("estimator_variance_cpu", "indecater"))

    accepts = (D.Categorical, D.OneHotCategorical, D.Bernoulli)

    def __init__(self, plate_name: str, n_samples: int = 1):
        super().__init__(plate_name, n_samples)

    def _sample(self, params: Params) -> Draw:
        rows = Rows(params)
        S = self.n_samples
        logits = rows.logits                                                    # [R, D, K]
        x = F.sample_categorical(logits.detach(), S)                            # [S, R, D]
        nb = F.indecater_samples(x, rows.K)                                     # [S, D, K, R, D]
        n = S * logits.shape[1] * rows.K
        idx = nb.reshape((n,) + tuple(nb.shape[3:]))                            # [S D K, R, D]
        w = F.indecater_weights(logits, S).reshape((n,) + rows.pshape)          # [S D K, plates...]
        return Draw(rows.value(idx, logits.dtype), n, w.to(logits.dtype))


class SIMPLE(Method):
    """SIMPLE (Ahmed, Zeng, Niepert & Van den Broeck, ICLR 2023, "SIMPLE: A Gradient Estimator for k-Subset
    Sampling"): a ``Bernoulli(logits=...)`` over the last dimension's ``n`` items read as independent Bernoullis
    conditioned on exactly ``k`` ones (the k-subset distribution); exact samples forward
    (:func:`fastgrad.functional.k_subset_sample`), the Jacobian of the exact marginals backward
    (:func:`fastgrad.functional.k_subset_marginals`). Biased (exact for costs linear in the sample); one cost
    evaluation per sample; O(n k) per row. The objective is ``E[f]`` under the k-subset distribution, not under
    the unconditioned Bernoullis."""
    facts = Facts("Ahmed, Zeng, Niepert & Van den Broeck, ICLR 2023", unbiased=False, evaluations="n",
                  differentiable_cost=True, objective="E_k[f]", benchmark=("simple_k_subset_cpu", "simple"),
                  takes="Bernoulli(logits) read as the k-subset distribution (exactly k ones in the last dimension)")

    accepts = (D.Bernoulli,)

    def __init__(self, plate_name: str, k: int, sampling_method: Any = None, n_samples: int = 1):
        super().__init__(plate_name, monte_carlo_samples(sampling_method, plate_name, n_samples))
        self.k = check_n(k, "k")

    def _sample(self, params: Params) -> Draw:
        return Draw(F.simple(params.bernoulli_logits(), self.k, self.n_samples), self.n_samples)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", k={self.k}"


class GappedStraightThrough(Method):
    """Gapped Straight-Through (Fan, Chi, Rudnicky & Ramadge, ICML 2022, "Training Discrete Deep Generative Models
    via Gapped Straight-Through Estimator"): exact one-hot samples forward, the softmax Jacobian of logits shifted by
    a constant so that the sample leads every other class by at least ``gap`` backward; math in
    :func:`fastgrad.functional.gapped_straight_through`. Biased; one cost evaluation per sample; OneHotCategorical.
    ``gap``: 1.0 (GST-1.0) or ``"p"`` (GST-p)."""
    facts = Facts("Fan, Chi, Rudnicky & Ramadge, ICML 2022", unbiased=False, evaluations="n",
                  differentiable_cost=True, benchmark=("estimator_variance_st_cpu", "gapped-st"))

    accepts = (D.OneHotCategorical,)

    def __init__(self, plate_name: str, sampling_method: Any = None, n_samples: int = 1, temperature: float = 1.0,
                 gap: Any = 1.0):
        super().__init__(plate_name, monte_carlo_samples(sampling_method, plate_name, n_samples))
        self.temperature = check_temperature("temperature", temperature)
        self.gap = gap
        F.gapped_straight_through(torch.zeros(2), 1, self.temperature, gap, seed=0)  # validate gap now

    def _sample(self, params: Params) -> Draw:
        y = F.gapped_straight_through(params.logits(), self.n_samples, self.temperature, self.gap)
        return Draw(y, self.n_samples)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", temperature={self.temperature}, gap={self.gap!r}"


class DecoupledStraightThrough(Method):
    """Decoupled Straight-Through Gumbel-softmax (Shah, Yan, Mozer & Liu 2024, arXiv 2410.13331): a forward
    temperature for the sample (exploration: an exact sample of ``softmax(logits / forward_temperature)``) and a
    backward one for the relaxed Jacobian; math in :func:`fastgrad.functional.decoupled_straight_through`. With
    both at 1 it is straight-through Gumbel-softmax. Biased; one cost evaluation per sample; OneHotCategorical."""
    facts = Facts("Shah, Yan, Mozer & Liu, 2024 (arXiv 2410.13331)", unbiased=False, evaluations="n",
                  differentiable_cost=True, benchmark=("estimator_variance_st_cpu", "decoupled-st"))

    accepts = (D.OneHotCategorical,)

    def __init__(self, plate_name: str, sampling_method: Any = None, n_samples: int = 1,
                 forward_temperature: float = 1.0, backward_temperature: float = 1.0):
        super().__init__(plate_name, monte_carlo_samples(sampling_method, plate_name, n_samples))
        self.forward_temperature = check_temperature("forward_temperature", forward_temperature)
        self.backward_temperature = check_temperature("backward_temperature", backward_temperature)

    def _sample(self, params: Params) -> Draw:
        y = F.decoupled_straight_through(params.logits(), self.n_samples, self.forward_temperature,
                                         self.backward_temperature)
        return Draw(y, self.n_samples)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", forward_temperature={self.forward_temperature}, " \
                                      f"backward_temperature={self.backward_temperature}"
