"""Overlay several discrete-VAE runs: ``python -m fastgrad.examples.plot_runs RUN_DIR... [-o compare.png]``.

Each RUN_DIR is an ``--out-dir`` of :mod:`fastgrad.examples.discrete_vae` (``log.csv`` and ``summary.json``).
Panels: training -ELBO (moving average over 50 steps), gradient variance and squared gradient bias against Expect.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import List, Optional


def _label(summary: dict, folder: Path) -> str:
    a = summary.get("args", {})
    if not a:
        return folder.name
    lab = f"{a.get('method')} n={a.get('n_samples')}" + (f" {a['baseline']}" if a.get("baseline") else "")
    return lab + f" seed {a.get('seed')}"


def main(argv: Optional[List[str]] = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run folders (each with log.csv and summary.json)")
    ap.add_argument("-o", "--output", default="runs/discrete_vae/compare.png")
    ap.add_argument("--smooth", type=int, default=50, help="moving-average window of the training -ELBO")
    args = ap.parse_args(argv)
    if args.smooth < 1:
        ap.error("--smooth must be >= 1")
    runs = []
    for r in map(Path, args.runs):
        if not (r / "log.csv").exists() or not (r / "summary.json").exists():
            ap.error(f"{r} has no log.csv and summary.json (is it a discrete_vae --out-dir?)")
        with open(r / "log.csv") as f:
            rows = [(int(x["step"]), float(x["elbo"])) for x in csv.DictReader(f)]
        runs.append((r, rows, json.loads((r / "summary.json").read_text())))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plot_runs needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for folder, rows, summary in runs:
        label = _label(summary, folder)
        w = args.smooth
        ys = [y for _, y in rows]
        smooth = [sum(ys[max(0, i - w + 1): i + 1]) / len(ys[max(0, i - w + 1): i + 1]) for i in range(len(ys))]
        ax[0].plot([s for s, _ in rows], smooth, lw=1, label=label)
        ev = summary.get("evaluations", [])
        if ev:
            ax[1].semilogy([e["step"] for e in ev], [max(e["grad_variance"], 1e-30) for e in ev], "o-", label=label)
            if ev[0].get("grad_bias") is not None:  # None with Bernoulli latents (no exact gradient)
                ax[2].semilogy([e["step"] for e in ev], [max(e["grad_bias"], 1e-30) for e in ev], "o-",
                               label=label)
    for a, name in zip(ax, ("training -ELBO (moving average)", "gradient variance", "squared gradient bias")):
        a.set_xlabel("step")
        a.set_ylabel(name)
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
