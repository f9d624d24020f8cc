"""ARM, DisARM (Bernoulli and categorical) and ARMS: fastgrad/method/arm.py and fastgrad/functional/arm.py."""
import itertools
import math

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, Independent, Normal, OneHotCategorical

import fastgrad as storch
import fastgrad.functional as F

from .._oracles import TH3, THETA_CAT, encoder_toy, exact_grad, f3, f_cat
from .._stats import assert_lower_variance, assert_unbiased, chi2_pvalue, grad_estimates

# -- Bernoulli ARM and DisARM ---------------------------------------------------------------------------------------
# Against exact enumeration: unbiasedness within standard errors, homogeneity, variance order (DisARM <= ARM <=
# 2-sample leave-one-out score function at 2 cost evaluations), DisARM's zero variance on the 1-D toy, Storchastic's
# plate conventions, bad input.
METHODS = {"ARM": storch.method.ARM, "DisARM": storch.method.DisARM}


def bernoulli(x):
    return Bernoulli(logits=x)


def categorical(x):
    return Categorical(logits=x)


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("n", [1, 4])
def test_unbiased_on_the_non_separable_toy(name, n):
    torch.manual_seed(10 + n)
    g = grad_estimates(lambda: METHODS[name]("z", n_samples=n), bernoulli, f3, TH3, 1500, plate=True)
    assert_unbiased(g, exact_grad(f3, TH3))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_unbiased_on_200_latents(name):
    torch.manual_seed(5)
    D = 200
    t = torch.linspace(0.2, 0.8, D)
    theta = torch.linspace(-2, 2, D)
    g = grad_estimates(lambda: METHODS[name]("z", n_samples=2), bernoulli, lambda b: ((b - t) ** 2).sum(-1), theta,
                       300, plate=True)
    p = torch.sigmoid(theta.double())
    exact = p * (1 - p) * (1 - 2 * t.double())  # d/dtheta E[(b - t)^2] per latent
    z = (g.mean(0) - exact).abs() / (g.std(0).clamp_min(1e-12) / math.sqrt(g.shape[0]))
    assert (z < 4.5).all(), z.max()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_unbiased_on_the_vae_style_encoder_gradient(name):
    # a fixed linear encoder over a data plate, the gradient w.r.t. its weights (exact by enumeration per datum)
    x, W0, exact = encoder_toy()
    g = grad_estimates(lambda: METHODS[name]("z", n_samples=2),
                       lambda l: Bernoulli(logits=storch.denote_independent(l, -2, "data")), f3, W0, 1500,
                       plate=True, logits_of=lambda W: x @ W)
    assert_unbiased(g, exact)


