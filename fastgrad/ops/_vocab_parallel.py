"""The fused LM head over a vocabulary split across a tensor-parallel group (Megatron's ``VocabParallelEmbedding``
convention, which verl and NeMo follow): each rank holds rows ``[vocab_start, vocab_start + V_local)`` of the head,
every rank holds the same hidden states and global token ids, and every rank gets the same outputs.

Per token block, each rank runs its row passes on its own ``[chunk, V_local]`` slab (relative to its own row max),
then two collectives of O(1) floats per token merge them: a MAX all-reduce of the row maxima, and one SUM
all-reduce of ``[sum exp, target logit (from the rank that owns it), entropy's and sum p^2's partial sums]``, each
rescaled to the global maximum. A sampling support (top-k / top-p replay) is split the same way, each rank keeping
the support's ids in its columns; the exact KL to a reference head split alike adds one SUM of the per-token KL's
partial sums. The gradient pass needs nothing more (each rank writes ``dL/dz`` for its own
columns from the global normalizer); ``dX`` is summed over the group once at the end (or left partial for
frameworks whose column-parallel layer reduces it). Logits never cross ranks.

The context (:func:`vocab_parallel`) is set by :mod:`fastgrad.functional.lm_head` around the op calls, and saved
by the ops' autograd for their backward: the ops' schemas carry no process group. Eager only (``torch.compile``
graph-breaks at the context).
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Optional

import torch

_STATE = threading.local()


@dataclass(frozen=True)
class VocabParallel:
    """``group``: the tensor-parallel ``ProcessGroup``; this rank's first global id and row count; the global V;
    whether ``dX`` is all-reduced over the group (``reduce_hidden_grad``)."""

    group: Any
    vocab_start: int
    v_local: int
    v_global: int
    reduce_hidden_grad: bool = True
    bytes_sent: list = None  # a test's counter of the payload each collective sends (None: not counted)

    def all_reduce(self, t: torch.Tensor, op) -> None:
        import torch.distributed as dist

        if self.bytes_sent is not None:
            self.bytes_sent.append(t.numel() * t.element_size())
        dist.all_reduce(t, op=op, group=self.group)


def current() -> Optional[VocabParallel]:
    return getattr(_STATE, "tp", None)


@contextlib.contextmanager
def vocab_parallel(tp: Optional[VocabParallel]):
    prev = current()
    _STATE.tp = tp
    try:
        yield
    finally:
        _STATE.tp = prev


def setup(group, v_local: int, vocab_start: Optional[int], reduce_hidden_grad: bool, device,
          grad_x: bool = False) -> VocabParallel:
    """Validate the partition (one all-gather of three ints per rank): contiguous, non-overlapping shards covering
    ``[0, V)``; ``vocab_start`` defaults to ``rank * v_local`` (Megatron's equal partition); ``grad_x`` (whether
    this rank's hidden states need a gradient, so its backward all-reduces dX) the same on every rank, else the
    ranks would wait on a collective some never start."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("tp_group needs an initialized torch.distributed process group")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    start = rank * v_local if vocab_start is None else vocab_start
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"vocab_start must be a non-negative int, got {vocab_start!r}")
    mine = torch.tensor([start, v_local, int(grad_x)], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    flags = {int(t[2]) for t in every}
    if reduce_hidden_grad and len(flags) > 1:
        raise ValueError("under tp_group, hidden must require grad on every rank or on none (the backward "
                         "all-reduces its gradient over the group)")
    spans = sorted((int(a), int(n)) for a, n in (t[:2].tolist() for t in every))
    at = 0
    for a, n in spans:
        if a != at:
            raise ValueError(f"the ranks' vocabulary shards must be contiguous from 0: got (vocab_start, rows) = "
                             f"{spans}; with a vocabulary that does not divide, pass each rank's vocab_start")
        at = a + n
    return VocabParallel(group, start, v_local, at, bool(reduce_hidden_grad))


def local_index(tp: VocabParallel, index: torch.Tensor):
    """Global ids -> (this rank's column, owned here)."""
    loc = index - tp.vocab_start
    owned = (loc >= 0) & (loc < tp.v_local)
    return torch.where(owned, loc, 0), owned


def local_support(tp: VocabParallel, crow: torch.Tensor, col: torch.Tensor):
    """A CSR sampling support over global ids -> its entries in this rank's columns, as local ids (rows kept, some
    empty here)."""
    keep = (col >= tp.vocab_start) & (col < tp.vocab_start + tp.v_local)
    rows = torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device), crow.diff())
    counts = torch.zeros(crow.numel() - 1, dtype=torch.int64, device=crow.device).index_add_(0, rows, keep.long())
    crow_l = torch.cat([crow.new_zeros(1), torch.cumsum(counts, 0)])
    return crow_l, (col[keep] - tp.vocab_start).contiguous()


def merge_stats(tp: VocabParallel, lp_l, norm_l, ent_l, sq_l, owned, want_entropy: bool, want_sum_sq: bool):
    """This rank's row statistics (relative to its own max) -> the whole vocabulary's, the same on every rank:
    ``(logp [M, S], norm [M, 2], entropy, sum p^2)`` as the row kernels return them."""
    import torch.distributed as dist

    mx_l, ls_l = norm_l[:, 0], norm_l[:, 1]
    mx = mx_l.clone()
    tp.all_reduce(mx, dist.ReduceOp.MAX)
    f = torch.exp(mx_l - mx)  # rescales this rank's sums to the global max
    s_l = torch.exp(ls_l)
    # a row with no column here (a sampling support that lies on other ranks) has mx_l = -inf and contributes 0
    here = s_l > 0
    parts = [f * s_l]
    if want_entropy:  # sum_j e^(z_j - mx) (z_j - mx) = f (s_l (ls_l - H_l) + s_l (mx_l - mx))
        parts.append(torch.where(here, f * s_l * ((ls_l - ent_l) + (mx_l - mx)), 0))
    if want_sum_sq:  # sum_j e^(2 (z_j - mx)) = f^2 sum p_l^2 s_l^2
        parts.append(torch.where(here, f * f * sq_l * s_l * s_l, 0))
    # the target's z - mx from the rank that owns it: (z_y - mx_l) + (mx_l - mx), z_y - mx_l = logp_l + ls_l
    target = torch.where(owned, (lp_l + ls_l[:, None]) + (mx_l - mx)[:, None], 0)
    buf = torch.cat([torch.stack(parts, 0).reshape(-1), target.reshape(-1)])
    tp.all_reduce(buf, dist.ReduceOp.SUM)
    M = mx.numel()
    k = len(parts)
    s, rest = buf[:M], buf[M:k * M]
    d_y = buf[k * M:].view_as(lp_l)
    ls = torch.log(s)
    logp = (d_y - ls[:, None]).clamp(max=0)
    ent = ls - rest[:M] / s if want_entropy else norm_l.new_empty(0)
    sq = rest[-M:] / (s * s) if want_sum_sq else norm_l.new_empty(0)
    return logp, torch.stack([mx, ls], 1), ent, sq
