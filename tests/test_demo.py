"""The seed VAE demo end to end, short, on the vendored MNIST."""
import json
import math

import pytest

from fastgrad.examples import discrete_vae
from fastgrad.examples.mnist import load_mnist


def test_vendored_mnist_reads():
    x, y = load_mnist("test")
    assert x.shape == (10000, 28, 28) and y.shape == (10000,)
    assert 0 <= float(x.min()) and float(x.max()) <= 1 and set(y.unique().tolist()) == set(range(10))


@pytest.mark.slow  # an end-to-end demo run
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
    assert [e["step"] for e in summary["evaluations"]] == [0, 100, 119]  # step 0, every 100, the last step
    assert summary["test_neg_elbo"] < 400 and summary["interrupted"] is False
    for e in summary["evaluations"]:  # the bias panel's noise floor: variance / estimates (Expect: both 0)
        if e["grad_bias"] is not None:
            assert e["grad_bias_floor"] == pytest.approx(e["grad_variance"] / 5)
    assert (tmp_path / "curves.png").exists() == summary["plot"]


def test_bad_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="data-dir"):
        load_mnist("train", tmp_path)


def test_tutorial_expect_step_is_the_hand_written_step_in_float64():
    """The tutorial's Expect step through the graph API (KL + reconstruction, enumerated z broadcast over the data
    plate) and the hand-written torch step give the same loss and parameter gradients up to float64 rounding:
    same math, so float32 training runs of the two part only through rounding (benchmarks/quality.py --dtype)."""
    import math

    import torch
    import torch.nn.functional as TF
    from torch.distributions import OneHotCategorical, kl_divergence

    import fastgrad as storch

    torch.manual_seed(0)
    model = discrete_vae.DiscreteVAE().double()
    data = torch.rand(16, 784, dtype=torch.float64)

    x = storch.denote_independent(data, 0, "data")
    q = OneHotCategorical(probs=model.encode(x).reshape(-1, 2, 10).softmax(dim=-1))
    z = storch.method.Expect("z")(q)
    prior = OneHotCategorical(probs=torch.ones_like(q.probs) / 10.0)
    storch.add_cost(kl_divergence(q, prior).sum(-1), "kl-div")
    rec = model.decode(z.reshape(z.shape[:-2] + (2 * 10,)))
    storch.add_cost(torch.nn.BCELoss(reduction="none")(rec, x).sum(-1), "reconstruction")
    value = storch.backward()
    graph_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    # hand-written: every configuration decoded once, weights q(z|x) per datum
    logp = model.encode(data).view(16, 2, 10).log_softmax(-1)
    probs = logp.exp()
    kl = (probs * (logp + math.log(10.0))).sum((-1, -2))
    configs = TF.one_hot(torch.cartesian_prod(torch.arange(10), torch.arange(10)), 10).double()  # [100, 2, 10]
    bce = TF.binary_cross_entropy(model.decode(configs.view(100, 1, 20)).expand(100, 16, 784),
                                  data.expand(100, 16, 784), reduction="none").sum(-1)  # [100, 16]
    logq = logp[:, 0, :].t()[:, None, :] + logp[:, 1, :].t()[None, :, :]  # [10, 10, 16]
    loss = kl.mean() + (logq.reshape(100, 16).exp() * bce).sum(0).mean()
    loss.backward()

    assert abs(value.item() - float(loss.detach())) <= 1e-10 * abs(float(loss.detach()))
    for (name, p), g in zip(model.named_parameters(), graph_grads):
        assert float((g - p.grad).norm()) <= 1e-9 * float(p.grad.norm()), name


