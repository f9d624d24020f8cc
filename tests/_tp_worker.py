"""One rank of the vocabulary-parallel check in tests/test_vocab_parallel.py (run as ``python -m tests._tp_worker
RANK WORLD PORT OUT``): every rank holds the same hidden states and token ids and its own rows of the LM head
(equal shards when V divides, else the last rank fewer, with ``vocab_start``), runs each case of :data:`CASES`
with ``tp_group``, and saves its outputs, gradients and the bytes its collectives sent."""
import os
import sys

import torch
import torch.distributed as dist

# before init_process_group: this imports torch._dynamo (see tests/_launch.py)
from tests._launch import assert_gloo_stopped, exit_skipping_shutdown

V_SMALL, V_LARGE = 50, 500  # the bytes sent per token must not grow with V


def global_inputs(V=V_SMALL, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    gw = torch.Generator().manual_seed(1)  # the head's own stream: the other inputs do not depend on V
    B, T, H = 3, 5, 8
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=gw) / H**0.5
    bias = torch.randn(V, generator=gw) * 0.1
    index = torch.randint(0, V_SMALL, (B, T), generator=g)
    index[0, -1] = -100
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[:, 0] = True
    adv = torch.randn(B, generator=g)
    old = -torch.rand(B, T, generator=g) * 3 - 1
    ref = -torch.rand(B, T, generator=g) * 3 - 1
    roll = old + 0.2 * torch.randn(B, T, generator=g)
    return (hidden.to(dtype), weight.to(dtype), bias.to(dtype), index, mask, adv, old, ref, roll)


def global_support(index, V, k=12):
    """A top-k-like sampling support per token (CSR over global ids, sorted): k ids including the target; the
    ignored token's row is empty."""
    g = torch.Generator().manual_seed(5)
    flat = index.reshape(-1)
    rows = []
    for t in flat.tolist():
        if t < 0:
            rows.append(torch.empty(0, dtype=torch.int64))
            continue
        others = torch.randperm(V, generator=g)[:k]
        rows.append(torch.unique(torch.cat([others[others != t][:k - 1], torch.tensor([t])])))
    crow = torch.tensor([0] + [len(r) for r in rows]).cumsum(0)
    return crow, torch.cat(rows)


