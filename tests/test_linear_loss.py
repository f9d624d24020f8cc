"""The fused LM-head ops (``fastgrad.functional.linear_log_prob`` / ``linear_policy_loss`` /
``linear_score_function_surrogate``) against an independent float64 unfused oracle, on every backend.

Tolerances: fp32 log-probs and entropies atol 1e-5, gradients relative (Frobenius) 1e-4; bf16 inputs: fastgrad's
error against the fp64 oracle no larger than torch's own bf16 unfused computation (bf16 GEMM, fp32 log_softmax)."""
import math

import pytest
import torch

import fastgrad
import fastgrad.functional as F
from fastgrad.ops import linear_policy_loss as lm

from ._stats import assert_unbiased
from .conftest import INTERPRETED, available_backends

BACKENDS = available_backends()


# -- the oracle: written from the formulas, in float64 ---------------------------------------------------------
def oracle_logits(h, w, b, T):
    z = h.double() @ w.double().t()
    if b is not None:
        z = z + b.double()
    return z / T


def oracle_log_prob(h, w, b, idx, T=1.0, ignore=-100):
    ls = torch.log_softmax(oracle_logits(h, w, b, T), -1)
    valid = idx != ignore
    logp = ls.gather(-1, torch.where(valid, idx, 0).unsqueeze(-1)).squeeze(-1) * valid
    ent = -(ls.exp() * ls).sum(-1) * valid
    return logp, ent


def oracle_policy_loss(h, w, b, idx, adv, mask, T=1.0, old=None, ref=None, beta=0.0, kl="k3", loss="reinforce",
                       eps_low=0.2, eps_high=0.2, entropy_coef=0.0, normalize="token", clip_ratio_c=None):
    """[B, T] inputs; TRL-style: per-token loss, masked, then the normalization."""
    logp, ent = oracle_log_prob(h, w, b, idx, T)
    A = adv.double() if adv.dim() == 2 else adv.double()[:, None].expand(idx.shape)
    if loss == "reinforce":
        per_token = -A * logp
    elif loss == "cispo":  # the clipped importance weight, detached, times the REINFORCE term
        o = logp.detach() if old is None else old.double()
        per_token = -torch.clamp(torch.exp(logp.detach() - o), 1 - eps_low, 1 + eps_high) * A * logp
    else:
        o = logp.detach() if old is None else old.double()
        if loss == "gspo":  # GSPO-token: the sequence's ratio, detached, times exp(logp - sg(logp))
            md = mask.double()
            log_s = ((logp.detach() - o) * md).sum(1, keepdim=True) / md.sum(1, keepdim=True).clamp(min=1)
            r = torch.exp(log_s + logp - logp.detach())
        else:
            r = torch.exp(logp - o)
        per_token = torch.max(-A * r, -A * torch.clamp(r, 1 - eps_low, 1 + eps_high))
        if clip_ratio_c is not None:  # dual clip, verl's form: for A < 0 at most -c A
            per_token = torch.where(A < 0, torch.min(per_token, -A * clip_ratio_c), per_token)
    if beta:
        x = ref.double() - logp
        per_token = per_token + beta * {"k1": -x, "k2": 0.5 * x * x, "k3": torch.exp(x) - x - 1}[kl]
    per_token = per_token - entropy_coef * ent
    m = mask.double()
    if normalize == "token":
        return (per_token * m).sum() / m.sum()
    if normalize == "sequence":
        return ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).mean()
    return (per_token * m).sum() / (idx.shape[0] * idx.shape[1])


def _head(N, H, V, dtype=torch.float32, seed=0, peaked=False, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) / math.sqrt(H) * 2
    if peaked:  # one logit +30 above the rest (verl #2656's failure: out-of-bounds vocab tiles corrupting lse)
        h = torch.zeros(N, H)
        h[:, 0] = 1
        w = torch.full((V, H), 0.0)
        w[:, 0] = -15
        w[V - 1, 0] = 30
    b = torch.randn(V, generator=g) if bias else None
    idx = torch.randint(0, V, (N,), generator=g)
    if N:
        idx[-1] = V - 1
    return h.to(dtype), w.to(dtype), None if b is None else b.to(dtype), idx


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def _grads(fn, *ts):
    ts = [t.detach().clone().requires_grad_(True) if t is not None else None for t in ts]
    out = fn(*ts)
    out.backward()
    return out.detach(), [t.grad if t is not None else None for t in ts]


# -- log-probs and entropy against the oracle ------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V,chunk,T,bias", [(2, None, 1.0, False), (7, 1, 0.7, True), (1003, 7, 1.0, True),
                                            (1003, None, 0.7, False)])