@pytest.mark.parametrize("argv,message", [
    (["--max-steps", "0"], "--max-steps must be >= 1"),
    (["--eval-samples", "1"], "--eval-samples must be >= 2"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--baseline", "batch_average"], "needs --n-samples >= 2"),
    (["--baseline", "avg"], "invalid choice"),
    (["--method", "expect", "--baseline", "moving_average"], "applies to --method score-function only"),
    (["--method", "expect", "--n-samples", "3"], "does not apply to --method expect"),
])
def test_demo_argument_errors_exit_with_usage(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        discrete_vae.parse_args(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_demo_missing_data_dir_exits_with_the_message(tmp_path):
    with pytest.raises(SystemExit) as info:
        discrete_vae.main(["--data-dir", str(tmp_path / "nowhere"), "--max-steps", "1", "--out-dir", str(tmp_path)])
    assert "data-dir" in str(info.value.code)


def test_demo_default_out_dir_names_the_configuration():
    a = discrete_vae.parse_args(["--n-samples", "10", "--baseline", "batch_average", "--seed", "3"])
    assert a.out_dir.endswith("score-function-n10-batch_average-seed3")


@pytest.mark.slow  # two end-to-end demo runs
def test_plot_runs_overlays_two_runs(tmp_path):
    pytest.importorskip("matplotlib")
    from fastgrad.examples import plot_runs

    for seed in (0, 1):
        discrete_vae.main(["--method", "straight-through", "--max-steps", "3", "--eval-every", "2",
                           "--eval-samples", "2", "--test-size", "0", "--no-progress", "--seed", str(seed),
                           "--out-dir", str(tmp_path / f"run{seed}")])
    out = plot_runs.main([str(tmp_path / "run0"), str(tmp_path / "run1"), "-o", str(tmp_path / "c.png")])
    assert out.exists() and out.stat().st_size > 1000


@pytest.mark.slow  # an end-to-end demo run
@pytest.mark.parametrize("method", ["arm", "disarm", "arms", "relax", "rebar", "double-cv", "rodeo", "vimco"])
def test_demo_binary_estimators_on_bernoulli_latents(tmp_path, method):
    s = discrete_vae.main(["--method", method, "--n-samples", "2", "--latents", "bernoulli", "--latent-dim", "50",
                           "--max-steps", "60",
                           "--eval-every", "50", "--eval-samples", "3", "--test-size", "200", "--no-progress",
                           "--out-dir", str(tmp_path)])
    assert s["args"]["latents"] == "bernoulli" and s["steps"] == 60
    assert s["first_elbo"] > 500 and s["last_elbo_mean100"] < s["first_elbo"] - 100  # it learns
    assert s["evaluations"][0]["grad_bias"] is None and s["evaluations"][0]["grad_variance"] > 0
    assert s["test_neg_elbo"] < 400


@pytest.mark.parametrize("argv,message", [
    (["--method", "arm", "--latents", "categorical"], "needs --latents bernoulli"),
    (["--method", "expect", "--latents", "bernoulli"], "cannot enumerate"),
    (["--method", "disarm", "--latent-dim", "0"], "--latent-dim must be >= 1"),
    (["--method", "arms"], "--method arms needs --n-samples >= 2"),
])
def test_demo_latent_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        discrete_vae.parse_args(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow  # an end-to-end demo run
@pytest.mark.parametrize("method", ["sf-wor", "unordered-set", "rao-blackwell", "gumbel-softmax-wor", "gumbel-entmax",
                                    "gumbel-sparsemax", "indecater", "reinmax", "gumbel-rao", "disarm", "disarm-iw",
                                    "vimco"])
def test_demo_without_replacement_and_relaxed_estimators(tmp_path, method):
    s = discrete_vae.main(["--method", method, "--n-samples", "3", "--max-steps", "40", "--eval-every", "30",
                           "--eval-samples", "3", "--test-size", "100", "--no-progress", "--out-dir", str(tmp_path),
                           "--latents", "categorical"])
    assert s["args"]["latents"] == "categorical" and s["steps"] == 40
    assert s["first_elbo"] > 500 and s["last_elbo_mean100"] < s["first_elbo"] - 80  # it learns
    ev = s["evaluations"][0]
    assert ev["grad_variance"] > 0
    if method == "vimco":  # another objective (the importance-weighted bound): no bias against Expect's gradient
        assert ev["grad_bias"] is None
    else:
        assert ev["grad_bias"] is not None and math.isfinite(ev["grad_bias"])


def test_demo_set_and_entmax_argument_errors(capsys):
    for argv, message in ((["--method", "unordered-set"], "needs --n-samples >= 2"),
                          (["--method", "gumbel-entmax", "--latents", "bernoulli"], "needs --latents categorical"),
                          (["--method", "disarm-iw", "--latents", "bernoulli"], "needs --latents categorical"),
                          (["--method", "vimco"], "needs --n-samples >= 2")):
        with pytest.raises(SystemExit) as info:
            discrete_vae.parse_args(argv)
        assert info.value.code == 2 and message in capsys.readouterr().err


def test_every_method_choice_constructs():
    import fastgrad as storch

    assert set(discrete_vae._CONSTRUCTORS) == set(discrete_vae.METHODS)
    for name in discrete_vae.METHODS:
        assert isinstance(discrete_vae.make_method(name, 2), storch.method.Method)
    with pytest.raises(ValueError, match="method must be one of"):
        discrete_vae.make_method("reinforce")
