"""Storchastic calls beyond the tutorial, as Storchastic users write them, after ``import fastgrad as storch``."""
import pytest
import torch
import torch.nn.functional as TF
from torch.distributions import Bernoulli, Independent, Normal, OneHotCategorical

import fastgrad as storch


def _data(n=4, d=3):
    return storch.denote_independent(torch.linspace(0.1, 0.9, n * d).view(n, d), 0, "data")


def test_tensor_and_plate_constructors_in_storchastic_form():
    plate = storch.Plate("data", 4, [])
    t = storch.Tensor(torch.ones(4, 3), [], [plate], "x")
    assert t.plates == (plate,) and t.name == "x" and t.event_shape == (3,)
    c = storch.CostTensor(torch.ones(4), [t], [plate], "c")
    assert c.is_cost and c.plates == (plate,)
    # fastgrad's own form still works
    assert storch.Tensor(torch.ones(4, 3), [plate]).plates == (plate,)
    assert storch.Tensor(torch.ones(4, 3), (plate,), "y").name == "y"
    with pytest.raises(TypeError, match="not other storch.Tensors"):
        storch.Tensor(t, [], [plate])
    with pytest.raises(ValueError, match="surrounding plates"):
        storch.Tensor(torch.ones(5, 3), [], [plate])
    with pytest.raises(TypeError, match="list or tuple of Plates"):
        storch.Tensor(torch.ones(4), [], ["data"])
    w = storch.Tensor(torch.full((4,), 0.25), [], [plate])
    assert storch.Plate("data", 4, [], w).weight is w


def test_illegal_expose_errors_where_storchastic_raises_them():
    x = _data()
    assert storch.exceptions.IllegalStorchExposeError is storch.IllegalStorchExposeError
    for expose in (lambda: bool(x), lambda: x == x and 1, lambda: range(x[:, 0].long()), lambda: float(x),
                   lambda: int(x), lambda: x.item(), lambda: x.numpy(), lambda: x.tolist(), lambda: 1.0 in x,
                   lambda: torch.allclose(x, x), lambda: torch.equal(x, x)):
        with pytest.raises(storch.exceptions.IllegalStorchExposeError):
            expose()
    # values without plates are safe to expose as numbers, never as booleans (Python control flow on a value hides
    # the dependence from the graph), as Storchastic's test_tensor.py::test_bool asks of a plate-less tensor
    r = storch.reduce_plates(x.sum(-1))
    assert isinstance(float(r), float) and float(r) > 0
    a = storch.Tensor(torch.tensor([0.1, 0.2, 0.3, 0.4]), [], [], "test")
    for t in (r > 0, a):
        with pytest.raises(storch.IllegalStorchExposeError):
            if t[0] < 0.3 if t.dim() else t:
                pass


def test_is_tensor_and_method_sample():
    x = _data()
    assert storch.is_tensor(x) and storch.is_tensor(torch.ones(1)) and not storch.is_tensor(1.0)
    m = storch.method.ScoreFunction("z", n_samples=2)
    z = m.sample(Bernoulli(probs=x))
    assert isinstance(z, storch.StochasticTensor) and z.shape == (2, 4, 3)
    storch.reset()


def test_reducers_by_event_dim_and_plate_name():
    x = _data()
    s = storch.sum(x, -1)
    assert s.plates == x.plates and torch.equal(s._tensor, x._tensor.sum(-1))
    m = storch.mean(x, ["data", -1])
    assert m.plates == () and torch.allclose(m._tensor, x._tensor.mean())
    l = storch.logsumexp(x, "data")
    assert l.plates == () and torch.allclose(l._tensor, torch.logsumexp(x._tensor, 0))
    with pytest.raises(ValueError, match="event dimensions"):
        storch.sum(x, 0)  # dim 0 is the data plate: name it


def test_cat_gather_grad_and_wrappers():
    x = _data()
    y = storch.denote_independent(torch.ones(4, 2), 0, "data")
    c = storch.cat([x, y], -1)
    assert c.plates == x.plates and c.shape == (4, 5)
    idx = storch.denote_independent(torch.zeros(4, 1, dtype=torch.long), 0, "data")
    g = storch.gather(x, -1, idx)
    assert g.shape == (4, 1) and torch.equal(g._tensor, x._tensor[:, :1])

    @storch.deterministic
    def double(a, b):
        return a * 2 + b

    d = double(x, y[:, :1])
    assert isinstance(d, storch.Tensor) and d.plates == x.plates

    summed = storch.reduce(lambda t: t.sum(0), plates="data")(x)
    assert summed.plates == () and torch.allclose(summed._tensor, x._tensor.sum(0))
    with storch.ignore_wrapping():
        assert torch.is_tensor(torch.ones(1) + 1)

    p = torch.full((4, 3), 0.5, requires_grad=True)
    xp = storch.denote_independent(p, 0, "data")
    (gp,) = storch.grad([storch.reduce_plates((xp ** 2).sum(-1))], [xp])
    assert gp.plates == xp.plates and torch.allclose(gp._tensor, 2 * p / 4)


def test_b_binary_cross_entropy():
    x = _data()
    t = storch.denote_independent(torch.full((4, 3), 0.5), 0, "data")
    per_datum = storch.nn.b_binary_cross_entropy(x, t, reduction="sum")
    assert per_datum.plates == x.plates
    torch.testing.assert_close(per_datum._tensor, TF.binary_cross_entropy(x._tensor, t._tensor,
                                                                          reduction="none").sum(-1))
    total = storch.nn.b_binary_cross_entropy(x, t, dims="data", reduction="mean")
    assert total.plates == ()


def test_independent_distributions():
    p = torch.full((4, 3), 0.3, requires_grad=True)
    x = storch.denote_independent(p, 0, "data")
    grads = []
    for wrap in (False, True):
        d = Bernoulli(probs=x)
        z = storch.method.Expect("z")(Independent(d, 1) if wrap else d)
        storch.add_cost(((z - 0.6) ** 2).sum(-1), "c")
        storch.backward()
        grads.append(z.param_grads["probs"]._tensor)
    torch.testing.assert_close(grads[0], grads[1])
    mu = storch.denote_independent(torch.zeros(4, 3, requires_grad=True), 0, "data")
    z = storch.method.Reparameterization("z", n_samples=2)(Independent(Normal(mu, 1.0), 1))
    assert z.shape == (2, 4, 3)
    storch.reset()
    q = OneHotCategorical(logits=torch.zeros(4, 2, 5))
    z = storch.method.ScoreFunction("z", n_samples=3)(Independent(q, 1))
    assert z.shape == (3, 4, 2, 5)
    storch.reset()


def test_surrogate_loss_and_print_graph(capsys):
    p = torch.full((4, 3), 0.3, requires_grad=True)
    z = storch.method.ScoreFunction("z", n_samples=2)(Bernoulli(probs=_data()))
    storch.add_cost(z.sum(-1), "c")
    storch.print_graph()
    out = capsys.readouterr().out
    assert "sample z: ScoreFunction" in out and "cost c" in out
    sl = storch.surrogate_loss()
    assert isinstance(sl, storch.Tensor) and sl.plates == ()
    del p
    storch.reset()
