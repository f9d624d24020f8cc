"""``fastgrad.integrations.trl.GRPOTrainer`` against TRL 1.16's own ``GRPOTrainer``.

1. One loss step on the same hand-made batch (left-padded prompts, padded and empty completions, off-policy old
   log-probs so that clipping is active, a reference policy, vLLM importance ratios with zeros), for every loss type
   and option: the loss, every parameter's gradient and every metric TRL logs equal TRL's, and the step takes the
   path the module documents ("fused" where fastgrad's loss can express the option, else "log_prob").
2. End to end: two steps of plain SGD (no clipping, no adaptive optimizer) with ``num_iterations=2`` (the second
   step is off-policy and clips), a tiny Qwen2 from a config, a tokenizer built in memory, prompts from a list and a
   Python reward: the logged loss, entropy, KL and clip ratios of each step and the parameter updates equal TRL's.

Tolerances (fp32): losses and metrics 1e-5 relative with a 1e-6 absolute floor (a GRPO loss on-policy is a sum of
O(1) terms that cancels to ~1e-7); gradients 1e-4 and updates 1e-3 of the largest entry."""
import copy
import os

import pytest
import torch

from ._peers import require

require("trl")
from fastgrad.integrations import trl as ftrl  # noqa: E402
import trl  # noqa: E402

from . import _trl_tiny as tiny  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _close(a, b, rel=1e-5, floor=1e-6):
    assert abs(a - b) <= rel * max(abs(a), abs(b)) + floor, (a, b)


def _close_grads(ga, gb, tol):
    for k in ga:
        scale = ga[k].abs().max().clamp_min(1e-30)
        assert (ga[k] - gb[k]).abs().max() <= tol * scale, (k, float((ga[k] - gb[k]).abs().max() / scale))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """The tiny model saved to a local folder: TRL builds the reference policy from the policy's path."""
    return tiny.save_model(tmp_path_factory.mktemp("trl") / "model")


def _trainers(tmp_path, model_path, **cfg):
    """TRL's trainer and fastgrad's, on identical copies of the tiny model."""
    out = []
    for cls in (trl.GRPOTrainer, ftrl.GRPOTrainer):
        m = tiny.model_from(model_path)
        args = tiny.config(tmp_path / cls.__module__, **cfg)
        out.append(cls(model=m, reward_funcs=tiny.reward, args=args, train_dataset=tiny.dataset(),
                       processing_class=tiny.tokenizer()))
    return out


def _batch(trainer, seed=0, vllm=None):
    """A micro-batch as TRL's generation step hands it to the loss: 6 sequences, prompts left-padded, completions
    right-padded (one empty), old log-probs 0.3 nats from the current ones (clipping active), a reference, and
    for vLLM importance sampling a ratio per token or per sequence with some zeros (masked by the mode)."""
    g = torch.Generator().manual_seed(seed)
    B, P, K, V = 6, 4, 7, tiny.WORDS + 3
    prompt_ids = torch.randint(3, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[1, :2] = 0
    prompt_ids[1, :2] = 0
    completion_ids = torch.randint(3, V, (B, K), generator=g)
    lengths = torch.tensor([7, 5, 1, 7, 0, 3])
    completion_mask = (torch.arange(K)[None] < lengths[:, None]).long()
    completion_ids = completion_ids.masked_fill(completion_mask == 0, 0)
    with torch.no_grad():
        lp, _, _ = trl.GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([prompt_mask, completion_mask], 1), K)
    noise = 0.3 * torch.randn(B, K, generator=g)
    inputs = {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor([1.2, -0.7, 0.4, -1.5, 0.9, 0.0]),
        "old_per_token_logps": (lp + noise) * completion_mask,
        "ref_per_token_logps": (lp - 0.2 * torch.randn(B, K, generator=g).abs()) * completion_mask,
        "num_items_in_batch": torch.tensor(float(completion_mask.sum() * 2)),
    }
    if vllm is not None:
        shape = (B, K) if vllm.startswith("token") else (B, 1)
        ratio = torch.exp(0.2 * torch.randn(shape, generator=g))
        if vllm.endswith("mask"):
            ratio = ratio.masked_fill(ratio > 1.2, 0.0)
        else:
            ratio = ratio.clamp(max=1.2)
        inputs["importance_sampling_ratio"] = ratio
    return inputs


