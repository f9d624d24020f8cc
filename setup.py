"""Builds ``fastgrad._C``: the C++ CPU kernels always, the CUDA kernels when nvcc and a CUDA torch are present.

A failed CUDA build falls back to the CPU-only extension; a failed C++ build fails the install (pip shows the
compiler's error; ``FASTGRAD_NO_EXT=1`` installs without it). The C++ sources also ship in the package
(``fastgrad/_csrc``): an install built where torch was not importable (pip's build isolation) compiles its CPU kernels
on first use (``fastgrad/ops/_build.py``), and without a compiler runs the pure-torch reference, announced. Knobs: ``FASTGRAD_NO_EXT=1`` (pure Python), ``FASTGRAD_NO_CUDA=1``, ``DEBUG=1``,
``FASTGRAD_NATIVE=0`` (no ``-march=native``).
"""
import glob
import os
import subprocess
import sys
import sysconfig
import warnings

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name, default="0"):
    return os.environ.get(name, default) not in ("0", "", "false", "False")


def want_cuda_kernels(torch_has_cuda: bool, cuda_home, env=os.environ) -> bool:
    """Build the CUDA kernels as scripts/setup.sh decides: never with FASTGRAD_NO_CUDA=1; otherwise only with a CUDA
    torch and a CUDA toolkit, and then when asked (FASTGRAD_CUDA=1), under CI (CI=true, so the CUDA sources keep
    compiling), or when a GPU is visible. A toolkit on a machine without a GPU does not make a CUDA build: it takes
    minutes, and a broken toolchain must not break the CPU install."""
    if env.get("FASTGRAD_NO_CUDA", "0") not in ("0", "", "false", "False") or not torch_has_cuda or cuda_home is None:
        return False
    if env.get("FASTGRAD_CUDA", "0") not in ("0", "", "false", "False") or env.get("CI") == "true":
        return True
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _load_build_module():
    """fastgrad/ops/_build.py by path (importing the package would need torch and the extension)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fastgrad_build_flags", os.path.join(ROOT, "fastgrad", "ops",
                                                                                       "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extensions():
    if _flag("FASTGRAD_NO_EXT"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        warnings.warn("torch is not installed at build time: building fastgrad without its C++ extension")
        return [], {}

    flags = _load_build_module()  # the same flags as the kernels built on first use
    cxx = flags.cflags()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    include = [os.path.join(ROOT, "csrc")]
    # nvidia wheels ship headers (cusparse.h, ...) that torch's CUDA headers include
    site = sysconfig.get_paths()["purelib"]
    include += [p for p in glob.glob(os.path.join(site, "nvidia", "*", "include")) if os.path.isdir(p)]
    want_cuda = bool(cuda_sources) and want_cuda_kernels(torch.version.cuda is not None, CUDA_HOME)
    common = dict(name="fastgrad._C", include_dirs=include, extra_link_args=flags.LDFLAGS)

    def cpu_only():
        return CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **common)

    if want_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = CUDAExtension(sources=sources + cuda_sources, define_macros=[("FASTGRAD_WITH_CUDA", "1")],
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-std=c++20"]},
                            **common)
    else:
        ext = cpu_only()

    class Build(BuildExtension):
        def build_extension(self, e):
            try:
                super().build_extension(e)
            except Exception as err:  # a broken CUDA toolchain must not break the install
                if not any(s.endswith(".cu") for s in e.sources):
                    raise
                sys.stderr.write(f"fastgrad: CUDA build failed ({err}); building the CPU-only extension\n")
                # everything of the CPU-only extension, its link line included (no cudart, c10_cuda, torch_cuda)
                cpu = cpu_only()
                for attr in ("sources", "define_macros", "extra_compile_args", "extra_link_args", "libraries",
                             "library_dirs", "runtime_library_dirs", "include_dirs", "language"):
                    setattr(e, attr, getattr(cpu, attr))
                super().build_extension(e)

    return [ext], {"build_ext": Build.with_options(use_ninja=True)}


class BuildPyWithSources(build_py):
    """Ship the C++ sources in the package (``fastgrad/_csrc``): an install built without torch in sight (pip's build
    isolation) compiles its CPU kernels on first use from them (``fastgrad/ops/_build.py``)."""

    def run(self):
        super().run()
        src = os.path.join(ROOT, "csrc")
        dest = os.path.join(self.build_lib, "fastgrad", "_csrc")
        for path in glob.glob(os.path.join(src, "**", "*"), recursive=True):
            if os.path.isfile(path) and path.endswith((".cpp", ".h", ".cu", ".cuh")):
                target = os.path.join(dest, os.path.relpath(path, src))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                self.copy_file(path, target, preserve_mode=False)


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=dict(cmdclass, build_py=BuildPyWithSources))
