"""The antithetic estimators: ARM, DisARM and ARMS for Bernoulli variables, and DisARM and CARMS for categoricals.

Categorical DisARM: Dong, Mnih & Tucker, NeurIPS 2021, "Coupled Gradient Estimators for Discrete Latent Variables".
A categorical of ``K`` classes is written as ``K - 1`` binary decisions taken in turn on the classes in a fixed
order: at stage ``i`` the class ``i`` is chosen with probability ``sigmoid(phi_i) = p_i / sum_{j >= i} p_j`` (stick
breaking), so the stage logits are ``phi_i = theta_i - logsumexp_{j > i} theta_j``. Two samples are coupled by one
uniform per stage, ``u`` and ``1 - u`` (DisARM's antithetic pair), and the estimator is DisARM on the stage
decisions.

Conventions of the categorical functions: ``logits`` ``[..., K]`` (any batch shape; every row one categorical),
``n`` antithetic pairs; samples ``[2n, ...]`` int64 labels (the ``n`` first samples, then their partners); noise
``u`` ``[n, ..., K - 1]``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..ops import _checks, _philox
from ._validate import (check_bernoulli_logits, check_logits, check_n, check_order, check_sample_costs,
                        check_samples_and_cost, pair_costs)
from .sampling import uniform


def arm_sample(logits: torch.Tensor, n: int = 1, *, generator: Optional[torch.Generator] = None,
               seed: Optional[int] = None, offset: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` antithetic pairs of ``Bernoulli(sigmoid(logits))`` samples (Yin & Zhou 2019; Dong et al. 2020).

    One uniform ``u`` per pair and latent: ``b = 1[u > sigmoid(-logits)]``, ``b~ = 1[u < sigmoid(logits)]`` (each
    marginally Bernoulli(sigmoid(logits)); Storchastic's ``z = logits +- Logistic noise > 0``, the same draw).

    Returns ``(b, u)``: ``b`` ``[2n, ...]`` in the logits' dtype (the n first samples, then their n antithetic
    partners), ``u`` float32 ``[n, ...]``."""
    logits = check_bernoulli_logits(logits)
    n = check_n(n)
    u = uniform((n,) + tuple(logits.shape), generator=generator, seed=seed, offset=offset, device=logits.device)
    t = logits.detach().to(_checks.acc_dtype(logits.dtype))
    b1 = u.to(t.dtype) > torch.sigmoid(-t)
    b2 = u.to(t.dtype) < torch.sigmoid(t)
    return torch.cat([b1, b2], 0).to(logits.dtype), u