def test_log_prob_entropy_and_grads_match_oracle(backend, V, chunk, T, bias):
    N, H = 13, 16
    h, w, b, idx = _head(N, H, V, bias=bias)
    idx[2] = -100
    cw = torch.randn(N, generator=torch.Generator().manual_seed(1))  # weights on logp and entropy in the loss
    ce = torch.randn(N, generator=torch.Generator().manual_seed(2))

    def fused(h, w, b):
        lp, ent = F.linear_log_prob(h, w, idx, bias=b, temperature=T, return_entropy=True, chunk_size=chunk)
        return (cw * lp).sum() + (ce * ent).sum()

    def oracle(h, w, b):
        lp, ent = oracle_log_prob(h, w, b, idx, T)
        return (cw.double() * lp).sum() + (ce.double() * ent).sum()

    with fastgrad.ops._backend.backend(backend):
        lp, ent = F.linear_log_prob(h, w, idx, bias=b, temperature=T, return_entropy=True, chunk_size=chunk)
        _, g = _grads(fused, h, w, b)
    olp, oent = oracle_log_prob(h, w, b, idx, T)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    torch.testing.assert_close(lp.double(), olp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), oent, atol=1e-5, rtol=0)
    assert float(lp.max()) <= 0 and lp[2] == 0 and ent[2] == 0
    _, og = _grads(oracle, h, w, b)
    for a, o in zip(g, og):
        if o is not None:
            assert _rel(a, o) < 1e-4


@pytest.mark.parametrize("V", [128256, 151936, 152064, 2**17 + 3])
def test_vocabulary_sizes_peaked_rows_and_last_token(V):
    backends = [b for b in BACKENDS if not (b == "triton" and INTERPRETED)] + (
        ["triton"] if "triton" in BACKENDS and V == 2**17 + 3 else [])
    for peaked in (False, True):
        h, w, _, idx = _head(3, 8, V, peaked=peaked)
        olp, oent = oracle_log_prob(h, w, None, idx)
        for backend in backends:
            with fastgrad.ops._backend.backend(backend):
                lp, ent = F.linear_log_prob(h, w, idx, return_entropy=True)
            torch.testing.assert_close(lp.double(), olp, atol=1e-5, rtol=0)
            torch.testing.assert_close(ent.double(), oent, atol=1e-5, rtol=0)
            assert float(lp.max()) <= 0
            if peaked:  # the target V - 1 holds the +30 logit: logp ~ -(V-1) e^-45
                assert float(lp[-1]) > -1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_probs_normalize_and_do_not_depend_on_the_chunk(backend):
    N, H, V = 9, 5, 7
    h, w, b, _ = _head(N, H, V, bias=True)
    with fastgrad.ops._backend.backend(backend):
        # every token of every row: logsumexp over V of the log-probs is 0
        every = F.linear_log_prob(h.repeat_interleave(V, 0), w, torch.arange(V).repeat(N), bias=b).view(N, V)
        torch.testing.assert_close(torch.logsumexp(every.double(), -1), torch.zeros(N, dtype=torch.float64),
                                   atol=1e-6, rtol=0)
        idx = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(3))
        outs = [F.linear_log_prob(h, w, idx, bias=b, chunk_size=c) for c in (1, 2, 7, N, 128)]
    # ATen's GEMM may order its reduction by the block's row count: equal to 1e-6, not bit for bit
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_shapes(backend):
    H, V = 6, 11
    with fastgrad.ops._backend.backend(backend):
        # N = 1
        h, w, _, idx = _head(1, H, V)
        torch.testing.assert_close(F.linear_log_prob(h, w, idx).double(), oracle_log_prob(h, w, None, idx)[0],
                                   atol=1e-5, rtol=0)
        # empty batch: empty outputs, zero gradients
        h0 = torch.zeros(0, H, requires_grad=True)
        w0 = w.clone().requires_grad_(True)
        lp = F.linear_log_prob(h0, w0, torch.zeros(0, dtype=torch.int64))
        assert lp.shape == (0,)
        lp.sum().backward()
        assert w0.grad is not None and float(w0.grad.abs().sum()) == 0
        loss, _ = F.linear_policy_loss(h0, w0, torch.zeros(0, dtype=torch.int64), torch.zeros(0))
        assert float(loss) == 0
        # [B, T, H] and non-contiguous hidden
        hb = torch.randn(2, 3, 2 * H)[..., ::2]
        assert not hb.is_contiguous()
        ib = torch.randint(0, V, (2, 3))
        lp = F.linear_log_prob(hb, w, ib)
        assert lp.shape == (2, 3)
        torch.testing.assert_close(lp.double(), oracle_log_prob(hb.reshape(6, H), w, None, ib.reshape(6))[0]
                                   .view(2, 3), atol=1e-5, rtol=0)
        # N not a multiple of the chunk
        h, w, _, idx = _head(10, H, V)
        torch.testing.assert_close(F.linear_log_prob(h, w, idx, chunk_size=3).double(),
                                   oracle_log_prob(h, w, None, idx)[0], atol=1e-5, rtol=0)


