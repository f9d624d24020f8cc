"""Sampling without replacement over sequences in the graph API (Storchastic's ancestral sampling): a set method
that samples again on its plate extends its beam over the joint of its draws. Shapes and plates as Storchastic's
own test of it lays out (conditional and independent draws, other plates joining), earlier draws re-indexed to the
sequences they belong to, distinct sequences, the set estimators and ``ScoreFunction(sampling_method=...)``
unbiased over two-draw sequences (exact expectation by enumeration; fixed seeds, standard-error bounds), ``eos``,
homogeneity, and errors that leave no state behind."""
import math

import pytest
import torch
from torch.distributions import Normal, OneHotCategorical

import fastgrad as storch
from fastgrad._tensor import AncestralPlate

from .._stats import assert_unbiased

K = 3


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    l1 = torch.randn(K, generator=g, dtype=torch.float64)
    W = torch.randn(K, K, generator=g, dtype=torch.float64)
    A = torch.randn(K, K, generator=g, dtype=torch.float64)
    return l1, W, A


def _exact(l1, W, A, eos=None):
    """Gradient of E[f] over the K*K sequences (z1, z2 ~ W[z1]), f = A[z1, z2] + z1[0] / 2, by enumeration."""
    l1, W = l1.clone().requires_grad_(), W.clone().requires_grad_()
    p1 = torch.softmax(l1, -1)
    p2 = torch.softmax(W, -1)
    if eos is not None:  # an ended sequence draws eos again with probability 1
        p2 = torch.cat([torch.nn.functional.one_hot(torch.tensor([eos]), K).double(), p2[1:]], 0) \
            if eos == 0 else None
    f = A + 0.5 * (torch.arange(K) == 0).double().view(K, 1)
    (p1[:, None] * p2 * f).sum().backward()
    return l1.grad, W.grad


def _estimates(make, l1, W, A, reps=3000, seed=0, scale=1.0):
    """Per-row gradient estimates ``[reps, K]`` and ``[reps, K, K]``: one step over a plate of ``reps`` rows, each
    its own copy of the parameters."""
    torch.manual_seed(seed)
    L1 = l1.expand(reps, K).clone().requires_grad_()
    WW = W.expand(reps, K, K).clone().requires_grad_()
    method = make()
    x1 = storch.denote_independent(L1, 0, "reps")
    z1 = method(OneHotCategorical(logits=x1))                          # [k, reps, K]
    w = storch.denote_independent(WW, 0, "reps")
    z2 = method(OneHotCategorical(logits=(z1.unsqueeze(-1) * w).sum(-2)))  # W's row z1: conditional
    cost = (z1.unsqueeze(-1) * A * z2.unsqueeze(-2)).sum((-1, -2)) + 0.5 * z1[..., 0]
    storch.add_cost(scale * cost, "f")
    storch.backward()
    return L1.grad * reps, WW.grad * reps, z1, z2


UNBIASED = {
    "sf-wor": lambda: storch.method.ScoreFunctionWOR("z", 3, biased=False),
    "sf-wor-no-baseline": lambda: storch.method.ScoreFunctionWOR("z", 3, biased=False, use_baseline=False),
    "unordered-set": lambda: storch.method.UnorderedSetEstimator("z", 3),
    "rao-blackwell-sampled": lambda: storch.method.RaoBlackwellSF("z", 3, summed="sampled"),
    "rao-blackwell-sampled-baseline": lambda: storch.method.RaoBlackwellSF("z", 3, summed="sampled",
                                                                           use_baseline=True),
    "sf+swor": lambda: storch.method.ScoreFunction("z", storch.sampling.SampleWithoutReplacement("z", 3)),
    "sf+unordered-set": lambda: storch.method.ScoreFunction("z", storch.sampling.UnorderedSet("z", 3)),
    "sf+rao-blackwellized": lambda: storch.method.ScoreFunction("z", storch.sampling.RaoBlackwellizedSample("z", 3)),
    "sf+mapo": lambda: storch.method.ScoreFunction("z", storch.sampling.MAPOSample("z", 2),
                                                   baseline_factory="moving_average"),
}


