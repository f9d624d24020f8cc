"""GRPO from scratch on the CPU: a tiny transformer policy learns to count, trained through the fused LM-head loss.

    python -m fastgrad.examples.grpo --steps 150

Task: the prompt is one digit d; the policy emits ``--length`` tokens from a vocabulary of ``--vocab`` tokens
(the digits 0-9 and distractors), and the reward is the fraction of positions i where it emitted
``(d + i + 1) mod 10`` (count up from d). Each step samples ``--group`` completions per prompt (``--prompts``
prompts) with fastgrad's Philox sampler, computes GRPO advantages ``(r - mean) / (std + 1e-4)`` within each group,
and takes one on-policy PPO-clip step with the GRPO normalization (per-sequence mean, then the mean over
sequences) through ``fastgrad.functional.linear_policy_loss``: the ``[tokens, vocab]`` logits of the loss never
exist. ``--loss unfused`` runs the same step with torch's ``lm_head`` + ``log_softmax`` + ``gather``; ``--loss
both`` (default) computes both losses' gradients on the same rollouts from the same parameters at every step, logs
their relative difference, memory and time, and steps with the fused one: one trajectory, so what differs is the
loss, not two RL runs that part as soon as one sampled token differs.

``--sampler wor`` draws each prompt's group without replacement (:func:`fastgrad.functional.stochastic_beam_search`:
no duplicate completion) and weights each sequence by the unordered-set estimator (Kool, van Hoof & Welling 2020,
with its built-in baseline), the weights entering ``linear_policy_loss`` as REINFORCE advantages; the log records
the fraction of duplicate completions per step either way.

Writes ``log.csv`` (as it goes), ``summary.json`` and ``curves.png`` (reward, gradient agreement, peak memory growth
and time of loss + backward) into ``--out-dir`` (default ``runs/grpo/seed<S>-<loss>/``). A few minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn as nn

import fastgrad.functional as F
from fastgrad._env import machine_record

DIGITS = 10
LR = 1e-3


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


@torch.no_grad()
def generate_set(policy: Policy, prompt: torch.Tensor, group: int, length: int, seed: int):
    """``group`` distinct completions of each prompt digit, without replacement (stochastic beam search):
    [P] -> (completions [P * group, length], their log-probabilities [P, group] float64)."""
    step = lambda tok: policy.lm_head(policy.hidden(tok)[:, -1])  # noqa: E731
    out = F.stochastic_beam_search(step, prompt[:, None], group, length, seed=seed)
    return out.tokens[:, :, 1:].reshape(-1, length), out.log_p


def set_advantages(log_p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The unordered-set estimator's weight of each sequence, ``p(s) R(S, s) (r(s) - b(S, s))`` (Kool, van Hoof &
    Welling 2020, with its built-in baseline): the derivative of its surrogate w.r.t. ``log p(s)``. [P, k] -> [P*k]."""
    lp = log_p.t().detach().clone().requires_grad_(True)
    (adv,) = torch.autograd.grad(F.unordered_set_surrogate(lp, r.t().double()).sum(), lp)
    return adv.t().reshape(-1).float()


def loss_step(policy: Policy, seq: torch.Tensor, adv: torch.Tensor, fused: bool, eps: float,
              prompts: Optional[int] = None):
    """One on-policy PPO-clip loss with GRPO's normalization over the completion tokens of ``seq`` [B, 1 + L]; with
    ``prompts`` (the without-replacement sampler), REINFORCE of the whole sequences' log-probabilities weighted by
    the set advantages, summed, divided by the number of prompts (the set estimator's gradient)."""
    h = policy.hidden(seq[:, :-1])  # position t predicts token t + 1
    target = seq[:, 1:]
    if prompts is not None:
        if fused:
            loss, _ = F.linear_policy_loss(h, policy.lm_head.weight, target, adv, bias=policy.lm_head.bias,
                                           loss="reinforce", normalize="constant", num_items=prompts)
            return loss
        logp = torch.log_softmax(policy.lm_head(h).float(), -1).gather(-1, target[..., None]).squeeze(-1)
        return -(adv[:, None] * logp).sum() / prompts
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


COLUMNS = ("step", "reward", "duplicates", "objective", "peak_mb_fused", "peak_mb_unfused", "loss_s_fused", "loss_s_unfused",
           "grad_rel_diff")


