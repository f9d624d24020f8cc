"""FASTGRAD_BACKEND, each value in a fresh interpreter (the variable is read where set_backend's checks never ran:
a forced "cpp" used to reach torch.ops.fastgrad_C before anything had loaded the library)."""
import os
import subprocess
import sys

import fastgrad.ops._backend as B

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = ("import torch, fastgrad, fastgrad.functional as F\n"
        "try:\n"
        "    print(F.sample_categorical(torch.tensor([[0.0, 1.0, 2.0]] * 3), 4, seed=7).tolist())\n"
        "except ValueError as e:\n"
        "    print('ValueError:', e)\n")


def _run(value, **env):
    env = dict(os.environ, FASTGRAD_BACKEND=value, **env)
    env.pop("FASTGRAD_TEST_DEVICE", None)
    p = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout.strip().splitlines()[-1]


def test_every_value_of_fastgrad_backend():
    ref = _run("reference")
    assert ref.startswith("[[")
    assert _run("auto") == ref
    assert _run("") == ref  # empty: automatic
    if B.has_cpp():
        assert _run("cpp") == ref
    else:
        assert _run("cpp").startswith("ValueError: backend 'cpp' is not available")
    if B.has_triton():
        assert _run("triton", TRITON_INTERPRET="1") == ref
    # CPU tensors: the CUDA and Triton backends say what runs them instead of substituting another
    assert _run("cuda").startswith("ValueError: backend 'cuda' runs CUDA tensors")
    assert "TRITON_INTERPRET=1" in _run("triton", TRITON_INTERPRET="0")
    assert _run("fortran").startswith("ValueError: FASTGRAD_BACKEND must be one of")

