"""The compiled kernel library ``fastgrad._C`` (``torch.ops.fastgrad_C.*``) and Triton: whether they are there,
and the C++ kernels' CPU output cache. Loading happens once, on first use; an install without the compiled library
builds its CPU kernels then (:mod:`._build`); an extension built for another CUDA version is an error on every use
(never a silent fallback).
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

_C = None
_C_error: Optional[str] = None
_C_mismatch = False  # built for another CUDA version: an error on every use, not a silent fallback
_triton_ok: Optional[bool] = None


def load() -> None:
    global _C, _C_error, _C_mismatch
    if _C_mismatch:
        raise RuntimeError(_C_error)
    if _C is not None or _C_error is not None:
        return
    try:
        from .. import _C as ext  # noqa: F401  (registers torch.ops.fastgrad_C.*)
    except ImportError as e:  # not compiled at install time (pip's build isolation hides torch): build it now
        from . import _build

        reason = _build.why_not()
        if reason is not None:  # the reference serves, announced with this reason
            _C_error = f"{e}; not built on first use: {reason}"
            return
        try:
            _build.build()
        except Exception as err:  # noqa: BLE001  (a compiler's failure: the reference serves, announced)
            _C_error = f"building the C++ kernels on first use failed: {str(err).strip()[-2000:]}"
            return
        ext = _build  # the library is loaded (torch.ops.fastgrad_C.*); the module stands for it
    _C = ext
    _check_cache_env()
    built = getattr(torch.ops.fastgrad_C, "cuda_version", None)
    if built is not None and torch.version.cuda is not None:
        v = int(built())
        if v > 0:
            want = f"{v // 1000}.{(v % 1000) // 10}"
            have = ".".join(torch.version.cuda.split(".")[:2])
            if want != have:
                _C = None
                _C_mismatch = True
                _C_error = (f"fastgrad._C was compiled with CUDA {want} but torch uses CUDA {have}; "
                            "rebuild with `pip install --no-build-isolation -e .`")
                raise RuntimeError(_C_error)


def _check_cache_env() -> None:
    """Warn about a FASTGRAD_CPU_CACHE_MB the C++ side will ignore (it accepts digits only, else the default)."""
    value = os.environ.get("FASTGRAD_CPU_CACHE_MB", "")
    if value and not (value.isascii() and value.isdigit()):
        warnings.warn(f"FASTGRAD_CPU_CACHE_MB must be a non-negative integer (MB), got {value!r}; using the "
                      "default of 1/8 of RAM", RuntimeWarning, stacklevel=3)


def has_cpp() -> bool:
    """True when the compiled extension (C++ CPU kernels) is importable."""
    load()
    return _C is not None


def has_cuda_kernels() -> bool:
    return has_cpp() and bool(torch.ops.fastgrad_C.has_cuda())


def has_triton() -> bool:
    global _triton_ok
    if _triton_ok is None:
        try:
            import triton  # noqa: F401

            _triton_ok = True
        except Exception:
            _triton_ok = False
    return _triton_ok


def cpu_cache_bytes() -> int:
    """Bytes of freed large CPU outputs the C++ kernels keep for reuse (0 without the extension)."""
    return int(torch.ops.fastgrad_C.cpu_cache_bytes()) if has_cpp() else 0


def empty_cache() -> int:
    """Return the kept CPU output memory to the system; the number of bytes released.

    The C++ kernels keep the mappings of freed outputs of 4 MB and more (up to ``FASTGRAD_CPU_CACHE_MB``,
    default 1/8 of RAM; ``0`` turns it off) and reuse them for outputs of the same size: fresh memory costs a
    page fault and a zero-fill per page, more than sampling a 1 GB one-hot itself.
    """
    return int(torch.ops.fastgrad_C.cpu_cache_release()) if has_cpp() else 0
