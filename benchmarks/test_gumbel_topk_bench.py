"""Sampling k distinct categories per row: fastgrad's fused Gumbel-top-k against ``torch.multinomial(probs, k,
replacement=False)`` and ``torch.topk(logits + Gumbel noise, k)`` with the noise drawn by torch, side by side.

Smoke sizes by default; FASTGRAD_BENCH_FULL=1 for the issue's: 131072 rows (4096 x 32), K = 128, k = 8, and
8192 rows, K = 128000 (vocabulary scale), k = 16. Peak RSS growth per call shows the ``[R, K]`` noise tensor the
torch versions allocate and fastgrad does not. Bytes moved at least: the fp32 logits read once and the int64
indices written (the same for every implementation); the copy roofline row is measured in the same run.

    FASTGRAD_BENCH_FULL=1 .venv/bin/python -m pytest benchmarks/test_gumbel_topk_bench.py \\
        --benchmark-json benchmarks/results/gumbel_topk_cpu.json
"""
import os
import sys

import pytest
import torch

import fastgrad.functional as F
from benchmarks.test_ops_bench import device_name, peak_rss_delta
from benchmarks.test_ops_bench import test_bandwidth_copy  # noqa: F401  (the copy roofline, measured in this run)

FULL = os.environ.get("FASTGRAD_BENCH_FULL") == "1"
SHAPES = [(131072, 128, 8), (8192, 128000, 16)] if FULL else [(256, 128, 8), (16, 5000, 16)]


def fastgrad_topk(logits, k):
    return F.gumbel_topk(logits, k, seed=1, offset=0)[0]


def torch_gumbel_topk(logits, k):
    g = -torch.log(-torch.log(torch.rand_like(logits)))
    return torch.topk(logits + g, k, dim=-1).indices


def torch_multinomial(logits, k):
    return torch.multinomial(torch.softmax(logits, -1), k, replacement=False)


IMPLS = {"fastgrad": fastgrad_topk, "torch_topk_gumbel": torch_gumbel_topk, "torch_multinomial": torch_multinomial}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sample_without_replacement(benchmark, shape, impl):
    R, K, k = shape
    benchmark.group = "x".join(map(str, shape))
    benchmark.extra_info.update(shape=list(shape), impl=impl, device="cpu", device_name=device_name("cpu"),
                                threads=torch.get_num_threads(), command=" ".join(sys.argv),
                                bytes=R * K * 4 + R * k * 8)
    logits = torch.randn(R, K, generator=torch.Generator().manual_seed(0))
    fn = IMPLS[impl]
    out = fn(logits, k)
    assert out.shape == (R, k) and all(len(set(r.tolist())) == k for r in out[:64])
    if not benchmark.disabled:
        benchmark.extra_info["peak_rss_delta"] = peak_rss_delta(lambda: fn(logits, k))
    benchmark.pedantic(fn, args=(logits, k), rounds=5 if FULL else 1, iterations=1)
