"""The seed tutorial's discrete VAE on MNIST (Storchastic's "Discrete Gradient Estimation"), as a program.

    python -m fastgrad.examples.discrete_vae --method score-function --n-samples 10 --baseline batch_average --epochs 5

Duration: one epoch is 938 steps of batch 64; 5 epochs took 3 min 25 s on a 2-core AMD EPYC (``--threads 1`` is
sometimes faster than 2 on a shared machine). ``--max-steps 300 --test-size 1000`` is a quicker look.

At step 0, every ``--eval-every`` steps and at the last step it prints the training ELBO, the gradient variance over
``--eval-samples`` estimates of ``z.param_grads["probs"]`` and their squared bias against the exact gradient
(Expect), as the tutorial does, with the bias's Monte Carlo noise floor (variance / estimates: where an unbiased
estimator's measured bias sits). Writes ``log.csv`` (as it goes), ``summary.json`` and (with matplotlib)
``curves.png`` into ``--out-dir`` (default: a new folder per run under ``runs/discrete_vae/``, named after the
configuration) and names them when done; Ctrl-C stops training and still writes them for the steps done.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from torch.distributions import Bernoulli, OneHotCategorical

import fastgrad as storch

from .mnist import batches, load_mnist

METHODS = ("score-function", "gumbel-softmax", "straight-through", "expect", "arm", "disarm", "arms", "relax",
           "rebar", "sf-wor", "unordered-set", "rao-blackwell", "gumbel-softmax-wor", "gumbel-entmax",
           "gumbel-sparsemax", "indecater", "reinmax", "gumbel-rao", "double-cv", "rodeo", "disarm-iw", "vimco")
BINARY_METHODS = ("arm", "arms", "relax", "rebar", "double-cv", "rodeo")  # Bernoulli latents only
BERNOULLI_BY_DEFAULT = BINARY_METHODS + ("disarm",)  # disarm also takes --latents categorical (stick breaking)
CATEGORICAL_METHODS = ("gumbel-entmax", "gumbel-sparsemax", "disarm-iw")  # over the categories
SAMPLE_BASELINE_METHODS = ("arms", "double-cv", "rodeo", "vimco")  # the samples are each other's baselines
SET_METHODS = ("sf-wor", "unordered-set", "rao-blackwell", "gumbel-softmax-wor")  # --n-samples is the set size k
BASELINES = ("none", "batch_average", "moving_average")


class DiscreteVAE(nn.Module):
    """The tutorial's model: 784-512-256-(2x10) encoder, (2x10)-256-512-784 decoder."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 512)
        self.fc2 = nn.Linear(512, 256)
        self.fc3 = nn.Linear(256, 2 * 10)
        self.fc4 = nn.Linear(2 * 10, 256)
        self.fc5 = nn.Linear(256, 512)
        self.fc6 = nn.Linear(512, 784)

    def encode(self, x):
        h1 = self.fc1(x).relu()
        h2 = self.fc2(h1).relu()
        return self.fc3(h2)

    def decode(self, z):
        h3 = self.fc4(z).relu()
        h4 = self.fc5(h3).relu()
        return self.fc6(h4).sigmoid()


class BernoulliVAE(nn.Module):
    """``--latents bernoulli``: D Bernoulli latents (200 by default, the setting of the DisARM and RODEO papers),
    the same 784-512-256 encoder and 256-512-784 decoder around them."""

    def __init__(self, latent_dim: int = 200):
        super().__init__()
        self.latent_dim = latent_dim
        self.enc = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                                 nn.Linear(256, latent_dim))
        self.dec = nn.Sequential(nn.Linear(latent_dim, 256), nn.ReLU(), nn.Linear(256, 512), nn.ReLU(),
                                 nn.Linear(512, 784), nn.Sigmoid())

    def encode(self, x):
        return self.enc(x)

    def decode(self, z):
        return self.dec(z)


