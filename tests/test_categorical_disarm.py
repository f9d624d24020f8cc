"""DisARM for categorical variables (Dong, Mnih & Tucker 2021): stick breaking, the coupled sampler, the
estimator's exact expectation (the pair's noise enumerated), the graph API against exact enumeration,
homogeneity, the Bernoulli case, bad input."""
import itertools
import math

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, Normal, OneHotCategorical

import fastgrad as storch
import fastgrad.functional as F

from ._stats import assert_unbiased, chi2_pvalue
from .test_without_replacement import THETA_CAT, exact_cat_grad, f_cat, grads_cat

VARIANTS = [("ascending", False), ("ascending", True), ("descending", False), (None, False)]


def test_stick_breaking_logits_give_the_categorical():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, dtype=torch.float64)
    for order in ("ascending", "descending", None):
        phi, perm = F.stick_breaking_logits(logits, order)
        # p(class at position i) = sigmoid(phi_i) prod_{j < i} sigmoid(-phi_j), the last gets what is left
        left = torch.cat([torch.zeros(3, 1, dtype=phi.dtype), torch.nn.functional.logsigmoid(-phi).cumsum(-1)], -1)
        logp = left + torch.cat([torch.nn.functional.logsigmoid(phi), torch.zeros(3, 1, dtype=phi.dtype)], -1)
        want = torch.gather(logits.log_softmax(-1), -1, perm)
        torch.testing.assert_close(logp, want, rtol=0, atol=1e-12)
    _, perm = F.stick_breaking_logits(logits, "ascending")
    assert (torch.gather(logits, -1, perm).diff(dim=-1) >= 0).all()
    # ascending: every stage but the last has probability <= 1/2 (what the importance weights need)
    phi, _ = F.stick_breaking_logits(torch.randn(1000, 6), "ascending")
    assert (phi <= 1e-6).all()


def _enumerated_noise(phi: torch.Tensor):
    """Every combination of the pair's stage decisions, as one representative ``u`` per combination and its
    probability: per stage the uniform's interval is cut at sigmoid(phi) and 1 - sigmoid(phi)."""
    sig = torch.sigmoid(phi.double())
    per_stage = []
    for s in sig.flatten().tolist():
        cuts = [0.0, min(s, 1 - s), max(s, 1 - s), 1.0]
        per_stage.append([((a + b) / 2, b - a) for a, b in zip(cuts, cuts[1:]) if b > a])
    us, ws = [], []
    for combo in itertools.product(*per_stage):
        us.append([c[0] for c in combo])
        ws.append(math.prod(c[1] for c in combo))
    return torch.tensor(us, dtype=torch.float64).view((-1,) + tuple(phi.shape)), torch.tensor(ws, dtype=torch.float64)


@pytest.mark.parametrize("order,iw", VARIANTS)
@pytest.mark.parametrize("impossible", [False, True])
def test_exact_expectation_is_the_exact_gradient(order, iw, impossible):
    # the estimator depends on the noise only through the stage decisions: its expectation is a finite sum, and it
    # must equal the gradient of E[f] to rounding (2 latents x 4 classes, a non-separable cost)
    torch.manual_seed(1)
    logits = torch.randn(2, 4, dtype=torch.float64)
    if impossible:
        logits[0, 1] = -math.inf  # a class of probability zero
    table = torch.randn(4, 4, dtype=torch.float64)

    def f(z):
        return table[z[..., 0], z[..., 1]] + 0.3 * z.double().sum(-1)

    phi, perm = F.stick_breaking_logits(logits, order)
    u, prob = _enumerated_noise(phi)
    n = u.shape[0]
    # the samples of these u, through the sampler's own rule (b1 = 1[u > sigmoid(-phi)], b2 = 1[u < sigmoid(phi)])
    yes = torch.ones(n, 2, 1, dtype=torch.bool)
    s1 = torch.cat([u > torch.sigmoid(-phi), yes], -1).to(torch.uint8).argmax(-1)
    s2 = torch.cat([u < torch.sigmoid(phi), yes], -1).to(torch.uint8).argmax(-1)
    z1, z2 = torch.gather(perm.expand(n, 2, 4), -1, s1[..., None])[..., 0], \
        torch.gather(perm.expand(n, 2, 4), -1, s2[..., None])[..., 0]
    theta = logits.clone().requires_grad_()
    term = F.categorical_disarm_surrogate(theta, u, torch.cat([f(z1), f(z2)]), order=order, importance_weighting=iw)
    (mean,) = torch.autograd.grad((term.sum(-1) * prob).sum(), theta)
    ref = logits.clone().requires_grad_()
    logq = ref.log_softmax(-1)
    allz = torch.tensor(list(itertools.product(range(4), repeat=2)))
    lp = logq[0, allz[:, 0]] + logq[1, allz[:, 1]]
    (exact,) = torch.autograd.grad((lp.exp() * f(allz)).sum(), ref)
    assert torch.isfinite(mean).all()
    torch.testing.assert_close(mean, exact, rtol=0, atol=1e-12)


def test_two_classes_is_bernoulli_disarm():
    # K = 2 in the classes' order: one stage with logit theta_0 - theta_1, class 0 when it says yes
    torch.manual_seed(2)
    theta = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    z, u = F.categorical_disarm_sample(theta.detach(), 3, order=None, seed=11, offset=0)
    b, _ = F.arm_sample((theta[:, 0] - theta[:, 1]).detach(), 3, seed=11, offset=0)
    torch.testing.assert_close((z == 0).double(), b)
    cost = torch.randn(6, 5, dtype=torch.float64)
    (g,) = torch.autograd.grad(F.categorical_disarm_surrogate(theta, u, cost, order=None).sum(), theta)
    t = (theta[:, 0] - theta[:, 1]).detach().requires_grad_()
    (gb,) = torch.autograd.grad(F.disarm_surrogate(t, b, cost).sum(), t)
    torch.testing.assert_close(g, torch.stack([gb, -gb], -1))