def train(args, log: csv.writer, fh) -> List[Dict[str, float]]:
    """One GRPO run. ``--loss both``: at every step both losses differentiate the same rollouts from the same
    parameters (in alternating order, so neither always runs on a warm allocator), the relative difference of their
    gradients is logged, and the fused loss's gradient takes the step; one trajectory, so the comparison is of the
    losses and not of two chaotic RL runs. ``--loss fused|unfused``: that loss alone."""
    torch.manual_seed(args.seed)
    policy = Policy(args.vocab, args.dim, args.layers, args.heads, args.length + 1)
    params = list(policy.parameters())
    opt = torch.optim.Adam(params, lr=args.lr)
    rows: List[Dict[str, float]] = []
    g = torch.Generator().manual_seed(args.seed)
    for step in range(1, args.steps + 1):
        prompt = torch.randint(0, DIGITS, (args.prompts,), generator=g).repeat_interleave(args.group)
        if args.sampler == "wor":  # the group drawn without replacement, weighted by the unordered-set estimator
            completion, log_p = generate_set(policy, prompt[::args.group], args.group, args.length,
                                             seed=args.seed * 1_000_003 + step)
            r = reward(prompt, completion).view(args.prompts, args.group)
            adv = set_advantages(log_p, r)
        else:
            completion = generate(policy, prompt, args.length, seed=args.seed * 1_000_003 + step)
            r = reward(prompt, completion).view(args.prompts, args.group)
            adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).reshape(-1)
        seq = torch.cat([prompt[:, None], completion], 1)
        row_dup = 1 - sum(len(set(map(tuple, c.tolist()))) for c in completion.view(args.prompts, args.group, -1)) \
            / (args.prompts * args.group)
        row = dict.fromkeys(COLUMNS, float("nan"))
        row.update(step=step, reward=r.mean().item(), duplicates=row_dup)
        order = {"fused": (True,), "unfused": (False,), "both": (True, False) if step % 2 else (False, True)}
        grads = {}
        for fused in order[args.loss]:
            name = "fused" if fused else "unfused"
            opt.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            with PeakRSS() as mem:
                loss = loss_step(policy, seq, adv, fused, args.eps,
                                 args.prompts if args.sampler == "wor" else None)
                loss.backward()
            row[f"loss_s_{name}"] = time.perf_counter() - t0
            row[f"peak_mb_{name}"] = mem.delta
            if fused or args.loss == "unfused":
                row["objective"] = loss.detach().item()
            if args.loss == "both":
                grads[fused] = [p.grad.detach().clone() for p in params]
        if args.loss == "both":
            row["grad_rel_diff"] = max(float((a - b).norm() / b.norm().clamp_min(1e-30))
                                       for a, b in zip(grads[True], grads[False]))
            for p, gf in zip(params, grads[True]):  # the fused loss's gradient takes the step
                p.grad = gf
        opt.step()
        rows.append(row)
        log.writerow([row[k] for k in COLUMNS])
        fh.flush()
        done = int(30 * step / args.steps)
        sys.stdout.write(f"\r[{'#' * done}{'.' * (30 - done)}] step {step}/{args.steps} reward {row['reward']:.3f}"
                         + (f" grad rel diff {row['grad_rel_diff']:.1e}" if args.loss == "both" else ""))
        sys.stdout.flush()
    sys.stdout.write("\n")
    return rows