def shard(V, rank, world):
    """Megatron's partition: ceil(V / world) rows per rank, the last rank the rest."""
    per = -(-V // world)
    start = min(V, rank * per)
    return start, min(V, start + per)


CASES = {
    "ppo_k3_entropy": dict(loss="ppo_clip", old=True, ref=True, beta=0.1, kl="k3", entropy_coef=0.02,
                           normalize="token", return_sum_pi_squared=True, return_lse=True),
    "gspo": dict(loss="gspo", old=True, normalize="sequence"),
    "sapo_seq_rollout": dict(loss="sapo", importance_sampling_level="sequence", old=True, normalize="sequence",
                             rollout_correction="sequence_mask", rollout_cap=1.5),
    "vespo_rollout": dict(loss="vespo", old=True, normalize="token", rollout_correction="token_truncate",
                          rollout_cap=1.2),
    "cispo_low_var_kl": dict(loss="cispo", old=True, ref=True, beta=0.2, kl="low_var_kl", temperature=0.7),
    "reinforce_T": dict(loss="reinforce", normalize="constant", temperature=1.3, entropy_coef=0.05),
    "support_replay": dict(loss="ppo_clip", old=True, ref=True, beta=0.1, entropy_coef=0.02, support=True,
                           return_sum_pi_squared=True, return_lse=True),
    "full_kl": dict(loss="ppo_clip", old=True, beta=0.2, kl="full", entropy_coef=0.01, temperature=0.8),
}


def run_policy(name, tp_kw, V=V_SMALL, dtype=torch.float32, rows=None, mesh=None):
    import fastgrad.functional as F

    hidden, weight, bias, index, mask, adv, old, ref, roll = global_inputs(V, dtype)
    if rows is not None:
        weight, bias = weight[rows[0]:rows[1]], bias[rows[0]:rows[1]]
    if mesh is not None:  # a DTensor head: distribute_tensor gives each rank its Shard(0) rows
        from torch.distributed.tensor import Shard, distribute_tensor

        weight, bias = (distribute_tensor(t, mesh, [Shard(0)]) for t in (weight, bias))
    kw = dict(CASES[name])
    use_old, use_ref = kw.pop("old", False), kw.pop("ref", False)
    if kw.get("rollout_correction"):
        kw["rollout_logp"] = roll
    if kw.pop("support", False):
        kw["support"] = global_support(index, V)
    if kw.get("kl") == "full":  # a reference head: its own stream, sharded as the policy's
        gr = torch.Generator().manual_seed(2)
        ref_w = (torch.randn(V, hidden.shape[-1], generator=gr) / hidden.shape[-1]**0.5).to(dtype)
        if rows is not None:
            ref_w = ref_w[rows[0]:rows[1]]
        kw.update(ref_hidden=hidden + 0.1, ref_weight=ref_w)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    b = bias.clone().requires_grad_(True)
    loss, stats = F.linear_policy_loss(h, w, index, adv, mask=mask, bias=b, old_logp=old if use_old else None,
                                       ref_logp=ref if use_ref else None, chunk_size=4, **kw, **tp_kw)
    loss.backward()
    if mesh is not None:  # the gradients are DTensors sharded as the head: gather them for the comparison
        assert type(w.grad).__name__ == "DTensor"
        return {"loss": loss.detach(), "dh": h.grad, "dw": w.grad.full_tensor(), "db": b.grad.full_tensor()}
    return {"loss": loss.detach(), "stats": {k: v for k, v in stats.items() if v is not None},
            "dh": h.grad, "dw": w.grad, "db": b.grad}


def run_log_prob(tp_kw, V=V_SMALL, dtype=torch.float32, rows=None, support=True):
    import fastgrad.functional as F

    hidden, weight, bias, index, *_ = global_inputs(V, dtype)
    if rows is not None:
        weight, bias = weight[rows[0]:rows[1]], bias[rows[0]:rows[1]]
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = F.linear_log_prob(h, w, index, bias=bias, temperature=0.9, return_entropy=True,
                            return_sum_pi_squared=True, return_lse=True, chunk_size=4, **tp_kw)
    if support:  # the same statistics renormalized over a sampling support
        out_s = F.linear_log_prob(h, w, index, bias=bias, temperature=0.9, return_entropy=True,
                                  return_sum_pi_squared=True, return_lse=True, chunk_size=4,
                                  support=global_support(index, V), **tp_kw)
        out = type(out)(*(a + b for a, b in zip(out, out_s)))
    g = torch.Generator().manual_seed(1)
    c = [torch.randn(out.logp.shape, generator=g) for _ in range(3)]
    (c[0] * out.logp + c[1] * out.entropy + c[2] * out.lse).sum().backward()
    return {"out": {k: getattr(out, k).detach() for k in out._fields}, "dh": h.grad, "dw": w.grad}


def run_verl_head(tp_kw, rows=None):
    """fastgrad.integrations.verl.FusedLinearForPPO with ``tp_group`` passed through (verl's head has no bias)."""
    from fastgrad.integrations.verl import FusedLinearForPPO

    hidden, weight, bias, index, *_ = global_inputs()
    index = index.clamp_min(0)  # verl's input ids are all real tokens
    if rows is not None:
        weight = weight[rows[0]:rows[1]]
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    logp, ent, sq = FusedLinearForPPO(chunk_size=4, **tp_kw)(h, w, index, 0.8, return_sum_pi_squared=True)
    (logp.sum() - 0.3 * ent.sum()).backward()
    return {"out": (logp.detach(), ent.detach(), sq), "dh": h.grad, "dw": w.grad}


def grid(rank, world, out):
    """A 2 x 2 grid: data parallel over {0, 2} and {1, 3} (two sequences each), tensor parallel over {0, 1} and
    {2, 3} (half the vocabulary each). The global token count before the loss, as DDP users do; the loss's
    collectives on the tensor-parallel group only; dW all-reduced over the data-parallel group."""
    from fastgrad.ops import _vocab_parallel as vp

    tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    dp, tp = rank // 2, rank % 2
    tp_g, dp_g = tp_groups[dp], dp_groups[tp]
    groups = []
    orig = vp.VocabParallel.all_reduce

    def recording(self, t, op):
        groups.append(self.group is tp_g)
        return orig(self, t, op)

    vp.VocabParallel.all_reduce = recording
    try:
        grid_step(rank, out, dp, tp, tp_g, dp_g, groups)
    finally:  # the patch holds tp_g: left in place, the group would outlive destroy_process_group
        vp.VocabParallel.all_reduce = orig


def grid_step(rank, out, dp, tp, tp_g, dp_g, groups):
    import fastgrad.functional as F

    hidden, weight, bias, index, mask, adv, old, ref, roll = global_inputs(V_SMALL)
    B = hidden.shape[0] + 1  # 4 sequences: the 3 of global_inputs and a copy of the first
    hidden, index, mask, adv, old = (torch.cat([t, t[:1]]) for t in (hidden, index, mask, adv, old))
    seq = slice(dp * B // 2, (dp + 1) * B // 2)
    rows = shard(V_SMALL, tp, 2)
    count = (mask[seq] & (index[seq] != -100)).sum().float()
    dist.all_reduce(count, group=dp_g)  # the global normalizer, before the loss
    h = hidden[seq].clone().requires_grad_(True)
    w = weight[rows[0]:rows[1]].clone().requires_grad_(True)
    loss, _ = F.linear_policy_loss(h, w, index[seq], adv[seq], mask=mask[seq], old_logp=old[seq], loss="ppo_clip",
                                   entropy_coef=0.01, num_items=float(count), tp_group=tp_g, vocab_start=rows[0],
                                   chunk_size=3)
    loss.backward()
    dist.all_reduce(w.grad, group=dp_g)  # DDP's share of the data-parallel gradient
    torch.save({"loss": loss.detach(), "dh": h.grad, "dw": w.grad, "rows": rows, "seq": (seq.start, seq.stop),
                "tp_only": all(groups) and len(groups) > 0}, os.path.join(out, f"grid{rank}.pt"))


def grid_reference():
    """The single process's loss and gradients on the whole batch and head of :func:`grid`."""
    import fastgrad.functional as F

    hidden, weight, bias, index, mask, adv, old, ref, roll = global_inputs(V_SMALL)
    hidden, index, mask, adv, old = (torch.cat([t, t[:1]]) for t in (hidden, index, mask, adv, old))
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss, _ = F.linear_policy_loss(h, w, index, adv, mask=mask, old_logp=old, loss="ppo_clip", entropy_coef=0.01)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def checks(rank, world, out):
    """The whole-group checks; their groups and patches end with this function (see main)."""
    from fastgrad.ops import _vocab_parallel as vp

    sent = []
    orig = vp.VocabParallel.all_reduce

    def counting(self, t, op):
        sent.append(t.numel() * t.element_size())
        return orig(self, t, op)

    vp.VocabParallel.all_reduce = counting
    try:
        checks_counted(rank, world, out, sent)
    finally:
        vp.VocabParallel.all_reduce = orig


def checks_counted(rank, world, out, sent):
    group = dist.new_group(list(range(world)))
    res = {}
    rows = shard(V_SMALL, rank, world)
    tp = dict(tp_group=group, vocab_start=rows[0])
    res["log_prob"] = run_log_prob(tp, rows=rows)
    for name in CASES:
        res[name] = run_policy(name, tp, rows=rows)
    res["verl"] = run_verl_head(tp, rows=rows)
    res["bf16"] = run_policy("ppo_k3_entropy", tp, dtype=torch.bfloat16, rows=rows)
    res["partial_dh"] = run_policy("gspo", dict(tp, reduce_hidden_grad=False), rows=rows)["dh"]
    from torch.distributed.device_mesh import init_device_mesh

    res["dtensor"] = run_policy("ppo_k3_entropy", {}, mesh=init_device_mesh("cpu", (world,)))
    # the bytes the row statistics send per call, at two vocabulary sizes (dX's all-reduce excluded: it is O(H))
    for V in (V_SMALL, V_LARGE):
        sent.clear()
        r = shard(V, rank, world)
        run_policy("ppo_k3_entropy", dict(tp_group=group, vocab_start=r[0], reduce_hidden_grad=False), V=V, rows=r)
        res[f"bytes_V{V}"] = sum(sent)
    # ranks that disagree on whether hidden needs a gradient: a ValueError on every rank, not a hang
    import fastgrad.functional as F

    hidden, weight, _, index, *_ = global_inputs()
    try:
        F.linear_log_prob(hidden.clone().requires_grad_(rank == 0), weight[rows[0]:rows[1]], index, tp_group=group,
                          vocab_start=rows[0])
        res["mixed_grad_error"] = ""
    except ValueError as e:
        res["mixed_grad_error"] = str(e)
    res["rows"] = rows
    torch.save(res, os.path.join(out, f"tp{rank}.pt"))


def main(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    # every group is created and used inside these functions, so fastgrad and this file hold none once they return
    on_grid = os.environ.get("FASTGRAD_TP_GRID") == "1"
    (grid if on_grid else checks)(rank, world, out)
    dist.barrier()
    dist.destroy_process_group()
    if on_grid:
        assert_gloo_stopped()
    else:  # torch's DTensor ops (the mesh case) keep the default group past destroy_process_group (torch 2.14.1)
        exit_skipping_shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
