"""One rank of the data-parallel check in tests/test_linear_distributed.py (run as ``python -m tests._dist_worker
RANK WORLD PORT OUT``): each rank takes its share of the sequences, passes the global normalizer (``num_items``,
found by an all_reduce of the local counts before the loss: no collective inside fastgrad), backpropagates, and
all-reduces the weight gradient as DDP does; it draws its samples with a rank-aware Philox offset."""
import os
import sys

import torch
import torch.distributed as dist

# before init_process_group: this imports torch._dynamo (see tests/_launch.py)
from tests._launch import assert_gloo_stopped


def global_inputs():
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 4, 6, 8, 50
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5
    index = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.75
    mask[:, 0] = True
    adv = torch.randn(B, generator=g)
    old = -torch.rand(B, T, generator=g) * 4
    ref = -torch.rand(B, T, generator=g) * 4
    logits = torch.randn(8, V, generator=g)  # rows a rank samples from (a multiple of 4: see below)
    return hidden, weight, index, mask, adv, old, ref, logits


LOSSES = {
    "token": dict(loss="ppo_clip", normalize="token", beta=0.1, entropy_coef=0.01),
    "sequence": dict(loss="ppo_clip", normalize="sequence", beta=0.05),
}


def losses(hidden, weight, index, mask, adv, old, ref, num_items):
    import fastgrad.functional as F

    out = {}
    for name, kw in LOSSES.items():
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        loss, _ = F.linear_policy_loss(h, w, index, adv, mask=mask, old_logp=old, ref_logp=ref,
                                       num_items=num_items[name], **kw)
        loss.backward()
        out[name] = (loss.detach(), h.grad, w.grad)
    return out


def main(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import fastgrad.functional as F

    hidden, weight, index, mask, adv, old, ref, logits = global_inputs()
    per = hidden.shape[0] // world
    sl = slice(rank * per, (rank + 1) * per)
    counts = torch.tensor([float(mask[sl].sum()), float(per)])
    dist.all_reduce(counts)  # the global normalizers, before the loss
    res = losses(hidden[sl], weight, index[sl], mask[sl], adv[sl], old[sl], ref[sl],
                 {"token": float(counts[0]), "sequence": float(counts[1])})
    saved = {}
    for name, (loss, gh, gw) in res.items():
        dist.all_reduce(loss)
        dist.all_reduce(gw)  # DDP's gradient all-reduce (sum: each rank's loss is its share of the global one)
        saved[name] = (loss, gh, gw)
    # the same rows on every rank, a rank-aware offset: distinct draws, and together the single-process draw. The
    # offset counts Philox counters of 4 draws each: rank * R // 4 for R rows (R a multiple of 4), one sample each
    R = logits.shape[0]
    saved["samples"] = F.sample_categorical(logits, 1, seed=123, offset=rank * R // 4)
    torch.save(saved, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    assert_gloo_stopped()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
