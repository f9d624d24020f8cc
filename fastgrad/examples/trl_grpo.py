"""TRL's GRPO with fastgrad's loss, offline on the CPU: one import changes.

    python -m fastgrad.examples.trl_grpo --steps 20 --compare

``fastgrad.integrations.trl.GRPOTrainer`` in place of ``trl.GRPOTrainer``; nothing else differs. A tiny Qwen2
causal LM from a ``transformers`` config (random weights), a word-level tokenizer built in memory, prompts from a
Python list and a Python reward (the fraction of completion words with an even index): nothing is downloaded.
``--compare`` also trains TRL's own trainer from the same seed and prints, step by step, both loss columns and the
largest relative difference of the logged values and of the final parameters. ``--loss-type``, ``--beta``,
``--importance-sampling-level`` and ``--num-iterations`` go to ``GRPOConfig``. Needs the ``trl`` extra
(``pip install fastgrad[trl]``). About 10 s on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from typing import List, Optional

import torch

WORDS = 61  # the tokenizer's words; the vocabulary adds <pad>, <eos>, <unk>


def build_tokenizer():
    """A word-level tokenizer over ``<pad> <eos> <unk> w0 ... w60``, built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_model(vocab_size: int = WORDS + 3, hidden: int = 32, seed: int = 0, dtype=torch.float32):
    """A randomly initialized 2-layer Qwen2 (``hidden`` wide) whose EOS is likely enough that some completions end
    early. ``vocab_size`` may exceed the tokenizer's (the extra ids decode to nothing)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight[1] = 4.0 * model.model.norm.weight / hidden**0.5
    return model.to(dtype)


def build_dataset(n: int = 8):
    """``n`` prompts of 2-4 words, as a ``datasets.Dataset`` with a ``"prompt"`` column."""
    from datasets import Dataset

    prompts = [" ".join(f"w{(7 * i + 3 * j) % WORDS}" for j in range(2 + i % 3)) for i in range(n)]
    return Dataset.from_list([{"prompt": p} for p in prompts])


def even_word_reward(completions, **kwargs) -> List[float]:
    """The fraction of a completion's words ``w<i>`` with ``i`` even."""
    out = []
    for c in completions:
        words = c.split()
        out.append(sum(1.0 for w in words if w[:1] == "w" and w[1:].isdigit() and int(w[1:]) % 2 == 0)
                   / max(len(words), 1))
    return out


def build_config(out_dir: str, **overrides):
    """A ``GRPOConfig`` for the CPU: 4 prompts x 4 completions of <= 6 tokens per step, plain SGD at lr 0.01, no
    gradient clipping (so two trainers' updates can be compared exactly), logging every step, nothing saved."""
    from trl import GRPOConfig

    kw = dict(output_dir=out_dir, per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
              learning_rate=0.01, optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant", warmup_steps=0,
              num_iterations=2, max_steps=2, logging_steps=1, report_to="none", use_cpu=True, seed=0,
              save_strategy="no", bf16=False, epsilon=0.05, dataloader_num_workers=0, disable_tqdm=True)
    kw.update(overrides)
    return GRPOConfig(**kw)


def train(trainer_cls, model_dir: str, out_dir: str, **config):
    """Train ``trainer_cls`` on the tiny task; returns (per-step logs, trained model)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = trainer_cls(model=model, reward_funcs=even_word_reward, args=build_config(out_dir, **config),
                          train_dataset=build_dataset(), processing_class=build_tokenizer())
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h], model


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--loss-type", default="dapo")
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--importance-sampling-level", default="token", choices=["token", "sequence"])
    p.add_argument("--num-iterations", type=int, default=2)
    p.add_argument("--compare", action="store_true", help="also train trl.GRPOTrainer and compare")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import trl

    from fastgrad.integrations.trl import GRPOTrainer

    config = dict(max_steps=args.steps, loss_type=args.loss_type, beta=args.beta,
                  importance_sampling_level=args.importance_sampling_level, num_iterations=args.num_iterations)
    with tempfile.TemporaryDirectory() as d:
        model_dir = os.path.join(d, "model")
        build_model().save_pretrained(model_dir)  # TRL builds a reference policy (beta > 0) from the path
        ours, model = train(GRPOTrainer, model_dir, os.path.join(d, "fastgrad"), **config)
        theirs, their_model = train(trl.GRPOTrainer, model_dir, os.path.join(d, "trl"), **config) \
            if args.compare else (None, None)
    print(f"{'step':>4} {'reward':>8} {'entropy':>8} {'loss (fastgrad)':>16}" + (f" {'loss (TRL)':>12}"
                                                                                if theirs else ""))
    for i, h in enumerate(ours):
        reward = f"{h['reward']:8.4f}" if "reward" in h else f"{'(reused)':>8}"  # num_iterations reuses a batch
        row = f"{i + 1:>4} {reward} {h['entropy']:8.4f} {h['loss']:16.6g}"
        print(row + (f" {theirs[i]['loss']:12.6g}" if theirs else ""))
    result = {"steps": ours}
    if theirs:
        keys = [k for k in ours[0] if k in theirs[0] and k not in ("step_time", "learning_rate", "epoch", "step")]
        logged = max(abs(a[k] - b[k]) / max(abs(a[k]), abs(b[k]), 1e-6) for a, b in zip(ours, theirs) for k in keys
                     if k in a and k in b)
        with torch.no_grad():
            params = max(float((p - q).abs().max() / q.abs().max().clamp_min(1e-30))
                         for p, q in zip(model.parameters(), their_model.parameters()))
        print(f"largest relative difference to trl.GRPOTrainer: logged values {logged:.2e}, parameters {params:.2e}")
        result.update(trl_steps=theirs, max_logged_rel_diff=logged, max_param_rel_diff=params)
    return result


if __name__ == "__main__":
    main()
