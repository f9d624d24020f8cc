"""The score function (REINFORCE) estimator: log-probabilities, baselines (the leave-one-out mean; the group
advantages of sampled sequences the RL trainers use) and the fused surrogate."""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

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


# -- group advantages of sequences (the trainers' outcome-reward baselines) ----------------------------------------
OUTCOME_ESTIMATORS = ("grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "opo",
                      "optimal_token_baseline")


def _group_ids(index, B: int, device) -> torch.Tensor:
    """The prompt id of each sequence -> int64 group ids ``0 .. G-1``: an int tensor, or any sequence / numpy array
    of hashable ids (verl passes its ``uid`` strings)."""
    if isinstance(index, torch.Tensor):
        if index.dtype.is_floating_point or index.dtype == torch.bool or index.dim() != 1:
            raise TypeError(f"index must be a 1-D integer tensor (one prompt id per sequence), got {index.dtype} "
                            f"of shape {tuple(index.shape)}")
        ids = index.to(device)
    else:
        try:
            keys = list(index)
        except TypeError:
            raise TypeError(f"index must be a 1-D integer tensor or a sequence of prompt ids, got "
                            f"{type(index).__name__}") from None
        first = {}
        ids = torch.tensor([first.setdefault(k, len(first)) for k in keys], dtype=torch.int64, device=device)
    if ids.numel() != B:
        raise ValueError(f"index must hold one prompt id per sequence ({B}), got {ids.numel()}")
    return torch.unique(ids, return_inverse=True)[1]


def _masked_whiten(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Whitening over the masked entries, with the unbiased variance (verl's ``masked_whiten``: 1e-8 in the mean's
    denominator and under the square root)."""
    n = m.sum()
    if float(n) < 2:
        raise ValueError(f"whitening the advantages needs at least 2 response tokens, got {int(n)}")
    mean = (x * m).sum() / (n + 1e-8)
    var = ((x - mean) ** 2 * m).sum() / (n + 1e-8) * (n / (n - 1))
    return (x - mean) * torch.rsqrt(var + 1e-8)


def outcome_advantages(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index,
                       estimator: str = "grpo", *, norm_by_std: bool = True, epsilon: Optional[float] = None,
                       gamma: float = 1.0, old_logp: Optional[torch.Tensor] = None,
                       sum_pi_squared: Optional[torch.Tensor] = None, rollout_weights: Optional[torch.Tensor] = None,
                       handle_zero_tail: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Advantages of groups of sampled sequences from their rewards, as RL trainers compute them (verl 0.9.1's
    ``compute_*_outcome_advantage``, same names, semantics and edge cases), vectorized over the groups.

    The score ``s_i`` of sequence ``i`` is the sum of its token rewards; ``index`` groups the sequences by prompt.

    * ``"grpo"``: ``(s_i - mean_g) / (std_g + epsilon)`` (Shao et al. 2024, DeepSeekMath; ``std`` unbiased), or
      ``s_i - mean_g`` with ``norm_by_std=False`` (Dr. GRPO, Liu et al. 2025). A group of one: mean 0, std 1.
      Biased (the mean includes ``s_i``; the std is a random scale).
    * ``"rloo"``: ``n/(n-1) (s_i - mean_g)`` = ``s_i`` minus the mean of the others (Ahmadian et al. 2024, after
      Kool et al. 2019): **unbiased** for REINFORCE. A group of one keeps ``s_i``.
    * ``"opo"``: ``s_i - sum_j len_j s_j / sum_j len_j`` (length-weighted mean, Hao et al. 2025, On-Policy RL with
      Optimal reward baseline). Biased (includes ``s_i``). A group of one: baseline 0.
    * ``"reinforce_plus_plus_baseline"``: ``s_i - mean_g`` on every response token, then whitened over all response
      tokens of the batch (Hu 2025, REINFORCE++).
    * ``"reinforce_plus_plus"``: the ``gamma``-discounted return of each token, observation tokens (mask 0 inside a
      response) passing the running return through, whitened over the batch's response tokens; no groups.
    * ``"optimal_token_baseline"``: per group and timestep, ``B_t = sum_i G_i,t W_i,t / sum_i W_i,t`` with
      ``G`` the reward-to-go and ``W_t = sum_{j<=t} (1 - 2 pi_j + sum_pi_squared_j) rho_j^2`` (verl's optimal token
      baseline; ``pi_j = exp(old_logp)``, ``sum_pi_squared`` from :func:`linear_log_prob`'s
      ``return_sum_pi_squared``, ``rho`` the ``rollout_weights`` if given); ``handle_zero_tail`` zeroes the
      baseline of a group's single longest response past the second longest. A group of one: baseline 0. Biased
      in general (the group statistics include the sequence's own return; measured in the docs).

    Args:
        token_level_rewards: ``[B, T]`` float (an outcome reward usually sits on each response's last token).
        response_mask: ``[B, T]`` (bool or 0/1): the response tokens that receive an advantage.
        index: ``[B]`` prompt ids: an integer tensor, or a sequence / numpy array of hashable ids.
        estimator: one of :data:`OUTCOME_ESTIMATORS`.
        epsilon: the std's guard for ``"grpo"`` (default 1e-6) or the denominator's for
            ``"optimal_token_baseline"`` (default 1e-8).

    Returns:
        ``(advantages, returns)``, both ``[B, T]``, detached, 0 outside the mask (the returns are the advantages,
        except for ``"reinforce_plus_plus"`` and ``"optimal_token_baseline"``: the discounted returns / the
        reward-to-go). Cost O(B T), no GEMM.
    """
    if estimator not in OUTCOME_ESTIMATORS:
        raise ValueError(f"estimator must be one of {OUTCOME_ESTIMATORS}, got {estimator!r}")
    r = check_real(token_level_rewards, "token_level_rewards")
    if r.dim() != 2:
        raise ValueError(f"token_level_rewards must be [B, T], got shape {tuple(r.shape)}")
    if not isinstance(response_mask, torch.Tensor) or tuple(response_mask.shape) != tuple(r.shape):
        raise ValueError(f"response_mask must be a tensor of token_level_rewards' shape {tuple(r.shape)}, got "
                         f"{getattr(response_mask, 'shape', type(response_mask).__name__)}")
    B, T = r.shape
    out_dtype = r.dtype
    with torch.no_grad():
        r = r.detach().to(torch.promote_types(r.dtype, torch.float32))  # bf16 would miscount a group of 300
        m = response_mask.detach().to(r.dtype)
        if estimator == "reinforce_plus_plus":
            returns = torch.zeros_like(r)
            run = r.new_zeros(B)
            for t in range(T - 1, -1, -1):  # observation tokens carry the running return through
                new = r[:, t] + gamma * run
                returns[:, t] = new * m[:, t]
                run = new * m[:, t] + run * (1 - m[:, t])
            return (_masked_whiten(returns, m) * m).to(out_dtype), returns.to(out_dtype)
        g = _group_ids(index, B, r.device)
        G = int(g.max()) + 1 if B else 0
        n = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, g, torch.ones_like(r[:, 0]))
        single = n[g] == 1
        if estimator == "optimal_token_baseline":
            a, ret = _optimal_token_baseline(r, m, g, G, n, old_logp, sum_pi_squared, rollout_weights,
                                             handle_zero_tail, 1e-8 if epsilon is None else epsilon)
            return a.to(out_dtype), ret.to(out_dtype)
        s = r.sum(-1)
        mean = torch.zeros_like(n).index_add_(0, g, s) / n
        if estimator == "opo":
            lens = m.sum(-1)
            bsl = torch.zeros_like(n).index_add_(0, g, lens * s) / torch.zeros_like(n).index_add_(0, g, lens)
            adv = s - torch.where(single, 0, bsl[g])
        elif estimator == "rloo":
            k = n[g]
            adv = torch.where(single, s, (s - mean[g]) * k / (k - 1).clamp(min=1))
        else:
            centered = s - torch.where(single, 0, mean[g])
            if estimator == "reinforce_plus_plus_baseline":
                a = centered[:, None].expand(B, T) * m
                a = (_masked_whiten(a, m) * m).to(out_dtype)
                return a, a
            if norm_by_std:
                var = torch.zeros_like(n).index_add_(0, g, (s - mean[g]) ** 2) / (n - 1).clamp(min=1)
                std = torch.where(single, 1.0, var.sqrt()[g])
                adv = centered / (std + (1e-6 if epsilon is None else epsilon))
            else:
                adv = centered
        a = (adv[:, None] * m).to(out_dtype)
        return a, a


