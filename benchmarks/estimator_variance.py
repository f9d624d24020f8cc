"""Gradient variance and bias of every categorical estimator on the seed VAE, against the number of cost evaluations.

    python benchmarks/estimator_variance.py --out benchmarks/results/estimator_variance_cpu.json --plot

At fixed checkpoints of the tutorial's model (its initialization, and after ``--train-steps`` steps of exact
(Expect) training) and one fixed batch, each estimator gives ``--n-grads`` estimates of the encoder-output gradient
``z.param_grads["probs"]``; the JSON records their total variance and the squared bias of their mean against the exact
gradient (Expect), the seed tutorial's two numbers, at budgets of 4, 8 and 20 decoder evaluations per data point
(IndeCateR costs D K = 20 per sample: only that budget), and the same two numbers for the gradient carried on to
the encoder's logits (what the plot shows: the probs gradient's 1 / p factor lets the rarest categories dominate once
the encoder is confident). The squared bias includes the noise of the mean, about variance / n_grads: an unbiased
estimator's "bias" is that floor, not zero.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import fastgrad as storch  # noqa: E402
from benchmarks._results import write_result  # noqa: E402
from fastgrad.examples.discrete_vae import DiscreteVAE, generative_story  # noqa: E402

M = storch.method
# name -> (constructor of a budget of E evaluations, or None where E does not fit)
ESTIMATORS = {
    "score-function (loo)": lambda E: M.ScoreFunction("z", n_samples=E, baseline_factory="batch_average"),
    "sf-wor (normalized)": lambda E: M.ScoreFunctionWOR("z", k=E),
    "sf-wor (unbiased)": lambda E: M.ScoreFunctionWOR("z", k=E, biased=False),
    "unordered-set": lambda E: M.UnorderedSetEstimator("z", k=E),
    "rao-blackwell": lambda E: M.RaoBlackwellSF("z", E),
    "rao-blackwell (sampled + baseline)": lambda E: M.RaoBlackwellSF("z", E, summed="sampled", use_baseline=True),
    "disarm (stick breaking)": lambda E: M.DisARM("z", n_samples=E // 2) if E % 2 == 0 else None,  # E / 2 pairs
    "disarm-iw": lambda E: M.DisARM("z", n_samples=E // 2, importance_weighting=True) if E % 2 == 0 else None,
    "carms": lambda E: M.CARMS("z", n_samples=E),
    "indecater": lambda E: M.IndeCateR("z", n_samples=E // 20) if E % 20 == 0 else None,
    "gumbel-softmax": lambda E: M.GumbelSoftmax("z", n_samples=E),
    "straight-through": lambda E: M.GumbelSoftmax("z", n_samples=E, straight_through=True),
    "gumbel-softmax-wor": lambda E: M.UnorderedSetGumbelSoftmax("z", k=E),
    "gumbel-entmax": lambda E: M.GumbelEntmax("z", n_samples=E),
    "gumbel-sparsemax": lambda E: M.GumbelSparseMax("z", n_samples=E),
    "reinmax": lambda E: M.ReinMax("z", n_samples=E),
    "gumbel-rao": lambda E: M.GumbelRao("z", n_samples=E),
    "reinmax-rao": lambda E: M.ReinMaxRao("z", n_samples=E),
    "reinmax-cv": lambda E: M.ReinMaxCV("z", n_samples=E),
    "gapped-st": lambda E: M.GappedStraightThrough("z", n_samples=E),
    "decoupled-st": lambda E: M.DecoupledStraightThrough("z", n_samples=E, forward_temperature=1.0,
                                                         backward_temperature=0.5),
}
BUDGETS = (4, 8, 20)


def param_grad(method, model, batch) -> torch.Tensor:
    z = generative_story(method, model, batch)
    storch.backward()
    g = z.param_grads["probs"]._tensor.detach().clone()
    model.zero_grad()
    return g


def to_logits(g: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """A gradient w.r.t. the probs, carried to the encoder's logits through softmax: ``p * (g - <p, g>)``. The probs
    gradient has a ``1 / p`` factor where torch turns probs into logits, which lets the rarest categories dominate
    its variance once the encoder is confident; the logits gradient is what the encoder's weights receive."""
    return probs * (g - (probs * g).sum(-1, keepdim=True))


