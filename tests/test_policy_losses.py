"""The policy losses and corrections trainers use today (issue 27, section 2): SAPO, VESPO, CISPO and SAPO with a
sequence-level ratio, the rollout-trainer mismatch corrections, verl's clamped k3, and the statistics
``sum_pi_squared`` / ``lse`` of the fused policy loss. Each against a float64 oracle written here from the paper
and the peer's published formula (TRL 1.16 ``GRPOTrainer._compute_loss``, verl 0.9.1 ``core_algos.py``), on every
backend: fp32 loss within 1e-5 relative, gradients within 1e-4 relative (Frobenius)."""
import math

import pytest
import torch

import fastgrad
import fastgrad.functional as F
from fastgrad.ops import linear_policy_loss as lm

from .conftest import available_backends
from .test_linear_loss import _grads, _policy_inputs, _rel, oracle_log_prob

BACKENDS = available_backends()


def _normalize(per_token, m, normalize):
    m = m.double()
    if normalize == "token":
        return (per_token * m).sum() / m.sum()
    return ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).mean()  # "sequence" (GRPO, SAPO in TRL)


def _rollout_oracle(base, roll, m, mode, cap, cap_min):
    """TRL 1.16's vllm_importance_sampling_ratio: exp of the masked log-ratio per token, or of its sum per sequence;
    truncate = clamp, mask = 0 outside [cap_min, cap] (a value on a bound is kept)."""
    d = torch.nan_to_num((base - roll) * m.double(), nan=0.0)
    if mode.startswith("sequence"):
        d = d.sum(-1, keepdim=True)
    r = torch.exp(d)
    if mode.endswith("truncate"):
        return r.clamp(min=cap_min, max=cap)
    lo = cap_min if cap_min is not None else -math.inf
    hi = cap if cap is not None else math.inf
    return r.masked_fill((r < lo) | (r > hi), 0.0)


