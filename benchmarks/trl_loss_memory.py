"""Peak memory growth of one GRPO loss step (TRL 1.16's ``_compute_loss`` and its backward) with three LM heads:
fastgrad's (``fastgrad.integrations.trl.GRPOTrainer``), TRL's shipped chunked head (``add_fused_lm_head``, what
``trl.GRPOTrainer`` runs) and an unfused head (the model's logits, ``log_softmax``, gather and entropy in torch, as
TRL computed them before its fused head). The same tiny Qwen2 (vocabulary ``V``), the same batch.

    .venv/bin/python -m benchmarks.trl_loss_memory --out benchmarks/results/trl_loss_memory_cpu.json

Each head runs in its own process, with glibc's mmap threshold lowered so that a freed tensor leaves the resident
set at once; one warm-up step, then the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``) and the measured
step's growth is ``VmHWM - VmRSS`` before it. Linux only. The step's time is reported too (one step: indicative).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADS = ("fastgrad", "trl", "unfused")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _trainer(head: str, V: int, H: int, out_dir: str):
    import torch
    import trl

    from tests import _trl_tiny as tiny

    if head == "fastgrad":
        from fastgrad.integrations.trl import GRPOTrainer as cls
    elif head == "trl":
        cls = trl.GRPOTrainer
    else:
        class cls(trl.GRPOTrainer):  # noqa: N801 - the unfused head: whole logits, then torch
            def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                                   batch_size=None, compute_entropy=False, **kw):
                logits = model(input_ids=input_ids, attention_mask=attention_mask,
                               logits_to_keep=logits_to_keep + 1).logits[:, :-1] / self.temperature
                ls = torch.log_softmax(logits.float(), -1)
                logp = ls.gather(-1, input_ids[:, -logits_to_keep:, None])[..., 0]
                ent = -(ls.exp() * ls).sum(-1) if compute_entropy else None
                return logp, ent, None

    model = tiny.model(vocab_size=V, hidden=H)
    args = tiny.config(out_dir, loss_type="dapo", beta=0.0)
    return cls(model=model, reward_funcs=tiny.reward, args=args, train_dataset=tiny.dataset(),
               processing_class=tiny.tokenizer())


def _batch(B, P, K, V):
    import torch

    g = torch.Generator().manual_seed(0)
    completion_mask = torch.ones(B, K, dtype=torch.long)
    completion_mask[0, K // 2:] = 0
    return {"prompt_ids": torch.randint(3, V, (B, P), generator=g), "prompt_mask": torch.ones(B, P, dtype=torch.long),
            "completion_ids": torch.randint(3, V, (B, K), generator=g), "completion_mask": completion_mask,
            "advantages": torch.randn(B, generator=g),
            "old_per_token_logps": -10.4 + 0.2 * torch.randn(B, K, generator=g),
            "num_items_in_batch": completion_mask.sum().float()}


def one_head(head: str, V: int, H: int, B: int, P: int, K: int) -> dict:
    """Run in the head's own process: the measured loss step's peak RSS growth (MiB) and time."""
    import ctypes

    import torch

    with tempfile.TemporaryDirectory() as d:
        trainer = _trainer(head, V, H, d)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        inputs = _batch(B, P, K, V)

        def step():
            trainer.model.zero_grad(set_to_none=True)
            trainer._compute_loss(trainer.model, inputs).backward()

        step()  # warm-up: first-call allocations (thread pools, kernels' workspaces) are not the head's
        trainer.model.zero_grad(set_to_none=True)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size (VmHWM) to the current one
        rss0 = _status_kb("VmRSS")
        t0 = time.perf_counter()
        step()
        dt = time.perf_counter() - t0
        peak = _status_kb("VmHWM")
    return {"head": head, "peak_growth_mib": round((peak - rss0) / 1024, 1), "step_s": round(dt, 4),
            "path": getattr(trainer, "fastgrad_path", None), "threads": torch.get_num_threads()}


def run(V: int, H: int, B: int, P: int, K: int, heads=HEADS) -> dict:
    rows = []
    for head in heads:
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "row.json")
            env = dict(os.environ, PYTHONPATH=ROOT, MALLOC_MMAP_THRESHOLD_="65536", HF_HUB_OFFLINE="1")
            subprocess.run([sys.executable, "-m", "benchmarks.trl_loss_memory", "--head", head, "--row", out,
                            "--V", str(V), "--H", str(H), "--B", str(B), "--P", str(P), "--K", str(K)],
                           cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            rows.append(json.load(open(out)))
    logits_mib = B * K * V * 4 / 2**20
    for r in rows:
        r["vs_fp32_logits"] = round(r["peak_growth_mib"] / logits_mib, 2)
    return {"shape": {"V": V, "H": H, "B": B, "prompt": P, "completion": K}, "fp32_logits_mib": round(logits_mib, 1),
            "rows": rows}


def main(argv: Optional[List[str]] = None) -> Optional[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--V", type=int, default=32000)
    p.add_argument("--H", type=int, default=256)
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--P", type=int, default=16)
    p.add_argument("--K", type=int, default=128)
    p.add_argument("--out", default=None)
    p.add_argument("--head", default=None, help=argparse.SUPPRESS)
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.head is not None:
        with open(args.row, "w") as f:
            json.dump(one_head(args.head, args.V, args.H, args.B, args.P, args.K), f)
        return None
    from ._results import write_result

    result = write_result(argv, args, run(args.V, args.H, args.B, args.P, args.K))
    for r in result["rows"]:
        print(f"{r['head']:>9}: peak growth {r['peak_growth_mib']:8.1f} MiB ({r['vs_fp32_logits']}x the fp32 "
              f"logits), step {r['step_s']:.3f} s")
    return result


if __name__ == "__main__":
    main()
