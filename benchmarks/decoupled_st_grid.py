"""Decoupled Straight-Through's bias and variance over a grid of forward and backward temperatures, against the exact
gradient on the seed VAE (Shah et al. 2024, arXiv 2410.13331, whose first version shows such grids as heatmaps).

    python benchmarks/decoupled_st_grid.py --out benchmarks/results/decoupled_st_grid_cpu.json

The protocol of ``estimator_variance.py`` (its checkpoints, batch, 100 estimates per configuration, the gradient
carried to the encoder's logits), with one row per ``(forward_temperature, backward_temperature)`` named
``decoupled-st tf=.. tb=..`` and straight-through Gumbel-softmax at temperature 1 for scale. The paper's figures
were not available to us; a third-party summary of its first version states that raising the backward temperature
lowers both bias and variance and raising the forward one raises both: the JSON is what fastgrad measures of that.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks import estimator_variance as ev  # noqa: E402


def grid_names(forward, backward) -> list:
    names = []
    for tf in forward:
        for tb in backward:
            name = f"decoupled-st tf={tf:g} tb={tb:g}"
            ev.ESTIMATORS[name] = (lambda tf, tb: lambda E: ev.M.DecoupledStraightThrough(
                "z", n_samples=E, forward_temperature=tf, backward_temperature=tb))(tf, tb)
            names.append(name)
    return names


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--forward", default="0.5,1,2", help="forward temperatures")
    ap.add_argument("--backward", default="0.5,1,2", help="backward temperatures")
    ap.add_argument("--budget", type=int, default=8, help="decoder evaluations per data point")
    ap.add_argument("--n-grads", type=int, default=100)
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--out", default=None)
    args, rest = ap.parse_known_args(argv)
    names = grid_names([float(t) for t in args.forward.split(",")], [float(t) for t in args.backward.split(",")])
    forwarded = ["--estimators", ",".join(["straight-through"] + names), "--budgets", str(args.budget),
                 "--n-grads", str(args.n_grads), "--train-steps", str(args.train_steps)] + rest
    if args.out:
        forwarded += ["--out", args.out]
    result = ev.main(forwarded)
    result["command"] = " ".join(["decoupled_st_grid.py"] + (argv if argv is not None else sys.argv[1:]))
    if args.out:  # the command this script was run with, not the one it forwarded
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
