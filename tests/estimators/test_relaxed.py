"""GumbelEntmax/SparseMax, ReinMax, GumbelRao, IndeCateR, entmax/sparsemax: fastgrad/{method,functional}/relaxed.py."""
import math

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, OneHotCategorical

import fastgrad as storch
import fastgrad.functional as F

from .._oracles import THETA_CAT, T3, exact, f_cat
from .._stats import assert_lower_total_variance, assert_unbiased, grad_estimates

# Forward values against independent formulas, float64 gradcheck of the entmax backward, ReinMax's backward against
# its matrix formula, Gumbel-Rao's mean equal to straight-through Gumbel-softmax's with lower variance, IndeCateR
# unbiased against exact enumeration, Storchastic's signatures, bad input.


def _project_simplex(z):  # sparsemax by bisection on the threshold, written independently
    lo, hi = z.min(-1, keepdim=True).values - 1, z.max(-1, keepdim=True).values
    for _ in range(200):
        mid = (lo + hi) / 2
        big = (z - mid).clamp(min=0).sum(-1, keepdim=True) >= 1
        lo, hi = torch.where(big, mid, lo), torch.where(big, hi, mid)
    return (z - lo).clamp(min=0)


def _entmax15_bisect(z):  # [z/2 - tau]_+^2 summing to one, by bisection
    x = z / 2
    lo, hi = x.max(-1, keepdim=True).values - 1, x.max(-1, keepdim=True).values
    for _ in range(200):
        mid = (lo + hi) / 2
        big = ((x - mid).clamp(min=0) ** 2).sum(-1, keepdim=True) >= 1
        lo, hi = torch.where(big, mid, lo), torch.where(big, hi, mid)
    return (x - lo).clamp(min=0) ** 2


@pytest.mark.parametrize("shape", [(1,), (5,), (3, 7), (2, 4, 33)])
def test_entmax_forward_matches_independent_bisection(shape):
    torch.manual_seed(0)
    z = torch.randn(shape, dtype=torch.float64) * 2
    torch.testing.assert_close(F.sparsemax(z), _project_simplex(z), rtol=0, atol=1e-12)
    torch.testing.assert_close(F.entmax(z, 1.5), _entmax15_bisect(z), rtol=0, atol=1e-12)
    # the generic bisection path at alpha = 1.5 and 2 agrees with the sorting algorithms
    torch.testing.assert_close(F.entmax(z, 1.5 + 1e-13), F.entmax(z, 1.5), rtol=0, atol=1e-9)
    p = F.entmax(z, 1.3)
    torch.testing.assert_close(p.sum(-1), torch.ones(shape[:-1], dtype=torch.float64))
    assert (p >= 0).all()


def test_entmax_is_sparse_and_float32_agrees():
    z = torch.tensor([[3.0, 0.0, -2.0, 2.9]])
    assert (F.sparsemax(z) == 0).sum() == 2 and (F.entmax(z) == 0).sum() >= 1
    z = torch.randn(64, 50)
    torch.testing.assert_close(F.entmax(z), F.entmax(z.double()).float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.25, 3.0])
