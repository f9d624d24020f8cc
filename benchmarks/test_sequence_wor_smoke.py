"""The sequence without-replacement study runs (a few hundred groups) and reports every row."""
import math

from benchmarks import sequence_wor


def test_sequence_wor_study_runs():
    result = sequence_wor.main(["--k", "2", "4", "--scales", "3", "--draws", "300"])
    assert [r["k"] for r in result["rows"]] == [2, 4]
    for r in result["rows"]:
        assert all(math.isfinite(v) and v > 0 for v in r["rel_mse"].values())
        assert 0 < r["iid_duplicate_fraction"] < 1  # i.i.d. groups repeat completions; the WOR groups cannot
