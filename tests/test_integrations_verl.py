"""``fastgrad.integrations.verl``: the drop-in ``FusedLinearForPPO`` against verl 0.9.1's own (its torch backend,
the reference of verl's fused-kernel path), values and gradients, and :func:`install` routing verl's model forward
(``verl.models.transformers.dense_common.forward_with_torch_backend``) through fastgrad on a tiny causal LM.

Tolerances: fp32 log-probs and entropies 1e-5 absolute, gradients 1e-4 of the largest entry; bf16: fastgrad's
error against an fp64 oracle no larger than 1.5x verl's own plus 1e-3."""
import pytest
import torch

from fastgrad.integrations import verl as fv

from ._peers import require

verl_tf = require("verl.utils.experimental.torch_functional")


def _inputs(B, T, H, V, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) / H**0.5).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    return h, w, ids


def _run(head, h, w, ids, temperature, seed=1, entropy_grad=True):
    h = h.clone().requires_grad_()
    w = w.clone().requires_grad_()
    logp, ent = head(h, w, ids, temperature)
    g = torch.Generator().manual_seed(seed)
    up_l = torch.randn(logp.shape, generator=g)
    up_e = torch.randn(ent.shape, generator=g)
    loss = (logp * up_l).sum() + ((ent.float() * up_e).sum() if entropy_grad else 0.0)
    loss.backward()
    return logp.detach(), ent.detach(), h.grad, w.grad


def _close_rel(a, b, tol):
    scale = b.abs().max().clamp_min(1e-30)
    assert (a.double() - b.double()).abs().max() <= tol * scale, float((a - b).abs().max() / scale)


@pytest.mark.parametrize("shape", [(2, 7, 16, 50), (1, 1, 8, 3), (9, 64, 32, 301)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("entropy_grad", [True, False])
def test_matches_verl_fp32(shape, temperature, entropy_grad):
    B, T, H, V = shape
    h, w, ids = _inputs(B, T, H, V)
    theirs = _run(verl_tf.FusedLinearForPPO(chunk_size=16), h, w, ids, temperature, entropy_grad=entropy_grad)
    for chunk in (None, 5):
        ours = _run(fv.FusedLinearForPPO(chunk_size=chunk), h, w, ids, temperature, entropy_grad=entropy_grad)
        assert ours[0].dtype == theirs[0].dtype == torch.float32 and ours[1].dtype == theirs[1].dtype
        torch.testing.assert_close(ours[0], theirs[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(ours[1], theirs[1], atol=1e-5, rtol=0)
        _close_rel(ours[2], theirs[2], 1e-4)
        _close_rel(ours[3], theirs[3], 1e-4)


def test_matches_verl_2d():
    h, w, ids = _inputs(1, 40, 16, 70)
    h, ids = h[0], ids[0]
    theirs = _run(verl_tf.FusedLinearForPPO(), h, w, ids, 1.0)
    ours = _run(fv.FusedLinearForPPO(), h, w, ids, 1.0)
    assert ours[0].shape == theirs[0].shape == (40,) and ours[2].shape == (40, 16)
    for a, b in zip(ours, theirs):
        _close_rel(a, b, 1e-5)


def test_bf16_no_worse_than_verl():
    h, w, ids = _inputs(3, 20, 32, 200, torch.bfloat16)
    ours = _run(fv.FusedLinearForPPO(), h, w, ids, 1.0)
    theirs = _run(verl_tf.FusedLinearForPPO(), h, w, ids, 1.0)
    exact = _run(fv.FusedLinearForPPO(), h.double(), w.double(), ids, 1.0)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.bfloat16  # verl's dtypes
    for a, b, e in zip(ours, theirs, exact):
        err_ours = (a.double() - e).abs().max()
        err_theirs = (b.double() - e).abs().max()
        assert err_ours <= 1.5 * err_theirs + 1e-3 * e.abs().max(), (float(err_ours), float(err_theirs))


def test_sum_pi_squared():
    h, w, ids = _inputs(2, 6, 8, 30)
    logp, ent, sq = fv.FusedLinearForPPO()(h, w, ids, 0.8, return_sum_pi_squared=True)
    p = torch.softmax((h.double() @ w.double().t()) / 0.8, -1)
    torch.testing.assert_close(sq.double(), (p * p).sum(-1), atol=1e-6, rtol=0)
    assert sq.dtype == torch.float32 and not sq.requires_grad
    torch.testing.assert_close(logp.double(), p.log().gather(-1, ids[..., None])[..., 0], atol=1e-5, rtol=0)


def test_bad_input():
    with pytest.raises(ValueError, match="impl_backend"):
        fv.FusedLinearForPPO(impl_backend="cuda")
    with pytest.raises(ValueError, match="chunk_size"):
        fv.FusedLinearForPPO(chunk_size=0)
    h, w, ids = _inputs(2, 6, 8, 30)
    with pytest.raises(ValueError, match="input_ids"):
        fv.FusedLinearForPPO()(h, w, ids[:, :-1])
    with pytest.raises(ValueError, match="hidden_states"):
        fv.FusedLinearForPPO()(h[0, 0], w, ids[0, 0])


def test_install_routes_verl_model_forward(monkeypatch):
    """verl's own model forward (fused kernels, torch backend) on a tiny Qwen2 from a config: after install() it
    runs fastgrad's head (the call is observed) and its outputs and gradients equal verl's own head's."""
    transformers = require("transformers")
    dense_common = require("verl.models.transformers.dense_common")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    model = transformers.Qwen2ForCausalLM(cfg).float()
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(3))

    def step():
        model.zero_grad()
        out = dense_common.forward_with_torch_backend(model, input_ids=ids, return_dict=True, temperature=0.9)
        (out.log_probs.sum() + 0.5 * out.entropy.sum()).backward()
        return out.log_probs.detach(), out.entropy.detach(), model.lm_head.weight.grad.clone(), \
            model.model.layers[0].mlp.up_proj.weight.grad.clone()

    original = verl_tf.FusedLinearForPPO
    theirs = step()
    calls = []
    real = fv.linear_log_prob
    monkeypatch.setattr(fv, "linear_log_prob", lambda *a, **k: calls.append(1) or real(*a, **k))
    try:
        fv.install()
        fv.install()  # idempotent
        assert verl_tf.FusedLinearForPPO is fv.FusedLinearForPPO
        ours = step()
    finally:
        fv.uninstall()
    assert verl_tf.FusedLinearForPPO is original
    assert calls, "verl's forward did not reach fastgrad"
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours[1], theirs[1], atol=1e-5, rtol=0)
    _close_rel(ours[2], theirs[2], 1e-4)
    _close_rel(ours[3], theirs[3], 1e-4)


@pytest.mark.slow  # starts a local Ray instance (~10 s)
def test_install_as_ray_worker_process_setup_hook():
    """The docs' configuration line: Ray runs install() in each worker process it starts, so verl's actors, which
    import FusedLinearForPPO from verl's module at each forward, get fastgrad's."""
    ray = require("ray")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "fastgrad.integrations.verl.install"})
    try:
        @ray.remote
        def which():
            import verl.utils.experimental.torch_functional as tf

            return tf.FusedLinearForPPO.__module__

        assert ray.get(which.remote()) == "fastgrad.integrations.verl"
    finally:
        ray.shutdown()
    assert verl_tf.FusedLinearForPPO.__module__ == "verl.utils.experimental.torch_functional"  # the driver's own
