"""A vocabulary-parallel fused LM head over torch.distributed (gloo; 2, 3 and 4 processes started here, 3 with a
vocabulary that does not divide): every loss, statistic and gradient equals the single process's on the whole head
(fp32: 1e-5 absolute on log-probs and statistics, 1e-4 relative to the largest entry of the whole head's gradient;
bf16: the single process's bf16 result to bf16 rounding), every rank returns the same outputs, ``weight.grad`` is
the rank's shard of the whole gradient, ``reduce_hidden_grad=False`` leaves partial sums that add up, a DTensor head
sharded ``Shard(0)`` works without ``tp_group``, and the bytes the row statistics send do not grow with V."""

import pytest
import torch
import torch.distributed as dist

from . import _tp_worker as worker
from ._launch import run_ranks

pytestmark = pytest.mark.slow  # starts gloo processes


def _launch(world, tmp_path, **extra_env):
    run_ranks("tests._tp_worker", world, tmp_path, timeout=300, **extra_env)
    name = "grid" if extra_env.get("FASTGRAD_TP_GRID") == "1" else "tp"
    return [torch.load(tmp_path / f"{name}{r}.pt") for r in range(world)]


def _close_grad(shards, whole, tol):
    scale = float(whole.abs().max())
    assert float((torch.cat(shards) - whole).abs().max()) <= tol * scale


@pytest.mark.parametrize("world", [2, 3, 4])
def test_vocabulary_parallel_equals_the_whole_head(world, tmp_path):
    assert dist.is_available() and dist.is_gloo_available()
    ranks = _launch(world, tmp_path)
    assert [r["rows"] for r in ranks] == [worker.shard(worker.V_SMALL, k, world) for k in range(world)]

    single = worker.run_log_prob({})
    for r in ranks:  # the same outputs on every rank, equal to the whole head's
        for k, v in single["out"].items():
            torch.testing.assert_close(r["log_prob"]["out"][k], v, atol=1e-5, rtol=0)
        _close_grad([r["log_prob"]["dh"]], single["dh"], 1e-4)
    _close_grad([r["log_prob"]["dw"] for r in ranks], single["dw"], 1e-4)

    for name in worker.CASES:
        one = worker.run_policy(name, {})
        for r in ranks:
            got = r[name]
            torch.testing.assert_close(got["loss"], one["loss"], atol=1e-5, rtol=1e-5)
            for k, v in one["stats"].items():
                torch.testing.assert_close(got["stats"][k], v, atol=1e-5, rtol=1e-5, msg=f"{name} stats {k}")
            _close_grad([got["dh"]], one["dh"], 1e-4)
        _close_grad([r[name]["dw"] for r in ranks], one["dw"], 1e-4)
        _close_grad([r[name]["db"] for r in ranks], one["db"], 1e-4)

    one = worker.run_verl_head({})  # the verl adapter passes tp_group through
    for r in ranks:
        for a, b in zip(r["verl"]["out"], one["out"]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        _close_grad([r["verl"]["dh"]], one["dh"], 1e-4)
    _close_grad([r["verl"]["dw"] for r in ranks], one["dw"], 1e-4)

    bf = worker.run_policy("ppo_k3_entropy", {}, dtype=torch.bfloat16)
    for r in ranks:
        assert r["bf16"]["dh"].dtype == torch.bfloat16
        torch.testing.assert_close(r["bf16"]["loss"], bf["loss"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(r["bf16"]["stats"]["logp"], bf["stats"]["logp"], atol=1e-5, rtol=0)
        _close_grad([r["bf16"]["dh"].float()], bf["dh"].float(), 2e-2)
    _close_grad([r["bf16"]["dw"].float() for r in ranks], bf["dw"].float(), 2e-2)

    # reduce_hidden_grad=False: each rank's partial dX; their sum is the whole gradient
    _close_grad([sum(r["partial_dh"] for r in ranks)], worker.run_policy("gspo", {})["dh"], 1e-4)
    assert not torch.allclose(ranks[0]["partial_dh"], ranks[1]["partial_dh"])

    # a DTensor head sharded Shard(0): no tp_group, the same results, and DTensor gradients (gathered here)
    one = worker.run_policy("ppo_k3_entropy", {})
    for r in ranks:
        torch.testing.assert_close(r["dtensor"]["loss"], one["loss"], atol=1e-5, rtol=1e-5)
        _close_grad([r["dtensor"]["dh"]], one["dh"], 1e-4)
        _close_grad([r["dtensor"]["dw"]], one["dw"], 1e-4)
        _close_grad([r["dtensor"]["db"]], one["db"], 1e-4)

    for r in ranks:  # hidden requiring grad on some ranks only: every rank refuses, none waits
        assert "require grad on every rank" in r["mixed_grad_error"]

    # O(1) floats per token in V: the statistics' collectives send the same bytes at V = 50 and V = 500
    for r in ranks:
        assert r[f"bytes_V{worker.V_SMALL}"] == r[f"bytes_V{worker.V_LARGE}"] > 0


def test_data_parallel_by_tensor_parallel_grid(tmp_path):
    # 4 processes: 2-way data parallel x 2-way vocabulary parallel; the sum of the data-parallel ranks' losses is the
    # whole batch's loss, each rank's dX rows and dW shard are the whole problem's, the loss's collectives all ran on
    # the tensor-parallel group
    ranks = _launch(4, tmp_path, FASTGRAD_TP_GRID="1")
    loss, dh, dw = worker.grid_reference()
    for tp in (0, 1):
        total = sum(r["loss"] for k, r in enumerate(ranks) if k % 2 == tp)
        torch.testing.assert_close(total, loss, atol=1e-5, rtol=1e-5)
    for r in ranks:
        assert r["tp_only"]
        a, b = r["seq"]
        _close_grad([r["dh"]], dh[a:b], 1e-4)
        lo, hi = r["rows"]
        assert float((r["dw"] - dw[lo:hi]).abs().max()) <= 1e-4 * float(dw.abs().max())
