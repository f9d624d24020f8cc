"""A tiny, local TRL set-up for the integration tests: a randomly initialized Qwen2 causal LM from a config, a
word-level tokenizer built in memory, prompts from a Python list and a Python reward. Nothing reaches a hub."""
import torch

WORDS = 61  # the tokenizer's words: vocabulary 64 with <pad>, <eos>, <unk>


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def model(vocab_size=WORDS + 3, hidden=32, seed=0, dtype=torch.float32):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    m = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # EOS likely enough that some completions end before max_completion_length
        m.lm_head.weight[1] = 4.0 * m.model.norm.weight / hidden**0.5
    return m.to(dtype)


def dataset(n=8):
    from datasets import Dataset

    prompts = [" ".join(f"w{(7 * i + 3 * j) % WORDS}" for j in range(2 + i % 3)) for i in range(n)]
    return Dataset.from_list([{"prompt": p} for p in prompts])


def reward(completions, **kwargs):
    """Rewards completions with many words of even index (a signal the tiny model can follow)."""
    out = []
    for c in completions:
        words = c.split()
        out.append(sum(1.0 for w in words if w.startswith("w") and w[1:].isdigit() and int(w[1:]) % 2 == 0)
                   / max(len(words), 1))
    return out


def config(out_dir, **kw):
    from trl import GRPOConfig

    base = dict(output_dir=str(out_dir), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
                learning_rate=0.01, optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant", warmup_steps=0,
                num_iterations=2, max_steps=2, logging_steps=1, report_to="none", use_cpu=True, seed=0,
                save_strategy="no", bf16=False, epsilon=0.05, dataloader_num_workers=0,
                disable_tqdm=True)
    base.update(kw)
    return GRPOConfig(**base)


def save_model(path):
    """The tiny model saved to a local folder (TRL loads a reference policy from the policy's path)."""
    m = model()
    m.save_pretrained(str(path))
    return str(path)


def model_from(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
