"""Building the C++ kernels on first use, for an install without a compiled ``fastgrad._C``.

A plain ``pip install <path or wheel>`` builds under pip's build isolation, where torch is not importable, so the
wheel carries the C++ sources (``fastgrad/_csrc``, copied by ``setup.py``) instead of a compiled library. The first
time an op needs its kernels, :func:`build` compiles the CPU kernels once with ``torch.utils.cpp_extension.load``
into torch's extension cache (``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), in a folder
keyed on the sources, the flags and torch's version, and loads them; later processes load the cached library in
milliseconds. The build is announced on one line, with the elapsed time every 15 seconds while it runs.

``FASTGRAD_BUILD=0`` turns this off (the pure-torch reference serves, as with ``FASTGRAD_NO_EXT=1``). The CUDA
kernels are not built this way (minutes of nvcc per architecture): build from source with ``FASTGRAD_CUDA=1``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import time
from typing import List, Optional

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED_SECONDS = 120  # measured: 95-140 s for the CPU kernels on 2 cores (gcc 12, -O3)


def enabled() -> bool:
    return _flag("FASTGRAD_BUILD", "1") and not _flag("FASTGRAD_NO_EXT")


def source_dir() -> Optional[str]:
    """The C++ sources: packaged in the wheel (``fastgrad/_csrc``) or the checkout's ``csrc/`` beside the package."""
    for d in (os.path.join(PACKAGE, "_csrc"), os.path.join(os.path.dirname(PACKAGE), "csrc")):
        if os.path.isfile(os.path.join(d, "fastgrad.cpp")):
            return d
    return None


def sources(src: str) -> List[str]:
    cpu = os.path.join(src, "cpu")
    return [os.path.join(src, "fastgrad.cpp")] + sorted(
        os.path.join(cpu, f) for f in os.listdir(cpu) if f.endswith(".cpp"))


LDFLAGS = ["-fopenmp", "-lmvec"]


def _flag(name: str, default: str = "0") -> bool:
    return os.environ.get(name, default) not in ("0", "", "false", "False", "no")


def cflags() -> List[str]:
    """The C++ flags of the kernels, here and in setup.py (which loads this file): ``DEBUG=1`` gives ``-O0 -g``,
    ``FASTGRAD_NATIVE=0`` drops ``-march=native`` (a binary for other x86-64 CPUs)."""
    debug = _flag("DEBUG")
    flags = ["-O0", "-g"] if debug else ["-O3", "-fno-math-errno", "-fopenmp-simd"]
    if not debug and _flag("FASTGRAD_NATIVE", "1"):
        flags.append("-march=native")
    return flags + ["-std=c++20", "-fopenmp"]


def why_not() -> Optional[str]:
    """Why the kernels cannot be built here (None: they can)."""
    if not enabled():
        return "FASTGRAD_BUILD=0 or FASTGRAD_NO_EXT=1"
    if source_dir() is None:
        return "this installation has no C++ sources"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler (install g++ 10 or newer, or set CXX)"
    try:
        import ninja  # noqa: F401
    except ImportError:
        if shutil.which("ninja") is None:
            return "ninja is missing (pip install ninja)"
    return None


def build_directory(src: str) -> str:
    """A folder of torch's extension cache keyed on the sources, the flags, torch's and Python's versions."""
    import torch

    h = hashlib.sha256()
    for sub in ("", "cpu"):
        d = os.path.join(src, sub)
        for f in sorted(os.listdir(d)):
            if f.endswith((".cpp", ".h")):
                h.update(f.encode() + open(os.path.join(d, f), "rb").read())
    h.update(" ".join(cflags() + [torch.__version__, sys.version]).encode())
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(cache, "torch_extensions")
    return os.path.join(root, f"fastgrad_C-{h.hexdigest()[:16]}")


def build() -> None:
    """Compile (once) and load the CPU kernels; raises with the compiler's message when the build fails."""
    src = source_dir()
    assert src is not None
    directory = build_directory(src)
    os.makedirs(directory, exist_ok=True)
    library = os.path.join(directory, "fastgrad_C.so")
    if os.path.exists(library):  # built by an earlier process: load it (no compiler, no cpp_extension import)
        import torch
        torch.ops.load_library(library)
        return
    done = threading.Event()
    sys.stderr.write(f"fastgrad: building its C++ kernels once (about {EXPECTED_SECONDS // 60} minutes on 2 "
                     f"cores) into {directory}; FASTGRAD_BUILD=0 skips this and runs the pure-torch reference\n")
    sys.stderr.flush()
    t0 = time.time()
    from torch.utils.cpp_extension import load  # its import logs about CUDA on GPU-less machines: only to build

    def tick() -> None:
        while not done.wait(15):
            sys.stderr.write(f"fastgrad: still building ({time.time() - t0:.0f} s)\n")
            sys.stderr.flush()

    threading.Thread(target=tick, daemon=True).start()
    try:
        load(name="fastgrad_C", sources=sources(src), extra_cflags=cflags(), extra_ldflags=LDFLAGS,
             extra_include_paths=[src], build_directory=directory, with_cuda=False, is_python_module=False,
             verbose=False)
    finally:
        done.set()
    sys.stderr.write(f"fastgrad: C++ kernels built in {time.time() - t0:.0f} s\n")