@pytest.mark.parametrize("name", list(UNBIASED))
def test_unbiased_over_two_draw_sequences(name):
    l1, W, A = _problem()
    g1, gW, z1, z2 = _estimates(UNBIASED[name], l1, W, A)
    e1, eW = _exact(l1, W, A)
    assert_unbiased(g1, e1)
    assert_unbiased(gW.flatten(1), eW.flatten())
    assert z2.shape == (3000, 3, K) and z2.plates[-1].name == "z"  # the plate after the others, as Storchastic's


def test_sequences_are_distinct_and_earlier_draws_follow_their_sequences():
    """z2 copies z1's class (W is +-40 on the diagonal): after re-indexing, z1 of each final member is its prefix.
    The first draw has 3 configurations: the set holds them all (Storchastic's min(k, configurations))."""
    torch.manual_seed(1)
    method = storch.method.UnorderedSetEstimator("z", 3)
    l1 = torch.zeros(5, K)
    z1 = method(OneHotCategorical(logits=storch.denote_independent(l1, 0, "b")))
    W = 40 * (2 * torch.eye(K) - 1)
    z2 = method(OneHotCategorical(logits=z1 @ W + 0 * torch.randn(K)))
    z3 = method(OneHotCategorical(logits=torch.zeros(K)))              # an independent third draw
    both = z1 - z2                                                     # z1 re-indexed to z2's version, then z3's
    assert any(p is z2.plate for p in both.plates) and bool((both._tensor == 0).all())
    seq = storch.cat([z1, z2, z3], -1)                                  # [b, k, 3K] on the newest version
    assert seq.plates == (z3.plate, z3.plates[0]) and isinstance(z3.plate, AncestralPlate) and z3.plate.version == 2
    raw = seq._tensor.reshape(3, 5, 3, K).argmax(-1).transpose(0, 1)
    codes = raw[..., 0] * 9 + raw[..., 1] * 3 + raw[..., 2]
    assert all(len(set(row.tolist())) == 3 for row in codes)          # k distinct sequences per row
    assert bool((raw[..., 0] == raw[..., 1]).all())
    storch.reset()


def test_storchastic_swor_layout():
    """The cases of Storchastic's test_swor.py: a joint first draw of two latents, an independent draw, draws
    conditional on earlier ones and on a score-function plate, a draw on a new plate (the beams split over it), and
    one conditional on all of them; the shapes Storchastic asserts."""
    torch.manual_seed(0)
    k, d, event, n1, n2 = 4, 4, 2, 3, 2
    swr = storch.method.ScoreFunctionWOR("z", k, biased=True, use_baseline=False)
    assert isinstance(swr.sampling_method, storch.sampling.SampleWithoutReplacement)
    low = torch.tensor([-3.0, -3.0, 2, -2.0], requires_grad=True)
    high = torch.tensor([-0.1, 0.1, 0.05, -0.05], requires_grad=True)
    mu = torch.tensor(0.0, requires_grad=True)
    z1 = swr.sample(OneHotCategorical(logits=low.repeat((event, 1))))
    z2 = swr.sample(OneHotCategorical(logits=high))
    assert z1.shape == (k, event, d) and z2.shape == (k, d)
    a = storch.method.ScoreFunction("n1", n_samples=n1)(Normal(mu, 1.0))
    z3 = swr.sample(OneHotCategorical(logits=z1 + a))
    z4 = swr.sample(OneHotCategorical(logits=z2 + a))
    assert z3.shape == (n1, k, event, d) and z4.shape == (n1, k, d)
    b = storch.method.ScoreFunction("n2", n_samples=n2).sample(Normal(mu, 1.0))
    z5 = swr.sample(OneHotCategorical(logits=low + b.unsqueeze(-1)))
    assert z5.shape == (n1, n2, k, d)                                   # the beams depend on n1 through z3, z4
    z6 = swr.sample(OneHotCategorical(logits=z3 + z4.unsqueeze(-2) - z5.unsqueeze(-2)))
    assert z6.shape == (n1, n2, k, event, d)
    storch.add_cost(torch.sum(z6[..., 0], -1), "cost")
    storch.backward()
    assert low.grad is not None and torch.isfinite(low.grad).all() and mu.grad is not None