def _optimal_token_baseline(r, m, g, G, n, old_logp, sum_pi_squared, rho, handle_zero_tail, eps):
    for name, t in (("old_logp", old_logp), ("sum_pi_squared", sum_pi_squared)):
        if t is None:
            raise ValueError(f"estimator='optimal_token_baseline' needs {name} ([B, T])")
    for name, t in (("old_logp", old_logp), ("sum_pi_squared", sum_pi_squared), ("rollout_weights", rho)):
        if t is not None and tuple(t.shape) != tuple(r.shape):
            raise ValueError(f"{name} must be [B, T] = {tuple(r.shape)}, got {tuple(t.shape)}")
    B, T = r.shape
    returns = (r * m).flip(-1).cumsum(-1).flip(-1)
    w = 1 - 2 * torch.exp(old_logp.detach().to(r.dtype)) + sum_pi_squared.detach().to(r.dtype)
    if rho is not None:
        w = w * rho.detach().to(r.dtype) ** 2
    wc = (w * m).cumsum(-1)
    num = torch.zeros(G, T, dtype=r.dtype, device=r.device).index_add_(0, g, returns * wc * m)
    den = torch.zeros(G, T, dtype=r.dtype, device=r.device).index_add_(0, g, wc * m) + eps
    base = torch.where((n[g] == 1)[:, None], 0, (num / den)[g])
    if handle_zero_tail:
        lens = m.sum(-1)
        for grp in range(G):  # the single longest response past the second longest: no baseline there
            members = (g == grp).nonzero().squeeze(1)
            if members.numel() < 2:
                continue
            ls, _ = torch.sort(lens[members])
            longest = members[lens[members] == ls[-1]]
            if longest.numel() == 1 and ls[-1] > ls[-2]:
                base[longest[0], int(ls[-2]):] = 0
    return (returns - base) * m, returns
