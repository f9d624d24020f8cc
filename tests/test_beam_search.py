"""``fastgrad.functional.stochastic_beam_search`` (Kool, van Hoof & Welling 2019) over a tiny autoregressive model:
its set law against the exact without-replacement probabilities of ordered pairs (chi-square, fixed seeds; with
and without an end-of-sequence token), distinctness, ``k = 1`` as ancestral sampling, exact log-probabilities,
reproducibility, and the unbiasedness of the unordered-set estimator over sequences by exact enumeration of the
ordered sets."""
import itertools
import math

import pytest
import torch

import fastgrad.functional as F

from ._stats import chi2_pvalue

V = 3  # tokens 0 .. V-1; the prompt is the token V


def _table(seed=0):
    return torch.randn(V + 1, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _step(table):
    return lambda tokens: table[tokens[:, -1]]  # the next token's logits depend on the last token


def _sequences(table, max_len, eos=None):
    """Every sequence of nonzero probability (tuples, eos included) and its probability, by recursion."""
    out = {}

    def rec(seq, lp):
        last = seq[-1] if seq else V
        logp = torch.log_softmax(table[last], -1)
        for v in range(V):
            s, l2 = seq + (v,), lp + float(logp[v])
            if (eos is not None and v == eos) or len(s) == max_len:
                out[s] = math.exp(l2)
            else:
                rec(s, l2)

    rec((), 0.0)
    return out


def _pair_chi2(table, max_len, eos, B=20000, seed=1):
    probs = _sequences(table, max_len, eos)
    names = list(probs)
    p = torch.tensor([probs[s] for s in names], dtype=torch.float64)
    res = F.stochastic_beam_search(_step(table), torch.full((B, 1), V), 2, max_len, eos, seed=seed)
    where = {s: i for i, s in enumerate(names)}
    ids = torch.empty(B, 2, dtype=torch.int64)
    for r in range(B):
        for j in range(2):
            n = int(res.lengths[r, j])
            ids[r, j] = where[tuple(res.tokens[r, j, 1:1 + n].tolist())]
    assert bool((ids[:, 0] != ids[:, 1]).all())  # distinct sequences
    S = len(names)
    counts = torch.zeros(S * S, dtype=torch.float64).index_add_(0, ids[:, 0] * S + ids[:, 1],
                                                                torch.ones(B, dtype=torch.float64))
    pair_p = (p[:, None] * p[None, :] / (1 - p[:, None])).fill_diagonal_(0).reshape(-1)  # without replacement
    return chi2_pvalue(counts, pair_p), res, p, names


def test_pair_law_without_eos():
    pvalue, res, _, _ = _pair_chi2(_table(), 2, None)
    assert pvalue > 1e-3, pvalue
    assert bool((res.perturbed[:, 0] >= res.perturbed[:, 1]).all())  # the order of successive draws
    assert bool((res.lengths == 2).all())


def test_pair_law_with_eos_and_padding():
    pvalue, res, _, _ = _pair_chi2(_table(3), 3, eos=0)
    assert pvalue > 1e-3, pvalue
    ended = res.lengths < 3
    assert bool(ended.any()) and bool((res.lengths >= 1).all())
    for r, j in ended.nonzero()[:50].tolist():  # an ended sequence: its eos, then the pad (= eos)
        n = int(res.lengths[r, j])
        assert int(res.tokens[r, j, n]) == 0 and bool((res.tokens[r, j, n + 1:] == 0).all())


def test_log_probs_are_exact():
    table = _table(5)
    probs = _sequences(table, 3, eos=1)
    res = F.stochastic_beam_search(_step(table), torch.full((64, 1), V), 4, 3, eos=1, seed=7)
    for r in range(64):
        for j in range(4):
            n = int(res.lengths[r, j])
            s = tuple(res.tokens[r, j, 1:1 + n].tolist())
            assert abs(float(res.log_p[r, j]) - math.log(probs[s])) < 1e-12


def test_k1_is_ancestral_sampling():
    table = _table(2)
    probs = _sequences(table, 2)
    names = list(probs)
    B = 20000
    res = F.stochastic_beam_search(_step(table), torch.full((B, 1), V), 1, 2, seed=11)
    ids = res.tokens[:, 0, 1] * V + res.tokens[:, 0, 2]
    counts = torch.bincount(ids, minlength=V * V).double()
    assert chi2_pvalue(counts, torch.tensor([probs[(a, b)] for a in range(V) for b in range(V)])) > 1e-3


def test_every_sequence_when_k_is_their_number():
    table = _table(4)
    n = len(_sequences(table, 2))
    res = F.stochastic_beam_search(_step(table), torch.full((5, 1), V), n, 2, seed=2)
    for r in range(5):
        assert len({tuple(t) for t in res.tokens[r, :, 1:].tolist()}) == n
    with pytest.raises(ValueError, match="exceeds the number of sequences"):
        F.stochastic_beam_search(_step(table), torch.full((5, 1), V), n + 1, 2, seed=2)


def test_same_seed_same_sets_and_generator_reproducible():
    table = _table(6)
    a = F.stochastic_beam_search(_step(table), torch.full((8, 2), V), 3, 4, eos=2, seed=5, offset=3)
    b = F.stochastic_beam_search(_step(table), torch.full((8, 2), V), 3, 4, eos=2, seed=5, offset=3)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.perturbed, b.perturbed)
    torch.manual_seed(0)
    c = F.stochastic_beam_search(_step(table), torch.full((8, 2), V), 3, 4, eos=2)
    torch.manual_seed(0)
    d = F.stochastic_beam_search(_step(table), torch.full((8, 2), V), 3, 4, eos=2)
    assert torch.equal(c.tokens, d.tokens)


