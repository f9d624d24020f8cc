"""Does the GRPO example learn on every seed? Runs ``python -m fastgrad.examples.grpo --loss fused`` (the fused loss
steps; ``--loss both`` follows the same trajectory) for each seed, two processes at a time, and records each
seed's mean reward over its first and last 10 steps.

    python benchmarks/grpo_seeds.py --seeds 0,1,2,3,4 --out benchmarks/results/grpo_seeds_cpu.json --plot

The example's task (count up from a prompt digit, V = 32000) starts near reward 0.05; "learns" here means the
last-10-step reward is at least 3 times the first-10-step reward.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._results import write_result  # noqa: E402
from fastgrad.examples import grpo  # noqa: E402


def run_seed(seed: int, steps: int, folder: str) -> dict:
    out = os.path.join(folder, f"seed{seed}")
    subprocess.run([sys.executable, "-m", "fastgrad.examples.grpo", "--loss", "fused", "--seed", str(seed),
                    "--steps", str(steps), "--threads", "1", "--out-dir", out], check=True,
                   stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "summary.json")) as f:
        res = json.load(f)["result"]
    rewards = [r["reward"] for r in grpo.read_log(Path(out) / "log.csv")]
    return {"seed": seed, "first_reward": res["first_reward"], "final_reward": res["final_reward"],
            "learned": res["final_reward"] >= 3 * res["first_reward"], "rewards": rewards}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in result["seeds"]:
        ax.plot(range(1, len(r["rewards"]) + 1), r["rewards"], lw=0.8, label=f"seed {r['seed']}")
    ax.set(xlabel="step", ylabel="mean reward", ylim=(0, 1),
           title="GRPO example (fused LM-head loss, V = 32000): every seed")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", action="store_true")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as folder, ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda s: run_seed(s, args.steps, folder), seeds))
    for r in rows:
        print(f"seed {r['seed']}: reward {r['first_reward']:.3f} -> {r['final_reward']:.3f}"
              f"{'' if r['learned'] else '  (did not learn)'}")
    return write_result(argv, args, {"seeds": rows, "all_learned": all(r["learned"] for r in rows)}, plot)


if __name__ == "__main__":
    main()
