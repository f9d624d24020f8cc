"""fastgrad::gumbel_topk as a sampler without replacement: the frequencies of ordered pairs and of unordered
3-subsets against the exact without-replacement probabilities (chi-square, p > 1e-3), on every backend; the same
seed gives the same sets on every backend; zero-probability categories are never drawn; bad input."""
import itertools

import pytest
import torch
from scipy import stats

import fastgrad
import fastgrad.functional as F

from .conftest import DEVICE, INTERPRETED, available_backends

# every backend of the test device (FASTGRAD_TEST_DEVICE; the GPU check runs this file on CUDA tensors); the
# chi-square at 1e6 draws skips only Triton's CPU interpreter (minutes at that size)
AGREE = available_backends()
BACKENDS = [b for b in AGREE if not (b == "triton" and INTERPRETED)]
P = torch.tensor([0.35, 0.25, 0.2, 0.15, 0.05], dtype=torch.float64)
DRAWS = 1_000_000  # the protocol (the reference backend takes ~5 s per test here)


def _ordered_prob(seq):
    p, left = 1.0, 1.0
    for i in seq:
        p *= float(P[i]) / left
        left -= float(P[i])
    return p


def _draw(backend, k, n=DRAWS, seed=3):
    logits = torch.log(P).float().expand(n, -1).contiguous().to(DEVICE)
    with fastgrad.ops._backend.backend(backend):
        idx, val = F.gumbel_topk(logits, k, seed=seed, offset=0)
    return idx.cpu(), val.cpu()


@pytest.mark.slow  # chi-square at 10^6 draws
@pytest.mark.parametrize("backend", BACKENDS)
def test_ordered_pairs_follow_sampling_without_replacement(backend):
    idx, val = _draw(backend, 2)
    pairs = list(itertools.permutations(range(5), 2))
    code = idx[:, 0] * 5 + idx[:, 1]
    counts = torch.bincount(code, minlength=25)[[a * 5 + b for a, b in pairs]].double()
    assert int(counts.sum()) == DRAWS  # distinct: no (i, i) pair
    expected = torch.tensor([_ordered_prob(s) for s in pairs], dtype=torch.float64) * DRAWS
    assert stats.chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3
    assert bool((val[:, 0] >= val[:, 1]).all())


