"""The ops' input contract (fastgrad/ops/_checks.py) and the functional layer's checks.

Every backend refuses the same bad input with the same exception and message before any result; values the
kernels used to get wrong (float64 precision, a NaN hidden in a masked block, tiny temperatures) are right.
"""
import math

import pytest
import torch

import fastgrad
import fastgrad.functional as F

from .conftest import DEVICE, available_backends

BACKENDS = available_backends(DEVICE)
ops = torch.ops.fastgrad
NAN, INF = float("nan"), float("inf")


def _i64(*shape, fill=0):
    return torch.full(shape, fill, dtype=torch.int64)


# name -> a call of a registered op with one bad argument (each must be refused on every backend)
BAD_OP_CALLS = {
    "sample non-contiguous": lambda: ops.categorical_sample(torch.zeros(3, 4).t(), 2, 0, 0, False),
    "sample 1-D": lambda: ops.categorical_sample(torch.zeros(4), 2, 0, 0, False),
    "sample int logits": lambda: ops.categorical_sample(torch.zeros(2, 4, dtype=torch.int64), 2, 0, 0, False),
    "sample K=0": lambda: ops.categorical_sample(torch.zeros(2, 0), 2, 0, 0, True),
    "sample n=0": lambda: ops.categorical_sample(torch.zeros(2, 3), 0, 0, 0, False),
    "sample NaN row": lambda: ops.categorical_sample(torch.tensor([[0.0, NAN]]), 2, 0, 0, False),
    "sample masked row": lambda: ops.categorical_sample(torch.full((1, 3), -INF), 2, 0, 0, False),
    "sample negative seed": lambda: ops.categorical_sample(torch.zeros(2, 3), 2, -1, 0, False),
    "gumbel tau=0": lambda: ops.gumbel_softmax(torch.zeros(2, 3), 1, 0.0, False, 0, 0),
    "gumbel tau overflows float32": lambda: ops.gumbel_softmax(torch.zeros(2, 3), 1, 1e-39, False, 0, 0),
    "gumbel NaN row": lambda: ops.gumbel_softmax(torch.tensor([[0.0, NAN]]), 1, 1.0, True, 0, 0),
    "gumbel non-contiguous": lambda: ops.gumbel_softmax(torch.zeros(3, 4).t(), 1, 1.0, False, 0, 0),
    "gumbel backward grad shape": lambda: ops.gumbel_softmax_backward(torch.zeros(2, 3, 5), torch.zeros(3, 4), 1.0,
                                                                      0, 0),
    "gumbel backward grad dtype": lambda: ops.gumbel_softmax_backward(torch.zeros(2, 3, 4, dtype=torch.float64),
                                                                      torch.zeros(3, 4), 1.0, 0, 0),
    "surrogate index >= K": lambda: ops.score_surrogate(torch.zeros(2, 3), _i64(1, 2, fill=3), torch.ones(1, 2)),
    "surrogate index < 0": lambda: ops.score_surrogate(torch.zeros(2, 3), _i64(1, 2, fill=-1), torch.ones(1, 2)),
    "surrogate index rows": lambda: ops.score_surrogate(torch.zeros(2, 3), _i64(1, 5), torch.ones(1, 5)),
    "surrogate weight float16": lambda: ops.score_surrogate(torch.zeros(2, 3), _i64(1, 2),
                                                            torch.ones(1, 2, dtype=torch.float16)),
    "surrogate weight shape": lambda: ops.score_surrogate(torch.zeros(2, 3), _i64(1, 2), torch.ones(2, 2)),
    "surrogate int32 index": lambda: ops.score_surrogate(torch.zeros(2, 3), torch.zeros(1, 2, dtype=torch.int32),
                                                         torch.ones(1, 2)),
    "surrogate non-contiguous": lambda: ops.score_surrogate(torch.zeros(3, 2).t(), _i64(1, 2), torch.ones(1, 2)),
    "surrogate NaN in a later block": lambda: ops.score_surrogate(
        torch.cat([torch.randn(1, 1024), torch.tensor([[NAN]])], 1), _i64(1, 1), torch.ones(1, 1)),
    "surrogate backward grad shape": lambda: ops.score_surrogate_backward(
        torch.ones(2, 2), torch.zeros(2, 3), _i64(1, 2), torch.ones(1, 2), torch.zeros(2)),
    "surrogate backward index >= K": lambda: ops.score_surrogate_backward(
        torch.ones(1, 2), torch.zeros(2, 3), _i64(1, 2, fill=7), torch.ones(1, 2), torch.zeros(2)),
    "enumerate K**k overflows": lambda: ops.enumerate_log_probs(torch.zeros(1, 64, 2)),
    "enumerate NaN": lambda: ops.enumerate_log_probs(torch.tensor([[[0.0, NAN]]])),
    "enumerate 2-D": lambda: ops.enumerate_log_probs(torch.zeros(2, 3)),
    "enumerate backward grad rows": lambda: ops.enumerate_log_probs_backward(torch.zeros(3, 2), torch.zeros(2, 1, 2)),
}


