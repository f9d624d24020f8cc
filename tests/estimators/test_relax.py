"""RELAX, REBAR and LAX: fastgrad/method/relax.py and fastgrad/functional/relax.py (with the conditional samplers of
fastgrad/functional/sampling.py)."""
import math

import pytest
import torch
import torch.nn.functional as TF
from torch.distributions import Bernoulli, Categorical, Normal, OneHotCategorical

import fastgrad as storch
import fastgrad.functional as F

from .._oracles import TH3, exact_grad, f3
from .._stats import assert_lower_variance, assert_unbiased, grad_estimates

# -- the functional layer on Bernoulli latents ----------------------------------------------------------------------
# The conditional sampler, unbiasedness against exact enumeration with an untrained and a REBAR control variate,
# variance after training the control variate below REINFORCE's on the same samples, homogeneity, bad input.


def relax_grads(control, reps, scale=1.0, theta=TH3):
    """``reps`` independent estimates from one call: each row of the logits ``[reps, ...]`` its own copy of theta."""
    t = theta.expand((reps,) + tuple(theta.shape)).clone().requires_grad_()
    b, z, zt = F.relax_bernoulli_sample(t, 1)
    s = F.relax_surrogate(t, b, z, zt, f3(b) * scale, control)
    return torch.autograd.grad(s.sum(), t)[0].double()


def test_conditional_sampler_agrees_with_its_hard_sample_and_the_marginal():
    th = torch.tensor([0.3, -0.5, 1.0, -2.0])
    b, z, zt = F.relax_bernoulli_sample(th, 40000, seed=1)
    assert torch.equal((zt > 0).to(b.dtype), b)  # Storchastic's Bernoulli branch fails this for every b = 1
    # z~ given b has the law of z given b: z~ (over b ~ p) is Logistic(theta) again; compare E[sigmoid(.)] and
    # E[sigmoid(.)^2] of z~ with their exact values under z (independent of the z drawn here)
    u = torch.linspace(0.5 / 20000, 1 - 0.5 / 20000, 20000, dtype=torch.float64)[:, None]
    exact_z = th.double() + torch.log(u) - torch.log1p(-u)  # quantiles of Logistic(theta)
    for k in (1, 2):
        got = torch.sigmoid(zt.double()) ** k
        want = (torch.sigmoid(exact_z) ** k).mean(0)
        se = got.std(0) / math.sqrt(got.shape[0])
        assert ((got.mean(0) - want).abs() < 4.5 * se).all(), (got.mean(0), want)


@pytest.mark.parametrize("kind", ["relax_untrained", "rebar"])
def test_unbiased(kind):
    torch.manual_seed(20)
    if kind == "rebar":
        def control(z):
            return 1.0 * f3(torch.sigmoid(z / 0.5))
    else:
        net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

        def control(z):
            return net(torch.sigmoid(z)).squeeze(-1)
    g = relax_grads(control, 1500)
    assert_unbiased(g, exact_grad(f3, TH3))


@pytest.mark.slow  # 300 training steps of the control variate (a loop by nature) and 2000 estimates
def test_trained_control_variate_beats_reinforce_on_the_same_samples():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def control(z):
        return net(torch.sigmoid(z)).squeeze(-1)

    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(300):  # minimise the estimator's second moment w.r.t. the control variate (Grathwohl et al.)
        t = TH3.clone().requires_grad_()
        b, z, zt = F.relax_bernoulli_sample(t, 16)
        (g,) = torch.autograd.grad(F.relax_surrogate(t, b, z, zt, f3(b), control).sum(), t, create_graph=True)
        opt.zero_grad()
        (g ** 2).sum().backward()
        opt.step()
    relax, reinforce = [], []
    for _ in range(2000):
        t = TH3.clone().requires_grad_()
        b, z, zt = F.relax_bernoulli_sample(t, 1)
        relax.append(torch.autograd.grad(F.relax_surrogate(t, b, z, zt, f3(b), control).sum(), t)[0])
        logp = -(b * TF.softplus(-t) + (1 - b) * TF.softplus(t)).sum(-1)
        reinforce.append(torch.autograd.grad((f3(b) * logp).sum(), t)[0])
    assert_lower_variance(torch.stack(relax).double(), torch.stack(reinforce).double())


def test_cost_times_two_doubles_the_gradient():
    def control(z):
        return f3(torch.sigmoid(z / 0.5))

    torch.manual_seed(4)
    a = relax_grads(control, 5)
    torch.manual_seed(4)
    b = relax_grads(lambda z: 2 * control(z), 5, scale=2.0)
    torch.testing.assert_close(b, 2 * a, rtol=1e-6, atol=1e-9)


