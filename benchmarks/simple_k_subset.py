"""SIMPLE's bias and variance on a k-subset toy, against the exact gradient (Ahmed et al., ICLR 2023, section 6's
claim: lower bias and variance than the relaxations, straight-through Gumbel-softmax included at k = 1).

    python benchmarks/simple_k_subset.py --out benchmarks/results/simple_k_subset_cpu.json

The toy: ``n`` items with logits ``theta`` (standard normal), a target ``b`` (uniform), the k-subset distribution
``p(z) ∝ exp(<theta, z>)`` over ``z in {0,1}^n`` with ``sum z = k``, and the cost ``f(z) = ||z - b||^2``. The exact
gradient of ``E[f]`` sums over the ``C(n, k)`` subsets. Each estimator gives ``--draws`` independent one-sample
estimates (one cost evaluation each); the JSON records, relative to the exact gradient's squared norm, the squared
bias of their mean (less the mean's own noise, variance / draws) and their variance, and the cosine between their
mean and the exact gradient. Estimators: SIMPLE (exact samples, the exact marginals' Jacobian backward), the score
function (unbiased; no baseline, one sample), and at ``k = 1`` (the categorical) straight-through Gumbel-softmax,
Gapped Straight-Through and ReinMax.
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import fastgrad.functional as F  # noqa: E402
from benchmarks._results import write_result  # noqa: E402


def cost(z: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((z - b) ** 2).sum(-1)


def exact_gradient(theta: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    n = theta.shape[0]
    Z = torch.zeros(math.comb(n, k), n, dtype=theta.dtype)
    for r, S in enumerate(itertools.combinations(range(n), k)):
        Z[r, list(S)] = 1.0
    t = theta.clone().requires_grad_()
    p = torch.softmax(Z @ t, 0)
    (p * cost(Z, b)).sum().backward()
    return t.grad


def log_partition(theta: torch.Tensor, k: int) -> torch.Tensor:
    """``log e_k(exp(theta))`` per row (the k-subset normalizer), by the O(n k) recursion."""
    E = torch.full(theta.shape[:-1] + (k + 1,), -1e30, dtype=theta.dtype)
    E[..., 0] = 0.0
    for i in range(theta.shape[-1]):
        E = torch.cat([E[..., :1], torch.logaddexp(E[..., 1:], E[..., :-1] + theta[..., i:i + 1])], -1)
    return E[..., k]


def estimates(name: str, theta: torch.Tensor, b: torch.Tensor, k: int, draws: int, seed: int) -> torch.Tensor:
    """``draws`` independent one-sample gradient estimates ``[draws, n]`` (each row its own copy of theta)."""
    rows = theta.expand(draws, -1).clone().requires_grad_()
    if name == "simple":
        z = F.simple(rows, k, seed=seed)[0]
        cost(z, b).sum().backward()
    elif name == "score-function":
        z = F.k_subset_sample(rows, k, seed=seed)[0]
        log_p = (rows * z).sum(-1) - log_partition(rows, k)
        (cost(z, b).detach() * log_p).sum().backward()
    elif name == "straight-through":
        z = F.gumbel_softmax(rows, 1.0, hard=True, seed=seed)[0]
        cost(z, b).sum().backward()
    elif name == "gapped-st":
        z = F.gapped_straight_through(rows, seed=seed)[0]
        cost(z, b).sum().backward()
    elif name == "reinmax":
        z = F.reinmax(rows, seed=seed)[0]
        cost(z, b).sum().backward()
    else:
        raise ValueError(name)
    return rows.grad.detach()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10, help="items")
    ap.add_argument("--ks", default="1,2,3,5")
    ap.add_argument("--draws", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    theta = torch.randn(args.n, generator=g, dtype=torch.float64)
    b = torch.rand(args.n, generator=g, dtype=torch.float64)
    rows = []
    t0 = time.perf_counter()
    for k in [int(x) for x in args.ks.split(",")]:
        exact = exact_gradient(theta, b, k)
        norm2 = float((exact ** 2).sum())
        names = ["simple", "score-function"] + (["straight-through", "gapped-st", "reinmax"] if k == 1 else [])
        for name in names:
            est = estimates(name, theta, b, k, args.draws, seed=args.seed + 1)
            mean = est.mean(0)
            var = float(((est - mean) ** 2).sum(1).mean())
            bias2 = float(((mean - exact) ** 2).sum()) - var / args.draws
            cos = float(torch.nn.functional.cosine_similarity(mean, exact, 0))
            rows.append({"k": k, "estimator": name, "relative_bias2": bias2 / norm2,
                         "relative_variance": var / norm2, "cosine": cos})
            print(f"k={k} {name:16s} bias^2 {bias2 / norm2:10.3g}  variance {var / norm2:10.3g}  cos {cos:.4f}")
    return write_result(argv, args, {"rows": rows, "seconds": time.perf_counter() - t0})


if __name__ == "__main__":
    main()
