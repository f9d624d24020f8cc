"""The statistical assertions of the estimator tests, stated once: unbiasedness within standard errors and
variance order by more than the sampling error of the variance estimates."""
import math

import torch


def var_and_se(g: torch.Tensor):
    """Per-coordinate variance of the estimates ``g`` ``[reps, ...]`` and the standard error of that estimate."""
    d = (g - g.mean(0)) ** 2
    return d.mean(0), d.std(0) / math.sqrt(g.shape[0])


def assert_unbiased(g: torch.Tensor, exact: torch.Tensor, bound: float = 4.5) -> None:
    """|mean - exact| / standard error below ``bound`` in every coordinate."""
    z = (g.mean(0) - exact).abs() / (g.std(0) / math.sqrt(g.shape[0]))
    assert (z < bound).all(), z


def assert_lower_variance(low: torch.Tensor, high: torch.Tensor, sigmas: float = 3.0) -> None:
    """Every coordinate's variance of ``low`` is below that of ``high`` by more than ``sigmas`` standard errors of
    the difference (independent runs)."""
    (v_l, s_l), (v_h, s_h) = var_and_se(low), var_and_se(high)
    assert (v_l < v_h - sigmas * torch.sqrt(s_l ** 2 + s_h ** 2)).all(), (v_l, v_h)


def assert_lower_total_variance(low: torch.Tensor, high: torch.Tensor, sigmas: float = 3.0) -> None:
    """The variance summed over coordinates (the expected squared distance of an estimate from its mean) of
    ``low`` is below that of ``high`` by more than ``sigmas`` standard errors of the difference."""
    def total(g):
        d = ((g - g.mean(0)) ** 2).flatten(1).sum(1)
        return d.mean(), d.std() / math.sqrt(g.shape[0])
    (v_l, s_l), (v_h, s_h) = total(low), total(high)
    assert v_l < v_h - sigmas * math.sqrt(s_l ** 2 + s_h ** 2), (float(v_l), float(v_h))


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square p-value of ``counts`` against cell probabilities ``probs``, the rare cells (expected
    count <= 5) pooled into one."""
    from scipy.stats import chisquare
    n = counts.sum()
    probs = probs.double() / probs.double().sum()
    keep = probs * n > 5  # pool the rare cells
    obs = torch.cat([counts[keep], counts[~keep].sum().view(1)]).double()
    exp = torch.cat([probs[keep], probs[~keep].sum().view(1)]).double() * n
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs.numpy(), exp.numpy()).pvalue)
