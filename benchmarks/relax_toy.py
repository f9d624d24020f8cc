"""CPU-scale reproduction of Grathwohl et al. 2018 (RELAX), figure 1: minimise E[(b - t)^2], b ~ Bernoulli(sigmoid(
theta)), t = 0.499, with Adam on theta, for REINFORCE, REBAR, RELAX (and ARM, DisARM); the exact loss at each step
and the estimator's log-variance at theta every ``--every`` steps (from ``--var-draws`` extra draws).

    .venv/bin/python benchmarks/relax_toy.py --out benchmarks/results/relax_toy_cpu.json [--plot]

The paper: RELAX's loss falls fastest and its gradient log-variance is the lowest; REBAR and REINFORCE are
slower (figure only, no table). The optimum is b = 0 (f(0) = 0.249 < f(1) = 0.251): the loss tends to
0.249 as sigmoid(theta) -> 0.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import warnings

import torch
from torch.distributions import Bernoulli

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastgrad as storch  # noqa: E402
from benchmarks._results import write_result  # noqa: E402

T = 0.499


def make(name: str):
    if name == "reinforce":
        return storch.method.ScoreFunction("z")
    if name == "rebar":
        return storch.method.REBAR("z")
    if name == "relax":
        return storch.method.RELAX("z", in_dim=1)
    if name == "arm":
        return storch.method.ARM("z")
    if name == "disarm":
        return storch.method.DisARM("z")
    raise ValueError(name)


def estimate(method, theta: torch.Tensor) -> torch.Tensor:
    th = theta.detach().clone().requires_grad_()
    z = method(Bernoulli(logits=th))
    storch.add_cost(((z - T) ** 2).sum(-1), "f")
    storch.backward()
    return th.grad.detach()


def run(name: str, steps: int, every: int, var_draws: int, lr: float, seed: int) -> dict:
    torch.manual_seed(seed)
    theta = torch.zeros(1, requires_grad=True)
    method = make(name)
    opt = torch.optim.Adam([theta] + list(method.parameters()), lr=lr)
    rows = []
    for step in range(steps + 1):
        if step % every == 0:
            with torch.no_grad():
                p = torch.sigmoid(theta).item()
            loss = p * (1 - T) ** 2 + (1 - p) * T ** 2
            # the estimator's variance at the current theta; the control variate is not updated meanwhile
            saved = [q.detach().clone() for q in method.parameters()]
            g = torch.stack([estimate(method, theta) for _ in range(var_draws)])
            with torch.no_grad():
                for q, s in zip(method.parameters(), saved):
                    q.copy_(s)
            rows.append({"step": step, "theta": theta.item(), "loss": loss,
                         "log_variance": math.log(max(g.var().item(), 1e-300))})
        if step == steps:
            break
        opt.zero_grad()
        th = theta
        z = method(Bernoulli(logits=th))
        storch.add_cost(((z - T) ** 2).sum(-1), "f")
        storch.backward()
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
        # DisARM's variance is exactly 0 at theta = 0: drawn at the floor of the axis
        ax[1].plot(xs, [max(x["log_variance"], -40.0) for x in r["rows"]], label=r["method"])
    ax[0].set_ylabel("loss E[(b - 0.499)^2]")
    ax[1].set_ylabel("log variance of the gradient estimate (floor -40)")
    for a in ax:
        a.set_xlabel("step")
    ax[0].legend()
    fig.suptitle("Grathwohl et al. 2018, fig. 1, on this CPU (fastgrad)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="reinforce,rebar,relax,arm,disarm")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--var-draws", type=int, default=200)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", action="store_true", help="also write the .png beside --out")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
    torch.set_num_threads(1)
    runs = [run(m, args.steps, args.every, args.var_draws, args.lr, args.seed) for m in args.methods.split(",")]
    for r in runs:
        last = r["rows"][-1]
        print(f"{r['method']:10s} final loss {last['loss']:.6f} theta {last['theta']:+.3f} "
              f"mean log-variance {sum(x['log_variance'] for x in r['rows']) / len(r['rows']):+.2f}")
    return write_result(argv, args, {"runs": runs}, plot)


if __name__ == "__main__":
    main()
