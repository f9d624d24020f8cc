"""The bias of the KL-penalty gradients LLM RL trainers use, against the exact gradient (issue 27, section 3).

A trainer adds ``beta * k(logp_y - ref_y)`` per sampled token ``y ~ pi`` and differentiates through ``logp_y`` only
(GRPO, TRL, verl). Its expected gradient w.r.t. the logits is ``sum_y pi_y k'(logp_y - ref_y) (e_y - pi)``; this
script computes it by exact enumeration of a small vocabulary, for each estimator of
:data:`fastgrad.ops.linear_policy_loss.KLS`, and compares it with the gradient of the exact ``KL(pi || pi_ref)``
(``kl="full"``): ``pi * (log pi - log pi_ref - KL)``. What "A Comedy of Estimators" (Shah et al. 2025) reports for
LLM RL, checked here exactly: ``k1``'s expected gradient is zero, ``k2``'s (and ``k3+``'s, TRL's bias-corrected k3
on-policy) is exact, ``k3``'s is the gradient of the reverse ``KL(pi_ref || pi)``, ``pi - pi_ref``.

    .venv/bin/python -m benchmarks.kl_estimators --out benchmarks/results/kl_estimators_cpu.json --plot

Deterministic (no sampling): the numbers are expectations, exact to float64 rounding.
"""
from __future__ import annotations

import argparse
from typing import List, Optional

import torch

from fastgrad.ops.linear_policy_loss import KLS

from ._results import write_result


def expected_gradients(theta: torch.Tensor, ref: torch.Tensor) -> dict:
    """Per estimator: ``E_{y ~ pi}[d k(logp_y - ref_y) / d theta]`` (through ``logp_y``) by enumeration; and the
    exact ``d KL(pi || pi_ref) / d theta``."""
    lp = torch.log_softmax(theta, -1)
    lq = torch.log_softmax(ref, -1)
    pi = lp.exp()
    kl = (pi * (lp - lq)).sum()
    exact = pi * (lp - lq - kl)
    eye = torch.eye(theta.numel(), dtype=theta.dtype)
    grads = {}
    for name, est in KLS.items():
        d = lp - lq
        kprime = est.dvalue(d)  # dk/dlogp_y
        grads[name] = (pi[:, None] * kprime[:, None] * (eye - pi[None, :])).sum(0)
    return {"exact": exact, "kl": float(kl), "reverse_kl_grad": pi - lq.exp(), **grads}


def run(V: int, scales: List[float], seeds: int) -> dict:
    rows = []
    for scale in scales:
        for seed in range(seeds):
            g = torch.Generator().manual_seed(seed)
            theta = torch.randn(V, generator=g, dtype=torch.float64) * 2
            ref = theta + scale * torch.randn(V, generator=g, dtype=torch.float64)
            out = expected_gradients(theta, ref)
            exact = out["exact"]
            row = {"scale": scale, "seed": seed, "kl": out["kl"]}
            for name in KLS:
                gr = out[name]
                row[f"{name}_rel_err"] = float((gr - exact).norm() / exact.norm())
                row[f"{name}_cos"] = float(torch.nn.functional.cosine_similarity(gr, exact, dim=0))
            row["k3_minus_reverse_kl_grad"] = float((out["k3"] - out["reverse_kl_grad"]).abs().max())
            rows.append(row)
    summary = {}
    for scale in scales:
        sub = [r for r in rows if r["scale"] == scale]
        summary[str(scale)] = {"kl_mean": sum(r["kl"] for r in sub) / len(sub),
                               **{f"{n}_rel_err_mean": sum(r[f"{n}_rel_err"] for r in sub) / len(sub) for n in KLS},
                               **{f"{n}_cos_mean": sum(r[f"{n}_cos"] for r in sub) / len(sub) for n in KLS}}
    return {"rows": rows, "summary": summary}


def _plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    kls = [s[k]["kl_mean"] for k in s]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in KLS:
        ax.plot(kls, [s[k][f"{name}_rel_err_mean"] for k in s], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("KL(pi || pi_ref), mean over seeds")
    ax.set_ylabel("||E[grad] - grad KL|| / ||grad KL||")
    ax.set_title(f"KL-penalty gradients vs the exact KL, V = {result['args']['vocab']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=32)
    p.add_argument("--scales", type=float, nargs="+", default=[0.03, 0.1, 0.3, 1.0, 3.0])
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--out", default=None)
    p.add_argument("--plot", action="store_true")
    args = p.parse_args(argv)
    result = write_result(argv, args, run(args.vocab, args.scales, args.seeds), _plot)
    for k, v in result["summary"].items():
        print(f"scale {k}: KL {v['kl_mean']:.4f}  " + "  ".join(f"{n} {v[f'{n}_rel_err_mean']:.3f}" for n in KLS))
    return result


if __name__ == "__main__":
    main()
