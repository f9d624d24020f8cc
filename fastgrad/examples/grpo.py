"""GRPO from scratch on the CPU: a tiny transformer policy learns to count, trained through the fused LM-head loss.

    python -m fastgrad.examples.grpo --steps 150

Task: the prompt is one digit d; the policy emits ``--length`` tokens from a vocabulary of ``--vocab`` tokens
(the digits 0-9 and distractors), and the reward is the fraction of positions i where it emitted
``(d + i + 1) mod 10`` (count up from d). Each step samples ``--group`` completions per prompt (``--prompts``
prompts) with fastgrad's Philox sampler, computes GRPO advantages ``(r - mean) / (std + 1e-4)`` within each group,
and takes one on-policy PPO-clip step with the GRPO normalization (per-sequence mean, then the mean over
sequences) through ``fastgrad.functional.linear_policy_loss``: the ``[tokens, vocab]`` logits of the loss never
exist. ``--loss unfused`` runs the same step with torch's ``lm_head`` + ``log_softmax`` + ``gather``; ``--loss
both`` (default) runs both from the same seed, one after the other, and overlays them.

Writes ``log.csv`` (as it goes), ``summary.json`` and ``curves.png`` (reward, and the loss step's peak memory
growth) into ``--out-dir`` (default ``runs/grpo/``). A few minutes on 2 cores at the defaults.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn as nn

import fastgrad.functional as F

DIGITS = 10


class Policy(nn.Module):
    """A causal transformer: token + position embeddings, ``--layers`` pre-norm blocks, an untied LM head with a
    bias. The bias starts as a crude pretrained prior: the distractor tokens 8 nats below the digits (at V = 32000
    about half of the probability on digits; from a uniform start no sample would ever earn a reward)."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, max_len: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        block = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab)
        with torch.no_grad():
            self.lm_head.bias.zero_()
            self.lm_head.bias[DIGITS:] = -8.0

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T] -> the final hidden states [B, T, dim] (the LM head is applied by the loss)."""
        T = tokens.shape[1]
        x = self.tok(tokens) + self.pos(torch.arange(T, device=tokens.device))
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=tokens.device)
        return self.norm(self.blocks(x, mask=causal, is_causal=True))


def reward(prompt: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    """Fraction of positions i with completion[i] == (d + i + 1) mod 10."""
    want = (prompt[:, None] + torch.arange(1, completion.shape[1] + 1)) % DIGITS
    return (completion == want).float().mean(1)


@torch.no_grad()
def generate(policy: Policy, prompt: torch.Tensor, length: int, seed: int) -> torch.Tensor:
    """Sample ``length`` tokens after each prompt digit: [B] -> [B, length] (Philox stream ``seed``)."""
    seq = prompt[:, None]
    B = prompt.shape[0]
    for i in range(length):
        logits = policy.lm_head(policy.hidden(seq)[:, -1])
        nxt = F.sample_categorical(logits, 1, seed=seed, offset=i * B)[0]
        seq = torch.cat([seq, nxt[:, None]], 1)
    return seq[:, 1:]


def loss_step(policy: Policy, seq: torch.Tensor, adv: torch.Tensor, fused: bool, eps: float):
    """One on-policy PPO-clip loss with GRPO's normalization over the completion tokens of ``seq`` [B, 1 + L]."""
    h = policy.hidden(seq[:, :-1])  # position t predicts token t + 1
    target = seq[:, 1:]
    if fused:
        loss, _ = F.linear_policy_loss(h, policy.lm_head.weight, target, adv, bias=policy.lm_head.bias,
                                       loss="ppo_clip", eps_low=eps, eps_high=eps, normalize="sequence")
        return loss
    logp = torch.log_softmax(policy.lm_head(h).float(), -1).gather(-1, target[..., None]).squeeze(-1)
    ratio = torch.exp(logp - logp.detach())
    a = adv[:, None]
    per_token = torch.max(-a * ratio, -a * ratio.clamp(1 - eps, 1 + eps))
    return per_token.mean(1).mean()


class PeakRSS:
    """Peak resident-memory growth during a block (sampled every millisecond)."""

    def __enter__(self):
        try:
            import psutil
        except ImportError:
            self.proc = None
            self.delta = float("nan")
            return self
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self.done.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.proc is not None:
            self.done.set()
            self.thread.join()
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.delta = (self.peak - self.base) / 2**20
        return False


