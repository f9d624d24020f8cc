"""``fastgrad.functional.outcome_advantages`` against verl 0.9.1's own ``compute_*_outcome_advantage`` (edge cases:
a group of one, a group of equal rewards, an empty response, an observation token inside a response), and the
estimators' bias by exact enumeration: every group of n sequences of a tiny autoregressive policy, weighted by its
probability, gives the estimator's exact expectation, compared with the exact policy gradient."""
import itertools

import numpy as np
import pytest
import torch

import fastgrad.functional as F

from ._peers import require


def _batch(dtype):
    g = torch.Generator().manual_seed(0)
    B, T = 11, 7
    lens = torch.tensor([7, 3, 5, 0, 7, 2, 6, 6, 4, 1, 7])
    mask = (torch.arange(T)[None] < lens[:, None]).to(dtype)
    mask[0, 2] = 0  # an observation token inside a response
    rewards = torch.zeros(B, T, dtype=dtype)
    rewards[torch.arange(B), (lens - 1).clamp(min=0)] = torch.randn(B, generator=g).to(dtype)
    rewards[3] = 0.0  # the empty response
    rewards[9, 0] = rewards[10, 6] = 0.5  # group "e": equal rewards
    uids = np.array(["a", "a", "a", "b", "b", "c", "c", "c", "d", "e", "e"], dtype=object)  # "d": a group of one
    old = -torch.rand(B, T, generator=g).to(dtype) * 2
    spp = (torch.rand(B, T, generator=g) * 0.5).to(dtype)
    return rewards, mask, uids, old, spp


CASES = [("grpo", {}, {}), ("grpo", dict(norm_by_std=False), dict(norm_adv_by_std_in_grpo=False)),
         ("rloo", {}, {}), ("opo", {}, {}), ("reinforce_plus_plus_baseline", {}, {}),
         ("reinforce_plus_plus", dict(gamma=0.9), "gamma"), ("optimal_token_baseline", "otb", "otb")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}{'-' + ','.join(c[1]) if isinstance(c[1], dict) and c[1] else ''}" for c in CASES])
def test_equals_verl(case, dtype):
    ca = require("verl.trainer.ppo.core_algos")
    est, kw, vkw = CASES[case]
    rewards, mask, uids, old, spp = _batch(dtype)
    if kw == "otb":
        kw, vkw = dict(old_logp=old, sum_pi_squared=spp), dict(old_log_probs=old, sum_pi_squared=spp)
    elif vkw == "gamma":
        from verl.trainer.config import AlgoConfig

        vkw = dict(config=AlgoConfig(gamma=kw["gamma"]))
    va, vr = ca.get_adv_estimator_fn(est)(token_level_rewards=rewards.clone(), response_mask=mask.clone(),
                                          index=uids, **vkw)
    tol = dict(atol=2e-6, rtol=2e-6) if dtype == torch.float32 else dict(atol=1e-7, rtol=1e-7)
    for index in (uids, torch.tensor([ord(u) for u in uids])):  # verl's uid strings, or an int tensor
        a, r = F.outcome_advantages(rewards, mask, index, est, **kw)
        assert a.dtype == dtype and a.shape == rewards.shape
        torch.testing.assert_close(a, va.to(dtype), **tol)
        torch.testing.assert_close(r, vr.to(dtype), **tol)
        assert bool((a[mask == 0] == 0).all())


