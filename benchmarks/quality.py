"""Estimator quality on the seed VAE: training -ELBO curve and exact test -ELBO after E epochs, several seeds.

    python benchmarks/quality.py --impls graph,storchastic --methods sf10_batch_average,expect --seeds 0,1 --epochs 1

Every (implementation, method, seed) runs in its own process with the same initialization and data order
(seeded shuffling); the test -ELBO is computed exactly (all 100 configurations) on the 10000 test images.
Writes ``benchmarks/results/quality_cpu.json``. ``--dtype float64`` trains in float64 (same float32 initialization,
cast): implementations of one deterministic estimator then part only where float64 rounding grows, which
separates differences in the math from float32 rounding amplified by training (the JSON's ``agreement``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def grad_stats(lib, method: str, model, batch, n_grads: int) -> dict:
    """The seed tutorial's checkpoint numbers for a Storchastic-compatible ``lib`` (fastgrad or storchastic):
    variance over ``n_grads`` estimates of ``z.param_grads["probs"]`` and the squared bias of their mean against
    the exact gradient from Expect. Parameters are not updated."""
    import torch
    from torch.distributions import OneHotCategorical

    from benchmarks.vae_impls import storch_method

    def story(m):
        x = lib.denote_independent(batch.view(-1, 784), 0, "data")
        q = OneHotCategorical(probs=model.encode(x).reshape(-1, 2, 10).softmax(dim=-1))
        z = m(q)
        prior = OneHotCategorical(probs=torch.ones_like(q.probs) / 10.0)
        lib.add_cost(torch.distributions.kl_divergence(q, prior).sum(-1), "kl-div")
        rec = model.decode(z.reshape(z.shape[:-2] + (2 * 10,)))
        lib.add_cost(torch.nn.BCELoss(reduction="none")(rec, x).sum(-1), "reconstruction")
        lib.backward()
        return z.param_grads["probs"]

    exact = story(lib.method.Expect("z"))
    m = storch_method(lib, method)
    grads = lib.gather_samples([story(m) for _ in range(n_grads)], "gradients")
    mean = lib.reduce_plates(grads, "gradients")
    bias = lib.reduce_plates((mean - exact) ** 2).sum()
    model.zero_grad()
    return {"grad_variance": float(lib.variance(grads, "gradients")._tensor), "grad_bias": float(bias._tensor)}


def worker(impl: str, method: str, seed: int, epochs: int, max_steps: int, eval_every: int = 300,
           n_grads: int = 20, dtype: str = "float32", threads: int = 2) -> dict:
    import torch

    torch.set_num_threads(threads)
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    from benchmarks import vae_impls
    from fastgrad.examples.discrete_vae import exact_neg_elbo
    from fastgrad.examples.mnist import batches, load_mnist

    images, _ = load_mnist("train")
    test, _ = load_mnist("test")
    model = vae_impls.make_model(seed)  # initialized in float32 in every run, then cast
    # float64 runs separate the estimators' math from float32 rounding: implementations of the same
    # deterministic estimator (Expect) then follow one trajectory for hundreds of steps.
    dt = getattr(torch, dtype)
    torch.set_default_dtype(dt)
    images, test = images.to(dt), test.to(dt)
    model.to(dt)
    step = vae_impls.IMPLS[impl](method, model, images[:64])
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    lib = None
    if impl in ("graph", "storchastic") and method != "expect":
        import importlib

        lib = importlib.import_module("fastgrad" if impl == "graph" else "storch")
    checkpoints = []
    eval_batch = test[:64]
    elbos, n, by_epoch = [], 0, []
    t0 = time.perf_counter()
    for _ in range(epochs):
        for batch in batches(images, 64, gen):
            if n >= max_steps:
                break
            elbos.append(step(batch))
            n += 1
            if lib is not None and n % eval_every == 0:
                checkpoints.append({"step": n, **grad_stats(lib, method, model, eval_batch, n_grads)})
        by_epoch.append(exact_neg_elbo(model, test))  # exact test -ELBO after every epoch
    return {"impl": impl, "method": method, "seed": seed, "dtype": dtype, "steps": n,
            "seconds": time.perf_counter() - t0, "test_neg_elbo": by_epoch[-1], "test_neg_elbo_by_epoch": by_epoch,
            "train_elbo": elbos, "checkpoints": checkpoints}


def _median_checkpoint(rs: list, key: str):
    """Median over seeds and checkpoints of a gradient statistic (None when no run has checkpoints). The median:
    gradients w.r.t. probs scale like 1/p, so a few checkpoints with tiny probabilities dominate any mean."""
    vals = [k[key] for r in rs for k in r.get("checkpoints", [])]
    return statistics.median(vals) if vals else None


def _first(pairs: list, apart) -> object:
    """Index of the first pair for which ``apart(a, b)`` holds, or None."""
    return next((i for i, (a, b) in enumerate(pairs) if apart(a, b)), None)


def _threads_per_run(jobs: int) -> int:
    return max(1, (os.cpu_count() or 1) // jobs)


def write(runs: list, args) -> dict:
    """Summarize the runs so far and write the JSON (after every run: a cut-off sweep keeps what it has)."""
    rows, curves = [], []
    for method in args.methods.split(","):
        for impl in args.impls.split(","):
            rs = [r for r in runs if r["impl"] == impl and r["method"] == method]
            if not rs:
                continue
            tests = [r["test_neg_elbo"] for r in rs]
            first = [r.get("test_neg_elbo_by_epoch", [r["test_neg_elbo"]])[0] for r in rs]
            rows.append({"impl": impl, "method": method, "seeds": len(rs), "test_mean": statistics.mean(tests),
                         "test_sd": statistics.stdev(tests) if len(tests) > 1 else 0.0,
                         "epoch1_mean": statistics.mean(first),
                         "epoch1_sd": statistics.stdev(first) if len(first) > 1 else 0.0,
                         "seed_list": [r["seed"] for r in rs],
                         "grad_variance_median": _median_checkpoint(rs, "grad_variance"),
                         "grad_bias_median": _median_checkpoint(rs, "grad_bias"),
                         "train_mean": statistics.mean(statistics.mean(r["train_elbo"][-100:]) for r in rs),
                         "per_seed": tests})
            for r in rs:
                e = r["train_elbo"]
                k = 50  # moving average for the plot
                sm = [statistics.mean(e[max(0, i - k): i + 1]) for i in range(0, len(e), 10)]
                curves.append({"impl": impl, "method": method, "seed": r["seed"],
                               "steps": list(range(0, len(e), 10)), "elbo": sm,
                               "checkpoints": r.get("checkpoints", [])})
    from benchmarks.vae_step import machine

    # Where the training trajectories of two implementations of one method part: the first step at which their
    # training -ELBOs differ by more than 1e-9 (relative) and by more than 0.1 nats. Same-math implementations
    # that part early do so by rounding; a difference in the math shows from step 0.
    agreement = []
    impls = args.impls.split(",")
    for r in runs:
        for o in runs:
            same_run = (o["method"], o["seed"]) == (r["method"], r["seed"])
            if not same_run or impls.index(o["impl"]) <= impls.index(r["impl"]):
                continue
            pairs = list(zip(r["train_elbo"], o["train_elbo"]))
            agreement.append({"method": r["method"], "seed": r["seed"], "impls": [r["impl"], o["impl"]],
                              "first_step_rel_diff_gt_1e-9": _first(pairs, lambda a, b: abs(a - b) > 1e-9 * abs(b)),
                              "first_step_abs_diff_gt_0.1": _first(pairs, lambda a, b: abs(a - b) > 0.1),
                              "test_diff": r["test_neg_elbo"] - o["test_neg_elbo"]})

    # threads: what each run got (machine() reports this process's torch threads)
    out = {"machine": {**machine(), "threads": _threads_per_run(args.jobs), "jobs": args.jobs},
           "epochs": args.epochs, "dtype": args.dtype, "rows": rows, "curves": curves, "agreement": agreement,
           "note": f"{args.epochs} epoch(s), batch 64, Adam 1e-3, same seeds, initialization and data order for "
                   "every implementation; test -ELBO exact over the 100 latent configurations, after epoch 1 and "
                   "after the last epoch."}
    Path(args.out).write_text(json.dumps(out, indent=1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--impls", default="graph,storchastic")
    ap.add_argument("--methods", default="sf10_batch_average,expect")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=10**9)
    ap.add_argument("--eval-every", type=int, default=300, help="steps between gradient variance/bias checkpoints")
    ap.add_argument("--n-grads", type=int, default=20, help="gradient estimates per checkpoint")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                    help="parameters and data (the model is initialized in float32 either way)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (each then gets cores // jobs threads)")
    ap.add_argument("--out", default=str(HERE / "results" / "quality_cpu.json"))
    ap.add_argument("--worker", nargs=3, metavar=("IMPL", "METHOD", "SEED"))
    ap.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.jobs < 1:
        ap.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.worker:
        impl, method, seed = args.worker
        print(json.dumps(worker(impl, method, int(seed), args.epochs, args.max_steps, args.eval_every, args.n_grads,
                                args.dtype, args.threads)))
        return
    threads = _threads_per_run(args.jobs)
    todo = [(impl, method, seed) for seed in map(int, args.seeds.split(","))
            for method in args.methods.split(",") for impl in args.impls.split(",")]

    def run(job):
        impl, method, seed = job
        cmd = [sys.executable, __file__, "--worker", impl, method, str(seed), "--epochs", str(args.epochs),
               "--max-steps", str(args.max_steps), "--eval-every", str(args.eval_every),
               "--n-grads", str(args.n_grads), "--dtype", args.dtype, "--threads", str(threads)]
        return job, subprocess.run(cmd, capture_output=True, text=True)

    runs = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for (impl, method, seed), p in pool.map(run, todo):
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