def test_statistic_buffers_only_when_asked():
    h, w, _, idx = _head(4, 3, 5)
    _, _, ent, sq, _ = torch.ops.fastgrad.linear_log_prob(h, w, None, idx.unsqueeze(1), 1.0, -100, False, 0)
    assert ent.numel() == 0 and sq.numel() == 0
    _, stats = F.linear_policy_loss(h, w, idx, torch.ones(4))
    assert stats["entropy"] is None
    out = torch.ops.fastgrad.linear_policy_loss(h, w, None, idx, torch.ones(4), torch.ones(4), None, None, 1.0,
                                                -100, "reinforce", 0.2, 0.2, 0.0, "k3", 0.0, False, 0,
                                                [False, False, False])
    assert out[2].numel() == 0 and out[3].shape == (4, 4)  # kl, clipped, ratio, rollout weight: no sum p^2, lse


# -- bf16: never less accurate than the torch computation it replaces ------------------------------------------
CPU_BF16_PLANS = [dict(grads="fp32", logits="fp32"), dict(grads="bf16", logits="fp32"),
                  dict(grads="bf16", logits="bf32")]


@pytest.mark.parametrize("backend,plan", [
    pytest.param(b, p, id=f"{b}-{p['grads']}-{p['logits']}")
    for b in BACKENDS if not (b == "triton" and INTERPRETED)
    for p in (CPU_BF16_PLANS if b in ("reference", "cpp") else CPU_BF16_PLANS[:1])])  # the plans are the CPU's
def test_bf16_error_no_larger_than_torch_bf16(backend, plan, monkeypatch):
    # each CPU plan, not the one this process's timing picks (it can differ between runs near a threshold)
    from fastgrad.ops import _lm_head

    monkeypatch.setattr(_lm_head, "_CPU_BF16_PLAN", dict(plan, speedup=0.0, bf32_speedup=0.0))
    N, H, V = 16, 64, 3001
    h, w, _, idx = _head(N, H, V, dtype=torch.bfloat16)
    adv = torch.randn(N, generator=torch.Generator().manual_seed(4))

    def fused(h, w):
        loss, _ = F.linear_policy_loss(h, w, idx, adv, loss="ppo_clip", entropy_coef=0.01, chunk_size=5)
        return loss

    def torch_bf16(h, w):
        ls = torch.log_softmax((h @ w.t()).float(), -1)
        lp = ls.gather(-1, idx[:, None]).squeeze(-1)
        ent = -(ls.exp() * ls).sum(-1)
        r = torch.exp(lp - lp.detach())
        return (torch.max(-adv * r, -adv * r.clamp(0.8, 1.2)) - 0.01 * ent).mean()

    def oracle(h, w):
        m = torch.ones(1, N, dtype=torch.bool)
        return oracle_policy_loss(h[None], w, None, idx[None], adv[None], m, loss="ppo_clip", entropy_coef=0.01)

    with fastgrad.ops._backend.backend(backend):
        lf, gf = _grads(fused, h, w)
        lpf = F.linear_log_prob(h, w, idx)
    lt, gt = _grads(torch_bf16, h, w)
    lo, go = _grads(oracle, h, w)
    lpo = oracle_log_prob(h, w, None, idx)[0]
    lpt = torch.log_softmax((h @ w.t()).float(), -1).gather(-1, idx[:, None]).squeeze(-1)
    assert (lpf.double() - lpo).abs().max() <= (lpt.double() - lpo).abs().max()
    assert (lpf.double() - lpo).abs().max() <= 1e-3
    assert abs(float(lf) - float(lo)) <= abs(float(lt) - float(lo)) + 1e-7
    for a, t, o in zip(gf, gt, go):
        assert a.dtype == torch.bfloat16
        assert _rel(a, o) <= _rel(t, o) and _rel(a, o) <= 1e-2


