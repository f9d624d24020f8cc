import os

import torch

# Triton kernels run on CPU tensors through the interpreter (set before fastgrad.kernels is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastgrad  # noqa: E402


@pytest.fixture(autouse=True)
def _clean_graph():
    """Each test starts with an empty graph and the default backend."""
    fastgrad.reset()
    fastgrad.set_backend(None)
    yield
    fastgrad.reset()
    fastgrad.set_backend(None)


def available_backends(device="cpu"):
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
