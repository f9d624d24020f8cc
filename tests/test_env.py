"""``python -m fastgrad`` and ``fastgrad.collect_env()``: the version, the machine, one line per backend, exactly
``<backend>: available`` or ``<backend>: unavailable - <why, and the fix>``, and the default."""
import os
import re
import subprocess
import sys

import torch

import fastgrad
import fastgrad.ops._backend as B

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(**env):
    env = dict(os.environ, **env)
    p = subprocess.run([sys.executable, "-m", "fastgrad"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout.strip().splitlines()


def test_python_m_fastgrad_says_what_runs():
    lines = _main(FASTGRAD_BACKEND="auto")
    assert lines[0].startswith(f"fastgrad {fastgrad.__version__}") and f"torch {torch.__version__}" in lines[0]
    status = {}
    for line in lines:
        m = re.fullmatch(r"(reference|cpp|cuda|triton): (available|unavailable - .{10,})", line)
        if m:
            status[m.group(1)] = m.group(2)
    assert set(status) == {"reference", "cpp", "cuda", "triton"}
    assert status["reference"] == "available"
    assert (status["cpp"] == "available") == B.has_cpp()
    assert (status["cuda"] == "available") == (torch.cuda.is_available() and B.has_cuda_kernels())
    default = [line for line in lines if line.startswith("default: ")]
    assert len(default) == 1 and default[0][len("default: "):] in {b for b, s in status.items() if s == "available"}
    assert "default: reference" in _main(FASTGRAD_BACKEND="reference")
    # the LM head's measured choices on this CPU (cpu_bf16_plan, cpu_gemm_rows_independent)
    from fastgrad.ops._lm_head import cpu_bf16_plan, cpu_gemm_rows_independent

    plan = cpu_bf16_plan()
    bf16 = [line for line in lines if line.startswith("bf16 LM head on this cpu: ")]
    assert len(bf16) == 1 and f"logits GEMM {plan['logits']}" in bf16[0]
    assert ("bf16 GEMMs for the gradients" in bf16[0]) == (plan["grads"] == "bf16")
    rows = [line for line in lines if line.startswith("LM-head log-probs on this cpu: ")]
    assert len(rows) == 1 and ("bit for bit" in rows[0]) == cpu_gemm_rows_independent()


def test_collect_env_has_the_same_facts():
    env = fastgrad.collect_env()
    assert env["fastgrad"] == fastgrad.__version__ and env["torch"] == torch.__version__
    assert set(env["backends"]) == {"reference", "cpp", "cuda", "triton"}
    assert isinstance(env["cpu_features"], list) and env["default_device"] in ("cpu", "cuda")
