import os

import torch

# Triton kernels run on CPU tensors through the interpreter (set before fastgrad.kernels is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# FASTGRAD_TEST_DEVICE=cuda runs the suite on CUDA tensors (scripts/gpu_check.sh): tensors are created there by
# default, and so are the tests' seeded generators; the backends under test are those of that device.
DEVICE = os.environ.get("FASTGRAD_TEST_DEVICE", "cpu")
if DEVICE != "cpu":
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("FASTGRAD_TEST_DEVICE=cuda but torch sees no CUDA device")
    torch.set_default_device(DEVICE)
    _Generator = torch.Generator

    class _DeviceGenerator(_Generator):
        def __new__(cls, device=None):
            return _Generator(device if device is not None else DEVICE)

    torch.Generator = _DeviceGenerator

import pytest  # noqa: E402

import fastgrad  # noqa: E402


def _interpreter_problem():
    """Why Triton's CPU interpreter cannot run loops over runtime bounds here, or None. Triton 3.6's interpreter
    converts scalar arguments with ``int()`` on 1-element arrays, which numpy >= 2.4 refuses
    (triton-lang/triton#9171, fixed in later Triton): every fastgrad Triton kernel would fail to interpret."""
    if os.environ.get("TRITON_INTERPRET") != "1" or not fastgrad.ops._backend.has_triton():
        return None
    import triton
    import triton.language as tl

    @triton.jit
    def _count(out_ptr, n):
        acc = tl.zeros([1], tl.int32)
        for _ in range(0, n):
            acc += 1
        tl.store(out_ptr + tl.arange(0, 1), acc)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        _count[(1,)](out, 3)
    except Exception as e:  # the interpreter wraps the numpy TypeError
        return f"{type(e).__name__}: {e}"
    return None if int(out[0]) == 3 else f"a 3-step loop counted {int(out[0])}"


def pytest_configure(config):
    problem = _interpreter_problem()
    if problem is not None:
        import numpy
        import triton

        raise pytest.UsageError(
            f"Triton {triton.__version__}'s interpreter cannot run fastgrad's Triton kernels on the CPU with numpy "
            f"{numpy.__version__} ({problem}; triton-lang/triton#9171). Install numpy<2.4, or set TRITON_INTERPRET=0 "
            "to leave the Triton backend out of this run.")


@pytest.fixture(autouse=True)
def _clean_graph():
    """Each test starts with an empty graph, the default backend and the same torch thread count."""
    threads = torch.get_num_threads()
    fastgrad.reset()
    fastgrad.set_backend(None)
    yield
    fastgrad.reset()
    fastgrad.set_backend(None)
    torch.set_num_threads(threads)


def available_backends(device=DEVICE):
    """Backends that can run on ``device`` here (the reference always can)."""
    out = ["reference"]
    if device == "cpu" and fastgrad.ops._backend.has_cpp():
        out.append("cpp")
    if device == "cuda" and fastgrad.ops._backend.has_cuda_kernels():
        out.append("cuda")
    if fastgrad.ops._backend.has_triton() and (device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        out.append("triton")
    return out


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton on CPU tensors: small shapes only
