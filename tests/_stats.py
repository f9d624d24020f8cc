"""The statistical assertions of the estimator tests, stated once: unbiasedness within standard errors and
variance order by more than the sampling error of the variance estimates; and the one harness that collects an
estimator's independent gradient estimates through the graph API (grad_estimates), with their mean and standard
error (mean_and_se)."""
import math

import torch

import fastgrad as storch


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


def mean_and_se(g: torch.Tensor):
    """Per-coordinate mean of the estimates ``g`` ``[reps, ...]`` and its standard error."""
    return g.mean(0), g.std(0) / math.sqrt(g.shape[0])


def grad_estimates(make, dist, cost, param: torch.Tensor, reps: int, *, plate: bool = False, logits_of=None,
                   scale: float = 1.0, shift: float = 0.0, opt=None, values: bool = False):
    """``reps`` independent estimates, float64 ``[reps, *param.shape]``, of the gradient of E[cost] w.r.t.
    ``param`` through the graph API: draw ``make()(dist(x))``, register ``cost(z) * scale + shift``, backward().

    plate=False: ``reps`` whole steps, each on a fresh leaf copy of ``param`` (x = ``logits_of(leaf)``, the leaf
    itself by default); ``opt``, when given, is zeroed before and stepped after each step (a training loop). Steps
    are what a method that keeps state across them (a trained control variate, an online coefficient, a moving
    average) needs.
    plate=True: one step over a plate "reps" of repetitions, each row its own copy of ``param``: the leaf is
    ``[reps, *param.shape]`` and x is ``logits_of(leaf)`` with its leading dim (after the plates ``logits_of`` may
    have denoted) made the plate; backward() averages over that plate, so the leaf's gradient times ``reps`` is each
    row's estimate.

    values=True also returns each estimate's forward value ``[reps]``: backward()'s value per step, or per row the
    plate-weighted cost (what backward() reports for one draw)."""
    def step(x):
        z = make()(dist(x))
        c = cost(z)
        if scale != 1.0:
            c = c * scale
        if shift != 0.0:
            c = c + shift
        val = None
        if values and plate:
            val = (z.plates[0]._weight._tensor.detach().double() * c._tensor.detach().double()).sum(0)
        storch.add_cost(c, "c")
        loss = storch.backward()
        return val if plate else loss.detach().double()

    if plate:
        leaf = param.expand((reps,) + tuple(param.shape)).clone().requires_grad_()
        x = leaf if logits_of is None else logits_of(leaf)
        val = step(storch.denote_independent(x, len(getattr(x, "plates", ())), "reps"))
        g = (leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)).double() * reps  # None: no path
        return (g, val) if values else g
    out, vals = [], []
    for _ in range(reps):
        leaf = param.clone().requires_grad_()
        if opt is not None:
            opt.zero_grad()
        vals.append(step(leaf if logits_of is None else logits_of(leaf)))
        if opt is not None:
            opt.step()
        out.append(leaf.grad.detach().clone())
    g = torch.stack(out).double()
    return (g, torch.stack(vals)) if values else g


def grads_at_scales(sample, cost, theta: torch.Tensor, scales=(1.0, 2.0)):
    """``theta``'s gradient through the graph API once per scale of the cost, from the same seed: ``sample()`` draws
    (a method called on a distribution of ``theta``), ``cost(z)`` is the scalar cost registered, times the scale.
    The homogeneity check: cost x 2 must give gradient x 2."""
    grads = []
    for scale in scales:
        torch.manual_seed(0)
        theta.grad = None
        z = sample()
        storch.add_cost(scale * cost(z), "c")
        storch.backward()
        grads.append(theta.grad.clone())
    return grads
