"""The communication cost of a vocabulary-parallel fused LM head on the CPU (gloo): the time of one
``linear_policy_loss`` forward + backward step with the head split over 2 and 4 processes, against the single
process on the whole head, at equal total work (the same N, H, V; each process gets ``cores / ranks`` threads, so the
machine's compute is the same in every row). The ratio measures what the two O(1)-per-token all-reduces per block,
the dX all-reduce and the processes' overhead cost.

    .venv/bin/python -m benchmarks.vocab_parallel --out benchmarks/results/vocab_parallel_cpu.json

Each rank writes its step times; the row reports the slowest rank's median.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

import torch

from ._results import write_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inputs(N, H, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N // 64, 64, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5
    index = torch.randint(0, V, (N // 64, 64), generator=g)
    adv = torch.randn(N // 64, generator=g)
    return hidden, weight, index, adv


def _steps(hidden, weight, index, adv, reps, **tp):
    import fastgrad.functional as F

    times = []
    for _ in range(reps + 1):  # the first one warms up
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        t0 = time.perf_counter()
        loss, _ = F.linear_policy_loss(h, w, index, adv, loss="ppo_clip", **tp)
        loss.backward()
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[len(times[1:]) // 2]


def rank_main(rank, world, port, out, N, H, V, reps):
    import torch._dynamo  # noqa: F401  before init_process_group, see docs/distributed.md
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    hidden, weight, index, adv = _inputs(N, H, V)
    per = -(-V // world)
    lo, hi = min(V, rank * per), min(V, (rank + 1) * per)
    dist.barrier()
    t = _steps(hidden, weight[lo:hi], index, adv, reps, tp_group=dist.group.WORLD, vocab_start=lo)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"median_s": t}, f)
    dist.barrier()
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(N, H, V, ranks: List[int], reps: int) -> dict:
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    hidden, weight, index, adv = _inputs(N, H, V)
    rows = [{"ranks": 1, "threads_per_rank": cores, "median_s": _steps(hidden, weight, index, adv, reps)}]
    for world in ranks:
        threads = max(1, cores // world)
        with tempfile.TemporaryDirectory() as out:
            port = _free_port()
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT)
            procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.vocab_parallel", "--rank", str(r),
                                       "--world", str(world), "--port", str(port), "--dir", out, "--N", str(N),
                                       "--H", str(H), "--V", str(V), "--reps", str(reps)], cwd=ROOT, env=env)
                     for r in range(world)]
            for p in procs:
                if p.wait(timeout=1800) != 0:
                    raise RuntimeError(f"a rank of the {world}-process run failed")
            times = [json.load(open(os.path.join(out, f"rank{r}.json")))["median_s"] for r in range(world)]
        rows.append({"ranks": world, "threads_per_rank": threads, "median_s": max(times),
                     "per_rank_s": times})
    base = rows[0]["median_s"]
    for r in rows:
        r["vs_single_process"] = round(r["median_s"] / base, 3)
    return {"shape": [N, H, V], "rows": rows}


def main(argv: Optional[List[str]] = None) -> Optional[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--N", type=int, default=1024)
    p.add_argument("--H", type=int, default=1024)
    p.add_argument("--V", type=int, default=32000)
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank is not None:  # one rank of a run started by run()
        rank_main(args.rank, args.world, args.port, args.dir, args.N, args.H, args.V, args.reps)
        return None
    result = write_result(argv, args, run(args.N, args.H, args.V, args.ranks, args.reps))
    for r in result["rows"]:
        print(f"{r['ranks']} rank(s) x {r['threads_per_rank']} threads: {r['median_s']:.3f} s "
              f"({r['vs_single_process']}x the single process)")
    return result


if __name__ == "__main__":
    main()