def bernoulli_story(method: storch.method.Method, model: BernoulliVAE, data: torch.Tensor, storch=storch):
    """The tutorial's story with Bernoulli latents and a uniform Bernoulli prior (``storch``: the module to run it
    with, as for :func:`generative_story`)."""
    x = storch.denote_independent(data.view(-1, 784), 0, "data")
    q = Bernoulli(logits=model.encode(x))
    z = method(q)
    prior = Bernoulli(probs=torch.full_like(q.probs, 0.5))
    storch.add_cost(torch.distributions.kl_divergence(q, prior).sum(-1), "kl-div")
    bce = torch.nn.BCELoss(reduction="none")(model.decode(z), x).sum(-1)
    storch.add_cost(bce, "reconstruction")
    return z


def vimco_story(method: storch.method.Method, model: nn.Module, data: torch.Tensor):
    """``--method vimco``: VIMCO trains the importance-weighted bound, so the story registers one cost per sample,
    ``-log w = BCE + log q(z) - log p(z)`` (the tutorial's KL term is the expectation of its last two terms)."""
    x = storch.denote_independent(data.view(-1, 784), 0, "data")
    # log q(z) - log p(z) written out (torch.distributions' argument validation refuses plate tensors)
    if isinstance(model, BernoulliVAE):
        logits = model.encode(x)
        z = method(Bernoulli(logits=logits))
        z_in = z
        log_ratio = -torch.nn.functional.binary_cross_entropy_with_logits(logits, z, reduction="none") \
            + math.log(2.0)
    else:
        logits = model.encode(x).reshape(-1, 2, 10)
        z = method(OneHotCategorical(probs=logits.softmax(dim=-1)))
        z_in = z.reshape(z.shape[:-2] + (2 * 10,))
        log_ratio = (z * logits.log_softmax(dim=-1)).sum(-1) + math.log(10.0)
    bce = torch.nn.BCELoss(reduction="none")(model.decode(z_in), x).sum(-1)
    storch.add_cost(bce + log_ratio.sum(-1), "neg-log-weight")
    return z


def story_for(method: storch.method.Method, model: nn.Module):
    """The step to run: the tutorial's story (categorical or Bernoulli latents), or VIMCO's."""
    if isinstance(method, storch.method.VIMCO):
        return vimco_story
    return bernoulli_story if isinstance(model, BernoulliVAE) else generative_story


def generative_story(method: storch.method.Method, model: DiscreteVAE, data: torch.Tensor, storch=storch):
    """The tutorial's code, unchanged but for ``import fastgrad as storch``. ``storch``: the module to run it
    with (benchmarks pass Storchastic itself: the one copy of the tutorial's step in the repository)."""
    x = storch.denote_independent(data.view(-1, 784), 0, "data")
    q_logits = model.encode(x)
    q_logits = q_logits.reshape(-1, 2, 10)
    q = OneHotCategorical(probs=q_logits.softmax(dim=-1))
    z = method(q)
    prior = OneHotCategorical(probs=torch.ones_like(q.probs) / 10.0)
    KL_div = torch.distributions.kl_divergence(q, prior).sum(-1)
    storch.add_cost(KL_div, "kl-div")
    z_in = z.reshape(z.shape[:-2] + (2 * 10,))
    reconstruction = model.decode(z_in)
    bce = torch.nn.BCELoss(reduction="none")(reconstruction, x).sum(-1)
    storch.add_cost(bce, "reconstruction")
    return z


