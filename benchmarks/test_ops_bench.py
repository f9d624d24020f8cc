"""Per-op benchmarks: each fastgrad backend against its torch eager equivalent, side by side.

Smoke sizes by default (CI runs them with --benchmark-disable); FASTGRAD_BENCH_FULL=1 for the issue's sizes:
(B=4096, k=32, K=128, n=16) for sampling and Gumbel-softmax, [8192, 128000] rows for the surrogate.

Device axis: every case runs on each device in ``FASTGRAD_BENCH_DEVICES`` (default: ``cpu``, plus ``cuda`` when a
GPU is visible). On a GPU each timed call ends with ``torch.cuda.synchronize()`` (kernels, not launches, are
timed) and the peak memory is ``torch.cuda.max_memory_allocated`` growth. Every row records its device's name,
the achieved GB/s of the bytes it must move at least, and the fraction of the copy roofline measured on the same
device in the same run (``test_bandwidth_copy`` runs first).
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
_default_devices = "cpu,cuda" if torch.cuda.is_available() else "cpu"
DEVICES = [d for d in os.environ.get("FASTGRAD_BENCH_DEVICES", _default_devices).split(",") if d]


def _backends(device):
    out = available_backends(device)
    # The Triton interpreter (CPU) says nothing about speed: Triton is benchmarked on GPUs only.
    out = [b for b in out if b != "triton" or device == "cuda"]
    if FULL and len(out) > 1:
        # at full size the reference (a pure-torch Philox) is far off the pace; the torch baselines cover eager
        out = [b for b in out if b != "reference"]
    return out


CASES = [(d, b) for d in DEVICES for b in _backends(d)]
ROOFLINE = {}  # device -> copy GB/s measured in this run


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    import platform
    return platform.processor() or platform.machine()


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


def peak_cuda_delta(fn) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def record(benchmark, fn, bytes_moved, cold=False, device="cpu"):
    """Time ``fn`` and record the bytes it must move at least and its peak memory growth.

    fastgrad's C++ kernels reuse the memory of freed large outputs (``fastgrad.empty_cache``): by default the
    timed calls run in that steady state (a loop freeing each output before the next call, as training does);
    ``cold=True`` empties the cache before every call, so each output is fresh memory. The peak RSS delta is
    always measured from an empty cache: the memory a call needs, not what it found kept.
    """
    benchmark.extra_info["bytes"] = int(bytes_moved)
    benchmark.extra_info["shape"] = list(SAMPLE_SHAPE) + [N]
    benchmark.extra_info["output_memory"] = "fresh" if cold else "reused"
    benchmark.extra_info["device"] = device
    benchmark.extra_info["device_name"] = device_name(device)
    if device == "cuda":
        inner = fn

        def fn():
            out = inner()
            torch.cuda.synchronize()  # time the kernels, not their launches
            return out

        fn()  # warm-up: Triton compiles on first call
    if not benchmark.disabled:
        fastgrad.empty_cache()
        if device == "cuda":
            benchmark.extra_info["peak_cuda_delta"] = peak_cuda_delta(fn)
        else:
            benchmark.extra_info["peak_rss_delta"] = peak_rss_delta(fn)
    if cold:
        out = benchmark.pedantic(fn, setup=lambda: (fastgrad.empty_cache(), None)[1], rounds=5 if FULL else 20,
                                 iterations=1)
    else:
        out = benchmark(fn)
    if not benchmark.disabled and benchmark.stats is not None:
        gbps = bytes_moved / benchmark.stats.stats.min / 1e9
        benchmark.extra_info["achieved_GBps"] = gbps
        if device in ROOFLINE:
            benchmark.extra_info["roofline_fraction"] = gbps / ROOFLINE[device]
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_bandwidth_copy(benchmark, device):
    """The roofline: a large copy into an existing buffer on ``device``, measured in the same run. A timing baseline
    for the ops' bandwidth fractions: no assertion."""
    benchmark.group = "roofline"
    n = (1 << 28) if FULL or device == "cuda" else (1 << 20)
    src = torch.ones(n, device=device)
    dst = torch.empty(n, device=device)
    record(benchmark, lambda: dst.copy_(src), 2 * 4 * n, device=device)
    if not benchmark.disabled:
        ROOFLINE[device] = benchmark.extra_info["achieved_GBps"]