def test_disarm_has_zero_variance_on_the_1d_toy():
    t = 0.499
    g = grad_estimates(lambda: storch.method.DisARM("z"), bernoulli, lambda b: ((b - t) ** 2).sum(-1),
                       torch.zeros(1), 50)
    torch.testing.assert_close(g, torch.full_like(g, 0.25 * (1 - 2 * t)), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_cost_times_two_doubles_the_gradient(name):
    torch.manual_seed(3)
    a = grad_estimates(lambda: METHODS[name]("z", n_samples=2), bernoulli, f3, TH3, 5)
    torch.manual_seed(3)
    b = grad_estimates(lambda: METHODS[name]("z", n_samples=2), bernoulli, f3, TH3, 5, scale=2.0)
    torch.testing.assert_close(b, 2 * a, rtol=1e-6, atol=1e-9)


@pytest.mark.slow  # 3 x 3000 steps, kept as steps: see the comment
def test_variance_order_at_two_cost_evaluations():
    # DisARM <= ARM <= 2-sample leave-one-out REINFORCE (each 2 evaluations), by more than 3 standard errors of
    # the difference of the variance estimates (independent runs). Not one step over a plate of repetitions: ARM's
    # margin over the score function in the third coordinate is ~0.8 of those standard errors beyond the bound at
    # 3000 estimates (variances 0.0044 and 0.0054 at 200k), so another random stream fails it about 1 time in 5
    torch.manual_seed(0)
    reps = 3000
    g_dis = grad_estimates(lambda: storch.method.DisARM("z"), bernoulli, f3, TH3, reps)
    g_arm = grad_estimates(lambda: storch.method.ARM("z"), bernoulli, f3, TH3, reps)
    g_sf = grad_estimates(lambda: storch.method.ScoreFunction("z", n_samples=2, baseline_factory="batch_average"),
                          bernoulli, f3, TH3, reps)
    assert_lower_variance(g_dis, g_arm)
    assert_lower_variance(g_arm, g_sf)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_storchastic_plate_conventions(name):
    p = torch.full((4, 3), 0.3, requires_grad=True)
    x = storch.denote_independent(p, 0, "data")
    z = METHODS[name]("z", n_samples=3)(Bernoulli(probs=x))
    assert z.shape == (6, 4, 3) and z.dtype == torch.float32 and z.n == 6
    assert set(z._tensor.unique().tolist()) <= {0.0, 1.0}
    w = z.plate.weight._tensor.flatten()
    torch.testing.assert_close(w, torch.tensor([1 / 3] * 3 + [0.0] * 3))
    # the plate-reduced cost is the mean over the first half
    c = storch.add_cost(z.sum(-1), "c")
    red = storch.reduce_plates(c)._tensor
    torch.testing.assert_close(red, z._tensor[:3].sum(-1).mean())
    storch.backward()
    assert z.param_grads["probs"].shape == (4, 3)
    # Independent-wrapped Bernoulli works too
    z = METHODS[name]("z", n_samples=1)(Independent(Bernoulli(probs=x), 1))
    storch.add_cost(z.sum(-1), "c")
    storch.backward()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_bad_input(name):
    # DisARM also takes categoricals (the categorical tests below); none takes a continuous distribution
    wrong = Normal(torch.zeros(2), 1.0) if name == "DisARM" else OneHotCategorical(logits=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="Bernoulli"):
        METHODS[name]("z")(wrong)
    with pytest.raises(ValueError, match="n_samples"):
        METHODS[name]("z", n_samples=0)
    with pytest.raises(ValueError, match="sampling_method"):
        METHODS[name]("z", "antithetic")
    with pytest.raises(ValueError, match="leading dimension of 2n"):
        F.disarm_surrogate(torch.zeros(3), torch.zeros(2, 3), torch.zeros(3))
    with pytest.raises(ValueError, match="cost must be finite"):
        F.arm_surrogate(torch.zeros(3), torch.rand(1, 3), torch.tensor([1.0, float("nan")]))


def test_functional_matches_hand_written_formulas():
    theta = torch.tensor([0.7, -1.2], requires_grad=True)
    b, u = F.arm_sample(theta, 5, seed=3)
    assert b.shape == (10, 2) and u.shape == (5, 2)
    # each half is marginally Bernoulli(sigmoid(theta)) from the same uniforms
    torch.testing.assert_close(b[:5], (u > torch.sigmoid(-theta.detach())).float())
    torch.testing.assert_close(b[5:], (u < torch.sigmoid(theta.detach())).float())
    cost = (b ** 2).sum(-1) + b[:, 0] * 3
    (g_arm,) = torch.autograd.grad(F.arm_surrogate(theta, u, cost).mean(0).sum(), theta)
    want = ((cost[:5] - cost[5:])[:, None] * (u - 0.5)).mean(0)
    torch.testing.assert_close(g_arm, want)
    (g_dis,) = torch.autograd.grad(F.disarm_surrogate(theta, b, cost).mean(0).sum(), theta)
    sign = 1 - 2 * b[5:]
    want = (0.5 * (cost[:5] - cost[5:])[:, None] * (b[:5] != b[5:]).float() * sign
            * torch.sigmoid(theta.detach().abs())).mean(0)
    torch.testing.assert_close(g_dis, want)


# -- ARMS -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [3, 4])
def test_arms_unbiased(n):
    torch.manual_seed(40 + n)
    g = grad_estimates(lambda: storch.method.ARMS("z", n_samples=n), bernoulli, f3, TH3, 1500, plate=True)
    assert_unbiased(g, exact_grad(f3, TH3))


def test_arms_is_disarm_at_two_samples_and_beats_loo_at_four():
    theta = torch.tensor([0.7, -1.2, 0.0], requires_grad=True)
    for seed in range(5):
        b, _ = F.arm_sample(theta, 1, seed=seed)
        cost = torch.randn(2, generator=torch.Generator().manual_seed(seed))
        (g1,) = torch.autograd.grad(F.arms_surrogate(theta, b, cost).mean(0).sum(), theta)
        (g2,) = torch.autograd.grad(F.disarm_surrogate(theta, b, cost).mean(0).sum(), theta)
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
    # the marginals of the copula samples are Bernoulli(p)
    p = torch.sigmoid(torch.tensor([0.7, -1.2, 0.0, 2.5]))
    b = F.arms_sample(torch.logit(p), 5, seed=2)
    many = torch.stack([F.arms_sample(torch.logit(p), 5, seed=s) for s in range(2000)]).reshape(-1, 4)
    se = torch.sqrt(p * (1 - p) / many.shape[0])
    assert b.shape == (5, 4) and ((many.mean(0) - p).abs() < 4.5 * se).all()
    torch.manual_seed(9)
    g_arms = grad_estimates(lambda: storch.method.ARMS("z", n_samples=4), bernoulli, f3, TH3, 2500, plate=True)
    g_loo = grad_estimates(lambda: storch.method.ScoreFunction("z", n_samples=4, baseline_factory="batch_average"),
                           bernoulli, f3, TH3, 2500, plate=True)
    assert_lower_variance(g_arms, g_loo)


def test_arms_bad_input():
    with pytest.raises(ValueError, match="n_samples >= 2"):
        storch.method.ARMS("z", n_samples=1)
    with pytest.raises(ValueError, match="Bernoulli"):
        storch.method.ARMS("z")(OneHotCategorical(logits=torch.zeros(2, 3)))
    with pytest.raises(ValueError, match="n >= 2"):
        F.arms_sample(torch.zeros(3), 1)


# -- DisARM for categorical variables (Dong, Mnih & Tucker 2021) ----------------------------------------------------
# Stick breaking, the coupled sampler, the estimator's exact expectation (the pair's noise enumerated), the graph API
# against exact enumeration, homogeneity, the Bernoulli case, bad input.
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
    exact = exact_grad(f, logits, "categorical")
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


CATEGORICAL_METHODS = {
    "sb": lambda: storch.method.DisARM("z"),
    "iw": lambda: storch.method.DisARM("z", importance_weighting=True),
    "sb-classes-order": lambda: storch.method.DisARM("z", n_samples=2, logits_order=None),
}


@pytest.mark.parametrize("name", sorted(CATEGORICAL_METHODS))
def test_unbiased_on_three_categoricals(name):
    torch.manual_seed(22)
    g = grad_estimates(CATEGORICAL_METHODS[name], categorical, f_cat, THETA_CAT, 1500, plate=True)
    assert_unbiased(g, exact_grad(f_cat, THETA_CAT, "categorical"))


@pytest.mark.parametrize("name", sorted(CATEGORICAL_METHODS))
def test_categorical_cost_times_two_doubles_the_gradient(name):
    torch.manual_seed(3)
    a = grad_estimates(CATEGORICAL_METHODS[name], categorical, f_cat, THETA_CAT, 4, plate=True)
    torch.manual_seed(3)
    b = grad_estimates(CATEGORICAL_METHODS[name], categorical, f_cat, THETA_CAT, 4, plate=True, scale=2.0)
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


def test_categorical_bad_input():
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


def test_half_precision_costs_whose_difference_overflows_half():
    # f1 - f2 = 80000 > 65504, the largest float16: formed in the cost's dtype it was inf (and the gradient inf/NaN)
    cost = torch.tensor([40000.0, -40000.0], dtype=torch.float16)
    x = torch.zeros(2, requires_grad=True)
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    F.disarm_surrogate(x, b, cost).sum().backward()
    # DisARM: 1/2 (f1 - f2) 1[b1 != b2] (-1)^b2 sigmoid(|x|) = 1/2 * 80000 * (+-1) * 1/2
    torch.testing.assert_close(x.grad, torch.tensor([20000.0, -20000.0]))
    x.grad = None
    u = torch.full((1, 2), 0.75)
    F.arm_surrogate(x, u, cost).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((2,), 80000.0 * 0.25))  # (f1 - f2)(u - 1/2)
    logits = torch.zeros(3, 4, requires_grad=True)
    z, un = F.categorical_disarm_sample(logits.detach(), 1, seed=0)
    F.categorical_disarm_surrogate(logits, un, torch.tensor([40000.0, -40000.0], dtype=torch.float16)
                                   .view(2, 1).expand(2, 3)).sum().backward()
    assert torch.isfinite(logits.grad).all()
    ref = torch.zeros(3, 4, requires_grad=True)
    F.categorical_disarm_surrogate(ref, un, torch.tensor([40000.0, -40000.0]).view(2, 1).expand(2, 3)).sum().backward()
    torch.testing.assert_close(logits.grad, ref.grad)
