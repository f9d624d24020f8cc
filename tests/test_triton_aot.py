"""fastgrad's Triton kernels compile for a Hopper GPU (sm_90), checked on a machine without one.

The interpreted tests prove the kernels' arithmetic; only the compiler proves that the GPU can run them. Every
launcher is called here under the interpreter over the dtypes and block configurations a GPU run meets (the
constexpr block sizes depend on K and n, not on the number of rows, so one or two rows reach the configurations
of the benchmark shapes), each distinct launch is recorded, and a process without the interpreter compiles each
to a cubin (tests/_triton_aot.py)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import INTERPRETED

pytest.importorskip("triton")
pytestmark = [pytest.mark.skipif(not INTERPRETED, reason="on a GPU the other tests compile and run the kernels"),
              pytest.mark.slow]  # Triton's ahead-of-time compile of every kernel variant

from tests._triton_aot import record_launches  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SEEDS = (2**40 + 3, 7)  # the JIT types an int >= 2**31 as int64 and a smaller one as int32: both reach the GPU
# per-block shared memory a kernel may use on sm_90 (227 KB)
SM90_SHARED_BYTES = 232448


def _launch_everything():
    from fastgrad.kernels import categorical_sample as cs
    from fastgrad.kernels import enumerate_log_probs as el
    from fastgrad.kernels import gumbel_softmax as gs
    from fastgrad.kernels import gumbel_topk as gt
    from fastgrad.kernels import linear_rows as lr
    from fastgrad.kernels import score_surrogate as ss

    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    def row_ops(dt, K, n, seed):
        wdt = torch.float64 if dt == torch.float64 else torch.float32
        x = rand(2, K, dtype=dt)
        for one_hot in (False, True):
            cs.categorical_sample(x, n, seed, 5, one_hot)
        for hard in (False, True):
            gs.gumbel_softmax(x, 2, 0.5, hard, seed, 5)
        gs.gumbel_softmax_backward(rand(2, 2, K, dtype=dt), x, 0.5, seed, 5)
        gt.gumbel_topk(x, min(K, 16), seed, 5)
        idx = torch.randint(0, K, (n, 2), generator=g)
        w = rand(n, 2, dtype=wdt)
        _, lse = ss.score_surrogate(x, idx, w)
        ss.score_surrogate_backward(rand(n, 2, dtype=wdt), x, idx, w, lse)

    # every dtype at the benchmark's K = 128, n = 16; the block configurations of a small row and of a row wider
    # than every block with n > 64 in fp32 (and fp64, the largest tiles); the int32-typed seed once
    for dt in DTYPES:
        row_ops(dt, 128, 16, SEEDS[0])
        lp = rand(3, 2, 10, dtype=dt)
        el.enumerate_log_probs_backward(rand(100, 3, dtype=dt), lp)
        el.enumerate_log_probs(lp)
    row_ops(torch.float32, 3, 1, SEEDS[0])
    row_ops(torch.float32, 2100, 65, SEEDS[0])
    row_ops(torch.float64, 2100, 65, SEEDS[0])
    row_ops(torch.float32, 128, 16, SEEDS[1])
    for dt, V, S in ((torch.float32, 7, 1), (torch.float32, 2100, 3), (torch.float64, 2100, 3)):
        # the LM head's slabs are in the accumulation dtype
        slab = rand(2, V, dtype=dt)
        idx = torch.randint(0, V, (2, S), generator=g)
        for ent, sq in ((False, False), (True, False), (False, True), (True, True)):
            _, norm, e, _ = lr.rows_stats(slab, idx, 1.0, ent, sq)
            g_ent = rand(2, dtype=dt) if ent else slab.new_empty(0)
            lr.rows_grad_(slab.clone(), idx, rand(2, S, dtype=dt), rand(2, dtype=dt), g_ent, norm,
                          e if ent else slab.new_empty(0), 0.7)


def _launch_registry():
    """Every registered op's declared sample inputs in each of its dtypes on the Triton backend, forward and (for the
    differentiable ones) backward: a new op's kernels join the compile list without editing it."""
    import fastgrad
    from fastgrad.ops._registry import REGISTRY

    for op in REGISTRY.values():
        if op.kernels and "triton" not in op.kernels:
            continue
        for dt in op.dtypes:
            for _, args in op.sample_inputs(torch.device("cpu"), dt):
                args = tuple(a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor)
                             and a.is_floating_point() and a.numel() and op.differentiable else a for a in args)
                with fastgrad.backend("triton"):
                    out = op.call(*args)
                    out = out if isinstance(out, tuple) else (out,)
                    loss = sum(o.float().sum() for o in out if o.requires_grad)
                    if isinstance(loss, torch.Tensor):
                        loss.backward()


def _kernels_defined():
    """Every launched kernel of fastgrad.kernels: the @triton.jit functions (interpreted or not) named ``*_kernel``
    (the others are helpers that kernels call)."""
    import importlib
    import pkgutil

    import triton

    import fastgrad.kernels as pkg

    out = set()
    for m in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"fastgrad.kernels.{m.name}")
        out |= {f"{m.name}.{k}" for k, v in vars(mod).items()
                if isinstance(v, triton.runtime.jit.KernelInterface) and k.endswith("_kernel")}
    return out


def test_every_triton_kernel_compiles_for_sm90(tmp_path):
    with record_launches() as records:
        _launch_everything()
        _launch_registry()
    kernels = {f"{r['module'].rpartition('.')[2]}.{r['kernel']}" for r in records}
    defined = _kernels_defined()
    assert len(defined) >= 10 and kernels == defined, (sorted(defined - kernels), sorted(kernels - defined))
    path = tmp_path / "launches.json"
    path.write_text(json.dumps(records))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "tests._triton_aot", str(path), "90"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(records)
    failed = [r for r in results if "error" in r]
    assert not failed, json.dumps(failed[:5], indent=1)
    assert all(r["cubin_bytes"] > 0 for r in results)
    big = [r for r in results if r["shared_bytes"] > SM90_SHARED_BYTES]
    assert not big, json.dumps(big[:5], indent=1)