@pytest.mark.parametrize("case", sorted(BAD_OP_CALLS))
def test_every_backend_refuses_bad_op_input_the_same_way(case):
    seen = {}
    for b in BACKENDS:
        with fastgrad.backend(b):
            with pytest.raises((ValueError, TypeError)) as info:
                BAD_OP_CALLS[case]()
        seen[b] = (type(info.value), str(info.value).split("\n")[0])
    assert len(set(seen.values())) == 1, seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_logits_are_sampled_at_float64_precision(backend):
    # softmax([1e7, 1e7 + 0.5]) = [0.3775, 0.6225]; at float32 both logits round to one value (mean 0.5)
    l = torch.tensor([[1e7, 1e7 + 0.5]], dtype=torch.float64)
    p1 = 1 / (1 + math.exp(-0.5))
    interpreted = backend == "triton" and DEVICE == "cpu"
    n = 5000 if interpreted else 20000  # the float32 answer 0.5 is 18 standard errors away at 5000
    se = math.sqrt(p1 * (1 - p1) / n)
    # Gumbel-max: one Triton program per draw, too many for the CPU interpreter at n = 20000 (at 2000 the
    # float32 answer 0.5 is still 11 standard errors away)
    n_hard = 2000 if interpreted else n
    with fastgrad.backend(backend):
        draws = F.sample_categorical(l, n, seed=1).double().mean().item()
        hard = F.gumbel_softmax(l, 1.0, n_hard, hard=True, seed=2)[..., 1].mean().item()
    assert abs(draws - p1) < 4.5 * se, draws
    assert abs(hard - p1) < 4.5 * math.sqrt(p1 * (1 - p1) / n_hard), hard


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_alone_in_a_later_block_is_found(backend):
    l = torch.randn(2, 1025)
    l[1, 1024] = NAN
    with fastgrad.backend(backend):
        with pytest.raises(ValueError, match="NaN"):
            F.score_function_surrogate(l, _i64(1, 2), torch.ones(1, 2))
        with pytest.raises(ValueError, match="NaN"):
            F.categorical_log_prob(l, _i64(1, 2))


