"""The original ops' own tests beyond the registry harness (tests/test_registry.py runs every backend of every
registered op on its sample inputs against the reference, opcheck and bad inputs): their backward ops against the
reference, float64 gradcheck, the samplers' statistics, torch.compile, the eager entries, the CPU output cache."""
import math
import os

import pytest
import torch

import fastgrad
import fastgrad.functional as F
from fastgrad.ops import _philox
from fastgrad.ops import categorical_sample as cs
from fastgrad.ops import enumerate_log_probs as el
from fastgrad.ops import gumbel_softmax as gs
from fastgrad.ops import score_surrogate as ss

from .conftest import DEVICE, available_backends

BACKENDS = available_backends(DEVICE)
# Statistical tests need millions of draws: too many programs for the Triton interpreter. There, the Triton
# kernels are held to the reference sample for sample (tests above), which carries these properties over.
STAT_BACKENDS = [b for b in BACKENDS if not (b == "triton" and not torch.cuda.is_available())]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
SHAPES = [
    (1, 1),  # K=1: the only category
    (3, 2),  # K=2
    (37, 11),  # odd sizes
    (0, 5),  # empty batch
    (2, 2**17 + 3),  # vocabulary-scale row, not a multiple of any block size
]


# The Triton interpreter (CPU tensors) runs one program at a time in numpy: there, the vocabulary-scale row is
# replaced by a smaller one that still spans several blocks. On a GPU every backend gets every shape.
CPU_TENSORS = DEVICE == "cpu"


# The reference is the oracle of the *_matches_reference tests, so they run the other backends (the reference
# itself is held to independent float64 formulas in tests/_fuzz.py).
KERNEL_BACKENDS = [b for b in BACKENDS if b != "reference"]


def _cases(shapes, big=(2, 2**17 + 3), small=(2, 4099)):
    out = []
    for b in KERNEL_BACKENDS:
        for s in shapes:
            s = small if (b == "triton" and CPU_TENSORS and s == big) else s
            if (b,) + s not in out:
                out.append((b,) + s)
    return out


def _logits(R, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(R, K, generator=g) * 2).to(dtype)


def test_philox_known_answer():
    # Random123 known-answer test: key 0, counter 0
    w = _philox.philox4x32(0, torch.tensor([0]))[0].tolist()
    assert w == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    u = _philox.uniform(1, 0, 10_000)
    assert (u > 0).all() and (u < 1).all()


@pytest.mark.parametrize("backend,R,K", _cases(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 5])
def test_categorical_sample_matches_reference(backend, dtype, R, K, n):
    l = _logits(R, K, dtype)
    ref_i, ref_oh = cs.reference(l, n, 1234, 5, True)
    with fastgrad.backend(backend):
        i, oh = cs.categorical_sample(l, n, 1234, 5, True)
    mism = (i != ref_i).sum().item()
    # only near-ties of the CDF (float rounding) may differ: at most 1 draw in 10^5 (none in smaller tests)
    assert mism <= int(1e-5 * i.numel()), mism
    assert oh.dtype == dtype and oh.shape == (n, R, K)
    assert torch.equal(oh, torch.nn.functional.one_hot(i, K).to(dtype))


@pytest.mark.parametrize("backend,R,K", _cases(SHAPES[:4] + [(2, 4099)]))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hard", [False, True])
def test_gumbel_softmax_matches_reference(backend, dtype, R, K, hard):
    l = _logits(R, K, dtype, 1)
    ref = gs.reference(l, 3, 0.6, hard, 99, 2)
    with fastgrad.backend(backend):
        out = gs.gumbel_softmax(l, 3, 0.6, hard, 99, 2)
    tol = max(TOL[dtype], 2e-6) * 10  # noise and softmax are computed in float32 for every dtype
    if hard:
        assert (out != ref).any(-1).sum().item() <= 1e-5 * max(1, out.shape[0] * R)
    else:
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    g = torch.randn(3, R, K, generator=torch.Generator().manual_seed(3)).to(dtype)
    with fastgrad.backend(backend):
        gl = gs.gumbel_softmax_backward(g, l, 0.6, 99, 2)
    torch.testing.assert_close(gl, gs.reference_backward(g, l, 0.6, 99, 2), atol=tol, rtol=tol)


