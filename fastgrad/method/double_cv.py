"""Double control variates for Bernoulli latents; the math is :func:`fastgrad.functional.double_cv_parts`."""
from __future__ import annotations

from typing import Any, Optional

import torch

from .. import functional as F
from ._base import Draw, Method, Params, aligned_cost, reduce_term
from .arm import bernoulli_logits


class DoubleCV(Method):
    """Double control variates (Titsias & Shi, AISTATS 2022): leave-one-out REINFORCE on ``n_samples >= 2``
    independent Bernoulli samples plus ``alpha`` times a global control variate from the cost's first-order Taylor
    expansion (:func:`fastgrad.functional.double_cv_parts`). Unbiased; ``n_samples`` cost evaluations and one
    backward pass of the cost to its input per step; Bernoulli only.

    The cost must be differentiable in the sample at relaxed (real-valued) inputs: the sample the user gets requires
    grad, and ``backward()`` raises a ValueError when the registered cost does not depend on it differentiably.

    ``alpha=None`` (default) sets the scalar online, as the paper's learned one: the variance-minimizing
    ``-E<rloo, cv> / E|cv|^2``, both expectations exponential moving averages (``decay``) over the previous
    steps, so that each step's ``alpha`` is independent of its samples (and the estimate stays unbiased); it starts
    at 0 (RLOO). A float fixes it (``0``: RLOO; ``1``: the whole Taylor term). ``method.alpha`` is the current value.
    """

    uses_score = True

    def __init__(self, plate_name: str, n_samples: int = 2, alpha: Optional[float] = None, decay: float = 0.99,
                 sampling_method: Any = None):
        super().__init__(plate_name, n_samples)
        if sampling_method is not None:
            raise ValueError("sampling_method: only None (Monte Carlo sampling) is supported")
        if self.n_samples < 2:
            raise ValueError(f"DoubleCV needs n_samples >= 2 (its baselines leave one sample out), got {n_samples}")
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))):
            raise TypeError(f"alpha must be None (set online) or a float, got {type(alpha).__name__}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
            raise ValueError(f"decay must be a float in [0, 1), got {decay!r}")
        self.online = alpha is None
        self.register_buffer("alpha", torch.tensor(0.0 if alpha is None else float(alpha), dtype=torch.float64))
        self.register_buffer("decay", torch.tensor(float(decay), dtype=torch.float64))
        self.register_buffer("moments", torch.zeros(2, dtype=torch.float64))  # EMA of <rloo, cv> and |cv|^2
        self._pending = []

    def _sample(self, params: Params) -> Draw:
        logits = bernoulli_logits(self, params)
        p = torch.sigmoid(logits.detach())
        u = F.uniform((self.n_samples,) + tuple(logits.shape), device=logits.device).to(p.dtype)
        b = (u < p).to(logits.dtype).requires_grad_()  # a leaf: the cost's gradient at the samples is read off it
        return Draw(b, self.n_samples, state=b)

    def _surrogate(self, sample, cost) -> torch.Tensor:
        params, b = sample._info
        _, w = aligned_cost(sample, cost, detach=False)  # [n, plates...], with the cost's graph to b
        g = torch.autograd.grad(w.sum(), b, retain_graph=True, allow_unused=True)[0] if w.requires_grad else None
        if g is None:
            raise ValueError("DoubleCV needs a cost that is differentiable in the sample (it is evaluated at "
                             "relaxed inputs); the registered cost does not depend on the sample differentiably")
        logits = params.bernoulli_logits()
        rloo, cv = F.double_cv_parts(logits, b.detach(), w.detach(), g)
        if self.online:
            self._pending.append(torch.stack([(rloo * cv).sum(), (cv * cv).sum()]).double())
        term = (rloo + self.alpha.to(rloo.dtype) * cv) * logits.to(rloo.dtype)  # [plates..., latents...]
        npl = len(sample.plates)
        if term.dim() > npl - 1:
            term = term.sum(tuple(range(npl - 1, term.dim())))
        return reduce_term(sample, term.unsqueeze(0).expand((self.n_samples,) + term.shape))

    def _update_parameters(self) -> None:
        if not self.online or not self._pending:
            return
        step = torch.stack(self._pending).sum(0)
        self._pending = []
        with torch.no_grad():
            self.moments.mul_(self.decay).add_((1 - self.decay) * step)
            if self.moments[1] > 0:
                self.alpha.copy_(-self.moments[0] / self.moments[1])

    def extra_repr(self) -> str:
        return super().extra_repr() + f", alpha={float(self.alpha):.4g}, online={self.online}"