def test_entmax_gradcheck(alpha):
    torch.manual_seed(1)
    z = (torch.randn(3, 6, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: F.entmax(t, alpha), (z,), eps=1e-7, atol=1e-5)


def test_entmax_bad_input():
    with pytest.raises(ValueError, match="alpha must be > 1"):
        F.entmax(torch.zeros(3), 1.0)
    with pytest.raises(TypeError, match="alpha"):
        F.entmax(torch.zeros(3), "1.5")
    with pytest.raises(ValueError, match="finite"):
        F.entmax(torch.tensor([0.0, math.nan]))
    with pytest.raises(ValueError, match="alpha must be > 1"):
        storch.method.GumbelEntmax("z", None, 0.5)


def test_gumbel_entmax_samples():
    logits = torch.randn(4, 6, requires_grad=True)
    y = F.gumbel_entmax(logits, 1.5, 0.5, n=3, seed=2)
    assert y.shape == (3, 4, 6) and torch.allclose(y.sum(-1), torch.ones(3, 4))
    assert torch.equal(y, F.gumbel_entmax(logits, 1.5, 0.5, n=3, seed=2))
    h = F.gumbel_entmax(logits, 2.0, 0.5, n=3, hard=True, seed=2)
    assert ((h == 0) | (h == 1)).all() and torch.equal(h.argmax(-1), F.gumbel_entmax(logits, 2.0, 0.5, 3,
                                                                                    seed=2).argmax(-1))
    (h * torch.arange(6.0)).sum().backward()
    assert logits.grad.abs().sum() > 0


def test_gumbel_entmax_method_signature_and_straight_through():
    th = torch.randn(2, 5, requires_grad=True)
    m = storch.method.GumbelEntmax("z", None, 1.5, n_samples=2, straight_through=True)  # alpha third
    assert m.alpha == 1.5
    z = m(OneHotCategorical(logits=th))
    assert ((z._tensor == 0) | (z._tensor == 1)).all()   # straight_through is honoured
    storch.add_cost((z * torch.arange(5.0)).sum(-1).sum(-1), "c")
    storch.backward()
    assert th.grad.abs().sum() > 0
    z = storch.method.GumbelSparseMax("z")(OneHotCategorical(logits=th.detach()))
    assert (z._tensor == 0).any() or z._tensor.max() == 1  # sparse: exact zeros
    storch.reset()
    with pytest.raises(ValueError, match="OneHotCategorical"):
        storch.method.GumbelSparseMax("z")(Bernoulli(logits=torch.zeros(3)))
    with pytest.raises(ValueError, match="adaptive"):
        storch.method.GumbelEntmax("z", adaptive=True)


# -- ReinMax --------------------------------------------------------------------------------------------------
def _jac(pi):
    return torch.diag_embed(pi) - pi.unsqueeze(-1) * pi.unsqueeze(-2)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_reinmax_backward_is_the_heun_formula(tau):
    torch.manual_seed(3)
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(4, dtype=torch.float64)
    d = F.reinmax(logits, n=2, tau=tau, seed=4)
    assert ((d == 0) | (d == 1)).all() and torch.equal(d.sum(-1), torch.ones(2, 5, dtype=torch.float64))
    (d * c).sum().backward()
    with torch.no_grad():
        pi0 = logits.softmax(-1)
        pi1 = (d + (logits / tau).softmax(-1)) / 2                          # [2, 5, 4]
        g = c.expand(2, 5, 4).unsqueeze(-1)
        want = (2 * _jac(pi1) @ g - 0.5 * _jac(pi0).expand(2, 5, 4, 4) @ g).squeeze(-1).sum(0)
    torch.testing.assert_close(logits.grad, want)


def test_reinmax_samples_the_categorical_and_masks():
    logits = torch.tensor([0.5, -math.inf, 1.0, 0.0])
    d = F.reinmax(logits.expand(50_000, 4).clone().requires_grad_(), seed=1)
    freq = d[0].mean(0)
    p = logits.softmax(-1)
    assert float(freq[1]) == 0
    assert ((freq - p).abs() < 5 * (p * (1 - p) / 50_000).sqrt() + 1e-9).all()
    lg = logits.clone().requires_grad_()
    (F.reinmax(lg, n=4, seed=0) * torch.arange(4.0)).sum().backward()
    assert torch.isfinite(lg.grad).all() and float(lg.grad[1]) == 0


# -- Gumbel-Rao -------------------------------------------------------------------------------------------------
def _st_and_gr_grads(reps, m):
    torch.manual_seed(5)
    c = torch.tensor([0.3, -1.0, 0.8, 0.1])
    base = torch.tensor([0.2, -0.3, 0.5, 0.0])
    out = []
    for fn in (lambda l: F.gumbel_softmax(l, 0.5, 1, True), lambda l: F.gumbel_rao(l, 1, 0.5, m)):
        lg = base.expand(reps, 4).clone().requires_grad_()  # one row per independent estimate
        y = fn(lg)
        ((y * c).sum(-1) ** 2).sum().backward()   # a cost nonlinear in the one-hot sample
        out.append(lg.grad.double())
    return out[0], out[1]


def test_gumbel_rao_has_straight_through_mean_and_lower_variance():
    # Gumbel-Rao is E[straight-through Gumbel-softmax | sample]: the same mean, less variance (Paulus et al. 2021)
    st, gr = _st_and_gr_grads(3000, 10)
    diff_se = (st.var(0) / st.shape[0] + gr.var(0) / gr.shape[0]).sqrt()
    assert ((st.mean(0) - gr.mean(0)).abs() < 4.5 * diff_se).all()
    assert_lower_total_variance(gr, st)


def test_gumbel_rao_method():
    th = torch.randn(3, 4, requires_grad=True)
    m = storch.method.GumbelRao("z", n_samples=2, temperature=0.5, conditional_samples=5)
    z = m(OneHotCategorical(logits=th))
    assert ((z._tensor == 0) | (z._tensor == 1)).all() and z._tensor.shape == (2, 3, 4)
    storch.add_cost((z * torch.arange(4.0)).sum(-1).sum(-1), "c")
    storch.backward()
    assert th.grad.abs().sum() > 0
    b = torch.zeros(3, requires_grad=True)
    z = storch.method.ReinMax("z", n_samples=2)(Bernoulli(logits=b))
    assert ((z._tensor == 0) | (z._tensor == 1)).all() and z._tensor.shape == (2, 3)
    storch.add_cost(z.sum(-1), "c")
    storch.backward()
    assert b.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="temperature"):
        storch.method.GumbelRao("z", temperature=0.0)
    with pytest.raises(ValueError, match="conditional_samples"):
        storch.method.GumbelRao("z", conditional_samples=0)
    with pytest.raises(ValueError, match="OneHotCategorical or Bernoulli"):
        storch.method.ReinMax("z")(Categorical(logits=torch.zeros(3)))