# --method name -> its constructor (n: --n-samples, baseline: --baseline, D: --latent-dim)
_CONSTRUCTORS = {
    "score-function": lambda n, baseline, D: storch.method.ScoreFunction("z", n_samples=n, baseline_factory=baseline),
    "gumbel-softmax": lambda n, baseline, D: storch.method.GumbelSoftmax("z", n_samples=n),
    "straight-through": lambda n, baseline, D: storch.method.GumbelSoftmax("z", n_samples=n, straight_through=True),
    "expect": lambda n, baseline, D: storch.method.Expect("z"),
    "arm": lambda n, baseline, D: storch.method.ARM("z", n_samples=n),
    "disarm": lambda n, baseline, D: storch.method.DisARM("z", n_samples=n),
    "disarm-iw": lambda n, baseline, D: storch.method.DisARM("z", n_samples=n, importance_weighting=True),
    "vimco": lambda n, baseline, D: storch.method.VIMCO("z", n_samples=n),
    "arms": lambda n, baseline, D: storch.method.ARMS("z", n_samples=n),
    # Storchastic's default control network on the relaxed latents
    "relax": lambda n, baseline, D: storch.method.RELAX("z", n_samples=n, in_dim=D),
    "rebar": lambda n, baseline, D: storch.method.REBAR("z", n_samples=n),
    "sf-wor": lambda n, baseline, D: storch.method.ScoreFunctionWOR("z", k=n),
    "unordered-set": lambda n, baseline, D: storch.method.UnorderedSetEstimator("z", k=n),
    "rao-blackwell": lambda n, baseline, D: storch.method.RaoBlackwellSF("z", n),
    "gumbel-softmax-wor": lambda n, baseline, D: storch.method.UnorderedSetGumbelSoftmax("z", k=n),
    "gumbel-entmax": lambda n, baseline, D: storch.method.GumbelEntmax("z", n_samples=n),
    "gumbel-sparsemax": lambda n, baseline, D: storch.method.GumbelSparseMax("z", n_samples=n),
    "indecater": lambda n, baseline, D: storch.method.IndeCateR("z", n_samples=n),
    "reinmax": lambda n, baseline, D: storch.method.ReinMax("z", n_samples=n),
    "gumbel-rao": lambda n, baseline, D: storch.method.GumbelRao("z", n_samples=n),
    "double-cv": lambda n, baseline, D: storch.method.DoubleCV("z", n_samples=n),
    "rodeo": lambda n, baseline, D: storch.method.RODEO("z", n_samples=n),
}


def make_method(name: str, n_samples: int = 1, baseline: Optional[str] = None,
                latent_dim: int = 200) -> storch.method.Method:
    if name not in _CONSTRUCTORS:
        raise ValueError(f"method must be one of {METHODS}, got {name!r}")
    return _CONSTRUCTORS[name](n_samples, baseline, latent_dim)


def evaluate(method, model, data, optimizer, n_grads: int = 100) -> Dict[str, float]:
    """The tutorial's evaluation: ELBO, gradient variance and bias against the exact (Expect) gradient. With
    Bernoulli latents there is no exact gradient (2**200 configurations), and VIMCO estimates the gradient of
    another objective (the importance-weighted bound): the bias is not computed."""
    bernoulli = isinstance(model, BernoulliVAE)
    story, key = story_for(method, model), "logits" if bernoulli else "probs"
    expected_gradient = None
    if not bernoulli and not isinstance(method, storch.method.VIMCO):
        optimizer.zero_grad()
        z = generative_story(storch.method.Expect("z"), model, data)
        storch.backward()
        expected_gradient = z.param_grads["probs"]
    gradients = []
    for _ in range(n_grads):
        optimizer.zero_grad()
        z = story(method, model, data)
        elbo = storch.backward()
        gradients.append(z.param_grads[key])
    optimizer.zero_grad()
    gradients = storch.gather_samples(gradients, "gradients")
    bias = floor = None
    variance = storch.variance(gradients, "gradients")._tensor.item()
    if expected_gradient is not None:
        mean_gradient = storch.reduce_plates(gradients, "gradients")
        bias = storch.reduce_plates((mean_gradient - expected_gradient) ** 2).sum()._tensor.item()
        # E[bias] of an unbiased estimator: the variance of the mean of n_grads estimates (the same reductions)
        floor = variance / n_grads
    return {"elbo": elbo.item(), "grad_variance": variance, "grad_bias": bias, "grad_bias_floor": floor}


