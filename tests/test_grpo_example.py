"""The GRPO example (fastgrad/examples/grpo.py): its fused and unfused loss steps agree, and the program runs."""
import csv
import json

import pytest
import torch

from fastgrad.examples import grpo


def test_fused_and_unfused_steps_agree():
    torch.manual_seed(0)
    policy = grpo.Policy(vocab=300, dim=16, layers=1, heads=2, max_len=6)
    prompt = torch.randint(0, 10, (4,)).repeat_interleave(3)
    completion = grpo.generate(policy, prompt, 5, seed=1)
    assert completion.shape == (12, 5) and int(completion.min()) >= 0 and int(completion.max()) < 300
    r = grpo.reward(prompt, completion)
    assert bool(((r >= 0) & (r <= 1)).all())
    adv = torch.randn(12)
    seq = torch.cat([prompt[:, None], completion], 1)
    grads = []
    for fused in (True, False):
        policy.zero_grad(set_to_none=True)
        loss = grpo.loss_step(policy, seq, adv, fused, 0.2)
        loss.backward()
        grads.append((loss.detach().item(), [p.grad.clone() for p in policy.parameters()]))
    assert abs(grads[0][0] - grads[1][0]) < 1e-6
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_without_replacement_group_and_set_advantages():
    """--sampler wor: each prompt's group is distinct; the set advantages are the unordered-set surrogate's
    derivative w.r.t. log p, so the REINFORCE loss with them has that surrogate's gradient (fused = unfused)."""
    torch.manual_seed(0)
    policy = grpo.Policy(vocab=40, dim=16, layers=1, heads=2, max_len=5)
    prompt = torch.tensor([1, 7, 3])
    completion, log_p = grpo.generate_set(policy, prompt, 4, 4, seed=2)
    assert completion.shape == (12, 4) and log_p.shape == (3, 4)
    for c in completion.view(3, 4, 4):
        assert len({tuple(x) for x in c.tolist()}) == 4
    seq = torch.cat([prompt.repeat_interleave(4)[:, None], completion], 1)
    # log p recomputed from the policy equals the beam search's
    logp = torch.log_softmax(policy.lm_head(policy.hidden(seq[:, :-1])).double(), -1)
    torch.testing.assert_close(logp.gather(-1, seq[:, 1:, None]).sum((1, 2)).view(3, 4), log_p, atol=1e-5, rtol=0)
    r = grpo.reward(prompt.repeat_interleave(4), completion).view(3, 4)
    adv = grpo.set_advantages(log_p, r)
    lp = log_p.t().clone().requires_grad_(True)
    (want,) = torch.autograd.grad(grpo.F.unordered_set_surrogate(lp, r.t().double()).sum(), lp)
    torch.testing.assert_close(adv.double(), want.t().reshape(-1), atol=1e-6, rtol=0)
    grads = []
    for fused in (True, False):
        policy.zero_grad(set_to_none=True)
        grpo.loss_step(policy, seq, adv, fused, 0.2, prompts=3).backward()
        grads.append([p.grad.clone() for p in policy.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_reward_counts_up_from_the_prompt():
    prompt = torch.tensor([3, 8])
    completion = torch.tensor([[4, 5, 6, 0], [9, 0, 2, 2]])
    torch.testing.assert_close(grpo.reward(prompt, completion), torch.tensor([0.75, 0.75]))  # 3 of 4 each: 4 5 6 (7); 9 0 (1) 2


@pytest.mark.slow  # an end-to-end run of the example program
def test_program_runs_and_writes_its_files(tmp_path, capsys):
    rc = grpo.main(["--steps", "3", "--prompts", "2", "--group", "2", "--length", "3", "--vocab", "64", "--dim", "8",
                    "--heads", "2", "--layers", "1", "--out-dir", str(tmp_path)])
    assert rc == 0
    with open(tmp_path / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    for r in rows:  # --loss both: the two losses on the same rollouts, every step
        assert float(r["grad_rel_diff"]) < 1e-4
        assert float(r["loss_s_fused"]) > 0 and float(r["loss_s_unfused"]) > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0 <= summary["result"]["final_reward"] <= 1 and summary["result"]["max_grad_rel_diff"] < 1e-4
    assert summary["command"].startswith("python -m fastgrad.examples.grpo") and summary["machine"]["cpu"]
    out = capsys.readouterr().out
    assert "wrote" in out and "max relative difference" in out


def test_default_out_dir_names_the_configuration():
    assert str(grpo.parse_args(["--seed", "3", "--loss", "fused"]).out_dir).endswith("seed3-fused")
    assert str(grpo.parse_args(["--sampler", "wor"]).out_dir).endswith("seed0-both-wor")


@pytest.mark.parametrize("argv,message", [(["--group", "1"], "--group must be >= 2"),
                                          (["--vocab", "5"], "--vocab must be >= 10"),
                                          (["--dim", "10", "--heads", "4"], "multiple of --heads")])
def test_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        grpo.parse_args(argv)
    assert message in capsys.readouterr().err
