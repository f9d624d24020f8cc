"""Gradient estimators as plain differentiable torch functions (drop-in, no graph API needed).

Every function validates its arguments, flattens them to the contiguous layouts of :mod:`fastgrad.ops` and
calls the fused op. The graph API (:mod:`fastgrad.method`) calls these same functions, so each estimator's
math lives here once: in the module named after its family, as the method files are named
(``functional/arm.py`` beside ``method/arm.py``). This file only gathers the public names.

Randomness: stochastic functions take ``generator=None`` and optional ``seed``/``offset``. Without ``seed``,
a seed is drawn from ``generator`` (or torch's default generator), so ``torch.manual_seed`` makes results
reproducible; with the same ``seed``/``offset`` every backend returns the same samples.

Example::

    >>> import torch, fastgrad.functional as F
    >>> logits = torch.randn(64, 2, 10, requires_grad=True)
    >>> idx = F.sample_categorical(logits, n=10)              # int64 [10, 64, 2]
    >>> cost = torch.randn(10, 64, 2)
    >>> F.score_function_surrogate(logits, idx, cost, baseline="batch_average").mean(0).sum().backward()
"""

from .sampling import (sample_categorical, sample_categorical_one_hot, gumbel_topk, gumbel_softmax, uniform,
                       conditional_gumbel_bernoulli, conditional_gumbel_categorical)
from .score_function import (categorical_log_prob, batch_average_baseline, score_function_surrogate,
                             score_function_surrogate_from_log_prob, outcome_advantages, OUTCOME_ESTIMATORS)
from .expect import (enumerate_configurations, enumerate_log_probs, expectation)
from .arm import (arm_sample, arm_surrogate, disarm_surrogate, arms_sample, arms_surrogate, stick_breaking_logits,
                  categorical_disarm_sample, categorical_disarm_surrogate, carms_sample, carms_pair_pmf,
                  carms_surrogate)
from .relax import (relax_bernoulli_sample, bernoulli_log_prob, relax_surrogate_from_values, relax_surrogate)
from .vimco import vimco_surrogate
from .double_cv import (double_cv_parts, double_cv_surrogate, rodeo_surrogate)
from .relaxed import (entmax, sparsemax, gumbel_entmax, reinmax, reinmax_rao, reinmax_cv, gumbel_rao,
                      indecater_samples, indecater_weights, indecater_surrogate, k_subset_marginals, k_subset_sample,
                      simple, gapped_straight_through, decoupled_straight_through)
from .without_replacement import (sample_set, extend_set, SetExtension, top_set, joint_log_prob,
                                  unordered_set_log_ratios,
                                  unordered_set_weights, unordered_set_surrogate, priority_weights, sf_wor_surrogate,
                                  stochastic_beam_search, BeamSearchResult)
from .lm_head import (linear_log_prob, linear_policy_loss, linear_score_function_surrogate, vespo_weights)

__all__ = [
    "sample_categorical",
    "sample_categorical_one_hot",
    "gumbel_topk",
    "gumbel_softmax",
    "uniform",
    "conditional_gumbel_bernoulli",
    "conditional_gumbel_categorical",
    "categorical_log_prob",
    "batch_average_baseline",
    "score_function_surrogate",
    "score_function_surrogate_from_log_prob",
    "outcome_advantages",
    "stochastic_beam_search",
    "k_subset_marginals",
    "k_subset_sample",
    "simple",
    "gapped_straight_through",
    "carms_sample",
    "carms_pair_pmf",
    "carms_surrogate",
    "decoupled_straight_through",
    "BeamSearchResult",
    "OUTCOME_ESTIMATORS",
    "enumerate_configurations",
    "enumerate_log_probs",
    "expectation",
    "arm_sample",
    "arm_surrogate",
    "disarm_surrogate",
    "arms_sample",
    "arms_surrogate",
    "stick_breaking_logits",
    "categorical_disarm_sample",
    "categorical_disarm_surrogate",
    "relax_bernoulli_sample",
    "bernoulli_log_prob",
    "relax_surrogate_from_values",
    "relax_surrogate",
    "vimco_surrogate",
    "double_cv_parts",
    "double_cv_surrogate",
    "rodeo_surrogate",
    "entmax",
    "sparsemax",
    "gumbel_entmax",
    "reinmax",
    "reinmax_rao",
    "reinmax_cv",
    "gumbel_rao",
    "indecater_samples",
    "indecater_weights",
    "indecater_surrogate",
    "sample_set",
    "extend_set",
    "SetExtension",
    "top_set",
    "joint_log_prob",
    "unordered_set_log_ratios",
    "unordered_set_weights",
    "unordered_set_surrogate",
    "priority_weights",
    "sf_wor_surrogate",
    "linear_log_prob",
    "linear_policy_loss",
    "vespo_weights",
    "linear_score_function_surrogate",
]
