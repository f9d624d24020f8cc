"""Double control variates (Titsias & Shi 2022) and RODEO (Shi et al. 2022) for binary variables."""
from __future__ import annotations

from typing import Tuple, Union

import torch

from ..ops import _checks
from ._validate import check_cost_grad, check_samples_and_cost


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
    logits, cost = check_samples_and_cost(logits, b, cost)
    n = b.shape[0]
    cost_grad = check_cost_grad(cost_grad, b)
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
    logits, cost = check_samples_and_cost(logits, b, cost, min_b_dim=2)
    n = b.shape[0]
    if tuple(cost.shape) != tuple(b.shape[:-1]):  # the latents: exactly the last dim
        raise ValueError(f"cost must have shape {tuple(b.shape[:-1])} ([n, *batch]), got {tuple(cost.shape)}")
    cost_grad = check_cost_grad(cost_grad, b)
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
