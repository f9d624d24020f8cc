"""Sparse relaxations (sparsemax, alpha-entmax and their Gumbel versions) and the straight-through family beyond
Gumbel-softmax (ReinMax and its Gumbel-Rao-averaged and control-variate variants, Gumbel-Rao, Gapped and Decoupled
Straight-Through), IndeCateR's per-variable weights, and SIMPLE's exact k-subset sampling and marginals.
:mod:`fastgrad.functional` re-exports these; the graph API's methods call them."""
from __future__ import annotations

from typing import Optional

import torch

from ..ops import _checks, _philox
from ._validate import check_alpha, check_finite_float, check_logits, check_n, check_real, check_tau
from .sampling import conditional_gumbel_categorical, sample_categorical_one_hot, uniform


# -- alpha-entmax -------------------------------------------------------------------------------------------------
def _sparsemax_forward(z: torch.Tensor) -> torch.Tensor:
    """Sparsemax along the last dim by sorting (Martins & Astudillo 2016, alg. 1)."""
    zs, _ = torch.sort(z, -1, descending=True)
    K = z.shape[-1]
    j = torch.arange(1, K + 1, dtype=z.dtype, device=z.device)
    cum = zs.cumsum(-1)
    support = (1 + j * zs > cum)
    n = support.sum(-1, keepdim=True)                                   # >= 1: the largest entry is in it
    tau = (cum.gather(-1, n - 1) - 1) / n.to(z.dtype)
    return torch.clamp(z - tau, min=0)


def _entmax15_forward(z: torch.Tensor) -> torch.Tensor:
    """1.5-entmax along the last dim by sorting (Peters, Niculae & Martins 2019, alg. 2): ``[z/2 - tau]_+^2``."""
    z = z / 2
    zs, _ = torch.sort(z, -1, descending=True)
    K = z.shape[-1]
    j = torch.arange(1, K + 1, dtype=z.dtype, device=z.device)
    mean = zs.cumsum(-1) / j
    mean_sq = (zs * zs).cumsum(-1) / j
    delta = (1 - j * (mean_sq - mean * mean)) / j
    tau = mean - torch.sqrt(torch.clamp(delta, min=0))
    n = (tau <= zs).sum(-1, keepdim=True)
    return torch.clamp(z - tau.gather(-1, n - 1), min=0) ** 2


def _entmax_bisect_forward(z: torch.Tensor, alpha: float, iters: int = 60) -> torch.Tensor:
    """alpha-entmax ``[(alpha - 1) z - tau]_+^{1/(alpha - 1)}`` with ``tau`` found by bisection (Blondel, Martins &
    Niculae 2020): ``tau`` lies in ``[max - 1, max - K^{1 - alpha}]`` of ``(alpha - 1) z``."""
    x = (alpha - 1) * z
    K = z.shape[-1]
    hi = x.amax(-1, keepdim=True) - K ** (1 - alpha)
    lo = x.amax(-1, keepdim=True) - 1
    for _ in range(iters):
        tau = (lo + hi) / 2
        total = torch.clamp(x - tau, min=0).pow(1 / (alpha - 1)).sum(-1, keepdim=True)
        big = total >= 1
        lo = torch.where(big, tau, lo)
        hi = torch.where(big, hi, tau)
    p = torch.clamp(x - lo, min=0).pow(1 / (alpha - 1))
    return p / p.sum(-1, keepdim=True)


class _Entmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, alpha: float) -> torch.Tensor:
        if alpha == 2.0:
            p = _sparsemax_forward(z)
        elif alpha == 1.5:
            p = _entmax15_forward(z)
        else:
            p = _entmax_bisect_forward(z, alpha)
        ctx.alpha = alpha
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        # Jacobian diag(s) - s s^T / sum(s), s = p^{2 - alpha} on the support (Peters et al. 2019, prop. 1)
        (p,) = ctx.saved_tensors
        s = torch.where(p > 0, p.pow(2 - ctx.alpha), torch.zeros_like(p))
        gs = s * g
        return gs - s * (gs.sum(-1, keepdim=True) / s.sum(-1, keepdim=True)), None