def _step(trainer, inputs, ga=2, vllm=False):
    trainer.model.train()
    trainer.model.zero_grad()
    trainer.current_gradient_accumulation_steps = ga
    if vllm:
        trainer.use_vllm = True
        trainer.vllm_importance_sampling_correction = True
    trainer._metrics["train"].clear()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return float(loss), grads, metrics


FUSED = {
    "dapo": dict(loss_type="dapo"),
    "grpo_beta": dict(loss_type="grpo", beta=0.05),  # TRL's default bias-corrected KL: fastgrad's "k3_is"
    "grpo_beta_plain_k3": dict(loss_type="grpo", beta=0.05, use_bias_correction_kl=False),
    "grpo_seq_beta_plain_k3": dict(loss_type="grpo", beta=0.05, importance_sampling_level="sequence",
                                   use_bias_correction_kl=False),
    "grpo_seq_delta": dict(loss_type="grpo", importance_sampling_level="sequence", delta=1.5, epsilon_high=0.3),
    "bnpo_entropy": dict(loss_type="bnpo", entropy_coef=0.05),
    "dr_grpo_beta_entropy": dict(loss_type="dr_grpo", beta=0.1, entropy_coef=0.02),
    "dapo_delta_entropy": dict(loss_type="dapo", delta=2.0, entropy_coef=0.03, epsilon_high=0.28),
    "luspo_seq": dict(loss_type="luspo", importance_sampling_level="sequence", beta=0.05,
                      use_bias_correction_kl=False),
    "luspo_token": dict(loss_type="luspo"),
    "cispo": dict(loss_type="cispo", epsilon_high=5.0),
    "cispo_tight_seq": dict(loss_type="cispo", epsilon_high=1.1, importance_sampling_level="sequence"),
    "sapo": dict(loss_type="sapo", beta=0.05),
    "sapo_seq": dict(loss_type="sapo", importance_sampling_level="sequence", sapo_temperature_neg=2.0),
    "vespo": dict(loss_type="vespo", beta=0.03),
    "dapo_temperature": dict(loss_type="dapo", temperature=0.7, cast_lm_head_to_fp32=True),
}
VLLM = {  # name: (config, vLLM importance sampling mode)
    "grpo_token_truncate": (dict(loss_type="grpo"), "token_truncate"),
    "dapo_token_mask": (dict(loss_type="dapo", beta=0.05), "token_mask"),
    "bnpo_sequence_mask": (dict(loss_type="bnpo"), "sequence_mask"),
    "sapo_sequence_truncate": (dict(loss_type="sapo", importance_sampling_level="sequence"), "sequence_truncate"),
}
LOG_PROB = {
    "top_entropy_quantile": dict(loss_type="dapo", top_entropy_quantile=0.5),
    "off_policy_mask": dict(loss_type="grpo", off_policy_mask_threshold=0.05),
    "bias_correction_kl_sequence": dict(loss_type="dapo", beta=0.05, importance_sampling_level="sequence"),
    "adaptive_entropy": dict(loss_type="dapo", use_adaptive_entropy=True, entropy_coef=0.01),
    "grpo_entropy": dict(loss_type="grpo", entropy_coef=0.05),
    "tight_delta": dict(loss_type="dapo", delta=1.1, epsilon_high=0.2),
    "cispo_below_one": dict(loss_type="cispo", epsilon_high=0.9),
    "delta_one_no_high_clip": dict(loss_type="dapo", delta=1.0, epsilon_high=0.0),
}