def arm_surrogate(logits: torch.Tensor, u: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """ARM (Yin & Zhou 2019, "ARM: Augment-REINFORCE-Merge Gradient for Stochastic Binary Networks"): the
    per-pair surrogate whose gradient w.r.t. ``logits`` is ``(f(b) - f(b~)) (u - 1/2)`` per latent. Unbiased;
    2 cost evaluations per pair; Bernoulli latents only.

    Args: ``logits`` ``[...]``, ``u`` ``[n, ...]`` from :func:`arm_sample`, ``cost`` ``[2n, *batch]`` of the
    samples ``b`` (broadcast over the trailing latent dims). Returns ``[n, ...]``: average over the pairs
    (``.mean(0)``) and sum over the latents for the loss."""
    logits = check_bernoulli_logits(logits)
    if not isinstance(u, torch.Tensor) or tuple(u.shape[1:]) != tuple(logits.shape) or u.dim() < 1:
        raise ValueError(f"u must have shape [n, {', '.join(map(str, logits.shape))}], got "
                         f"{tuple(getattr(u, 'shape', ()))}")
    f1, f2 = pair_costs(cost, u.shape[0], u.dim())
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
    logits = check_bernoulli_logits(logits)
    if not isinstance(b, torch.Tensor) or b.dim() < 1 or b.shape[0] % 2 or tuple(b.shape[1:]) != tuple(logits.shape):
        raise ValueError(f"b must have shape [2n, {', '.join(map(str, logits.shape))}], got "
                         f"{tuple(getattr(b, 'shape', ()))}")
    n = b.shape[0] // 2
    f1, f2 = pair_costs(cost, n, b.dim())
    acc = _checks.acc_dtype(logits.dtype)
    b1, b2 = b[:n].to(acc), b[n:].to(acc)
    t = logits.to(acc)
    coef = 0.5 * (f1 - f2).to(acc) * (b1 != b2).to(acc) * (1 - 2 * b2) * torch.sigmoid(t.detach().abs())
    return coef * t


def _dirichlet_copula_uniforms(shape, n: int, generator, seed, offset, device, dtype) -> torch.Tensor:
    """``n`` jointly antithetic uniforms per element of ``shape``: ``d ~ Dirichlet(1, ..., 1)`` over the n (normalized
    exponentials of the Philox stream), ``u_k = (1 - d_k)**(n - 1)`` (each U(0, 1)); ``[n, *shape]``."""
    v = uniform((n,) + tuple(shape), generator=generator, seed=seed, offset=offset, device=device).to(dtype)
    e = -torch.log(v)
    return (1 - e / e.sum(0, keepdim=True)) ** (n - 1)


def arms_sample(logits: torch.Tensor, n: int = 2, *, generator: Optional[torch.Generator] = None,
                seed: Optional[int] = None, offset: Optional[int] = None) -> torch.Tensor:
    """``n >= 2`` mutually antithetic ``Bernoulli(sigmoid(logits))`` samples (Dimitriev & Zhou 2021, "ARMS:
    Antithetic-REINFORCE-Multi-Sample Gradient for Binary Variables"): per latent, ``d ~ Dirichlet(1, ..., 1)``
    over the n samples (normalized exponentials of the Philox stream), ``u_k = (1 - d_k)**(n - 1)`` (each
    uniform, jointly negatively dependent), ``b_k = 1[u_k < p]`` for ``p = sigmoid(logits) <= 1/2`` and
    ``1[u_k > 1 - p]`` above. At n = 2 these are DisARM's pairs. Returns ``b`` ``[n, ...]`` in the logits' dtype."""
    logits = check_bernoulli_logits(logits)
    n = check_n(n)
    if n < 2:
        raise ValueError(f"ARMS needs n >= 2 mutually antithetic samples, got {n}")
    acc = _checks.acc_dtype(logits.dtype)
    u = _dirichlet_copula_uniforms(logits.shape, n, generator, seed, offset, logits.device, acc)
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
    logits, cost = check_samples_and_cost(logits, b, cost)
    n = b.shape[0]
    acc = _checks.acc_dtype(logits.dtype)
    f = cost.detach().to(acc).reshape(tuple(cost.shape) + (1,) * (b.dim() - cost.dim()))
    loo = (f.sum(0, keepdim=True) - f) / (n - 1)
    t = logits.to(acc)
    p = torch.sigmoid(t.detach())
    coef = (f - loo) * (b.to(acc) - p) / (1 - _arms_correlation(p, n))
    return coef * t


# -- categorical DisARM (stick breaking) ---------------------------------------------------------------------
def stick_breaking_logits(logits: torch.Tensor, order: Optional[str] = "ascending"
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The stage logits of the stick-breaking construction of ``Categorical(logits=logits)``.

    The classes are first put in ``order`` of their logits (``"ascending"``, Dong et al.'s choice, keeps every stage
    probability at or below 1/2, which the importance-weighted estimator needs; ``None`` keeps the classes' order).
    Returns ``(phi [..., K - 1], perm [..., K])``: ``phi_i = l_i - logsumexp_{j > i} l_j`` with ``l`` the sorted
    logits (differentiable w.r.t. ``logits``; ``-inf`` for a class of probability 0), and ``perm[..., i]`` the class
    at position ``i``. Computed in the accumulation dtype (float32 for 16-bit logits)."""
    order = check_order(order)
    logits = check_logits(logits, values=False)
    t = logits.to(_checks.acc_dtype(logits.dtype))
    K = t.shape[-1]
    if order is None:
        perm = torch.arange(K, device=t.device).expand(t.shape)
    else:
        perm = torch.argsort(t.detach(), dim=-1, descending=order == "descending", stable=True)
    # a class of probability 0 becomes a very negative finite logit: its stage probability underflows to 0 exactly
    # and no gradient of logsumexp over an all-impossible tail becomes 0 * inf
    sl = torch.gather(t, -1, perm).clamp_min(torch.finfo(t.dtype).min / 4)
    tail = torch.logcumsumexp(sl.flip(-1), -1).flip(-1)   # tail[i] = logsumexp(l[i:])
    phi = sl[..., :-1] - tail[..., 1:]
    impossible = torch.gather(torch.isneginf(t), -1, perm)[..., :-1]
    return phi.masked_fill(impossible, float("-inf")), perm


def _stages(phi: torch.Tensor, u: torch.Tensor):
    """The stage decisions of both chains and where each stops: ``b1 = 1[u > sigmoid(-phi)]``,
    ``b2 = 1[u < sigmoid(phi)]`` (each marginally ``Bernoulli(sigmoid(phi))``, as in :func:`arm_sample`), and the
    sorted positions ``s1``, ``s2`` ``[n, ...]`` of the first stage that says yes (``K - 1`` if none does)."""
    p = phi.detach()
    uu = u.to(p.dtype)
    b1 = uu > torch.sigmoid(-p)
    b2 = uu < torch.sigmoid(p)
    yes = torch.ones(b1.shape[:-1] + (1,), dtype=torch.bool, device=b1.device)
    s1 = torch.cat([b1, yes], -1).to(torch.uint8).argmax(-1)   # the first maximum: the first "yes"
    s2 = torch.cat([b2, yes], -1).to(torch.uint8).argmax(-1)
    return b1, b2, s1, s2


def _check_u(u: object, logits: torch.Tensor) -> torch.Tensor:
    want = tuple(logits.shape[:-1]) + (logits.shape[-1] - 1,)
    if not isinstance(u, torch.Tensor) or u.dim() < 1 or tuple(u.shape[1:]) != want:
        raise ValueError(f"u must have shape [n, {', '.join(map(str, want))}] (one uniform per pair and stage), got "
                         f"{tuple(getattr(u, 'shape', ()))}")
    return u


def categorical_disarm_sample(logits: torch.Tensor, n: int = 1, *, order: Optional[str] = "ascending",
                              generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
                              offset: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` antithetic pairs of ``Categorical(logits=logits)`` samples by stick breaking (Dong et al. 2021).

    One uniform per pair, row and stage from fastgrad's Philox stream (:func:`fastgrad.functional.uniform`); each
    sample is marginally exact. ``logits`` ``[..., K]`` -> ``(samples [2n, ...] int64, u [n, ..., K - 1] float32)``;
    pass ``u`` (and the same ``logits`` and ``order``) to :func:`categorical_disarm_surrogate`."""
    logits = check_logits(logits)
    n = check_n(n)
    phi, perm = stick_breaking_logits(logits.detach(), order)
    u = uniform((n,) + tuple(phi.shape), generator=generator, seed=seed, offset=offset, device=logits.device)
    _, _, s1, s2 = _stages(phi, u)
    perm = perm.expand((n,) + tuple(perm.shape))
    z1 = torch.gather(perm, -1, s1.unsqueeze(-1)).squeeze(-1)
    z2 = torch.gather(perm, -1, s2.unsqueeze(-1)).squeeze(-1)
    return torch.cat([z1, z2], 0), u


def categorical_disarm_surrogate(logits: torch.Tensor, u: torch.Tensor, cost: torch.Tensor, *,
                                 order: Optional[str] = "ascending",
                                 importance_weighting: bool = False) -> torch.Tensor:
    """DisARM for categorical variables (Dong, Mnih & Tucker 2021): the per-pair surrogate whose gradient w.r.t.
    ``logits`` is the coupled estimator. Unbiased; 2 cost evaluations per pair.

    Stick breaking (default): DisARM on every stage both samples reach,
    ``1/2 (f1 - f2) 1[b1 != b2] (-1)^b2 sigmoid(|phi_i|)``; at a stage only one sample reaches, that sample's
    score function with the other's cost as baseline, ``1/2 (f_j - f_other) (b_j - sigmoid(phi_i))``; nothing past
    both stops. With ``importance_weighting``: ``1/2 w (f1 - f2) (grad log q(z1) - grad log q(z2))`` with
    ``w = q(z1) q(z2) / p(z1, z2)`` the weight from the coupled pair to an independent one (the paper's DisARM-IW);
    it needs ``order="ascending"`` (every coupled pair then has the independent pair's support).

    Args: ``logits`` ``[..., K]``, ``u`` ``[n, ..., K - 1]`` from :func:`categorical_disarm_sample` (same ``order``),
    ``cost`` ``[2n, *batch]`` of the samples (broadcast over trailing latent dims). Returns ``[n, ...]``: average
    over the pairs and sum over the latents for the loss."""
    order = check_order(order)
    if importance_weighting and order != "ascending":
        raise ValueError("importance_weighting needs order='ascending': in another order a coupled pair can miss "
                         "pairs of the independent one, and the weighted estimator is biased")
    logits = check_logits(logits, values=False)
    u = _check_u(u, logits)
    n = u.shape[0]
    f1, f2 = pair_costs(cost, n, u.dim() - 1)
    phi, perm = stick_breaking_logits(logits, order)
    b1, b2, s1, s2 = _stages(phi, u)
    acc = phi.dtype
    if phi.shape[-1] == 0:  # K = 1: nothing is random
        return (logits.to(acc).sum(-1) * 0).expand((n,) + tuple(logits.shape[:-1]))
    df = 0.5 * (f1 - f2).to(acc)                                         # [n, ...]
    sig = torch.sigmoid(phi.detach())
    if importance_weighting:
        m = torch.minimum(s1, s2).unsqueeze(-1)                          # the stage where the pair parts
        stage = torch.arange(phi.shape[-1], device=phi.device)
        p = phi.detach()
        # both say no at a stage before m: q(0) q(0) / p(0, 0) = sigmoid(-phi)^2 / (sigmoid(-phi) - sigmoid(phi))
        tiny = torch.finfo(acc).tiny
        log_both_no = 2 * torch.nn.functional.logsigmoid(-p) - torch.log(torch.tanh(-p / 2).clamp_min(tiny))
        log_w = torch.where(stage < m, log_both_no, torch.zeros_like(p)).sum(-1)
        # they part at m < K - 1: q(1) q(0) / p(1, 0) = sigmoid(|phi_m|); z1 = z2 (m = K - 1 included) weighs 0
        p_m = torch.gather(p.expand(m.shape[:-1] + p.shape[-1:]), -1, m.clamp_max(p.shape[-1] - 1)).squeeze(-1)
        parted = s1 != s2
        w = torch.where(parted, torch.exp(torch.where(parted, log_w, 0.0) + torch.nn.functional.logsigmoid(p_m.abs())),
                        torch.zeros_like(log_w))
        logq = torch.log_softmax(logits.to(acc), -1).expand((n,) + tuple(logits.shape))
        lq1 = torch.gather(logq, -1, torch.gather(perm.expand(logq.shape), -1, s1.unsqueeze(-1))).squeeze(-1)
        lq2 = torch.gather(logq, -1, torch.gather(perm.expand(logq.shape), -1, s2.unsqueeze(-1))).squeeze(-1)
        return (df * w) * (lq1 - lq2)
    stage = torch.arange(phi.shape[-1], device=phi.device)
    r1 = stage <= s1.unsqueeze(-1)                                       # the stages each sample reaches
    r2 = stage <= s2.unsqueeze(-1)
    b1f, b2f = b1.to(acc), b2.to(acc)
    coef = torch.where(r1 & r2, (b1 != b2).to(acc) * (1 - 2 * b2f) * torch.sigmoid(phi.detach().abs()),
                       torch.where(r1, b1f - sig, torch.where(r2, sig - b2f, torch.zeros_like(sig))))
    coef = df.unsqueeze(-1) * coef
    safe = torch.where(torch.isfinite(phi), phi, torch.zeros_like(phi))  # impossible stages carry no gradient
    return (coef * safe).sum(-1)


__all__ = ["stick_breaking_logits", "categorical_disarm_sample", "categorical_disarm_surrogate"]


# -- CARMS: categorical antithetic samples from a Dirichlet copula --------------------------------------------------
def _carms_orderings(K: int, device) -> torch.Tensor:
    """The class orderings CARMS draws from: for every pair ``a < b``, ``a`` first, ``b`` last, the others in index
    order between (``K (K - 1) / 2`` orderings; one, the identity, at ``K = 2``). A pair's classes at the two ends of
    the CDF make every pair of distinct classes reachable by two antithetic samples, which the estimator's
    reweighting needs. ``[M, K]`` int64."""
    rows = []
    for a in range(K):
        for b in range(a + 1, K):
            rows.append([a] + [c for c in range(K) if c not in (a, b)] + [b])
    return torch.tensor(rows, dtype=torch.int64, device=device)


def carms_sample(logits: torch.Tensor, n: int = 2, *, generator: Optional[torch.Generator] = None,
                 seed: Optional[int] = None, offset: Optional[int] = None) -> torch.Tensor:
    """``n >= 2`` mutually antithetic samples of each categorical (Dimitriev & Zhou, NeurIPS 2021, "CARMS:
    Categorical-Antithetic-REINFORCE Multi-Sample Gradient Estimator", CARMS-I): the Dirichlet copula's uniforms
    (:func:`arms_sample`'s, one set per categorical) through the inverse CDF of ``softmax(logits)``, with the classes
    in an ordering drawn per categorical from :func:`_carms_orderings` (shared by its n samples). Each sample is an
    exact draw; two of them are negatively dependent. ``logits`` ``[..., K]`` -> int64 labels ``[n, ...]``."""
    logits = check_logits(logits, values=True)
    n = check_n(n)
    if n < 2:
        raise ValueError(f"CARMS needs n >= 2 mutually antithetic samples, got {n}")
    batch = tuple(logits.shape[:-1])
    K = logits.shape[-1]
    seed, offset = _philox.draw_seed_offset((n + 1) * math.prod(batch), generator, seed, offset)
    if K == 1:  # one class: every sample is it
        return torch.zeros((n,) + batch, dtype=torch.int64, device=logits.device)
    u = _dirichlet_copula_uniforms(batch, n, None, seed, offset, logits.device, torch.float64)
    orders = _carms_orderings(K, logits.device)
    pick = uniform(batch, seed=seed, offset=offset + _philox.counters_used(n * math.prod(batch)),
                   device=logits.device)
    sigma = orders[(pick * orders.shape[0]).long().clamp(max=orders.shape[0] - 1)]      # [..., K]
    p = torch.softmax(logits.detach().double(), -1).gather(-1, sigma)                 # in the drawn order
    cdf = torch.cumsum(p, -1)
    cdf = torch.cat([cdf[..., :-1], torch.ones_like(cdf[..., -1:])], -1)             # the last bound exactly 1
    pos = (u.unsqueeze(-1) > cdf.unsqueeze(0)).sum(-1).clamp(max=K - 1)               # [n, ...]
    return sigma.unsqueeze(0).expand((n,) + tuple(sigma.shape)).gather(-1, pos.unsqueeze(-1))[..., 0]


def carms_pair_pmf(logits: torch.Tensor, n: int) -> torch.Tensor:
    """The exact joint pmf ``q(a, b)`` of two of :func:`carms_sample`'s ``n`` samples: the mean over the orderings of
    the copula mass of the rectangle ``(L_a, R_a] x (L_b, R_b]`` of the classes' CDF intervals, with the Dirichlet
    copula's pairwise CDF ``C(u, v) = max(u**(1/(n-1)) + v**(1/(n-1)) - 1, 0)**(n-1)``; symmetric, positive for
    every pair of distinct classes of nonzero probability; ``[..., K, K]`` float64, O(K**4) per categorical."""
    logits = check_logits(logits, values=True)
    n = check_n(n)
    if n < 2:
        raise ValueError(f"CARMS needs n >= 2 mutually antithetic samples, got {n}")
    p = torch.softmax(logits.detach().double(), -1)
    K = p.shape[-1]
    if K == 1:
        return torch.ones(tuple(p.shape) + (1,), dtype=p.dtype, device=p.device)
    orders = _carms_orderings(K, p.device)                                             # [M, K]

    def C(u, v):
        return (u ** (1.0 / (n - 1)) + v ** (1.0 / (n - 1)) - 1).clamp_min(0) ** (n - 1)

    q = torch.zeros(tuple(p.shape) + (K,), dtype=p.dtype, device=p.device)
    for sigma in orders:
        ps = p[..., sigma]                                                             # in this order
        R = torch.cumsum(ps, -1)
        L = R - ps
        a, b = (lambda t: t.unsqueeze(-1)), (lambda t: t.unsqueeze(-2))
        qs = (C(a(R), b(R)) + C(a(L), b(L)) - C(a(L), b(R)) - C(a(R), b(L))).clamp_min(0)
        inv = torch.argsort(sigma)
        q = q + qs[..., inv, :][..., :, inv]                                           # back to class indices
    return q / orders.shape[0]


def carms_surrogate(logits: torch.Tensor, idx: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """CARMS: the per-sample surrogate whose mean over the samples (``.mean(0)``) has, per categorical, the gradient
    ``1/(n(n-1)) sum_i sum_{j != i} w(z_i, z_j) (f_i - f_j) grad log p(z_i)`` with ``w(a, b) = p_a p_b / q(a, b)``
    (:func:`carms_pair_pmf`): unbiased, since each ordered pair is reweighted from its antithetic joint law ``q`` to
    the independent one. n cost evaluations; LOORF when the samples are independent (``w = 1``); ARMS at two classes
    (for ``p_1 > 1/2``, where ARMS's copula is not inverted). Args: ``logits`` ``[..., K]``, ``idx`` int64
    ``[n, ...]`` from :func:`carms_sample`, ``cost`` ``[n, *batch]`` (broadcast over the trailing latent dims).
    Returns ``[n, ...]``."""
    logits = check_logits(logits, values=True)
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64 or idx.dim() < 1 or idx.shape[0] < 2 \
            or tuple(idx.shape[1:]) != tuple(logits.shape[:-1]):
        raise ValueError(f"idx must be int64 [n >= 2, {', '.join(map(str, logits.shape[:-1]))}], got "
                         f"{getattr(idx, 'dtype', None)} {tuple(getattr(idx, 'shape', ()))}")
    n = idx.shape[0]
    cost = check_sample_costs(cost, idx)
    acc = _checks.acc_dtype(logits.dtype)
    f = cost.detach().double().reshape(tuple(cost.shape) + (1,) * (idx.dim() - cost.dim()))  # [n, ...]
    p = torch.softmax(logits.detach().double(), -1)
    q = carms_pair_pmf(logits, n)                                                            # [..., K, K]
    pa = p.unsqueeze(0).expand((n,) + tuple(p.shape)).gather(-1, idx.unsqueeze(-1))[..., 0]  # [n, ...]
    K = q.shape[-1]
    pair = idx.unsqueeze(1) * K + idx.unsqueeze(0)                                           # [n(i), n(j), ...]
    qf = q.reshape(tuple(q.shape[:-2]) + (K * K,))
    qij = qf.unsqueeze(0).unsqueeze(0).expand((n, n) + tuple(qf.shape)).gather(-1, pair.unsqueeze(-1))[..., 0]
    w = pa.unsqueeze(1) * pa.unsqueeze(0) / qij.clamp_min(1e-300)                            # [n(i), n(j), ...]
    diff = f.unsqueeze(1) - f.unsqueeze(0)                                                   # f_i - f_j
    off = ~torch.eye(n, dtype=torch.bool, device=idx.device).view((n, n) + (1,) * (idx.dim() - 1))
    coef = (w * diff * off).sum(1) / (n - 1)                                                 # [n, ...]
    logp = torch.log_softmax(logits.to(acc), -1).unsqueeze(0).expand((n,) + tuple(logits.shape))
    return coef.to(acc) * logp.gather(-1, idx.unsqueeze(-1))[..., 0]