_DATA = {}


def _logits(device):
    if ("logits", device) not in _DATA:
        g = torch.Generator().manual_seed(0)
        _DATA["logits", device] = torch.randn(*SAMPLE_SHAPE, generator=g).to(device)
    return _DATA["logits", device]


@pytest.mark.parametrize("device,backend", CASES)
def test_sample_onehot_fastgrad(benchmark, device, backend):
    benchmark.group = f"sample_onehot-{device}"
    logits = _logits(device)
    nbytes = logits.numel() * 4 + N * logits.numel() * 4 + N * logits[..., 0].numel() * 8
    with fastgrad.backend(backend):
        idx, oh = record(benchmark, lambda: F.sample_categorical_one_hot(logits, N), nbytes, device=device)
    assert oh.shape == (N,) + SAMPLE_SHAPE


@pytest.mark.parametrize("device,backend", [c for c in CASES if c == ("cpu", "cpp")])
def test_sample_onehot_fastgrad_cold(benchmark, device, backend):
    """The same, each output in fresh memory (page faults and the kernel's zero-fill included)."""
    benchmark.group = f"sample_onehot-{device}"
    logits = _logits(device)
    nbytes = logits.numel() * 4 + N * logits.numel() * 4 + N * logits[..., 0].numel() * 8
    with fastgrad.backend(backend):
        idx, oh = record(benchmark, lambda: F.sample_categorical_one_hot(logits, N), nbytes, cold=True)
    assert oh.shape == (N,) + SAMPLE_SHAPE


@pytest.mark.parametrize("device", DEVICES)
def test_sample_onehot_torch_distributions(benchmark, device):
    benchmark.group = f"sample_onehot-{device}"
    logits = _logits(device)
    d = torch.distributions.OneHotCategorical(logits=logits)
    nbytes = logits.numel() * 4 * (1 + N)
    assert record(benchmark, lambda: d.sample((N,)), nbytes, device=device).shape == (N,) + SAMPLE_SHAPE


@pytest.mark.parametrize("device", DEVICES)
def test_sample_onehot_multinomial_scatter(benchmark, device):
    benchmark.group = f"sample_onehot-{device}"
    logits = _logits(device)

    def run():
        p = logits.softmax(-1).reshape(-1, logits.shape[-1])
        idx = torch.multinomial(p, N, replacement=True).t()
        return torch.zeros(N, p.shape[0], p.shape[1], device=device).scatter_(-1, idx.unsqueeze(-1), 1.0)

    assert record(benchmark, run, logits.numel() * 4 * (1 + N), device=device).shape[0] == N


@pytest.mark.parametrize("device,backend", CASES)
def test_gumbel_softmax_fastgrad(benchmark, device, backend):
    benchmark.group = f"gumbel_softmax-{device}"
    logits = _logits(device)
    with fastgrad.backend(backend):
        out = record(benchmark, lambda: F.gumbel_softmax(logits, 0.5, N), logits.numel() * 4 * (1 + N),
                     device=device)
    assert out.shape == (N,) + SAMPLE_SHAPE


@pytest.mark.parametrize("device,backend", [c for c in CASES if c == ("cpu", "cpp")])
def test_gumbel_softmax_fastgrad_cold(benchmark, device, backend):
    benchmark.group = f"gumbel_softmax-{device}"
    logits = _logits(device)
    with fastgrad.backend(backend):
        out = record(benchmark, lambda: F.gumbel_softmax(logits, 0.5, N), logits.numel() * 4 * (1 + N), cold=True)
    assert out.shape == (N,) + SAMPLE_SHAPE


