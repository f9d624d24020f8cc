"""scripts/gpu_check.sh's logic, on the CPU (FASTGRAD_GPU_CHECK_DRY=1): it must run unchanged on a lent GPU, so
its steps, outputs and summary are exercised in every CI run."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # runs scripts/gpu_check.sh, tests and benchmarks included

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, FASTGRAD_GPU_CHECK_DRY="1", OUT=str(tmp_path), PYTHON=sys.executable)
    env.pop("FASTGRAD_TEST_DEVICE", None)
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert proc.returncode == 0 and summary["ok"], proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [s["step"] for s in summary["steps"]] == ["device", "build", "tests", "bench", "bench_lm"]
    assert summary["device"]["commit"] and summary["device"]["torch"]
    # at most 8 files come back from a device run
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["bench_linear.json", "bench_ops.json", "device.json", "log.txt", "summary.json", "tests.xml"]
    bench = json.loads((tmp_path / "bench_ops.json").read_text())
    rows = bench["benchmarks"]
    assert rows and all(r["extra_info"]["device"] == "cpu" and "achieved_GBps" in r["extra_info"] for r in rows)
    assert any("roofline_fraction" in r["extra_info"] for r in rows)
    lm = json.loads((tmp_path / "bench_linear.json").read_text())["benchmarks"]
    assert {r["extra_info"]["impl"] for r in lm} >= {"mm", "eager", "fastgrad_policy", "fastgrad_log_prob"}
    assert all("GFps_6NHV" in r["extra_info"] or r["extra_info"]["impl"] == "mm" for r in lm)


def _dry(tmp_path, **env_vars):
    env = dict(os.environ, FASTGRAD_GPU_CHECK_DRY="1", OUT=str(tmp_path), PYTHON=sys.executable, **env_vars)
    env.pop("FASTGRAD_TEST_DEVICE", None)
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    return proc, json.loads((tmp_path / "summary.json").read_text())


def test_gpu_check_runs_the_steps_asked_for(tmp_path):
    # a rerun on a warm machine: the device record always, then only the steps named
    proc, summary = _dry(tmp_path, FASTGRAD_GPU_CHECK_STEPS="build")
    assert proc.returncode == 0 and summary["ok"], proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [s["step"] for s in summary["steps"]] == ["device", "build"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device.json", "log.txt", "summary.json"]


def test_gpu_check_skips_steps_past_its_budget(tmp_path):
    # the device command is killed at 600 s: steps that no longer fit the budget are recorded as skipped (rc 125),
    # and the summary is still written, saying the check failed
    proc, summary = _dry(tmp_path, FASTGRAD_GPU_CHECK_STEPS="build", FASTGRAD_GPU_CHECK_BUDGET="0")
    assert proc.returncode == 1 and not summary["ok"]
    assert [(s["step"], s["rc"]) for s in summary["steps"]] == [("device", 125), ("build", 125)]
    assert summary["device"] is None and "skipped" in (tmp_path / "log.txt").read_text()
