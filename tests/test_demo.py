"""The seed VAE demo end to end, short, on the vendored MNIST."""
import json

import pytest

from fastgrad.examples import discrete_vae
from fastgrad.examples.mnist import load_mnist


def test_vendored_mnist_reads():
    x, y = load_mnist("test")
    assert x.shape == (10000, 28, 28) and y.shape == (10000,)
    assert 0 <= float(x.min()) and float(x.max()) <= 1 and set(y.unique().tolist()) == set(range(10))


@pytest.mark.parametrize("method,extra", [("score-function", ["--n-samples", "4", "--baseline", "batch_average"]),
                                          ("expect", []), ("straight-through", [])])
def test_demo_quick(tmp_path, method, extra):
    s = discrete_vae.main(["--method", method, *extra, "--epochs", "1", "--max-steps", "120", "--eval-every",
                           "100", "--eval-samples", "5", "--test-size", "500", "--no-progress",
                           "--out-dir", str(tmp_path)])
    assert s["steps"] == 120
    assert s["first_elbo"] > 500  # untrained: ~784 ln 2
    assert s["last_elbo_mean100"] < s["first_elbo"] - 150  # it learns
    assert (tmp_path / "log.csv").read_text().count("\n") == 121
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["evaluations"]) == 2 and summary["test_neg_elbo"] < 400
    assert (tmp_path / "curves.png").exists() == summary["plot"]


def test_bad_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="data-dir"):
        load_mnist("train", tmp_path)