def entmax(z: torch.Tensor, alpha: float = 1.5) -> torch.Tensor:
    """alpha-entmax along the last dim (Peters, Niculae & Martins, ACL 2019, "Sparse sequence-to-sequence models"):
    ``argmax_p <p, z> + H_alpha(p)`` over the simplex, ``[(alpha - 1) z - tau]_+^{1/(alpha - 1)}``; alpha = 2 is
    sparsemax, alpha -> 1 softmax. Exact by sorting for alpha in {1.5, 2}, by bisection otherwise (60 halvings);
    the backward is the closed-form Jacobian. ``z`` ``[..., K]`` finite float; alpha > 1."""
    z = check_real(z, "z")
    if not z.is_floating_point() or z.dim() < 1 or z.shape[-1] < 1:
        raise ValueError(f"z must be a floating tensor [..., K] with K >= 1, got {z.dtype} {tuple(z.shape)}")
    return _Entmax.apply(z, check_alpha(alpha))


def sparsemax(z: torch.Tensor) -> torch.Tensor:
    """Sparsemax along the last dim (Martins & Astudillo, ICML 2016): the Euclidean projection onto the simplex;
    :func:`entmax` with alpha = 2."""
    return entmax(z, 2.0)


def _gumbel_like(shape, device, generator, seed, offset) -> torch.Tensor:
    u = uniform(shape, generator=generator, seed=seed, offset=offset, device=device)
    return -torch.log(-torch.log(u))


def gumbel_entmax(logits: torch.Tensor, alpha: float = 1.5, tau: float = 1.0, n: int = 1, hard: bool = False, *,
                  generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
                  offset: Optional[int] = None) -> torch.Tensor:
    """``n`` Gumbel-entmax samples ``entmax_alpha((log_softmax(logits) + G) / tau)`` (Paulus, Choi, Tarlow, Krause
    & Maddison, NeurIPS 2020, "Gradient estimation with stochastic softmax tricks", appendix): a pathwise, biased
    relaxation of the categorical; sparse (exact zeros) unlike Gumbel-softmax. With ``hard``, the forward value is
    the one-hot argmax of the perturbed logits (the argmax of the entmax) and the gradient the relaxed one
    (straight-through). ``logits`` ``[..., K]`` -> ``[n, ..., K]`` in the logits' dtype; Gumbel noise from the
    Philox stream (:func:`fastgrad.functional.uniform`)."""
    logits = check_logits(logits, values=True)
    alpha = check_alpha(alpha)
    n = check_n(n)
    tau = check_tau(tau, logits.dtype)
    acc = _checks.acc_dtype(logits.dtype)
    g = _gumbel_like((n,) + tuple(logits.shape), logits.device, generator, seed, offset).to(acc)
    z = (torch.log_softmax(logits.to(acc), -1) + g) / tau
    y = _Entmax.apply(z, alpha)
    if hard:
        one = torch.nn.functional.one_hot(z.argmax(-1), logits.shape[-1]).to(acc)
        y = one + (y - y.detach())
    return y.to(logits.dtype)