@pytest.mark.parametrize("order", ["ascending", None])
def test_each_sample_of_a_pair_is_categorical(order):
    torch.manual_seed(3)
    p = torch.tensor([0.05, 0.4, 0.15, 0.3, 0.1])
    z, u = F.categorical_disarm_sample(p.log().expand(100_000, 5), 1, order=order)
    assert z.dtype == torch.int64 and z.shape == (2, 100_000) and u.shape == (1, 100_000, 4)
    for half in z:
        assert chi2_pvalue(torch.bincount(half, minlength=5).double(), p) > 1e-3
    # antithetic: the pair is negatively dependent, so it agrees less often than two independent draws
    assert (z[0] == z[1]).double().mean() < (p ** 2).sum() - 0.01


def test_same_seed_same_samples_and_impossible_classes_never_drawn():
    logits = torch.tensor([[0.0, -math.inf, 1.0, -2.0]]).expand(5000, 4)
    a, ua = F.categorical_disarm_sample(logits, 2, seed=5, offset=7)
    b, ub = F.categorical_disarm_sample(logits, 2, seed=5, offset=7)
    assert torch.equal(a, b) and torch.equal(ua, ub)
    assert not (a == 1).any()
    z, u = F.categorical_disarm_sample(torch.zeros(4, 1), 2)
    assert (z == 0).all() and u.shape == (2, 4, 0)
    theta = torch.zeros(4, 1, requires_grad=True)
    F.categorical_disarm_surrogate(theta, u, torch.ones(4, 4)).sum().backward()
    assert (theta.grad == 0).all()


# -- the graph API --------------------------------------------------------------------------------------------------
METHODS = {
    "sb": lambda: storch.method.DisARM("z"),
    "iw": lambda: storch.method.DisARM("z", importance_weighting=True),
    "sb-classes-order": lambda: storch.method.DisARM("z", n_samples=2, logits_order=None),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_unbiased_on_three_categoricals(name):
    torch.manual_seed(22)
    g = grads_cat(METHODS[name], 1500)
    assert_unbiased(g, exact_cat_grad(f_cat, THETA_CAT).flatten())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_cost_times_two_doubles_the_gradient(name):
    torch.manual_seed(3)
    a = grads_cat(METHODS[name], 4)
    torch.manual_seed(3)
    b = grads_cat(METHODS[name], 4, scale=2.0)
    # atol: float32 rounding of gradients of order 1 that cancel to ~1e-8 through the stick-breaking logsumexp
    torch.testing.assert_close(b, 2 * a, rtol=1e-5, atol=1e-6)


def test_one_hot_and_probs_and_storchastic_plate_conventions():
    torch.manual_seed(4)
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]], requires_grad=True)
    z = storch.method.DisARM("z", n_samples=3)(OneHotCategorical(probs=probs))
    assert z.shape == (6, 2, 3) and z.dtype == probs.dtype and (z._tensor.sum(-1) == 1).all()
    w = z.plates[0]._weight._tensor.flatten()
    torch.testing.assert_close(w, torch.tensor([1 / 3] * 3 + [0.0] * 3))
    cost = (z * torch.tensor([1.0, -2.0, 0.5])).sum((-1, -2))
    storch.add_cost(cost, "c")
    loss = storch.backward()
    torch.testing.assert_close(loss, cost._tensor[:3].mean())  # the forward value: the mean over the first half
    assert probs.grad is not None and torch.isfinite(probs.grad).all()
    assert "probs" in z.param_grads


def test_bad_input():
    with pytest.raises(ValueError, match="logits_order"):
        storch.method.DisARM("z", importance_weighting=True, logits_order=None)
    with pytest.raises(ValueError, match="order must be one of"):
        storch.method.DisARM("z", logits_order="random")
    with pytest.raises(ValueError, match="Bernoulli, Categorical or OneHotCategorical"):
        storch.method.DisARM("z")(Normal(torch.zeros(2), 1.0))
    with pytest.raises(ValueError, match="Bernoulli"):
        storch.method.ARM("z")(Categorical(logits=torch.zeros(3)))
    with pytest.raises(ValueError, match="u must have shape"):
        F.categorical_disarm_surrogate(torch.zeros(2, 3), torch.rand(1, 2, 3), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="leading dimension of 2n"):
        F.categorical_disarm_surrogate(torch.zeros(2, 3), torch.rand(1, 2, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="importance_weighting needs order='ascending'"):
        F.categorical_disarm_surrogate(torch.zeros(2, 3), torch.rand(1, 2, 2), torch.zeros(2, 2),
                                       order="descending", importance_weighting=True)
    with pytest.raises(ValueError, match="finite"):
        F.categorical_disarm_sample(torch.tensor([[math.nan, 0.0]]))
    with pytest.raises(TypeError, match="int"):
        F.categorical_disarm_sample(torch.zeros(2, 3), 1.5)
    # the Bernoulli path is the one it was
    z = storch.method.DisARM("z")(Bernoulli(logits=torch.zeros(3)))
    assert z.shape == (2, 3)
    storch.reset()