@pytest.mark.parametrize("backend,R,K", _cases(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_score_surrogate_matches_reference(backend, dtype, R, K):
    l = _logits(R, K, dtype, 2)
    g = torch.Generator().manual_seed(4)
    n = 4
    idx = torch.randint(0, K, (n, R), generator=g)
    wdt = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.randn(n, R, generator=g, dtype=wdt)
    ref_out, ref_lse = ss.reference(l, idx, w)
    with fastgrad.backend(backend):
        out, lse = ss.score_surrogate(l, idx, w)
    tol = max(TOL[dtype], 1e-5) * math.log(K + 1) * 4
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse, atol=tol, rtol=tol)
    go = torch.randn(n, R, generator=g, dtype=wdt)
    with fastgrad.backend(backend):
        gl = ss.score_surrogate_backward(go, l, idx, w, lse)
    torch.testing.assert_close(gl, ss.reference_backward(go, l, idx, w, ref_lse), atol=TOL[dtype] * 4,
                               rtol=TOL[dtype] * 4)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,k,K", [(1, 1, 1), (5, 2, 10), (0, 2, 3), (3, 3, 4), (7, 1, 2)])
def test_enumerate_matches_reference(backend, dtype, B, k, K):
    l = torch.randn(B, k, K, generator=torch.Generator().manual_seed(5)).to(dtype)
    ref = el.reference(l)
    with fastgrad.backend(backend):
        out = el.enumerate_log_probs(l)
    torch.testing.assert_close(out, ref, atol=TOL[dtype] * 10, rtol=TOL[dtype] * 10)
    g = torch.randn(K**k, B, generator=torch.Generator().manual_seed(6)).to(dtype)
    with fastgrad.backend(backend):
        gl = el.enumerate_log_probs_backward(g, l)
    torch.testing.assert_close(gl, el.reference_backward(g, l), atol=TOL[dtype] * 10, rtol=TOL[dtype] * 10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    fast = backend == "triton" and CPU_TENSORS  # random-projection gradcheck: fewer interpreted launches
    with fastgrad.backend(backend):
        # the registered ops and the eager entries fastgrad.functional calls
        for gumbel, surrogate, enumerate_ in ((gs.gumbel_softmax, ss.score_surrogate, el.enumerate_log_probs),
                                              (gs.eager, ss.eager, el.eager)):
            l = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
            torch.autograd.gradcheck(lambda x: gumbel(x, 2, 0.8, False, 7, 1), (l,), fast_mode=fast)
            idx = torch.randint(0, 6, (3, 4))
            w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
            torch.autograd.gradcheck(lambda x, ww: surrogate(x, idx, ww)[0], (l, w), fast_mode=fast)
            l3 = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
            torch.autograd.gradcheck(enumerate_, (l3,), fast_mode=fast)


def test_same_seed_same_samples_across_calls_and_backends():
    torch.manual_seed(0)  # inputs independent of the tests before
    l = torch.randn(50, 9)
    outs = []
    for b in BACKENDS:
        with fastgrad.backend(b):
            outs.append(F.sample_categorical(l, 8, seed=42, offset=3))
            outs.append(F.sample_categorical(l, 8, seed=42, offset=3))
    for o in outs[1:]:
        assert (o != outs[0]).float().mean() <= 1e-5
    assert not torch.equal(F.sample_categorical(l, 8, seed=43, offset=3), outs[0])
    assert not torch.equal(F.sample_categorical(l, 8, seed=42, offset=4), outs[0])
    torch.manual_seed(0)
    a = F.sample_categorical(l, 8)
    torch.manual_seed(0)
    assert torch.equal(F.sample_categorical(l, 8), a)


@pytest.mark.parametrize("backend", STAT_BACKENDS)
def test_sampler_goodness_of_fit(backend):
    """10^6 draws: chi-square against the probabilities, zero-probability categories never drawn."""
    scipy = pytest.importorskip("scipy.stats")
    logits = torch.tensor([[0.0, 1.0, -float("inf"), -2.0, 0.5, -float("inf"), 2.0, -0.3, 1.2, -1.0, 0.1]])
    p = torch.softmax(logits, -1)[0].double()
    with fastgrad.backend(backend):
        idx = F.sample_categorical(logits.expand(1000, -1), 1000, seed=7)
    counts = torch.bincount(idx.reshape(-1), minlength=11).double()
    assert counts[2] == 0 and counts[5] == 0
    nz = p > 0
    expected = p[nz] * idx.numel()
    chi2 = (((counts[nz] - expected) ** 2) / expected).sum().item()
    pval = scipy.chi2.sf(chi2, int(nz.sum()) - 1)
    assert pval > 1e-3, (chi2, pval)


@pytest.mark.parametrize("backend", STAT_BACKENDS)
def test_gumbel_max_hard_is_exact_sampler(backend):
    """hard Gumbel-softmax forward = Gumbel-max: distribution equals softmax(logits)."""
    logits = torch.tensor([0.3, -1.0, 2.0, 0.0])
    rows, n = 2000, 100
    with fastgrad.backend(backend):
        y = F.gumbel_softmax(logits.expand(rows, -1), tau=0.5, n=n, hard=True, seed=3)
    freq = y.reshape(-1, 4).mean(0).double()
    p = torch.softmax(logits, -1).double()
    se = (p * (1 - p) / (rows * n)).sqrt()
    assert ((freq - p).abs() < 4 * se).all()


def test_compile_fullgraph():
    l = torch.randn(6, 5, requires_grad=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss(l, idx, cost):
        y = torch.ops.fastgrad.gumbel_softmax(l, 2, 0.5, False, 3, 0)
        s, _ = torch.ops.fastgrad.score_surrogate(l, idx, cost)
        e = torch.ops.fastgrad.enumerate_log_probs(l.view(6, 1, 5))
        return y.sum() + s.sum() + e.exp().sum()

    idx = torch.randint(0, 5, (2, 6))
    cost = torch.randn(2, 6)
    out = loss(l, idx, cost)
    out.backward()
    # the compiled graph computes what eager does, values and gradients
    l2 = l.detach().clone().requires_grad_()
    eager = loss.__wrapped__(l2, idx, cost) if hasattr(loss, "__wrapped__") else None
    if eager is None:  # torch.compile's wrapper keeps the function as _torchdynamo_orig_callable
        eager = loss._torchdynamo_orig_callable(l2, idx, cost)
    eager.backward()
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(l.grad, l2.grad, rtol=1e-6, atol=1e-6)


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="NaN"):
        F.sample_categorical(torch.tensor([[0.0, float("nan")]]), 2)
    with pytest.raises(ValueError, match="NaN"):
        F.gumbel_softmax(torch.tensor([[0.0, float("inf")]]), 1.0)
    with pytest.raises(ValueError, match="finite entry"):
        F.sample_categorical(torch.full((2, 3), -float("inf")), 2)
    with pytest.raises(ValueError, match="tau"):
        F.gumbel_softmax(torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match="tau"):
        F.gumbel_softmax(torch.zeros(2, 3), -1.0)
    with pytest.raises(TypeError, match="logits must be a floating"):
        F.sample_categorical(torch.zeros(2, 3, dtype=torch.int64), 2)
    with pytest.raises(TypeError, match="n must be an int"):
        F.sample_categorical(torch.zeros(2, 3), 2.5)
    with pytest.raises(ValueError, match="n must be >= 1"):
        F.gumbel_softmax(torch.zeros(2, 3), 1.0, n=0)
    with pytest.raises(ValueError, match="samples must have shape"):
        F.score_function_surrogate(torch.zeros(2, 3), torch.zeros(4, 5, dtype=torch.int64), torch.zeros(4, 5))
    with pytest.raises(ValueError, match=r"samples must lie in \[0, 3\)"):
        F.score_function_surrogate(torch.zeros(2, 3), torch.full((4, 2), 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="budget"):
        F.enumerate_log_probs(torch.zeros(1, 8, 10), budget=1000)
    with pytest.raises(ValueError, match="baseline"):
        F.score_function_surrogate(torch.zeros(2, 3), torch.zeros(4, 2, dtype=torch.int64), torch.zeros(4, 2),
                                   baseline="avg")
    with pytest.raises(ValueError, match="backend"):
        fastgrad.set_backend("fortran")
    assert fastgrad.get_backend() == "auto"


@pytest.mark.parametrize("backend", BACKENDS)
def test_surrogate_rejects_nonfinite_rows_from_its_logsumexp(backend):
    """The surrogate checks finiteness from the op's per-row logsumexp (no extra pass over the logits):
    NaN, +inf and a row without a finite entry are errors; -inf entries (masked categories) are fine, also
    when a whole leading chunk of the row is masked (the online logsumexp skips it)."""
    K = 3000
    idx = torch.zeros(1, 2, dtype=torch.int64)
    cost = torch.ones(1, 2)
    with fastgrad.backend(backend):
        for bad in (float("nan"), float("inf")):
            l = torch.randn(2, K)
            l[1, 2500] = bad
            with pytest.raises(ValueError, match="NaN or \\+inf"):
                F.score_function_surrogate(l, idx, cost)
        with pytest.raises(ValueError, match="finite entry"):
            F.score_function_surrogate(torch.full((2, K), -float("inf")), idx, cost)
        l = torch.randn(2, K)
        l[:, :2048] = -float("inf")
        ok_idx = torch.full((1, 2), 2900)
        out = F.score_function_surrogate(l, ok_idx, cost)
        expect = torch.log_softmax(l, -1)[:, 2900]
        torch.testing.assert_close(out[0], expect, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="NaN or \\+inf"):
            F.categorical_log_prob(torch.tensor([[0.0, float("nan")]]), torch.zeros(1, 1, dtype=torch.int64))


@pytest.mark.skipif("cpp" not in BACKENDS, reason="needs the compiled extension")
def test_cpp_kernels_validate_what_they_read():
    """Called directly (as torch.ops), the C++ sampler and surrogate raise ValueErrors for logits rows without a
    distribution and for sample indices out of range, instead of reading out of bounds or returning NaN; the
    surrogate's Python wrapper relies on this (no extra pass, no host sync on the CPU)."""
    ops = torch.ops.fastgrad_C
    nan_row = torch.tensor([[0.0, 1.0, 2.0], [0.0, float("nan"), 1.0]])
    masked = torch.tensor([[0.0, 1.0, 2.0], [-float("inf")] * 3])
    for bad in (nan_row, masked, torch.tensor([[0.0, float("inf"), 1.0]])):
        with pytest.raises(ValueError, match="finite entry"):
            ops.categorical_sample(bad, 2, 0, 0, True)
        with pytest.raises(ValueError, match="finite entry"):
            ops.score_surrogate(bad, torch.zeros(1, bad.shape[0], dtype=torch.int64), torch.ones(1, bad.shape[0]))
    ok = torch.randn(4, 3)
    for k in (-1, 3):
        idx = torch.zeros(2, 4, dtype=torch.int64)
        idx[1, 2] = k
        with pytest.raises(ValueError, match=r"samples must lie in \[0, 3\)"):
            ops.score_surrogate(ok, idx, torch.ones(2, 4))
        with pytest.raises(ValueError, match=r"samples must lie in \[0, 3\)"):
            F.score_function_surrogate(ok, idx, torch.ones(2, 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_entries_match_the_registered_ops(backend):
    """fastgrad.functional's eager path (direct backend call in an autograd.Function) and the torch.library op
    (what torch.compile sees) give the same values and the same gradients."""
    g = torch.Generator().manual_seed(3)
    l0 = torch.randn(12, 7, generator=g, dtype=torch.float64)
    idx = torch.randint(0, 7, (3, 12), generator=g)
    w = torch.randn(3, 12, generator=g, dtype=torch.float64)
    cases = [
        (lambda f, l: f(l, idx, w)[0], ss.eager, ss.score_surrogate),
        (lambda f, l: f(l, 2, 0.7, False, 5, 11), gs.eager, gs.gumbel_softmax),
        (lambda f, l: f(l, 2, 0.7, True, 5, 11), gs.eager, gs.gumbel_softmax),
        (lambda f, l: f(l.view(4, 3, 7)), el.eager, el.enumerate_log_probs),
    ]
    with fastgrad.backend(backend):
        for call, eager, registered in cases:
            outs, grads = [], []
            for fn in (eager, registered):
                l = l0.clone().requires_grad_()
                out = call(fn, l)
                (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
                outs.append(out.detach())
                grads.append(l.grad)
            torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
            torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
        a = cs.eager(l0.float(), 4, 9, 2, True)
        b = cs.categorical_sample(l0.float(), 4, 9, 2, True)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.skipif("cpp" not in BACKENDS, reason="needs the C++ extension (the cache is the C++ kernels')")
def test_cpp_outputs_reused_from_the_cache_are_written_whole():
    # Outputs of >= 4 MB come from their own mappings; a freed one is reused, dirty, for the next output of the
    # same size. Poison each freed output: the second call must still match the reference exactly.
    fastgrad.empty_cache()
    l = _logits(1200, 1000, torch.float32, 5)  # 4.8 MB
    idx = torch.randint(0, 1000, (3, 1200), generator=torch.Generator().manual_seed(7))
    w = torch.randn(3, 1200, generator=torch.Generator().manual_seed(8))
    _, lse = ss.reference(l, idx, w)
    cases = [
        (lambda: cs.categorical_sample(l, 3, 11, 0, True)[1], lambda: cs.reference(l, 3, 11, 0, True)[1], 0),
        (lambda: gs.gumbel_softmax(l, 2, 0.7, True, 12, 0), lambda: gs.reference(l, 2, 0.7, True, 12, 0), 0),
        (lambda: gs.gumbel_softmax(l, 2, 0.7, False, 12, 0), lambda: gs.reference(l, 2, 0.7, False, 12, 0), 2e-5),
        (lambda: ss.score_surrogate_backward(w, l, idx, w, lse),
         lambda: ss.reference_backward(w, l, idx, w, lse), 2e-5),
    ]
    with fastgrad.backend("cpp"):
        for run, reference, tol in cases:
            ref = reference()
            for _ in range(3):  # fresh, then reused twice
                out = run()
                torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
                assert out.nbytes >= 4 << 20
                out.fill_(7.0)
                del out
                if "FASTGRAD_CPU_CACHE_MB" not in os.environ:
                    assert fastgrad.cpu_cache_bytes() >= 4 << 20
    released = fastgrad.empty_cache()
    assert fastgrad.cpu_cache_bytes() == 0
    assert released >= (4 << 20 if "FASTGRAD_CPU_CACHE_MB" not in os.environ else 0)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="needs the C++ extension (the cache is the C++ kernels')")
@pytest.mark.parametrize("value,kept,warns", [("0", False, False), ("64", True, False), ("lots", True, True)])
def test_cpu_cache_cap_from_the_environment(value, kept, warns):
    # the cap is read once per process: each setting runs in its own interpreter
    import subprocess
    import sys

    code = ("import warnings, torch, fastgrad\n"
            "from fastgrad.ops import categorical_sample as cs\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    with fastgrad.backend('cpp'):\n"
            "        out = cs.categorical_sample(torch.zeros(1200, 1000), 2, 1, 0, True)\n"
            "    del out\n"
            "print(fastgrad.cpu_cache_bytes(), any('FASTGRAD_CPU_CACHE_MB' in str(x.message) for x in w))\n")
    env = dict(os.environ, FASTGRAD_CPU_CACHE_MB=value)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    cached, warned = p.stdout.split()
    assert (int(cached) > 0) == kept and warned == str(warns)
