"""Where each op runs: the dispatch rules, in one place.

* ``"reference"``: the pure-torch implementations in ``fastgrad/ops/*.py`` (CPU fallback and test oracle).
* ``"cpp"``: the C++ CPU kernels of ``fastgrad._C`` (``csrc/cpu``), for CPU tensors.
* ``"cuda"``: the CUDA kernels of ``fastgrad._C`` (``csrc/cuda``), for CUDA tensors.
* ``"triton"``: the Triton kernels of ``fastgrad.kernels`` (CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1``).

``"auto"`` (default) picks Triton for CUDA tensors (else CUDA kernels), the C++ kernels for CPU tensors when the
extension is built, else the reference (announced once with a warning saying why). ``fastgrad.set_backend(name)``
or ``FASTGRAD_BACKEND=name`` forces one; a forced backend that cannot run on the tensors' device is a ValueError
naming the fix, never a silent substitute ("cpp" runs CPU tensors, "cuda" CUDA tensors, "triton" CUDA tensors or
CPU tensors under ``TRITON_INTERPRET=1``). An extension built for another CUDA version raises every time.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterator, Optional

import torch

from . import _extension
from ._extension import cpu_cache_bytes, empty_cache, has_cpp, has_cuda_kernels, has_triton  # noqa: F401

BACKENDS = ("auto", "reference", "cpp", "cuda", "triton")
_forced: Optional[str] = None
_announced = False


def set_backend(name: Optional[str]) -> None:
    """Force a backend for all ops (``None`` or ``"auto"`` restores automatic choice)."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "cpp" and not has_cpp():
        raise ValueError(f"backend 'cpp' is not available: the extension is not built ({_extension._C_error})")
    if name == "triton" and not has_triton():
        raise ValueError("backend 'triton' is not available: triton is not installed")
    _forced = None if name in (None, "auto") else name


def get_backend() -> str:
    """The backend setting: ``set_backend``'s, else ``FASTGRAD_BACKEND``'s, else ``"auto"`` (what runs on a given
    device under ``"auto"`` is :func:`choose`'s answer)."""
    return _forced or os.environ.get("FASTGRAD_BACKEND", "auto") or "auto"


@contextlib.contextmanager
def backend(name: Optional[str]) -> Iterator[None]:
    """Context manager form of :func:`set_backend`; restores the previous choice even on error."""
    global _forced
    old = _forced
    set_backend(name)
    try:
        yield
    finally:
        _forced = old


def _announce_reference() -> None:
    global _announced
    if not _announced:
        _announced = True
        warnings.warn(f"fastgrad: the C++ kernels are not built ({_extension._C_error}); running the pure-torch "
                      "reference (correct, slower). `python -m fastgrad` says what runs; FASTGRAD_NO_EXT=1 or "
                      "FASTGRAD_BUILD=0 turn them off on purpose.",
                      RuntimeWarning, stacklevel=4)


def choose(device: torch.device) -> str:
    """The backend that runs an op on tensors of ``device``."""
    name = get_backend()
    if name not in BACKENDS:
        raise ValueError(f"FASTGRAD_BACKEND must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        if device.type == "cuda":
            if has_triton():
                return "triton"
            return "cuda" if has_cuda_kernels() else "reference"
        if has_cpp():
            return "cpp"
        _announce_reference()
        return "reference"
    if name == "cpp" and device.type != "cpu":
        raise ValueError(f"backend 'cpp' runs CPU tensors, got {device.type} tensors: use 'cuda', 'triton' or "
                         "'auto' for them")
    # a backend forced by FASTGRAD_BACKEND has not been through set_backend's checks (which also load the library)
    if name == "cpp" and not has_cpp():
        raise ValueError(f"backend 'cpp' is not available: the extension is not built ({_extension._C_error})")
    if name == "triton" and not has_triton():
        raise ValueError("backend 'triton' is not available: triton is not installed")
    if name == "cuda" and device.type != "cuda":
        raise ValueError(f"backend 'cuda' runs CUDA tensors, got {device.type} tensors: use 'cpp' or 'auto' for "
                         "them")
    if name == "cuda" and not has_cuda_kernels():
        raise ValueError("backend 'cuda' is not available: fastgrad._C was built without its CUDA kernels "
                         "(rebuild on a machine with nvcc and a CUDA torch)")
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend 'triton' runs CUDA tensors, got {device.type} tensors; set TRITON_INTERPRET=1 "
                         "before importing fastgrad to run its Triton kernels on the CPU (slow: for tests)")
    return name