def test_eos_ends_sequences():
    """Class 0 ends a sequence: its second draw is 0 whatever the conditional says (W[0] gets no gradient, and
    the estimate is unbiased for the sequences' law)."""
    l1, W, A = _problem(2)
    make = lambda: storch.method.UnorderedSetEstimator("z", 3, eos=0)  # noqa: E731
    g1, gW, z1, z2 = _estimates(make, l1, W, A)
    e1, eW = _exact(l1, W, A, eos=0)
    assert_unbiased(g1, e1)
    assert_unbiased(gW[:, 1:].flatten(1), eW[1:].flatten())
    assert bool((gW[:, 0] == 0).all()) and bool((eW[0] == 0).all())
    ended = z1._tensor[..., 0] == 1                                     # [k, reps]
    assert bool(ended.any())
    z1_final = z1 + 0 * z2                                              # z1 as the final members see it
    assert bool((z2._tensor[..., 0][z1_final._tensor[..., 0].t() == 1] == 1).all())


def test_enumerate_sampling_method_is_exact():
    l1, W, A = _problem(3)
    make = lambda: storch.method.ScoreFunction("z", storch.sampling.Enumerate("z"))  # noqa: E731
    L1 = l1.clone().requires_grad_()
    z = make()(OneHotCategorical(logits=L1))
    storch.add_cost((z * A[0]).sum(-1), "f")
    storch.backward()
    l = l1.clone().requires_grad_()
    (torch.softmax(l, -1) * A[0]).sum().backward()
    assert torch.allclose(L1.grad, l.grad, atol=1e-12)


def test_importance_sampling_is_unbiased():
    l1, _, A = _problem(4)
    q = OneHotCategorical(logits=torch.zeros(K, dtype=torch.float64))
    reps = 4000
    torch.manual_seed(0)
    L = l1.expand(reps, K).clone().requires_grad_()
    m = storch.method.ScoreFunction("z", storch.sampling.ImportanceSampling("z", 2, q))
    z = m(OneHotCategorical(logits=storch.denote_independent(L, 0, "reps")))
    storch.add_cost((z * A[0]).sum(-1), "f")
    storch.backward()
    l = l1.clone().requires_grad_()
    (torch.softmax(l, -1) * A[0]).sum().backward()
    assert_unbiased(L.grad * reps, l.grad)


@pytest.mark.parametrize("name", ["sf-wor", "unordered-set", "sf+swor"])
def test_homogeneous_over_sequences(name):
    l1, W, A = _problem(5)
    g = [_estimates(UNBIASED[name], l1, W, A, reps=50, seed=3, scale=s)[:2] for s in (1.0, 2.0)]
    assert torch.allclose(2 * g[0][0], g[1][0], atol=1e-10) and torch.allclose(2 * g[0][1], g[1][1], atol=1e-10)


def test_a_new_step_starts_a_new_sequence():
    m = storch.method.ScoreFunctionWOR("z", 2)
    z = m(OneHotCategorical(logits=torch.zeros(K)))
    storch.add_cost(z[..., 0], "f")
    storch.backward()
    z = m(OneHotCategorical(logits=torch.zeros(K)))
    assert z.plate.version == 0 and z.shape == (2, K)
    storch.reset()


