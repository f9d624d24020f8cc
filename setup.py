"""Builds ``fastgrad._C``: the C++ CPU kernels always, the CUDA kernels when nvcc and a CUDA torch are present.

A failed CUDA build falls back to the CPU-only extension; a failed C++ build fails the install (pip shows the
compiler's error; ``FASTGRAD_NO_EXT=1`` installs without it), and a package without the extension runs the pure-torch
reference, announced at first use. Knobs: ``FASTGRAD_NO_EXT=1`` (pure Python), ``FASTGRAD_NO_CUDA=1``, ``DEBUG=1``,
``FASTGRAD_NATIVE=0`` (no ``-march=native``).
"""
import glob
import os
import sys
import sysconfig
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name, default="0"):
    return os.environ.get(name, default) not in ("0", "", "false", "False")


def extensions():
    if _flag("FASTGRAD_NO_EXT"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        warnings.warn("torch is not installed at build time: building fastgrad without its C++ extension")
        return [], {}

    debug = _flag("DEBUG")
    cxx = ["-O0", "-g"] if debug else ["-O3", "-fno-math-errno", "-fopenmp-simd"]
    if not debug and _flag("FASTGRAD_NATIVE", "1"):
        cxx.append("-march=native")
    cxx += ["-std=c++20", "-fopenmp"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    include = [os.path.join(ROOT, "csrc")]
    # nvidia wheels ship headers (cusparse.h, ...) that torch's CUDA headers include
    site = sysconfig.get_paths()["purelib"]
    include += [p for p in glob.glob(os.path.join(site, "nvidia", "*", "include")) if os.path.isdir(p)]
    want_cuda = (torch.version.cuda is not None and CUDA_HOME is not None and not _flag("FASTGRAD_NO_CUDA")
                 and cuda_sources)
    common = dict(name="fastgrad._C", include_dirs=include, extra_link_args=["-fopenmp", "-lmvec"])
    if want_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = CUDAExtension(sources=sources + cuda_sources, define_macros=[("FASTGRAD_WITH_CUDA", "1")],
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-std=c++20"]},
                            **common)
    else:
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **common)

    class Build(BuildExtension):
        def build_extension(self, e):
            try:
                super().build_extension(e)
            except Exception as err:  # a broken CUDA toolchain must not break the install
                if not any(s.endswith(".cu") for s in e.sources):
                    raise
                sys.stderr.write(f"fastgrad: CUDA build failed ({err}); building the CPU-only extension\n")
                e.sources = [s for s in e.sources if not s.endswith(".cu")]
                e.define_macros = [m for m in e.define_macros if m[0] != "FASTGRAD_WITH_CUDA"]
                e.extra_compile_args = {"cxx": cxx}
                super().build_extension(e)

    return [ext], {"build_ext": Build.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
