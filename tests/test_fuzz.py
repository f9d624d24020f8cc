"""The differential fuzz (tests/_fuzz.py) in child processes: a crash, hang or illegal memory access in a kernel
fails this test with its exit status instead of killing the suite."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # 2 x 300 fuzz cases in child processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("seed", [11, 12])
def test_differential_fuzz(seed):
    proc = subprocess.run([sys.executable, "-m", "tests._fuzz", "--cases", "300", "--seed", str(seed)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"fuzz child exited with {proc.returncode}:\n{proc.stderr[-3000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["cases"] == 300
    assert not result["failures"], json.dumps(result["failures"][:10], indent=1)
