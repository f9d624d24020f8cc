"""The fused LM head's log-softmax numerics on adversarial rows (issue 27, section 4), on every backend: inputs whose
fp32 GEMM is exact, so only the row passes are judged against the float64 log-softmax of the same fp32 logits.
Goal: fp32 log-probs within 1e-5 plus one float32 ulp, ``logp <= 0``, the entropy relative to the row max, and a
clear error for mixed devices (a meta ``lm_head``) instead of uninitialized memory."""
import pytest
import torch

import fastgrad
import fastgrad.functional as F

from .conftest import DEVICE, available_backends

BACKENDS = available_backends()


def exact_rows(offset: float, peak: float, V: int = 37, N: int = 5, via: str = "bias"):
    """hidden [N, 4], weight [V, 4], bias [V] of small dyadic numbers, so that hidden @ weight.T + bias is exact in
    fp32; ``offset`` added to every logit (through the bias, or a constant hidden column), ``peak`` to one."""
    g = torch.Generator().manual_seed(0)
    h = torch.randint(-3, 4, (N, 4), generator=g).float()
    w = torch.randint(-8, 9, (V, 4), generator=g).float() / 8
    b = torch.randint(-8, 9, (V,), generator=g).float() / 8
    b[3] += peak
    if via == "bias":
        b += offset
    else:  # through hidden and weight: a constant feature of value 1 whose weight is the offset
        h[:, 0] = 1.0
        w[:, 0] = offset
    z64 = h.double() @ w.double().t() + b.double()
    assert torch.equal((h @ w.t() + b).double(), z64)  # the fp32 logits are exact
    return h.to(DEVICE), w.to(DEVICE), b.to(DEVICE), z64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset,peak,via", [(1e4, 0.0, "bias"), (1e4, 0.0, "hidden"), (0.0, 640.0, "bias"),
                                             (0.0, 80.0, "bias"), (-1e4, 80.0, "bias")])
def test_log_probs_relative_to_the_row_max(backend, offset, peak, via):
    h, w, b, z64 = exact_rows(offset, peak, via=via)
    idx = torch.arange(h.shape[0], device=h.device) % w.shape[0] + 1  # token 3 (the peak) included
    idx[0] = 3
    want = torch.log_softmax(z64, -1).gather(1, idx.cpu()[:, None]).squeeze(1)
    with fastgrad.backend(backend):
        logp, ent = F.linear_log_prob(h, w, idx, bias=b, return_entropy=True)
        loss, stats = F.linear_policy_loss(h[None], w, idx[None], torch.ones(1, device=h.device), bias=b,
                                           loss="reinforce", normalize="token")
    ulp = torch.finfo(torch.float32).eps * want.abs()
    assert ((logp.double().cpu() - want).abs() <= 1e-5 + ulp).all(), (logp, want)
    assert (stats["logp"][0].double().cpu() - want).abs().max() <= 1e-5 + ulp.max()
    assert (logp <= 0).all()
    p = torch.softmax(z64, -1)
    want_ent = -(p * torch.log_softmax(z64, -1)).nan_to_num().sum(-1)
    assert (ent.double().cpu() - want_ent).abs().max() <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_probs_are_never_positive(backend):
    # one ulp of a large |z| used to leave the C++ pass at +3.8e-6
    with fastgrad.backend(backend):
        logp = F.linear_log_prob(torch.tensor([[1.0]], device=DEVICE), torch.tensor([[5.0], [-5.0]], device=DEVICE),
                                 torch.tensor([0], device=DEVICE), temperature=0.03)
    assert float(logp) <= 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_of_a_peaked_row(backend):
    # lse - sum p z loses eps z^2: at z ~ 600 the reference pass gave 0.188843 for 0.190866
    h = torch.tensor([[1.0]], device=DEVICE)
    w = torch.tensor([[30.0], [29.85]], device=DEVICE)
    z = torch.tensor([30.0, 29.85], dtype=torch.float64) / 0.05
    want = float(-(torch.softmax(z, 0) * torch.log_softmax(z, 0)).sum())
    with fastgrad.backend(backend):
        _, ent = F.linear_log_prob(h, w, torch.tensor([0], device=DEVICE), temperature=0.05, return_entropy=True)
    assert abs(float(ent) - want) <= 1e-5, (float(ent), want)


def test_a_meta_weight_beside_real_hidden_states_is_an_error():
    h, idx = torch.randn(4, 8), torch.randint(0, 20, (4,))
    w = torch.empty(20, 8, device="meta")
    with pytest.raises(ValueError, match="weight must be on hidden's device cpu, got meta"):
        F.linear_log_prob(h, w, idx)
    with pytest.raises(ValueError, match="index must be on hidden's device cpu, got meta"):
        F.linear_log_prob(h, torch.randn(20, 8), idx.to("meta"))
    with pytest.raises(ValueError, match="weight must be on hidden's device"):
        F.linear_policy_loss(h[None], w, idx[None], torch.randn(1))
    out = F.linear_log_prob(h.to("meta"), w, idx.to("meta"))  # all on meta: shape inference still works
    assert out.device.type == "meta" and out.shape == (4,)
