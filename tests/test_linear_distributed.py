"""fastgrad under torch.distributed (gloo, 2 processes started here): a data-parallel step of the fused policy
loss equals the single-process step on the concatenated batch, given the global ``num_items``; samples drawn with a
rank-aware Philox offset are distinct across ranks and, together, the single-process draw."""

import pytest
import torch
import torch.distributed as dist

import fastgrad.functional as F

from . import _dist_worker as worker
from ._launch import run_ranks

pytestmark = pytest.mark.slow  # starts 2 gloo processes


def test_data_parallel_step_equals_single_process(tmp_path):
    assert dist.is_available() and dist.is_gloo_available()
    world = 2
    run_ranks("tests._dist_worker", world, tmp_path, timeout=240)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    hidden, weight, index, mask, adv, old, ref, logits = worker.global_inputs()
    single = worker.losses(hidden, weight, index, mask, adv, old, ref,
                           {"token": float(mask.sum()), "sequence": float(hidden.shape[0])})
    for name, (loss, gh, gw) in single.items():
        for r in ranks:  # after the all-reduce every rank holds the global loss and weight gradient
            torch.testing.assert_close(r[name][0], loss, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(r[name][2], gw, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(torch.cat([r[name][1] for r in ranks]), gh, atol=1e-7, rtol=1e-5)

    s0, s1 = ranks[0]["samples"], ranks[1]["samples"]
    assert not torch.equal(s0, s1)  # same rows, different counters: the ranks' draws differ
    both = F.sample_categorical(torch.cat([logits, logits]), 1, seed=123, offset=0)
    assert torch.equal(torch.cat([s0, s1], 1), both)
