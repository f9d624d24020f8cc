"""Plates: shapes, broadcasting, reductions, and the fail-quick errors."""
import pytest
import torch
from torch.distributions import Normal, OneHotCategorical

import fastgrad as storch


def _x(b=4, d=3):
    return storch.denote_independent(torch.arange(b * d, dtype=torch.float32).view(b, d), 0, "data")


def test_denote_independent_moves_dim_left():
    t = torch.randn(3, 5, 2)
    x = storch.denote_independent(t, 1, "data")
    assert x.shape == (5, 3, 2)
    assert [p.name for p in x.plates] == ["data"] and x.plates[0].n == 5
    assert torch.equal(x._tensor, t.transpose(0, 1))


@pytest.mark.parametrize("n", [1, 7])
def test_sample_adds_plate_on_left(n):
    x = _x()
    q = OneHotCategorical(logits=torch.zeros(3) + x)
    z = storch.method.ScoreFunction("z", n_samples=n)(q)
    assert z.shape == (n, 4, 3)
    assert [(p.name, p.n) for p in z.plates] == [("z", n), ("data", 4)]
    # code written for one sample works for n: left-broadcasting against the data plate
    y = z * x
    assert y.shape == (n, 4, 3) and [p.name for p in y.plates] == ["z", "data"]


def test_two_plates_broadcast():
    a = storch.denote_independent(torch.randn(4, 2), 0, "a")
    b = storch.denote_independent(torch.randn(5, 2), 0, "b")
    c = a + b
    assert [p.name for p in c.plates] == ["a", "b"]
    assert c.shape == (4, 5, 2)
    assert torch.allclose(c._tensor, a._tensor[:, None] + b._tensor[None])
    d = b + a  # other order of first appearance
    assert [p.name for p in d.plates] == ["b", "a"] and d.shape == (5, 4, 2)
    assert torch.allclose(d._tensor, c._tensor.transpose(0, 1))


def test_event_dims_right_aligned_plates_left_aligned():
    x = storch.denote_independent(torch.randn(4, 3), 0, "data")
    z = storch.denote_independent(torch.randn(6, 4, 2, 3), 0, "z")  # not actually sampled: just a plate
    w = storch.Tensor(z._tensor, (z.plates[0], x.plates[0]))
    out = w * x  # x: [data] event (3,), w: [z, data] event (2, 3)
    assert out.shape == (6, 4, 2, 3)
    assert torch.allclose(out._tensor, w._tensor * x._tensor[None, :, None, :])


def test_reduce_plates_and_variance_values():
    t = torch.tensor([[1.0, 2.0], [3.0, 5.0], [4.0, 9.0]])
    g = storch.denote_independent(t, 0, "g")
    m = storch.reduce_plates(g, "g")
    assert m.plates == () and torch.allclose(m._tensor, t.mean(0))
    v = storch.variance(g, "g")
    assert torch.allclose(v._tensor, ((t - t.mean(0)) ** 2).mean(0).sum())
    assert str(v).startswith("Deterministic tensor(") and str(v).endswith("Batch links: []")
    # nested plates: reduce_plates over all = mean over both
    u = storch.denote_independent(torch.randn(4, 3, 2), 0, "data")
    u = storch.denote_independent(u, 1, "h")  # plates [h, data]
    assert torch.allclose(storch.reduce_plates(u)._tensor, u._tensor.mean((0, 1)))


def test_gather_samples():
    x = _x()
    grads = [x * i for i in range(5)]
    g = storch.gather_samples(grads, "gradients")
    assert [p.name for p in g.plates] == ["gradients", "data"] and g.shape == (5, 4, 3)
    assert torch.allclose(g._tensor[3], 3 * x._tensor)
    mean = storch.reduce_plates(g, "gradients")
    assert torch.allclose(mean._tensor, 2 * x._tensor)
    var = storch.variance(g, "gradients")
    expect = ((torch.arange(5.0) - 2) ** 2).mean() * (x._tensor ** 2).sum(-1).mean()
    assert torch.allclose(var._tensor, expect)


SEED_MSG = ("Got an input tensor with too few dimensions. We expected 2 plate dimensions. Instead, we found only 0 "
            "dimensions. Violated at dimension 0")


