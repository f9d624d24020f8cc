"""An install without a compiled fastgrad._C (what a plain `pip install <path>` gives: pip's build isolation hides
torch from setup.py) builds its CPU kernels on first use from the C++ sources the wheel ships (fastgrad/_csrc),
announced, and a later process loads the cached library. Simulated here as the wheel lays it out: the package copied
without its compiled library, the sources under fastgrad/_csrc."""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import sys
import fastgrad, torch, fastgrad.functional as F, fastgrad.ops._backend as b
assert fastgrad.__file__.startswith(sys.argv[1]), fastgrad.__file__
from fastgrad.ops import _extension
logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
got = F.sample_categorical(logits, n=8, seed=3)
with b.backend("reference"):
    ref = F.sample_categorical(logits, n=8, seed=3)
print("cpp", b.has_cpp(), "same", bool((got == ref).all()), "error", _extension._C_error)
"""


def installed_copy(tmp_path):
    site = tmp_path / "site"
    shutil.copytree(os.path.join(ROOT, "fastgrad"), site / "fastgrad",
                    ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    shutil.copytree(os.path.join(ROOT, "csrc"), site / "fastgrad" / "_csrc")
    assert not glob.glob(str(site / "fastgrad" / "_C*"))
    return site


def run(site, tmp_path, **env):
    # python -S: no .pth files, so the checkout's editable install (whose finder maps fastgrad._C to the checkout's
    # library) stays out; torch and the rest come from site-packages on PYTHONPATH
    path = os.pathsep.join([str(site), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    e = dict(os.environ, PYTHONPATH=path, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), **env)
    e.pop("FASTGRAD_BACKEND", None)
    return subprocess.run([sys.executable, "-S", "-c", PROBE, str(site)],
                          cwd=tmp_path, env=e, capture_output=True, text=True, timeout=900)


def test_without_a_compiler_or_asked_not_to_the_reference_serves_and_says_why(tmp_path):
    site = installed_copy(tmp_path)
    p = run(site, tmp_path, FASTGRAD_BUILD="0")
    assert p.returncode == 0, p.stderr
    assert "cpp False same True" in p.stdout and "FASTGRAD_BUILD=0" in p.stdout
    assert "the C++ kernels are not built" in p.stderr  # announced once, with the reason
    assert "building its C++ kernels" not in p.stderr
    p = run(site, tmp_path, CXX="/nonexistent/c++")
    assert "cpp False" in p.stdout and "no C++ compiler" in p.stdout


@pytest.mark.slow
def test_first_use_builds_the_cpu_kernels_once(tmp_path):
    site = installed_copy(tmp_path)
    first = run(site, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "cpp True same True error None" in first.stdout, (first.stdout, first.stderr[-3000:])
    assert "fastgrad: building its C++ kernels once" in first.stderr and "C++ kernels built in" in first.stderr
    second = run(site, tmp_path)  # the cached library, no compiler run, no announcement
    assert "cpp True same True error None" in second.stdout, second.stderr[-3000:]
    assert "building" not in second.stderr
