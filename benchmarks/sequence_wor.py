"""What sampling a group of sequences without replacement buys a policy gradient, at equal samples, on a task small
enough to enumerate: an autoregressive bigram policy over ``V`` tokens, sequences of ``L`` tokens (``V**L`` of
them), a random reward per sequence, groups of ``k`` completions per prompt.

    .venv/bin/python -m benchmarks.sequence_wor --out benchmarks/results/sequence_wor_cpu.json

Per ``k`` and policy sharpness (the logits' scale: a trained policy is peaked), over ``--draws`` groups:

* the mean squared error of each estimator of ``grad E[r]`` against the exact gradient (by enumeration), relative
  to the exact gradient's squared norm: RLOO on an i.i.d. group (unbiased), GRPO on an i.i.d. group (biased),
  and the unordered-set estimator on a group drawn without replacement by
  :func:`fastgrad.functional.stochastic_beam_search` (unbiased; Kool, van Hoof & Welling 2020);
* the fraction of an i.i.d. group's completions that duplicate another of the group;
* the expected reward of the distinct completions per sampled completion (what a verifier scores that is new).
"""
from __future__ import annotations

import argparse
import itertools
from typing import List, Optional

import torch

import fastgrad.functional as F

from ._results import write_result


def _policy(V: int, scale: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(V + 1, V, generator=g, dtype=torch.float64) * scale  # row V: the prompt token
    return table


def _enumerate(table, V: int, L: int):
    seqs = torch.tensor(list(itertools.product(range(V), repeat=L)))  # [S, L]
    prev = torch.cat([torch.full((seqs.shape[0], 1), V), seqs[:, :-1]], 1)
    ls = torch.log_softmax(table, -1)
    lp = ls[prev, seqs].sum(1)
    # d log p(seq) / d table, per sequence: sum over positions of onehot - softmax on the row used
    p_rows = torch.softmax(table, -1)
    grads = torch.zeros(seqs.shape[0], *table.shape, dtype=torch.float64)
    for t in range(L):
        rows = prev[:, t]
        oh = torch.nn.functional.one_hot(seqs[:, t], V).double() - p_rows[rows]
        grads[torch.arange(seqs.shape[0]), rows] += oh
    return seqs, lp, grads.reshape(seqs.shape[0], -1)


def _ids(tokens, V):
    out = torch.zeros(tokens.shape[:-1], dtype=torch.int64)
    for t in range(tokens.shape[-1]):
        out = out * V + tokens[..., t]
    return out


def study(V: int, L: int, ks: List[int], scales: List[float], draws: int, seed: int) -> dict:
    rows = []
    for scale in scales:
        table = _policy(V, scale, seed)
        seqs, lp, grads = _enumerate(table, V, L)
        p = lp.exp()
        r = torch.rand(seqs.shape[0], generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
        exact = (p * r) @ grads
        norm2 = float(exact @ exact)
        step = lambda tok: table[tok[:, -1]]  # noqa: E731
        for k in ks:
            prefix = torch.full((draws * k, 1), V)
            iid = F.stochastic_beam_search(step, prefix, 1, L, seed=seed + 7 * k).tokens[:, 0, 1:]  # ancestral
            iid = _ids(iid, V).view(draws, k)
            rr = r[iid]
            g = grads[iid]                                                  # [draws, k, P]
            rloo = ((rr - (rr.sum(1, keepdim=True) - rr) / (k - 1))[..., None] * g).mean(1)
            grpo_a = (rr - rr.mean(1, keepdim=True)) / (rr.std(1, keepdim=True) + 1e-6)
            grpo = (grpo_a[..., None] * g).mean(1)
            wor = F.stochastic_beam_search(step, torch.full((draws, 1), V), k, L, seed=seed + 11 * k)
            wid = _ids(wor.tokens[:, :, 1:], V).t()                          # [k, draws]
            log_p = lp[wid].clone().requires_grad_(True)
            sur = F.unordered_set_surrogate(log_p, r[wid], exact=k <= 7)
            (adv,) = torch.autograd.grad(sur.sum(), log_p)                 # p(s) R(S, s) (r(s) - b(S, s))
            us = (adv.t()[..., None] * grads[wid.t()]).sum(1)
            dup = 1 - torch.tensor([len(set(row)) for row in iid.tolist()], dtype=torch.float64).mean() / k
            distinct_reward_iid = torch.tensor([sum(float(r[i]) for i in set(row)) for row in iid.tolist()]).mean() / k
            distinct_reward_wor = r[wid].sum(0).mean() / k
            row = {"scale": scale, "k": k, "max_p": round(float(p.max()), 4),
                   "rel_mse": {name: float(((est - exact) ** 2).sum(1).mean()) / norm2
                               for name, est in (("rloo_iid", rloo), ("grpo_iid", grpo), ("unordered_set_wor", us))},
                   "iid_duplicate_fraction": round(float(dup), 4),
                   "new_reward_per_completion": {"iid": round(float(distinct_reward_iid), 4),
                                                 "wor": round(float(distinct_reward_wor), 4)}}
            row["mse_ratio_rloo_over_wor"] = round(row["rel_mse"]["rloo_iid"] / row["rel_mse"]["unordered_set_wor"], 2)
            rows.append(row)
    return {"V": V, "L": L, "sequences": V**L, "draws": draws, "rows": rows}


def main(argv: Optional[List[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--V", type=int, default=4)
    ap.add_argument("--L", type=int, default=3)
    ap.add_argument("--k", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0])
    ap.add_argument("--draws", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    result = write_result(argv, args, study(args.V, args.L, args.k, args.scales, args.draws, args.seed))
    for r in result["rows"]:
        m = r["rel_mse"]
        print(f"scale {r['scale']:.0f} (max p {r['max_p']:.3f}) k {r['k']}: rel MSE RLOO iid {m['rloo_iid']:.3f}, "
              f"GRPO iid {m['grpo_iid']:.3f}, unordered set WOR {m['unordered_set_wor']:.3f} "
              f"(RLOO / WOR {r['mse_ratio_rloo_over_wor']}x); iid duplicates {r['iid_duplicate_fraction']:.2f}; "
              f"new reward per completion iid {r['new_reward_per_completion']['iid']:.3f} "
              f"wor {r['new_reward_per_completion']['wor']:.3f}")
    return result


if __name__ == "__main__":
    main()
