"""The interleaved sampler speed-up benchmark runs at smoke sizes and reports both comparisons."""
from benchmarks import sampler_speedups


def test_sampler_speedups_runs():
    r = sampler_speedups.main(["--small", "--rounds", "2"])
    for name in ("gumbel_topk", "gumbel_softmax_fwd_bwd"):
        assert r[name]["speedup_best"] > 0 and len(r[name]["best_s"]) == 2
    assert r["copy_bandwidth_gb_s"] > 0
