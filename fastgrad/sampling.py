"""Storchastic's ``storch.sampling``: where fastgrad's samplers live (each backend draws the same samples for the
same Philox seed/offset; see :mod:`fastgrad.functional`). The without-replacement sampler joins them here."""
from .functional import enumerate_configurations, gumbel_softmax, sample_categorical

__all__ = ["sample_categorical", "gumbel_softmax", "enumerate_configurations"]
