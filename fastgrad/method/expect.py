"""Exact expectation by enumerating the joint support; math in :func:`fastgrad.functional.enumerate_log_probs`."""
from __future__ import annotations

import math

import torch
from torch import distributions as D

from .. import functional as F
from ._base import Draw, Facts, Method, Params, extra_dims


class Expect(Method):
    """Sums over all joint configurations of the independent latents of a categorical or Bernoulli.

    The enumerated values do not depend on the data, so they broadcast over the parameters' plates (shape
    ``(K**k, 1, ..., event)``): a decoder runs once per configuration. The plate's weight is ``q(c | x)``, per
    data point, differentiable, so :func:`fastgrad.backward` gives the exact gradient.
    """
    facts = Facts("exact enumeration (the sum over every joint configuration)", unbiased=True, evaluations="K**D",
                  storchastic="Expect", storchastic_correct=True)

    accepts = (D.OneHotCategorical, D.Categorical, D.Bernoulli)

    def __init__(self, plate_name: str, budget: int = 10000):
        super().__init__(plate_name, 1)
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget must be a positive int, got {budget!r}")
        self.budget = budget

    def _sample(self, params: Params) -> Draw:
        return enumerate_draw(params, self.budget, f"Expect({self.plate_name!r})")

    def extra_repr(self) -> str:
        return f"plate_name={self.plate_name!r}, budget={self.budget}"


def enumerate_draw(params: Params, budget: int, what: str) -> Draw:
    """Every joint configuration of a categorical or Bernoulli's latents, the plate weight ``q(c)`` per data point
    (differentiable): Expect's draw, and ``sampling_method=Enumerate``'s."""
    d = params.distr
    npl = len(params.plates)
    if isinstance(d, (D.OneHotCategorical, D.Categorical)):
        logits = params.logits()
        extra = extra_dims(params, logits, 1)
        K = logits.shape[-1]
    else:
        bl = params.bernoulli_logits()
        logits = torch.stack([torch.zeros_like(bl), bl], -1)
        extra = extra_dims(params, bl, 0)
        K = 2
    k = math.prod(extra)
    pshape = logits.shape[:npl]
    B = math.prod(pshape)
    try:
        logq = F.enumerate_log_probs(logits.reshape(B, k, K), budget=budget)  # [C, B]
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    C = logq.shape[0]
    digits = F.enumerate_configurations(k, K, budget=budget, device=logits.device)  # [C, k]
    vshape = (C,) + (1,) * npl + tuple(extra)
    if isinstance(d, D.OneHotCategorical):
        value = torch.nn.functional.one_hot(digits, K).to(logits.dtype).view(vshape + (K,))
    elif isinstance(d, D.Categorical):
        value = digits.view(vshape)
    else:
        value = digits.to(logits.dtype).view(vshape)
    logq = logq.view((C,) + tuple(pshape))
    return Draw(value, C, logq.exp(), state=logq)
