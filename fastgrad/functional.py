"""Gradient estimators as plain differentiable torch functions (drop-in, no graph API needed).

Every function validates its arguments, flattens them to the contiguous layouts of :mod:`fastgrad.ops` and
calls the fused op. The graph API (:mod:`fastgrad.method`) calls these same functions, so each estimator's
math lives here once.

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
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import torch

from .ops import _checks, _philox
from .ops import categorical_sample as _cs
from .ops import enumerate_log_probs as _enum
from .ops import gumbel_softmax as _gs
from .ops import gumbel_topk as _gtk
from .ops import linear_log_prob as _lm
from .ops import score_surrogate as _ss

__all__ = [
    "sample_categorical",
    "gumbel_softmax",
    "categorical_log_prob",
    "batch_average_baseline",
    "score_function_surrogate",
    "score_function_surrogate_from_log_prob",
    "enumerate_configurations",
    "enumerate_log_probs",
    "expectation",
    "uniform",
    "arm_sample",
    "arm_surrogate",
    "disarm_surrogate",
    "arms_sample",
    "arms_surrogate",
    "double_cv_parts",
    "double_cv_surrogate",
    "rodeo_surrogate",
    "conditional_gumbel_bernoulli",
    "conditional_gumbel_categorical",
    "relax_bernoulli_sample",
    "relax_surrogate",
    "relax_surrogate_from_values",
    "bernoulli_log_prob",
    "vimco_surrogate",
    "gumbel_topk",
    "linear_log_prob",
    "linear_policy_loss",
    "linear_score_function_surrogate",
]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
Baseline = Union[None, str, torch.Tensor]


# -- validation (once, at the boundary) ---------------------------------------------------------------------
def _check_n(n: object, name: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    return int(n)


def _check_logits(logits: object, name: str = "logits", min_dim: int = 1, values: bool = True) -> torch.Tensor:
    """Type, dtype and shape checks; with ``values``, also the finiteness of every row (one pass over the data).

    The ops check the values they read themselves (:mod:`fastgrad.ops._checks`, the same on every backend), so
    only the samplers ask for ``values`` here: they must raise before a seed is drawn, so that a call that
    raises leaves the generator untouched."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32, float64), got {logits.dtype}")
    if logits.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s) [..., K], got shape {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one category (K >= 1), got shape {tuple(logits.shape)}")
    if values:
        _checks.logits_rows(logits, name)
    return logits


def _check_real(t: object, name: str) -> torch.Tensor:
    """A real (not complex) tensor whose values are finite (a NaN cost would turn every gradient into NaN)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_complex():
        raise TypeError(f"{name} must be a real tensor, got {t.dtype}")
    _checks.finite(t, name)
    return t


def _expand_to(t: torch.Tensor, shape: Tuple[int, ...], name: str, what: str) -> torch.Tensor:
    try:
        return t.expand(shape)
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to {what} {tuple(shape)}") from None


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover
        return False


def _logits_from(logits: Optional[torch.Tensor], probs: Optional[torch.Tensor]) -> torch.Tensor:
    if (logits is None) == (probs is None):
        raise ValueError("pass exactly one of logits or probs")
    if probs is not None:
        if not isinstance(probs, torch.Tensor):
            raise TypeError(f"probs must be a torch.Tensor, got {type(probs).__name__}")
        if probs.dtype not in _FLOATS:
            raise TypeError(f"probs must be a floating tensor, got {probs.dtype}")
        _checks.finite(probs, "probs")
        if probs.numel() and probs.device.type != "meta" and not _is_compiling() and bool((probs < 0).any()):
            raise ValueError("probs must be non-negative")
        return torch.log(probs)
    return logits


def _check_tau(tau: object, dtype: torch.dtype) -> Union[float, torch.Tensor]:
    """A positive float; or a one-element tensor (returned as a 0-dim tensor when it requires grad: a learned
    temperature, as RELAX trains)."""
    if isinstance(tau, torch.Tensor):
        if tau.numel() != 1 or tau.is_complex() or not tau.is_floating_point():
            raise TypeError(f"tau must be a positive float or a one-element floating tensor, got a {tau.dtype} "
                            f"tensor of shape {tuple(tau.shape)}")
        if tau.requires_grad:
            _checks.temperature(float(tau.detach()), dtype)
            return tau.reshape(())
        tau = float(tau)
    if isinstance(tau, numbers.Real) and not isinstance(tau, bool):
        tau = float(tau)
    return _checks.temperature(tau, dtype)


def _rows(logits: torch.Tensor) -> torch.Tensor:
    return logits.reshape(-1, logits.shape[-1]).contiguous()


# -- sampling ---------------------------------------------------------------------------------------------------
def sample_categorical(
    logits: Optional[torch.Tensor] = None,
    n: int = 1,
    *,
    probs: Optional[torch.Tensor] = None,
    one_hot: bool = False,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    offset: Optional[int] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Draw ``n`` samples from ``Categorical(logits)`` for every row.

    Args:
        logits: ``[..., K]`` float tensor (unnormalized; ``-inf`` = zero probability). Or pass ``probs``.
        n: number of samples (int >= 1).
        one_hot: also return the one-hot encoding ``[n, ..., K]`` in the logits' dtype (fused, one write).

    Returns:
        int64 indices ``[n, ...]``; with ``one_hot=True`` the tuple ``(indices, one_hot)``.
    """
    # values checked here, before a seed is drawn: a call that raises leaves the generator untouched
    logits = _check_logits(_logits_from(logits, probs))
    n = _check_n(n)
    batch = logits.shape[:-1]
    K = logits.shape[-1]
    rows = _rows(logits.detach())
    seed, offset = _philox.draw_seed_offset(n * rows.shape[0], generator, seed, offset)
    idx, oh = _cs.sample(rows, n, seed, offset, bool(one_hot))
    idx = idx.view((n,) + batch)
    if one_hot:
        return idx, oh.view((n,) + batch + (K,))
    return idx


def gumbel_topk(logits: torch.Tensor, k: int, *, generator: Optional[torch.Generator] = None,
                seed: Optional[int] = None, offset: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sample ``k`` distinct categories of every row without replacement (Gumbel-top-k).

    Args:
        logits: ``[..., K]`` float (unnormalized; ``-inf`` = zero probability, never chosen).
        k: 1 <= k <= K (and no more than a row's categories of nonzero probability).

    Returns:
        ``(indices, values)``, both ``[..., k]``: int64 categories in the order of successive draws without
        replacement (decreasing perturbed value), and their perturbed log-probabilities
        ``log_softmax(logits) + Gumbel`` (float32; float64 for float64 logits). The same seed gives the same sets on
        every backend (:mod:`fastgrad.ops.gumbel_topk`).
    """
    logits = _check_logits(logits, values=False)  # values: checked by the op
    k = _check_n(k, "k")
    if k > logits.shape[-1]:  # before a seed is drawn: a call that raises leaves the generator untouched
        raise ValueError(f"k must lie in [1, K] = [1, {logits.shape[-1]}], got {k}")
    rows = _rows(logits.detach())
    seed, offset = _philox.draw_seed_offset(rows.numel(), generator, seed, offset)
    idx, val = _gtk.gumbel_topk(rows, k, seed, offset)
    batch = logits.shape[:-1]
    return idx.view(batch + (idx.shape[-1],)), val.view(batch + (val.shape[-1],))


def gumbel_softmax(
    logits: torch.Tensor,
    tau: float = 1.0,
    n: int = 1,
    hard: bool = False,
    *,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    offset: Optional[int] = None,
) -> torch.Tensor:
    """Gumbel-softmax (Concrete) relaxation: ``n`` samples ``softmax((logits + G) / tau)``, ``[n, ..., K]``.

    ``hard=True`` returns one-hot samples (``argmax(logits + G)``, exact categorical draws) whose gradient is
    the soft one (straight-through). Differentiable w.r.t. ``logits``; dtype follows ``logits``.

    ``tau``: a positive float, or a one-element tensor. A tensor that requires grad is a learned temperature:
    the result is differentiable w.r.t. it as well (computed in torch autograd from the same noise, so the
    samples equal the fused kernel's for the same seed). ``1/tau`` must be finite in float32 (float64 logits:
    float64).
    """
    logits = _check_logits(logits)
    tau = _check_tau(tau, logits.dtype)
    n = _check_n(n)
    shape = logits.shape
    rows = _rows(logits)
    seed, offset = _philox.draw_seed_offset(n * rows.numel(), generator, seed, offset)
    if isinstance(tau, torch.Tensor):
        y = _gumbel_softmax_learned_tau(rows, n, tau, bool(hard), seed, offset)
    else:
        y = _gs.sample(rows, n, tau, bool(hard), seed, offset)
    return y.view((n,) + tuple(shape))


def _gumbel_softmax_learned_tau(rows: torch.Tensor, n: int, tau: torch.Tensor, hard: bool, seed: int,
                                offset: int) -> torch.Tensor:
    """The op's computation in torch autograd, differentiable w.r.t. ``tau`` too: the same Philox noise, so the
    same samples as the fused kernels for the same (seed, offset)."""
    z, _ = _gs._soft(rows, n, 1.0, seed, offset)
    y = torch.softmax(z / tau.to(z.dtype), dim=-1)
    if hard:
        y = torch.zeros_like(y).scatter_(-1, z.argmax(-1, keepdim=True), 1.0) - y.detach() + y
    return y.to(rows.dtype)


# -- score function -------------------------------------------------------------------------------------------
def categorical_log_prob(logits: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[samples]``: logits ``[..., K]``, samples int64 ``[n, ...]`` -> ``[n, ...]``."""
    logits = _check_logits(logits, values=False)
    _check_samples(samples, logits)
    weight = torch.ones(samples.shape, dtype=_checks.acc_dtype(logits.dtype), device=logits.device)
    return _score(logits, samples, weight)


def batch_average_baseline(cost: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Leave-one-out baseline: for each sample, the mean cost of the *other* samples along ``dim`` (n >= 2)."""
    cost = _check_real(cost, "cost")
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if not -cost.dim() <= dim < cost.dim():
        raise ValueError(f"dim must index a dimension of cost (shape {tuple(cost.shape)}), got {dim}")
    n = cost.shape[dim]
    if n < 2:
        raise ValueError(f"the batch_average baseline needs at least 2 samples along dim {dim}, got {n}")
    return (cost.sum(dim, keepdim=True) - cost) / (n - 1)


def _baseline(cost: torch.Tensor, baseline: Baseline) -> torch.Tensor:
    cost = cost.detach()
    if baseline is None or (isinstance(baseline, str) and baseline.lower() == "none"):
        return cost
    if isinstance(baseline, str):
        if baseline in ("batch_average", "loo", "rloo"):
            return cost - batch_average_baseline(cost, 0)
        raise ValueError(f"baseline must be None, 'none', 'batch_average' or a tensor, got {baseline!r}")
    if isinstance(baseline, torch.Tensor):
        baseline = _check_real(baseline, "baseline")
        _expand_to(baseline, tuple(cost.shape), "baseline", "the cost's shape")
        return cost - baseline.detach()
    raise TypeError(f"baseline must be None, a str or a torch.Tensor, got {type(baseline).__name__}")


def _check_samples(samples: object, logits: torch.Tensor) -> torch.Tensor:
    if not isinstance(samples, torch.Tensor) or samples.dtype != torch.int64:
        raise TypeError(f"samples must be an int64 tensor of category indices, got "
                        f"{getattr(samples, 'dtype', type(samples).__name__)}")
    if samples.dim() == 0 or tuple(samples.shape[1:]) != tuple(logits.shape[:-1]):
        raise ValueError(f"samples must have shape [n, {', '.join(map(str, logits.shape[:-1]))}] to match "
                         f"logits {tuple(logits.shape)}, got {tuple(samples.shape)}")
    return samples


def _score(logits: torch.Tensor, samples: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # index range and NaN/inf rows: checked by the op (the C++ kernel while it reads, other backends in Python)
    n = samples.shape[0]
    out, _ = _ss.surrogate(_rows(logits), samples.reshape(n, -1).contiguous(), weight.reshape(n, -1).contiguous())
    return out.view(samples.shape)


def score_function_surrogate(
    logits: torch.Tensor,
    samples: torch.Tensor,
    cost: torch.Tensor,
    baseline: Baseline = None,
) -> torch.Tensor:
    """REINFORCE / RLOO surrogate per sample: ``(cost - baseline) * log p(samples)``, ``[n, ...]``.

    Its value is the baseline-corrected cost times the log-probability; its gradient w.r.t. ``logits`` is the
    score-function estimate ``(cost - b) * (onehot(samples) - softmax(logits))``. Average over the samples
    (``.mean(0)``) and add the cost itself for the total loss.

    Args:
        logits: ``[..., K]`` float16/bfloat16/float32/float64 (up to vocabulary-size K).
        samples: int64 ``[n, ...]`` drawn from ``Categorical(logits)``.
        cost: ``[n, ...]`` (or broadcastable to it), treated as a constant.
        baseline: ``None``/"none", ``"batch_average"`` (leave-one-out mean of the other samples, n >= 2),
            or a tensor broadcastable to ``cost``.
    """
    logits = _check_logits(logits, values=False)  # values: checked by the op
    _check_samples(samples, logits)
    cost = _check_real(cost, "cost")
    wdtype = torch.float64 if torch.float64 in (logits.dtype, cost.dtype) else torch.float32
    weight = _baseline(_expand_to(cost.to(wdtype), tuple(samples.shape), "cost", "the samples' shape"), baseline)
    return _score(logits, samples, weight)


def score_function_surrogate_from_log_prob(log_prob: torch.Tensor, cost: torch.Tensor,
                                           baseline: Baseline = None) -> torch.Tensor:
    """The same surrogate for any distribution, given ``log_prob`` ``[n, ...]`` of the samples."""
    if not isinstance(log_prob, torch.Tensor) or not log_prob.is_floating_point():
        raise TypeError(f"log_prob must be a floating torch.Tensor, got "
                        f"{getattr(log_prob, 'dtype', type(log_prob).__name__)}")
    cost = _check_real(cost, "cost")
    return _baseline(_expand_to(cost, tuple(log_prob.shape), "cost", "log_prob's shape"), baseline) * log_prob


# -- exhaustive enumeration -----------------------------------------------------------------------------------
def _check_budget(k: int, K: int, budget: int) -> int:
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget < 1:
        raise ValueError(f"budget must be a positive int, got {budget!r}")
    size = K**k
    if size > budget:
        raise ValueError(f"enumerating {K}**{k} = {size} configurations exceeds the budget of {budget}; "
                         "raise budget= or use a sampling estimator")
    return size


def enumerate_configurations(k: int, K: int, budget: int = _enum.DEFAULT_BUDGET, device=None) -> torch.Tensor:
    """All ``K**k`` joint configurations of ``k`` categoricals with ``K`` choices: int64 ``[K**k, k]``,
    in ``itertools.product`` order (latent 0 varies slowest)."""
    for name, v in (("k", k), ("K", K)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    _check_budget(k, K, budget)
    return _enum.digits(k, K, device)


def enumerate_log_probs(logits: torch.Tensor, budget: int = _enum.DEFAULT_BUDGET) -> torch.Tensor:
    """``log q(c)`` of every joint configuration: logits ``[B, k, K]`` -> ``[K**k, B]`` (differentiable)."""
    logits = _check_logits(logits, min_dim=3, values=False)  # values: checked by the op
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape [B, k, K], got {tuple(logits.shape)}")
    _check_budget(logits.shape[1], logits.shape[2], budget)
    return _enum.log_probs(logits.contiguous())


def expectation(logits: torch.Tensor, cost: torch.Tensor, budget: int = _enum.DEFAULT_BUDGET) -> torch.Tensor:
    """Exact ``E_q[f] = sum_c q(c) f(c)`` per batch element: logits ``[B, k, K]``, cost ``[K**k, B]`` -> ``[B]``.

    Differentiable w.r.t. ``logits`` (through q) and ``cost`` (through f)."""
    logq = enumerate_log_probs(logits, budget)
    cost = _check_real(cost, "cost")
    if cost.shape != logq.shape:
        raise ValueError(f"cost must be a tensor of shape {tuple(logq.shape)} ([K**k, B]), got {tuple(cost.shape)}")
    return (logq.exp() * cost).sum(0)


# -- antithetic binary estimators (ARM, DisARM) ----------------------------------------------------------------
def uniform(shape, *, generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
            offset: Optional[int] = None, device=None) -> torch.Tensor:
    """float32 uniforms in (0, 1) of ``shape`` from fastgrad's Philox stream (element ``e`` in row-major order is
    the stream's element ``e``): the same numbers on every device for the same ``seed``/``offset``, the noise
    every antithetic and conditional sampler is built on."""
    shape = tuple(shape)
    if any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 0 for d in shape):
        raise ValueError(f"shape must be non-negative ints, got {shape}")
    numel = math.prod(shape)
    seed, offset = _philox.draw_seed_offset(numel, generator, seed, offset)
    return _philox.uniform(seed, offset, numel, device).view(shape)


def _check_bernoulli_logits(logits: object) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.dtype not in _FLOATS:
        raise TypeError(f"logits must be a floating torch.Tensor (Bernoulli logits), got "
                        f"{getattr(logits, 'dtype', type(logits).__name__)}")
    _checks.finite(logits, "logits")
    return logits


def arm_sample(logits: torch.Tensor, n: int = 1, *, generator: Optional[torch.Generator] = None,
               seed: Optional[int] = None, offset: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` antithetic pairs of ``Bernoulli(sigmoid(logits))`` samples (Yin & Zhou 2019; Dong et al. 2020).

    One uniform ``u`` per pair and latent: ``b = 1[u > sigmoid(-logits)]``, ``b~ = 1[u < sigmoid(logits)]`` (each
    marginally Bernoulli(sigmoid(logits)); Storchastic's ``z = logits +- Logistic noise > 0``, the same draw).

    Returns ``(b, u)``: ``b`` ``[2n, ...]`` in the logits' dtype (the n first samples, then their n antithetic
    partners), ``u`` float32 ``[n, ...]``."""
    logits = _check_bernoulli_logits(logits)
    n = _check_n(n)
    u = uniform((n,) + tuple(logits.shape), generator=generator, seed=seed, offset=offset, device=logits.device)
    t = logits.detach().to(_checks.acc_dtype(logits.dtype))
    b1 = u.to(t.dtype) > torch.sigmoid(-t)
    b2 = u.to(t.dtype) < torch.sigmoid(t)
    return torch.cat([b1, b2], 0).to(logits.dtype), u


def _pair_costs(cost: torch.Tensor, n: int, ndim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    cost = _check_real(cost, "cost")
    if cost.dim() < 1 or cost.shape[0] != 2 * n:
        raise ValueError(f"cost must have a leading dimension of 2n = {2 * n} (each sample, then its antithetic "
                         f"partner), got shape {tuple(cost.shape)}")
    if cost.dim() > ndim:
        raise ValueError(f"cost has more dimensions than the samples ({cost.dim()} > {ndim})")
    c = cost.detach().reshape(tuple(cost.shape) + (1,) * (ndim - cost.dim()))  # per-sample cost over latents
    return c[:n], c[n:]


def arm_surrogate(logits: torch.Tensor, u: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """ARM (Yin & Zhou 2019, "ARM: Augment-REINFORCE-Merge Gradient for Stochastic Binary Networks"): the
    per-pair surrogate whose gradient w.r.t. ``logits`` is ``(f(b) - f(b~)) (u - 1/2)`` per latent. Unbiased;
    2 cost evaluations per pair; Bernoulli latents only.

    Args: ``logits`` ``[...]``, ``u`` ``[n, ...]`` from :func:`arm_sample`, ``cost`` ``[2n, *batch]`` of the
    samples ``b`` (broadcast over the trailing latent dims). Returns ``[n, ...]``: average over the pairs
    (``.mean(0)``) and sum over the latents for the loss."""
    logits = _check_bernoulli_logits(logits)
    if not isinstance(u, torch.Tensor) or tuple(u.shape[1:]) != tuple(logits.shape) or u.dim() < 1:
        raise ValueError(f"u must have shape [n, {', '.join(map(str, logits.shape))}], got "
                         f"{tuple(getattr(u, 'shape', ()))}")
    f1, f2 = _pair_costs(cost, u.shape[0], u.dim())
    coef = (f1 - f2).to(_checks.acc_dtype(logits.dtype)) * (u.to(_checks.acc_dtype(logits.dtype)) - 0.5)
    return coef * logits.to(coef.dtype)


def disarm_surrogate(logits: torch.Tensor, b: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """DisARM (Dong, Mnih & Tucker 2020, "DisARM: An Antithetic Gradient Estimator for Binary Latent
    Variables"): ARM with the augmenting noise integrated out. The per-pair surrogate's gradient w.r.t.
    ``logits`` is ``1/2 (f(b) - f(b~)) 1[b != b~] (-1)^b~ sigmoid(|logits|)`` per latent. Unbiased, variance
    never above ARM's; 2 cost evaluations per pair; Bernoulli latents only. (Storchastic's DisARM adds the
    antithetic cost where it must subtract it: its mean is 0.)

    Args: ``logits`` ``[...]``, ``b`` ``[2n, ...]`` from :func:`arm_sample`, ``cost`` ``[2n, *batch]``. Returns
    ``[n, ...]``."""
    logits = _check_bernoulli_logits(logits)
    if not isinstance(b, torch.Tensor) or b.dim() < 1 or b.shape[0] % 2 or tuple(b.shape[1:]) != tuple(logits.shape):
        raise ValueError(f"b must have shape [2n, {', '.join(map(str, logits.shape))}], got "
                         f"{tuple(getattr(b, 'shape', ()))}")
    n = b.shape[0] // 2
    f1, f2 = _pair_costs(cost, n, b.dim())
    acc = _checks.acc_dtype(logits.dtype)
    b1, b2 = b[:n].to(acc), b[n:].to(acc)
    t = logits.to(acc)
    coef = 0.5 * (f1 - f2).to(acc) * (b1 != b2).to(acc) * (1 - 2 * b2) * torch.sigmoid(t.detach().abs())
    return coef * t


# -- RELAX / REBAR (Bernoulli) --------------------------------------------------------------------------------
def conditional_gumbel_bernoulli(logits: torch.Tensor, b: torch.Tensor, *, generator: Optional[torch.Generator] = None,
                                 seed: Optional[int] = None, offset: Optional[int] = None) -> torch.Tensor:
    """The relaxed variable given its hard sample: ``z~ ~ p(z | H(z) = b)`` for ``z = logits + Logistic noise``,
    reparameterized (differentiable w.r.t. ``logits``). Tucker et al. 2017 (REBAR), appendix; with
    ``v ~ U(0, 1)``: ``v' = v (1 - sigmoid(logits))`` for ``b = 0`` and ``v sigmoid(logits) + 1 - sigmoid(logits)``
    for ``b = 1``, then ``z~ = logits + logit(v')``. ``H(z~) = b`` always. (Storchastic's Bernoulli branch adds
    ``log1p(p)`` where ``-log1p(-p)`` is meant: its ``z~`` contradicts ``b = 1`` in every draw.)

    ``logits`` ``[...]``, ``b`` ``[n, ...]`` of 0/1 -> ``z~`` ``[n, ...]`` in the accumulation dtype."""
    logits = _check_bernoulli_logits(logits)
    if not isinstance(b, torch.Tensor) or b.dim() < 1 or tuple(b.shape[1:]) != tuple(logits.shape):
        raise ValueError(f"b must have shape [n, {', '.join(map(str, logits.shape))}], got "
                         f"{tuple(getattr(b, 'shape', ()))}")
    acc = _checks.acc_dtype(logits.dtype)
    v = uniform(tuple(b.shape), generator=generator, seed=seed, offset=offset, device=logits.device).to(acc)
    t = logits.to(acc)
    p = torch.sigmoid(t)
    bb = b.to(acc)
    vp = bb * (v * p + 1 - p) + (1 - bb) * (v * (1 - p))
    # logit(v') in a stable form: the clamp keeps v' inside (0, 1) where float rounding reaches 0 or 1
    tiny = torch.finfo(acc).tiny
    vp = vp.clamp(tiny, 1 - torch.finfo(acc).eps / 2)
    z = t + torch.log(vp) - torch.log1p(-vp)
    # rounding can put z~ on the wrong side of 0 by an ulp: keep H(z~) = b exactly
    return torch.where(bb > 0, z.clamp_min(tiny), z.clamp_max(-tiny))


def relax_bernoulli_sample(logits: torch.Tensor, n: int = 1, *, generator: Optional[torch.Generator] = None,
                           seed: Optional[int] = None, offset: Optional[int] = None):
    """``n`` draws for RELAX/REBAR: ``z = logits + logit(u)`` (reparameterized), ``b = H(z)`` and
    ``z~ ~ p(z | b)`` (:func:`conditional_gumbel_bernoulli`, from the next ``n * numel`` stream elements).

    Returns ``(b, z, z~)``, each ``[n, ...]``; ``b`` in the logits' dtype, ``z``/``z~`` differentiable."""
    logits = _check_bernoulli_logits(logits)
    n = _check_n(n)
    numel = n * logits.numel()
    seed, offset = _philox.draw_seed_offset(2 * numel, generator, seed, offset)
    acc = _checks.acc_dtype(logits.dtype)
    u = _philox.uniform(seed, offset, numel, logits.device).view((n,) + tuple(logits.shape)).to(acc)
    z = logits.to(acc) + torch.log(u) - torch.log1p(-u)
    b = (z.detach() > 0).to(logits.dtype)
    zt = conditional_gumbel_bernoulli(logits, b, seed=seed, offset=offset + _philox.counters_used(numel))
    return b, z, zt


def bernoulli_log_prob(logits: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log Bernoulli(b; sigmoid(logits))`` elementwise, stable for any logit: ``-softplus(-l)`` for ``b = 1``,
    ``-softplus(l)`` for ``b = 0``; in the accumulation dtype, differentiable w.r.t. ``logits``."""
    acc = _checks.acc_dtype(logits.dtype)
    t, bb = logits.to(acc), b.to(acc)
    return -(bb * torch.nn.functional.softplus(-t) + (1 - bb) * torch.nn.functional.softplus(t))


def relax_surrogate_from_values(log_prob: torch.Tensor, cost: torch.Tensor, c_z: torch.Tensor,
                                c_z_tilde: torch.Tensor, c_z_tilde_const: torch.Tensor) -> torch.Tensor:
    """The RELAX surrogate from its parts, for any distribution (the graph API's RELAX/REBAR build these):
    ``(f(b) - c(z~)) log p(b) + c(z) - c(z~)`` with the first ``c(z~)`` taken at ``z~.detach()``
    (``c_z_tilde_const``: it keeps ``c``'s parameters, not the distribution's). All ``[n, ...]``; ``cost`` is
    treated as a constant."""
    return (cost.detach().to(log_prob.dtype) - c_z_tilde_const) * log_prob + c_z - c_z_tilde


def relax_surrogate(logits: torch.Tensor, b: torch.Tensor, z: torch.Tensor, z_tilde: torch.Tensor,
                    cost: torch.Tensor, control) -> torch.Tensor:
    """RELAX (Grathwohl et al. 2018, "Backpropagation through the Void"): per-sample surrogate whose gradient
    w.r.t. ``logits`` is ``[f(b) - c(z~)] d log p(b) + d c(z) - d c(z~)``. Unbiased for any control variate
    ``c``; 1 cost evaluation of ``f`` per sample plus 2 of ``c``. REBAR (Tucker et al. 2017) is
    ``control = lambda z: eta * f(sigmoid(z / temperature))``, which needs a cost that takes relaxed inputs.

    The control variate's parameters are trained to minimise the estimator's variance: take
    ``g = torch.autograd.grad(surrogate.sum(), logits, create_graph=True)`` and minimise ``(g ** 2).sum()``
    w.r.t. them (the ``f(b) - c(z~)`` factor keeps ``c``'s dependence on its parameters, not on ``logits``).

    Args: ``b``, ``z``, ``z_tilde`` ``[n, ...]`` from :func:`relax_bernoulli_sample`; ``cost`` ``f(b)``
    ``[n, *batch]`` (broadcast over trailing latent dims); ``control(z) -> [n, *batch]`` a callable on relaxed
    samples (logit space). Returns ``[n, *batch]``."""
    logits = _check_bernoulli_logits(logits)
    if not callable(control):
        raise TypeError(f"control must be a callable c(z) on relaxed samples, got {type(control).__name__}")
    for name, t in (("b", b), ("z", z), ("z_tilde", z_tilde)):
        if not isinstance(t, torch.Tensor) or t.dim() < 1 or tuple(t.shape[1:]) != tuple(logits.shape):
            raise ValueError(f"{name} must have shape [n, {', '.join(map(str, logits.shape))}], got "
                             f"{tuple(getattr(t, 'shape', ()))}")
    cost = _check_real(cost, "cost").detach()
    logp = bernoulli_log_prob(logits, b)  # per latent; summed below over the latents beyond the cost's dims
    c_z, c_zt = control(z), control(z_tilde)
    c_zt_const = control(z_tilde.detach())  # depends on c's parameters, not on logits
    for name, c in (("control(z)", c_z), ("control(z_tilde)", c_zt)):
        if not isinstance(c, torch.Tensor) or c.shape != cost.shape:
            raise ValueError(f"{name} must return the cost's shape {tuple(cost.shape)}, got "
                             f"{tuple(getattr(c, 'shape', ()))}")
    logp = logp.sum(tuple(range(cost.dim(), logp.dim()))) if logp.dim() > cost.dim() else logp
    return relax_surrogate_from_values(logp, cost, c_z, c_zt, c_zt_const)


def conditional_gumbel_categorical(logits: torch.Tensor, b: torch.Tensor, *,
                                   generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
                                   offset: Optional[int] = None) -> torch.Tensor:
    """Gumbel-perturbed log-probabilities given their argmax: ``z~ ~ p(z | argmax z = b)`` for
    ``z = log_softmax(logits) + Gumbel``, reparameterized (differentiable w.r.t. ``logits``). Tucker et al. 2017
    (REBAR), appendix: with ``v ~ U(0, 1)^K`` and ``p = softmax(logits)``, ``z~_b = -log(-log v_b)`` and
    ``z~_k = -log(-log(v_k) / p_k - log v_b)`` for ``k != b``, so ``argmax z~ = b`` always. For RELAX/REBAR on
    categoricals and Gumbel-Rao.

    ``logits`` ``[..., K]``, ``b`` int64 ``[n, ...]`` -> ``z~`` ``[n, ..., K]`` in the accumulation dtype."""
    logits = _check_logits(logits, values=True)
    if not isinstance(b, torch.Tensor) or b.dtype != torch.int64 or b.dim() < 1 \
            or tuple(b.shape[1:]) != tuple(logits.shape[:-1]):
        raise ValueError(f"b must be an int64 tensor of shape [n, {', '.join(map(str, logits.shape[:-1]))}], got "
                         f"{getattr(b, 'dtype', None)} {tuple(getattr(b, 'shape', ()))}")
    K = logits.shape[-1]
    if b.numel() and (int(b.min()) < 0 or int(b.max()) >= K):
        raise ValueError(f"b must lie in [0, {K})")
    acc = _checks.acc_dtype(logits.dtype)
    v = uniform(tuple(b.shape) + (K,), generator=generator, seed=seed, offset=offset, device=logits.device).to(acc)
    logp = torch.log_softmax(logits.to(acc), -1).expand(v.shape)
    log_vb = torch.log(v.gather(-1, b.unsqueeze(-1)))  # [n, ..., 1]
    # -log(v_k) / p_k = -log(v_k) * exp(-log p_k): a masked category (p_k = 0) goes to -inf, never the argmax
    others = -torch.log(-torch.log(v) * torch.exp(-logp) - log_vb)
    top = -torch.log(-log_vb)
    return others.scatter(-1, b.unsqueeze(-1), top)


# -- VIMCO ------------------------------------------------------------------------------------------------------
def vimco_surrogate(log_q: torch.Tensor, log_w: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """VIMCO (Mnih & Rezende 2016, "Variational inference for Monte Carlo objectives"): a surrogate of the
    K-sample importance-weighted bound ``L = log mean_k exp(log_w_k)`` whose value is ``L`` and whose gradient is
    VIMCO's unbiased estimate of ``grad E[L]``: ``sum_k (L - L_-k) grad log q(z_k) + grad L``, where ``L_-k`` is
    the bound with ``log_w_k`` replaced by the mean of the other ``log_w`` (the leave-one-out baseline of each
    sample; ``L - L_-k`` is treated as a constant). K >= 2 samples, 1 evaluation of ``log_w`` per sample.

    Args: ``log_q`` ``[..., K, ...]`` the samples' ``log q(z_k)`` (differentiable w.r.t. the variational
    parameters; the samples themselves are not reparameterized), ``log_w`` the same shape, ``log p(x, z_k) -
    log q(z_k)`` (differentiable w.r.t. the model and through ``log q``), ``dim`` the samples' dimension.
    Returns the bound per element of the other dims: maximise it (minimise its negative)."""
    for name, t in (("log_q", log_q), ("log_w", log_w)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating torch.Tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if log_q.shape != log_w.shape:
        raise ValueError(f"log_q and log_w must have the same shape, got {tuple(log_q.shape)} and "
                         f"{tuple(log_w.shape)}")
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or not -log_w.dim() <= dim < log_w.dim():
        raise ValueError(f"dim must index a dimension of log_w (shape {tuple(log_w.shape)}), got {dim}")
    K = log_w.shape[dim]
    if K < 2:
        raise ValueError(f"VIMCO needs at least 2 samples along dim {dim}, got {K}")
    _checks.finite(log_w, "log_w")
    lw = log_w.detach()
    bound = torch.logsumexp(log_w, dim) - math.log(K)
    # L_-k: log_w_k replaced by the mean of the others, for each k (K x K work per element: K is small)
    others_mean = (lw.sum(dim, keepdim=True) - lw) / (K - 1)
    lw_e, om_e = lw.movedim(dim, -1), others_mean.movedim(dim, -1)  # [..., K]
    eye = torch.eye(K, dtype=torch.bool, device=lw.device)
    replaced = torch.where(eye, om_e.unsqueeze(-1), lw_e.unsqueeze(-2))  # [..., k, j]: row k has log_w_k replaced
    loo = torch.logsumexp(replaced, -1) - math.log(K)  # [..., K]
    signal = (bound.detach().unsqueeze(-1) - loo).movedim(-1, dim)
    score = (signal * log_q).sum(dim)
    return bound + score - score.detach()


def _check_samples_and_cost(logits: object, b: object, cost: object, min_b_dim: int = 1
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The inputs of the multi-sample binary estimators: Bernoulli ``logits`` ``[...]``, samples ``b``
    ``[n >= 2, ...]`` and a real ``cost`` ``[n, *batch]`` (broadcast over ``b``'s trailing latent dims)."""
    logits = _check_bernoulli_logits(logits)
    if not isinstance(b, torch.Tensor) or b.dim() < min_b_dim or b.shape[0] < 2 \
            or tuple(b.shape[1:]) != tuple(logits.shape):
        raise ValueError(f"b must have shape [n >= 2, {', '.join(map(str, logits.shape))}], got "
                         f"{tuple(getattr(b, 'shape', ()))}")
    n = b.shape[0]
    cost = _check_real(cost, "cost")
    if cost.dim() < 1 or cost.shape[0] != n or cost.dim() > b.dim():
        raise ValueError(f"cost must have shape [n = {n}, *batch], got {tuple(cost.shape)}")
    return logits, cost


def _check_cost_grad(cost_grad: object, b: torch.Tensor) -> torch.Tensor:
    cost_grad = _check_real(cost_grad, "cost_grad")
    if tuple(cost_grad.shape) != tuple(b.shape):
        raise ValueError(f"cost_grad must have the shape of b {tuple(b.shape)}, got {tuple(cost_grad.shape)}")
    return cost_grad


# -- ARMS ---------------------------------------------------------------------------------------------------------
def arms_sample(logits: torch.Tensor, n: int = 2, *, generator: Optional[torch.Generator] = None,
                seed: Optional[int] = None, offset: Optional[int] = None) -> torch.Tensor:
    """``n >= 2`` mutually antithetic ``Bernoulli(sigmoid(logits))`` samples (Dimitriev & Zhou 2021, "ARMS:
    Antithetic-REINFORCE-Multi-Sample Gradient for Binary Variables"): per latent, ``d ~ Dirichlet(1, ..., 1)``
    over the n samples (normalized exponentials of the Philox stream), ``u_k = (1 - d_k)**(n - 1)`` (each
    uniform, jointly negatively dependent), ``b_k = 1[u_k < p]`` for ``p = sigmoid(logits) <= 1/2`` and
    ``1[u_k > 1 - p]`` above. At n = 2 these are DisARM's pairs. Returns ``b`` ``[n, ...]`` in the logits' dtype."""
    logits = _check_bernoulli_logits(logits)
    n = _check_n(n)
    if n < 2:
        raise ValueError(f"ARMS needs n >= 2 mutually antithetic samples, got {n}")
    acc = _checks.acc_dtype(logits.dtype)
    v = uniform((n,) + tuple(logits.shape), generator=generator, seed=seed, offset=offset,
                device=logits.device).to(acc)
    e = -torch.log(v)
    d = e / e.sum(0, keepdim=True)
    u = (1 - d) ** (n - 1)
    p = torch.sigmoid(logits.detach().to(acc))
    b = torch.where(p <= 0.5, u < p, u > 1 - p)
    return b.to(logits.dtype)


def _arms_correlation(p: torch.Tensor, n: int) -> torch.Tensor:
    """Pairwise correlation of two of the n samples under the Dirichlet copula: with ``q = min(p, 1 - p)``,
    ``P(b_i = b_j = 1) = max(2 q**(1/(n-1)) - 1, 0)**(n-1)`` and ``rho = (P11 - q**2) / (q (1 - q))``."""
    q = torch.minimum(p, 1 - p).clamp_min(torch.finfo(p.dtype).tiny ** 0.5)
    p11 = (2 * q ** (1.0 / (n - 1)) - 1).clamp_min(0) ** (n - 1)
    return (p11 - q * q) / (q * (1 - q))


def arms_surrogate(logits: torch.Tensor, b: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """ARMS: the per-sample surrogate whose gradient w.r.t. ``logits`` is, per latent,
    ``(f(b_k) - mean_{j != k} f(b_j)) (b_k - p) / (1 - rho)`` with ``rho`` the samples' pairwise correlation
    (:func:`arms_sample`); average over the samples (``.mean(0)``). Unbiased (the leave-one-out baseline of
    correlated samples is corrected by ``1 / (1 - rho)``); n cost evaluations; Bernoulli latents only; DisARM
    at n = 2.

    Args: ``logits`` ``[...]``, ``b`` ``[n, ...]`` from :func:`arms_sample`, ``cost`` ``[n, *batch]`` (broadcast
    over the trailing latent dims). Returns ``[n, ...]``."""
    logits, cost = _check_samples_and_cost(logits, b, cost)
    n = b.shape[0]
    acc = _checks.acc_dtype(logits.dtype)
    f = cost.detach().to(acc).reshape(tuple(cost.shape) + (1,) * (b.dim() - cost.dim()))
    loo = (f.sum(0, keepdim=True) - f) / (n - 1)
    t = logits.to(acc)
    p = torch.sigmoid(t.detach())
    coef = (f - loo) * (b.to(acc) - p) / (1 - _arms_correlation(p, n))
    return coef * t


# -- Double control variates -----------------------------------------------------------------------------------
def double_cv_parts(logits: torch.Tensor, b: torch.Tensor, cost: torch.Tensor, cost_grad: torch.Tensor
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two parts of the double-control-variate estimator (Titsias & Shi, AISTATS 2022, "Double control variates
    for gradient estimation in discrete latent variable models") for ``n >= 2`` independent
    ``Bernoulli(theta = sigmoid(logits))`` samples: the estimate is ``rloo + alpha * cv`` for any ``alpha``, with,
    per latent,

        ``rloo = mean_k (f_k - LOO_k f) (b_k - theta)`` (leave-one-out REINFORCE) and
        ``cv = -mean_k (c_k - LOO_k c) (b_k - theta) + mean_k(g_k) theta (1 - theta)``,

    where ``g_k = d f / d b`` at ``b_k``, ``gbar_-k`` the mean of the other samples' ``g`` and ``c_k = <gbar_-k, b_k -
    theta>`` (summed over the latents: the first-order estimate of ``f_k - E f``). ``cv`` has mean zero (``c_k`` is
    linear in ``b_k`` with a coefficient free of ``b_k``, so its score term has the closed-form mean added back; the
    ``c_j`` inside ``LOO_k`` are linear in ``b_j`` with mean 0), so the estimate is unbiased for every ``alpha``
    chosen independently of the samples. ``n`` cost evaluations and ``n`` cost gradients: the cost must be
    differentiable at relaxed (real-valued) ``b``.

    Args: ``logits`` ``[...]``, ``b`` ``[n, ...]``, ``cost`` ``[n, *batch]`` (broadcast over the trailing latent dims
    of ``b``), ``cost_grad`` ``[n, ...]``. Returns ``(rloo, cv)``, both ``[...]``, detached, accumulation dtype."""
    logits, cost = _check_samples_and_cost(logits, b, cost)
    n = b.shape[0]
    cost_grad = _check_cost_grad(cost_grad, b)
    acc = _checks.acc_dtype(logits.dtype)
    lat = tuple(range(cost.dim(), b.dim()))
    f = cost.detach().to(acc).reshape(tuple(cost.shape) + (1,) * len(lat))
    g = cost_grad.detach().to(acc)
    theta = torch.sigmoid(logits.detach().to(acc))
    centered = b.detach().to(acc) - theta
    loo = lambda x: (x.sum(0, keepdim=True) - x) / (n - 1)  # noqa: E731
    c = (loo(g) * centered).sum(lat, keepdim=True) if lat else loo(g) * centered
    rloo = ((f - loo(f)) * centered).mean(0)
    cv = -((c - loo(c)) * centered).mean(0) + g.mean(0) * theta * (1 - theta)
    return rloo, cv


def double_cv_surrogate(logits: torch.Tensor, b: torch.Tensor, cost: torch.Tensor, cost_grad: torch.Tensor,
                        alpha: float = 1.0) -> torch.Tensor:
    """Double control variates as a surrogate ``[...]`` whose gradient w.r.t. ``logits`` is
    ``rloo + alpha * cv`` of :func:`double_cv_parts` (``alpha = 0``: RLOO; ``alpha = 1``: the whole first-order
    term, the best choice for a cost linear in ``b``; Titsias & Shi learn one scalar, with the opposite sign)."""
    rloo, cv = double_cv_parts(logits, b, cost, cost_grad)
    return (rloo + alpha * cv) * logits.to(rloo.dtype)


def rodeo_surrogate(logits: torch.Tensor, b: torch.Tensor, cost: torch.Tensor, cost_grad: torch.Tensor,
                    control, alpha: Union[float, torch.Tensor] = 1.0,
                    beta: Union[float, torch.Tensor] = 1.0) -> torch.Tensor:
    """RODEO (Shi, Zhou, Hwang, Titsias & Mackey, NeurIPS 2022, "Gradient estimation with discrete Stein operators")
    for ``n >= 2`` independent ``Bernoulli(theta = sigmoid(logits))`` samples of ``D`` latents, as a surrogate
    ``[*batch, D]`` whose gradient w.r.t. ``logits`` is

        ``mean_k [(f_k - LOO_k(f + alpha A G_0)) (b_k - theta) + beta (A psi)(b_k)]``, ``psi(y) = G_1(y) (y - theta)``,

    with the discrete Stein operator of the random-scan Gibbs sampler ``(A phi)(b) = mean_i q(flip_i b_i) [phi(y_i) -
    phi(b)]`` (``y_i``: ``b`` with latent ``i`` flipped; ``E_q[A phi] = 0`` for every ``phi``), and control functions
    ``(G_0, G_1)(y) = control(h_k(y), LOO_k f)``: ``control`` maps ``[..., 1]`` inputs and a ``[..., 1]`` context to
    ``[..., 2]``, ``h_k(y) = mean_{j != k} <g_j, y - b_j>`` is the other samples' linearization of the cost
    (``g_j = d f / d b`` at ``b_j``). Unbiased for any ``alpha``, ``beta`` and ``control`` chosen independently of the
    samples (every control variate is ``A`` applied to a function free of the sample it acts on); the paper trains
    them on the estimate's variance. ``n`` cost evaluations and ``n`` cost gradients (the cost must be
    differentiable at relaxed ``b``), ``2 n D`` evaluations of the small ``control`` (the neighbours' linearizations
    cost O(D) each: ``h_k(y_i) = h_k(b_k) + gbar_-k,i (1 - 2 b_k,i)``). The coefficient keeps its graph to
    ``alpha``, ``beta`` and ``control``'s parameters, so the estimate's variance can be differentiated.

    Args: ``logits`` ``[*batch, D]``, ``b`` ``[n, *batch, D]``, ``cost`` ``[n, *batch]``, ``cost_grad`` like ``b``."""
    logits, cost = _check_samples_and_cost(logits, b, cost, min_b_dim=2)
    n = b.shape[0]
    if tuple(cost.shape) != tuple(b.shape[:-1]):  # the latents: exactly the last dim
        raise ValueError(f"cost must have shape {tuple(b.shape[:-1])} ([n, *batch]), got {tuple(cost.shape)}")
    cost_grad = _check_cost_grad(cost_grad, b)
    if not callable(control):
        raise TypeError(f"control must be a callable (a torch.nn.Module), got {type(control).__name__}")
    acc = _checks.acc_dtype(logits.dtype)
    f = cost.detach().to(acc)
    g = cost_grad.detach().to(acc)
    bb = b.detach().to(acc)
    theta = torch.sigmoid(logits.detach().to(acc))
    loo = lambda x: (x.sum(0, keepdim=True) - x) / (n - 1)  # noqa: E731
    g_loo = loo(g)                                                       # [n, *batch, D]
    h_x = (g_loo * bb).sum(-1) - loo((g * bb).sum(-1))                   # h_k(b_k)          [n, *batch]
    flip = 1 - 2 * bb                                                    # y_i - b at latent i
    h_n = h_x.unsqueeze(-1) + g_loo * flip                               # h_k(y_i)          [n, *batch, D]
    ctx = loo(f)
    G_x = control(h_x.unsqueeze(-1), ctx.unsqueeze(-1))                  # [n, *batch, 2]
    G_n = control(h_n.unsqueeze(-1), ctx.unsqueeze(-1).unsqueeze(-1).expand(h_n.shape + (1,)))  # [n, *batch, D, 2]
    if G_x.shape[-1] != 2 or G_n.shape[-1] != 2:
        raise ValueError(f"control must return 2 values per input ([..., 2]), got {tuple(G_x.shape)}")
    G_x, G_n = G_x.to(acc), G_n.to(acc)
    w1 = theta * (1 - bb) + (1 - theta) * bb                             # q(flipped value of latent i)
    D = bb.shape[-1]
    a_g0 = (w1 * (G_n[..., 0] - G_x[..., :1])).mean(-1)                  # (A G_0)(b_k)      [n, *batch]
    centered = bb - theta
    # (A psi)(b_k)_d = mean_i w1_i [G_1(y_i) (y_i - theta)_d - G_1(b_k) (b_k - theta)_d], with
    # (y_i - theta)_d = (b_k - theta)_d + [i = d] (1 - 2 b_k,d)
    a_psi = (centered * ((w1 * G_n[..., 1]).sum(-1, keepdim=True) - w1.sum(-1, keepdim=True) * G_x[..., 1:])
             + w1 * G_n[..., 1] * flip) / D
    coef = ((f - loo(f + alpha * a_g0)).unsqueeze(-1) * centered + beta * a_psi).mean(0)
    return coef * logits.to(acc)


# -- the LM head fused with the log-probability and the policy-gradient losses ----------------------------------
def _lm_inputs(hidden, weight, index, bias, temperature, chunk_size, memory_budget, index_extra: int = 0):
    """Validate and flatten: hidden [N, H] or [B, T, H] -> [N, H]; index (hidden's leading shape) -> [N]."""
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating torch.Tensor, got {getattr(hidden, 'dtype', type(hidden).__name__)}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [N, H] or [B, T, H], got shape {tuple(hidden.shape)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D [V, H] tensor, got {getattr(weight, 'shape', type(weight).__name__)}")
    if not isinstance(index, torch.Tensor) or index.dtype != torch.int64:
        raise TypeError(f"index must be an int64 tensor of token ids, got "
                        f"{getattr(index, 'dtype', type(index).__name__)}")
    lead = tuple(hidden.shape[:-1])
    if tuple(index.shape[index_extra:]) != lead:
        raise ValueError(f"index must have shape {lead} (hidden's leading dims), got {tuple(index.shape)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, int)
                                      or memory_budget < 1):
        raise ValueError(f"memory_budget must be a positive int (bytes) or None, got {memory_budget!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    h2 = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    _checks.finite(h2, "hidden")
    chunk = chunk_size or 0
    if chunk == 0 and memory_budget is not None:
        chunk = _lm.default_chunk(h2.shape[0], weight.shape[0], h2.device, memory_budget)
    return h2, weight.contiguous(), None if bias is None else bias.contiguous(), float(temperature), chunk


def linear_log_prob(hidden: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, *,
                    bias: Optional[torch.Tensor] = None, temperature: float = 1.0, ignore_index: int = -100,
                    return_entropy: bool = False, return_lse: bool = False, chunk_size: Optional[int] = None,
                    memory_budget: Optional[int] = None):
    """Log-probabilities of the given tokens under the LM head, without the ``[tokens, V]`` logits.

    ``logp[t] = log_softmax((hidden[t] @ weight.T + bias) / temperature)[index[t]]``, computed one ``[chunk, V]``
    fp32 slab at a time; differentiable w.r.t. ``hidden``, ``weight`` and ``bias`` (the backward recomputes each
    slab: 4 GEMMs). For losses written in torch on the log-probs; :func:`linear_policy_loss` is the 3-GEMM path.

    Args:
        hidden: ``[N, H]`` or ``[B, T, H]``, float32/bfloat16/float16/float64 (the weight's dtype).
        weight: ``[V, H]`` (``lm_head.weight``); bias: ``[V]`` or None.
        index: int64 token ids with hidden's leading shape; ``ignore_index`` entries give logp 0 and no gradient.
        return_entropy: also the entropy ``[...]`` of each row's distribution (differentiable; costs one more
            exponential pass per row only when asked, and no buffer otherwise).
        return_lse: also the logsumexp ``[...]`` of the (tempered) logits.
        chunk_size: rows per slab; None chooses from ``memory_budget`` (bytes of slab), or the default
            (:func:`fastgrad.ops.linear_log_prob.default_chunk`).

    Returns:
        fp32 (float64 for float64 inputs) ``logp`` of index's shape; with ``return_entropy``/``return_lse`` a tuple
        ``(logp, entropy[, lse])`` / ``(logp, lse)``. ``logp <= 0``.
    """
    h2, w, b, t, chunk = _lm_inputs(hidden, weight, index, bias, temperature, chunk_size, memory_budget)
    lead = tuple(hidden.shape[:-1])
    logp, lse, ent = _lm.linear_log_prob(h2, w, b, index.reshape(-1, 1).contiguous(), t, int(ignore_index),
                                         bool(return_entropy), chunk)
    out = [logp.view(lead)]
    if return_entropy:
        out.append(ent.view(lead))
    if return_lse:
        out.append(lse.view(lead))
    return out[0] if len(out) == 1 else tuple(out)


def _per_token(t: Optional[torch.Tensor], name: str, lead: Tuple[int, ...], allow_sequence: bool) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"{name} must be a floating torch.Tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if tuple(t.shape) == lead:
        out = t
    elif allow_sequence and len(lead) == 2 and tuple(t.shape) in ((lead[0],), (lead[0], 1)):
        out = t.reshape(lead[0], 1).expand(lead)  # one value per sequence, broadcast over its tokens
    else:
        seq = f" or [{lead[0]}] (one per sequence)" if allow_sequence and len(lead) == 2 else ""
        raise ValueError(f"{name} must have shape {lead} (index's){seq}, got {tuple(t.shape)}")
    _checks.finite(out, name)
    return out.detach().reshape(-1).contiguous()


def linear_policy_loss(hidden: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, advantages: torch.Tensor, *,
                       mask: Optional[torch.Tensor] = None, old_logp: Optional[torch.Tensor] = None,
                       ref_logp: Optional[torch.Tensor] = None, beta: float = 0.0, kl: str = "k3",
                       loss: str = "reinforce", eps_low: float = 0.2, eps_high: float = 0.2,
                       entropy_coef: float = 0.0, normalize: str = "token", num_items: Optional[float] = None,
                       max_length: Optional[int] = None, clip_ratio_c: Optional[float] = None,
                       bias: Optional[torch.Tensor] = None,
                       temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False,
                       chunk_size: Optional[int] = None, memory_budget: Optional[int] = None):
    """Policy-gradient loss of sampled tokens through the LM head: the loss and its gradients in one pass over
    ``[chunk, V]`` slabs (3 GEMMs: logits, dX, dW); the logits never exist.

    ``loss = sum_t w_t l_t`` with the per-token loss ``l_t`` of :func:`fastgrad.ops.linear_log_prob.token_loss`
    (``"reinforce"``: ``-A logp``; ``"ppo_clip"``: PPO/GRPO's clipped ratio, ``eps_low``/``eps_high`` as in DAPO;
    ``"cispo"``: MiniMax-M1's clipped, detached importance weight times ``-A logp``; ``"gspo"``: GSPO's
    sequence-level ratio (Zheng et al. 2025, "Group Sequence Policy Optimization", the GSPO-token form):
    ``s_b = exp(mean_t (logp - old_logp))`` over each sequence's loss tokens, clipped like PPO's ratio and shared by
    every token of the sequence, ``l_t = -min(s_b A, clip(s_b) A)`` with gradient ``-A s_b grad logp_t`` where the
    sequence is not clipped; the paper averages per sequence: use ``normalize="sequence"``. It costs one more GEMM
    (the sequence ratios need every log-prob before the first gradient). Plus ``beta`` times the ``kl``
    estimator to ``ref_logp`` and ``-entropy_coef`` times the entropy) and token weights ``w_t = mask_t / Z``:

    * ``normalize="token"`` (DAPO, BNPO): ``Z = num_items`` (global number of loss tokens; default the local
      ``mask.sum()``);
    * ``"sequence"`` (GRPO): ``Z = len_b * num_items`` (each sequence's mean, then the mean over ``num_items``
      sequences; default B); needs ``[B, T]`` inputs;
    * ``"constant"`` (Dr. GRPO): ``Z = num_items`` if given, else ``B * max_length`` (default T).

    RLOO is ``"reinforce"`` with leave-one-out advantages (:func:`batch_average_baseline` on the rewards); GRPO's
    group baseline is ``(r - mean) / std`` on ``[B]``, outside. No collective runs inside: under DDP/FSDP pass the
    global ``num_items`` and the per-rank sum of losses is the global loss's share.

    Args:
        hidden ``[N, H]``/``[B, T, H]``, weight ``[V, H]``, index int64 (hidden's leading shape).
        advantages: per token (index's shape) or per sequence ``[B]``.
        mask: loss mask (index's shape), default ``index != ignore_index``; masked tokens cost nothing (compacted
            out before the GEMMs).
        old_logp / ref_logp: fp32 per-token log-probs of the behaviour / reference policy (``old_logp=None``:
            on-policy, ratio 1). ``beta > 0`` requires ``ref_logp``.
        clip_ratio_c: dual-clip PPO's bound ``c > 1`` (Ye et al. 2020; verl's ``clip_ratio_c``, typically 3): with
            ``"ppo_clip"`` or ``"gspo"``, tokens with ``A < 0`` lose at most ``-c A``. None: off.

    Returns:
        ``(loss, stats)``: the fp32 scalar loss (differentiable w.r.t. hidden, weight, bias; its backward scales the
        gradients computed in the forward) and detached stats: ``logp`` (index's shape, 0 at masked tokens),
        ``entropy`` (when computed: ``entropy_coef != 0`` or ``return_entropy``; else None), ``kl_mean``,
        ``clip_frac``, ``ratio_mean`` (means over the loss tokens).
    """
    h2, w, b, t, chunk = _lm_inputs(hidden, weight, index, bias, temperature, chunk_size, memory_budget)
    lead = tuple(index.shape)
    if normalize not in ("token", "sequence", "constant"):
        raise ValueError(f"normalize must be 'token', 'sequence' or 'constant', got {normalize!r}")
    if normalize == "sequence" and len(lead) != 2:
        raise ValueError(f"normalize='sequence' needs [B, T] inputs (hidden [B, T, H]), got index {lead}")
    for name, v in (("beta", beta), ("eps_low", eps_low), ("eps_high", eps_high), ("entropy_coef", entropy_coef)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite float, got {v!r}")
    if beta < 0 or eps_low < 0 or eps_high < 0:
        raise ValueError(f"beta, eps_low and eps_high must be >= 0, got {beta}, {eps_low}, {eps_high}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (the reference policy's per-token log-probs)")
    if loss not in _lm.LOSSES + ("gspo",):
        raise ValueError(f"loss must be one of {_lm.LOSSES + ('gspo',)}, got {loss!r}")
    if loss == "gspo" and len(lead) != 2:
        raise ValueError(f"loss='gspo' needs [B, T] inputs (its ratio is per sequence), got index {lead}")
    if clip_ratio_c is not None:
        if isinstance(clip_ratio_c, bool) or not isinstance(clip_ratio_c, (int, float)) \
                or not math.isfinite(clip_ratio_c) or not clip_ratio_c > 1:
            raise ValueError(f"clip_ratio_c must be a finite float > 1 (dual-clip PPO's bound), got {clip_ratio_c!r}")
        if loss not in ("ppo_clip", "gspo"):
            raise ValueError(f"clip_ratio_c applies to loss='ppo_clip' or 'gspo', not {loss!r}")
    adv = _per_token(advantages, "advantages", lead, allow_sequence=True)
    if adv is None:
        raise TypeError("advantages must be a floating torch.Tensor, got None")
    old = _per_token(old_logp, "old_logp", lead, False)
    ref = _per_token(ref_logp, "ref_logp", lead, False)
    if mask is None:
        m = (index != ignore_index)
    else:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != lead:
            raise ValueError(f"mask must be a tensor of shape {lead} (index's), got "
                             f"{getattr(mask, 'shape', type(mask).__name__)}")
        m = mask.detach().bool() & (index != ignore_index)
    acc = _checks.acc_dtype(h2.dtype)
    mf = m.to(acc)
    if num_items is not None and (isinstance(num_items, bool) or not isinstance(num_items, numbers.Real)
                                  or not num_items > 0):
        raise ValueError(f"num_items must be a positive number, got {num_items!r}")
    if normalize == "token":
        tw = mf / (float(num_items) if num_items is not None else mf.sum().clamp(min=1))
    elif normalize == "sequence":
        lengths = mf.sum(1, keepdim=True).clamp(min=1)
        tw = mf / (lengths * (float(num_items) if num_items is not None else lead[0]))
    else:
        if num_items is not None:
            z = float(num_items)
        else:
            if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                           or max_length < 1):
                raise ValueError(f"max_length must be a positive int, got {max_length!r}")
            z = (lead[0] if len(lead) == 2 else 1) * (max_length or lead[-1])
        tw = mf / z
    op_loss = loss
    if loss == "gspo":
        # PPO-clip on a shifted old_logp, old'_t = logp_t - log s_b, whose token ratio is the sequence's ratio s_b:
        # the same value, clip decisions and gradient -A s_b grad logp_t as GSPO-token
        with torch.no_grad():
            live = torch.where(m, index, int(ignore_index)).reshape(-1, 1).contiguous()  # loss tokens only
            lp0 = _lm.linear_log_prob(h2, w, b, live, t, int(ignore_index), False, chunk)[0].view(lead)
        dl = (lp0 - old.view(lead)) * mf if old is not None else torch.zeros_like(mf)
        log_s = dl.sum(1, keepdim=True) / mf.sum(1, keepdim=True).clamp(min=1)
        old = torch.where(m, lp0 - log_s, 0).reshape(-1).contiguous()
        op_loss = "ppo_clip"
    needs = [torch.is_grad_enabled() and x is not None and x.requires_grad for x in (hidden, weight, bias)]
    total, logp, ent, st, *_ = _lm.linear_policy_loss(
        h2, w, b, index.reshape(-1).contiguous(), adv, tw.reshape(-1).contiguous(), old, ref, t, int(ignore_index),
        op_loss, float(eps_low), float(eps_high), float(beta), kl, float(entropy_coef), bool(return_entropy), chunk,
        needs, float(clip_ratio_c or 0.0))
    mflat = mf.reshape(-1)
    count = mflat.sum().clamp(min=1)
    stats = {
        "logp": logp.view(lead),
        "entropy": ent.view(lead) if ent.numel() or (return_entropy or entropy_coef != 0) else None,
        "kl_mean": (st[0] * mflat).sum() / count,
        "clip_frac": (st[1] * mflat).sum() / count,
        "ratio_mean": (st[2] * mflat).sum() / count,
    }
    return total, stats


def linear_score_function_surrogate(hidden: torch.Tensor, weight: torch.Tensor, samples: torch.Tensor,
                                    cost: torch.Tensor, baseline: Baseline = None, *,
                                    bias: Optional[torch.Tensor] = None, temperature: float = 1.0,
                                    chunk_size: Optional[int] = None) -> torch.Tensor:
    """:func:`score_function_surrogate` with the LM head fused in: ``(cost - baseline) * log p(samples)`` ``[n, R]``
    for ``logits = hidden @ weight.T (+ bias)``, without the ``[R, V]`` logits.

    Args:
        hidden ``[R, H]``, weight ``[V, H]``; samples int64 ``[n, R]``; cost ``[n, R]`` (or broadcastable),
        a constant; baseline as in :func:`score_function_surrogate` (``"batch_average"``: leave-one-out, n >= 2).

    The gradient w.r.t. the logits is ``sum_s a_s onehot(y_s) - (sum_s a_s) softmax`` per row (one slab pass for
    all n samples); the backward recomputes each slab (4 GEMMs).
    """
    if not isinstance(samples, torch.Tensor) or samples.dtype != torch.int64 or samples.dim() != 2:
        raise TypeError(f"samples must be an int64 [n, R] tensor, got "
                        f"{getattr(samples, 'dtype', type(samples).__name__)} {tuple(getattr(samples, 'shape', ()))}")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"hidden must be [R, H], got {tuple(getattr(hidden, 'shape', ()))}")
    h2, w, b, t, chunk = _lm_inputs(hidden, weight, samples, bias, temperature, chunk_size, None, index_extra=1)
    cost = _check_real(cost, "cost")
    acc = _checks.acc_dtype(h2.dtype)
    a = _baseline(_expand_to(cost.to(acc), tuple(samples.shape), "cost", "the samples' shape"), baseline)
    logp, _lse, _ent = _lm.linear_log_prob(h2, w, b, samples.t().contiguous(), t, -100, False, chunk)
    return a * logp.t()


# -- sampling without replacement and its estimators (the math lives in fastgrad._wor) --------------------------
from ._wor import (joint_log_prob, priority_weights, sample_set, sf_wor_surrogate, top_set,  # noqa: E402
                   unordered_set_log_ratios, unordered_set_surrogate, unordered_set_weights)

__all__ += ["sample_set", "top_set", "joint_log_prob", "unordered_set_log_ratios", "unordered_set_weights",
            "unordered_set_surrogate", "priority_weights", "sf_wor_surrogate"]
from ._relaxations import (entmax, gumbel_entmax, gumbel_rao, indecater_samples, indecater_surrogate,  # noqa: E402
                           indecater_weights, reinmax, sparsemax)

__all__ += ["entmax", "sparsemax", "gumbel_entmax", "reinmax", "gumbel_rao", "indecater_samples",
            "indecater_weights", "indecater_surrogate"]
from ._coupled import categorical_disarm_sample, categorical_disarm_surrogate, stick_breaking_logits  # noqa: E402

__all__ += ["stick_breaking_logits", "categorical_disarm_sample", "categorical_disarm_surrogate"]
