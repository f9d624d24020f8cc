"""Infer (Storchastic's picker of an estimator per distribution): fastgrad/method/infer.py."""
import torch
from torch.distributions import Categorical, Normal

import fastgrad as storch


def test_infer_picks_reparameterization_for_normal_and_score_for_categorical():
    m = storch.method.Infer("x")
    mu = torch.zeros(2, requires_grad=True)
    x = m(Normal(mu, torch.ones(2)))
    storch.add_cost((x ** 2).sum(-1), "c")
    storch.backward()
    assert isinstance(m._choices[Normal], storch.method.Reparameterization)
    logits = torch.zeros(3, requires_grad=True)
    c = storch.method.Infer("c", n_samples=4)(Categorical(logits=logits))
    assert c.shape == (4,) and c.dtype == torch.int64
    storch.add_cost(c.float() * 1.0, "c")
    storch.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
