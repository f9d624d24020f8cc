"""Per-op benchmarks: each fastgrad backend against its torch eager equivalent, side by side.

Smoke sizes by default (CI runs them with --benchmark-disable); FASTGRAD_BENCH_FULL=1 for the issue's sizes:
(B=4096, k=32, K=128, n=16) for sampling and Gumbel-softmax, [8192, 128000] rows for the surrogate.
"""
import os
import threading
import time

import pytest
import torch
import torch.nn.functional as TF

import fastgrad
import fastgrad.functional as F
from tests.conftest import available_backends

FULL = os.environ.get("FASTGRAD_BENCH_FULL") == "1"
SAMPLE_SHAPE = (4096, 32, 128) if FULL else (64, 2, 10)
N = 16 if FULL else 10
VOCAB = (8192, 128000) if FULL else (64, 1000)
BACKENDS = available_backends("cpu")
# The Triton interpreter (CPU) says nothing about speed: Triton is benchmarked on GPUs only.
BACKENDS = [b for b in BACKENDS if b != "triton" or torch.cuda.is_available()]
if FULL and len(BACKENDS) > 1:
    # at full size the reference (a pure-torch Philox) is far off the pace; the torch baselines cover eager torch
    BACKENDS = [b for b in BACKENDS if b != "reference"]


def peak_rss_delta(fn) -> int:
    """Peak resident-memory growth (bytes) during one call of ``fn``, sampled every 0.5 ms."""
    try:
        import psutil
    except ImportError:
        return -1
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.0005)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return peak[0] - base


def record(benchmark, fn, bytes_moved, cold=False):
    """Time ``fn`` and record the bytes it must move at least and its peak memory growth.

    fastgrad's C++ kernels reuse the memory of freed large outputs (``fastgrad.empty_cache``): by default the
    timed calls run in that steady state (a loop freeing each output before the next call, as training does);
    ``cold=True`` empties the cache before every call, so each output is fresh memory. The peak RSS delta is
    always measured from an empty cache: the memory a call needs, not what it found kept.
    """
    benchmark.extra_info["bytes"] = int(bytes_moved)
    benchmark.extra_info["shape"] = list(SAMPLE_SHAPE) + [N]
    benchmark.extra_info["output_memory"] = "fresh" if cold else "reused"
    if not benchmark.disabled:
        fastgrad.empty_cache()
        benchmark.extra_info["peak_rss_delta"] = peak_rss_delta(fn)
    if cold:
        return benchmark.pedantic(fn, setup=lambda: (fastgrad.empty_cache(), None)[1], rounds=5 if FULL else 20,
                                  iterations=1)
    return benchmark(fn)


def test_bandwidth_copy(benchmark):
    """The roofline: a large copy into an existing buffer, measured in the same run."""
    benchmark.group = "roofline"
    n = (1 << 28) if FULL else (1 << 20)
    src = torch.ones(n)
    dst = torch.empty(n)
    record(benchmark, lambda: dst.copy_(src), 2 * 4 * n)


@pytest.fixture(scope="module")
def logits():
    return torch.randn(*SAMPLE_SHAPE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_onehot_fastgrad(benchmark, logits, backend):
    benchmark.group = "sample_onehot"
    nbytes = logits.numel() * 4 + N * logits.numel() * 4 + N * logits[..., 0].numel() * 8
    with fastgrad.backend(backend):
        idx, oh = record(benchmark, lambda: F.sample_categorical(logits, N, one_hot=True), nbytes)
    assert oh.shape == (N,) + SAMPLE_SHAPE


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "cpp"])
def test_sample_onehot_fastgrad_cold(benchmark, logits, backend):
    """The same, each output in fresh memory (page faults and the kernel's zero-fill included)."""
    benchmark.group = "sample_onehot"
    nbytes = logits.numel() * 4 + N * logits.numel() * 4 + N * logits[..., 0].numel() * 8
    with fastgrad.backend(backend):
        idx, oh = record(benchmark, lambda: F.sample_categorical(logits, N, one_hot=True), nbytes, cold=True)
    assert oh.shape == (N,) + SAMPLE_SHAPE


def test_sample_onehot_torch_distributions(benchmark, logits):
    benchmark.group = "sample_onehot"
    d = torch.distributions.OneHotCategorical(logits=logits)
    nbytes = logits.numel() * 4 * (1 + N)
    assert record(benchmark, lambda: d.sample((N,)), nbytes).shape == (N,) + SAMPLE_SHAPE