def test_errors_leave_no_state():
    m = storch.method.RaoBlackwellSF("z", 3)
    z = m(OneHotCategorical(logits=torch.zeros(K)))
    with pytest.raises(ValueError, match="summed='sampled'"):
        m(OneHotCategorical(logits=z * 2))
    assert storch.costs() == [] and m._live_beam() is None             # the step was reset
    u = storch.method.UnorderedSetEstimator("z", 2, eos=0)
    with pytest.raises(ValueError, match="single categoricals"):
        u(OneHotCategorical(logits=torch.zeros(2, K)))
    seq = storch.method.UnorderedSetEstimator("z", 2)
    z = seq(OneHotCategorical(logits=storch.denote_independent(torch.zeros(5, K), 0, "b")))
    with pytest.raises(ValueError, match="two sizes"):                   # another plate "b", of 3 elements
        seq(OneHotCategorical(logits=storch.denote_independent(torch.zeros(3, K), 0, "b")))
    other = storch.method.UnorderedSetEstimator("z", 2)
    z = other(OneHotCategorical(logits=torch.zeros(K)))
    with pytest.raises(ValueError, match="already a plate"):
        storch.method.UnorderedSetEstimator("z", 2)(OneHotCategorical(logits=z))  # another method's plate
    with pytest.raises(ValueError, match="should match"):
        storch.method.ScoreFunction("z", storch.sampling.UnorderedSet("y", 2))
    with pytest.raises(TypeError, match="sampling_method must be None or a fastgrad.sampling"):
        storch.method.ScoreFunction("z", "swor")
    with pytest.raises(ValueError, match="batch_average"):
        storch.method.ScoreFunction("z", storch.sampling.UnorderedSet("z", 2), baseline_factory="batch_average")
    with pytest.raises(ValueError, match="UnorderedSetGumbelSoftmax"):
        storch.method.ScoreFunction("z", storch.sampling.GumbelSoftmaxWOR("z", 2))(
            OneHotCategorical(logits=torch.zeros(K)))
    with pytest.raises(ValueError, match="k >= 2"):
        storch.sampling.SampleWithoutReplacement("z", 1)
    with pytest.raises(ValueError, match="proposal's samples"):
        storch.method.ScoreFunction("z", storch.sampling.ImportanceSampling(
            "z", 2, OneHotCategorical(logits=torch.zeros(K + 1))))(OneHotCategorical(logits=torch.zeros(K)))
    assert storch.costs() == []


def test_monte_carlo_sampling_method_is_the_default():
    m = storch.method.ScoreFunction("z", storch.sampling.MonteCarlo("z", 5))
    assert m.n_samples == 5 and m.sampling_method is None
    z = m(OneHotCategorical(logits=torch.zeros(K)))
    assert z.shape == (5, K)
    storch.reset()


@pytest.mark.parametrize("cls", ["GumbelSoftmax", "Reparameterization", "ARM", "DisARM", "RELAX", "LAX", "ARMS",
                                 "VIMCO", "ReinMax", "GumbelRao", "GumbelEntmax", "GappedStraightThrough"])
def test_other_methods_take_monte_carlo_only(cls):
    kw = {"in_dim": 3} if cls in ("RELAX", "LAX") else {}
    make = lambda *a, **k: getattr(storch.method, cls)(*a, **k, **kw)  # noqa: E731
    m = make("z", sampling_method=storch.sampling.MonteCarlo("z", 4))
    assert m.n_samples == 4
    with pytest.raises(ValueError, match="only None or fastgrad.sampling.MonteCarlo"):
        make("z", sampling_method=storch.sampling.UnorderedSet("z", 2))
    with pytest.raises(ValueError, match="should match"):
        make("z", sampling_method=storch.sampling.MonteCarlo("y", 4))


def test_a_score_function_sample_given_an_earlier_draw_is_scored_per_final_sequence():
    """a ~ Normal(mu * z1[0], 1) given the first draw, then the sequence continues: each final sequence's cost pairs
    with the score of its own prefix's a (unbiased; averaging the cost over the set instead halves the gradient)."""
    torch.manual_seed(0)
    reps = 6000
    mu = torch.zeros(reps, dtype=torch.float64, requires_grad=True)
    m = storch.method.UnorderedSetEstimator("z", 2, use_baseline=False)
    x = storch.denote_independent(torch.zeros(reps, 2, dtype=torch.float64), 0, "reps")
    z1 = m(OneHotCategorical(logits=x))
    a = storch.method.ScoreFunction("n", n_samples=2, baseline_factory="batch_average")(
        Normal(storch.Tensor(mu, x.plates) * z1[..., 0], 1.0))
    z2 = m(OneHotCategorical(logits=torch.zeros(2, dtype=torch.float64)))
    storch.add_cost(a + z2[..., 0], "f")                                 # E[a] = mu P(z1 = 0) = mu / 2
    storch.backward()
    assert_unbiased((mu.grad * reps).view(-1, 1), torch.tensor([0.5], dtype=torch.float64))
    # a score-based method other than ScoreFunction drawn the same way: a clear error
    z1 = m(OneHotCategorical(logits=torch.zeros(2)))
    y = storch.method.UnorderedSetEstimator("y", 2)(OneHotCategorical(logits=z1 * 2))
    z2 = m(OneHotCategorical(logits=torch.zeros(2)))
    storch.add_cost(y[..., 0] + 0 * z2[..., 0], "f")
    with pytest.raises(ValueError, match="continued after it"):
        storch.backward()


