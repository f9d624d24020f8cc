"""RELAX and REBAR for Bernoulli latents, with their control variates trained to minimise the estimator's variance
(Grathwohl et al. 2018; Tucker et al. 2017). The math is :func:`fastgrad.functional.relax_bernoulli_sample`,
:func:`fastgrad.functional.conditional_gumbel_bernoulli` / ``conditional_gumbel_categorical`` and
:func:`fastgrad.functional.relax_surrogate_from_values`, here with the control built from the user's own cost
(REBAR) and/or a network ``c_phi``.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Union

import torch
import torch.nn.functional as TF
from torch import distributions as D

from .. import functional as F
from ._base import (Draw, Facts, Method, Params, default_control, monte_carlo_samples, sum_latents,
                    train_on_second_moment)


class RELAX(Method):
    """RELAX (Grathwohl et al., ICLR 2018, "Backpropagation through the Void"): unbiased;
    ``g = [f(b) - c(z~)] d log p(b) + d c(z) - d c(z~)`` with ``z`` the Logistic relaxation, ``b = H(z)`` and
    ``z~ ~ p(z | b)``. Bernoulli (logistic relaxation) and OneHotCategorical / Categorical distributions (Gumbel
    relaxation, ``z = log p + Gumbel``, ``b = argmax z``; REBAR needs OneHotCategorical).

    The control ``c`` is ``c_phi(sigmoid(z))`` (a ``torch.nn.Module`` mapping relaxed samples ``[..., D]`` to one
    value per sample; with ``in_dim`` and no ``c_phi``, Storchastic's default MLP ``Linear(in_dim, 50)-ReLU-
    Linear(50, 1)``), plus with ``rebar=True`` REBAR's ``eta * f(sigmoid(z / temperature))``. For that the plate
    holds ``3 * n_samples`` entries, as Storchastic's: the hard samples ``b``, then ``sigmoid(z / temperature)``
    and ``sigmoid(z~ / temperature)``, weighted ``1/n``, ``0``, ``0``, so the user's cost is also evaluated on
    relaxed inputs (it must accept them); otherwise the plate has ``n_samples`` entries. Cost evaluations per
    sample: 1 of ``f`` (3 with ``rebar``) and 2 of ``c_phi``.

    Training: after each ``backward()`` (which builds the gradient's graph for this: ``create_graph``), the
    ``.grad`` of ``c_phi``'s parameters, ``eta`` (``train_eta``) and the log temperature is set to the gradient
    of ``sum(param_grads ** 2)`` (the estimator's second moment): put ``method.parameters()`` in the optimizer,
    as with Storchastic. (The REINFORCE factor's own dependence on the temperature is not trained: the cost's relaxed
    entries are evaluated once, by the user.)
    """
    facts = Facts("Grathwohl, Choi, Wu, Roeder & Duvenaud, ICLR 2018", unbiased=True, evaluations="n",
                  storchastic="RELAX", storchastic_correct=False,
                  storchastic_bug="its Bernoulli conditional sampler never agrees with b = 1",
                  benchmark=("relax_toy_cpu", "relax"))

    accepts = (D.Bernoulli, D.OneHotCategorical, D.Categorical)
    uses_score = True
    create_graph = True
    # REBAR differentiates the cost of its relaxed samples
    detach_cost = property(lambda self: not self.rebar)

    def __init__(self, plate_name: str, sampling_method: Any = None, n_samples: int = 1,
                 c_phi: Optional[torch.nn.Module] = None, in_dim: Union[None, int, Sequence[int]] = None,
                 rebar: bool = False, train_eta: bool = True):
        super().__init__(plate_name, monte_carlo_samples(sampling_method, plate_name, n_samples))
        if c_phi is not None and not isinstance(c_phi, torch.nn.Module):
            raise TypeError(f"c_phi must be a torch.nn.Module, got {type(c_phi).__name__}")
        if c_phi is None and in_dim is not None:
            c_phi = default_control(in_dim, "in_dim")
        if c_phi is None and not rebar:
            raise ValueError("RELAX needs a control variate: pass c_phi (a torch.nn.Module), in_dim (for the default "
                             "network) or rebar=True")
        self.c_phi = c_phi
        self.rebar = bool(rebar)
        self.eta = torch.nn.Parameter(torch.tensor(1.0), requires_grad=bool(train_eta))
        self.log_temperature = torch.nn.Parameter(torch.tensor(math.log(0.5)))

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    def _sample(self, params: Params) -> Draw:
        d = params.distr
        n = self.n_samples
        if isinstance(d, D.Bernoulli):
            logits = params.bernoulli_logits()
            b, z, zt = F.relax_bernoulli_sample(logits, n)
            relax, hard, idx = torch.sigmoid, b.to(z.dtype), None
        else:
            if self.rebar and not isinstance(d, D.OneHotCategorical):
                raise ValueError("REBAR needs a OneHotCategorical (its relaxed samples are points of the simplex), "
                                 "got a Categorical")
            logits = params.logits()
            # z = log p + Gumbel (reparameterized), b = argmax z, z~ ~ p(z | b)
            u = F.uniform((n,) + tuple(logits.shape), device=logits.device).to(logits.dtype)
            z = torch.log_softmax(logits, -1) - torch.log(-torch.log(u))
            idx = z.detach().argmax(-1)
            zt = F.conditional_gumbel_categorical(logits, idx)
            relax = lambda x: torch.softmax(x, -1)  # noqa: E731
            hard = TF.one_hot(idx, logits.shape[-1]).to(z.dtype)
            b = hard if isinstance(d, D.OneHotCategorical) else idx
        if not self.rebar:
            return Draw(b, n, state=(z, zt, idx))
        tau = self.temperature.to(z.dtype)
        value = torch.cat([hard, relax(z / tau), relax(zt / tau)], 0).to(logits.dtype)
        npl = len(params.plates)
        third = torch.full((n,) + (1,) * npl, 1.0 / n, dtype=value.dtype, device=value.device)
        weight = torch.cat([third, torch.zeros_like(third), torch.zeros_like(third)], 0)
        return Draw(value, 3 * n, weight, state=(z, zt, idx))

    def _control(self, z: torch.Tensor, npl: int, categorical: bool) -> torch.Tensor:
        """c_phi on the relaxed sample (sigmoid, or softmax over the categories), summed to one value per element
        of the sample's plates."""
        return sum_latents(self.c_phi(torch.softmax(z, -1) if categorical else torch.sigmoid(z)), npl)

    def _surrogate(self, sample, cost: torch.Tensor) -> torch.Tensor:
        params, (z, zt, idx), w = sample.params, sample.draw.state, cost  # w: [n or 3n, plates...]
        n = self.n_samples
        npl = len(sample.plates)
        categorical = idx is not None
        f_b = w[:n].detach()
        c_z = c_zt = c_zt_const = torch.zeros_like(f_b)
        if self.rebar:
            f_z, f_zt = w[n:2 * n], w[2 * n:]
            c_z, c_zt, c_zt_const = self.eta * f_z, self.eta * f_zt, self.eta * f_zt.detach()
        if self.c_phi is not None:
            c_z = c_z + self._control(z, npl, categorical)
            c_zt = c_zt + self._control(zt, npl, categorical)
            c_zt_const = c_zt_const + self._control(zt.detach(), npl, categorical)
        if categorical:
            logp = torch.log_softmax(params.logits().to(z.dtype), -1).expand(z.shape)
            logp = logp.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
        else:
            logp = F.bernoulli_log_prob(params.bernoulli_logits(), sample._tensor[:n]).to(z.dtype)
        term = F.relax_surrogate_from_values(sum_latents(logp, npl), f_b, c_z, c_zt, c_zt_const)  # [n, plates...]
        if self.rebar:
            term = torch.cat([term, torch.zeros_like(term), torch.zeros_like(term)], 0)
        return term

    def _after_backward(self, samples: List) -> None:
        train_on_second_moment(self, samples)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rebar={self.rebar}"


class REBAR(RELAX):
    """REBAR (Tucker et al., NeurIPS 2017): RELAX with the control ``eta * f(sigmoid(z / temperature))`` (plus an
    optional ``c_phi``); the plate holds ``3 * n_samples`` entries (see :class:`RELAX`). Unbiased; Bernoulli and
    OneHotCategorical.
    (Storchastic's REBAR is biased on Bernoulli: its conditional sampler never agrees with b = 1.)"""
    facts = Facts("Tucker, Mnih, Maddison, Lawson & Sohl-Dickstein, NeurIPS 2017", unbiased=True, evaluations="3*n",
                  differentiable_cost=True, storchastic="REBAR", storchastic_correct=False,
                  storchastic_bug="biased on Bernoulli (the conditional sampler of RELAX)",
                  benchmark=("relax_toy_cpu", "rebar"))
    accepts = (D.Bernoulli, D.OneHotCategorical)  # its control evaluates the cost at relaxed one-hot vectors

    def __init__(self, plate_name: str, c_phi: Optional[torch.nn.Module] = None, n_samples: int = 1,
                 in_dim: Union[None, int, Sequence[int]] = None):
        super().__init__(plate_name, n_samples=n_samples, c_phi=c_phi, in_dim=in_dim, rebar=True)


class LAX(Method):
    """LAX (Grathwohl et al., ICLR 2018): for reparameterizable (continuous) distributions and a cost treated as a
    black box: ``g = [f(b) - c_phi(b)] d log p(b) + d c_phi(b)``, with ``b = rsample()``. Unbiased; 1 evaluation of
    ``f`` and 1 of ``c_phi`` per sample. The user's cost sees ``b`` detached (no pathwise gradient through ``f``,
    which may be non-differentiable); ``c_phi`` (a ``torch.nn.Module`` on samples ``[..., D]``, or Storchastic's
    default MLP for ``in_dim``) is trained on the estimate's second moment after each ``backward()``, as
    :class:`RELAX`'s. (Storchastic's LAX raises NameError.)"""
    facts = Facts("Grathwohl, Choi, Wu, Roeder & Duvenaud, ICLR 2018", unbiased=True, evaluations="n",
                  storchastic="LAX", storchastic_correct=False, storchastic_bug="raises NameError (undefined derivs)",
                  takes="reparameterizable (rsample)")

    uses_score = True
    create_graph = True

    def __init__(self, plate_name: str, sampling_method: Any = None, n_samples: int = 1,
                 c_phi: Optional[torch.nn.Module] = None, in_dim: Union[None, int, Sequence[int]] = None):
        super().__init__(plate_name, monte_carlo_samples(sampling_method, plate_name, n_samples))
        if c_phi is not None and not isinstance(c_phi, torch.nn.Module):
            raise TypeError(f"c_phi must be a torch.nn.Module, got {type(c_phi).__name__}")
        if c_phi is None:
            if in_dim is None:
                raise ValueError("LAX needs c_phi (a torch.nn.Module) or in_dim (a positive int or a shape), got None")
            c_phi = default_control(in_dim, "in_dim")
        self.c_phi = c_phi

    def _sample(self, params: Params) -> Draw:
        d = params.raw_distribution()
        if not d.has_rsample:
            raise ValueError(f"LAX needs a reparameterizable distribution (rsample), got {type(d).__name__}")
        b = d.rsample((self.n_samples,))
        return Draw(b.detach(), self.n_samples, state=b)

    def _surrogate(self, sample, cost: torch.Tensor) -> torch.Tensor:
        b = sample.draw.state
        npl = len(sample.plates)
        lp = sum_latents(sample.params.raw_distribution().log_prob(b.detach()), npl)

        def c(x):
            return sum_latents(self.c_phi(x), npl)

        return (cost.to(lp.dtype) - c(b.detach())) * lp + c(b)

    def _after_backward(self, samples: List) -> None:
        train_on_second_moment(self, samples)


__all__ = ["RELAX", "REBAR", "LAX"]