def test_sample_onehot_multinomial_scatter(benchmark, logits):
    benchmark.group = "sample_onehot"

    def run():
        p = logits.softmax(-1).reshape(-1, logits.shape[-1])
        idx = torch.multinomial(p, N, replacement=True).t()
        return torch.zeros(N, p.shape[0], p.shape[1]).scatter_(-1, idx.unsqueeze(-1), 1.0)

    assert record(benchmark, run, logits.numel() * 4 * (1 + N)).shape[0] == N


@pytest.mark.parametrize("backend", BACKENDS)
def test_gumbel_softmax_fastgrad(benchmark, logits, backend):
    benchmark.group = "gumbel_softmax"
    with fastgrad.backend(backend):
        out = record(benchmark, lambda: F.gumbel_softmax(logits, 0.5, N), logits.numel() * 4 * (1 + N))
    assert out.shape == (N,) + SAMPLE_SHAPE


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "cpp"])
def test_gumbel_softmax_fastgrad_cold(benchmark, logits, backend):
    benchmark.group = "gumbel_softmax"
    with fastgrad.backend(backend):
        out = record(benchmark, lambda: F.gumbel_softmax(logits, 0.5, N), logits.numel() * 4 * (1 + N), cold=True)
    assert out.shape == (N,) + SAMPLE_SHAPE


def test_gumbel_softmax_torch(benchmark, logits):
    benchmark.group = "gumbel_softmax"
    out = record(benchmark, lambda: TF.gumbel_softmax(logits.expand(N, *logits.shape), tau=0.5),
                 logits.numel() * 4 * (1 + N))
    assert out.shape[0] == N


@pytest.fixture(scope="module")
def vocab():
    g = torch.Generator().manual_seed(0)
    l = torch.randn(*VOCAB, generator=g)
    idx = torch.randint(0, VOCAB[1], (1, VOCAB[0]), generator=g)
    return l, idx, torch.randn(1, VOCAB[0], generator=g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_surrogate_fwd_bwd_fastgrad(benchmark, vocab, backend):
    benchmark.group = "surrogate_fwd_bwd"
    l, idx, cost = vocab

    def run():
        x = l.detach().requires_grad_()
        F.score_function_surrogate(x, idx, cost).sum().backward()
        return x.grad

    with fastgrad.backend(backend):
        assert record(benchmark, run, 3 * l.numel() * 4).shape == l.shape  # read fwd, read + write bwd


def test_surrogate_fwd_bwd_torch(benchmark, vocab):
    benchmark.group = "surrogate_fwd_bwd"
    l, idx, cost = vocab

    def run():
        x = l.detach().requires_grad_()
        (cost * torch.log_softmax(x, -1).gather(-1, idx.t()).t()).sum().backward()
        return x.grad

    assert record(benchmark, run, 3 * l.numel() * 4).shape == l.shape


def test_surrogate_fwd_bwd_torch_compile(benchmark, vocab):
    benchmark.group = "surrogate_fwd_bwd"
    l, idx, cost = vocab

    @torch.compile
    def loss(x):
        return (cost * torch.log_softmax(x, -1).gather(-1, idx.t()).t()).sum()

    def run():
        x = l.detach().requires_grad_()
        loss(x).backward()
        return x.grad

    assert record(benchmark, run, 3 * l.numel() * 4).shape == l.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_enumerate_fastgrad(benchmark, backend):
    benchmark.group = "enumerate"
    l = torch.randn(1024 if FULL else 64, 2, 10, requires_grad=True)
    cost = torch.randn(100, l.shape[0])

    def run():
        F.expectation(l, cost).sum().backward()

    with fastgrad.backend(backend):
        record(benchmark, run, 2 * cost.numel() * 4)


def test_enumerate_torch_expanded(benchmark):
    benchmark.group = "enumerate"
    l = torch.randn(1024 if FULL else 64, 2, 10, requires_grad=True)
    cost = torch.randn(100, l.shape[0])
    cfg = F.enumerate_configurations(2, 10)
    oh = TF.one_hot(cfg, 10).float()  # [100, 2, 10]

    def run():
        lp = torch.log_softmax(l, -1)  # [B, 2, 10]
        logq = (oh[:, None] * lp[None]).sum((-1, -2))  # materializes [100, B, 2, 10]
        (logq.exp() * cost).sum().backward()

    record(benchmark, run, 2 * cost.numel() * 4)
