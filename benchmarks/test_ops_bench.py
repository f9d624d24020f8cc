"""Per-op benchmarks: each fastgrad backend against its torch eager equivalent, side by side.

Smoke sizes by default (CI runs them with --benchmark-disable); FASTGRAD_BENCH_FULL=1 for the issue's sizes:
(B=4096, k=32, K=128, n=16) for sampling and Gumbel-softmax, [8192, 128000] rows for the surrogate.
"""
import os

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


@pytest.fixture(scope="module")
def logits():
    return torch.randn(*SAMPLE_SHAPE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_onehot_fastgrad(benchmark, logits, backend):
    benchmark.group = "sample_onehot"
    with fastgrad.backend(backend):
        idx, oh = benchmark(lambda: F.sample_categorical(logits, N, one_hot=True))
    assert oh.shape == (N,) + SAMPLE_SHAPE


def test_sample_onehot_torch_distributions(benchmark, logits):
    benchmark.group = "sample_onehot"
    d = torch.distributions.OneHotCategorical(logits=logits)
    assert benchmark(lambda: d.sample((N,))).shape == (N,) + SAMPLE_SHAPE


def test_sample_onehot_multinomial_scatter(benchmark, logits):
    benchmark.group = "sample_onehot"

    def run():
        p = logits.softmax(-1).reshape(-1, logits.shape[-1])
        idx = torch.multinomial(p, N, replacement=True).t()
        return torch.zeros(N, p.shape[0], p.shape[1]).scatter_(-1, idx.unsqueeze(-1), 1.0)

    assert benchmark(run).shape[0] == N


@pytest.mark.parametrize("backend", BACKENDS)
def test_gumbel_softmax_fastgrad(benchmark, logits, backend):
    benchmark.group = "gumbel_softmax"
    with fastgrad.backend(backend):
        assert benchmark(lambda: F.gumbel_softmax(logits, 0.5, N)).shape == (N,) + SAMPLE_SHAPE


def test_gumbel_softmax_torch(benchmark, logits):
    benchmark.group = "gumbel_softmax"
    assert benchmark(lambda: TF.gumbel_softmax(logits.expand(N, *logits.shape), tau=0.5)).shape[0] == N


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
        assert benchmark(run).shape == l.shape


def test_surrogate_fwd_bwd_torch(benchmark, vocab):
    benchmark.group = "surrogate_fwd_bwd"
    l, idx, cost = vocab

    def run():
        x = l.detach().requires_grad_()
        (cost * torch.log_softmax(x, -1).gather(-1, idx.t()).t()).sum().backward()
        return x.grad

    assert benchmark(run).shape == l.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_enumerate_fastgrad(benchmark, backend):
    benchmark.group = "enumerate"
    l = torch.randn(1024 if FULL else 64, 2, 10, requires_grad=True)
    cost = torch.randn(100, l.shape[0])

    def run():
        F.expectation(l, cost).sum().backward()

    with fastgrad.backend(backend):
        benchmark(run)


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

    benchmark(run)
