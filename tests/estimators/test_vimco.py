"""VIMCO: fastgrad/method/vimco.py and fastgrad/functional/vimco.py."""
import math

import pytest
import torch
import torch.nn.functional as TF
from torch.distributions import Bernoulli

import fastgrad as storch
import fastgrad.functional as F

from .._oracles import expectation
from .._stats import assert_lower_variance, assert_unbiased


def test_vimco_unbiased_for_the_iwae_bound():
    # q(z) = Bernoulli(sigmoid(phi)) over 2 latents, p(x, z) a fixed table; K = 3 samples; the exact gradient of
    # E[log mean_k w_k] w.r.t. phi by enumerating the 4**3 joint draws (through q's probabilities and log q in w)
    K = 3
    phi0 = torch.tensor([0.4, -0.8])
    log_p = torch.tensor([[-1.0, -2.5], [-0.3, -4.0]])  # log p(x, z1, z2)

    def log_q_of(phi, z):
        return -(z * TF.softplus(-phi) + (1 - z) * TF.softplus(phi)).sum(-1)

    phi = phi0.double().requires_grad_()
    total = expectation(lambda z: torch.logsumexp(log_p.double()[z[..., 0].long(), z[..., 1].long()]
                                                  - log_q_of(phi, z), -1) - math.log(K), phi.expand(K, 2))
    (exact,) = torch.autograd.grad(total, phi)
    torch.manual_seed(8)
    gs, plain = [], []
    for _ in range(4000):
        p = phi0.clone().requires_grad_()
        z = torch.bernoulli(torch.sigmoid(p.detach()).expand(K, 2))
        lq = log_q_of(p, z)
        lw = log_p[z[:, 0].long(), z[:, 1].long()] - lq
        (g,) = torch.autograd.grad(F.vimco_surrogate(lq, lw), p, retain_graph=True)
        gs.append(g)
        bound = torch.logsumexp(lw, 0) - math.log(K)  # the same estimate without the leave-one-out baselines
        (g0,) = torch.autograd.grad(bound + bound.detach() * lq.sum() - (bound.detach() * lq.sum()).detach(), p)
        plain.append(g0)
    g = torch.stack(gs).double()
    assert_unbiased(g, exact)
    # the baselines are what VIMCO adds: lower variance than the plain score-function estimate of the bound
    assert_lower_variance(g, torch.stack(plain).double())
    # value is the bound; bad input
    lq = torch.zeros(3)
    torch.testing.assert_close(F.vimco_surrogate(lq, torch.log(torch.tensor([1.0, 2.0, 3.0]))),
                               torch.log(torch.tensor(2.0)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        F.vimco_surrogate(torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match="same shape"):
        F.vimco_surrogate(torch.zeros(3), torch.zeros(4))


def test_vimco_method_unbiased_through_the_graph_api():
    """storch.method.VIMCO: the cost registered is -log w_k = log q(z_k) - log p(x, z_k) with a learnable table
    log p (pathwise gradient) and q = Bernoulli(sigmoid(phi)) over 2 latents (score gradient); -grad of backward()
    against the exact gradient of E[log mean_k w_k] over all 4**3 joint draws. (VIMCO is not homogeneous in the
    cost: its objective is a log-mean-exp of -cost.) The 3000 independent estimates come from one step over a plate
    of repetitions, each row its own phi and psi."""
    K = 3
    phi0 = torch.tensor([0.4, -0.8])
    psi0 = torch.tensor([[-1.0, -2.5], [-0.3, -4.0]])

    def log_p_of(psi, z):  # psi[z1, z2], bilinear in the bits so that it also runs on plate tensors
        z1, z2 = z[..., 0], z[..., 1]
        return ((1 - z1) * (1 - z2) * psi[..., 0, 0] + (1 - z1) * z2 * psi[..., 0, 1] + z1 * (1 - z2) * psi[..., 1, 0]
                + z1 * z2 * psi[..., 1, 1])

    phi, psi = phi0.double().requires_grad_(), psi0.double().requires_grad_()
    total = expectation(lambda z: torch.logsumexp(log_p_of(psi, z) - Bernoulli(logits=phi).log_prob(z).sum(-1), -1)
                        - math.log(K), phi.expand(K, 2))
    exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, [phi, psi])])
    torch.manual_seed(9)
    reps = 3000
    phi, psi = phi0.expand(reps, 2).clone().requires_grad_(), psi0.expand(reps, 2, 2).clone().requires_grad_()
    phis, psis = storch.denote_independent(phi, 0, "reps"), storch.denote_independent(psi, 0, "reps")
    z = storch.method.VIMCO("z", n_samples=K)(Bernoulli(logits=phis))
    # log q(z) written out: Bernoulli.log_prob's argument validation refuses plate tensors
    log_q = -(z * TF.softplus(-phis) + (1 - z) * TF.softplus(phis)).sum(-1)
    storch.add_cost(log_q - log_p_of(psis, z), "neg_log_w")
    storch.backward()
    est = -torch.cat([phi.grad.reshape(reps, -1), psi.grad.reshape(reps, -1)], 1) * reps  # backward() averages
    assert_unbiased(est.double(), exact)
    with pytest.raises(ValueError, match="n_samples >= 2"):
        storch.method.VIMCO("z", n_samples=1)