def _compare(tmp_path, model_path, cfg, expected_path, vllm=None, ga=2):
    theirs_tr, ours_tr = _trainers(tmp_path, model_path, **cfg)
    inputs = _batch(theirs_tr, vllm=vllm)
    theirs = _step(theirs_tr, inputs, ga, vllm is not None)
    ours = _step(ours_tr, inputs, ga, vllm is not None)
    assert ours_tr.fastgrad_path == expected_path
    _close(ours[0], theirs[0])
    assert set(ours[1]) == set(theirs[1])
    _close_grads(theirs[1], ours[1], 1e-4)
    assert set(ours[2]) == set(theirs[2]), set(ours[2]) ^ set(theirs[2])
    for k in theirs[2]:
        _close(ours[2][k], theirs[2][k])
    return theirs, ours


@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_loss_step_equals_trl(name, tmp_path, model_path):
    theirs, _ = _compare(tmp_path, model_path, FUSED[name], "fused")
    if FUSED[name]["loss_type"] in ("grpo", "dapo", "bnpo", "dr_grpo", "luspo") and "delta" not in FUSED[name]:
        assert theirs[2]["clip_ratio/region_mean"] > 0  # the batch exercises the clipping


@pytest.mark.parametrize("name", sorted(VLLM))
def test_vllm_importance_sampling_fused(name, tmp_path, model_path):
    cfg, mode = VLLM[name]
    _compare(tmp_path, model_path, cfg, "fused", vllm=mode)


@pytest.mark.parametrize("name", sorted(LOG_PROB))
def test_options_the_fused_loss_cannot_express_run_on_fastgrad_log_probs(name, tmp_path, model_path):
    _compare(tmp_path, model_path, LOG_PROB[name], "log_prob")


def test_token_vllm_ratio_under_sequence_level_runs_on_log_probs(tmp_path, model_path):
    # TRL averages the token ratios over the sequence in the gradient: not a per-token advantage weight
    _compare(tmp_path, model_path, dict(loss_type="grpo", importance_sampling_level="sequence"), "log_prob",
             vllm="token_truncate")


def test_vespo_with_vllm_runs_on_log_probs(tmp_path, model_path):
    _compare(tmp_path, model_path, dict(loss_type="vespo"), "log_prob", vllm="token_truncate")


def test_eval_mode_and_no_accumulation(tmp_path, model_path):
    theirs_tr, ours_tr = _trainers(tmp_path, model_path, loss_type="dapo")
    inputs = _batch(theirs_tr, seed=3)
    for tr in (theirs_tr, ours_tr):
        tr.model.eval()
        tr.current_gradient_accumulation_steps = 4
    with torch.no_grad():
        a = float(theirs_tr._compute_loss(theirs_tr.model, inputs))
        b = float(ours_tr._compute_loss(ours_tr.model, inputs))
    _close(a, b)
    _close(theirs_tr._metrics["eval"]["entropy"][-1], ours_tr._metrics["eval"]["entropy"][-1])


def _train(cls, model_path, tmp_path, **cfg):
    m = tiny.model_from(model_path)
    args = tiny.config(tmp_path / cls.__module__, **cfg)
    tr = cls(model=m, reward_funcs=tiny.reward, args=args, train_dataset=tiny.dataset(),
             processing_class=tiny.tokenizer())
    before = {k: p.detach().clone() for k, p in m.named_parameters()}
    tr.train()
    steps = [h for h in tr.state.log_history if "loss" in h and "train_runtime" not in h]
    return steps, {k: p.detach() - before[k] for k, p in m.named_parameters()}, tr


