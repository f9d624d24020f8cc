"""The score function (REINFORCE) estimator: log-probabilities, baselines and the fused surrogate."""
from __future__ import annotations

import numbers

import torch

from ..ops import _checks
from ..ops import score_surrogate as _ss
from ._validate import Baseline, check_logits, check_real, check_samples, expand_to, flat_rows


def categorical_log_prob(logits: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[samples]``: logits ``[..., K]``, samples int64 ``[n, ...]`` -> ``[n, ...]``."""
    logits = check_logits(logits, values=False)
    check_samples(samples, logits)
    weight = torch.ones(samples.shape, dtype=_checks.acc_dtype(logits.dtype), device=logits.device)
    return _score(logits, samples, weight)


def batch_average_baseline(cost: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Leave-one-out baseline: for each sample, the mean cost of the *other* samples along ``dim`` (n >= 2)."""
    cost = check_real(cost, "cost")
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if not -cost.dim() <= dim < cost.dim():
        raise ValueError(f"dim must index a dimension of cost (shape {tuple(cost.shape)}), got {dim}")
    n = cost.shape[dim]
    if n < 2:
        raise ValueError(f"the batch_average baseline needs at least 2 samples along dim {dim}, got {n}")
    return (cost.sum(dim, keepdim=True) - cost) / (n - 1)


def subtract_baseline(cost: torch.Tensor, baseline: Baseline) -> torch.Tensor:
    cost = cost.detach()
    if baseline is None or (isinstance(baseline, str) and baseline.lower() == "none"):
        return cost
    if isinstance(baseline, str):
        if baseline in ("batch_average", "loo", "rloo"):
            return cost - batch_average_baseline(cost, 0)
        raise ValueError(f"baseline must be None, 'none', 'batch_average' ('loo', 'rloo') or a tensor, got "
                         f"{baseline!r}")
    if isinstance(baseline, torch.Tensor):
        baseline = check_real(baseline, "baseline")
        expand_to(baseline, tuple(cost.shape), "baseline", "the cost's shape")
        return cost - baseline.detach()
    raise TypeError(f"baseline must be None, a str or a torch.Tensor, got {type(baseline).__name__}")


def _score(logits: torch.Tensor, samples: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # index range and NaN/inf rows: checked by the op (the C++ kernel while it reads, other backends in Python)
    n = samples.shape[0]
    out, _ = _ss.eager(flat_rows(logits), samples.reshape(n, -1).contiguous(), weight.reshape(n, -1).contiguous())
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
        baseline: ``None``/"none", ``"batch_average"`` (leave-one-out mean of the other samples, n >= 2; also
            spelled ``"loo"`` or ``"rloo"``, the name of the resulting estimator, REINFORCE leave-one-out, Kool et
            al. 2019), or a tensor broadcastable to ``cost``.
    """
    logits = check_logits(logits, values=False)  # values: checked by the op
    check_samples(samples, logits)
    cost = check_real(cost, "cost")
    wdtype = torch.float64 if torch.float64 in (logits.dtype, cost.dtype) else torch.float32
    weight = subtract_baseline(expand_to(cost.to(wdtype), tuple(samples.shape), "cost", "the samples' shape"), baseline)
    return _score(logits, samples, weight)


def score_function_surrogate_from_log_prob(log_prob: torch.Tensor, cost: torch.Tensor,
                                           baseline: Baseline = None) -> torch.Tensor:
    """The same surrogate for any distribution, given ``log_prob`` ``[n, ...]`` of the samples."""
    if not isinstance(log_prob, torch.Tensor) or not log_prob.is_floating_point():
        raise TypeError(f"log_prob must be a floating torch.Tensor, got "
                        f"{getattr(log_prob, 'dtype', type(log_prob).__name__)}")
    cost = check_real(cost, "cost")
    return subtract_baseline(expand_to(cost, tuple(log_prob.shape), "cost", "log_prob's shape"), baseline) * log_prob
