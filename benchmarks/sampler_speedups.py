"""The two sampler speed-ups the sequence work stands on, measured in interleaved rounds in one process (best of
``--rounds`` per implementation, and the median of the per-round ratios), beside the machine's copy bandwidth:

* sampling ``k`` distinct categories per row: fastgrad's fused Gumbel-top-k against
  ``torch.multinomial(softmax(logits), k, replacement=False)`` at (131072 rows, K = 128, k = 8);
* the Gumbel-softmax relaxation, forward and backward with a given upstream gradient: fastgrad's fused op
  (``n = 16`` samples drawn and relaxed in one pass) against ``torch.nn.functional.gumbel_softmax`` on the logits
  repeated 16 times, at (1024, 32, 128).

    .venv/bin/python -m benchmarks.sampler_speedups --out benchmarks/results/sampler_speedups_cpu.json
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import List, Optional

import torch

import fastgrad.functional as F

from ._results import write_result


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cases(small: bool):
    R, K, k = (4096, 128, 8) if small else (131072, 128, 8)
    logits = torch.randn(R, K, generator=torch.Generator().manual_seed(0))
    probs = torch.softmax(logits, -1)
    topk = {"fastgrad_gumbel_topk": lambda: F.gumbel_topk(logits, k, seed=1),
            "torch_multinomial": lambda: torch.multinomial(torch.softmax(logits, -1), k, replacement=False)}
    del probs
    shape, n = ((64, 32, 128), 16) if small else ((1024, 32, 128), 16)
    lg = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    up = torch.randn((n,) + shape, generator=torch.Generator().manual_seed(2))

    def fused():
        x = lg.clone().requires_grad_(True)
        y = F.gumbel_softmax(x, 1.0, n, seed=3)
        y.backward(up)

    def eager():
        x = lg.clone().requires_grad_(True)
        y = torch.nn.functional.gumbel_softmax(x.unsqueeze(0).expand((n,) + shape), tau=1.0)
        y.backward(up)

    gs = {"fastgrad_gumbel_softmax": fused, "torch_gumbel_softmax": eager}
    return {"gumbel_topk": ((R, K, k), topk), "gumbel_softmax_fwd_bwd": ((shape, n), gs)}


def run(rounds: int, small: bool) -> dict:
    out = {}
    for name, (shape, impls) in cases(small).items():
        for fn in impls.values():  # warm-up
            fn()
        times = {k: [] for k in impls}
        for r in range(rounds):  # interleaved, alternating the order
            order = list(impls) if r % 2 == 0 else list(impls)[::-1]
            for k in order:
                times[k].append(_time(impls[k]))
        fast, slow = list(impls)
        ratios = [b / a for a, b in zip(times[fast], times[slow])]
        out[name] = {"shape": str(shape), "best_s": {k: min(v) for k, v in times.items()},
                     "median_s": {k: statistics.median(v) for k, v in times.items()},
                     "speedup_best": min(times[slow]) / min(times[fast]),
                     "speedup_median_of_rounds": statistics.median(ratios),
                     "speedup_min_of_rounds": min(ratios)}
    x = torch.empty(64 * 2**20 // 4)
    t = min(_time(lambda: x.clone()) for _ in range(5))
    out["copy_bandwidth_gb_s"] = 2 * x.numel() * 4 / t / 1e9
    return out


def main(argv: Optional[List[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--small", action="store_true", help="smoke sizes")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    result = write_result(argv, args, {"threads": torch.get_num_threads(), **run(args.rounds, args.small)})
    for name in ("gumbel_topk", "gumbel_softmax_fwd_bwd"):
        r = result[name]
        print(f"{name} {r['shape']}: best {r['best_s']}, speed-up best/best {r['speedup_best']:.1f}x, "
              f"median of rounds {r['speedup_median_of_rounds']:.1f}x, worst round {r['speedup_min_of_rounds']:.1f}x")
    print(f"copy bandwidth {result['copy_bandwidth_gb_s']:.1f} GB/s")
    return result


if __name__ == "__main__":
    main()
