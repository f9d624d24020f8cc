"""The estimator tests' one exact oracle and their shared toys. ``expectation`` enumerates every configuration of
a few Bernoulli or categorical latents and sums probability times cost in float64, differentiably: ``exact`` turns
it into the exact value and gradient by autograd, the reference the statistical assertions of tests/_stats.py
compare estimates against."""
import itertools
from typing import Callable, Optional

import torch

import fastgrad as storch

# -- the toys ---------------------------------------------------------------------------------------------------
T3 = torch.tensor([0.6, 0.51, 0.48])
TH3 = torch.tensor([0.3, -0.5, 1.0])


def f3_separable(b):
    """The separable 3-Bernoulli toy: each latent on its own."""
    return ((b - T3) ** 2).sum(-1)


def f3(b):
    """The non-separable 3-Bernoulli toy."""
    return f3_separable(b) + 0.5 * b[..., 0] * b[..., 1] * b[..., 2]


def encoder_toy():
    """A fixed linear encoder over a data plate: x ``[4, 5]`` (4 rows), weights W0 ``[5, 3]``, the logits ``x @ W`` of
    3 Bernoulli latents per row, cost f3. Returns x, W0 and the exact gradient of the data-averaged E[f3] w.r.t. W
    (it seeds torch's generator, which the test goes on drawing from)."""
    torch.manual_seed(7)
    x = torch.randn(4, 5)
    W0 = torch.randn(5, 3) * 0.5
    return x, W0, exact_grad(f3, W0, logits_of=lambda W: x.double() @ W, batch_dims=1)


THETA_CAT = torch.tensor([[0.3, -0.2, 0.5, 0.0], [1.0, 0.2, -0.5, -1.0], [0.1, 0.1, -0.3, 0.4]])


def f_cat(x):
    """3 categoricals x 4 classes (class indices), non-separable."""
    xf = x.to(torch.float32)
    return ((xf - torch.tensor([1.0, 2.0, 0.5])) ** 2).sum(-1) * 0.2 + 0.3 * (x[..., 0] == x[..., 1]).float() \
        - 0.1 * xf[..., 0] * xf[..., 2]


# The graph-API story: a data plate of B rows, k one-hot categoricals of K classes each, a cost per row.
B, k, K = 3, 2, 4
TARGET = torch.linspace(-1, 1, B * k * K).view(B, k * K)
LOGITS = torch.randn(B, k, K, generator=torch.Generator().manual_seed(0))


def story_cost(z):
    """The story's cost of one-hot samples ``[..., k, K]`` (one value per data row)."""
    zz = z.reshape(z.shape[:-2] + (k * K,))
    return ((zz - TARGET) ** 2).sum(-1) * 3 + zz[..., 0] * 5


def story_logits(leaf):
    """The story's logits ``[..., B, k, K]`` with dim -3 the data plate."""
    return storch.denote_independent(leaf, -3, "data")


def story_dist(l, by="probs"):
    """The story's distribution from its (data-plated) logits, by its probabilities or by its logits."""
    return torch.distributions.OneHotCategorical(probs=l.softmax(-1)) if by == "probs" else \
        torch.distributions.OneHotCategorical(logits=l)


def story(method, logits=LOGITS, by="probs"):
    """One step of the story up to its cost: a leaf copy of ``logits``, ``z = method(q)``; returns ``(z, leaf)``."""
    leaf = logits.clone().requires_grad_()
    z = method(story_dist(story_logits(leaf), by))
    storch.add_cost(story_cost(z), "c")
    return z, leaf


def story_exact(logits=LOGITS):
    """The story's exact cost (averaged over the data plate) and its gradient w.r.t. the logits, in float32 (the
    dtype of the graph API's values)."""
    value, grad = exact(story_cost, logits, "categorical", batch_dims=1, one_hot=True)
    return value.float(), grad.float()


# -- the oracle -------------------------------------------------------------------------------------------------
def enumerate_latents(logits: torch.Tensor, kind: str = "bernoulli", *, batch_dims: int = 0, one_hot: bool = False):
    """Every joint configuration ``z`` of the latents and its log-probability ``[C, *batch]`` (in the logits' dtype,
    differentiable in ``logits``).

    kind="bernoulli": ``logits`` ``[*batch, *latents]``, z in {0., 1.} (float64).
    kind="categorical": ``logits`` ``[*batch, *latents, K]``, z the class indices (int64), or with ``one_hot``
    their float64 one-hot vectors ``[..., K]``.
    The first ``batch_dims`` dims of ``logits`` are a batch (a data plate) whose rows' latents are enumerated
    separately: ``z`` is ``[C, 1 (per batch dim), *latents(, K)]``, to broadcast against the batch as on plate
    tensors."""
    if kind not in ("bernoulli", "categorical"):
        raise ValueError(f"kind must be 'bernoulli' or 'categorical', got {kind!r}")
    batch = tuple(logits.shape[:batch_dims])
    latents = tuple(logits.shape[batch_dims:]) if kind == "bernoulli" else tuple(logits.shape[batch_dims:-1])
    n = 1
    for s in latents:
        n *= s
    values = (0.0, 1.0) if kind == "bernoulli" else range(logits.shape[-1])
    cfg = torch.tensor(list(itertools.product(values, repeat=n)),
                       dtype=torch.float64 if kind == "bernoulli" else torch.int64)
    C = cfg.shape[0]
    z = cfg.view((C,) + (1,) * len(batch) + latents)
    if kind == "bernoulli":
        lp = torch.where(z == 1, torch.nn.functional.logsigmoid(logits), torch.nn.functional.logsigmoid(-logits))
    else:
        logp = torch.log_softmax(logits, -1)
        idx = z.expand((C,) + batch + latents).unsqueeze(-1)
        lp = torch.gather(logp.unsqueeze(0).expand((C,) + tuple(logp.shape)), -1, idx).squeeze(-1)
        if one_hot:
            z = torch.nn.functional.one_hot(z, logits.shape[-1]).double()
    return z, lp.reshape((C,) + batch + (-1,)).sum(-1)


def expectation(f: Callable, logits: torch.Tensor, kind: str = "bernoulli", *, batch_dims: int = 0,
                one_hot: bool = False) -> torch.Tensor:
    """E[f(z)] ``[*batch]`` over every configuration of :func:`enumerate_latents`, differentiable in ``logits``
    (and in whatever else ``f`` closes over); ``f`` returns ``[C]`` or ``[C, *batch]``."""
    z, lp = enumerate_latents(logits, kind, batch_dims=batch_dims, one_hot=one_hot)
    return (lp.exp() * f(z)).sum(0)


def exact(f: Callable, param: torch.Tensor, kind: str = "bernoulli", *, batch_dims: int = 0, one_hot: bool = False,
          logits_of: Optional[Callable] = None):
    """The exact value of E[f] (averaged over the batch, as backward() averages over a data plate) and its gradient
    w.r.t. ``param`` (float64): the logits are ``logits_of(param)`` (``param`` itself by default)."""
    p = param.detach().double().requires_grad_()
    value = expectation(f, p if logits_of is None else logits_of(p), kind, batch_dims=batch_dims,
                        one_hot=one_hot).mean()
    (grad,) = torch.autograd.grad(value, p)
    return value.detach(), grad


def exact_grad(f: Callable, param: torch.Tensor, kind: str = "bernoulli", **kw) -> torch.Tensor:
    """The gradient half of :func:`exact`."""
    return exact(f, param, kind, **kw)[1]