def _seed_reconstruction():
    x = storch.denote_independent(torch.rand(8, 6), 0, "data")
    q = OneHotCategorical(probs=torch.full((8, 2, 3), 1 / 3) + 0 * x[..., :1, None])
    z = storch.method.ScoreFunction("z", n_samples=1)(q)
    rec = torch.sigmoid(z.reshape(z.shape[:-2] + (6,)))
    return x, rec


def test_fail_quick_bce_sum():
    x, rec = _seed_reconstruction()
    with pytest.raises(ValueError) as e:
        torch.nn.BCELoss(reduction="sum")(rec, x)
    assert str(e.value) == SEED_MSG


def test_fail_quick_mean_and_sum():
    x, rec = _seed_reconstruction()
    bce = torch.nn.BCELoss(reduction="none")(rec, x).sum(-1)
    with pytest.raises(ValueError, match="We expected 2 plate dimensions. Instead, we found only 0"):
        torch.mean(bce)
    x, rec = _seed_reconstruction()
    bce = torch.nn.BCELoss(reduction="none")(rec, x).sum(-1)
    with pytest.raises(ValueError, match="Violated at dimension 0"):
        bce.sum()
    x, rec = _seed_reconstruction()
    with pytest.raises(ValueError, match="Violated at dimension 1"):
        rec.sum((1, 2))  # removes the data plate: dims left (1,) < 2 plates


def test_error_clears_graph_state():
    x, rec = _seed_reconstruction()
    storch.add_cost(torch.nn.BCELoss(reduction="none")(rec, x).sum(-1), "rec")
    assert len(storch.costs()) == 1
    with pytest.raises(ValueError):
        torch.mean(rec)
    assert storch.costs() == [] and storch._state.samples == []


def test_user_exception_then_clean_step():
    """An exception between sampling and backward: after reset() the next step sees nothing stale."""
    x, rec = _seed_reconstruction()
    storch.add_cost(rec.sum(-1), "stale")
    try:
        raise RuntimeError("user code failed")
    except RuntimeError:
        storch.reset()
    x, rec = _seed_reconstruction()
    storch.add_cost(rec.sum(-1), "fresh")
    assert [c.name for c in storch.costs()] == ["fresh"]
    storch.backward()
    assert storch.costs() == []


def test_plate_name_reused_with_another_size():
    a = storch.denote_independent(torch.randn(4, 2), 0, "data")
    b = storch.denote_independent(torch.randn(5, 2), 0, "data")
    with pytest.raises(ValueError, match="plate_name 'data'"):
        a + b


def test_add_cost_errors():
    with pytest.raises(TypeError, match="cost must be"):
        storch.add_cost([1.0], "c")
    x = _x()
    with pytest.raises(ValueError, match="empty event shapes"):
        storch.add_cost(x, "c")  # still has an event dim of 3
    with pytest.raises(ValueError, match="name"):
        storch.add_cost(x.sum(-1), "")


def test_backward_without_cost():
    with pytest.raises(ValueError, match="No cost nodes registered"):
        storch.backward()
    with pytest.raises(RuntimeError):  # Storchastic raised RuntimeError: both work
        storch.backward()


def test_bool_of_plated_tensor_is_an_error():
    with pytest.raises(storch.IllegalStorchExposeError, match="convert storch tensors to boolean"):
        bool(_x().sum(-1) > 0)
    assert issubclass(storch.IllegalStorchExposeError, ValueError)


def test_distribution_validation_still_on():
    # fastgrad does not switch off torch.distributions argument validation
    x = _x()
    with pytest.raises(ValueError):
        Normal(x, -torch.ones(3), validate_args=True)
    # torch's default is __debug__; Storchastic sets it to False at import. Checked in a fresh process: torch's
    # own dynamo turns it off when torch.compile first runs (torch/_dynamo/eval_frame.py), as other tests do.
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", "import torch, fastgrad; "
                          "print(torch.distributions.Distribution._validate_args)"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "True"


def test_plate_tensors_inside_lists_and_keyword_lists():
    a = storch.denote_independent(torch.randn(4, 3), 0, "data")
    b = storch.denote_independent(torch.randn(4, 3), 0, "data")
    for out in (torch.cat(tensors=[a, b], dim=-1), torch.cat([a, b], -1)):
        assert out.plates == a.plates and tuple(out.shape) == (4, 6)
        torch.testing.assert_close(out._tensor, torch.cat([a._tensor, b._tensor], -1))
    s = torch.stack([a, b], dim=-1)
    assert s.plates == a.plates and tuple(s.shape) == (4, 3, 2)
