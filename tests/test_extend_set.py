"""``fastgrad.functional.extend_set``: one more draw of a set sampled without replacement over sequences (stochastic
beam search, Kool, van Hoof & Welling 2019). ``sample_set`` then ``extend_set`` must be exactly Gumbel-top-k over the
joint sequences: the law of ordered pairs against the exact without-replacement probabilities (chi-square, fixed
seeds) for conditional and shared next draws, several latents per draw, three draws and an end-of-sequence class;
joint log-probabilities exact and differentiable; parents consistent; bad input."""
import itertools
import math

import pytest
import torch

import fastgrad.functional as F

from ._stats import chi2_pvalue

R = 20000  # rows: independent sets of the same distribution


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _pair_counts(seqs, S):
    """Counts of ordered pairs (first, second member) of sequence ids ``seqs`` ``[2, R]``."""
    assert bool((seqs[0] != seqs[1]).all())  # distinct sequences
    return torch.zeros(S * S, dtype=torch.float64).index_add_(0, seqs[0] * S + seqs[1],
                                                              torch.ones(seqs.shape[1], dtype=torch.float64))


def _pair_law(p):
    """Exact probabilities of ordered pairs drawn without replacement from ``p`` ``[S]``."""
    return (p[:, None] * p[None, :] / (1 - p[:, None])).fill_diagonal_(0).reshape(-1)


def _two_draws(l1, W, k, seed, eos=None):
    """First draw over ``l1`` ``[K]`` (one categorical), second over ``W[z1]`` (conditional); returns the set's
    sequence ids ``z1 * K + z2`` ``[k, R]``, the extension, and the first draw."""
    K = l1.shape[0]
    idx, lp, key = F.sample_set(l1.expand(R, 1, K), k, seed=seed)
    logits2 = W[idx[..., 0]].unsqueeze(2)                      # [k, R, 1, K]: each member's conditional
    fin = (idx[..., 0] == eos) if eos is not None else None
    ext = F.extend_set(lp, key, logits2, k, finished=fin, eos=eos, seed=seed + 1)
    z1 = idx[..., 0].gather(0, ext.parent)
    return z1 * K + ext.indices[..., 0], ext, (idx, lp, key)


def test_pair_law_conditional_draw():
    K = 3
    l1 = torch.randn(K, generator=_gen(0), dtype=torch.float64)
    W = torch.randn(K, K, generator=_gen(1), dtype=torch.float64) * 1.5
    seq, ext, _ = _two_draws(l1, W, 2, seed=3)
    p = (torch.log_softmax(l1, -1)[:, None] + torch.log_softmax(W, -1)).exp().reshape(-1)
    assert chi2_pvalue(_pair_counts(seq, K * K), _pair_law(p)) > 1e-3
    assert bool((ext.perturbed[0] >= ext.perturbed[1]).all())  # the order of successive draws
    assert ext.finished is None


def test_pair_law_with_eos():
    """Class 0 ends a sequence: (0, 0) is one sequence of probability p1(0), its second draw forced."""
    K = 3
    l1 = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    W = torch.randn(K, K, generator=_gen(2), dtype=torch.float64)
    seq, ext, _ = _two_draws(l1, W, 2, seed=5, eos=0)
    p1 = torch.softmax(l1, -1)
    p = (p1[:, None] * torch.softmax(W, -1))
    p[0] = 0.0
    p[0, 0] = p1[0]                                               # the ended sequence, whatever W[0] says
    assert chi2_pvalue(_pair_counts(seq, K * K), _pair_law(p.reshape(-1))) > 1e-3
    ended = seq // K == 0
    assert bool((seq[ended] == 0).all())                          # an ended sequence repeats eos
    assert bool(ext.finished[ended].all()) and not bool(ext.finished[~ended & (seq % K != 0)].any())