@pytest.mark.parametrize("device", DEVICES)
def test_gumbel_softmax_torch(benchmark, device):
    benchmark.group = f"gumbel_softmax-{device}"
    logits = _logits(device)
    out = record(benchmark, lambda: TF.gumbel_softmax(logits.expand(N, *logits.shape), tau=0.5),
                 logits.numel() * 4 * (1 + N), device=device)
    assert out.shape[0] == N


def _vocab(device):
    if ("vocab", device) not in _DATA:
        g = torch.Generator().manual_seed(0)
        l = torch.randn(*VOCAB, generator=g)
        idx = torch.randint(0, VOCAB[1], (1, VOCAB[0]), generator=g)
        _DATA["vocab", device] = tuple(t.to(device) for t in (l, idx, torch.randn(1, VOCAB[0], generator=g)))
    return _DATA["vocab", device]


@pytest.mark.parametrize("device,backend", CASES)
def test_surrogate_fwd_bwd_fastgrad(benchmark, device, backend):
    benchmark.group = f"surrogate_fwd_bwd-{device}"
    l, idx, cost = _vocab(device)

    def run():
        x = l.detach().requires_grad_()
        F.score_function_surrogate(x, idx, cost).sum().backward()
        return x.grad

    with fastgrad.backend(backend):
        # read fwd, read + write bwd
        assert record(benchmark, run, 3 * l.numel() * 4, device=device).shape == l.shape


@pytest.mark.parametrize("device", DEVICES)
def test_surrogate_fwd_bwd_torch(benchmark, device):
    benchmark.group = f"surrogate_fwd_bwd-{device}"
    l, idx, cost = _vocab(device)

    def run():
        x = l.detach().requires_grad_()
        (cost * torch.log_softmax(x, -1).gather(-1, idx.t()).t()).sum().backward()
        return x.grad

    assert record(benchmark, run, 3 * l.numel() * 4, device=device).shape == l.shape


@pytest.mark.parametrize("device", DEVICES)
def test_surrogate_fwd_bwd_torch_compile(benchmark, device):
    benchmark.group = f"surrogate_fwd_bwd-{device}"
    l, idx, cost = _vocab(device)

    @torch.compile
    def loss(x):
        return (cost * torch.log_softmax(x, -1).gather(-1, idx.t()).t()).sum()

    def run():
        x = l.detach().requires_grad_()
        loss(x).backward()
        return x.grad

    assert record(benchmark, run, 3 * l.numel() * 4, device=device).shape == l.shape


@pytest.mark.parametrize("device,backend", CASES)
def test_enumerate_fastgrad(benchmark, device, backend):
    benchmark.group = f"enumerate-{device}"
    l = torch.randn(1024 if FULL else 64, 2, 10, device=device, requires_grad=True)
    cost = torch.randn(100, l.shape[0], device=device)

    def run():
        F.expectation(l, cost).sum().backward()

    with fastgrad.backend(backend):
        record(benchmark, run, 2 * cost.numel() * 4, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_enumerate_torch_expanded(benchmark, device):
    """Plain torch's expanded enumeration, the comparison row of the fused op: a timing baseline, no assertion."""
    benchmark.group = f"enumerate-{device}"
    l = torch.randn(1024 if FULL else 64, 2, 10, device=device, requires_grad=True)
    cost = torch.randn(100, l.shape[0], device=device)
    cfg = F.enumerate_configurations(2, 10, device=device)
    oh = TF.one_hot(cfg, 10).float()  # [100, 2, 10]

    def run():
        lp = torch.log_softmax(l, -1)  # [B, 2, 10]
        logq = (oh[:, None] * lp[None]).sum((-1, -2))  # materializes [100, B, 2, 10]
        (logq.exp() * cost).sum().backward()

    record(benchmark, run, 2 * cost.numel() * 4, device=device)