@torch.no_grad()
def exact_neg_elbo(model: DiscreteVAE, images: torch.Tensor, batch_size: int = 1000) -> float:
    """Exact -ELBO (KL + expected BCE over all 100 latent configurations), averaged over ``images``.

    The 100 configurations are decoded once and broadcast against the batch."""
    configs = storch.functional.enumerate_configurations(2, 10)  # [100, 2]
    dtype = next(model.parameters()).dtype
    z = torch.nn.functional.one_hot(configs, 10).to(dtype).view(100, 1, 20)
    rec = model.decode(z).clamp(1e-7, 1 - 1e-7)  # [100, 1, 784]
    log_r, log_1r = rec.log(), (1 - rec).log()
    total = 0.0
    for i in range(0, images.shape[0], batch_size):
        x = images[i: i + batch_size].view(-1, 784).to(dtype)
        logits = model.encode(x).view(-1, 2, 10)
        logq = storch.functional.enumerate_log_probs(logits)  # [100, B]
        bce = -(x @ log_r[:, 0].t() + (1 - x) @ log_1r[:, 0].t()).t()  # [100, B]
        q = logits.softmax(-1)
        kl = (q * (q.clamp_min(1e-30).log() + math.log(10.0))).sum((-1, -2))
        total += float((kl + (logq.exp() * bce).sum(0)).sum())
    return total / images.shape[0]


@torch.no_grad()
def sampled_neg_elbo(model: BernoulliVAE, images: torch.Tensor, samples: int = 10, batch_size: int = 1000) -> float:
    """-ELBO with Bernoulli latents: the KL exactly, the expected BCE by ``samples`` draws per image (unbiased)."""
    total = 0.0
    for i in range(0, images.shape[0], batch_size):
        x = images[i: i + batch_size].view(-1, 784)
        q = Bernoulli(logits=model.encode(x))
        kl = torch.distributions.kl_divergence(q, Bernoulli(probs=torch.full_like(q.probs, 0.5))).sum(-1)
        z = q.sample((samples,))
        bce = torch.nn.functional.binary_cross_entropy(model.decode(z), x.expand(samples, -1, -1),
                                                       reduction="none").sum(-1).mean(0)
        total += float((kl + bce).sum())
    return total / images.shape[0]


def _title(args: argparse.Namespace) -> str:
    t = f"{args.method}, n={args.n_samples}" + (f", baseline {args.baseline}" if args.baseline else "")
    latents = f"{args.latent_dim} Bernoulli latents" if args.latents == "bernoulli" else "2 x 10 categorical latents"
    return f"{t}, {latents}, seed {args.seed}"


