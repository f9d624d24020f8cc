"""Seed VAE step time of the estimators both fastgrad and Storchastic ship, side by side.

    python benchmarks/method_step.py --out benchmarks/results/method_step_cpu.json

The tutorial's training step (its story, ``backward``, Adam) with each method under the same Storchastic name and
arguments, fastgrad (``graph``) and Storchastic 0.3.7 each in a process of its own (Storchastic patches torch at
import), alternating within every round so that the machine's drift hits both alike. Cells: the median step time
per process, and the median over rounds of Storchastic's time over fastgrad's in the same round. Storchastic's
ScoreFunctionWOR computes a wrong gradient (its cost enters twice) and its GumbelSparseMax/GumbelEntmax ignore
``straight_through``; their times are still what a user switching pays. The ``bern_*`` methods run the demo's story
with 200 Bernoulli latents; a method that fails records its error under ``failures``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = "sf_wor4,unordered_set4,rao_blackwell4,gumbel_wor4,gumbel_sparsemax,gumbel_entmax,sf1,expect"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--impls", default="graph,storchastic")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    impls = args.impls.split(",")
    runs = []
    skipped = {}
    failures = {}  # impl/method -> the error's last line (Storchastic's ARM and DisARM fail on the Bernoulli story)
    for r in range(args.rounds):
        for method in args.methods.split(","):
            for impl in impls if r % 2 == 0 else impls[::-1]:
                if impl in skipped:
                    continue
                cmd = [sys.executable, str(HERE / "vae_step.py"), "--worker", impl, method, "--steps",
                       str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode != 0:
                    last = (p.stderr.strip().splitlines() or ["?"])[-1]
                    if "ModuleNotFoundError" in p.stderr:
                        skipped[impl] = last
                    failures[f"{impl}/{method}"] = last
                    print(f"{impl}/{method} failed: {last}", file=sys.stderr)
                    continue
                res = json.loads(p.stdout.strip().splitlines()[-1])
                runs.append({"round": r, "impl": impl, "method": method, "median_s": res["median_s"]})
                print(f"round {r} {method:18s} {impl:12s} {res['median_s'] * 1e3:8.2f} ms", file=sys.stderr)
    table = {}
    for method in args.methods.split(","):
        row = {}
        for impl in impls:
            meds = [x["median_s"] for x in runs if x["method"] == method and x["impl"] == impl]
            if meds:
                row[impl] = {"median_ms": statistics.median(meds) * 1e3}
        ratios = []
        for r in range(args.rounds):
            a = [x["median_s"] for x in runs if x["round"] == r and x["method"] == method and x["impl"] == impls[0]]
            b = [x["median_s"] for x in runs if x["round"] == r and x["method"] == method and x["impl"] == impls[-1]]
            if a and b:
                ratios.append(b[0] / a[0])
        if ratios:
            row["ratio"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
        table[method] = row
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=HERE.parent).stdout.strip()
    out = {"command": " ".join(["method_step.py"] + (argv if argv is not None else sys.argv[1:])), "commit": commit,
           "machine": {"node": platform.node(), "processor": platform.processor(), "threads": args.threads},
           "args": vars(args), "table": table, "skipped": skipped, "failures": failures, "runs": runs}
    for method, row in table.items():
        print(f"{method:18s} " + " ".join(f"{i} {row[i]['median_ms']:.1f} ms" for i in impls if i in row)
              + (f"  {impls[-1]}/{impls[0]} x{row['ratio']['median']:.2f}" if "ratio" in row else ""))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
