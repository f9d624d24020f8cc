"""One training step of the seed VAE (batch 64, Adam 1e-3) per implementation and method.

Every implementation gets the same model initialization and data; each returns ``step() -> float`` (the
estimated -ELBO). Implementations: ``plain`` (hand-written torch), ``plain_distributions`` (hand-written torch
through torch.distributions, as the tutorial's code uses them), ``graph`` (fastgrad's Storchastic API,
the tutorial's code), ``functional`` (fastgrad.functional), ``graph_reference`` and ``functional_reference`` (the
same with the kernels off), ``storchastic`` and ``pyro`` (optional extras, run in their own processes by
``vae_step.py`` because Storchastic patches torch globally).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as TF

METHODS = ("sf1", "sf10_batch_average", "gumbel", "straight_through", "expect")


def make_model(seed: int = 0, method: str = ""):
    """The tutorial's model; for the ``bern_*`` methods the demo's 200-Bernoulli-latent VAE."""
    from fastgrad.examples.discrete_vae import BernoulliVAE, DiscreteVAE

    torch.manual_seed(seed)
    return BernoulliVAE() if method.startswith("bern_") else DiscreteVAE()


def _kl(probs: torch.Tensor) -> torch.Tensor:
    """KL(q || uniform) summed over the 2 latents: [B]."""
    return (probs * (torch.log(probs.clamp_min(1e-30)) + math.log(10.0))).sum((-1, -2))


def _bce(model, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reconstruction cost of latents ``z`` [n, B or 1, 2, 10] (or [n, B or 1, 20]) against ``x`` [B, 784]:
    [n, B]. With size 1 in dim 1 (enumerated configurations) each latent is decoded once, broadcast over x."""
    n, b = z.shape[:2]
    B = x.shape[0]
    rec = model.decode(z.reshape(n, b, 20))
    return TF.binary_cross_entropy(rec.expand(n, B, 784), x.expand(n, B, 784), reduction="none").sum(-1)


def _centred(cost: torch.Tensor) -> torch.Tensor:
    """Detached cost minus the leave-one-out mean of the other samples along dim 0 (none for one sample)."""
    c = cost.detach()
    n = c.shape[0]
    return c - (c.sum(0, keepdim=True) - c) / (n - 1) if n > 1 else c


def _one_hot_configs() -> torch.Tensor:
    """The 100 joint configurations of the 2 latents, one-hot ``[100, 2, 10]``, in the default dtype (quality.py
    --dtype float64 sets it), built with plain torch."""
    return TF.one_hot(torch.cartesian_prod(torch.arange(10), torch.arange(10)), 10).to(torch.get_default_dtype())


def plain(method: str, model, data: torch.Tensor) -> Callable[[], float]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    configs = _one_hot_configs()

    def step(batch: torch.Tensor = data) -> float:
        x = batch.view(-1, 784)
        B = x.shape[0]
        opt.zero_grad()
        logits = model.encode(x).view(B, 2, 10)
        logp = torch.log_softmax(logits, -1)
        probs = logp.exp()
        kl = _kl(probs)
        if method in ("sf1", "sf10_batch_average"):
            n = 1 if method == "sf1" else 10
            idx = torch.multinomial(probs.detach().view(-1, 10), n, replacement=True).t().reshape(n, B, 2)
            z = TF.one_hot(idx, 10).float()
            bce = _bce(model, z, x)
            lp = logp.unsqueeze(0).expand(n, B, 2, 10).gather(-1, idx.unsqueeze(-1)).squeeze(-1).sum(-1)
            loss = kl.mean() + bce.mean() + (lp * _centred(bce)).mean()
            value = kl.mean() + bce.mean()
        elif method in ("gumbel", "straight_through"):
            z = TF.gumbel_softmax(logp.unsqueeze(0), tau=1.0, hard=method == "straight_through")
            bce = _bce(model, z, x)
            loss = value = kl.mean() + bce.mean()
        elif method == "expect":
            bce = _bce(model, configs.view(100, 1, 20), x)  # each configuration decoded once
            logq = logp[:, 0, :].t()[:, None, :] + logp[:, 1, :].t()[None, :, :]  # [10, 10, B]
            loss = value = kl.mean() + (logq.reshape(100, B).exp() * bce).sum(0).mean()
        else:
            raise ValueError(method)
        loss.backward()
        opt.step()
        return float(value.detach())

    return step