def checkpoint_stats(model, batch, n_grads: int, names, budgets=BUDGETS) -> list:
    exact = param_grad(M.Expect("z"), model, batch)
    with torch.no_grad():
        probs = model.encode(batch.view(-1, 784)).reshape(-1, 2, 10).softmax(-1).double()
    exact_l = to_logits(exact.double(), probs)
    rows = []
    for name in names:
        for E in budgets:
            method = ESTIMATORS[name](E)
            if method is None:
                continue
            t0 = time.perf_counter()
            g = torch.stack([param_grad(method, model, batch) for _ in range(n_grads)]).double()
            sec = (time.perf_counter() - t0) / n_grads
            var = float(g.var(0).sum())
            bias = float(((g.mean(0) - exact.double()) ** 2).sum())
            gl = to_logits(g, probs)
            var_l = float(gl.var(0).sum())
            bias_l = float(((gl.mean(0) - exact_l) ** 2).sum())
            rows.append({"estimator": name, "evaluations": E, "grad_variance": var, "grad_bias": bias,
                         "logit_grad_variance": var_l, "logit_grad_bias": bias_l, "noise_floor": var / n_grads,
                         "seconds_per_estimate": sec})
            print(f"  {name:34s} E={E:3d} variance {var:.3e} bias^2 {bias:.3e} | logits {var_l:.3e} {bias_l:.3e} "
                  f"({sec * 1e3:.1f} ms)", flush=True)
    return rows


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cps = result["checkpoints"]
    fig, axes = plt.subplots(2, len(cps), figsize=(6 * len(cps), 8), squeeze=False)
    for j, cp in enumerate(cps):
        for name in dict.fromkeys(r["estimator"] for r in cp["rows"]):
            rs = [r for r in cp["rows"] if r["estimator"] == name]
            style = "o-" if len(rs) > 1 else "s"
            axes[0][j].plot([r["evaluations"] for r in rs], [r["logit_grad_variance"] for r in rs], style, label=name)
            axes[1][j].plot([r["evaluations"] for r in rs], [r["logit_grad_bias"] for r in rs], style, label=name)
        for i, what in enumerate(("total variance (encoder-logit gradient)", "squared bias vs Expect (logits)")):
            ax = axes[i][j]
            ax.set_xscale("log")
            ax.set_yscale("log")
            ticks = sorted({r["evaluations"] for r in cp["rows"]})
            ax.set_xticks(ticks)
            ax.set_xticklabels([str(b) for b in ticks])
            ax.set_xlabel("decoder evaluations per data point")
            ax.set_ylabel(what)
            ax.set_title(f"seed VAE, {cp['name']}")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--estimators", default=",".join(ESTIMATORS))
    ap.add_argument("--n-grads", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=300, help="Expect steps before the second checkpoint")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="decoder evaluations per data point")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", action="store_true", help="also write the .png beside --out")
    args = ap.parse_args(argv)
    names = [n for n in args.estimators.split(",") if n]
    budgets = tuple(int(b) for b in args.budgets.split(",") if b)
    if not budgets or min(budgets) < 1:
        ap.error("--budgets must be positive ints")
    unknown = [n for n in names if n not in ESTIMATORS]
    if unknown:
        ap.error(f"unknown estimators {unknown}; choose from {list(ESTIMATORS)}")
    torch.set_num_threads(args.threads)
    from fastgrad.examples.mnist import load_mnist

    torch.manual_seed(args.seed)
    x, _ = load_mnist("train")
    order = torch.randperm(x.shape[0])
    batch = x[order[: args.batch_size]].view(-1, 784)
    model = DiscreteVAE()
    checkpoints = []
    print("checkpoint: initialization", flush=True)
    checkpoints.append({"name": "initialization", "step": 0, "rows": checkpoint_stats(model, batch, args.n_grads,
                                                                                       names, budgets)})
    if args.train_steps:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        exact = M.Expect("z")
        for step in range(args.train_steps):
            b = x[order[(step * args.batch_size) % x.shape[0]:][: args.batch_size]].view(-1, 784)
            opt.zero_grad()
            generative_story(exact, model, b)
            storch.backward()
            opt.step()
        print(f"checkpoint: after {args.train_steps} Expect steps", flush=True)
        checkpoints.append({"name": f"after {args.train_steps} steps", "step": args.train_steps,
                            "rows": checkpoint_stats(model, batch, args.n_grads, names, budgets)})
    return write_result(argv, args, {"checkpoints": checkpoints}, plot, threads=args.threads)


if __name__ == "__main__":
    main()
