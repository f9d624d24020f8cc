"""Storchastic's ``storch.sampling``: where fastgrad's samplers live (each backend draws the same samples for the
same Philox seed/offset; see :mod:`fastgrad.functional`): Monte Carlo, Gumbel-softmax, enumeration, and sampling
without replacement (Gumbel-top-k per row; stochastic beam search over the joint configurations of several latents,
which Storchastic's ``SampleWithoutReplacement`` does; the methods of :mod:`fastgrad.method.without_replacement` call
it; stochastic beam search over an autoregressive model's sequences), and Storchastic's sampling-method classes
that ``ScoreFunction(sampling_method=...)`` takes (implemented in ``fastgrad._samplers``)."""
from ._samplers import (Enumerate, GumbelSoftmaxWOR, ImportanceSampling, MAPOSample, MonteCarlo,
                        RaoBlackwellizedSample, SampleWithoutReplacement, SamplingMethod, UnorderedSet)
from .functional import (BeamSearchResult, SetExtension,  # noqa: F401 (importable here, documented there)
                         enumerate_configurations, extend_set, gumbel_softmax, gumbel_topk, sample_categorical,
                         sample_categorical_one_hot, sample_set, stochastic_beam_search, top_set)

__all__ = ["SamplingMethod", "MonteCarlo", "Enumerate", "ImportanceSampling", "SampleWithoutReplacement",
           "UnorderedSet", "GumbelSoftmaxWOR", "RaoBlackwellizedSample", "MAPOSample", "sample_categorical",
           "sample_categorical_one_hot", "gumbel_softmax", "enumerate_configurations",
           "gumbel_topk", "sample_set", "extend_set", "top_set", "stochastic_beam_search"]