def plain_distributions(method: str, model, data: torch.Tensor) -> Callable[[], float]:
    """Hand-written torch that uses ``torch.distributions`` as the tutorial does (argument validation on, as
    torch's default): the cost of the distribution objects themselves, without any plate bookkeeping."""
    from torch.distributions import OneHotCategorical, RelaxedOneHotCategorical, kl_divergence

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    configs = _one_hot_configs()

    def step(batch: torch.Tensor = data) -> float:
        x = batch.view(-1, 784)
        B = x.shape[0]
        opt.zero_grad()
        q = OneHotCategorical(probs=model.encode(x).view(B, 2, 10).softmax(-1))
        prior = OneHotCategorical(probs=torch.ones_like(q.probs) / 10.0)
        kl = kl_divergence(q, prior).sum(-1)
        if method in ("sf1", "sf10_batch_average"):
            n = 1 if method == "sf1" else 10
            z = q.sample((n,))
            bce = _bce(model, z, x)
            loss = kl.mean() + bce.mean() + (q.log_prob(z).sum(-1) * _centred(bce)).mean()
            value = kl.mean() + bce.mean()
        elif method in ("gumbel", "straight_through"):
            z = RelaxedOneHotCategorical(torch.tensor(1.0), probs=q.probs).rsample((1,))
            if method == "straight_through":
                z = TF.one_hot(z.argmax(-1), 10).to(z) - z.detach() + z
            bce = _bce(model, z, x)
            loss = value = kl.mean() + bce.mean()
        elif method == "expect":
            bce = _bce(model, configs.view(100, 1, 20), x)  # each configuration decoded once
            logq = q.log_prob(configs.view(100, 1, 2, 10)).sum(-1)  # [100, B]
            loss = value = kl.mean() + (logq.exp() * bce).sum(0).mean()
        else:
            raise ValueError(method)
        loss.backward()
        opt.step()
        return float(value.detach())

    return step


# method name -> its constructor in a Storchastic-compatible module ``M`` (fastgrad.method or storch.method)
_STORCH_METHODS = {
    "sf1": lambda M: M.ScoreFunction("z", n_samples=1, baseline_factory="None"),
    "sf10_batch_average": lambda M: M.ScoreFunction("z", n_samples=10, baseline_factory="batch_average"),
    "gumbel": lambda M: M.GumbelSoftmax("z", n_samples=1),
    "straight_through": lambda M: M.GumbelSoftmax("z", n_samples=1, straight_through=True),
    "expect": lambda M: M.Expect("z"),
    # the estimators of the without-replacement and relaxed family, under the names both libraries share
    "sf_wor4": lambda M: M.ScoreFunctionWOR("z", k=4),
    "unordered_set4": lambda M: M.UnorderedSetEstimator("z", k=4),
    "rao_blackwell4": lambda M: M.RaoBlackwellSF("z", 4),
    "gumbel_wor4": lambda M: M.UnorderedSetGumbelSoftmax("z", k=4),
    "gumbel_sparsemax": lambda M: M.GumbelSparseMax("z"),
    "gumbel_entmax": lambda M: M.GumbelEntmax("z"),
    # binary estimators on the demo's 200 Bernoulli latents (make_model gives that model for these names)
    "bern_arm": lambda M: M.ARM("z", n_samples=1),
    "bern_disarm": lambda M: M.DisARM("z", n_samples=1),
    "bern_relax": lambda M: M.RELAX("z", n_samples=1, in_dim=200),
    "bern_rebar": lambda M: M.REBAR("z", n_samples=1),
}


def storch_method(storch, method: str):
    if method not in _STORCH_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(_STORCH_METHODS)}")
    return _STORCH_METHODS[method](storch.method)


def storch_like(storch, method: str, model, data: torch.Tensor) -> Callable[[], float]:
    """The tutorial's training step for any Storchastic-compatible module (fastgrad or storchastic): the demo's
    ``generative_story`` (the tutorial's code; ``bernoulli_story`` for the ``bern_*`` methods), then ``backward``
    and Adam."""
    from fastgrad.examples.discrete_vae import bernoulli_story, generative_story

    story = bernoulli_story if method.startswith("bern_") else generative_story
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    m = storch_method(storch, method)

    def step(batch: torch.Tensor = data) -> float:
        opt.zero_grad()
        story(m, model, batch, storch)
        elbo = storch.backward()
        opt.step()
        return elbo.item()

    return step


def graph(method: str, model, data: torch.Tensor) -> Callable[[], float]:
    import fastgrad

    return storch_like(fastgrad, method, model, data)