# -- IndeCateR -------------------------------------------------------------------------------------------------
def categorical(x):
    return Categorical(logits=x)


def indecater_grads(reps, S=1, scale=1.0):
    """``reps`` independent estimates (and forward values) from one step over a plate of repetitions."""
    return grad_estimates(lambda: storch.method.IndeCateR("z", n_samples=S), categorical, f_cat, THETA_CAT, reps,
                          plate=True, scale=scale, values=True)


def test_indecater_neighbours():
    x = torch.tensor([[[2, 0, 1]]])                              # [S=1, R=1, D=3]
    nb = F.indecater_samples(x, 4)                               # [1, 3, 4, 1, 3]
    assert nb.shape == (1, 3, 4, 1, 3)
    for d in range(3):
        for c in range(4):
            want = x[0, 0].clone()
            want[d] = c
            assert torch.equal(nb[0, d, c, 0], want)


def test_indecater_unbiased_and_its_value_estimates_the_expectation():
    torch.manual_seed(12)
    g, v = indecater_grads(500)
    value, grad = exact(f_cat, THETA_CAT, "categorical")
    assert_unbiased(g, grad)
    assert_unbiased(v.view(-1, 1), value.view(1))


def test_indecater_homogeneous_and_beats_the_score_function_at_equal_evaluations():
    torch.manual_seed(13)
    a, _ = indecater_grads(3)
    torch.manual_seed(13)
    b, _ = indecater_grads(3, scale=2.0)
    torch.testing.assert_close(b, 2 * a, rtol=1e-5, atol=1e-8)
    torch.manual_seed(14)
    ind, _ = indecater_grads(300)                                # 12 evaluations per estimate
    sf = grad_estimates(lambda: storch.method.ScoreFunction("z", n_samples=12, baseline_factory="batch_average"),
                        categorical, f_cat, THETA_CAT, 300, plate=True)
    assert_lower_total_variance(ind, sf)


def test_indecater_on_bernoulli_and_plates():
    # 400 estimates from one step over a plate of repetitions, each row its own shared logit eta
    torch.manual_seed(15)
    shapes = []

    def cost(z):
        shapes.append(z.shape)
        return ((z - T3) ** 2).sum(-1)

    g = grad_estimates(lambda: storch.method.IndeCateR("z", n_samples=2), lambda x: Bernoulli(logits=x), cost,
                       torch.tensor(0.4), 400, plate=True, logits_of=lambda eta: eta.unsqueeze(-1).expand(400, 3))
    assert shapes[0][0] == 2 * 3 * 2
    s = torch.sigmoid(torch.tensor(0.4, dtype=torch.float64))
    # per-variable exact sums on a separable cost: no variance left but float rounding
    torch.testing.assert_close(g, (s * (1 - s) * (1 - 2 * T3.double()).sum()).expand(400), rtol=1e-5, atol=1e-7)