@pytest.mark.parametrize("N,chunk", [(24, 7), (512, 4)])  # 4 and 128 token blocks: dW is accumulated over them
@pytest.mark.parametrize("plan", CPU_BF16_PLANS, ids=lambda p: f"{p['grads']}-{p['logits']}")
def test_every_cpu_bf16_plan_is_as_accurate_as_torch_bf16(plan, N, chunk, monkeypatch):
    # whichever plan this CPU's measurement picks (cpu_bf16_plan), each must keep the log-probs at fp32 accuracy and
    # the gradients no worse than torch's bf16 autograd
    from fastgrad.ops import _lm_head

    monkeypatch.setattr(_lm_head, "_CPU_BF16_PLAN", dict(plan, speedup=0.0, bf32_speedup=0.0))
    H, V = 64, 3001
    h, w, _, idx = _head(N, H, V, dtype=torch.bfloat16, seed=3)
    ce = torch.randn(N, generator=torch.Generator().manual_seed(5))

    def fused(h, w):
        lp, ent = F.linear_log_prob(h, w, idx, return_entropy=True, chunk_size=chunk)
        return (lp * ce).sum() + ent.sum() * 0.1

    def torch_bf16(h, w):
        ls = torch.log_softmax((h @ w.t()).float(), -1)
        return (ls.gather(-1, idx[:, None]).squeeze(-1) * ce).sum() - (ls.exp() * ls).sum() * 0.1

    def oracle(h, w):
        lp, ent = oracle_log_prob(h, w, None, idx)
        return (lp * ce.double()).sum() + ent.sum() * 0.1

    lf, gf = _grads(fused, h, w)
    lt, gt = _grads(torch_bf16, h, w)
    lo, go = _grads(oracle, h, w)
    lpf = F.linear_log_prob(h, w, idx)
    assert (lpf.double() - oracle_log_prob(h, w, None, idx)[0]).abs().max() <= 2e-5  # fp32 logits, not bf16
    for a, t, o in zip(gf, gt, go):
        assert a.dtype == torch.bfloat16
        assert _rel(a, o) <= 1.2 * _rel(t, o) and _rel(a, o) <= 1e-2


# -- the policy losses ------------------------------------------------------------------------------------------
LOSS_CASES = [
    dict(loss="reinforce", normalize="token"),
    dict(loss="reinforce", normalize="sequence", entropy_coef=0.05),
    dict(loss="ppo_clip", normalize="token", old=True),
    dict(loss="ppo_clip", normalize="sequence", old=True, beta=0.1, kl="k3", eps_high=0.28),
    dict(loss="ppo_clip", normalize="constant", old=True, beta=0.2, kl="k1", entropy_coef=0.02),
    dict(loss="ppo_clip", normalize="token", beta=0.05, kl="k2", per_token_adv=True),
    dict(loss="cispo", normalize="token", old=True, eps_low=0.1, eps_high=0.3),
    dict(loss="cispo", normalize="sequence", old=True, beta=0.1, kl="k3", entropy_coef=0.01),
    dict(loss="ppo_clip", normalize="token", old=True, clip_ratio_c=1.3),
    dict(loss="ppo_clip", normalize="sequence", old=True, clip_ratio_c=1.3, beta=0.1, kl="k3", per_token_adv=True),
    dict(loss="gspo", normalize="sequence", old=True),
    dict(loss="gspo", normalize="sequence", old=True, eps_low=0.05, eps_high=0.05, clip_ratio_c=1.1, beta=0.1),
    dict(loss="gspo", normalize="token", old=True, per_token_adv=True, entropy_coef=0.02),
    dict(loss="gspo", normalize="sequence"),
]


