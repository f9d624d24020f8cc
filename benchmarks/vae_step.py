"""Seed VAE step time per method and implementation, each implementation in its own process, in rounds.

    python benchmarks/vae_step.py [--rounds 3] [--steps 60] [--impls plain,graph,functional,storchastic,pyro]

Each (round, method, implementation) runs in a fresh process: same seed, model initialization and batch, a few
warm-up steps, then the median of ``--steps`` step times. The report gives, per method and implementation, the
median over rounds of the per-round ratio to plain torch, with min and max. Implementations that do not patch
torch (plain, plain_distributions, graph, functional) are also timed interleaved step by step in one process;
their per-step ratios to the paired plain step (median and quartiles) are the low-noise comparison, run under
each glibc malloc mode of ``--malloc`` (see MALLOC). Each ``--paired`` library (Storchastic, Pyro) is timed the
same way against a plain torch step of its own, in a process of its own. Minor page faults per step are recorded
everywhere. Writes ``benchmarks/results/vae_step_<machine>.json``. Implementations whose package is missing are
skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def _setup(threads: int):
    """Thread count, the harness module and the benchmark batch (the first 64 training images)."""
    import torch

    torch.set_num_threads(threads)
    from benchmarks import vae_impls
    from fastgrad.examples.mnist import load_mnist

    images, _ = load_mnist("train")
    return vae_impls, images[:64].clone()


# glibc malloc settings per mode, the same for every implementation. "default" is what a user gets; its
# heuristics (a dynamic mmap threshold, trimming the heap top) return freed blocks of a few MB to the kernel
# and fault them back in on the next step, and whether that happens depends on each implementation's heap
# layout (measured: 0 to over 1000 page faults per step, flipping with the order steps run in). "steady"
# fixes the thresholds so that no implementation faults in steady state: the remaining difference is the work.
MALLOC = {"default": {}, "steady": {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}}


def _env(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(MALLOC[mode])
    return env


def _faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def worker(impl: str, method: str, steps: int, warmup: int, threads: int) -> dict:
    vae_impls, data = _setup(threads)
    model = vae_impls.make_model(0, method)
    step = vae_impls.IMPLS[impl](method, model, data)
    for _ in range(warmup):
        step()
    times = []
    f0 = _faults()
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {"impl": impl, "method": method, "median_s": statistics.median(times), "times_s": times,
            "faults_per_step": (_faults() - f0) / steps}


def worker_interleaved(method: str, impls: list, steps: int, warmup: int, threads: int) -> dict:
    """fastgrad and plain torch in one process (neither patches torch), step by step in turn: paired step
    times, far less exposed to the machine's drift than separate processes."""
    vae_impls, data = _setup(threads)
    fns = {i: vae_impls.IMPLS[i](method, vae_impls.make_model(0, method), data) for i in impls}
    times = {i: [] for i in impls}
    faults = {i: 0 for i in impls}
    for k in range(warmup + steps):
        for i in impls:
            f0 = _faults()
            t = time.perf_counter()
            fns[i]()
            if k >= warmup:
                times[i].append(time.perf_counter() - t)
                faults[i] += _faults() - f0
    return {"method": method, "times_s": times, "faults_per_step": {i: f / steps for i, f in faults.items()}}


