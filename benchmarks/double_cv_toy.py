"""Titsias & Shi 2022's 200-dimensional Bernoulli toy on this CPU: gradient variance over training iterations.

    python benchmarks/double_cv_toy.py --out benchmarks/results/double_cv_toy_cpu.json --plot

f(b) = (1/D) sum_d (b_d - t)^2, D = 200, t = 0.499, b_d ~ Bernoulli(sigmoid(eta_d)), eta = 0 at the start, Adam
(``--lr``) on each estimator's own estimates. Every ``--every`` steps, ``--var-draws`` independent estimates at the
current eta (one graph-API step over a plate of repetitions; the estimators' own state is saved and restored around
it) give the total variance. Estimators at 2 and 4 cost evaluations: RLOO, DisARM / ARMS, and DoubleCV with its
online alpha. The paper (figure 1, thjashin/double-cv quadratic_loss.ipynb) shows Double CV's variance below RLOO's
and DisARM's; the JSON records what fastgrad measures, with the command line, commit and machine.
"""
from __future__ import annotations

import argparse
import copy
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
D, T = 200, 0.499
ESTIMATORS = {
    "rloo n=2": lambda: M.ScoreFunction("z", n_samples=2, baseline_factory="batch_average"),
    "disarm (1 pair)": lambda: M.DisARM("z", n_samples=1),
    "double-cv n=2": lambda: M.DoubleCV("z", 2),
    "rloo n=4": lambda: M.ScoreFunction("z", n_samples=4, baseline_factory="batch_average"),
    "arms n=4": lambda: M.ARMS("z", n_samples=4),
    "double-cv n=4": lambda: M.DoubleCV("z", 4),
}


def f(b):
    return ((b - T) ** 2).mean(-1)


def step(method, eta: torch.Tensor) -> torch.Tensor:
    th = eta.detach().clone().requires_grad_()
    z = method(Bernoulli(logits=th))
    storch.add_cost(f(z), "f")
    storch.backward()
    return th.grad


def variance(method, eta: torch.Tensor, reps: int) -> float:
    saved = copy.deepcopy(method.state_dict())
    rows = eta.detach().expand(reps, D).clone().requires_grad_()
    z = method(Bernoulli(logits=storch.denote_independent(rows, 0, "reps")))
    storch.add_cost(f(z), "f")
    storch.backward()
    method.load_state_dict(saved)
    g = rows.grad.double() * reps  # backward() averages over the plate of repetitions
    return float(g.var(0).sum())


def run(name: str, steps: int, every: int, reps: int, lr: float, seed: int) -> dict:
    torch.manual_seed(seed)
    method = ESTIMATORS[name]()
    eta = torch.zeros(D, requires_grad=True)
    opt = torch.optim.Adam([eta], lr=lr)
    rows = []
    for it in range(steps + 1):
        if it % every == 0:
            p = torch.sigmoid(eta.detach().double())
            loss = float((p * (1 - T) ** 2 + (1 - p) * T ** 2).mean())
            v = variance(method, eta, reps)
            rows.append({"step": it, "loss": loss, "log_variance": math.log(max(v, 1e-300)),
                         "alpha": float(method.alpha) if hasattr(method, "alpha") else None})
        if it == steps:
            break
        g = step(method, eta)
        opt.zero_grad()
        eta.grad = g
        opt.step()
    return {"method": name, "rows": rows}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for r in result["runs"]:
        xs = [x["step"] for x in r["rows"]]
        ax[0].plot(xs, [x["loss"] for x in r["rows"]], label=r["method"])
        ax[1].plot(xs, [x["log_variance"] for x in r["rows"]], label=r["method"])
    ax[0].set_ylabel("loss E[f]")
    ax[1].set_ylabel("log total variance of the gradient estimate")
    for a in ax:
        a.set_xlabel("step")
    ax[1].legend(fontsize=8)
    fig.suptitle("Titsias & Shi 2022, 200-dimensional toy (t = 0.499), fastgrad on this CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(ESTIMATORS))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--var-draws", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    names = [n for n in args.methods.split(",") if n]
    bad = [n for n in names if n not in ESTIMATORS]
    if bad:
        ap.error(f"unknown methods {bad}; choose from {list(ESTIMATORS)}")
    runs = [run(n, args.steps, args.every, args.var_draws, args.lr, args.seed) for n in names]
    for r in runs:
        lv = [x["log_variance"] for x in r["rows"]]
        print(f"{r['method']:16s} final loss {r['rows'][-1]['loss']:.6f} mean log-variance {sum(lv) / len(lv):+.2f}",
              flush=True)
    return write_result(argv, args, {"runs": runs}, plot)


if __name__ == "__main__":
    main()