def test_pair_law_shared_draw_with_two_latents_and_a_third_draw():
    """A first draw of one categorical, a second of two latents shared by every member (independent of the first),
    a third conditional on the second's first latent: 2 * 4 * 2 = 16 sequences, k = 2."""
    l1 = torch.tensor([0.4, -0.3], dtype=torch.float64)
    l2 = torch.randn(2, 2, generator=_gen(7), dtype=torch.float64)
    W3 = torch.randn(2, 2, generator=_gen(8), dtype=torch.float64) * 2
    idx, lp, key = F.sample_set(l1.expand(R, 1, 2), 2, seed=11)
    e2 = F.extend_set(lp, key, l2.expand(1, R, 2, 2), 2, seed=12)
    z1 = idx[..., 0].gather(0, e2.parent)
    e3 = F.extend_set(e2.log_p, e2.perturbed, W3[e2.indices[..., 0]].unsqueeze(2), 2, seed=13)
    z1, z2 = z1.gather(0, e3.parent), e2.indices.gather(0, e3.parent[..., None].expand(-1, -1, 2))
    seq = ((z1 * 2 + z2[..., 0]) * 2 + z2[..., 1]) * 2 + e3.indices[..., 0]
    lp1, lp2, lp3 = (torch.log_softmax(x, -1) for x in (l1, l2, W3))
    p = torch.tensor([math.exp(lp1[a] + lp2[0, b] + lp2[1, c] + lp3[b, d])
                      for a, b, c, d in itertools.product(range(2), repeat=4)], dtype=torch.float64)
    assert chi2_pvalue(_pair_counts(seq, 16), _pair_law(p)) > 1e-3
    # the joint log-probabilities are those of the drawn sequences
    assert torch.allclose(e3.log_p, p.log()[seq], atol=1e-12)


def test_joint_log_prob_is_differentiable_and_parents_consistent():
    K = 4
    l1 = torch.randn(K, dtype=torch.float64, requires_grad=True)
    W = torch.randn(K, K, dtype=torch.float64, requires_grad=True)
    idx, lp0, key = F.sample_set(l1.expand(5, 1, K), 3, seed=1)
    ext = F.extend_set(lp0, key, W[idx[..., 0]].unsqueeze(2), 3, seed=2)
    z1 = idx[..., 0].gather(0, ext.parent)
    expect = torch.log_softmax(l1, -1)[z1] + torch.log_softmax(W, -1)[z1, ext.indices[..., 0]]
    assert torch.allclose(ext.log_p, expect, atol=1e-12)
    g1 = torch.autograd.grad(ext.log_p.sum(), (l1, W))
    g2 = torch.autograd.grad(expect.sum(), (l1, W))
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(g1, g2))
    # the keys of the parents bound their children's (a child's key never exceeds its parent's)
    assert bool((ext.perturbed <= key.gather(0, ext.parent) + 1e-12).all())


def test_every_sequence_and_fewer_when_rows_have_fewer():
    """k larger than the sequences: every one of them, once; the set shrinks to their number."""
    idx, lp, key = F.sample_set(torch.zeros(3, 1, 2), 2, seed=0)
    ext = F.extend_set(lp, key, torch.zeros(1, 3, 1, 2), 10, seed=1)
    assert ext.indices.shape[0] == 4
    seq = idx[..., 0].gather(0, ext.parent) * 2 + ext.indices[..., 0]
    assert bool((seq.sort(0).values == torch.arange(4).view(4, 1)).all())


def test_impossible_children_are_never_drawn_and_uneven_rows_refused():
    logits = torch.tensor([[0.0, -math.inf, 0.0]]).expand(1, 2, 1, 3).clone()
    idx, lp, key = F.sample_set(torch.zeros(2, 1, 2), 2, seed=0)
    ext = F.extend_set(lp, key, logits, 4, seed=1)
    assert ext.indices.shape[0] == 4 and not bool((ext.indices == 1).any())
    logits[0, 1, 0, 2] = -math.inf                                   # row 1 now has 2 sequences, row 0 has 4
    with pytest.raises(ValueError, match="exceeds the number of sequences"):
        F.extend_set(lp, key, logits, 4, seed=1)


def test_bad_input():
    lp, key = torch.zeros(2, 3), torch.zeros(2, 3)
    good = torch.zeros(2, 3, 1, 4)
    with pytest.raises(ValueError, match="log_p and perturbed"):
        F.extend_set(lp, key[:1], good, 2)
    with pytest.raises(ValueError, match=r"logits must be \[2 or 1, 3, D, K\]"):
        F.extend_set(lp, key, torch.zeros(3, 3, 1, 4), 2)
    with pytest.raises(TypeError, match="k must be an int"):
        F.extend_set(lp, key, good, 2.0)
    with pytest.raises(ValueError, match="eos must be a class index"):
        F.extend_set(lp, key, good, 2, eos=4)
    with pytest.raises(ValueError, match="D = 1"):
        F.extend_set(lp, key, torch.zeros(2, 3, 2, 4), 2, eos=0)
    with pytest.raises(ValueError, match="finished needs eos"):
        F.extend_set(lp, key, good, 2, finished=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="finished must be a bool tensor"):
        F.extend_set(lp, key, good, 2, finished=torch.zeros(2, 3), eos=0)