def _interleaved_group(impls: list, method: str, mode: str, args, own_plain: bool) -> dict:
    """Rounds of :func:`worker_interleaved` for one group; per implementation the median and quartiles of its
    per-step ratio to the paired plain step (the plain row itself only when ``own_plain``)."""
    pairs = {i: [] for i in impls}
    ms = {i: [] for i in impls}
    faults = {i: [] for i in impls}
    for _ in range(args.rounds):
        cmd = [sys.executable, __file__, "--worker-interleaved", ",".join(impls), method,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
        p = subprocess.run(cmd, capture_output=True, text=True, env=_env(mode))
        if p.returncode != 0:
            last = (p.stderr.strip().splitlines() or ["?"])[-1]
            print(f"interleaved {','.join(impls)} {method} failed: {last}", file=sys.stderr)
            continue
        res = json.loads(p.stdout.strip().splitlines()[-1])
        ts = res["times_s"]
        for i in impls:
            pairs[i] += [a / b for a, b in zip(ts[i], ts["plain"])]
            ms[i] += ts[i]
            faults[i].append(res["faults_per_step"][i])
    row = {}
    for i, rs in pairs.items():
        if rs and (own_plain or i != "plain"):
            q = statistics.quantiles(rs, n=4) if len(rs) > 1 else [rs[0]] * 3
            row[i] = {"ratio_to_plain": statistics.median(rs), "ratio_q1": q[0], "ratio_q3": q[2],
                      "pairs": len(rs), "median_ms": statistics.median(ms[i]) * 1e3,
                      "faults_per_step": statistics.mean(faults[i])}
            if not own_plain:
                row[i]["paired_plain_ms"] = statistics.median(ms["plain"]) * 1e3
    return row


def machine() -> dict:
    import platform

    import torch

    info = {"machine": platform.node(), "processor": platform.processor(), "cores": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--impls", default="plain,graph,functional,storchastic,pyro")
    ap.add_argument("--methods", default="sf1,sf10_batch_average,gumbel,straight_through,expect")
    ap.add_argument("--out", default=str(HERE / "results" / "vae_step_cpu.json"))
    ap.add_argument("--interleaved", default="plain,plain_distributions,graph,functional",
                    help="implementations also timed step by step in one process (paired ratios); '' to skip")
    ap.add_argument("--paired", default="storchastic,pyro",
                    help="libraries each timed interleaved with plain torch in a process of their own; '' to skip")
    ap.add_argument("--malloc", default="default,steady",
                    help=f"glibc malloc modes for the interleaved runs, from {sorted(MALLOC)} (per-process rounds: "
                         "the first)")
    ap.add_argument("--worker", nargs=2, metavar=("IMPL", "METHOD"))
    ap.add_argument("--worker-interleaved", nargs=2, metavar=("IMPLS", "METHOD"))
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.warmup, args.threads)))
        return
    if args.worker_interleaved:
        impls, method = args.worker_interleaved
        print(json.dumps(worker_interleaved(method, impls.split(","), args.steps, args.warmup, args.threads)))
        return
    impls = [i for i in args.impls.split(",") if i]  # '' skips the per-process rounds
    methods = args.methods.split(",")
    modes = args.malloc.split(",")
    for m in modes:
        if m not in MALLOC:
            ap.error(f"--malloc: unknown mode {m!r}, expected one of {sorted(MALLOC)}")
    runs = []
    skipped = {}
    for r in range(args.rounds):
        for method in methods:
            for impl in impls:
                if impl in skipped:
                    continue
                cmd = [sys.executable, __file__, "--worker", impl, method, "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--threads", str(args.threads)]
                p = subprocess.run(cmd, capture_output=True, text=True, env=_env(modes[0]))
                if p.returncode != 0:
                    last = (p.stderr.strip().splitlines() or ["?"])[-1]
                    if "ModuleNotFoundError" in p.stderr or "ImportError" in p.stderr:
                        skipped[impl] = last
                        print(f"skip {impl}: {last}", file=sys.stderr)
                        continue
                    print(f"{impl}/{method} failed: {last}", file=sys.stderr)
                    continue
                res = json.loads(p.stdout.strip().splitlines()[-1])
                res["round"] = r
                runs.append(res)
                print(f"round {r} {method:20s} {impl:12s} {res['median_s'] * 1e3:8.2f} ms", file=sys.stderr)
    table = {}
    for method in methods:
        for impl in impls:
            ratios, meds = [], []
            for r in range(args.rounds):
                a = [x for x in runs if x["round"] == r and x["method"] == method and x["impl"] == impl]
                b = [x for x in runs if x["round"] == r and x["method"] == method and x["impl"] == "plain"]
                if a and b:
                    ratios.append(a[0]["median_s"] / b[0]["median_s"])
                    meds.append(a[0]["median_s"])
            if ratios:
                fl = [x["faults_per_step"] for x in runs if x["method"] == method and x["impl"] == impl]
                table.setdefault(method, {})[impl] = {
                    "ratio_to_plain": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                    "median_ms": statistics.median(meds) * 1e3, "faults_per_step": statistics.mean(fl)}
    interleaved = {}
    inter_impls = [i for i in args.interleaved.split(",") if i]
    if inter_impls and "plain" not in inter_impls:
        inter_impls.insert(0, "plain")
    # Groups of implementations timed step by step in one process. fastgrad's group shares one plain step;
    # each --paired library (Storchastic patches torch at import, so it cannot share a process with fastgrad)
    # gets its own process with its own plain step to pair with.
    groups = [inter_impls] if inter_impls else []
    groups += [["plain", lib] for lib in args.paired.split(",") if lib and lib not in skipped]
    for mode in modes if groups else ():
        for method in methods:
            row = {}
            for group in groups:
                row.update(_interleaved_group(group, method, mode, args, own_plain=group is groups[0]))
            interleaved.setdefault(mode, {})[method] = row
            print(f"interleaved[{mode}] {method:20s} "
                  + " ".join(f"{i} x{c['ratio_to_plain']:.3f} ({c['faults_per_step']:.0f} flt)"
                             for i, c in row.items()),
                  file=sys.stderr)
    out = {"machine": machine(), "rounds": args.rounds, "steps": args.steps, "table": table, "skipped": skipped,
           "malloc": {m: MALLOC[m] for m in modes}, "interleaved": interleaved,
           "runs": [{k: v for k, v in x.items() if k != "times_s"} for x in runs]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"{'method':20s} " + " ".join(f"{i:>22s}" for i in impls))
    for method, row in table.items():
        cells = []
        for i in impls:
            c = row.get(i)
            cells.append(f"{c['median_ms']:7.2f}ms x{c['ratio_to_plain']:.2f}".rjust(22) if c else " " * 22)
        print(f"{method:20s} " + " ".join(cells))


if __name__ == "__main__":
    main()