def test_an_enumerated_plate_between_two_draws_is_reduced_first_and_exact():
    """Expect over e given z1, then z2: e's weights vary along the sequence, so e is reduced before it. With k
    equal to the number of sequences the set estimate is exact: the value and the gradient are the exact ones."""
    l1 = torch.tensor([0.3, -0.4], dtype=torch.float64, requires_grad=True)
    m = storch.method.UnorderedSetEstimator("z", 4)
    z1 = m(OneHotCategorical(logits=l1))                                # both first classes
    e = storch.method.Expect("e")(torch.distributions.Bernoulli(logits=z1[..., 0] * 2 - 1))
    z2 = m(OneHotCategorical(logits=torch.tensor([0.5, 0.0], dtype=torch.float64)))  # all 4 sequences
    storch.add_cost(e * 3.0 + z2[..., 1] + z1[..., 0], "f")
    value = storch.backward()
    l = l1.detach().clone().requires_grad_()
    p1 = torch.softmax(l, -1)
    exact = 3 * (p1[0] * torch.sigmoid(torch.tensor(1.0)) + p1[1] * torch.sigmoid(torch.tensor(-1.0))) \
        + torch.softmax(torch.tensor([0.5, 0.0]), -1)[1] + p1[0]
    exact.backward()
    assert abs(float(value.detach()) - float(exact.detach())) < 1e-6 and torch.allclose(l1.grad, l.grad, atol=1e-6)


def test_conditional_parameters_of_size_one_along_the_plate():
    m = storch.method.UnorderedSetEstimator("z", 3)
    z1 = m(OneHotCategorical(logits=torch.zeros(K)))
    z2 = m(OneHotCategorical(logits=storch.Tensor(torch.zeros(1, K), [z1.plate])))  # the plate, not varying
    assert z2.shape == (3, K) and z2.plate.version == 1
    storch.reset()


def test_interleaved_sequences_follow_each_other():
    """b's sets are drawn per member of a; a continues; b continues given both: b's beams follow a's sequences."""
    torch.manual_seed(0)
    mA, mB = storch.method.UnorderedSetEstimator("a", 2), storch.method.UnorderedSetEstimator("b", 2)
    a1 = mA(OneHotCategorical(logits=torch.zeros(K)))
    b1 = mB(OneHotCategorical(logits=a1 * 1.0))
    a2 = mA(OneHotCategorical(logits=torch.zeros(K)))
    b2 = mB(OneHotCategorical(logits=b1 + a2))
    assert b2.shape == (2, 2, K) and b2.plates[0] is a2.plate and b2.plate.version == 1
    seq = storch.cat([b1, b2], -1)                                        # on b's and a's newest versions
    assert {p.version for p in seq.plates} == {1}
    storch.add_cost((seq * torch.arange(2 * K)).sum(-1), "f")
    storch.backward()


def test_two_set_methods_cannot_share_a_plate_name():
    z = storch.method.UnorderedSetEstimator("z", 2)(OneHotCategorical(logits=torch.zeros(K)))
    w = storch.method.UnorderedSetEstimator("z", 2)(OneHotCategorical(logits=torch.zeros(K)))
    with pytest.raises(ValueError, match="used by two sampling sequences"):
        z + w
