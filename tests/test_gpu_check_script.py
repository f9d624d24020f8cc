"""scripts/gpu_check.sh's logic, on the CPU (FASTGRAD_GPU_CHECK_DRY=1): it must run unchanged on a lent GPU, so
its steps, outputs and summary are exercised in every CI run."""
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, FASTGRAD_GPU_CHECK_DRY="1", OUT=str(tmp_path))
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
