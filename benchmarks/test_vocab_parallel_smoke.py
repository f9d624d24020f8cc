"""The vocabulary-parallel communication benchmark runs (2 gloo processes, a tiny head) and reports every row."""
import pytest

from benchmarks import vocab_parallel

pytestmark = pytest.mark.slow  # starts gloo processes


def test_vocab_parallel_benchmark_runs():
    result = vocab_parallel.main(["--N", "128", "--H", "32", "--V", "500", "--ranks", "2", "--reps", "1"])
    assert [r["ranks"] for r in result["rows"]] == [1, 2]
    assert all(r["median_s"] > 0 for r in result["rows"]) and result["rows"][0]["vs_single_process"] == 1.0