def train(args, fused: bool, log: csv.writer, fh) -> List[Dict[str, float]]:
    torch.manual_seed(args.seed)
    policy = Policy(args.vocab, args.dim, args.layers, args.heads, args.length + 1)
    opt = torch.optim.Adam(policy.parameters(), lr=args.lr)
    name = "fused" if fused else "unfused"
    rows = []
    g = torch.Generator().manual_seed(args.seed)
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        prompt = torch.randint(0, DIGITS, (args.prompts,), generator=g).repeat_interleave(args.group)
        completion = generate(policy, prompt, args.length, seed=args.seed * 1_000_003 + step)
        r = reward(prompt, completion).view(args.prompts, args.group)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).reshape(-1)
        seq = torch.cat([prompt[:, None], completion], 1)
        opt.zero_grad(set_to_none=True)
        with PeakRSS() as mem:
            loss = loss_step(policy, seq, adv, fused, args.eps)
            loss.backward()
        opt.step()
        row = dict(loss=name, step=step, reward=float(r.mean()), objective=float(loss),
                   peak_mb=mem.delta, seconds=time.perf_counter() - t0)
        rows.append(row)
        log.writerow([row[k] for k in ("loss", "step", "reward", "objective", "peak_mb", "seconds")])
        fh.flush()
        done = int(30 * step / args.steps)
        sys.stdout.write(f"\r{name:8s} [{'#' * done}{'.' * (30 - done)}] step {step}/{args.steps} "
                         f"reward {row['reward']:.3f} peak {row['peak_mb']:.0f} MB")
        sys.stdout.flush()
    sys.stdout.write("\n")
    return rows


def plot(runs: Dict[str, List[Dict[str, float]]], path: Path, args) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in runs.items():
        a.plot([r["step"] for r in rows], [r["reward"] for r in rows], label=name)
        b.plot([r["step"] for r in rows], [r["peak_mb"] for r in rows], label=name)
    a.set(xlabel="step", ylabel="mean reward", title="GRPO: count up from the prompt digit")
    b.set(xlabel="step", ylabel="MB", title=f"peak RSS growth of loss + backward (V = {args.vocab})")
    for ax in (a, b):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--prompts", type=int, default=16, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="completions per prompt (the GRPO group)")
    p.add_argument("--length", type=int, default=8, help="completion length")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size (tokens >= 10 are distractors)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eps", type=float, default=0.2, help="PPO clip range")
    p.add_argument("--loss", choices=("fused", "unfused", "both"), default="both")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out-dir", type=Path, default=Path("runs/grpo"))
    args = p.parse_args(argv)
    for name in ("steps", "prompts", "length", "dim", "layers", "heads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.group < 2:
        p.error(f"--group must be >= 2 (GRPO's baseline is the group mean), got {args.group}")
    if args.vocab < DIGITS:
        p.error(f"--vocab must be >= {DIGITS} (the digits are tokens 0-9), got {args.vocab}")
    if args.dim % args.heads:
        p.error(f"--dim ({args.dim}) must be a multiple of --heads ({args.heads})")
    if not (args.lr > 0 and math.isfinite(args.lr)) or not (0 <= args.eps < 1):
        p.error("--lr must be positive and --eps in [0, 1)")
    if args.threads < 0:
        p.error(f"--threads must be >= 0, got {args.threads}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    runs = {}
    with open(args.out_dir / "log.csv", "w", newline="") as fh:
        log = csv.writer(fh)
        log.writerow(["loss", "step", "reward", "objective", "peak_mb", "seconds"])
        try:
            for fused in ((True, False) if args.loss == "both" else (args.loss == "fused",)):
                runs["fused" if fused else "unfused"] = train(args, fused, log, fh)
        except KeyboardInterrupt:
            print("\ninterrupted: the log so far is kept")
    summary = {"args": {k: str(v) for k, v in vars(args).items()}}
    for name, rows in runs.items():
        if rows:
            tail = rows[-min(10, len(rows)):]
            summary[name] = {"final_reward": sum(r["reward"] for r in tail) / len(tail),
                             "median_peak_mb": sorted(r["peak_mb"] for r in rows)[len(rows) // 2],
                             "median_step_s": sorted(r["seconds"] for r in rows)[len(rows) // 2]}
            print(f"{name}: reward (last 10 steps) {summary[name]['final_reward']:.3f}, median peak "
                  f"{summary[name]['median_peak_mb']:.0f} MB, median step {summary[name]['median_step_s']:.3f} s")
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    wrote = ["log.csv", "summary.json"] + (["curves.png"] if plot(runs, args.out_dir / "curves.png", args) else [])
    print(f"wrote {', '.join(str(args.out_dir / w) for w in wrote)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