def test_rollout_weights_and_zero_tail_equal_verl():
    ca = require("verl.trainer.ppo.core_algos")
    rewards, mask, uids, old, spp = _batch(torch.float64)
    rho = torch.rand(rewards.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.5
    for tail in (True, False):
        va, vr = ca.compute_optimal_token_baseline_advantage(rewards, mask, uids, old, spp, rollout_is_weights=rho,
                                                             handle_zero_tail=tail)
        a, r = F.outcome_advantages(rewards, mask, uids, "optimal_token_baseline", old_logp=old, sum_pi_squared=spp,
                                    rollout_weights=rho, handle_zero_tail=tail)
        torch.testing.assert_close(a, va)


# -- exact expectations over every group of a tiny autoregressive policy ------------------------------------------
V, L, N_GROUP = 3, 2, 3


def _tiny_policy():
    g = torch.Generator().manual_seed(1)
    l1 = torch.randn(V, generator=g, dtype=torch.float64)
    l2 = torch.randn(V, V, generator=g, dtype=torch.float64)  # the second token's logits given the first
    f = torch.randn(V**L, generator=g, dtype=torch.float64)  # the reward of each sequence
    return l1, l2, f


def _sequences():
    return torch.tensor(list(itertools.product(range(V), repeat=L)))  # [V^L, L]


def _per_token(l1, l2, seqs):
    """log pi per token [S, L], sum_pi_squared per token [S, L] and d log pi / d (l1, l2) per token [S, L, P]."""
    p1 = torch.softmax(l1, -1)
    p2 = torch.softmax(l2, -1)
    S = seqs.shape[0]
    lp = torch.stack([p1[seqs[:, 0]].log(), p2[seqs[:, 0], seqs[:, 1]].log()], 1)
    sq = torch.stack([(p1 * p1).sum().expand(S), (p2[seqs[:, 0]] ** 2).sum(-1)], 1)
    grads = torch.zeros(S, L, V + V * V, dtype=torch.float64)
    grads[:, 0, :V] = torch.nn.functional.one_hot(seqs[:, 0], V) - p1
    for s in range(S):
        a, b = int(seqs[s, 0]), int(seqs[s, 1])
        grads[s, 1, V + a * V: V + (a + 1) * V] = torch.nn.functional.one_hot(torch.tensor(b), V) - p2[a]
    return lp, sq, grads


def _expected_estimate(estimator, **kw):
    """E over every group of N_GROUP i.i.d. sequences of (1/n) sum_i sum_t A_i,t grad log pi(y_i,t), exactly."""
    l1, l2, f = _tiny_policy()
    seqs = _sequences()
    lp, sq, grads = _per_token(l1, l2, seqs)
    p_seq = lp.sum(1).exp()
    groups = torch.tensor(list(itertools.product(range(V**L), repeat=N_GROUP)))  # [G, n] sequence ids
    ids = groups.reshape(-1)
    rewards = torch.zeros(ids.numel(), L, dtype=torch.float64)
    rewards[:, -1] = f[ids]
    index = torch.arange(groups.shape[0]).repeat_interleave(N_GROUP)
    mask = torch.ones_like(rewards)
    if estimator == "optimal_token_baseline":
        kw = dict(kw, old_logp=lp[ids], sum_pi_squared=sq[ids])
    adv, _ = F.outcome_advantages(rewards, mask, index, estimator, **kw)
    est = (adv[:, :, None] * grads[ids]).sum(1).view(groups.shape[0], N_GROUP, -1).mean(1)  # [G, P]
    weight = p_seq[groups].prod(1)  # each group's probability
    exact = ((p_seq * f)[:, None] * grads.sum(1)).sum(0)  # sum_y p(y) f(y) grad log p(y)
    return (weight[:, None] * est).sum(0), exact


def test_rloo_is_unbiased_by_exact_enumeration():
    expected, exact = _expected_estimate("rloo")
    torch.testing.assert_close(expected, exact, atol=1e-12, rtol=0)


def test_grpo_and_the_optimal_token_baseline_are_biased_by_exact_enumeration():
    """The group mean (and std) include the sequence's own reward: GRPO's expectation is (n - 1) / n of the gradient
    without the std (Dr. GRPO), and not proportional to it with the std; the optimal token baseline's group
    statistics include the sequence too. The bias is measured here (documented), and stays below the gradient."""
    _, exact = _expected_estimate("rloo")
    dr, _ = _expected_estimate("grpo", norm_by_std=False)
    torch.testing.assert_close(dr, exact * (N_GROUP - 1) / N_GROUP, atol=1e-12, rtol=0)
    otb, _ = _expected_estimate("optimal_token_baseline")
    rel = float((otb - exact).norm() / exact.norm())
    assert 1e-3 < rel < 1.0, rel


def test_bad_input():
    r = torch.zeros(2, 3)
    m = torch.ones(2, 3)
    with pytest.raises(ValueError, match="estimator must be one of"):
        F.outcome_advantages(r, m, [0, 0], "gae")
    with pytest.raises(ValueError, match="response_mask must be"):
        F.outcome_advantages(r, m[:, :2], [0, 0])
    with pytest.raises(ValueError, match="one prompt id per sequence"):
        F.outcome_advantages(r, m, [0, 0, 1])
    with pytest.raises(TypeError, match="index must be"):
        F.outcome_advantages(r, m, torch.zeros(2))
    with pytest.raises(ValueError, match="needs old_logp"):
        F.outcome_advantages(r, m, [0, 1], "optimal_token_baseline")
    with pytest.raises(ValueError, match="at least 2 response tokens"):
        F.outcome_advantages(r, torch.zeros(2, 3), [0, 1], "reinforce_plus_plus")


def test_half_precision_rewards_count_large_groups():
    r = torch.zeros(300, 2, dtype=torch.bfloat16)
    r[:, -1] = torch.linspace(0, 1, 300).to(torch.bfloat16)
    a, _ = F.outcome_advantages(r, torch.ones(300, 2), torch.zeros(300, dtype=torch.int64), "rloo")
    want, _ = F.outcome_advantages(r.double(), torch.ones(300, 2), torch.zeros(300, dtype=torch.int64), "rloo")
    assert a.dtype == torch.bfloat16
    torch.testing.assert_close(a.double(), want, atol=1e-2, rtol=0)