def plot(rows: List[Dict[str, float]], path: Path, args) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
    drive = "fused" if args.loss != "unfused" else "unfused"
    ax[0, 0].plot(steps, [r["reward"] for r in rows], color="C0")
    ax[0, 0].set(xlabel="step", ylabel="mean reward", ylim=(0, 1),
                 title=f"GRPO reward (seed {args.seed}; {drive} loss steps)")
    if args.loss == "both":
        ax[0, 1].semilogy(steps, [r["grad_rel_diff"] for r in rows], ".", color="C2", ms=3)
        ax[0, 1].set(xlabel="step", ylabel="max relative difference",
                     title="|g_fused - g_unfused| / |g_unfused|, worst parameter, same rollouts")
    else:
        ax[0, 1].axis("off")
    for j, (key, unit, title) in enumerate((("peak_mb", "MB", f"peak RSS growth of loss + backward (V = {args.vocab})"),
                                            ("loss_s", "s", "loss + backward time"))):
        for k, name in enumerate(("fused", "unfused")):
            ys = [r[f"{key}_{name}"] for r in rows]
            if any(y == y for y in ys):  # not all NaN: this loss ran
                ax[1, j].plot(steps, ys, label=name, color=f"C{k}", lw=0.8)
        ax[1, j].set(xlabel="step", ylabel=unit, title=title)
        ax[1, j].legend()
    for a in ax.flat:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def summarize(rows: List[Dict[str, float]]) -> Dict[str, float]:
    def median(key):
        vals = sorted(r[key] for r in rows if r[key] == r[key])
        return vals[len(vals) // 2] if vals else float("nan")

    tail = rows[-min(10, len(rows)):]
    out = {"steps": len(rows), "first_reward": sum(r["reward"] for r in rows[:10]) / len(rows[:10]),
           "final_reward": sum(r["reward"] for r in tail) / len(tail)}
    for key in ("peak_mb_fused", "peak_mb_unfused", "loss_s_fused", "loss_s_unfused"):
        out[f"median_{key}"] = median(key)
    out["mean_duplicates"] = sum(r["duplicates"] for r in rows) / len(rows)
    diffs = [r["grad_rel_diff"] for r in rows if r["grad_rel_diff"] == r["grad_rel_diff"]]
    out["max_grad_rel_diff"] = max(diffs) if diffs else float("nan")
    return out


def parse_args(argv=None):
    class Help(argparse.RawTextHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=Help)
    p.add_argument("--steps", type=int, default=150, help="GRPO steps")
    p.add_argument("--prompts", type=int, default=16, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="completions per prompt (the GRPO group)")
    p.add_argument("--length", type=int, default=8, help="completion length")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size (tokens >= 10 are distractors)")
    p.add_argument("--dim", type=int, default=64, help="model width")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--lr", type=float, default=LR, help="Adam's learning rate")
    p.add_argument("--eps", type=float, default=0.2, help="PPO clip range")
    p.add_argument("--loss", choices=("fused", "unfused", "both"), default="both",
                   help="both: the two losses on the same rollouts each step, the fused one steps")
    p.add_argument("--sampler", choices=("iid", "wor"), default="iid",
                   help="iid: GRPO (i.i.d. group, group-normalized advantages, PPO clip); wor: the group sampled "
                        "without replacement (stochastic beam search), the unordered-set estimator's weights")
    p.add_argument("--seed", type=int, default=0, help="initialization, prompts and sampling")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out-dir", type=Path, default=argparse.SUPPRESS,
                   help="where to write (runs/grpo/seed<S>-<loss> unless given: a run never overwrites another's)")
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
    if "out_dir" not in vars(args):  # one folder per configuration: a run never overwrites another's
        args.out_dir = Path("runs/grpo") / (f"seed{args.seed}-{args.loss}" + ("-wor" if args.sampler == "wor" else ""))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    missing = [m for m in ("matplotlib", "psutil") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"note: {' and '.join(missing)} not installed: no "
              + ", ".join((["curves.png"] if "matplotlib" in missing else []) + (["memory figures"] if "psutil" in
                                                                                   missing else []))
              + " (pip install 'fastgrad[examples]')")
    rows: List[Dict[str, float]] = []
    with open(args.out_dir / "log.csv", "w", newline="") as fh:
        log = csv.writer(fh)
        log.writerow(COLUMNS)
        try:
            rows.extend(train(args, log, fh))
        except KeyboardInterrupt:
            print("\ninterrupted: the summary and plot cover the steps done")
            rows.extend(read_log(args.out_dir / "log.csv"))
    if not rows:
        print("no step finished: nothing to summarize")
        return 1
    summary = {"command": "python -m fastgrad.examples.grpo " + " ".join(sys.argv[1:] if argv is None else argv),
               "machine": machine_record(), "args": {k: str(v) for k, v in vars(args).items()}, "result": summarize(rows)}
    res = summary["result"]
    print(f"reward {res['first_reward']:.3f} (first 10 steps) -> {res['final_reward']:.3f} (last 10)")
    for name in ("fused", "unfused"):
        if res[f"median_peak_mb_{name}"] == res[f"median_peak_mb_{name}"] or \
                res[f"median_loss_s_{name}"] == res[f"median_loss_s_{name}"]:
            print(f"{name}: median peak growth {res[f'median_peak_mb_{name}']:.0f} MB, median loss + backward "
                  f"{res[f'median_loss_s_{name}']:.3f} s")
    if args.loss == "both":
        print("gradients, fused vs unfused on the same rollouts: max relative difference "
              f"{res['max_grad_rel_diff']:.1e}")
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    wrote = ["log.csv", "summary.json"] + (["curves.png"] if plot(rows, args.out_dir / "curves.png", args) else [])
    print(f"wrote {', '.join(str(args.out_dir / w) for w in wrote)}")
    return 0


def read_log(path: Path) -> List[Dict[str, float]]:
    with open(path) as fh:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(fh)]


if __name__ == "__main__":
    sys.exit(main())
