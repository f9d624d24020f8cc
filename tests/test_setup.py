"""setup.py's CUDA decision, the same as scripts/setup.sh's: a CUDA toolkit on a machine without a GPU builds the
CPU kernels only (a plain `pip install --no-build-isolation .` there used to try the CUDA build, and its CPU-only
fallback still linked -lcudart)."""
import ast
import os
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def want():
    path = os.path.join(ROOT, "setup.py")
    tree = ast.parse(open(path).read())
    # the imports and functions only: setup() and the extension list are not run
    body = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef))]
    ns = {"__file__": path, "__name__": "setup_under_test"}
    exec(compile(ast.Module(body=body, type_ignores=[]), path, "exec"), ns)
    return ns["want_cuda_kernels"]


def test_cuda_kernels_only_when_asked_for_or_a_gpu_is_seen(want):
    gpu = shutil.which("nvidia-smi") is not None and os.system("nvidia-smi -L > /dev/null 2>&1") == 0
    assert want(True, "/usr/local/cuda", {}) is gpu  # a toolkit alone: the CPU kernels, unless a GPU is seen
    assert want(True, "/usr/local/cuda", {"FASTGRAD_CUDA": "1"}) is True
    assert want(True, "/usr/local/cuda", {"CI": "true"}) is True  # CI keeps the CUDA sources compiling
    for env in ({"FASTGRAD_NO_CUDA": "1"}, {"FASTGRAD_NO_CUDA": "1", "CI": "true"},
                {"FASTGRAD_NO_CUDA": "1", "FASTGRAD_CUDA": "1"}):
        assert want(True, "/usr/local/cuda", env) is False
    assert want(False, "/usr/local/cuda", {"FASTGRAD_CUDA": "1"}) is False  # a CPU build of torch
    assert want(True, None, {"FASTGRAD_CUDA": "1"}) is False  # no toolkit
