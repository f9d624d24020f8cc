"""Keeps the end-to-end VAE harness alive in CI: two steps of every method for every installed implementation,
and the results renderer on the committed JSON files."""
import importlib.util
import math

import pytest
import torch

from benchmarks import render, vae_impls

IMPLS = ["plain", "plain_distributions", "graph", "functional", "graph_reference", "functional_reference"] + [
    name for name, mod in (("storchastic", "storch"), ("pyro", "pyro")) if importlib.util.find_spec(mod)]


@pytest.mark.parametrize("method", vae_impls.METHODS)
@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "storchastic"])
def test_vae_step_runs_and_matches_untrained_elbo(impl, method):
    # storchastic patches torch globally when imported: vae_step.py runs it in its own process, so here too
    data = torch.rand(64, 28, 28, generator=torch.Generator().manual_seed(0))
    step = vae_impls.IMPLS[impl](method, vae_impls.make_model(0), data)
    values = [step(), step()]
    # an untrained model: -ELBO near 784 ln 2 + KL ~ 543 for uniform-ish data reconstructed at ~0.5
    assert all(400 < v < 700 for v in values), values


def test_render_tables():
    files = list(render.RES.glob("*.json"))
    assert files, "committed results are missing from benchmarks/results"
    for p in render.RES.glob("ops_*.json"):
        assert any("|" in line for line in render._ops_table(p))
    for p in render.RES.glob("linear_loss_*.json"):
        assert any("fastgrad_policy" in line for line in render._lm_table(p))
    for p in render.RES.glob("vae_step_*.json"):
        assert any("sf1" in line for line in render._vae_table(p))


def test_interleaved_worker_pairs_every_step():
    from benchmarks import vae_step

    res = vae_step.worker_interleaved("sf1", ["plain", "graph"], steps=2, warmup=1, threads=1)
    assert set(res["times_s"]) == {"plain", "graph"} == set(res["faults_per_step"])
    assert all(len(t) == 2 and min(t) > 0 for t in res["times_s"].values())
    # page faults per step: counted (a number for each implementation), not estimated
    assert all(isinstance(f, (int, float)) and math.isfinite(f) and f >= 0 for f in res["faults_per_step"].values())


def test_malloc_modes_set_only_their_variables(monkeypatch):
    from benchmarks import vae_step

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "123")
    assert "MALLOC_TRIM_THRESHOLD_" not in vae_step._env("default")  # the user's default, not a leftover
    steady = vae_step._env("steady")
    assert steady["MALLOC_TRIM_THRESHOLD_"] == str(1 << 30) and steady["MALLOC_MMAP_THRESHOLD_"] == str(32 << 20)


def test_quality_grad_stats_are_finite_and_exact_gradient_has_no_bias():
    import fastgrad
    from benchmarks import quality

    model = vae_impls.make_model(0)
    batch = torch.rand(8, 28, 28, generator=torch.Generator().manual_seed(1))
    sf = quality.grad_stats(fastgrad, "sf10_batch_average", model, batch, n_grads=3)
    # 3 score-function estimates: their mean is not the exact gradient (a squared distance > 0, finite)
    assert sf["grad_variance"] > 0 and 0 < sf["grad_bias"] < math.inf
    # Expect against Expect: identical gradients, zero variance and zero bias
    ex = quality.grad_stats(fastgrad, "expect", model, batch, n_grads=2)
    assert ex["grad_variance"] == pytest.approx(0.0, abs=1e-12) and ex["grad_bias"] == pytest.approx(0.0, abs=1e-12)
    assert all(p.grad is None or not p.grad.abs().sum() for p in model.parameters())


def test_paired_group_reports_the_library_against_its_own_plain_step():
    """--paired libraries run in a process of their own, each step paired with a plain step of that process."""
    import types

    from benchmarks import vae_step

    args = types.SimpleNamespace(rounds=1, steps=2, warmup=1, threads=1)
    row = vae_step._interleaved_group(["plain", "functional"], "sf1", "steady", args, own_plain=False)
    assert set(row) == {"functional"}, row  # the plain row belongs to fastgrad's own group
    cell = row["functional"]
    assert cell["pairs"] == 2 and cell["ratio_q1"] <= cell["ratio_to_plain"] <= cell["ratio_q3"]
    assert cell["paired_plain_ms"] > 0 and cell["median_ms"] > 0
