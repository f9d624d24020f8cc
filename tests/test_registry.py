"""Every registered op (``fastgrad.ops._registry.REGISTRY``), driven by the sample inputs it declares: each backend
against the op's reference over its dtypes, ``opcheck``, and bad inputs that must raise a clear error. An op declared
through ``_registry`` is reached by these tests without editing a list (the per-op files add what is particular to
each op: statistics of the samplers, gradcheck, the LM head's losses)."""
import pytest
import torch

import fastgrad
import fastgrad.ops  # noqa: F401  (registers every op)
from fastgrad.ops._registry import REGISTRY

from .conftest import DEVICE, available_backends

OPS = list(REGISTRY.values())
BACKENDS = available_backends(DEVICE)
TOL = {torch.float64: 1e-9, torch.float32: 5e-5, torch.bfloat16: 5e-2, torch.float16: 5e-3}


def _backends(op):
    # a kernel op: each backend with a kernel (the reference is the oracle); a driver: every backend (it picks the
    # backend of the kernels it calls)
    return [b for b in BACKENDS if b in op.kernels] if op.kernels else list(BACKENDS)


def _cases():
    return [pytest.param(op, b, d, id=f"{op.name}-{b}-{str(d)[6:]}") for op in OPS for b in _backends(op)
            for d in op.dtypes]


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def test_every_op_declares_what_the_generic_tests_need():
    assert {"categorical_sample", "gumbel_softmax", "score_surrogate", "enumerate_log_probs", "gumbel_topk",
            "linear_log_prob", "linear_policy_loss"} <= set(REGISTRY)
    for op in OPS:
        assert op.sample_inputs is not None, f"{op.name} declares no sample_inputs"
        assert len(op.sample_inputs(torch.device("cpu"), torch.float32)) >= 2, op.name
        assert op.reference is not None and op.fake is not None and op.op is not None, op.name
    assert fastgrad.ops.OPS == tuple(REGISTRY)


@pytest.mark.parametrize("op, backend, dtype", _cases())
def test_matches_reference(op, backend, dtype):
    for label, args in op.sample_inputs(torch.device(DEVICE), dtype):
        ref = _as_tuple(op.reference(*args))
        with fastgrad.backend(backend):
            out = _as_tuple(op.op(*args))
        assert len(out) == len(ref), (op.name, label)
        for i, (o, r) in enumerate(zip(out, ref)):
            assert o.shape == r.shape and o.dtype == r.dtype, (op.name, label, i, o.shape, r.shape, o.dtype, r.dtype)
            if o.is_floating_point():
                tol = TOL[dtype] * max(1.0, float(r.abs().max())) if r.numel() else 0.0
                torch.testing.assert_close(o, r, atol=tol, rtol=TOL[dtype], msg=lambda m: f"{op.name} {label} "
                                           f"output {i}: {m}")
            else:
                assert torch.equal(o, r), (op.name, label, i)


def _with_grad(op, args):
    if not op.differentiable:
        return args
    return tuple(a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                 and a.numel() else a for a in args)


@pytest.mark.parametrize("op", OPS, ids=[op.name for op in OPS])
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(op, backend):
    if op.kernels and backend not in op.kernels and backend != "reference":
        pytest.skip(f"{op.name} has no {backend} kernel")  # not a silent pass: no such combination exists
    samples = op.sample_inputs(torch.device(DEVICE), torch.float32)
    with fastgrad.backend(backend):
        for label, args in samples[:2]:
            torch.library.opcheck(op.op, _with_grad(op, args))


def _first_tensor(args):
    return next(i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point())


def _bad_variants(args):
    """The first floating tensor argument made invalid in the ways every op must refuse."""
    i = _first_tensor(args)
    x = args[i]
    nan = x.clone()
    nan.view(-1)[-1] = float("nan")
    yield "NaN", args[:i] + (nan,) + args[i + 1:]
    yield "int64", args[:i] + (x.to(torch.int64),) + args[i + 1:]
    if x.dim() >= 2 and x.shape[0] > 1 and x.shape[-1] > 1:
        yield "non-contiguous", args[:i] + (x.transpose(0, -1).contiguous().transpose(0, -1),) + args[i + 1:]
    yield "complex", args[:i] + (x.to(torch.complex64),) + args[i + 1:]


@pytest.mark.parametrize("op", OPS, ids=[op.name for op in OPS])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise_clear_errors(op, backend):
    # the largest non-empty sample (NaN in the last element: in a later block where there are several)
    samples = [s for s in op.sample_inputs(torch.device(DEVICE), torch.float32)
               if op.name in ("linear_log_prob", "linear_policy_loss") or s[1][_first_tensor(s[1])].numel()]
    _, args = max(samples, key=lambda s: s[1][_first_tensor(s[1])].numel())
    with fastgrad.backend(backend):
        for what, bad in _bad_variants(args):
            with pytest.raises((ValueError, TypeError)) as e:
                op.op(*bad)
            assert str(e.value), (op.name, what)
