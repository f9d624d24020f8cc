"""benchmarks/simple_k_subset.py at a tiny size: it runs, the unbiased score function's mean is within its noise of the
exact gradient while SIMPLE's is not (the bias the results file reports), and the result records its provenance."""
from benchmarks import simple_k_subset


def test_simple_k_subset_smoke(tmp_path):
    out = tmp_path / "simple.json"
    r = simple_k_subset.main(["--ks", "1,3", "--draws", "4000", "--out", str(out)])
    assert out.exists() and r["commit"] is not None and r["machine"]["torch"]
    rows = {(x["k"], x["estimator"]): x for x in r["rows"]}
    assert set(rows) == {(1, "simple"), (1, "score-function"), (1, "straight-through"), (1, "gapped-st"),
                         (1, "reinmax"), (3, "simple"), (3, "score-function")}
    for k in (1, 3):
        sf, simple = rows[(k, "score-function")], rows[(k, "simple")]
        # the bias estimate of an unbiased estimator is noise of size ~ variance / draws
        assert abs(sf["relative_bias2"]) < 10 * sf["relative_variance"] / 4000
        assert simple["relative_bias2"] > 0.5 and simple["relative_variance"] < sf["relative_variance"]