def test_bad_input():
    t = TH3.clone().requires_grad_()
    b, z, zt = F.relax_bernoulli_sample(t, 2)
    with pytest.raises(TypeError, match="control must be a callable"):
        F.relax_surrogate(t, b, z, zt, f3(b), 3.0)
    with pytest.raises(ValueError, match="must return the cost's shape"):
        F.relax_surrogate(t, b, z, zt, f3(b), lambda z: z)
    with pytest.raises(ValueError, match="b must have shape"):
        F.conditional_gumbel_bernoulli(t, torch.zeros(2, 5))


# -- the graph API: RELAX / REBAR methods ----------------------------------------------------------------------
def bernoulli(x):
    return Bernoulli(logits=x)


def graph_grads(method, reps, opt=None, plate=False):
    return grad_estimates(lambda: method, bernoulli, f3, TH3, reps, opt=opt, plate=plate)


@pytest.mark.parametrize("kind", ["RELAX", "REBAR"])
def test_methods_unbiased(kind):
    torch.manual_seed(30)
    m = storch.method.RELAX("z", in_dim=3) if kind == "RELAX" else storch.method.REBAR("z")
    g = graph_grads(m, 1500, plate=True)
    assert_unbiased(g, exact_grad(f3, TH3))


@pytest.mark.slow  # 300 training steps of the control variate (a loop by nature), then 2 x 1500 steps
def test_method_trains_its_control_variate_below_reinforce():
    torch.manual_seed(0)
    m = storch.method.RELAX("z", in_dim=3)
    graph_grads(m, 300, torch.optim.Adam(m.parameters(), lr=1e-2))
    g_relax = graph_grads(m, 1500)
    g_sf = graph_grads(storch.method.ScoreFunction("z"), 1500)
    assert_lower_variance(g_relax, g_sf)
    assert_unbiased(g_relax, exact_grad(f3, TH3))  # still unbiased after training


def test_storchastic_conventions():
    p = torch.full((4, 3), 0.3, requires_grad=True)
    x = storch.denote_independent(p, 0, "data")
    m = storch.method.REBAR("z", n_samples=2)
    z = m(Bernoulli(probs=x))
    assert z.shape == (6, 4, 3) and z.n == 6
    torch.testing.assert_close(z.plate.weight._tensor.flatten(), torch.tensor([0.5, 0.5, 0, 0, 0, 0]))
    assert set(z._tensor[:2].unique().tolist()) <= {0.0, 1.0}  # hard third; the rest is relaxed
    assert m.eta.item() == 1.0 and abs(m.temperature.item() - 0.5) < 1e-6
    storch.add_cost(((z - 0.4) ** 2).sum(-1), "c")
    storch.backward()
    assert z.param_grads["probs"].shape == (4, 3)
    assert m.eta.grad is not None and m.log_temperature.grad is not None  # trained on the variance
    r = storch.method.RELAX("w", in_dim=3)
    assert r(Bernoulli(probs=x)).shape == (1, 4, 3)
    storch.reset()


def test_method_bad_input():
    with pytest.raises(TypeError, match="c_phi must be a torch.nn.Module"):
        storch.method.RELAX("z", c_phi=lambda z: z)
    with pytest.raises(ValueError, match="needs a control variate"):
        storch.method.RELAX("z")
    with pytest.raises(ValueError, match="in_dim"):
        storch.method.RELAX("z", in_dim=0)

    with pytest.raises(ValueError, match="REBAR needs a Bernoulli or OneHotCategorical distribution, got Normal"):
        storch.method.REBAR("z")(Normal(torch.zeros(3), 1.0))


def test_conditional_gumbel_categorical_law():
    logits = torch.tensor([[0.5, -1.0, 1.5, 0.0]], dtype=torch.float64)
    n = 20000
    b = torch.full((n, 1), 2, dtype=torch.int64)
    zt = F.conditional_gumbel_categorical(logits, b, seed=3)
    assert torch.equal(zt.argmax(-1), b)
    for k in (0, 1):  # the other argmax values too
        bk = torch.full((n, 1), k, dtype=torch.int64)
        assert torch.equal(F.conditional_gumbel_categorical(logits, bk, seed=4).argmax(-1), bk)
    # against rejection sampling: z = log p + Gumbel, kept where argmax = 2 (independent draws)
    u = F.uniform((4 * n, 1, 4), seed=5).double()
    z = torch.log_softmax(logits, -1) - torch.log(-torch.log(u))
    kept = z[z.argmax(-1)[:, 0] == 2]
    for stat in (lambda x: torch.softmax(x / 0.5, -1), lambda x: x.clamp(-20, 20)):
        a, c = stat(zt).reshape(-1, 4), stat(kept).reshape(-1, 4)
        se = torch.sqrt(a.var(0) / a.shape[0] + c.var(0) / c.shape[0])
        assert ((a.mean(0) - c.mean(0)).abs() < 4.5 * se).all(), (a.mean(0), c.mean(0))
    # differentiable w.r.t. the logits; bad input
    l = logits.clone().requires_grad_()
    F.conditional_gumbel_categorical(l, b[:5], seed=1).sum().backward()
    assert l.grad is not None and torch.isfinite(l.grad).all()
    with pytest.raises(ValueError, match=r"b must lie in \[0, 4\)"):
        F.conditional_gumbel_categorical(logits, torch.full((2, 1), 4, dtype=torch.int64))


