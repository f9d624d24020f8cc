"""benchmarks/relax_toy.py at a tiny size: the script runs, every method's loss is the exact one, and the result
records the command, the commit and the machine."""
from benchmarks import relax_toy


def test_relax_toy_smoke(tmp_path):
    out = tmp_path / "toy.json"
    r = relax_toy.main(["--steps", "20", "--every", "10", "--var-draws", "5", "--out", str(out)])
    assert out.exists() and r["commit"] is not None and r["machine"]["torch"]
    assert [x["method"] for x in r["runs"]] == ["reinforce", "rebar", "relax", "arm", "disarm"]
    for run in r["runs"]:
        for row in run["rows"]:
            assert 0.249 - 1e-9 <= row["loss"] <= 0.251 + 1e-9
    disarm = r["runs"][-1]["rows"][0]
    assert disarm["log_variance"] < -30  # DisARM: zero variance at theta = 0
