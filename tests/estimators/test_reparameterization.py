"""Reparameterization (pathwise gradients): fastgrad/method/reparameterization.py."""
import torch
from torch.distributions import Normal

import fastgrad as storch

from .._stats import grad_estimates


def test_reparameterization_variance_shrinks_10x():
    def est(n):  # 400 estimates from one step over a plate of repetitions
        torch.manual_seed(5)
        g = grad_estimates(lambda: storch.method.Reparameterization("x", n_samples=n),
                           lambda mu: Normal(mu, torch.ones(2)), lambda x: ((x - 2) ** 2).sum(-1),
                           torch.tensor([0.5, -1.0]), 400, plate=True)
        return g.var(0).sum()

    ratio = est(1) / est(10)
    assert 6 < ratio < 16, ratio
