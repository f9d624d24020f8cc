"""RELAX and REBAR for Bernoulli variables: the relaxed samples and the control-variate surrogate."""
from __future__ import annotations

from typing import Optional

import torch

from ..ops import _checks, _philox
from ._validate import check_bernoulli_logits, check_n, check_real
from .sampling import conditional_gumbel_bernoulli


def relax_bernoulli_sample(logits: torch.Tensor, n: int = 1, *, generator: Optional[torch.Generator] = None,
                           seed: Optional[int] = None, offset: Optional[int] = None):
    """``n`` draws for RELAX/REBAR: ``z = logits + logit(u)`` (reparameterized), ``b = H(z)`` and
    ``z~ ~ p(z | b)`` (:func:`conditional_gumbel_bernoulli`, from the next ``n * numel`` stream elements).

    Returns ``(b, z, z~)``, each ``[n, ...]``; ``b`` in the logits' dtype, ``z``/``z~`` differentiable."""
    logits = check_bernoulli_logits(logits)
    n = check_n(n)
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
    logits = check_bernoulli_logits(logits)
    if not callable(control):
        raise TypeError(f"control must be a callable c(z) on relaxed samples, got {type(control).__name__}")
    for name, t in (("b", b), ("z", z), ("z_tilde", z_tilde)):
        if not isinstance(t, torch.Tensor) or t.dim() < 1 or tuple(t.shape[1:]) != tuple(logits.shape):
            raise ValueError(f"{name} must have shape [n, {', '.join(map(str, logits.shape))}], got "
                             f"{tuple(getattr(t, 'shape', ()))}")
    cost = check_real(cost, "cost").detach()
    logp = bernoulli_log_prob(logits, b)  # per latent; summed below over the latents beyond the cost's dims
    c_z, c_zt = control(z), control(z_tilde)
    c_zt_const = control(z_tilde.detach())  # depends on c's parameters, not on logits
    for name, c in (("control(z)", c_z), ("control(z_tilde)", c_zt)):
        if not isinstance(c, torch.Tensor) or c.shape != cost.shape:
            raise ValueError(f"{name} must return the cost's shape {tuple(cost.shape)}, got "
                             f"{tuple(getattr(c, 'shape', ()))}")
    logp = logp.sum(tuple(range(cost.dim(), logp.dim()))) if logp.dim() > cost.dim() else logp
    return relax_surrogate_from_values(logp, cost, c_z, c_zt, c_zt_const)