@pytest.mark.slow  # chi-square at 10^6 draws
@pytest.mark.parametrize("backend", BACKENDS)
def test_unordered_triples_follow_sampling_without_replacement(backend):
    idx, _ = _draw(backend, 3, seed=4)
    subsets = list(itertools.combinations(range(5), 3))
    key = torch.sort(idx, -1).values
    code = key[:, 0] * 25 + key[:, 1] * 5 + key[:, 2]
    counts = torch.bincount(code, minlength=125)[[a * 25 + b * 5 + c for a, b, c in subsets]].double()
    assert int(counts.sum()) == DRAWS
    expected = torch.tensor([sum(_ordered_prob(o) for o in itertools.permutations(s)) for s in subsets],
                            dtype=torch.float64) * DRAWS
    assert stats.chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_backends_agree_and_values_are_perturbed_log_probs(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, 301, generator=g) * 3).to(dtype)
    outs = {}
    for b in AGREE:
        with fastgrad.ops._backend.backend(b):
            outs[b] = tuple(t.cpu() for t in F.gumbel_topk(logits.to(DEVICE), 7, seed=11, offset=5))
    idx, val = outs["reference"]
    assert idx.shape == (37, 7) and val.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert bool((val[:, :-1] >= val[:, 1:]).all())
    assert all(len(set(r.tolist())) == 7 for r in idx)
    # the values are log_softmax + the Gumbel noise of element r * K + i of the stream
    u = fastgrad.ops._philox.uniform(11, 5, 37 * 301).view(37, 301).double()
    phi = torch.log_softmax(logits.double(), -1) - torch.log(-torch.log(u))
    torch.testing.assert_close(val.double(), phi.gather(-1, idx), atol=1e-5, rtol=1e-5)
    # the top-k of phi, up to float ties
    torch.testing.assert_close(val.double(), phi.topk(7, -1).values, atol=1e-5, rtol=1e-5)
    for b, (i2, v2) in outs.items():
        assert torch.equal(i2, idx), b
        torch.testing.assert_close(v2, val, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", AGREE)
def test_zero_probability_categories_are_never_drawn(backend):
    logits = torch.zeros(2000, 8, device=DEVICE)
    logits[:, [1, 4, 6]] = float("-inf")
    with fastgrad.ops._backend.backend(backend):
        idx, val = F.gumbel_topk(logits, 5, seed=1)
        assert not bool(torch.isin(idx.cpu(), torch.tensor([1, 4, 6])).any())
        assert bool(torch.isfinite(val).all())
        with pytest.raises(ValueError, match="nonzero probability"):
            F.gumbel_topk(logits, 6, seed=1)
        # k = K: a random permutation
        perm, _ = F.gumbel_topk(torch.randn(3, 9, device=DEVICE), 9, seed=2)
        assert torch.equal(perm.sort(-1).values.cpu(), torch.arange(9).expand(3, 9))
        # batch shapes and an empty batch
        i3, v3 = F.gumbel_topk(torch.randn(2, 3, 10, device=DEVICE), 4, seed=0)
        assert i3.shape == (2, 3, 4) and v3.shape == (2, 3, 4)
        assert F.gumbel_topk(torch.randn(0, 10, device=DEVICE), 2, seed=0)[0].shape == (0, 2)


def test_bad_input_is_a_clear_error_and_leaves_the_generator():
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    for kw, exc, msg in [(dict(k=0), ValueError, "k must be >= 1"), (dict(k=11), ValueError, "k must lie in"),
                         (dict(k=2.0), TypeError, "k must be an int")]:
        with pytest.raises(exc, match=msg):
            F.gumbel_topk(torch.randn(3, 10), generator=g, **kw)
        assert torch.equal(g.get_state(), state)
    bad = torch.randn(3, 10, device=DEVICE)
    bad[1, 2] = float("nan")
    for b in BACKENDS:
        with fastgrad.ops._backend.backend(b), pytest.raises(ValueError, match="NaN"):
            F.gumbel_topk(bad, 2, seed=0)
    with pytest.raises(ValueError, match="k must lie in"):
        torch.ops.fastgrad.gumbel_topk(torch.randn(3, 10), 11, 0, 0)


def test_opcheck_and_compile():
    x = torch.randn(6, 20)
    torch.library.opcheck(torch.ops.fastgrad.gumbel_topk.default, (x, 3, 7, 0))
    fn = torch.compile(lambda t: F.gumbel_topk(t, 3, seed=7, offset=0), fullgraph=True, backend="aot_eager")
    i1, v1 = fn(x)
    i2, v2 = F.gumbel_topk(x, 3, seed=7, offset=0)
    assert torch.equal(i1, i2) and torch.equal(v1, v2)


def test_backends_agree_over_several_blocks_of_rows_and_categories():
    # the Triton kernel's tiles: several row blocks and category blocks (K > 512), a masked tail in both
    logits = torch.randn(70, 1100, generator=torch.Generator().manual_seed(1)) * 2
    logits[:, ::7] = float("-inf")
    outs = {}
    for b in AGREE:
        with fastgrad.ops._backend.backend(b):
            outs[b] = tuple(t.cpu() for t in F.gumbel_topk(logits.to(DEVICE), 5, seed=3, offset=2))
    for b, (i, v) in outs.items():
        assert torch.equal(i, outs["reference"][0]), b
        torch.testing.assert_close(v, outs["reference"][1], atol=1e-5, rtol=1e-5)
        assert not bool((i % 7 == 0).any())


def test_categories_of_underflowing_probability_are_drawn_when_k_needs_them():
    # probabilities below float32's range (e^-200) are still nonzero: with k = the number of finite logits every
    # backend returns all of them (the C++ kernel's exponential-domain selection falls back to the log domain)
    logits = torch.tensor([[0.0, -200.0, -float("inf"), -300.0, 1.0], [2.0, 0.5, -150.0, -float("inf"), -0.5]])
    outs = {}
    for b in AGREE:
        with fastgrad.ops._backend.backend(b):
            outs[b] = tuple(t.cpu() for t in F.gumbel_topk(logits.to(DEVICE), 4, seed=9, offset=0))
    idx, val = outs["reference"]
    assert set(idx[0].tolist()) == {0, 1, 3, 4} and set(idx[1].tolist()) == {0, 1, 2, 4}
    assert bool(torch.isfinite(val).all())
    for b, (i, v) in outs.items():
        assert torch.equal(i, idx), b
        torch.testing.assert_close(v, val, atol=1e-4, rtol=1e-5)
    # the same rows spread over several 1024-blocks (the kernel then sums the exponentials during the selection)
    wide = torch.full((2, 2500), -float("inf"))
    wide[:, [3, 1100, 2047, 2499, 700]] = logits
    for b in AGREE:
        with fastgrad.ops._backend.backend(b):
            i, v = (t.cpu() for t in F.gumbel_topk(wide.to(DEVICE), 4, seed=9, offset=0))
        assert set(i[0].tolist()) == {3, 1100, 2499, 700} and set(i[1].tolist()) == {3, 1100, 2047, 700}, b
        assert bool(torch.isfinite(v).all())


def _one_block_branch(phi: torch.Tensor, k: int, lanes: int = 16) -> list:
    """Which branch of the C++ kernel's one-block selection each row takes (an emulation of its bound, so that the
    test below can check its rows reach every branch): 'fast', 'no bound' (the k-th smallest lane minimum of the
    keys is infinite) or 'crowded' (more than 64 keys at or below it)."""
    key = torch.exp(-phi)  # the kernel's key a / w is e^(-phi) up to a per-row factor: the same order and bound
    lm = torch.full((key.shape[0], lanes), float("inf"), dtype=key.dtype)
    for g in range(lanes):
        lm[:, g] = key[:, g::lanes].min(-1).values
    T = lm.sort(-1).values[:, k - 1]
    c = (key <= T[:, None]).sum(-1)
    return ["no bound" if not torch.isfinite(t) else "crowded" if n > 64 else "fast" for t, n in zip(T, c)]


@pytest.mark.parametrize("k", [1, 3, 8])
def test_one_block_rows_are_the_exact_top_k_of_the_stream(k):
    # rows of at most 1024 categories with 2 <= k <= 8 take the C++ kernel's branch-free selection (a bound from the
    # minima of 16 lanes j mod 16, then the candidates' ranks); rows built to leave it (too few lanes with nonzero
    # probability for the bound; more than 64 candidates) take the general loop. Every backend must return exactly
    # the top-k of phi from the Philox stream.
    g = torch.Generator().manual_seed(5)
    K = 1024
    plain = torch.randn(64, K, generator=g) * 3
    flat = torch.zeros(8, K)
    dead_lanes = torch.randn(8, K, generator=g)
    dead_lanes[:, torch.arange(K) % 16 >= max(k - 1, 1)] = float("-inf")  # k - 1 lanes of nonzero probability
    crowded = torch.full((8, K), float("-inf"))  # lane 0 finite, lanes 1-15 one improbable element each
    crowded[:, 0::16] = torch.randn(8, K // 16, generator=g) - 10.0
    crowded[:, 1:16] = -40.0
    branches = set()
    for logits in (plain, plain[:, :128].contiguous(), plain[:, :13].contiguous(), flat, dead_lanes, crowded):
        R, KK = logits.shape
        u = fastgrad.ops._philox.uniform(21, 4, R * KK).view(R, KK).double()
        phi = torch.log_softmax(logits.double(), -1) - torch.log(-torch.log(u))
        want = phi.topk(k, -1)
        if KK >= 16:
            branches.update(_one_block_branch(phi, k))
        for b in AGREE:
            with fastgrad.ops._backend.backend(b):
                idx, val = (t.cpu() for t in F.gumbel_topk(logits.to(DEVICE), k, seed=21, offset=4))
            assert torch.equal(idx, want.indices), (b, KK)
            torch.testing.assert_close(val.double(), want.values, atol=1e-5, rtol=1e-5)
    if k >= 2:  # (k = 1 always takes the loop)
        assert branches == {"fast", "no bound", "crowded"}


@pytest.mark.parametrize("backend", AGREE)
def test_picks_far_below_the_row_maximum(backend):
    # the differential fuzz's case: picks with l - max below about -87 (e^(l - m) subnormal or 0), where the C++
    # kernel's exponential-domain keys overflowed (values -inf, the wrong order); every backend equals float64
    l = torch.tensor([[0.0, -95.0, -100.0, -102.0, -90.0, -89.0]])
    with fastgrad.backend(backend):
        idx, val = F.gumbel_topk(l, 6, seed=3)
    ref_idx, ref_val = F.gumbel_topk(l.double(), 6, seed=3)
    assert idx.tolist() == ref_idx.tolist() == [[0, 5, 4, 1, 2, 3]]
    torch.testing.assert_close(val.double(), ref_val, rtol=0, atol=1e-4)
    # and across the exponential domain's limit inside one block (k <= 64): one pick near the max, the others
    # 60-80 below it
    l = torch.cat([torch.zeros(1, 1), -60 - 20 * torch.rand(1, 40, generator=torch.Generator().manual_seed(1))], 1)
    with fastgrad.backend(backend):
        idx, val = F.gumbel_topk(l, 12, seed=5)
    ref_idx, ref_val = F.gumbel_topk(l.double(), 12, seed=5)
    assert torch.equal(idx, ref_idx) and torch.isfinite(val).all()
    torch.testing.assert_close(val.double(), ref_val, rtol=0, atol=1e-4)


@pytest.mark.parametrize("backend", [b for b in AGREE if b != "triton" or not INTERPRETED])
def test_k_equal_to_a_vocabulary_sorts_once(backend):
    # k = K = 131075 (the C++ kernel kept a sorted array: O(K k), 2.5 s per row; now one partial sort)
    l = torch.randn(2, 131075, generator=torch.Generator().manual_seed(2))
    with fastgrad.backend(backend):
        idx, val = F.gumbel_topk(l, 131075, seed=9)
    with fastgrad.backend("reference"):
        ref_idx, ref_val = F.gumbel_topk(l, 131075, seed=9)
    assert torch.equal(idx.sort(-1).values, torch.arange(131075).expand(2, -1))  # a permutation of the row
    assert (val[:, :-1] >= val[:, 1:]).all()
    torch.testing.assert_close(val, ref_val, rtol=0, atol=1e-4)
    # each value is its category's perturbed log-probability (neighbours 1e-4 apart may swap: float rounding of
    # the two backends' logarithms)
    pert = torch.empty_like(ref_val).scatter_(1, ref_idx, ref_val)
    torch.testing.assert_close(val, pert.gather(1, idx), rtol=0, atol=1e-4)