def _plot(rows: List[dict], evals: List[dict], path: Path, args: Optional[argparse.Namespace] = None) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    if args is not None:
        fig.suptitle(_title(args))
    ax[0].plot([r["step"] for r in rows], [r["elbo"] for r in rows], lw=0.5)
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("training -ELBO")
    if evals:
        ax[1].semilogy([e["step"] for e in evals], [max(e["grad_variance"], 1e-30) for e in evals], "o-")
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("gradient variance")
    if evals and evals[0]["grad_bias"] is not None:
        steps = [e["step"] for e in evals]
        ax[2].semilogy(steps, [max(e["grad_bias"], 1e-30) for e in evals], "o-", label="measured")
        ax[2].semilogy(steps, [max(e["grad_bias_floor"], 1e-30) for e in evals], "k--", lw=0.8,
                       label="noise floor (variance / estimates)")
        ax[2].legend(fontsize=8)
    else:
        ax[2].text(0.5, 0.5, "no exact gradient to compare with\n(Bernoulli latents or the importance-weighted bound)",
                   ha="center", va="center", transform=ax[2].transAxes, fontsize=9)
    ax[2].set_xlabel("step")
    ax[2].set_ylabel("squared gradient bias (vs Expect)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse and check every option before any work (a mistake ends with a usage message, exit status 2)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--method", choices=METHODS, default="score-function", help="the gradient estimator")
    ap.add_argument("--n-samples", type=int, default=1, help="samples per step (not for expect)")
    ap.add_argument("--baseline", choices=BASELINES, default=None, help="score-function only")
    ap.add_argument("--epochs", type=int, default=5, help="passes over the 60000 training images")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (quick runs)")
    ap.add_argument("--batch-size", type=int, default=64, help="images per step")
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    ap.add_argument("--eval-every", type=int, default=None,
                    help="steps between gradient evaluations (None: 300 as the tutorial, or a tenth of a run "
                    "shorter than 3000 steps)")
    ap.add_argument("--eval-samples", type=int, default=100, help="gradient estimates per evaluation (>= 2)")
    ap.add_argument("--test-size", type=int, default=10000, help="test images for the exact -ELBO (0: skip)")
    ap.add_argument("--seed", type=int, default=0, help="initialization, data order and samples")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (None: torch's choice)")
    ap.add_argument("--latents", choices=("categorical", "bernoulli"), default=None,
                    help="2x10 categorical (the tutorial) or --latent-dim Bernoulli latents; default: bernoulli "
                    "for the binary estimators and disarm, else categorical")
    ap.add_argument("--latent-dim", type=int, default=200, help="Bernoulli latents (with --latents bernoulli)")
    ap.add_argument("--data-dir", default=None, help="folder with the MNIST IDX files or a torchvision root "
                    "(None: the copy vendored in the repository, or FASTGRAD_MNIST)")
    ap.add_argument("--out-dir", default=None, help="None: a new folder runs/discrete_vae/<method>-n<N>"
                    "[-<baseline>][-bernoulli<D>]-seed<S>[-<k>] (never an earlier run's)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.n_samples < 1:
        ap.error("--n-samples must be >= 1")
    if args.epochs < 1 or args.batch_size < 1 or (args.eval_every is not None and args.eval_every < 1):
        ap.error("--epochs, --batch-size and --eval-every must be >= 1")
    if args.max_steps is not None and args.max_steps < 1:
        ap.error("--max-steps must be >= 1")
    if args.eval_samples < 2:
        ap.error("--eval-samples must be >= 2 (the gradient variance needs two estimates)")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        ap.error("--lr must be a positive number")
    if args.test_size < 0:
        ap.error("--test-size must be >= 0")
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be >= 1")
    if args.baseline is not None and args.method != "score-function":
        ap.error(f"--baseline applies to --method score-function only, not {args.method}")
    if args.method == "expect" and args.n_samples != 1:
        ap.error("--n-samples does not apply to --method expect (it enumerates all 100 configurations)")
    if args.latents is None:
        args.latents = "bernoulli" if args.method in BERNOULLI_BY_DEFAULT else "categorical"
    if args.method in BINARY_METHODS and args.latents != "bernoulli":
        ap.error(f"--method {args.method} needs --latents bernoulli (it estimates gradients of binary latents)")
    if args.method == "expect" and args.latents == "bernoulli":
        ap.error("--method expect cannot enumerate 2**latent-dim Bernoulli configurations: use --latents "
                 "categorical")
    if args.latent_dim < 1:
        ap.error("--latent-dim must be >= 1")
    if args.method in CATEGORICAL_METHODS and args.latents != "categorical":
        ap.error(f"--method {args.method} needs --latents categorical (it works over the categories)")
    if args.method in SET_METHODS and args.n_samples < 2:
        ap.error(f"--method {args.method} needs --n-samples >= 2 (the size of the set sampled without "
                 "replacement)")
    if args.method in SAMPLE_BASELINE_METHODS and args.n_samples < 2:
        ap.error(f"--method {args.method} needs --n-samples >= 2 (its samples are each other's baselines)")
    if args.baseline == "batch_average" and args.n_samples < 2:
        ap.error("--baseline batch_average needs --n-samples >= 2")
    args.overwrite = args.out_dir is not None
    if args.out_dir is None:  # a new folder: a run never overwrites (or mixes its files with) an earlier one
        name = f"{args.method}-n{args.n_samples}" + (f"-{args.baseline}" if args.baseline else "") + \
            (f"-bernoulli{args.latent_dim}" if args.latents == "bernoulli" else "") + f"-seed{args.seed}"
        base = Path("runs") / "discrete_vae" / name
        out, k = base, 1
        while out.exists() and any(out.iterdir()):
            k += 1
            out = base.with_name(f"{name}-{k}")
        args.out_dir = str(out)
    return args


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    try:
        images, _ = load_mnist("train", args.data_dir)
    except FileNotFoundError as e:
        raise SystemExit(f"discrete_vae: {e}") from None
    method = make_method(args.method, args.n_samples, args.baseline, args.latent_dim)
    model = BernoulliVAE(args.latent_dim) if args.latents == "bernoulli" else DiscreteVAE()
    # the estimator's own parameters (RELAX/REBAR's control variate, trained on the gradient's variance) too
    optimizer = torch.optim.Adam(list(model.parameters()) + list(method.parameters()), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    steps_per_epoch = math.ceil(images.shape[0] / args.batch_size)
    total = steps_per_epoch * args.epochs
    if args.max_steps is not None:
        total = min(args.max_steps, total)
    if args.eval_every is None:
        args.eval_every = 300 if total >= 3000 else max(1, total // 10)
    if args.overwrite and (out / "log.csv").exists():
        print(f"--out-dir {out} holds an earlier run: overwriting it")
    if importlib.util.find_spec("matplotlib") is None:
        print("note: matplotlib is not installed: no curves.png (pip install 'fastgrad[examples]')")
    bar = tqdm(total=total, disable=args.no_progress or tqdm is None, file=sys.stderr) if tqdm else None
    rows, evals = [], []
    step = 0
    t0 = time.perf_counter()
    log_file = open(out / "log.csv", "w", newline="")
    log = csv.DictWriter(log_file, fieldnames=["step", "epoch", "elbo"])
    log.writeheader()
    interrupted = False
    try:
        _train(args, method, model, optimizer, images, gen, total, bar, rows, evals, log, log_file)
    except KeyboardInterrupt:
        interrupted = True
        storch.reset()
        print(f"\ninterrupted after {len(rows)} steps: summarizing those", file=sys.stderr)
    finally:
        log_file.close()
        if bar:
            bar.close()
    if not rows:
        raise SystemExit(130 if interrupted else 1)
    step = len(rows)
    train_time = time.perf_counter() - t0
    summary = {"args": vars(args), "steps": step, "train_seconds": train_time, "interrupted": interrupted,
               "first_elbo": rows[0]["elbo"] if rows else None,
               "last_elbo_mean100": sum(r["elbo"] for r in rows[-100:]) / max(1, len(rows[-100:]))}
    if args.test_size and not interrupted:
        test, _ = load_mnist("test", args.data_dir)
        if isinstance(model, BernoulliVAE):
            summary["test_neg_elbo"] = sampled_neg_elbo(model, test[: args.test_size])
            how = "KL exact, reconstruction by 10 samples"
        else:
            summary["test_neg_elbo"] = exact_neg_elbo(model, test[: args.test_size])
            how = "exact"
        print(f"Test -ELBO ({how}, {min(args.test_size, test.shape[0])} images): {summary['test_neg_elbo']:.2f}")
    summary["evaluations"] = evals
    summary["plot"] = _plot(rows, evals, out / "curves.png", args)
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    files = ["log.csv", "summary.json"] + (["curves.png"] if summary["plot"] else [])
    print(f"wrote {', '.join(str(out / f) for f in files)}")
    return summary


def _train(args, method, model, optimizer, images, gen, total, bar, rows, evals, log, log_file) -> None:
    step = 0
    for epoch in range(args.epochs):
        if step >= total:
            break
        print("Epoch:" + str(epoch + 1))
        for data in batches(images, args.batch_size, gen):
            if step >= total:
                break
            optimizer.zero_grad()
            story_for(method, model)(method, model, data)
            elbo = storch.backward()
            optimizer.step()
            rows.append({"step": step, "epoch": epoch + 1, "elbo": elbo.item()})
            log.writerow(rows[-1])
            if step % 50 == 0:
                log_file.flush()
            if step % args.eval_every == 0 or step == total - 1:
                e = evaluate(method, model, data, optimizer, args.eval_samples)
                e.update(step=step, epoch=epoch + 1)
                evals.append(e)
                msg = (f"Training ELBO {e['elbo']} Gradient variance {e['grad_variance']} "
                       f"Gradient bias {e['grad_bias']}")
                (bar.write(msg) if bar else print(msg))
            step += 1
            if bar:
                bar.update(1)
                bar.set_postfix(elbo=f"{elbo.item():.1f}")


if __name__ == "__main__":
    main()
