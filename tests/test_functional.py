"""The functional samplers (fastgrad/functional/sampling.py): shapes, one-hot output, non-contiguous and expanded
inputs. The estimators' functional tests live with their method's in tests/estimators/."""
import pytest
import torch

import fastgrad.functional as F


def test_sample_categorical_shapes_and_one_hot():
    torch.manual_seed(0)  # inputs independent of the tests before
    l = torch.randn(4, 3, 6)
    idx, oh = F.sample_categorical_one_hot(l, 5, seed=1)
    assert idx.shape == (5, 4, 3) and idx.dtype == torch.int64
    assert oh.shape == (5, 4, 3, 6) and torch.equal(oh.argmax(-1), idx)
    assert torch.equal(F.sample_categorical(probs=l.softmax(-1), n=5, seed=1), idx)
    assert torch.equal(F.sample_categorical(l, 5, seed=1), idx)


def test_sample_categorical_one_hot_flag_is_deprecated_and_still_works():
    l = torch.randn(4, 6)
    with pytest.warns(DeprecationWarning, match="sample_categorical_one_hot"):
        idx, oh = F.sample_categorical(l, 3, one_hot=True, seed=2)
    ref_idx, ref_oh = F.sample_categorical_one_hot(l, 3, seed=2)
    assert torch.equal(idx, ref_idx) and torch.equal(oh, ref_oh)


def test_old_eager_names_warn_and_point_at_eager():
    from fastgrad.ops import categorical_sample, enumerate_log_probs, gumbel_softmax, score_surrogate

    for mod, old in ((categorical_sample, "sample"), (gumbel_softmax, "sample"), (score_surrogate, "surrogate"),
                     (enumerate_log_probs, "log_probs")):
        with pytest.warns(DeprecationWarning, match=f"{mod.__name__}.eager"):
            assert getattr(mod, old) is mod.eager


def test_non_contiguous_and_expanded_inputs():
    base = torch.randn(6, 8)
    nc = base.t()  # non-contiguous [8, 6]
    a = F.sample_categorical(nc, 3, seed=2)
    b = F.sample_categorical(nc.contiguous(), 3, seed=2)
    assert torch.equal(a, b)
    ex = torch.randn(1, 5).expand(4, 5)
    y = F.gumbel_softmax(ex, 0.5, 2, seed=3)
    assert y.shape == (2, 4, 5) and torch.allclose(y.sum(-1), torch.ones(2, 4))