def _policy_inputs(B=3, T=5, H=8, V=37, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    h, w, b, _ = _head(B * T, H, V, seed=seed, bias=bias)
    idx = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[:, 0] = True
    idx[0, -1] = -100
    lp = oracle_log_prob(h, w, b, idx.reshape(-1))[0].view(B, T).float()
    old = (lp + 0.3 * torch.randn(B, T, generator=g)).float()
    ref = (lp + 0.3 * torch.randn(B, T, generator=g)).float()
    return h.view(B, T, H), w, b, idx, mask, old, ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_policy_loss_matches_oracle(backend, case):
    c = dict(case)
    h, w, b, idx, mask, old, ref = _policy_inputs(bias=True)
    B, T = idx.shape
    g = torch.Generator().manual_seed(5)
    adv = torch.randn(B, T, generator=g) if c.pop("per_token_adv", False) else torch.randn(B, generator=g)
    use_old = c.pop("old", False)
    kw = dict(old_logp=old if use_old else None, ref_logp=ref if c.get("beta") else None, **c)
    okw = dict(old=kw["old_logp"], ref=kw["ref_logp"], **c)
    omask = mask & (idx != -100)

    def fused(h, w, b):
        loss, _ = F.linear_policy_loss(h, w, idx, adv, mask=mask, bias=b, temperature=0.9, chunk_size=4, **kw)
        return loss

    with fastgrad.ops._backend.backend(backend):
        lf, gf = _grads(fused, h, w, b)
        _, stats = F.linear_policy_loss(h, w, idx, adv, mask=mask, bias=b, temperature=0.9, return_entropy=True, **kw)
    lo, go = _grads(lambda h, w, b: oracle_policy_loss(h, w, b, idx, adv, omask, 0.9, **okw), h, w, b)
    assert abs(float(lf) - float(lo)) <= 1e-5 * max(1.0, abs(float(lo)))
    for a, o in zip(gf, go):
        assert _rel(a, o) < 1e-4
    olp, oent = oracle_log_prob(h.reshape(B * T, -1), w, b, idx.reshape(-1), 0.9)
    m = omask.reshape(-1)
    torch.testing.assert_close(stats["logp"].reshape(-1)[m].double(), olp[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(stats["entropy"].reshape(-1)[m].double(), oent[m], atol=1e-5, rtol=0)
    assert float(stats["logp"].reshape(-1)[~m].abs().sum()) == 0  # masked tokens: not computed
    assert not any(v.requires_grad for v in stats.values() if v is not None)  # reports, detached
    if use_old:
        d = (olp - old.reshape(-1).double()) * m
        if c["loss"] == "gspo":  # every token carries its sequence's ratio
            d = (d.view(B, T).sum(1, keepdim=True) / m.view(B, T).sum(1, keepdim=True)).expand(B, T).reshape(-1)
        torch.testing.assert_close(stats["ratio_mean"].double(), torch.exp(d[m]).mean(), atol=1e-5, rtol=0)


def test_closed_form_coefficients_equal_autograd_of_the_loss():
    g = torch.Generator().manual_seed(6)
    n = 400
    lp = -torch.rand(n, generator=g, dtype=torch.float64) * 3
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    old = lp + 0.4 * torch.randn(n, generator=g, dtype=torch.float64)
    ref = lp + 0.4 * torch.randn(n, generator=g, dtype=torch.float64)
    ent = torch.rand(n, generator=g, dtype=torch.float64)
    P = lm.LossParams(0.2, 0.3, 0.0, 1.0, 1.05)
    for loss in lm.LOSSES:
        for kl in lm.KLS:
            for o in (None, old):
                x = lp.clone().requires_grad_(True)
                e = ent.clone().requires_grad_(True)
                for roll in (None, torch.rand(n, generator=g, dtype=torch.float64) * 2):
                    l_t, _ = lm.token_loss(x, e, adv, o, ref, loss, P, 0.1, kl, 0.05, roll)
                    gx, ge = torch.autograd.grad(l_t.sum(), [x, e])
                    c, gh = lm.token_loss_grad(lp, adv, o, ref, loss, P, 0.1, kl, 0.05, roll)
                    torch.testing.assert_close(c, gx, atol=1e-12, rtol=0)
                    torch.testing.assert_close(torch.full_like(ge, gh), ge, atol=1e-12, rtol=0)


def test_dual_clip_coefficients_equal_autograd_of_the_loss():
    g = torch.Generator().manual_seed(7)
    n = 400
    lp = -torch.rand(n, generator=g, dtype=torch.float64) * 3
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    old = lp + 0.8 * torch.randn(n, generator=g, dtype=torch.float64)  # wide ratios: every branch is visited
    x = lp.clone().requires_grad_(True)
    P = lm.LossParams(0.2, 0.3, 2.0)
    l_t, st = lm.token_loss(x, None, adv, old, None, "ppo_clip", P, 0.0, "k3", 0.0)
    (gx,) = torch.autograd.grad(l_t.sum(), x)
    c, _ = lm.token_loss_grad(lp, adv, old, None, "ppo_clip", P, 0.0, "k3", 0.0)
    torch.testing.assert_close(c, gx, atol=1e-12, rtol=0)
    r = torch.exp(lp - old)
    dual = (adv < 0) & (r > 2.0)
    assert dual.sum() > 10 and (c[dual] == 0).all() and torch.equal(l_t.detach()[dual], -2.0 * adv[dual])
    assert (st[1][dual] == 1).all()  # counted as clipped
    l0, _ = lm.token_loss(x, None, adv, old, None, "ppo_clip", P._replace(clip_ratio_c=0.0), 0.0, "k3", 0.0)
    assert torch.equal(l_t.detach()[~dual], l0.detach()[~dual])


def test_gspo_is_the_sequence_objective_of_the_paper():
    # Zheng et al. 2025, eq. (GSPO): J = mean_b min(s_b A_b, clip(s_b) A_b), s_b = (pi(y_b) / pi_old(y_b))^(1/|y_b|),
    # differentiated through s_b itself (not the token-level form the fused loss uses)
    h, w, b, idx, mask, old, ref = _policy_inputs(B=4, T=6, bias=True)
    B, T = idx.shape
    adv = torch.randn(B, generator=torch.Generator().manual_seed(8))
    m = mask & (idx != -100)

    def paper(h, w, b):
        lp, _ = oracle_log_prob(h, w, b, idx, 1.0)
        md = m.double()
        s = torch.exp(((lp - old.double()) * md).sum(1) / md.sum(1))
        A = adv.double()
        return -torch.min(s * A, torch.clamp(s, 0.9, 1.1) * A).mean()

    def fused(h, w, b):
        return F.linear_policy_loss(h, w, idx, adv, mask=mask, bias=b, old_logp=old, loss="gspo", eps_low=0.1,
                                    eps_high=0.1, normalize="sequence", chunk_size=5)[0]

    lf, gf = _grads(fused, h, w, b)
    lo, go = _grads(paper, h, w, b)
    assert abs(float(lf) - float(lo)) <= 1e-5 * max(1.0, abs(float(lo)))
    for a, o in zip(gf, go):
        assert _rel(a, o) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_and_ignored_tokens_give_zero_loss_and_gradient(backend):
    h, w, b, idx, mask, old, ref = _policy_inputs()
    B, T, H = h.shape
    adv = torch.randn(B)
    dead = ~mask | (idx == -100)
    with fastgrad.ops._backend.backend(backend):
        hh = h.clone().requires_grad_(True)
        loss, _ = F.linear_policy_loss(hh, w, idx, adv, mask=mask, old_logp=old, loss="ppo_clip")
        loss.backward()
        assert float(hh.grad[dead].abs().sum()) == 0
        # changing a dead token's hidden state changes nothing
        h2 = h.clone()
        h2[dead] = 100.0
        loss2, _ = F.linear_policy_loss(h2, w, idx, adv, mask=mask, old_logp=old, loss="ppo_clip")
        assert float(loss2) == float(loss)
        # linear_log_prob: zero upstream gradient at a row skips it
        hh = h.reshape(-1, H).clone().requires_grad_(True)
        lp = F.linear_log_prob(hh, w, idx.reshape(-1))
        (lp * mask.reshape(-1)).sum().backward()
        assert float(hh.grad[dead.reshape(-1)].abs().sum()) == 0


@pytest.mark.parametrize("which", ["hidden", "weight", "both"])
def test_gradient_flags(which):
    # verl #6913: requires_grad lost inside an autograd.Function; each combination must get its gradients
    h, w, b, idx, mask, old, ref = _policy_inputs()
    h = h.clone().requires_grad_(which in ("hidden", "both"))
    w = w.clone().requires_grad_(which in ("weight", "both"))
    adv = torch.randn(h.shape[0])
    loss, _ = F.linear_policy_loss(h, w, idx, adv)
    lp = F.linear_log_prob(h, w, idx)
    assert loss.requires_grad and lp.requires_grad
    (loss + lp.sum()).backward()
    for t, want in ((h, which != "weight"), (w, which != "hidden")):
        assert (t.grad is not None and float(t.grad.abs().sum()) > 0) if want else t.grad is None


def test_no_grad_and_frozen_inputs_compute_no_gradients():
    h, w, b, idx, mask, old, ref = _policy_inputs()
    with torch.no_grad():
        loss, _ = F.linear_policy_loss(h.requires_grad_(True), w, idx, torch.ones(3))
    assert not loss.requires_grad


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_gradcheck_float64(backend):
    h, w, b, idx, mask, old, ref = _policy_inputs(B=2, T=3, H=3, V=5, bias=True)
    h, w, b = h.double(), w.double(), b.double()
    adv = torch.randn(2, dtype=torch.float64)
    with fastgrad.ops._backend.backend(backend):
        def lp_fn(h, w, b):
            lp, ent = F.linear_log_prob(h, w, idx, bias=b, temperature=0.8, return_entropy=True, chunk_size=2)
            return lp, ent
        assert torch.autograd.gradcheck(lp_fn, (h.requires_grad_(), w.requires_grad_(), b.requires_grad_()))
        for case in LOSS_CASES:
            if case["loss"] == "cispo":  # a stop-gradient surrogate: finite differences see the detached weight move
                continue
            if case["loss"] == "gspo" and case.get("per_token_adv"):
                # GSPO-token with per-token advantages is defined by its gradient (the sequence ratio is detached);
                # with per-sequence advantages its value is GSPO's objective and the gradient is that value's
                continue
            c = dict(case)
            pt = c.pop("per_token_adv", False)
            use_old = c.pop("old", False)
            a = torch.randn(2, 3, dtype=torch.float64) if pt else adv

            # on-policy PPO (old_logp=None) is a stop-gradient surrogate, ratio exp(logp - sg(logp)) = 1: its value
            # does not move with the inputs, so finite differences cannot see its gradient (the oracle test does)
            use_old = use_old or c["loss"] in ("ppo_clip", "gspo")

            def loss_fn(h, w, b, c=c, a=a, use_old=use_old):
                # x 2: an upstream gradient other than 1 keeps the stored gradients (gradcheck backwards repeatedly)
                return 2 * F.linear_policy_loss(h, w, idx, a, mask=mask, bias=b, old_logp=old.double() if use_old
                                            else None, ref_logp=ref.double(), temperature=0.8, chunk_size=2, **c)[0]
            assert torch.autograd.gradcheck(loss_fn, (h, w, b))


def test_backward_hands_gradients_over_once():
    h, w, b, idx, mask, old, ref = _policy_inputs()
    h = h.clone().requires_grad_(True)
    loss, _ = F.linear_policy_loss(h, w, idx, torch.randn(3))
    loss.backward(retain_graph=True)
    g1 = h.grad.clone()
    with pytest.raises(RuntimeError, match="recompute the loss"):
        loss.backward()
    h.grad = None
    loss, _ = F.linear_policy_loss(h, w, idx, torch.randn(3, generator=torch.Generator().manual_seed(0)))
    (3 * loss).backward(retain_graph=True)
    (3 * loss).backward()  # scaled: kept, so a second backward accumulates
    loss2, _ = F.linear_policy_loss(h.detach().requires_grad_(True), w, idx,
                                    torch.randn(3, generator=torch.Generator().manual_seed(0)))
    assert g1.abs().sum() > 0
    h2 = h.detach().clone().requires_grad_(True)
    loss2, _ = F.linear_policy_loss(h2, w, idx, torch.randn(3, generator=torch.Generator().manual_seed(0)))
    loss2.backward()
    torch.testing.assert_close(h.grad, 6 * h2.grad)


def test_opcheck():
    h, w, b, idx, mask, old, ref = _policy_inputs(B=2, T=3, H=4, V=6, bias=True)
    h2 = h.reshape(6, 4).requires_grad_(True)
    w2 = w.clone().requires_grad_(True)
    b2 = b.clone().requires_grad_(True)
    i2 = torch.where(idx.reshape(6) == -100, 0, idx.reshape(6))
    torch.library.opcheck(torch.ops.fastgrad.linear_log_prob.default, (h2, w2, b2, i2.unsqueeze(1), 0.9, -100, True, 2))
    torch.library.opcheck(torch.ops.fastgrad.linear_policy_loss.default,
                          (h2, w2, b2, i2, torch.randn(6), torch.full((6,), 1 / 6), old.reshape(6), ref.reshape(6),
                           0.9, -100, "ppo_clip", 0.2, 0.2, 0.1, "k3", 0.01, True, 2, [True, True, True]))


def test_torch_compile_fullgraph():
    h, w, b, idx, mask, old, ref = _policy_inputs(B=2, T=3, H=4, V=6)
    adv = torch.randn(2)

    def step(h, w):
        lp, ent = F.linear_log_prob(h, w, idx, return_entropy=True)
        loss, _ = F.linear_policy_loss(h, w, idx, adv, old_logp=old, loss="ppo_clip", entropy_coef=0.01)
        return loss + (lp * ent).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    le, ge = _grads(step, h, w)
    lc, gc = _grads(compiled, h, w)
    torch.testing.assert_close(lc, le)
    for a, o in zip(gc, ge):
        torch.testing.assert_close(a, o)


# -- estimators: unbiased against exact enumeration ---------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["reinforce", "rloo", "surrogate_rloo"])
def test_policy_gradients_are_unbiased(estimator):
    """A one-token policy over V = 5 tokens, reward f(y); the exact gradient of E[f] w.r.t. hidden and weight is
    that of sum_y softmax_y f_y. n = 4 samples per repetition: REINFORCE (A = f) and RLOO (A = f - the mean of the
    other samples) through linear_policy_loss (loss = -mean A logp, so -grad estimates grad E[f]), and the
    leave-one-out linear_score_function_surrogate (its gradient estimates grad E[f] directly)."""
    H, V, n, reps = 3, 5, 4, 1500
    g = torch.Generator().manual_seed(7)
    h = torch.randn(1, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64)
    f = torch.tensor([1.0, -0.5, 2.0, 0.3, -1.2], dtype=torch.float64)
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    exact = torch.autograd.grad((torch.softmax(hh @ ww.t(), -1)[0] * f).sum(), [hh, ww])
    exact = torch.cat([e.reshape(-1) for e in exact])
    y = F.sample_categorical((h @ w.t()).expand(reps * n, V), 1, seed=11, offset=0)[0].view(reps, n)
    r = f[y]
    adv = r if estimator == "reinforce" else r - F.batch_average_baseline(r, 1)
    est = []
    for i in range(reps):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        if estimator == "surrogate_rloo":
            out = F.linear_score_function_surrogate(hh, ww, y[i].view(n, 1), r[i].view(n, 1),
                                                    baseline="batch_average").mean()
            sign = 1.0
        else:
            out, _ = F.linear_policy_loss(hh.expand(n, H), ww, y[i], adv[i], normalize="constant", num_items=float(n))
            sign = -1.0
        est.append(sign * torch.cat([t.reshape(-1) for t in torch.autograd.grad(out, [hh, ww])]))
    assert_unbiased(torch.stack(est), exact)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_surrogate_equals_explicit_logits_surrogate(backend):
    R, H, V, n = 6, 4, 9, 3
    h, w, b, _ = _head(R, H, V, bias=True)
    y = torch.randint(0, V, (n, R), generator=torch.Generator().manual_seed(9))
    cost = torch.randn(n, R, generator=torch.Generator().manual_seed(10))
    with fastgrad.ops._backend.backend(backend):
        for baseline in (None, "batch_average"):
            sf, gf = _grads(lambda h, w, b: F.linear_score_function_surrogate(h, w, y, cost, baseline, bias=b)
                            .pow(2).sum(), h, w, b)
            se, ge = _grads(lambda h, w, b: F.score_function_surrogate(h @ w.t() + b, y, cost, baseline)
                            .pow(2).sum(), h, w, b)
            torch.testing.assert_close(sf, se, atol=1e-5, rtol=1e-5)
            for a, o in zip(gf, ge):
                assert _rel(a, o) < 1e-4


# -- bad input ----------------------------------------------------------------------------------------------------
def test_bad_input_is_a_clear_error():
    h, w, b, idx, mask, old, ref = _policy_inputs()
    B, T, H = h.shape
    adv = torch.randn(B)
    bad_idx = idx.clone()
    bad_idx[0, 0] = w.shape[0]
    cases = [
        (lambda: F.linear_log_prob(h, w, bad_idx), ValueError, "index must lie in"),
        (lambda: F.linear_policy_loss(h, w, bad_idx, adv), ValueError, "index must lie in"),
        (lambda: F.linear_log_prob(h, w.double(), idx), TypeError, "weight must have hidden's dtype"),
        (lambda: F.linear_log_prob(h, w[:, :-1].contiguous(), idx), ValueError, "weight must have shape"),
        (lambda: F.linear_log_prob(h, w, idx[:, :-1]), ValueError, "index must have shape"),
        (lambda: F.linear_log_prob(h, w, idx.int()), TypeError, "index must be an int64"),
        (lambda: F.linear_policy_loss(h, w, idx, torch.randn(B + 1)), ValueError, "advantages must have shape"),
        (lambda: F.linear_policy_loss(h, w, idx, adv, beta=0.1), ValueError, "needs ref_logp"),
        (lambda: F.linear_policy_loss(h, w, idx, adv, loss="grpo"), ValueError, "loss must be one of"),
        (lambda: F.linear_policy_loss(h, w, idx, adv, kl="k4", beta=0.1, ref_logp=ref), ValueError, "kl must be"),
        (lambda: F.linear_policy_loss(h, w, idx, adv, normalize="batch"), ValueError, "normalize must be"),
        (lambda: F.linear_policy_loss(h.reshape(B * T, H), w, idx.reshape(-1), torch.randn(B * T),
                                      normalize="sequence"), ValueError, "needs \\[B, T\\]"),
        (lambda: F.linear_policy_loss(h, w, idx, adv, num_items=0), ValueError, "num_items"),
        (lambda: F.linear_policy_loss(h, w, idx, adv, loss="ppo_clip", clip_ratio_c=1.0), ValueError,
         "clip_ratio_c must be a finite float > 1"),
        (lambda: F.linear_policy_loss(h, w, idx, adv, clip_ratio_c=3.0), ValueError, "applies to loss='ppo_clip'"),
        (lambda: F.linear_policy_loss(h.reshape(B * T, H), w, idx.reshape(-1), torch.randn(B * T), loss="gspo"),
         ValueError, "loss='gspo' needs \\[B, T\\]"),
        (lambda: F.linear_log_prob(h, w, idx, temperature=0.0), ValueError, "temperature"),
        (lambda: F.linear_log_prob(h, w, idx, chunk_size=0), ValueError, "chunk_size"),
        (lambda: F.linear_policy_loss(h, w, idx, adv * float("nan")), ValueError, "advantages must be finite"),
        (lambda: F.linear_log_prob(h * float("nan"), w, idx), ValueError, "hidden must be finite"),
        (lambda: F.linear_log_prob(h, w * float("inf"), idx), ValueError, "must be finite"),
        (lambda: F.linear_log_prob(h, w, idx, bias=torch.randn(3)), ValueError, "bias must have shape"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()
