"""Every ```python block of the README runs as pasted, each in a fresh interpreter (what a reader does)."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_the_readme_has_its_examples():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_block_runs_as_pasted(i, tmp_path):
    env = dict(os.environ)
    env.pop("FASTGRAD_TEST_DEVICE", None)
    p = subprocess.run([sys.executable, "-c", BLOCKS[i]], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, f"README block {i + 1}:\n{BLOCKS[i]}\n{p.stderr[-3000:]}"
