"""DoubleCV and RODEO: fastgrad/method/double_cv.py and fastgrad/functional/double_cv.py."""
import pytest
import torch
from torch.distributions import Bernoulli, OneHotCategorical

import fastgrad as storch
import fastgrad.functional as F

from .._oracles import TH3, exact_grad, f3
from .._stats import assert_lower_variance, assert_unbiased, grad_estimates


def bernoulli(x):
    return Bernoulli(logits=x)


# -- Double control variates ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [pytest.param(None, marks=pytest.mark.slow), 0.5, 1.0])
def test_double_cv_unbiased(alpha):
    torch.manual_seed(30)
    method = storch.method.DoubleCV("z", 2, alpha=alpha)  # one method across the steps: the online alpha moves
    # (slow: 1500 steps, a loop by nature); a fixed alpha keeps no state: one step over a plate of repetitions
    g = grad_estimates(lambda: method, bernoulli, f3, TH3, 1500, plate=alpha is not None)
    assert_unbiased(g, exact_grad(f3, TH3))


def test_double_cv_is_exact_for_a_linear_cost_and_rloo_at_alpha_zero():
    w = torch.tensor([0.7, -0.3, 1.2])
    g = grad_estimates(lambda: storch.method.DoubleCV("z", 3, alpha=1.0), bernoulli, lambda b: (b * w).sum(-1), TH3,
                       20)
    p = torch.sigmoid(TH3.double())
    torch.testing.assert_close(g, (w.double() * p * (1 - p)).expand(20, 3), rtol=1e-5, atol=1e-7)
    th = TH3.clone().requires_grad_()
    z = storch.method.DoubleCV("z", 3, alpha=0.0)(Bernoulli(logits=th))
    storch.add_cost(f3(z), "c")
    b = z._tensor.detach()
    storch.backward()
    f = f3(b)
    want = ((f - (f.sum() - f) / 2).unsqueeze(-1) * (b - torch.sigmoid(TH3))).mean(0)  # RLOO by hand
    torch.testing.assert_close(th.grad, want, rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # alpha learned online over 300 steps (a loop by nature), then 2 x 1000 steps
def test_double_cv_online_alpha_beats_the_full_taylor_term_and_is_homogeneous():
    # on this toy the relaxed cost's slope at the samples (+-1) is a poor linearization of the secant (about -0.2):
    # the variance-minimizing alpha is small, far better than alpha = 1 (measured 0.006 vs 0.056 per coordinate)
    torch.manual_seed(31)
    m = storch.method.DoubleCV("z", 2)
    grad_estimates(lambda: m, bernoulli, f3, TH3, 300)
    assert 0 < float(m.alpha) < 0.5
    learned = grad_estimates(lambda: storch.method.DoubleCV("z", 2, alpha=float(m.alpha)), bernoulli, f3, TH3, 1000)
    full = grad_estimates(lambda: storch.method.DoubleCV("z", 2, alpha=1.0), bernoulli, f3, TH3, 1000)
    assert_lower_variance(learned, full)
    torch.manual_seed(3)
    a = grad_estimates(lambda: storch.method.DoubleCV("z", 2, alpha=0.3), bernoulli, f3, TH3, 5)
    torch.manual_seed(3)
    b = grad_estimates(lambda: storch.method.DoubleCV("z", 2, alpha=0.3), bernoulli, f3, TH3, 5, scale=2.0)
    torch.testing.assert_close(b, 2 * a, rtol=1e-6, atol=1e-9)


def test_double_cv_bad_input():
    with pytest.raises(ValueError, match="n_samples >= 2"):
        storch.method.DoubleCV("z", 1)
    with pytest.raises(TypeError, match="alpha"):
        storch.method.DoubleCV("z", 2, alpha="auto")
    with pytest.raises(ValueError, match="decay"):
        storch.method.DoubleCV("z", 2, decay=1.0)
    with pytest.raises(ValueError, match="Bernoulli"):
        storch.method.DoubleCV("z", 2)(OneHotCategorical(logits=torch.zeros(3)))
    th = TH3.clone().requires_grad_()
    z = storch.method.DoubleCV("z", 2)(Bernoulli(logits=th))
    storch.add_cost((z.detach() > 0.5).float().sum(-1), "c")  # not differentiable in the sample
    with pytest.raises(ValueError, match="differentiable in the sample"):
        storch.backward()
    # nothing left behind
    z = storch.method.DoubleCV("z", 2)(Bernoulli(logits=th))
    storch.add_cost(f3(z), "c")
    storch.backward()
    assert th.grad is not None


# -- RODEO -----------------------------------------------------------------------------------------------------------
def _rodeo(alpha=0.0, beta=0.0, n=2):
    m = storch.method.RODEO("z", n)
    with torch.no_grad():
        m.alpha.fill_(alpha)
        m.beta.fill_(beta)
    return m


def test_rodeo_unbiased_with_an_untrained_control():
    # every control variate is the Stein operator applied to a function free of its sample: unbiased for any
    # alpha, beta and control network (here random, not trained)
    torch.manual_seed(40)
    m = _rodeo(0.7, 0.5, n=3)
    g = grad_estimates(lambda: m, bernoulli, f3, TH3, 1500, plate=True).detach()
    assert_unbiased(g, exact_grad(f3, TH3))


@pytest.mark.slow  # 600 training steps of the control (a loop by nature), then 2 x 1200 steps
def test_rodeo_trained_is_unbiased_and_below_rloo():
    # measured: after 1000 steps of training on the estimate's second moment, variance [0.0025, 0.0030, 0.0024]
    # against 2-sample RLOO's [0.0065, 0.0079, 0.0054] at the same 2 cost evaluations
    torch.manual_seed(41)
    m = storch.method.RODEO("z", 2)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(600):
        th = TH3.clone().requires_grad_()
        z = m(Bernoulli(logits=th))
        storch.add_cost(f3(z), "c")
        storch.backward()
        opt.step()
        opt.zero_grad()
    assert float(m.beta.detach()) != 0.0  # it trained
    g = grad_estimates(lambda: m, bernoulli, f3, TH3, 1200).detach()
    assert_unbiased(g, exact_grad(f3, TH3))
    rloo = grad_estimates(lambda: storch.method.ScoreFunction("z", n_samples=2, baseline_factory="batch_average"),
                          bernoulli, f3, TH3, 1200)
    assert_lower_variance(g, rloo)


def test_rodeo_matches_rloo_at_zero_and_bad_input():
    torch.manual_seed(42)
    th = TH3.clone().requires_grad_()
    z = _rodeo()(Bernoulli(logits=th))
    storch.add_cost(f3(z), "c")
    b = z._tensor.detach()
    storch.backward()
    f = f3(b)
    want = ((f - f.flip(0)).unsqueeze(-1) * (b - torch.sigmoid(TH3))).mean(0)  # RLOO at n = 2
    torch.testing.assert_close(th.grad.detach(), want, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="n_samples >= 2"):
        storch.method.RODEO("z", 1)
    with pytest.raises(TypeError, match="control must be a torch.nn.Module"):
        storch.method.RODEO("z", 2, control=lambda h, c: h)
    with pytest.raises(ValueError, match="Bernoulli"):
        storch.method.RODEO("z", 2)(OneHotCategorical(logits=torch.zeros(3)))
    z = storch.method.RODEO("z", 2)(Bernoulli(logits=th))
    storch.add_cost(z.detach().sum(-1), "c")
    with pytest.raises(ValueError, match="differentiable in the sample"):
        storch.backward()
    with pytest.raises(ValueError, match="control must return 2 values"):
        F.rodeo_surrogate(torch.zeros(3), torch.ones(2, 3), torch.zeros(2), torch.zeros(2, 3),
                          lambda h, c: h)