def oracle(h, w, b, idx, adv, mask, *, loss, level="token", old=None, ref=None, beta=0.0, kl="k3", eps_low=0.2,
           eps_high=0.2, entropy_coef=0.0, normalize="token", tau=(1.0, 1.05), vespo=(2.0, 3.0, 3.0, 2.0),
           roll=None, mode=None, cap=None, cap_min=None, support=None):
    """The peers' per-token loss in float64, differentiated by autograd."""
    B, T = idx.shape
    if support is None:
        logp, ent = oracle_log_prob(h.reshape(B * T, -1), w, b, idx.reshape(-1))
    else:
        logp, ent, _, _ = _support_oracle(h.reshape(B * T, -1), w, b, idx.reshape(-1), *support)
    logp, ent = logp.view(B, T), ent.view(B, T)
    m = mask & (idx != -100)
    md = m.double()
    A = adv.double()[:, None].expand(B, T) if adv.dim() == 1 else adv.double()
    o = logp.detach() if old is None else old.double()
    log_ratio = logp - o
    if level == "sequence":  # TRL: the mean log-ratio over the loss tokens, a (B, 1) ratio with its gradient
        log_ratio = (log_ratio * md).sum(-1, keepdim=True) / md.sum(-1, keepdim=True).clamp(min=1)
    r = torch.exp(log_ratio)
    rho = None
    if roll is not None:
        base = logp.detach() if old is None else old.double()
        rho = _rollout_oracle(base, roll.double(), m, mode, cap, cap_min)
    if loss == "sapo":
        t = torch.where(A > 0, tau[0], tau[1]).double()
        per_token = -torch.sigmoid(t * (r - 1)) * 4 / t * A
    elif loss == "cispo":  # verl's two-sided form (TRL's absolute cap is eps_low=1, eps_high=cap-1)
        per_token = -torch.clamp(r, 1 - eps_low, 1 + eps_high).detach() * A * logp
    elif loss == "ppo_clip":
        per_token = torch.max(-A * r, -A * torch.clamp(r, 1 - eps_low, 1 + eps_high))
    elif loss == "vespo":  # TRL's get_gamma_weights
        lo = math.log(1e-8)
        s = ((logp.detach() - o).clamp(-20, 20) * md).sum(-1, keepdim=True)
        if rho is not None:
            s = s + torch.log(torch.where(m, rho, 1.0)).clamp(lo, 20).sum(-1, keepdim=True)
        lw = s.clamp(lo, 20)
        kp, lp_, kn, ln_ = vespo
        nonneg = A >= 0
        k = torch.where(nonneg, kp, kn).double()
        lam = torch.where(nonneg, lp_, ln_).double()
        phi = torch.exp(lam + k * lw - lam * torch.exp(lw)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        per_token = -phi * A * logp
        rho = None  # folded into phi
    else:
        per_token = -A * logp
    per_token = per_token.expand(B, T)
    if rho is not None:
        per_token = per_token * rho
    if beta:
        x = ref.double() - logp
        if kl in ("low_var_kl", "k3+"):  # verl: clamp the log-ratio to [-20, 20] and the value to [-10, 10]
            xc = x.clamp(-20, 20)
            val = (torch.exp(xc) - xc - 1).clamp(-10, 10)
            if kl == "k3+":  # verl's kl_penalty("k3+"): that value, the gradient of k2
                k2 = 0.5 * x * x
                val = val.detach() + k2 - k2.detach()
            per_token = per_token + beta * val
        elif kl == "k3_is":  # TRL's use_bias_correction_kl: k3 times the token's ratio, not detached
            per_token = per_token + beta * (torch.exp(x) - x - 1) * torch.exp(logp - o)
        else:
            per_token = per_token + beta * (torch.exp(x) - x - 1)
    per_token = per_token - entropy_coef * ent
    return _normalize(per_token, m, normalize)


CASES = [
    dict(loss="sapo", normalize="sequence"),
    dict(loss="sapo", normalize="sequence", old=True, beta=0.1, entropy_coef=0.02, tau=(0.8, 1.3)),
    dict(loss="sapo", level="sequence", normalize="sequence", old=True),
    dict(loss="cispo", level="sequence", normalize="token", old=True, eps_low=1.0, eps_high=0.05),
    dict(loss="cispo", level="sequence", normalize="token", old=True, mode="token_truncate", cap=1.1, eps_low=1.0,
         eps_high=0.1),
    dict(loss="sapo", level="sequence", normalize="token", old=True, mode="sequence_truncate", cap=1.1),
    dict(loss="vespo", normalize="token", old=True),
    dict(loss="vespo", normalize="token", old=True, mode="token_mask", cap=1.3, cap_min=0.7,
         vespo=(1.5, 4.0, 2.5, 1.0)),
    dict(loss="vespo", normalize="token", mode="token_truncate", cap=1.05),
    dict(loss="ppo_clip", normalize="sequence", old=True, mode="token_truncate", cap=1.2, beta=0.2,
         entropy_coef=0.01),
    dict(loss="ppo_clip", normalize="token", mode="token_mask", cap=1.1, cap_min=0.9, beta=0.1),
    dict(loss="reinforce", normalize="token", mode="sequence_mask", cap=0.75, entropy_coef=0.02),
    dict(loss="ppo_clip", normalize="token", old=True, mode="sequence_truncate", cap=1.5, cap_min=0.5),
    dict(loss="ppo_clip", level="sequence", normalize="sequence", old=True, mode="sequence_mask", cap=2.0),
    dict(loss="cispo", normalize="token", old=True, mode="sequence_mask", cap=0.9),
    dict(loss="ppo_clip", normalize="token", old=True, beta=0.3, kl="low_var_kl"),
    dict(loss="reinforce", normalize="sequence", beta=0.3, kl="k3+"),
    dict(loss="ppo_clip", normalize="token", old=True, beta=0.3, kl="k3_is", entropy_coef=0.02),
    dict(loss="sapo", normalize="sequence", beta=0.2, kl="k3_is"),  # on-policy: the ratio's gradient still counts
    dict(loss="vespo", normalize="token", old=True, beta=0.2, kl="k3_is"),
    dict(loss="ppo_clip", level="sequence", normalize="sequence", old=True, support=6),  # GSPO
    dict(loss="vespo", normalize="token", old=True, support=4),
]


def _case_inputs(c):
    h, w, b, idx, mask, old, ref = _policy_inputs(B=4, T=6, bias=True)
    B, T = idx.shape
    g = torch.Generator().manual_seed(11)
    adv = torch.randn(B, generator=g)
    # rollout log-probs near the trainer's: ratios on both sides of the caps, one missing (NaN)
    roll = (oracle_log_prob(h.reshape(B * T, -1), w, b, idx.reshape(-1))[0].view(B, T)
            + 0.15 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    roll[2, 2] = float("nan")  # a loss token whose rollout log-prob is missing: no correction there
    roll[2, 1] = float("nan")  # and a masked one
    assert mask[2, 2] and not mask[2, 1]
    ref = ref.clone()
    ref[1, 2:4] = oracle_log_prob(h.reshape(B * T, -1), w, b, idx.reshape(-1))[0].view(B, T)[1, 2:4].float() + 3.5
    return h, w, b, idx, mask, old, ref, adv, roll


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_loss_matches_the_peers_formula(backend, case):
    c = dict(case)
    h, w, b, idx, mask, old, ref, adv, roll = _case_inputs(c)
    use_old = c.pop("old", False)
    level = c.pop("level", "token")
    tau = c.pop("tau", (1.0, 1.05))
    vespo = c.pop("vespo", (2.0, 3.0, 3.0, 2.0))
    mode, cap, cap_min = c.pop("mode", None), c.pop("cap", None), c.pop("cap_min", None)
    k = c.pop("support", None)
    o = old if use_old else None
    r = ref if c.get("beta") else None
    rl = roll if mode else None
    B, T = idx.shape
    sup = None
    if k:
        z = oracle_log_prob.__globals__["oracle_logits"](h.reshape(B * T, -1), w, b, 1.0)
        sup = _top_k_support(z, idx.reshape(-1), k)
    if mode:  # the case's caps bind on some loss tokens (or sequences) and not on others
        base = (old if use_old else oracle_log_prob(h.reshape(B * T, -1), w, b, idx.reshape(-1))[0].view(B, T))
        live = mask & (idx != -100)
        d = torch.nan_to_num((base.double() - roll.double()) * live, nan=0.0)
        rho = torch.exp(d.sum(-1)) if mode.startswith("sequence") else torch.exp(d)[live & ~torch.isnan(roll)]
        for bound in (cap, cap_min):
            if bound is not None:
                assert (rho > bound).any() and (rho < bound).any(), (mode, bound, rho)

    def fused(h, w, b):
        return F.linear_policy_loss(
            h, w, idx, adv, mask=mask, bias=b, old_logp=o, ref_logp=r, importance_sampling_level=level,
            sapo_tau_pos=tau[0], sapo_tau_neg=tau[1], vespo_k_pos=vespo[0], vespo_lambda_pos=vespo[1],
            vespo_k_neg=vespo[2], vespo_lambda_neg=vespo[3], rollout_logp=rl, rollout_correction=mode,
            rollout_cap=cap, rollout_cap_min=cap_min, support=sup, chunk_size=5, **c)[0]

    def want(h, w, b):
        return oracle(h, w, b, idx, adv, mask, level=level, old=o, ref=r, tau=tau, vespo=vespo, roll=rl, mode=mode,
                      cap=cap, cap_min=cap_min, support=sup, **c)

    with fastgrad.backend(backend):
        lf, gf = _grads(fused, h, w, b)
    lo, go = _grads(want, h, w, b)
    assert abs(float(lf) - float(lo)) <= 1e-5 * max(1.0, abs(float(lo))), (float(lf), float(lo))
    for a, e in zip(gf, go):
        assert _rel(a, e) < 1e-4


def test_the_kl_cases_reach_verls_clamps():
    # the low_var_kl and k3+ cases see ref - logp > 2.61, where verl's value clamp binds (k3 > 10 there)
    h, w, b, idx, mask, old, ref, adv, roll = _case_inputs({})
    B, T = idx.shape
    lp = oracle_log_prob(h.reshape(B * T, -1), w, b, idx.reshape(-1))[0].view(B, T)
    x = (ref.double() - lp)[mask & (idx != -100)]
    assert (x > 2.62).any() and (x < 2.6).any()


def test_rollout_weight_bounds_are_inclusive_and_nan_means_one():
    base = torch.zeros(5, dtype=torch.float64)
    roll = torch.tensor([0.0, math.log(2.0), -math.log(2.0), float("nan"), -math.inf], dtype=torch.float64)
    # ratios 1, 0.5, 2, (missing), inf
    mask_w = lm.rollout_weight(base, roll, "token_mask", 2.0, 0.5)
    torch.testing.assert_close(mask_w, torch.tensor([1.0, 0.5, 2.0, 1.0, 0.0], dtype=torch.float64))
    trunc = lm.rollout_weight(base, roll, "token_truncate", 1.5, 0.75)
    torch.testing.assert_close(trunc, torch.tensor([1.0, 0.75, 1.5, 1.0, 1.5], dtype=torch.float64))


def test_rollout_weight_multiplies_the_policy_term_only():
    h, w, b, idx, mask, old, ref, adv, roll = _case_inputs({})
    kw = dict(mask=mask, old_logp=old, ref_logp=ref, beta=0.3, entropy_coef=0.05, loss="ppo_clip")
    # everything masked out by the correction: only the KL and the entropy terms remain, unweighted
    far = old - 10.0  # ratio e^10 > cap on every token
    loss_masked, st = F.linear_policy_loss(h, w, idx, adv, rollout_logp=far, rollout_correction="token_mask",
                                           rollout_cap=2.0, **kw)
    loss_kl_ent, _ = F.linear_policy_loss(h, w, idx, torch.zeros_like(adv), **kw)
    torch.testing.assert_close(loss_masked, loss_kl_ent, atol=1e-6, rtol=1e-6)
    assert float(st["rollout_weight_mean"]) == 0.0
    _, st1 = F.linear_policy_loss(h, w, idx, adv, **kw)
    assert float(st1["rollout_weight_mean"]) == 1.0


def test_sapo_is_reinforce_at_ratio_one_and_its_gate_saturates():
    lp = torch.linspace(-3, -0.1, 50, dtype=torch.float64)
    adv = torch.linspace(-1, 1, 50, dtype=torch.float64)
    P = lm.LossParams(sapo_tau_pos=1.0, sapo_tau_neg=1.05)
    c = lm.LOSSES["sapo"].dlogp(lp, adv, lp, P)
    torch.testing.assert_close(c, -adv)  # 4 s (1 - s) = 1 at r = 1
    far = lm.LOSSES["sapo"].dlogp(lp, adv, lp - 20, P)  # r = e^20: the gate is flat
    assert far.abs().max() < 1e-6


def test_low_var_kl_stays_finite_where_k3_overflows():
    d = torch.tensor([-100.0, -30.0, -3.0, 0.0, 3.0, 30.0])  # logp - ref
    k3 = lm.KLS["k3"].value(d)
    assert torch.isinf(k3[0])
    v = lm.KLS["low_var_kl"].value(d)
    assert torch.isfinite(v).all() and v.max() == 10
    x = (-d).double().clamp(-20, 20)
    torch.testing.assert_close(v.double(), (torch.exp(x) - x - 1).clamp(-10, 10), rtol=1e-6, atol=1e-6)
    g = lm.KLS["low_var_kl"].dvalue(d)
    assert g[0] == 0 and g[1] == 0 and g[5] == 0 and g[3] == 0  # the clamps bind: no gradient (and 0 at d = 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_statistics_sum_pi_squared_and_lse(backend):
    h, w, b, idx, mask, old, ref, adv, roll = _case_inputs({})
    B, T = idx.shape
    z = (h.reshape(B * T, -1).double() @ w.double().t() + b.double()) / 0.9
    p = torch.softmax(z, -1)
    m = (mask & (idx != -100)).reshape(-1)
    with fastgrad.backend(backend):
        _, st = F.linear_policy_loss(h, w, idx, adv, mask=mask, bias=b, temperature=0.9, return_sum_pi_squared=True,
                                     return_lse=True, chunk_size=5)
        _, st0 = F.linear_policy_loss(h, w, idx, adv, mask=mask, bias=b, temperature=0.9)
    want_sq = torch.where(m, (p * p).sum(-1), 0).view(B, T)
    want_lse = torch.where(m, torch.logsumexp(z, -1), 0).view(B, T)
    torch.testing.assert_close(st["sum_pi_squared"].double(), want_sq, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(st["lse"].double(), want_lse, atol=2e-5, rtol=0)
    assert "sum_pi_squared" not in st0 and "lse" not in st0


def test_bad_correction_arguments_are_clear_errors():
    h, w, b, idx, mask, old, ref, adv, roll = _case_inputs({})
    bad = [
        (dict(rollout_logp=roll), "go together"),
        (dict(rollout_logp=roll, rollout_correction="token_clip"), "rollout_correction must be one of"),
        (dict(rollout_logp=roll, rollout_correction="token_truncate"), "needs rollout_cap"),
        (dict(rollout_logp=roll, rollout_correction="token_mask", rollout_cap=0.5, rollout_cap_min=2.0),
         "rollout_cap_min must be <="),
        (dict(rollout_cap=2.0), "need rollout_logp"),
        (dict(loss="gspo", rollout_logp=roll, rollout_correction="token_mask", rollout_cap=2.0), "ambiguous"),
        (dict(loss="sapo", importance_sampling_level="sequence", rollout_logp=roll, rollout_correction="token_mask",
              rollout_cap=2.0), "ambiguous"),
        (dict(loss="vespo", rollout_logp=roll, rollout_correction="sequence_mask", rollout_cap=2.0),
         "token-level rollout corrections only"),
        (dict(loss="reinforce", importance_sampling_level="sequence"), "applies to"),
        (dict(importance_sampling_level="tok"), "importance_sampling_level must be"),
        (dict(loss="sapo", sapo_tau_pos=0.0), "sapo_tau_pos must be >"),
        (dict(rollout_logp=roll + float("inf"), rollout_correction="token_mask"), "must not contain \\+inf"),
        (dict(loss="gspo", old_logp=old, ref_logp=ref, beta=0.1, kl="k3_is"), "own importance ratio"),
    ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            F.linear_policy_loss(h, w, idx, adv, mask=mask, **kw)
    with pytest.raises(ValueError, match="needs \\[B, T\\]"):
        F.linear_policy_loss(h.reshape(24, -1), w, idx.reshape(-1), torch.randn(24), loss="vespo")


# -- sampling-support replay ------------------------------------------------------------------------------------
def _top_k_support(z: torch.Tensor, idx: torch.Tensor, k: int):
    """The top-k ids of each row (sorted, unique), with the row's target added when missing: CSR (crow, col)."""
    top = z.topk(k, -1).indices
    rows = []
    for r in range(z.shape[0]):
        ids = set(top[r].tolist())
        if int(idx[r]) >= 0:
            ids.add(int(idx[r]))
        rows.append(torch.tensor(sorted(ids), dtype=torch.int64))
    crow = torch.tensor([0] + [len(r) for r in rows]).cumsum(0)
    return crow, torch.cat(rows)


def _support_oracle(h, w, b, idx, crow, col, T=1.0):
    z = oracle_log_prob.__globals__["oracle_logits"](h, w, b, T)
    keep = torch.zeros_like(z, dtype=torch.bool)
    keep[torch.repeat_interleave(torch.arange(z.shape[0]), crow.diff()), col] = True
    ls = torch.where(keep, torch.log_softmax(z.masked_fill(~keep, -math.inf), -1), 0)  # no -inf in autograd
    p = torch.where(keep, ls.exp(), 0)
    valid = idx != -100
    logp = torch.where(valid, ls.gather(1, torch.where(valid, idx, 0)[:, None]).squeeze(1), 0)
    ent = torch.where(valid, -(torch.where(keep, p * ls, 0)).sum(-1), 0)
    sq = torch.where(valid, (p * p).sum(-1), 0)
    lse = torch.where(valid, torch.logsumexp(z.masked_fill(~keep, -math.inf), -1), 0)
    return logp, ent, sq, lse


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k,chunk,T", [(1, None, 1.0), (5, 3, 0.7), (37, 4, 1.0)])  # 37 = V: the whole vocabulary
def test_support_log_probs_and_gradients_match_the_renormalized_oracle(backend, k, chunk, T):
    h, w, b, idx, *_ = _policy_inputs(B=2, T=7, bias=True)
    h, idx = h.reshape(14, -1), idx.reshape(-1)
    z = oracle_log_prob.__globals__["oracle_logits"](h, w, b, T)
    crow, col = _top_k_support(z, idx, k)
    ce = torch.linspace(-1, 1, 14, dtype=torch.float64)

    def fused(h, w, b):
        out = F.linear_log_prob(h, w, idx, bias=b, temperature=T, return_entropy=True, return_sum_pi_squared=True,
                                return_lse=True, support=(crow, col), chunk_size=chunk)
        return (out.logp * ce.float()).sum() + 0.3 * out.entropy.sum() + 0.2 * out.lse.sum(), out

    def oracle(h, w, b):
        lp, ent, _, lse = _support_oracle(h, w, b, idx, crow, col, T)
        return (lp * ce).sum() + 0.3 * ent.sum() + 0.2 * lse.sum()

    with fastgrad.backend(backend):
        _, out = fused(h, w, b)
        lf, gf = _grads(lambda *a: fused(*a)[0], h, w, b)
    lo, go = _grads(oracle, h, w, b)
    lp, ent, sq, lse = _support_oracle(h, w, b, idx, crow, col, T)
    torch.testing.assert_close(out.logp.double(), lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.entropy.double(), ent, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.sum_pi_squared.double(), sq, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.lse.double(), lse, atol=2e-5, rtol=0)
    if k == 1:  # a support of the target alone: the target is certain, and its gradient is zero
        valid = idx != -100
        only = (torch.cat([torch.zeros(1, dtype=torch.int64), valid.long().cumsum(0)]), idx[valid])
        with fastgrad.backend(backend):
            lp1 = F.linear_log_prob(h, w, idx, bias=b, support=only)
        assert (lp1 == 0).all()
    assert abs(float(lf) - float(lo)) <= 1e-5 * max(1.0, abs(float(lo)))
    for a, e in zip(gf, go):
        assert _rel(a, e) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_support_policy_loss_matches_the_oracle(backend):
    h, w, b, idx, mask, old, ref, adv, roll = _case_inputs({})
    B, T = idx.shape
    z = oracle_log_prob.__globals__["oracle_logits"](h.reshape(B * T, -1), w, b, 1.0)
    crow, col = _top_k_support(z, idx.reshape(-1), 6)

    def fused(h, w, b):
        return F.linear_policy_loss(h, w, idx, adv, mask=mask, bias=b, old_logp=old, loss="ppo_clip",
                                    normalize="sequence", entropy_coef=0.03, support=(crow, col), chunk_size=5)[0]

    def want(h, w, b):
        lp, ent, _, _ = _support_oracle(h.reshape(B * T, -1), w, b, idx.reshape(-1), crow, col)
        lp, ent = lp.view(B, T), ent.view(B, T)
        r = torch.exp(lp - old.double())
        A = adv.double()[:, None]
        per_token = torch.max(-A * r, -A * r.clamp(0.8, 1.2)) - 0.03 * ent
        return _normalize(per_token, mask & (idx != -100), "sequence")

    with fastgrad.backend(backend):
        lf, gf = _grads(fused, h, w, b)
    lo, go = _grads(want, h, w, b)
    assert abs(float(lf) - float(lo)) <= 1e-5 * max(1.0, abs(float(lo)))
    for a, e in zip(gf, go):
        assert _rel(a, e) < 1e-4


def test_support_replay_removes_the_ratio_bias_of_top_p_sampling():
    # an engine samples from the top-p renormalized distribution q; the trainer's full-vocabulary probabilities p
    # give E_q[p / q] = (mass of the support) < 1, the support-renormalized ones exactly 1 (TRL measured 0.896 vs
    # 1.001 with top_p = 0.8, top_k = 1024)
    g = torch.Generator().manual_seed(9)
    N, H, V = 400, 16, 300
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) / 2
    z = (h @ w.t()).double()
    p = torch.softmax(z, -1)
    sp, si = p.sort(-1, descending=True)
    keep_sorted = (sp.cumsum(-1) - sp) < 0.8  # top-p = 0.8
    rows, cols = [], []
    for r in range(N):
        ids = si[r][keep_sorted[r]].sort().values
        rows.append(ids.numel())
        cols.append(ids)
    crow = torch.tensor([0] + rows).cumsum(0)
    col = torch.cat(cols)
    q = torch.zeros(N, V, dtype=torch.float64)
    q[torch.repeat_interleave(torch.arange(N), crow.diff()), col] = 1.0
    q = q * p
    q = q / q.sum(-1, keepdim=True)
    tokens = torch.multinomial(q.float(), 1, generator=g).squeeze(1)
    logq = torch.log(q.gather(1, tokens[:, None]).squeeze(1))
    full = F.linear_log_prob(h, w, tokens)
    replay = F.linear_log_prob(h, w, tokens, support=(crow, col))
    ratio_full = torch.exp(full.double() - logq)
    ratio_replay = torch.exp(replay.double() - logq)
    mass = (p * (q > 0)).sum(-1)
    torch.testing.assert_close(ratio_replay, torch.ones(N, dtype=torch.float64), atol=2e-5, rtol=0)
    torch.testing.assert_close(ratio_full, mass, atol=2e-5, rtol=0)
    assert float(ratio_full.mean()) < 0.9


def test_bad_supports_are_clear_errors():
    h, w, b, idx, *_ = _policy_inputs(B=1, T=4)
    h, idx = h.reshape(4, -1), idx.reshape(-1).clamp(min=0)
    V = w.shape[0]
    good_col = torch.stack([idx, (idx + 1) % V], 1).sort(1).values.reshape(-1)
    crow = torch.arange(0, 9, 2)
    idx_v = idx.clone()
    cases = [
        ((crow[:-1], good_col), ValueError, "N \\+ 1"),
        ((crow, good_col.flip(0)), ValueError, "sorted and unique|target"),
        ((crow, torch.cat([torch.stack([(idx[0] + 1) % V, (idx[0] + 2) % V]).sort().values, good_col[2:]])),
         ValueError, "lie in its token's support"),
        ((crow, good_col + V), ValueError, "col_indices must lie in"),
        ((crow.int(), good_col), TypeError, "int64"),
        ((crow + 1, good_col), ValueError, "start at 0"),
        (crow, TypeError, "pair"),
    ]
    for sup, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            F.linear_log_prob(h, w, idx_v, support=sup)
    ok = F.linear_log_prob(h, w, idx_v, support=(crow, good_col))
    assert torch.isfinite(ok).all()


# -- the exact KL to the reference model ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,loss", [(1.0, "reinforce"), (0.7, "ppo_clip")])
def test_full_kl_matches_the_exact_kl_and_leaves_the_reference_alone(backend, T, loss):
    h, w, b, idx, mask, old, ref, adv, roll = _case_inputs({})
    B, Tn = idx.shape
    g = torch.Generator().manual_seed(12)
    rh = torch.randn(B, Tn, 5, generator=g)  # the reference model: its own width
    rw = torch.randn(w.shape[0], 5, generator=g) / 2
    rb = torch.randn(w.shape[0], generator=g) * 0.1

    def fused(h, w, b):
        return F.linear_policy_loss(h, w, idx, adv, mask=mask, bias=b, old_logp=old, loss=loss, beta=0.3, kl="full",
                                    ref_hidden=rh, ref_weight=rw, ref_bias=rb, temperature=T, normalize="sequence",
                                    chunk_size=5)

    def kl_exact(h, w, b):
        lp_all = torch.log_softmax(oracle_log_prob.__globals__["oracle_logits"](h.reshape(B * Tn, -1), w, b, T), -1)
        lq = torch.log_softmax((rh.reshape(B * Tn, -1).double() @ rw.double().t() + rb.double()) / T, -1)
        return (lp_all.exp() * (lp_all - lq)).sum(-1).view(B, Tn)

    def want(h, w, b):
        lp, _ = oracle_log_prob(h.reshape(B * Tn, -1), w, b, idx.reshape(-1), T)
        lp = lp.view(B, Tn)
        A = adv.double()[:, None]
        if loss == "reinforce":
            per_token = -A * lp
        else:
            r = torch.exp(lp - old.double())
            per_token = torch.max(-A * r, -A * r.clamp(0.8, 1.2))
        return _normalize(per_token + 0.3 * kl_exact(h, w, b), mask & (idx != -100), "sequence")

    with fastgrad.backend(backend):
        lf, gf = _grads(lambda *a: fused(*a)[0], h, w, b)
        _, st = fused(h, w, b)
    lo, go = _grads(want, h, w, b)
    assert abs(float(lf) - float(lo)) <= 1e-5 * max(1.0, abs(float(lo)))
    for a, e in zip(gf, go):
        assert _rel(a, e) < 1e-4
    m = mask & (idx != -100)
    kl = kl_exact(h, w, b)
    assert (kl >= 0).all()
    torch.testing.assert_close(st["kl_mean"].double(), kl[m].mean(), atol=1e-6, rtol=1e-5)
    # the reference tensors get no gradient, even when they require it
    rh2, rw2 = rh.clone().requires_grad_(True), rw.clone().requires_grad_(True)
    h2 = h.clone().requires_grad_(True)
    l2, _ = F.linear_policy_loss(h2, w, idx, adv, mask=mask, beta=0.3, kl="full", ref_hidden=rh2, ref_weight=rw2)
    l2.backward()
    assert rh2.grad is None and rw2.grad is None and h2.grad is not None


def test_full_kl_is_zero_against_itself_and_errors_are_clear():
    h, w, b, idx, mask, old, ref, adv, roll = _case_inputs({})
    _, st = F.linear_policy_loss(h, w, idx, adv, mask=mask, bias=b, beta=0.1, kl="full", ref_hidden=h, ref_weight=w,
                                 ref_bias=b)
    assert abs(float(st["kl_mean"])) < 1e-6
    bad = [(dict(kl="full", beta=0.1), "needs ref_hidden and ref_weight"),
           (dict(kl="full", ref_hidden=h[:, :-1], ref_weight=w), "leading shape"),
           (dict(kl="full", ref_hidden=h, ref_weight=w[:-1]), "ref_weight must have shape"),
           (dict(kl="full", ref_hidden=h, ref_weight=w, ref_logp=ref), "pass no ref_logp"),
           (dict(kl="k3", ref_hidden=h, ref_weight=w), "are for kl='full'")]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            F.linear_policy_loss(h, w, idx, adv, mask=mask, **kw)


def test_vespo_weights_shapes_and_formula():
    g = torch.Generator().manual_seed(13)
    B, T = 3, 4
    lr = 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3] = False
    adv = torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)
    phi = F.vespo_weights(lr, mask, adv)
    assert phi.shape == (B, 1)  # per-sequence advantages: one weight per sequence
    w = torch.exp((lr * mask).sum(-1))
    k = torch.tensor([2.0, 3.0, 2.0], dtype=torch.float64)  # A >= 0: the positive pair (A = 0 included)
    lam = torch.tensor([3.0, 2.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(phi[:, 0], w ** k * torch.exp(lam * (1 - w)))
    assert torch.equal(F.vespo_weights(lr, mask, adv[:, None]), phi)
    assert F.vespo_weights(lr, mask, adv[:, None].expand(B, T)).shape == (B, T)
    assert float(F.vespo_weights(torch.zeros(B, T, dtype=torch.float64), mask, adv).max()) == 1.0  # phi(1) = 1
    with pytest.raises(ValueError, match="advantages must be"):
        F.vespo_weights(lr, mask, torch.ones(B + 1))
