"""The LM head fused with the policy loss: fastgrad against torch eager (unfused), its torch.compile, torch 2.14's
``linear_cross_entropy`` (reference and chunked paths), and the chunked torch implementations users run today where
they install (Liger-Kernel's LigerFusedLinearGRPOLoss torch path, Cut Cross-Entropy's ``torch_compile``
implementation, verl's ``FusedLinearForPPO`` torch path), side by side in one run.

Every implementation computes the same thing: a token-normalized PPO-clip / GRPO loss (``eps = 0.2``, on-policy
ratio, advantages per sequence) of the given tokens through ``hidden @ weight.T``, forward and backward w.r.t.
hidden and weight, in fp32 and in bf16 on the CPU. FLOPs are counted 6 N H V for everyone (3 GEMMs); ``mm`` is the
measured ``torch.mm`` of ``[N, H] x [H, V]`` in the inputs' dtype in the same run, so ``ceiling_fraction =
3 t_mm / t``; bf16 rows record the plan fastgrad measured for this CPU (``cpu_bf16_plan``). Peak RSS growth is
sampled during one call. ``padded40``: 40 % of the tokens masked (fastgrad skips them; the others compute them).

Smoke sizes by default (CI runs them with --benchmark-disable); FASTGRAD_BENCH_FULL=1 for the issue's shapes
(N, H, V) = (512, 2048, 151936), (1024, 1024, 128256), (1024, 2048, 128256) and (1024, 1024, 128256) padded:

    FASTGRAD_BENCH_FULL=1 .venv/bin/python -m pytest benchmarks/test_linear_loss_bench.py \\
        --benchmark-json benchmarks/results/linear_loss_cpu.json

Device axis as in test_ops_bench (``FASTGRAD_BENCH_DEVICES``): on ``cuda`` the inputs are bf16 (logits and
log-softmax statistics in fp32 everywhere), the shapes (8192, 4096, 128256), (4096, 4096, 131072),
(4096, 2048, 151936) and a padded row, every timed call ends with ``torch.cuda.synchronize()``, ``mm`` is the bf16
GEMM and the memory column is ``torch.cuda.max_memory_allocated`` growth.
"""
import importlib.util
import os
import sys

import pytest
import torch

import fastgrad.functional as F
from benchmarks.test_ops_bench import DEVICES, device_name, peak_cuda_delta, peak_rss_delta

FULL = os.environ.get("FASTGRAD_BENCH_FULL") == "1"
CPU_SHAPES = ([(512, 2048, 151936, 0.0), (1024, 1024, 128256, 0.0), (1024, 2048, 128256, 0.0),
               (1024, 1024, 128256, 0.4)] if FULL else [(64, 32, 1000, 0.0), (64, 32, 1000, 0.4)])
if os.environ.get("FASTGRAD_BENCH_CPU_SHAPES"):  # e.g. "1024x1024x128256,1024x1024x128256x0.4" (N x H x V [x pad])
    CPU_SHAPES = [tuple(int(v) for v in t.split("x")[:3]) + (float(t.split("x")[3]) if t.count("x") == 3 else 0.0,)
                  for t in os.environ["FASTGRAD_BENCH_CPU_SHAPES"].split(",")]
GPU_SHAPES = ([(8192, 4096, 128256, 0.0), (4096, 4096, 131072, 0.0), (4096, 2048, 151936, 0.0),
               (8192, 4096, 128256, 0.4)] if FULL else [(256, 64, 5000, 0.0), (256, 64, 5000, 0.4)])
# CPU: fp32 and bf16 inputs (bf16 GEMMs run on AVX512-BF16 / AMX units where the CPU has them); GPU: bf16
DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.bfloat16,)}
CASES = [(d, dt, s) for d in DEVICES for dt in DTYPES[d] for s in (GPU_SHAPES if d == "cuda" else CPU_SHAPES)]
SEQ = 64  # tokens per sequence: B = N / SEQ sequences
EPS = 0.2
MM_TIME = {}  # shape -> fp32 torch.mm seconds, measured in this run