# -- LAX ------------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # 300 training steps of the control variate (a loop by nature), with 3 x 1000 steps
def test_lax_unbiased_and_trained_below_reinforce():
    mu0, sigma = torch.tensor([0.5, -1.0]), torch.tensor([1.0, 0.7])

    def cost(z):
        assert not z._tensor.requires_grad  # the cost is a black box: no pathwise gradient through it
        return ((z - 3.0) ** 2).sum(-1)

    def run(m, reps, opt=None):
        return grad_estimates(lambda: m, lambda mu: Normal(mu, sigma), cost, mu0, reps, opt=opt)

    exact = 2 * (mu0.double() - 3.0)  # d/dmu E[(b - 3)^2]
    torch.manual_seed(1)
    m = storch.method.LAX("z", in_dim=2)
    for g in (run(m, 1000), None):
        if g is None:  # after training the control variate
            run(m, 300, torch.optim.Adam(m.parameters(), lr=1e-2))
            g = run(m, 1000)
        assert_unbiased(g, exact)
    assert_lower_variance(g, run(storch.method.ScoreFunction("z"), 1000))


def test_lax_bad_input():
    with pytest.raises(ValueError, match="LAX needs c_phi"):
        storch.method.LAX("z")
    with pytest.raises(TypeError, match="c_phi must be a torch.nn.Module"):
        storch.method.LAX("z", c_phi=3)
    with pytest.raises(ValueError, match="reparameterizable"):
        storch.method.LAX("z", in_dim=3)(Bernoulli(probs=torch.full((3,), 0.5)))


# -- categorical latents (Gumbel relaxation, the conditional Gumbel given the argmax) ----------------------------
L0 = torch.tensor([[0.3, -0.5, 1.0, 0.0], [-1.0, 0.2, 0.4, 0.9]])
TG = torch.linspace(-0.5, 1.0, 8)


def f_cat(z):  # 2 categoricals x 4 classes (one-hot), non-separable
    return ((z.reshape(z.shape[:-2] + (8,)) - TG) ** 2).sum(-1) + 3 * z[..., 0, 0] * z[..., 1, 2]


def exact_cat():
    return exact_grad(f_cat, L0, "categorical", one_hot=True)


def cat_grads(method, reps, opt=None, plate=False):
    return grad_estimates(lambda: method, lambda x: OneHotCategorical(logits=x), f_cat, L0, reps, opt=opt,
                          plate=plate)


@pytest.mark.parametrize("kind", ["RELAX", "REBAR"])
def test_categorical_unbiased(kind):
    torch.manual_seed(50)
    m = storch.method.RELAX("z", in_dim=4) if kind == "RELAX" else storch.method.REBAR("z")
    g = cat_grads(m, 1500, plate=True)
    assert_unbiased(g, exact_cat())


@pytest.mark.slow  # 300 training steps of the control variate (a loop by nature), then 2 x 1000 steps
def test_categorical_trained_below_reinforce():
    torch.manual_seed(2)
    m = storch.method.RELAX("z", in_dim=4)
    cat_grads(m, 300, torch.optim.Adam(m.parameters(), lr=1e-2))
    g = cat_grads(m, 1000)
    assert_lower_variance(g, cat_grads(storch.method.ScoreFunction("z"), 1000))
    assert_unbiased(g, exact_cat())


def test_categorical_conventions_and_errors():
    z = storch.method.REBAR("z", n_samples=2)(OneHotCategorical(logits=L0))
    assert z.shape == (6, 2, 4) and set(z._tensor[:2].unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(z._tensor[2:].sum(-1), torch.ones(4, 2))  # relaxed points of the simplex
    storch.reset()
    idx = storch.method.RELAX("w", in_dim=4)(Categorical(logits=L0))
    assert idx.shape == (1, 2) and idx.dtype == torch.int64
    storch.reset()
    with pytest.raises(ValueError, match="REBAR needs a Bernoulli or OneHotCategorical distribution, got Categorical"):
        storch.method.REBAR("z")(Categorical(logits=L0))
    with pytest.raises(ValueError, match="REBAR needs a OneHotCategorical"):  # RELAX(rebar=True): the same fact
        storch.method.RELAX("z", rebar=True)(Categorical(logits=L0))
