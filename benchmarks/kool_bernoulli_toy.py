"""Kool, van Hoof & Welling 2020's Bernoulli toy on this CPU: gradient variance against the success probability.

    python benchmarks/kool_bernoulli_toy.py --out benchmarks/results/kool_bernoulli_toy_cpu.json --plot

Three Bernoullis share one logit eta, f(b) = sum_d (b_d - t_d)^2 with t = (0.6, 0.51, 0.48); the exact gradient is
sigma(eta) sigma(-eta) sum_d (1 - 2 t_d). At each p = sigma(eta) of a grid, ``--reps`` independent estimates come from
one graph-API step (the repetitions are a plate, so each row's logit receives its own estimate), for each estimator
at k = 4 cost evaluations (IndeCateR: its fixed D K = 6). The paper's figure (section 6.1) shows the unordered-set
estimator with its baseline as low as the best at every p and far below sampling with replacement as p nears 0 or
1, where samples with replacement repeat. The JSON records the variance, the mean's z-score against the exact
gradient, and the command line, commit and machine.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch.distributions import Bernoulli

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import fastgrad as storch  # noqa: E402
from benchmarks._results import write_result  # noqa: E402

M = storch.method
T = torch.tensor([0.6, 0.51, 0.48])
K = 4
ESTIMATORS = {
    "score-function k=4 (loo)": lambda: M.ScoreFunction("z", n_samples=K, baseline_factory="batch_average"),
    "disarm 2 pairs": lambda: M.DisARM("z", n_samples=K // 2),
    "sf-wor (normalized)": lambda: M.ScoreFunctionWOR("z", k=K),
    "sf-wor (unbiased)": lambda: M.ScoreFunctionWOR("z", k=K, biased=False),
    # 200 integration points (error below 1e-11, tests/estimators/test_without_replacement.py) keep 10^4 rows'
    # integrals small
    "unordered-set": lambda: M.UnorderedSetEstimator("z", k=K, num_int_points=200),
    "unordered-set (no baseline)": lambda: M.UnorderedSetEstimator("z", k=K, use_baseline=False, num_int_points=200),
    "rao-blackwell": lambda: M.RaoBlackwellSF("z", K),
    "rao-blackwell (sampled + baseline)": lambda: M.RaoBlackwellSF("z", K, summed="sampled", use_baseline=True),
    "indecater (6 evaluations)": lambda: M.IndeCateR("z", n_samples=1),
}


def estimates(make, eta: float, reps: int) -> torch.Tensor:
    """``reps`` independent gradient estimates w.r.t. the shared logit, from one step over a plate of rows."""
    rows = torch.full((reps, 1), eta, requires_grad=True)
    logits = storch.denote_independent(rows.expand(reps, 3), 0, "reps")
    z = make()(Bernoulli(logits=logits))
    storch.add_cost(((z - T) ** 2).sum(-1), "f")
    storch.backward()
    return rows.grad.view(-1).double() * reps  # backward() averages over the plate of rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10000)
    ap.add_argument("--points", type=int, default=19)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    ps = [(i + 1) / (args.points + 1) for i in range(args.points)]
    rows = []
    for p in ps:
        eta = math.log(p / (1 - p))
        exact = p * (1 - p) * float((1 - 2 * T.double()).sum())
        for name, make in ESTIMATORS.items():
            g = estimates(make, eta, args.reps)
            z = float((g.mean() - exact) / (g.std() / math.sqrt(g.numel())))
            rows.append({"p": p, "estimator": name, "variance": float(g.var()), "mean": float(g.mean()),
                         "exact": exact, "z": z})
        print(f"p={p:.2f} " + " ".join(f"{r['variance']:.1e}" for r in rows[-len(ESTIMATORS):]), flush=True)
    return write_result(argv, args, {"estimators": list(ESTIMATORS), "rows": rows}, plot)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name in result["estimators"]:
        rs = [r for r in result["rows"] if r["estimator"] == name]
        ax.plot([r["p"] for r in rs], [max(r["variance"], 1e-12) for r in rs], "o-", ms=3, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("p = sigmoid(eta)")
    ax.set_ylabel("variance of the gradient estimate (floor 1e-12)")
    ax.set_title("Kool et al. 2020, Bernoulli toy (3 shared-logit Bernoullis, k = 4), fastgrad on this CPU")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
