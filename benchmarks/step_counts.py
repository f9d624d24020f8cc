"""Python-level work per seed-VAE step, per implementation and method: counts, not seconds (repeatable on a noisy
machine). For each step (after two warm-up steps): Python function calls (``sys.setprofile`` call events),
entries into fastgrad's plate dispatch (``fastgrad._tensor.apply``), and ATen ops run (a ``TorchDispatchMode``
counter: each op allocates its outputs, so this is also the number of tensor-producing calls).

    .venv/bin/python benchmarks/step_counts.py --out benchmarks/results/step_counts_cpu.json

``graph`` minus ``plain_distributions`` is fastgrad's own share of the tutorial's step (the issue's goal is
measured in time by vae_step.py; these counts say where that time goes).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import vae_impls  # noqa: E402


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def count(step) -> dict:
    import fastgrad._tensor as T

    calls = [0]
    applies = [0]
    orig = T.apply

    def counted_apply(*a, **k):
        applies[0] += 1
        return orig(*a, **k)

    def prof(frame, event, arg):
        if event == "call":
            calls[0] += 1

    T.apply = counted_apply
    # the Tensor methods and __torch_function__ call apply through the module global
    try:
        mode = _OpCounter()
        sys.setprofile(prof)
        try:
            with mode:
                step()
        finally:
            sys.setprofile(None)
    finally:
        T.apply = orig
    # the counting wrapper itself is one call per dispatch: not counted
    return {"python_calls": calls[0] - applies[0], "plate_dispatches": applies[0], "aten_ops": mode.ops}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impls", default="plain,plain_distributions,graph,functional")
    ap.add_argument("--methods", default=",".join(vae_impls.METHODS))
    ap.add_argument("--out", default=None, help="JSON output (default: print only)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from fastgrad.examples.mnist import load_mnist

    images, _ = load_mnist("train")
    data = images[:64]
    rows = []
    for method in args.methods.split(","):
        for impl in args.impls.split(","):
            model = vae_impls.make_model(0)
            step = vae_impls.IMPLS[impl](method, model, data)
            step()
            step()
            c = count(step)
            rows.append(dict(method=method, impl=impl, **c))
            print(f"{method:20s} {impl:20s} {c}")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"command": " ".join(sys.argv), "commit": commit,
              "machine": {"node": platform.node(), "processor": platform.processor(), "torch": torch.__version__,
                          "python": platform.python_version()},
              "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