def _inputs(N, H, V, pad, device="cpu", dt=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = N // SEQ
    hidden = torch.randn(B, SEQ, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5
    index = torch.randint(0, V, (B, SEQ), generator=g)
    mask = torch.ones(B, SEQ, dtype=torch.bool)
    if pad:
        mask[:, SEQ - int(round(pad * SEQ)):] = False  # right padding
    adv = torch.randn(B, generator=g)
    return hidden.to(device, dt), weight.to(device, dt), index.to(device), mask.to(device), adv.to(device)


def _ppo(logp, adv, mask):
    """Token-normalized on-policy PPO-clip, written as users write it (TRL's form)."""
    ratio = torch.exp(logp - logp.detach())
    a = adv[:, None]
    per_token = torch.max(-a * ratio, -a * ratio.clamp(1 - EPS, 1 + EPS))
    return (per_token * mask).sum() / mask.sum()


def eager(hidden, weight, index, mask, adv):
    logits = hidden @ weight.t()  # bf16 on a GPU, then log_softmax in fp32 (what TRL does)
    logp = torch.log_softmax(logits.float(), -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    return _ppo(logp, adv, mask)


_compiled = torch.compile(eager) if FULL or os.environ.get("FASTGRAD_BENCH_COMPILE") == "1" else None


def fastgrad_policy(hidden, weight, index, mask, adv):
    loss, _ = F.linear_policy_loss(hidden, weight, index, adv, mask=mask, loss="ppo_clip", eps_low=EPS, eps_high=EPS)
    return loss


def fastgrad_log_prob(hidden, weight, index, mask, adv):
    """The general path: fused log-probs (4 GEMMs, backward recomputes), the loss in torch."""
    return _ppo(F.linear_log_prob(hidden, weight, index), adv, mask)


def _liger():
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    mod = LigerFusedLinearGRPOLoss(beta=0.0, compiled=False, use_ref_model=False, loss_type="dapo",
                                   epsilon_low=EPS, epsilon_high=EPS)

    def liger(hidden, weight, index, mask, adv):
        return mod(hidden, weight, index, mask.float(), adv)[0]

    return liger


def _cce():
    from cut_cross_entropy import linear_cross_entropy

    def cce(hidden, weight, index, mask, adv):
        nll = linear_cross_entropy(hidden, weight, index, impl="torch_compile", reduction="none")
        return _ppo(-nll, adv, mask)

    return cce


def torch_lce_reference(hidden, weight, index, mask, adv):
    """torch 2.14's ``linear_cross_entropy`` (``options=None``: the unfused reference path), -logp per token."""
    nll = torch.nn.functional.linear_cross_entropy(hidden.flatten(0, 1), weight, index.flatten(), reduction="none")
    return _ppo(-nll.view(index.shape), adv, mask)


def torch_lce_chunked(hidden, weight, index, mask, adv):
    """torch 2.14's chunked ``linear_cross_entropy`` (``LinearCrossEntropyOptions()``: batch chunks, gradients in
    the forward), -logp per token."""
    nll = torch.nn.functional.linear_cross_entropy(hidden.flatten(0, 1), weight, index.flatten(), reduction="none",
                                                   options=torch.nn.LinearCrossEntropyOptions())
    return _ppo(-nll.view(index.shape), adv, mask)


def _verl():
    """verl's ``FusedLinearForPPO`` torch path (log-probs and entropy in 512-row chunks), loaded from its file: verl's
    package ``__init__`` imports ray, which its loss code does not need."""
    import importlib.util as iu

    spec = iu.find_spec("verl")
    path = os.path.join(os.path.dirname(spec.origin), "utils", "experimental", "torch_functional.py")
    mod_spec = iu.spec_from_file_location("_verl_torch_functional", path)
    mod = iu.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    head = mod.FusedLinearForPPO(chunk_size=512, impl_backend="torch")

    def verl(hidden, weight, index, mask, adv):
        logp, _entropy = head(hidden, weight, index)
        return _ppo(logp, adv, mask)

    return verl


IMPLS = {"eager": eager, "fastgrad_policy": fastgrad_policy, "fastgrad_log_prob": fastgrad_log_prob}
if importlib.util.find_spec("verl") is not None:
    IMPLS["verl_fused_torch"] = _verl()
if hasattr(torch.nn.functional, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
    IMPLS["torch_lce_reference"] = torch_lce_reference
    IMPLS["torch_lce_chunked"] = torch_lce_chunked
if _compiled is not None:
    IMPLS["torch_compile"] = _compiled
if importlib.util.find_spec("liger_kernel") is not None:
    IMPLS["liger_grpo_torch"] = _liger()
if importlib.util.find_spec("cut_cross_entropy") is not None and (FULL or os.environ.get(
        "FASTGRAD_BENCH_COMPILE") == "1"):
    IMPLS["cce_torch_compile"] = _cce()


def _sid(case):
    device, dt, (N, H, V, pad) = case
    return f"{device}-{str(dt).split('.')[-1]}-{N}x{H}x{V}" + (f"-padded{int(pad * 100)}" if pad else "")


def _info(benchmark, case, impl):
    device, dt, (N, H, V, pad) = case
    benchmark.group = _sid(case)
    if device == "cpu":
        from fastgrad._env import _cpu
        from fastgrad.ops._lm_head import cpu_bf16_plan

        benchmark.extra_info["cpu"], benchmark.extra_info["cpu_features"] = _cpu()  # AMX / AVX512-BF16 presence
        if dt == torch.bfloat16:
            benchmark.extra_info["cpu_bf16_plan"] = dict(cpu_bf16_plan())
    benchmark.extra_info.update(shape=[N, H, V], padding=pad, impl=impl, device=device, dtype=str(dt),
                                device_name=device_name(device), threads=torch.get_num_threads(),
                                command=" ".join(sys.argv), flops_6NHV=6 * N * H * V)


def _synced(fn, device):
    if device != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


SLOW = ("liger_grpo_torch", "torch_lce_chunked", "verl_fused_torch")  # torch-chunked peers: 4-20x the others


def _rounds(impl=None):
    # the torch-chunked peers take 20-60 s a call at the full shapes on 2 cores: one timed round suffices
    return 3 if FULL and impl not in SLOW else 1


@pytest.mark.parametrize("case", CASES, ids=_sid)
def test_mm_ceiling(benchmark, case):
    """torch.mm of [N, H] x [H, V] in the inputs' dtype, the unit of the 3-GEMM bound (runs first per shape). A timing
    baseline for the comparison rows: no assertion."""
    device, dt, (N, H, V, _) = case
    _info(benchmark, case, "mm")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, H, generator=g).to(device, dt)
    w = torch.randn(V, H, generator=g).to(device, dt)
    out = torch.empty(N, V, device=device, dtype=dt)
    run = _synced(lambda: torch.mm(x, w.t(), out=out), device)
    run()
    benchmark.pedantic(run, rounds=_rounds(), iterations=1)
    if not benchmark.disabled:
        MM_TIME[case] = benchmark.stats.stats.min
        benchmark.extra_info["GFps_2NHV"] = 2 * N * H * V / MM_TIME[case] / 1e9


# the GPU rows: fastgrad against torch eager
CPU_ONLY = ("torch_compile", "cce_torch_compile", "liger_grpo_torch", "verl_fused_torch")
ROWS = [(c, i) for c in CASES for i in IMPLS if c[0] == "cpu" or i not in CPU_ONLY]


@pytest.mark.parametrize("case,impl", ROWS, ids=[f"{_sid(c)}-{i}" for c, i in ROWS])
def test_policy_loss_fwd_bwd(benchmark, case, impl):
    device, dt, (N, H, V, pad) = case
    _info(benchmark, case, impl)
    hidden, weight, index, mask, adv = _inputs(N, H, V, pad, device, dt)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    fn = IMPLS[impl]

    def step():
        hidden.grad = weight.grad = None
        loss = fn(hidden, weight, index, mask, adv)
        loss.backward()
        return loss

    step = _synced(step, device)
    loss = step()  # warm-up (torch.compile compiles here)
    ref = eager(hidden.detach().requires_grad_(True), weight.detach(), index, mask, adv)
    # every implementation computes the same loss
    tol = 1e-3 if dt == torch.float32 else 2e-2
    assert abs(float(loss) - float(ref)) <= tol * max(1.0, abs(float(ref))), (impl, float(loss), float(ref))
    if not benchmark.disabled:
        hidden.grad = weight.grad = None
        benchmark.extra_info["peak_memory_delta"] = peak_cuda_delta(step) if device == "cuda" else peak_rss_delta(step)
    benchmark.pedantic(step, rounds=_rounds(impl), iterations=1)
    if not benchmark.disabled:
        t = benchmark.stats.stats.min
        benchmark.extra_info["GFps_6NHV"] = 6 * N * H * V / t / 1e9
        if case in MM_TIME:
            benchmark.extra_info["ceiling_fraction"] = 3 * MM_TIME[case] / t


SUPPORT_IDS = 1024  # ids per token: vLLM's top_k = 1024 (the overhead target: <= 10 %)


def _support(index, V, k=SUPPORT_IDS):
    """Per token ``min(k, V)`` ids spread over the vocabulary, sorted, the token's own id among them."""
    k = min(k, V)
    flat = index.reshape(-1)
    stride = V // k
    ids = (flat[:, None] + stride * torch.arange(k, device=flat.device)) % V
    col = ids.sort(1).values.reshape(-1)
    crow = torch.arange(0, flat.numel() * k + 1, k, device=flat.device)
    return crow, col


@pytest.mark.parametrize("case", [c for c in CASES if c[0] == "cpu"], ids=_sid)
def test_policy_loss_with_support(benchmark, case):
    """fastgrad_policy renormalized over a 1024-id sampling support per token (``support=``): compare with the
    ``fastgrad_policy`` row of the same group for the overhead."""
    device, dt, (N, H, V, pad) = case
    _info(benchmark, case, f"fastgrad_policy_support{SUPPORT_IDS}")
    hidden, weight, index, mask, adv = _inputs(N, H, V, pad, device, dt)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    support = _support(index, V)

    def step():
        hidden.grad = weight.grad = None
        loss, _ = F.linear_policy_loss(hidden, weight, index, adv, mask=mask, loss="ppo_clip", eps_low=EPS,
                                       eps_high=EPS, support=support)
        loss.backward()
        return loss

    loss = step()
    assert torch.isfinite(loss)
    benchmark.pedantic(step, rounds=_rounds(), iterations=1)
    if not benchmark.disabled:
        benchmark.extra_info["GFps_6NHV"] = 6 * N * H * V / benchmark.stats.stats.min / 1e9
