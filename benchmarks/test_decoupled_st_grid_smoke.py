"""benchmarks/decoupled_st_grid.py (and through it benchmarks/estimator_variance.py) at a small size: one row per
temperature pair, a higher backward temperature gives less variance (16x at initialization in the results file), and
the result records the command it was run with."""
from benchmarks import decoupled_st_grid


def test_decoupled_st_grid_smoke(tmp_path):
    out = tmp_path / "grid.json"
    argv = ["--forward", "1", "--backward", "0.5,2", "--n-grads", "20", "--train-steps", "0", "--out", str(out)]
    r = decoupled_st_grid.main(argv)
    assert out.exists() and r["command"].startswith("decoupled_st_grid.py --forward 1")
    (cp,) = r["checkpoints"]
    rows = {x["estimator"]: x for x in cp["rows"]}
    assert set(rows) == {"straight-through", "decoupled-st tf=1 tb=0.5", "decoupled-st tf=1 tb=2"}
    low, high = rows["decoupled-st tf=1 tb=2"], rows["decoupled-st tf=1 tb=0.5"]
    assert low["logit_grad_variance"] < high["logit_grad_variance"] / 4