@pytest.mark.parametrize("cfg", [
    dict(loss_type="dapo", mask_truncated_completions=True),
    dict(loss_type="grpo", beta=0.04),
    dict(loss_type="luspo", importance_sampling_level="sequence", entropy_coef=0.01, epsilon=0.3),
], ids=["dapo_masked_truncation", "grpo_beta", "luspo_sequence_entropy"])
def test_two_sgd_steps_end_to_end(cfg, tmp_path, model_path):
    theirs = _train(trl.GRPOTrainer, model_path, tmp_path, **cfg)
    ours = _train(ftrl.GRPOTrainer, model_path, tmp_path, **cfg)
    assert ours[2].fastgrad_path == "fused"
    assert len(theirs[0]) == len(ours[0]) == 2
    keys = ["loss", "entropy", "clip_ratio/region_mean", "clip_ratio/low_mean", "clip_ratio/high_mean"]
    if cfg.get("beta"):
        keys.append("kl")
    for a, b in zip(theirs[0], ours[0]):
        for k in keys:
            _close(b[k], a[k])
    for k in ("completions/mean_length", "completions/clipped_ratio", "reward"):  # the same completions
        assert theirs[0][0][k] == ours[0][0][k]
    assert 0 < theirs[0][0]["completions/clipped_ratio"] < 1  # some completions end at EOS, some are truncated
    # the second step is off-policy and clips some tokens, not all: its gradient is not zero
    assert 0 < theirs[0][1]["clip_ratio/region_mean"] < 1 and theirs[0][1]["grad_norm"] > 0
    _close(ours[0][1]["grad_norm"], theirs[0][1]["grad_norm"])
    assert any(v.abs().max() > 0 for v in theirs[1].values())
    _close_grads(theirs[1], ours[1], 1e-3)


@pytest.mark.slow  # three processes, a 32k vocabulary
def test_loss_step_peak_memory_below_trl_and_unfused_heads():
    """The issue's measure: at V = 32000 the loss step's peak memory growth is below both TRL's shipped head's and
    an unfused head's (benchmarks/trl_loss_memory.py, each head in its own process)."""
    from benchmarks import trl_loss_memory

    rows = {r["head"]: r for r in trl_loss_memory.run(V=32000, H=64, B=8, P=8, K=64)["rows"]}
    assert rows["fastgrad"]["path"] == "fused"
    assert rows["fastgrad"]["peak_growth_mib"] < rows["unfused"]["peak_growth_mib"]
    assert rows["fastgrad"]["peak_growth_mib"] < rows["trl"]["peak_growth_mib"]


def test_example_runs_and_matches_trl():
    from fastgrad.examples import trl_grpo

    result = trl_grpo.main(["--steps", "2", "--compare", "--beta", "0.02"])
    assert len(result["steps"]) == 2
    assert result["max_logged_rel_diff"] < 1e-4 and result["max_param_rel_diff"] < 1e-3


@pytest.mark.slow  # two gloo processes per trainer
def test_data_parallel_two_processes_equal_trl(tmp_path, model_path):
    """accelerate + DDP over 2 gloo processes (each rank its own prompts, the gradients averaged): the logged steps
    and the parameter updates equal TRL's own trainer run the same way."""
    from ._launch import run_ranks

    res = {}
    for which in ("trl", "fastgrad"):
        run_ranks("tests._trl_ddp_worker", 2, tmp_path, 600, FASTGRAD_TRL_TRAINER=which,
                  FASTGRAD_TRL_MODEL=model_path)
        res[which] = torch.load(tmp_path / f"{which}.pt")
    assert res["fastgrad"]["path"] == "fused"
    theirs, ours = res["trl"], res["fastgrad"]
    assert len(theirs["steps"]) == len(ours["steps"]) == 2
    for a, b in zip(theirs["steps"], ours["steps"]):
        for k in ("loss", "entropy", "grad_norm", "clip_ratio/region_mean", "clip_ratio/high_max"):
            _close(b[k], a[k])
    assert theirs["steps"][1]["clip_ratio/region_mean"] > 0
    _close_grads(theirs["updates"], ours["updates"], 1e-3)