# -- straight-through beyond Gumbel-softmax -------------------------------------------------------------------
def _softmax_jvp_surrogate(pi: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """A zero-valued tensor whose Jacobian w.r.t. ``logits`` is the softmax Jacobian at the constant ``pi``:
    ``pi * (d - <pi, d>)`` with ``d = logits - sg(logits)`` (masked categories, ``-inf``, get no gradient)."""
    safe = torch.where(torch.isfinite(logits), logits, torch.zeros_like(logits))
    d = safe - safe.detach()
    pi = pi.detach()
    return pi * (d - (pi * d).sum(-1, keepdim=True))


def _heun_surrogate(first: torch.Tensor, pi0: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """ReinMax's combination ``2 J_1 - J(pi_0) / 2`` as a zero-valued surrogate: ``first`` the surrogate of the
    first Jacobian (``J(pi_1)`` for ReinMax, the Gumbel-Rao one for ReinMax-Rao), ``pi0`` ``softmax(logits)``
    broadcast to its shape."""
    return 2 * first - 0.5 * _softmax_jvp_surrogate(pi0, logits)


def _sample_then_offset(logits: torch.Tensor, n: int, generator, seed, offset):
    """An exact one-hot sample ``(idx, one)`` and the offset at which noise drawn after it on the same Philox
    stream starts (the conditional Gumbels of Gumbel-Rao and ReinMax-Rao; unchanged without a seed)."""
    idx, one = sample_categorical_one_hot(logits, n, generator=generator, seed=seed, offset=offset)
    if seed is not None:
        offset = (offset or 0) + _philox.counters_used(idx.numel())
    return idx, one, offset


def reinmax(logits: torch.Tensor, n: int = 1, tau: float = 1.0, *, generator: Optional[torch.Generator] = None,
            seed: Optional[int] = None, offset: Optional[int] = None) -> torch.Tensor:
    """``n`` one-hot categorical samples with the ReinMax gradient (Liu, Dong, Liu, Yu & Gao, NeurIPS 2023,
    "Bridging discrete and backpropagation: straight-through and beyond"): the forward value is the sample ``D``;
    the backward is Heun's second-order approximation ``2 J(pi_1) - J(pi_0) / 2`` with ``pi_0 = softmax(logits)``,
    ``pi_1 = (D + softmax(logits / tau)) / 2`` and ``J(pi) = diag(pi) - pi pi^T`` (the paper's algorithm 2).
    Biased (second order in the step), one cost evaluation per sample, the cost of straight-through; the paper
    recommends tau >= 1. ``logits`` ``[..., K]`` -> ``[n, ..., K]`` in the logits' dtype."""
    logits = check_logits(logits, values=True)
    tau = check_tau(tau, logits.dtype)
    _, one = sample_categorical_one_hot(logits, n, generator=generator, seed=seed, offset=offset)
    acc = _checks.acc_dtype(logits.dtype)
    la = logits.to(acc)
    one = one.to(acc)
    pi0 = torch.softmax(la, -1).detach()
    pi1 = (one + torch.softmax(la / tau, -1).detach()) / 2
    grad = _heun_surrogate(_softmax_jvp_surrogate(pi1, la), pi0.expand_as(pi1), la)
    return (one + grad).to(logits.dtype)


def gumbel_rao(logits: torch.Tensor, n: int = 1, tau: float = 1.0, m: int = 10, *,
               generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
               offset: Optional[int] = None) -> torch.Tensor:
    """``n`` one-hot categorical samples with the Gumbel-Rao gradient (Paulus, Maddison & Krause, ICLR 2021,
    "Rao-Blackwellizing the straight-through Gumbel-softmax gradient estimator"): the forward value is the sample
    ``D``; the backward is the straight-through Gumbel-softmax Jacobian averaged over ``m`` Gumbel perturbations
    conditioned on their argmax being ``D`` (:func:`fastgrad.functional.conditional_gumbel_categorical`):
    ``grad ~ d f / d D * mean_m d softmax(z~_m / tau) / d logits``. Biased as straight-through Gumbel-softmax is, with
    lower variance; one cost evaluation per sample. ``logits`` ``[..., K]`` -> ``[n, ..., K]``."""
    logits = check_logits(logits, values=True)
    tau = check_tau(tau, logits.dtype)
    n, m = check_n(n), check_n(m, "m")
    idx, one, offset = _sample_then_offset(logits, n, generator, seed, offset)
    acc = _checks.acc_dtype(logits.dtype)
    la = logits.to(acc)
    center = torch.log_softmax(la.detach(), -1).expand(one.shape)
    grad = _conditional_softmax_jvp_surrogate(center, idx, la, tau, m, generator, seed, offset)
    return (one.to(acc) + grad).to(logits.dtype)


def _conditional_softmax_jvp_surrogate(center: torch.Tensor, idx: torch.Tensor, logits: torch.Tensor, tau: float,
                                       m: int, generator, seed, offset) -> torch.Tensor:
    """A zero-valued tensor ``[n, ..., K]`` whose Jacobian w.r.t. ``logits`` is the Gumbel-Rao Jacobian
    ``mean_r J(softmax(z~_r / tau)) / tau`` over ``m`` perturbations ``z~_r = center + G_r`` conditioned on
    ``argmax z~_r = idx`` (``center`` ``[n, ..., K]`` normalized log-probabilities, one row per sample). The
    straight-through Jacobian of ``softmax((logits + G) / tau)`` with the noise held fixed at the conditional draws,
    not the derivative of the conditional sampler (which is REBAR's)."""
    b = idx.unsqueeze(0).expand((m,) + tuple(idx.shape))
    # the mean Jacobian is diag(mean p) - mean p p^T: where that is at most half the m softmaxes' size, the backward
    # keeps it instead of them. Elementwise, not a matmul (no TF32/bf32 rounding of a difference of near-equal terms)
    moments = 2 * (center.shape[-1] + 1) <= m
    with torch.no_grad():
        z = conditional_gumbel_categorical(center, b, generator=generator, seed=seed, offset=offset)  # [m, n, ..., K]
        p = torch.softmax(z / tau, -1)
        if moments:
            p_mean = p.mean(0)
            pp_mean = sum((c.unsqueeze(-1) * c.unsqueeze(-2)).sum(0) for c in p.split(8)) / m  # [n, ..., K, K]
    safe = torch.where(torch.isfinite(logits), logits, torch.zeros_like(logits)).to(p.dtype)
    d = safe - safe.detach()
    if moments:
        return (p_mean * d - (pp_mean * d.unsqueeze(-2)).sum(-1)) / tau
    return (p * (d - (p * d).sum(-1, keepdim=True))).mean(0) / tau


def reinmax_rao(logits: torch.Tensor, n: int = 1, tau: float = 1.0, m: int = 100, *,
                generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
                offset: Optional[int] = None) -> torch.Tensor:
    """``n`` one-hot categorical samples with the ReinMax-Rao gradient (Wang & Bui 2026, arXiv 2603.08257, "Beyond
    ReinMax"; formula from the authors' code, ``reinmax_v3``): ReinMax's backward ``2 J(pi_1) - J(pi) / 2``
    (:func:`reinmax` at temperature 1) with its first Jacobian replaced by a Gumbel-Rao one at its midpoint:
    ``2 J_GR - J(pi) / 2``, ``J_GR = mean_r J(softmax(z~_r / tau)) / tau`` over ``m`` perturbations
    ``z~_r = log pi_1 + G_r`` conditioned on ``argmax z~_r = D``
    (:func:`fastgrad.functional.conditional_gumbel_categorical`), ``pi_1 = (pi + D) / 2``, ``pi = softmax(logits)``
    (``tau`` does not enter ``pi_1``, unlike in :func:`reinmax`). The forward value is the exact sample ``D``.
    Biased (as ReinMax, and the averaging moves its mean: it is not ReinMax's); one cost evaluation per sample, plus
    ``m`` softmaxes of ``K`` per sample in the forward; the backward keeps the softmaxes' mean and mean outer
    product (``K + 1`` times a sample's memory) when ``2 (K + 1) <= m``, else the ``m`` softmaxes. The authors use
    ``tau = 1``. ``logits`` ``[..., K]`` -> ``[n, ..., K]`` in the logits' dtype; the sample and the conditional
    noise from the Philox stream (same ``seed``, same samples as :func:`reinmax`)."""
    logits = check_logits(logits, values=True)
    tau = check_tau(tau, logits.dtype)
    n, m = check_n(n), check_n(m, "m")
    idx, one, offset = _sample_then_offset(logits, n, generator, seed, offset)
    acc = _checks.acc_dtype(logits.dtype)
    la = logits.to(acc)
    one = one.to(acc)
    pi = torch.softmax(la, -1).detach().expand_as(one)
    gr = _conditional_softmax_jvp_surrogate(torch.log((pi + one) / 2), idx, la, tau, m, generator, seed, offset)
    grad = _heun_surrogate(gr, pi, la)
    return (one + grad).to(logits.dtype)


def reinmax_cv(logits: torch.Tensor, n: int = 1, tau: float = 1.0, eta: float = 0.7, m: int = 100, *,
               generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
               offset: Optional[int] = None) -> torch.Tensor:
    """``n`` one-hot categorical samples with the ReinMax-CV gradient (Wang & Bui 2026, arXiv 2603.08257, "Beyond
    ReinMax"; formula from the authors' code, ``reinmax_cv``): the sample is Gumbel-max, ``D = onehot(argmax(logits
    + G))``, and the backward is ReinMax's (at temperature 1) plus ``eta`` times a control variate, the Gumbel-Rao
    Jacobian minus the Gumbel-softmax one at the same midpoint ``log pi_1``, ``pi_1 = (pi + D) / 2``:
    ``2 J(pi_1) - J(pi) / 2 + eta (J_GR - J(softmax((log pi_1 + G) / tau)) / tau)``, ``J_GR`` as in
    :func:`reinmax_rao` over ``m`` conditional perturbations. Two departures from the authors' code: it passes the
    relaxed sample where the Gumbel noise ``G`` is meant (this uses ``G``), and it divides by ``tau`` only outside
    the Gumbel-softmax term's softmax (this takes that term's true Jacobian, built as ``J_GR`` is; the same at the
    authors' ``tau = 1``). Biased: the control variate is not zero-mean (the forward's noise is conditioned at
    ``logits``, ``J_GR`` at ``log pi_1``), and ReinMax is biased. One cost evaluation per sample; memory as
    :func:`reinmax_rao`'s. ``eta = 0`` is ReinMax at ``tau = 1`` with Gumbel-max samples; the authors' default is
    ``eta = 0.7``, ``tau = 1``. ``logits`` ``[..., K]`` -> ``[n, ..., K]`` in the logits' dtype; all noise from the
    Philox stream."""
    logits = check_logits(logits, values=True)
    tau = check_tau(tau, logits.dtype)
    n, m = check_n(n), check_n(m, "m")
    eta = check_finite_float(eta, "eta")
    acc = _checks.acc_dtype(logits.dtype)
    la = logits.to(acc)
    g = _gumbel_like((n,) + tuple(logits.shape), logits.device, generator, seed, offset).to(acc)
    if seed is not None:
        offset = (offset or 0) + _philox.counters_used(g.numel())
    idx = (la.detach() + g).argmax(-1)
    one = torch.nn.functional.one_hot(idx, logits.shape[-1]).to(acc)
    pi = torch.softmax(la, -1).detach().expand_as(one)
    center = torch.log((pi + one) / 2)
    grad = _heun_surrogate(_softmax_jvp_surrogate((pi + one) / 2, la), pi, la)
    if eta:
        gr = _conditional_softmax_jvp_surrogate(center, idx, la, tau, m, generator, seed, offset)
        gs = _softmax_jvp_surrogate(torch.softmax((center + g) / tau, -1), la) / tau
        grad = grad + eta * (gr - gs)
    return (one + grad).to(logits.dtype)


# -- IndeCateR --------------------------------------------------------------------------------------------------
def indecater_samples(samples: torch.Tensor, K: int) -> torch.Tensor:
    """The ``D K`` neighbours of each sample that IndeCateR evaluates: ``samples`` int64 ``[S, ..., D]`` ->
    ``[S, D, K, ..., D]``, entry ``[s, d, c]`` equal to sample ``s`` with variable ``d`` set to ``c``."""
    if not isinstance(samples, torch.Tensor) or samples.dtype != torch.int64 or samples.dim() < 2:
        raise ValueError(f"samples must be an int64 tensor [S, ..., D], got {getattr(samples, 'dtype', None)} "
                         f"{tuple(getattr(samples, 'shape', ()))}")
    K = check_n(K, "K")
    S, Dn = samples.shape[0], samples.shape[-1]
    mid = tuple(samples.shape[1:-1])
    out = samples.view((S, 1, 1) + mid + (Dn,)).expand((S, Dn, K) + mid + (Dn,)).clone()
    d = torch.arange(Dn, device=samples.device).view((1, Dn, 1) + (1,) * len(mid) + (1,))
    c = torch.arange(K, device=samples.device).view((1, 1, K) + (1,) * len(mid) + (1,))
    col = torch.arange(Dn, device=samples.device).view((1, 1, 1) + (1,) * len(mid) + (Dn,))
    return torch.where(col == d, c.expand_as(out), out)


def indecater_weights(logits: torch.Tensor, S: int) -> torch.Tensor:
    """The plate weights of IndeCateR's ``S D K`` evaluations (De Smet, Sansone & Zuidberg Dos Martires, NeurIPS
    2023, "Differentiable sampling of categorical distributions using the CatLog-derivative trick"):
    ``logits`` ``[..., D, K]`` -> ``[S, D, K, ...]``, value ``p_d(c) / (S D)`` (so the weighted sum of the costs is
    the mean over ``d`` of ``D`` unbiased estimates of ``E[f]``) and gradient ``grad p_d(c) / S`` (the CatLog
    estimator ``sum_d sum_c grad p_d(c) mean_s f(x_-d^(s), c)``: unbiased, Rao-Blackwellized per variable)."""
    logits = check_logits(logits, min_dim=2, values=False)
    S = check_n(S, "S")
    p = torch.softmax(logits.to(_checks.acc_dtype(logits.dtype)), -1)   # [..., D, K]
    Dn = p.shape[-2]
    w = p.detach() / (S * Dn) + (p - p.detach()) / S
    lead = p.dim() - 2
    w = w.permute((lead, lead + 1) + tuple(range(lead)))                 # [D, K, ...]
    return w.unsqueeze(0).expand((S,) + tuple(w.shape))


def indecater_surrogate(logits: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """IndeCateR as a surrogate: ``cost`` ``[S, D, K, ...]`` of the :func:`indecater_samples` neighbours ->
    ``[...]`` with value the estimate of ``E[f]`` and gradient the CatLog estimator (see
    :func:`indecater_weights`)."""
    cost = check_real(cost, "cost")
    if cost.dim() < 3:
        raise ValueError(f"cost must be [S, D, K, ...], got shape {tuple(cost.shape)}")
    w = indecater_weights(logits, cost.shape[0])
    if tuple(cost.shape) != tuple(w.shape):
        raise ValueError(f"cost must be of shape {tuple(w.shape)} ([S, D, K, ...]), got {tuple(cost.shape)}")
    return (w * cost.detach().to(w.dtype)).sum((0, 1, 2))


def gapped_straight_through(logits: torch.Tensor, n: int = 1, tau: float = 1.0, gap=1.0, *,
                            generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
                            offset: Optional[int] = None) -> torch.Tensor:
    """``n`` one-hot categorical samples with the Gapped Straight-Through gradient (Fan, Chi, Rudnicky & Ramadge,
    ICML 2022, "Training Discrete Deep Generative Models via Gapped Straight-Through Estimator"): the forward value
    is an exact sample ``D`` of ``softmax(logits)`` (no Gumbel noise); the backward is that of ``softmax(theta~ /
    tau)``, ``theta~ = logits + m`` with a constant shift ``m`` (of the detached logits) that raises the sampled
    logit to the row's maximum and pushes every other logit at least ``gap`` below it, so ``argmax theta~ = D``
    (the official code's ``gst_mover``). ``gap``: a float (the paper's GST-1.0 is 1), or ``"p"`` for the
    per-sample gap ``-log(1 - pi_D) / pi_D`` (GST-p). Biased; one cost evaluation per sample, the cost of
    straight-through. ``logits`` ``[..., K]`` -> ``[n, ..., K]`` in the logits' dtype."""
    logits = check_logits(logits, values=True)
    tau = check_tau(tau, logits.dtype)
    if not (gap == "p" or (isinstance(gap, (int, float)) and not isinstance(gap, bool)
                           and _positive_float(gap) is not None)):
        raise ValueError(f"gap must be a positive float or 'p', got {gap!r}")
    _, one = sample_categorical_one_hot(logits, n, generator=generator, seed=seed, offset=offset)
    acc = _checks.acc_dtype(logits.dtype)
    la = logits.to(acc)
    one = one.to(acc)
    th = la.detach()
    top = th.amax(-1, keepdim=True)
    live = torch.isfinite(th)
    th = torch.where(live, th, top)  # an impossible class keeps its -inf logit: no shift there
    if gap == "p":
        pi_d = (torch.softmax(th, -1) * one).sum(-1, keepdim=True) * (1 - 1e-5)
        kappa = -torch.log1p(-pi_d) / pi_d
    else:
        kappa = _positive_float(gap)
    shift = ((top - th) * one - torch.relu(th - top + kappa) * (1 - one)) * live
    s = torch.softmax((la + shift) / tau, -1)
    return (one + (s - s.detach())).to(logits.dtype)


def _positive_float(v) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f > 0 and f != float("inf") else None


def decoupled_straight_through(logits: torch.Tensor, n: int = 1, forward_tau: float = 1.0, backward_tau: float = 1.0,
                               *, generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
                               offset: Optional[int] = None) -> torch.Tensor:
    """``n`` one-hot samples with Decoupled Straight-Through Gumbel-softmax (Shah, Yan, Mozer & Liu 2024, arXiv
    2410.13331, "Improving Discrete Optimisation Via Decoupled Straight-Through Gumbel-Softmax"): separate
    temperatures for the two passes. Forward: ``onehot(argmax(logits / forward_tau + G))``, an exact sample of
    ``softmax(logits / forward_tau)`` (the exploration temperature); backward: the Jacobian of the relaxed sample
    ``softmax(logits / backward_tau + G)`` at the same Gumbels ``G``. At ``forward_tau = backward_tau = 1`` it is
    straight-through Gumbel-softmax at temperature 1. Biased (the forward samples a tempered distribution unless
    ``forward_tau = 1``); one cost evaluation per sample. Written from the paper's description: its algorithm box
    was not available to us, and whether the backward reuses the forward's noise is our reading.
    ``logits`` ``[..., K]`` -> ``[n, ..., K]`` in the logits' dtype."""
    logits = check_logits(logits, values=True)
    n = check_n(n)
    tf = check_tau(forward_tau, logits.dtype)
    tb = check_tau(backward_tau, logits.dtype)
    acc = _checks.acc_dtype(logits.dtype)
    la = logits.to(acc)
    g = _gumbel_like((n,) + tuple(logits.shape), logits.device, generator, seed, offset).to(acc)
    one = torch.nn.functional.one_hot((la.detach() / tf + g).argmax(-1), logits.shape[-1]).to(acc)
    y = torch.softmax(la / tb + g, -1)
    return (one + (y - y.detach())).to(logits.dtype)


# -- k-subsets: SIMPLE ---------------------------------------------------------------------------------------------
def _check_k_subset(logits: object, k: object) -> "tuple[torch.Tensor, int]":
    logits = check_logits(logits, values=True)
    k = check_n(k, "k")
    if k > logits.shape[-1]:
        raise ValueError(f"k must lie in [1, n] = [1, {logits.shape[-1]}] (ones among the last dimension's n "
                         f"Bernoullis), got {k}")
    if logits.numel() and int(torch.isfinite(logits).sum(-1).min()) < k:
        raise ValueError(f"every row needs at least k = {k} items of nonzero probability (finite logits)")
    return logits, k


_LOG_ZERO = -1e30


def _log_esp(theta: torch.Tensor, k: int, prefix: bool = False) -> torch.Tensor:
    """``log e_j(exp(theta[..., i:]))`` for every suffix ``i`` (``0 .. n``) and ``j = 0 .. k``: ``[n + 1, ..., k + 1]``
    (the elementary symmetric polynomials of the weights, in log space; O(n k)); with ``prefix``, of
    ``theta[..., :i]`` instead."""
    n = theta.shape[-1]
    # e_j = 0 (j > the items so far) as a finite floor: logaddexp(-inf, -inf) has a NaN gradient
    E = torch.full(theta.shape[:-1] + (k + 1,), _LOG_ZERO, dtype=theta.dtype, device=theta.device)
    E[..., 0] = 0.0
    out = [E]
    for i in (range(n) if prefix else range(n - 1, -1, -1)):
        t = theta[..., i:i + 1]
        E = torch.cat([E[..., :1], torch.logaddexp(E[..., 1:], E[..., :-1] + t)], -1)
        out.append(E)
    return torch.stack(out if prefix else out[::-1])


def k_subset_marginals(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The exact marginals ``P(z_i = 1)`` of the k-subset distribution ``p(z) ∝ exp(<logits, z>)`` over ``z in
    {0,1}^n`` with exactly ``k`` ones (independent Bernoullis conditioned on their sum; Ahmed et al., ICLR 2023):
    ``w_i e_{k-1}(w without i) / e_k(w)``, ``w = exp(logits)``, from prefix and suffix recursions (O(n k)),
    differentiable. ``logits`` ``[..., n]`` -> ``[..., n]`` summing to ``k``."""
    logits, k = _check_k_subset(logits, k)
    theta = logits.to(_checks.acc_dtype(logits.dtype))
    P = _log_esp(theta, k, prefix=True)                               # [n + 1, ..., k + 1]
    S = _log_esp(theta, k)
    log_z = S[0, ..., k]
    # e_{k-1}(w without i) = sum_j e_j(w_{:i}) e_{k-1-j}(w_{i+1:})
    excl = torch.logsumexp(P[:-1, ..., :k] + S[1:, ..., :k].flip(-1), -1)  # [n, ...]
    excl = excl.permute(tuple(range(1, excl.dim())) + (0,))             # [..., n]
    return torch.exp(theta + excl - log_z[..., None]).to(logits.dtype)


def k_subset_sample(logits: torch.Tensor, k: int, n: int = 1, *, generator: Optional[torch.Generator] = None,
                    seed: Optional[int] = None, offset: Optional[int] = None) -> torch.Tensor:
    """``n`` exact samples of the k-subset distribution ``p(z) ∝ exp(<logits, z>)``, ``sum z = k`` (see
    :func:`k_subset_marginals`): element ``i`` is included with probability ``w_i e_{r-1}(w_{i+1:}) / e_r(w_{i:})``
    given the ``r`` ones still to place (O(n k); one Philox uniform per element). ``logits`` ``[..., n_items]`` ->
    ``[n, ..., n_items]`` 0/1 in the logits' dtype, no gradient."""
    logits, k = _check_k_subset(logits, k)
    n = check_n(n, "n")
    theta = logits.detach().to(_checks.acc_dtype(logits.dtype))
    S = _log_esp(theta, k)                                            # [N + 1, ..., k + 1]
    N = theta.shape[-1]
    seed, offset = _philox.draw_seed_offset(n * theta.numel(), generator, seed, offset)
    u = _philox.uniform(seed, offset, n * theta.numel(), theta.device).view((n,) + tuple(theta.shape))
    r = torch.full((n,) + tuple(theta.shape[:-1]), k, dtype=torch.int64, device=theta.device)
    z = torch.zeros((n,) + tuple(theta.shape), dtype=theta.dtype, device=theta.device)
    for i in range(N):
        here = S[i].expand((n,) + tuple(S[i].shape)).gather(-1, r[..., None])[..., 0]
        rest = S[i + 1].expand((n,) + tuple(S[i + 1].shape)).gather(-1, (r - 1).clamp(min=0)[..., None])[..., 0]
        p = torch.where(r > 0, torch.exp(theta[..., i] + rest - here), torch.zeros_like(here))
        take = u[..., i].to(theta.dtype) < p
        z[..., i] = take.to(theta.dtype)
        r = r - take.long()
    return z.to(logits.dtype)


def simple(logits: torch.Tensor, k: int, n: int = 1, *, generator: Optional[torch.Generator] = None,
           seed: Optional[int] = None, offset: Optional[int] = None) -> torch.Tensor:
    """SIMPLE (Ahmed, Zeng, Niepert & Van den Broeck, ICLR 2023, "SIMPLE: A Gradient Estimator for k-Subset
    Sampling"): ``n`` exact samples ``z`` of the k-subset distribution forward, the Jacobian of the exact marginals
    :func:`k_subset_marginals` backward (``z + mu - sg(mu)``). Biased (exact for costs linear in ``z``), one cost
    evaluation per sample, O(n k) per row for the sample and the marginals. ``logits`` ``[..., n_items]`` ->
    ``[n, ..., n_items]``."""
    z = k_subset_sample(logits, k, n, generator=generator, seed=seed, offset=offset)
    mu = k_subset_marginals(logits, k)
    return z + (mu - mu.detach())
