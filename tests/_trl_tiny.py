"""The tiny, local TRL set-up of the integration tests: the example's builders (fastgrad.examples.trl_grpo) and its
GRPOConfig. Nothing reaches a hub."""
import torch

from fastgrad.examples.trl_grpo import WORDS, build_config, build_dataset, build_model, build_tokenizer  # noqa: F401
from fastgrad.examples.trl_grpo import even_word_reward as reward  # noqa: F401

tokenizer = build_tokenizer
dataset = build_dataset


def model(vocab_size=WORDS + 3, hidden=32, seed=0, dtype=torch.float32):
    return build_model(vocab_size, hidden, seed, dtype)


def config(out_dir, **kw):
    return build_config(str(out_dir), **kw)


def save_model(path):
    """The tiny model saved to a local folder (TRL loads a reference policy from the policy's path)."""
    model().save_pretrained(str(path))
    return str(path)


def model_from(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
