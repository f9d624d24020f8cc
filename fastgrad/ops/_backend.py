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
import importlib
import os
import warnings
from typing import Any, Callable, Iterator, Optional

import torch

BACKENDS = ("auto", "reference", "cpp", "cuda", "triton")
_forced: Optional[str] = None
_C = None
_C_error: Optional[str] = None
_C_mismatch = False  # built for another CUDA version: an error on every use, not a silent fallback
_triton_ok: Optional[bool] = None
_announced = False


def _load_extension() -> None:
    global _C, _C_error, _C_mismatch
    if _C_mismatch:
        raise RuntimeError(_C_error)
    if _C is not None or _C_error is not None:
        return
    try:
        from .. import _C as ext  # noqa: F401  (registers torch.ops.fastgrad_C.*)

        _C = ext
    except ImportError as e:  # not built: the reference serves
        _C_error = str(e)
        return
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
    _load_extension()
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


def set_backend(name: Optional[str]) -> None:
    """Force a backend for all ops (``None`` or ``"auto"`` restores automatic choice)."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "cpp" and not has_cpp():
        raise ValueError(f"backend 'cpp' is not available: the extension is not built ({_C_error})")
    if name == "triton" and not has_triton():
        raise ValueError("backend 'triton' is not available: triton is not installed")
    _forced = None if name in (None, "auto") else name


def get_backend() -> str:
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
        warnings.warn(f"fastgrad: the C++ kernels are not built ({_C_error}); running the pure-torch reference "
                      "(correct, slower). Build them with `pip install --no-build-isolation -e .` in an environment "
                      "that has torch; FASTGRAD_NO_EXT=1 builds without them on purpose.", RuntimeWarning,
                      stacklevel=4)


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


_compiled_ops: dict = {}  # name -> torch.ops.fastgrad_C.<name>.default (an attribute walk saved per call)


def run(name: str, kernel_module: str, reference: Callable[..., Any], check: Callable[..., Any], *args: Any) -> Any:
    """Run op ``name`` on the backend chosen for ``args[0]``'s device: ``torch.ops.fastgrad_C.<name>`` (C++/CUDA),
    ``fastgrad.kernels.<kernel_module>.<name>`` (Triton) or ``reference``.

    ``check(backend, *args)`` enforces the op's input contract first (:mod:`fastgrad.ops._checks`), the same on
    every backend; it may return a callable that checks the output (e.g. the per-row logsumexp)."""
    b = choose(args[0].device)
    post = check(b, *args)
    if b in ("cpp", "cuda"):
        op = _compiled_ops.get(name)
        if op is None:
            op = _compiled_ops[name] = getattr(torch.ops.fastgrad_C, name).default
        out = op(*args)
    elif b == "triton":
        out = getattr(importlib.import_module(f"fastgrad.kernels.{kernel_module}"), name)(*args)
    else:
        out = reference(*args)
    if post is not None:
        post(out)
    return out


def entry(op: Callable[..., Any], name: str, kernel_module: str, reference: Callable[..., Any],
          check: Callable[..., Any], setup_context: Optional[Callable[..., None]] = None,
          make_backward: Optional[Callable[[Callable[..., Any]], Callable[..., Any]]] = None,
          reference_backward: Optional[Callable[..., Any]] = None,
          check_backward: Optional[Callable[..., Any]] = None) -> Callable[..., Any]:
    """The callable :mod:`fastgrad.functional` uses for ``op``.

    Under ``torch.compile`` it is the registered ``torch.library`` op (schema, fake and autograd as registered).
    In eager mode it calls the backend directly, through a ``torch.autograd.Function`` built from the op's own
    ``setup_context`` and backward formula: torch.library's Python dispatch costs 30-70 us per call, which is
    most of an op's time at the seed VAE's sizes. ``make_backward(backward_op)`` returns the op's backward
    formula calling ``backward_op`` (the registered ``<name>_backward`` op, or here its direct call).
    """

    def direct(*args: Any) -> Any:
        return run(name, kernel_module, reference, check, *args)

    if make_backward is None:
        eager = direct
    else:
        bwd_name = name + "_backward"

        def backward_direct(*args: Any) -> Any:
            return run(bwd_name, kernel_module, reference_backward, check_backward, *args)

        def forward(ctx: Any, *args: Any) -> Any:
            # ctx-style forward: a separate setup_context would make every apply() call inspect.signature
            out = direct(*args)
            setup_context(ctx, args, out)
            return out

        eager = type(f"{name}_eager", (torch.autograd.Function,), {
            "forward": staticmethod(forward),
            "backward": staticmethod(torch.autograd.function.once_differentiable(make_backward(backward_direct))),
        }).apply

    def call(*args: Any) -> Any:
        # meta tensors (shape inference, torch.device("meta") model init): the registered op's fake runs
        if torch.compiler.is_compiling() or args[0].device.type == "meta":
            return op(*args)
        return eager(*args)

    call.__name__ = name
    call.__doc__ = op.__doc__
    return call
