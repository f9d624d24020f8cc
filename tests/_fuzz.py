"""Differential fuzz of the functional API and the ops against independent float64 formulas.

Run as a child process by tests/test_fuzz.py (a crash, a hang or an illegal memory access fails that test
instead of killing the suite): ``python -m tests._fuzz --cases N --seed S [--backends a,b]``. Prints one JSON
line: the number of cases run and the failures (case, backend, what differed).

Oracles, written without fastgrad's code: ``log_softmax`` in float64 for the surrogate and its gradient, the
Gumbel-softmax formula on the reference Philox stream (checked against Random123's known answer in test_ops),
``itertools.product`` for the enumeration. Tolerances: :func:`tol`, from the dtypes' eps and the reduction length.
Bad inputs (NaN/inf injected, wrong shapes, wrong dtypes) must raise ValueError/TypeError, nothing else. And every
registered op (:func:`case_registry`, from the op registry) on its declared sample inputs at random scales against
its reference.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastgrad  # noqa: E402
import fastgrad.functional as F  # noqa: E402
from fastgrad.ops import _philox  # noqa: E402

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def tol(out_dtype: torch.dtype, acc_dtype: torch.dtype, K: int, scale: float) -> float:
    """Absolute tolerance: the output's rounding (4 ulp of ``scale``) plus the accumulation's error over a
    reduction of length K (eps of the accumulation dtype times log2 K, pairwise/blocked sums, times ``scale``)."""
    eps_out = torch.finfo(out_dtype).eps
    eps_acc = torch.finfo(acc_dtype).eps
    return 4 * eps_out * scale + 32 * eps_acc * (1 + math.log2(K + 1)) * scale


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def case_surrogate(rng, backend, dtype, interpreted):
    R = rng.randint(0, 9)
    K = rng.choice([1, 2, 5, 33, 1025] + ([] if interpreted else [5000]))
    n = rng.randint(1, 4)
    l = (torch.randn(R, K, dtype=torch.float64) * rng.choice([0.1, 3, 20])).to(dtype)
    if K > 2 and R and rng.random() < 0.3:  # masked categories (zero probability), never all of a row
        l[:, : K // 2] = -math.inf
        idx = torch.randint(K // 2, K, (n, R))
    else:
        idx = torch.randint(0, K, (n, R))
    w = torch.randn(n, R, dtype=torch.float64)
    x = l.detach().requires_grad_()
    with fastgrad.backend(backend):
        out = F.score_function_surrogate(x, idx, w)
        out.sum().backward()
    ld = l.double()
    lp = torch.log_softmax(ld, -1)
    want = w * lp.gather(-1, idx.t()).t() if R else torch.zeros(n, 0, dtype=torch.float64)
    p = lp.exp()
    gw = -w.sum(0)[:, None] * p
    for s in range(n):
        gw[torch.arange(R), idx[s]] += w[s]
    scale = float(ld[torch.isfinite(ld)].abs().max()) + math.log(K) + 1 if ld.numel() else 1.0
    fails = []
    e = (out.double() - want).abs().max().item() if want.numel() else 0.0
    if not e <= tol(torch.float64, _acc(dtype), K, scale * float(w.abs().max() if w.numel() else 1)):
        fails.append(f"value error {e:.3g}")
    g = x.grad.double() if x.grad is not None else torch.zeros_like(ld)
    eg = (g - gw).abs().max().item() if gw.numel() else 0.0
    if not eg <= tol(dtype, _acc(dtype), K, n * float(w.abs().max() if w.numel() else 1)):
        fails.append(f"grad error {eg:.3g}")
    return dict(R=R, K=K, n=n), fails


def case_gumbel(rng, backend, dtype, interpreted):
    R = rng.randint(0, 5)
    K = rng.choice([1, 2, 7, 130] + ([] if interpreted else [3000]))
    n = rng.randint(1, 3)
    tau = rng.choice([0.1, 0.5, 1.0, 3.0])
    hard = rng.random() < 0.3
    l = (torch.randn(R, K, dtype=torch.float64) * 2).to(dtype)
    seed, offset = rng.randrange(2**40), rng.randrange(1000)
    with fastgrad.backend(backend):
        y = F.gumbel_softmax(l, tau, n, hard, seed=seed, offset=offset)
    u = _philox.uniform(seed, offset, n * R * K).double().view(n, R, K)
    z = l.double() - torch.log(-torch.log(u))
    fails = []
    if hard:
        want = torch.zeros_like(z).scatter_(-1, z.argmax(-1, keepdim=True), 1.0)
        # ties of the perturbed values within the accumulation's rounding may pick either: compare the argmax's z
        got = y.double().argmax(-1, keepdim=True) if R else None
        if R and (z.gather(-1, got) - z.max(-1, keepdim=True).values).abs().max() > tol(_acc(dtype), _acc(dtype),
                                                                                        K, z.abs().max().item()):
            fails.append("hard sample is not the argmax")
        if not torch.all((y == 0) | (y == 1)) or (R and not torch.all(y.double().sum(-1) == 1)):
            fails.append("hard sample is not one-hot")
        del want
    else:
        want = torch.softmax(z / tau, -1)
        e = (y.double() - want).abs().max().item() if want.numel() else 0.0
        # softmax of (z / tau): the error of z (eps * |z|) is amplified by 1/tau
        if not e <= tol(dtype, _acc(dtype), K, 1 + (z.abs().max().item() if z.numel() else 0) / tau):
            fails.append(f"soft error {e:.3g}")
    return dict(R=R, K=K, n=n, tau=tau, hard=hard), fails


def case_enumerate(rng, backend, dtype, interpreted):
    B = rng.randint(0, 4)
    k = rng.randint(1, 3)
    K = rng.randint(1, 5)
    l = (torch.randn(B, k, K, dtype=torch.float64) * 2).to(dtype)
    with fastgrad.backend(backend):
        out = F.enumerate_log_probs(l)
    lp = torch.log_softmax(l.double(), -1)
    want = torch.tensor([[sum(lp[b, i, c[i]].item() for i in range(k)) for b in range(B)]
                         for c in itertools.product(range(K), repeat=k)], dtype=torch.float64).view(K**k, B)
    e = (out.double() - want).abs().max().item() if want.numel() else 0.0
    fails = [] if e <= tol(dtype, _acc(dtype), K * k, 1 + want.abs().max().item() if want.numel() else 1) \
        else [f"error {e:.3g}"]
    return dict(B=B, k=k, K=K), fails


def case_sample(rng, backend, dtype, interpreted):
    R = rng.randint(0, 6)
    K = rng.choice([1, 2, 9, 200])
    n = rng.randint(1, 6)
    l = (torch.randn(R, K, dtype=torch.float64) * 3).to(dtype)
    if K > 1 and R:
        l[:, 0] = -math.inf  # category 0 has zero probability: never drawn
    seed = rng.randrange(2**40)
    with fastgrad.backend(backend):
        idx, oh = F.sample_categorical_one_hot(l, n, seed=seed)
    with fastgrad.backend("reference"):
        ref = F.sample_categorical(l, n, seed=seed)
    fails = []
    if idx.numel() and (int(idx.min()) < (1 if K > 1 else 0) or int(idx.max()) >= K):
        fails.append("index out of range or a zero-probability category drawn")
    if not torch.equal(oh.argmax(-1), idx) or (oh.numel() and not torch.all(oh.sum(-1) == 1)):
        fails.append("one-hot does not match the indices")
    if (idx != ref).float().mean().item() > 0.01 if idx.numel() else False:
        fails.append("differs from the reference sampler for the same seed")
    return dict(R=R, K=K, n=n), fails


def case_bad(rng, backend, dtype, interpreted):
    """One corrupted call: must raise ValueError/TypeError (anything else, or no error, is a failure)."""
    K = rng.choice([3, 1100])
    l = torch.randn(4, K).to(dtype)
    idx = torch.randint(0, K, (2, 4))
    cost = torch.randn(2, 4)
    kind = rng.choice(["nan_logits", "inf_logits", "masked_row", "idx_high", "idx_neg", "cost_nan", "cost_shape",
                       "samples_float", "tau_zero", "n_zero", "enum_nan", "probs_negative"])
    pos = rng.randrange(K)
    calls = {
        "nan_logits": lambda: F.score_function_surrogate(_put(l, pos, math.nan), idx, cost),
        "inf_logits": lambda: F.sample_categorical(_put(l, pos, math.inf), 2),
        "masked_row": lambda: F.gumbel_softmax(_row(l, -math.inf), 0.5),
        "idx_high": lambda: F.score_function_surrogate(l, _put(idx, 1, K), cost),
        "idx_neg": lambda: F.categorical_log_prob(l, _put(idx, 0, -1)),
        "cost_nan": lambda: F.score_function_surrogate(l, idx, _put(cost, 0, math.nan)),
        "cost_shape": lambda: F.score_function_surrogate(l, idx, torch.randn(3, 4)),
        "samples_float": lambda: F.score_function_surrogate(l, idx.float(), cost),
        "tau_zero": lambda: F.gumbel_softmax(l, 0.0),
        "n_zero": lambda: F.sample_categorical(l, 0),
        "enum_nan": lambda: F.enumerate_log_probs(_put(l, 0, math.nan)[:, None, :3].contiguous()),
        "probs_negative": lambda: F.sample_categorical(probs=_put(torch.rand(4, K), pos, -0.5)),
    }
    try:
        with fastgrad.backend(backend):
            calls[kind]()
    except (ValueError, TypeError):
        return dict(kind=kind, K=K), []
    except Exception as e:  # noqa: BLE001
        return dict(kind=kind, K=K), [f"{type(e).__name__}: {str(e)[:120]}"]
    return dict(kind=kind, K=K), ["no error"]


def case_registry(rng, backend, dtype, interpreted):
    """A registered op (every op of ``fastgrad.ops._registry.REGISTRY``: a new op is fuzzed without editing this
    file) on one of its declared sample inputs, the first floating input rescaled (0.1 to 60: rows whose picks lie
    far below their maximum, saturated softmaxes), against the op's reference."""
    from fastgrad.ops._registry import REGISTRY

    op = rng.choice(list(REGISTRY.values()))
    if op.kernels and backend not in op.kernels:
        backend = "reference" if backend != "reference" else backend
    if dtype not in op.dtypes:
        dtype = rng.choice(op.dtypes)
    label, args = rng.choice(op.sample_inputs(torch.device("cpu"), dtype))
    # the LM head's hidden states at realistic scales: at 20x its logits reach -5000 and k3's exp(ref - logp)
    # overflows (a documented limit of the k3 estimator, not of the head)
    scale = rng.choice([0.1, 1.0, 3.0] if op.name.startswith("linear_") else [0.1, 3.0, 20.0, 60.0])
    i = next(j for j, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point())
    args = args[:i] + ((args[i].double() * scale).to(dtype),) + args[i + 1:]
    info = dict(op=op.name, sample=label, scale=scale)
    # the magnitude the outputs' rounding scales with: the logits (the inputs, or hidden @ weight^T for the head)
    mag = float(args[i].double().abs().max()) if args[i].numel() else 0.0
    if op.name.startswith("linear_") and args[i].numel():
        mag = float((args[i].double() @ args[1].double().t()).abs().max())
    try:
        ref = op.reference(*args)
        with fastgrad.backend(backend):
            out = op.op(*args)
    except (ValueError, TypeError) as e:  # a valid input: no error expected
        return info, [f"raised {type(e).__name__}: {str(e)[:120]}"]
    out, ref = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    fails = []
    K = args[i].shape[-1] if args[i].dim() else 1
    for j, (o, r) in enumerate(zip(out, ref)):
        if o.shape != r.shape or o.dtype != r.dtype:
            fails.append(f"output {j}: {o.dtype}{tuple(o.shape)} vs {r.dtype}{tuple(r.shape)}")
        elif o.is_floating_point():
            big = float(r.abs().max()) if r.numel() else 0.0
            err = float((o - r).abs().max()) if r.numel() else 0.0
            bound = tol(o.dtype, _acc(dtype), K, max(1.0, big, mag)) * (64 if dtype in (torch.bfloat16,
                                                                                   torch.float16) else 4)
            if not err <= bound:
                fails.append(f"output {j}: max error {err:.3g} > {bound:.3g}")
        elif r.numel() and float((o != r).float().mean()) > 1e-3:  # samples: only float near-ties may differ
            fails.append(f"output {j}: {int((o != r).sum())} of {r.numel()} differ")
    return info, fails


def _put(t, pos, value):
    t = t.clone()
    t.view(-1)[pos % t.numel()] = value
    return t


def _row(t, value):
    t = t.clone()
    t[1] = value
    return t


CASES = [case_surrogate, case_gumbel, case_enumerate, case_sample, case_bad, case_registry]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backends", default="")
    args = ap.parse_args(argv)
    from tests.conftest import available_backends

    backends = args.backends.split(",") if args.backends else available_backends("cpu")
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    failures = []
    for i in range(args.cases):
        case = CASES[i % len(CASES)]
        backend = backends[rng.randrange(len(backends))]
        dtype = rng.choice(DTYPES)
        interpreted = backend == "triton" and not torch.cuda.is_available()
        info, fails = case(rng, backend, dtype, interpreted)
        fastgrad.reset()
        for f in fails:
            failures.append(dict(i=i, case=case.__name__, backend=backend, dtype=str(dtype), **info, failure=f))
    print(json.dumps({"cases": args.cases, "failures": failures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