def functional(method: str, model, data: torch.Tensor) -> Callable[[], float]:
    import fastgrad.functional as F

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    configs = TF.one_hot(F.enumerate_configurations(2, 10), 10).to(torch.get_default_dtype())

    def step(batch: torch.Tensor = data) -> float:
        x = batch.view(-1, 784)
        B = x.shape[0]
        opt.zero_grad()
        logits = model.encode(x).view(B, 2, 10)
        probs = logits.softmax(-1)
        kl = _kl(probs)
        if method in ("sf1", "sf10_batch_average"):
            n = 1 if method == "sf1" else 10
            idx, z = F.sample_categorical_one_hot(logits.detach(), n)
            bce = _bce(model, z, x)
            sur = F.score_function_surrogate(logits, idx, bce.unsqueeze(-1),
                                             baseline="batch_average" if n > 1 else None)
            loss = kl.mean() + bce.mean() + sur.sum(-1).mean()
            value = kl.mean() + bce.mean()
        elif method in ("gumbel", "straight_through"):
            z = F.gumbel_softmax(logits, 1.0, 1, hard=method == "straight_through")
            bce = _bce(model, z, x)
            loss = value = kl.mean() + bce.mean()
        else:
            bce = _bce(model, configs.view(100, 1, 20), x)  # each configuration decoded once
            loss = value = kl.mean() + F.expectation(logits, bce).mean()
        loss.backward()
        opt.step()
        return float(value.detach())

    return step


def _on_reference(make: Callable) -> Callable:
    """The same implementation with fastgrad's kernels off (every op on its pure-torch reference)."""

    def build(method: str, model, data: torch.Tensor) -> Callable[[], float]:
        import fastgrad

        step = make(method, model, data)

        def run(batch: torch.Tensor = data) -> float:
            with fastgrad.backend("reference"):
                return step(batch)

        return run

    return build


def storchastic(method: str, model, data: torch.Tensor) -> Callable[[], float]:
    import storch  # storchastic 0.3.7 (optional extra)

    return storch_like(storch, method, model, data)


def pyro(method: str, model, data: torch.Tensor) -> Callable[[], float]:
    """Pyro 1.9 (optional extra): TraceGraph_ELBO for the score function, TraceEnum_ELBO for Expect,
    RelaxedOneHotCategorical(StraightThrough) reparameterized guides for Gumbel-softmax."""
    import pyro as p
    import pyro.distributions as dist
    from pyro.infer import SVI, TraceEnum_ELBO, TraceGraph_ELBO, Trace_ELBO, config_enumerate

    p.clear_param_store()
    n = 10 if method == "sf10_batch_average" else 1

    def pmodel(x):
        B = x.shape[0]
        p.module("decoder", model)
        with p.plate("data", B):
            prior = torch.full((B, 2, 10), 0.1)
            if method in ("gumbel", "straight_through"):
                d = (dist.RelaxedOneHotCategoricalStraightThrough if method == "straight_through"
                     else dist.RelaxedOneHotCategorical)(torch.tensor(1.0), probs=prior)
            else:
                d = dist.OneHotCategorical(probs=prior)
            z = p.sample("z", d.to_event(1))
            rec = model.decode(z.reshape(z.shape[:-2] + (20,)))
            # the seed's reconstruction cost (BCE against grey-level MNIST) as the log-likelihood
            p.factor("x", -TF.binary_cross_entropy(rec, x.expand_as(rec), reduction="none").sum(-1))

    def guide(x):
        B = x.shape[0]
        p.module("encoder", model)
        with p.plate("data", B):
            probs = model.encode(x).view(B, 2, 10).softmax(-1)
            if method in ("gumbel", "straight_through"):
                d = (dist.RelaxedOneHotCategoricalStraightThrough if method == "straight_through"
                     else dist.RelaxedOneHotCategorical)(torch.tensor(1.0), probs=probs)
            else:
                d = dist.OneHotCategorical(probs=probs)
            p.sample("z", d.to_event(1))

    if method == "expect":
        elbo = TraceEnum_ELBO(max_plate_nesting=1)
        g = config_enumerate(guide, "parallel")
    elif method in ("gumbel", "straight_through"):
        elbo, g = Trace_ELBO(), guide
    else:
        elbo, g = TraceGraph_ELBO(num_particles=n, vectorize_particles=True), guide
    svi = SVI(pmodel, g, p.optim.Adam({"lr": 1e-3}), loss=elbo)
    return lambda batch=data: svi.step(batch.view(-1, 784)) / batch.shape[0]


IMPLS = {"plain": plain, "plain_distributions": plain_distributions, "graph": graph, "functional": functional,
         "graph_reference": _on_reference(graph), "functional_reference": _on_reference(functional),
         "storchastic": storchastic, "pyro": pyro}