def test_impossible_tokens_are_never_drawn():
    table = _table(8)
    table[:, 2] = -math.inf  # token 2 is impossible everywhere: 4 sequences of length 2 remain
    res = F.stochastic_beam_search(_step(table), torch.full((200, 1), V), 4, 2, seed=3)
    assert not bool((res.tokens[:, :, 1:] == 2).any())


@pytest.mark.parametrize("k", [2, 3])
def test_unordered_set_estimator_over_sequences_is_unbiased(k):
    """E over every ordered set of k distinct sequences (drawn without replacement, each with its probability) of
    the unordered-set surrogate's gradient equals the exact gradient of E[f] (Kool et al. 2020), to 1e-10."""
    table = _table(9).requires_grad_(True)
    probs = _sequences(table.detach(), 3, eos=0)
    names = list(probs)
    f = torch.randn(len(names), generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def seq_log_p(s):
        toks = (V,) + s
        return sum(torch.log_softmax(table[toks[i]], -1)[toks[i + 1]] for i in range(len(s)))

    lp = torch.stack([seq_log_p(s) for s in names])  # differentiable in the table
    p = lp.detach().exp()
    tuples = list(itertools.permutations(range(len(names)), k))
    idx = torch.tensor(tuples).t()                   # [k, n_sets]
    # each ordered set's probability under sampling without replacement
    prob = torch.ones(idx.shape[1], dtype=torch.float64)
    used = torch.zeros(idx.shape[1], dtype=torch.float64)
    for i in range(k):
        prob = prob * p[idx[i]] / (1 - used)
        used = used + p[idx[i]]
    sur = F.unordered_set_surrogate(lp[idx], f[idx], exact=True)  # [n_sets]
    (expected,) = torch.autograd.grad((prob * sur).sum(), table, retain_graph=True)
    (exact,) = torch.autograd.grad((lp.exp() * f).sum(), table)
    torch.testing.assert_close(expected, exact, atol=1e-10, rtol=0)


def test_bad_input():
    table = _table()
    step = _step(table)
    with pytest.raises(ValueError, match="prefix must be"):
        F.stochastic_beam_search(step, torch.full((2,), V), 2, 2)
    with pytest.raises(ValueError, match="k must"):
        F.stochastic_beam_search(step, torch.full((2, 1), V), 0, 2)
    with pytest.raises(ValueError, match="max_len must"):
        F.stochastic_beam_search(step, torch.full((2, 1), V), 2, 0)
    with pytest.raises(ValueError, match="eos must"):
        F.stochastic_beam_search(step, torch.full((2, 1), V), 2, 2, eos=-1)
    with pytest.raises(ValueError, match="step must return logits"):
        F.stochastic_beam_search(lambda t: table[t[:, -1]][:1], torch.full((2, 1), V), 2, 2)
    with pytest.raises(ValueError, match="finite or -inf"):
        F.stochastic_beam_search(lambda t: table[t[:, -1]] * math.nan, torch.full((2, 1), V), 2, 2)


def test_a_row_with_few_sequences_does_not_narrow_the_others():
    """Row 0 has one possible first token; row 1 is uniform over 9 sequences. Each row keeps its own beam: row 1's
    3 sequences share their first token only as often as 3 draws without replacement from 9 do (1/28)."""
    def step(tok):
        out = torch.zeros(tok.shape[0], 3, dtype=torch.float64)
        if tok.shape[1] == 1:
            out[tok[:, 0] == 0, 1:] = -math.inf
        return out

    B = 2000
    prefix = torch.tensor([[0], [1]]).repeat(B, 1)
    with pytest.raises(ValueError, match="exceeds the number of sequences"):  # row 0 has only 3 sequences ...
        F.stochastic_beam_search(step, prefix, 4, 2, seed=0)
    res = F.stochastic_beam_search(step, prefix, 3, 2, seed=0)  # ... and k = 3 fits both
    first = res.tokens[1::2, :, 1]
    same = (first == first[:, :1]).all(-1).double().mean()
    assert float(same) < 0.1, float(same)
    assert bool((res.tokens[0::2, :, 1] == 0).all())
