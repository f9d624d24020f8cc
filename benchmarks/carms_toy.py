"""The CARMS paper's toy (Dimitriev & Zhou, NeurIPS 2021; the authors' ``toy.py``): the log-variance of the nine
logit gradients of three categoricals of three classes, for CARMS, RLOO (the paper's LOORF) and the unordered-set
estimator (UNORD), at Dirichlet concentrations 1, 10, 100 and 1000.

    python benchmarks/carms_toy.py --out benchmarks/results/carms_toy_cpu.json --plot

The setup is the authors' code's: ``M = 3`` samples per estimate, ``N = 1000`` independent estimates, ``D = 3``
categoricals of ``C = 3`` classes with probabilities drawn once from ``Dirichlet(alpha 1)``, the linear cost
``f(z) = sum_dc F_dc z_dc`` with ``F = 3 [[1, 2, 3], [4, 5, 6], [7, 8, 9]]``; per estimator the figure shows
``log(Var_N(grad) + 1e-12)`` of each of the 9 logits as a box, labelled median ± std. The authors draw the
probabilities with TensorFlow's generator, so the draws here differ: each concentration is run for ``--seeds``
draws and the JSON records every draw. All three estimators run through the graph API (one plate of ``N``
repetitions), and their means are checked against the exact gradient ``p_dc (F_dc - sum_c' p_dc' F_dc')``. The
authors' CARMS clips its importance weights to [0.01, 10] after smoothing them by 1e-3; fastgrad's uses the exact
weights (unbiased). Their Gumbel-copula variant (CARMS-G) is not in fastgrad.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.distributions import Dirichlet, OneHotCategorical

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import fastgrad as storch  # noqa: E402
from benchmarks._results import write_result  # noqa: E402

M_SAMPLES, D, C = 3, 3, 3
F_MAT = 3.0 * torch.arange(1, D * C + 1, dtype=torch.float64).view(D, C)
ESTIMATORS = {
    "CARMS": lambda: storch.method.CARMS("z", n_samples=M_SAMPLES),
    "LOORF": lambda: storch.method.ScoreFunction("z", n_samples=M_SAMPLES, baseline_factory="batch_average"),
    "UNORD": lambda: storch.method.UnorderedSetEstimator("z", k=M_SAMPLES),
}


def estimates(name: str, logits: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` independent estimates ``[n, D, C]`` of the logits' gradient: one graph-API step over a plate of ``n``
    repetitions (each row its own copy of the logits; backward() averages over the plate, hence the factor n)."""
    leaf = logits.expand(n, D, C).clone().requires_grad_()
    z = ESTIMATORS[name]()(OneHotCategorical(logits=storch.denote_independent(leaf, 0, "reps")))
    storch.add_cost((z * F_MAT).sum((-1, -2)), "f")
    storch.backward()
    return leaf.grad.detach() * n


def exact_gradient(probs: torch.Tensor) -> torch.Tensor:
    return probs * (F_MAT - (probs * F_MAT).sum(-1, keepdim=True))


def run(alpha: float, seed: int, n: int) -> dict:
    torch.manual_seed(seed)
    dist = Dirichlet(torch.full((C,), float(alpha), dtype=torch.float64))
    probs = dist.sample((D,))
    logits = probs.log()
    exact = exact_gradient(probs)
    row = {"alpha": alpha, "seed": seed, "probs": probs.tolist(), "dirichlet_entropy": float(dist.entropy()),
           "estimators": {}}
    for name in ESTIMATORS:
        t0 = time.perf_counter()
        g = estimates(name, logits, n)
        sec = time.perf_counter() - t0
        lv = torch.log(g.var(0) + 1e-12).flatten()
        z = ((g.mean(0) - exact).abs() / (g.std(0) / math.sqrt(n)).clamp_min(1e-300)).flatten()
        z = torch.where(g.std(0).flatten() > 0, z, torch.zeros_like(z))
        row["estimators"][name] = {
            "log_variance": lv.tolist(), "median": float(lv.median()), "std": float(lv.std(unbiased=False)),
            "max_z_vs_exact": float(z.max()), "seconds": sec}
    return row


def summarize(rows: list) -> list:
    out = []
    for alpha in dict.fromkeys(r["alpha"] for r in rows):
        rs = [r for r in rows if r["alpha"] == alpha]
        s = {"alpha": alpha, "draws": len(rs)}
        for name in ESTIMATORS:
            s[name] = statistics.median(r["estimators"][name]["median"] for r in rs)
        s["carms_lowest"] = sum(min(ESTIMATORS, key=lambda m: r["estimators"][m]["median"]) == "CARMS" for r in rs)
        s["carms_below_loorf"] = sum(r["estimators"]["CARMS"]["median"] < r["estimators"]["LOORF"]["median"]
                                     for r in rs)
        out.append(s)
    return out


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = [r for r in result["rows"] if r["seed"] == result["args"]["seed"]]
    fig, axes = plt.subplots(1, len(first), figsize=(4.2 * len(first), 3), squeeze=False)
    for ax, r in zip(axes[0], first):
        names = list(r["estimators"])
        data = [r["estimators"][m]["log_variance"] for m in names]
        labels = [f"{m}\n{r['estimators'][m]['median']:.2f}±{r['estimators'][m]['std']:.2f}" for m in names]
        ax.boxplot(data)
        ax.set_xticks(range(1, len(labels) + 1), labels)  # (boxplot's label keyword was renamed in matplotlib 3.9)
        ax.set_title(f"α={r['alpha']:g}, H={r['dirichlet_entropy']:.2f}")
        ax.set_ylabel("log variance (9 logits)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alphas", default="1,10,100,1000")
    ap.add_argument("--n", type=int, default=1000, help="independent estimates per estimator")
    ap.add_argument("--seeds", type=int, default=20, help="Dirichlet draws per concentration")
    ap.add_argument("--seed", type=int, default=0, help="the first draw's seed (the plot shows it)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", action="store_true", help="also write the .png beside --out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for alpha in (float(a) for a in args.alphas.split(",")):
        for seed in range(args.seed, args.seed + args.seeds):
            r = run(alpha, seed, args.n)
            rows.append(r)
            print(f"alpha {alpha:g} seed {seed}: " + ", ".join(
                f"{m} {e['median']:.2f}±{e['std']:.2f} (z {e['max_z_vs_exact']:.1f})"
                for m, e in r["estimators"].items()), flush=True)
    summary = summarize(rows)
    for s in summary:
        print(f"alpha {s['alpha']:g}: median over draws " + ", ".join(f"{m} {s[m]:.2f}" for m in ESTIMATORS)
              + f"; CARMS lowest in {s['carms_lowest']}/{s['draws']}, below LOORF in {s['carms_below_loorf']}")
    return write_result(argv, args, {"summary": summary, "rows": rows}, plot)


if __name__ == "__main__":
    main()
