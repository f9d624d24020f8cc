"""Estimator quality on the seed VAE: training -ELBO curve and exact test -ELBO after E epochs, several seeds.

    python benchmarks/quality.py --impls graph,storchastic --methods sf10_batch_average,expect --seeds 0,1 --epochs 1

Every (implementation, method, seed) runs in its own process with the same initialization and data order
(seeded shuffling); the test -ELBO is computed exactly (all 100 configurations) on the 10000 test images.
Writes ``benchmarks/results/quality_cpu.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def worker(impl: str, method: str, seed: int, epochs: int, max_steps: int) -> dict:
    import torch

    torch.set_num_threads(2)
    from benchmarks import vae_impls
    from fastgrad.examples.discrete_vae import exact_neg_elbo
    from fastgrad.examples.mnist import batches, load_mnist

    images, _ = load_mnist("train")
    test, _ = load_mnist("test")
    model = vae_impls.make_model(seed)
    step = vae_impls.IMPLS[impl](method, model, images[:64])
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    elbos, n = [], 0
    t0 = time.perf_counter()
    for _ in range(epochs):
        for batch in batches(images, 64, gen):
            if n >= max_steps:
                break
            elbos.append(step(batch))
            n += 1
    return {"impl": impl, "method": method, "seed": seed, "steps": n, "seconds": time.perf_counter() - t0,
            "test_neg_elbo": exact_neg_elbo(model, test), "train_elbo": elbos}


def write(runs: list, args) -> dict:
    """Summarize the runs so far and write the JSON (after every run: a cut-off sweep keeps what it has)."""
    rows, curves = [], []
    for method in args.methods.split(","):
        for impl in args.impls.split(","):
            rs = [r for r in runs if r["impl"] == impl and r["method"] == method]
            if not rs:
                continue
            tests = [r["test_neg_elbo"] for r in rs]
            rows.append({"impl": impl, "method": method, "seeds": len(rs), "test_mean": statistics.mean(tests),
                         "test_sd": statistics.stdev(tests) if len(tests) > 1 else 0.0,
                         "train_mean": statistics.mean(statistics.mean(r["train_elbo"][-100:]) for r in rs),
                         "per_seed": tests})
            for r in rs:
                e = r["train_elbo"]
                k = 50  # moving average for the plot
                sm = [statistics.mean(e[max(0, i - k): i + 1]) for i in range(0, len(e), 10)]
                curves.append({"impl": impl, "method": method, "seed": r["seed"],
                               "steps": list(range(0, len(e), 10)), "elbo": sm})
    from benchmarks.vae_step import machine

    out = {"machine": machine(), "epochs": args.epochs, "rows": rows, "curves": curves,
           "note": f"{args.epochs} epoch(s), batch 64, Adam 1e-3, same seeds, initialization and data order for "
                   "every implementation; test -ELBO exact over the 100 latent configurations."}
    Path(args.out).write_text(json.dumps(out, indent=1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--impls", default="graph,storchastic")
    ap.add_argument("--methods", default="sf10_batch_average,expect")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=10**9)
    ap.add_argument("--out", default=str(HERE / "results" / "quality_cpu.json"))
    ap.add_argument("--worker", nargs=3, metavar=("IMPL", "METHOD", "SEED"))
    args = ap.parse_args()
    if args.worker:
        impl, method, seed = args.worker
        print(json.dumps(worker(impl, method, int(seed), args.epochs, args.max_steps)))
        return
    runs = []
    for seed in map(int, args.seeds.split(",")):
        for method in args.methods.split(","):
            for impl in args.impls.split(","):
                cmd = [sys.executable, __file__, "--worker", impl, method, str(seed), "--epochs", str(args.epochs),
                       "--max-steps", str(args.max_steps)]
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode != 0:
                    print(f"{impl}/{method}/{seed} failed: {p.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                    continue
                r = json.loads(p.stdout.strip().splitlines()[-1])
                runs.append(r)
                write(runs, args)
                print(f"{impl:12s} {method:20s} seed {seed}: test -ELBO {r['test_neg_elbo']:.2f} "
                      f"({r['steps']} steps, {r['seconds']:.0f} s)", file=sys.stderr)
    out = write(runs, args)
    for r in out["rows"]:
        print(f"{r['impl']:12s} {r['method']:20s} test -ELBO {r['test_mean']:.2f} +- {r['test_sd']:.2f}")


if __name__ == "__main__":
    main()
