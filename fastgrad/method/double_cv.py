"""Double control variates and RODEO for Bernoulli latents: estimators that read the cost's gradient at the samples.
The math is :func:`fastgrad.functional.double_cv_parts` and :func:`fastgrad.functional.rodeo_surrogate`."""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
from torch import distributions as D

from .. import functional as F
from ._base import Draw, Facts, Method, Params, monte_carlo_samples, train_on_second_moment


def sample_relaxable(method: Method, params: Params) -> Draw:
    """``n`` independent Bernoulli samples as a leaf that requires grad: the user's cost is evaluated on it, and the
    cost's gradient at the samples is read off it."""
    logits = params.bernoulli_logits()
    p = torch.sigmoid(logits.detach())
    u = F.uniform((method.n_samples,) + tuple(logits.shape), device=logits.device).to(p.dtype)
    b = (u < p).to(logits.dtype).requires_grad_()
    return Draw(b, method.n_samples, state=b)


def cost_and_gradient(method: Method, sample, w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(b, f [n, plates...], d f / d b)`` for a sample of :func:`sample_relaxable` and its aligned cost ``w`` (not
    detached: with the cost's graph to ``b``); a ValueError when the cost does not depend on the sample
    differentiably."""
    b = sample.draw.state
    g = torch.autograd.grad(w.sum(), b, retain_graph=True, allow_unused=True)[0] if w.requires_grad else None
    if g is None:
        raise ValueError(f"{type(method).__name__} needs a cost that is differentiable in the sample (it is "
                         "evaluated at relaxed inputs); the registered cost does not depend on the sample "
                         "differentiably")
    return b.detach(), w.detach(), g


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
    facts = Facts("Titsias & Shi, AISTATS 2022", unbiased=True, evaluations="n", differentiable_cost=True,
                  benchmark=("double_cv_toy_cpu", "double-cv n=4"))

    accepts = (D.Bernoulli,)
    min_samples, min_samples_reason = 2, "its baselines leave one sample out"
    uses_score = True
    detach_cost = False  # the cost's gradient at the samples is read through its graph

    def __init__(self, plate_name: str, n_samples: int = 2, alpha: Optional[float] = None, decay: float = 0.99,
                 sampling_method: Any = None):
        super().__init__(plate_name, monte_carlo_samples(sampling_method, plate_name, n_samples))
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
        self._pending = []  # moments of a step that raised before its update are dropped, not carried over
        return sample_relaxable(self, params)

    def _surrogate(self, sample, cost: torch.Tensor) -> torch.Tensor:
        b, w, g = cost_and_gradient(self, sample, cost)
        logits = sample.params.bernoulli_logits()
        rloo, cv = F.double_cv_parts(logits, b, w, g)
        if self.online:
            self._pending.append(torch.stack([(rloo * cv).sum(), (cv * cv).sum()]).double())
        term = (rloo + self.alpha.to(rloo.dtype) * cv) * logits.to(rloo.dtype)  # [plates..., latents...]
        npl = len(sample.plates)
        if term.dim() > npl - 1:
            term = term.sum(tuple(range(npl - 1, term.dim())))
        return term.unsqueeze(0).expand((self.n_samples,) + term.shape)

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


class SteinControl(torch.nn.Module):
    """RODEO's default control network (the paper's single-layer-VAE choice): ``h`` and the context through one
    100-unit layer each, summed, LeakyReLU(0.3), and 2 outputs (``G_0``, ``G_1``)."""

    def __init__(self, hidden: int = 100):
        super().__init__()
        self.h = torch.nn.Linear(1, hidden)
        self.context = torch.nn.Linear(1, hidden)
        self.out = torch.nn.Linear(hidden, 2)

    def forward(self, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.out(torch.nn.functional.leaky_relu(self.h(h) + self.context(context), 0.3))


class RODEO(Method):
    """RODEO (Shi, Zhou, Hwang, Titsias & Mackey, NeurIPS 2022, "Gradient estimation with discrete Stein operators"):
    leave-one-out REINFORCE on ``n_samples >= 2`` independent Bernoulli samples with two zero-mean control variates
    built by the discrete Stein operator of the Gibbs sampler from a learned control network applied to the other
    samples' linearization of the cost (:func:`fastgrad.functional.rodeo_surrogate`). Unbiased; ``n_samples`` cost
    evaluations, one backward pass of the cost to its input and ``2 n D`` evaluations of the small ``control``
    network per step; Bernoulli only, latents along the last dimension.

    The cost must be differentiable in the sample at relaxed (real-valued) inputs (a ValueError in ``backward()``
    otherwise). ``control`` (a ``torch.nn.Module`` mapping ``(h [..., 1], context [..., 1])`` to ``[..., 2]``;
    default :class:`SteinControl`), ``alpha`` and ``beta`` (initialized at 0, where RODEO is RLOO) are trained as
    RELAX's control: after each ``backward()`` their ``.grad`` is the gradient of the estimate's second moment (put
    ``method.parameters()`` in an optimizer).
    """
    facts = Facts("Shi, Zhou, Hwang, Titsias & Mackey, NeurIPS 2022", unbiased=True, evaluations="n",
                  differentiable_cost=True)

    accepts = (D.Bernoulli,)
    min_samples, min_samples_reason = 2, "its baselines leave one sample out"
    uses_score = True
    detach_cost = False  # the cost's gradient at the samples is read through its graph
    create_graph = True

    def __init__(self, plate_name: str, n_samples: int = 2, control: Optional[torch.nn.Module] = None,
                 sampling_method: Any = None):
        super().__init__(plate_name, monte_carlo_samples(sampling_method, plate_name, n_samples))
        if control is not None and not isinstance(control, torch.nn.Module):
            raise TypeError(f"control must be a torch.nn.Module, got {type(control).__name__}")
        self.control = control if control is not None else SteinControl()
        self.alpha = torch.nn.Parameter(torch.tensor(0.0))
        self.beta = torch.nn.Parameter(torch.tensor(0.0))

    def _sample(self, params: Params) -> Draw:
        d = sample_relaxable(self, params)
        if d.value.dim() < 2:
            raise ValueError("RODEO needs Bernoulli latents along a last dimension (logits [..., D])")
        return d

    def _surrogate(self, sample, cost: torch.Tensor) -> torch.Tensor:
        b, w, g = cost_and_gradient(self, sample, cost)
        logits = sample.params.bernoulli_logits()
        npl = len(sample.plates)
        # the latents inside one draw, flattened to the last dimension the Stein operator runs over
        lat = b.dim() - npl
        if lat != 1:
            flat = lambda t: t.reshape(t.shape[: t.dim() - lat] + (-1,))  # noqa: E731
            b, g, logits_f = flat(b), flat(g), flat(logits)
        else:
            logits_f = logits
        term = F.rodeo_surrogate(logits_f, b, w, g, self.control, self.alpha, self.beta)  # [plates..., D]
        term = term.sum(-1)
        return term.unsqueeze(0).expand((self.n_samples,) + term.shape)

    def _after_backward(self, samples: List) -> None:
        train_on_second_moment(self, samples)