def test_learned_temperature_gets_its_gradient():
    l = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    y = F.gumbel_softmax(l, tau, 3, seed=9)
    w = torch.linspace(-1, 1, 4, dtype=torch.float64)
    (y * w).sum().backward()
    # the same samples as the fused op with a float temperature
    torch.testing.assert_close(y.detach(), F.gumbel_softmax(l.detach(), 0.7, 3, seed=9), rtol=1e-12, atol=1e-12)
    # d/dtau by central differences on the same noise
    h = 1e-6
    fp = (F.gumbel_softmax(l.detach(), 0.7 + h, 3, seed=9) * w).sum()
    fm = (F.gumbel_softmax(l.detach(), 0.7 - h, 3, seed=9) * w).sum()
    assert tau.grad is not None
    assert abs(float(tau.grad) - float(fp - fm) / (2 * h)) < 1e-6
    # the logits' gradient equals the fused backward's
    g_fused = torch.autograd.grad((F.gumbel_softmax(l, 0.7, 3, seed=9) * w).sum(), l)[0]
    torch.testing.assert_close(l.grad, g_fused, rtol=1e-10, atol=1e-12)
    # straight-through with a learned temperature: one-hot forward, soft gradient
    y = F.gumbel_softmax(l, tau, 3, hard=True, seed=9)
    assert set(y.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.autograd.grad((y * w).sum(), tau)[0] != 0


def test_temperature_checks():
    with pytest.raises(ValueError, match="tau must be at least"):
        F.gumbel_softmax(torch.zeros(2, 3), 1e-39)
    F.gumbel_softmax(torch.zeros(2, 3, dtype=torch.float64), 1e-39)  # finite 1/tau in float64
    with pytest.raises(TypeError, match="one-element"):
        F.gumbel_softmax(torch.zeros(2, 3), torch.ones(2))
    with pytest.raises(ValueError, match="tau must be at least"):
        F.gumbel_softmax(torch.zeros(2, 3), torch.tensor(1e-39, requires_grad=True))
    with pytest.raises(TypeError, match="tau"):
        F.gumbel_softmax(torch.zeros(2, 3), "1")


def test_costs_and_shapes_get_clear_errors():
    l = torch.zeros(2, 3)
    idx = _i64(4, 2)
    for bad in (NAN, INF):
        with pytest.raises(ValueError, match="cost must be finite"):
            F.score_function_surrogate(l, idx, torch.full((4, 2), bad))
        with pytest.raises(ValueError, match="cost must be finite"):
            F.expectation(torch.zeros(2, 1, 3), torch.full((3, 2), bad))
        with pytest.raises(ValueError, match="baseline must be finite"):
            F.score_function_surrogate(l, idx, torch.ones(4, 2), baseline=torch.full((4, 2), bad))
    with pytest.raises(TypeError, match="cost must be a real tensor"):
        F.score_function_surrogate(l, idx, torch.ones(4, 2, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"cost of shape \(3,\) does not broadcast"):
        F.score_function_surrogate(l, idx, torch.ones(3))
    with pytest.raises(ValueError, match=r"baseline of shape \(3,\) does not broadcast"):
        F.score_function_surrogate(l, idx, torch.ones(4, 2), baseline=torch.ones(3))
    with pytest.raises(ValueError, match="samples must have shape"):
        F.score_function_surrogate(l, torch.tensor(1), torch.ones(()))
    with pytest.raises(ValueError, match="dim must index"):
        F.batch_average_baseline(torch.ones(4, 2), dim=5)
    with pytest.raises(ValueError, match="cost of shape"):
        F.score_function_surrogate_from_log_prob(torch.zeros(4, 2), torch.ones(3, 5))
    with pytest.raises(ValueError, match="budget must be a positive int"):
        F.enumerate_log_probs(torch.zeros(1, 1, 2), budget=0)


def test_meta_tensors_give_shapes():
    m = torch.empty(4, 3, device="meta")
    out = F.score_function_surrogate(m, torch.empty(2, 4, dtype=torch.int64, device="meta"),
                                     torch.empty(2, 4, device="meta"))
    assert out.shape == (2, 4) and out.device.type == "meta"
    assert F.sample_categorical(m, 5).shape == (5, 4)
    assert F.gumbel_softmax(m, 0.5, 2).shape == (2, 4, 3)
    assert F.enumerate_log_probs(torch.empty(2, 2, 3, device="meta")).shape == (9, 2)


def test_default_budgets_agree():
    import inspect

    assert inspect.signature(F.enumerate_log_probs).parameters["budget"].default == \
        inspect.signature(fastgrad.method.Expect).parameters["budget"].default == 10000
