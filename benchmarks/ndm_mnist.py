"""NDM vs DDPM on MNIST, trained with Adam and with K-FAC: bits/dim, few-step samples.

    taskset -c 0 python -m benchmarks.ndm_mnist

The image version of :mod:`benchmarks.ndm_checkerboard` (whose training,
bound and paired-comparison functions it reuses). Data: the offline MNIST
test split (``--data-dir``, default ``../shared/data/mnist``), which
:func:`tfngd.data.load_dataset` splits deterministically into its first 8,000
images (training) and last 2,000 (held out). Four runs with the same steps,
batch, learning-rate schedule, seeds and draws:

* ``ddpm`` (:class:`tfngd.ndm.NeuralDiffusionModel` with
  ``identity_transform=True``: DDPM with the same reverse network, trained on
  the same variational bound) and ``ndm`` (learned ``F_phi(x, t) = x + c(t)
  NN_phi(x, t)``, ``NN_phi`` a second U-Net of the same size);
* each with Adam and with :class:`tfngd.optimizers.KFAC` (both networks
  preconditioned; ``--optimizers`` picks).

Both networks are :func:`tfngd.networks.build_unet` (small by default, to fit
one CPU core); cosine schedule, ``T = 1000``, v parameterisation (``x_hat =
alpha z - sigma v``: the x0 parameterisation is badly conditioned for the
decoder at ``t = 0``, docs/ndm.md), EMA weights for evaluation.

Each run reports the NLL bound of ``--eval-examples`` held-out images in
bits/dim with a 95% interval over examples (``--timestep-samples`` strata over
``t``; :meth:`NeuralDiffusionModel.per_example_bound`), the paired difference
NDM - DDPM per optimizer on the same images and draws, the Frechet distance and
KID of ``--num-samples`` ancestral samples with ``--fd-steps`` respaced steps
against the held-out images (features of the project's MNIST classifier,
:class:`tfngd.bench.sample_quality.SampleEvaluator`; the same number of
training images gives the floor), and training time. Writes
``benchmarks/results/ndm_mnist.json`` (rewritten after every run) and
``docs/images/ndm_mnist_samples.png`` (one row per run, one column per
``--grid-steps`` step count, the same seed everywhere).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time

import numpy as np

from benchmarks.ndm_checkerboard import paired_comparisons, train_and_bound
from benchmarks.train_throughput import EpochTimer
from tfngd import data as data_lib
from tfngd import images as images_lib
from tfngd.bench.sample_quality import SampleEvaluator
from tfngd.networks import build_unet

RESULTS = os.path.join("benchmarks", "results", "ndm_mnist.json")
IMAGES = os.path.join("docs", "images")
RUNS = (("ddpm", False), ("ndm", True))


def unet_network(args, image_shape):
    """``name -> model``: the U-Net of the command line, for ``NN_phi`` and the reverse network."""
    return lambda name: build_unet(
        image_shape, base_channels=args.base_channels, channel_mults=args.channel_mults,
        num_res_blocks=args.num_res_blocks, attention_resolutions=args.attention_resolutions,
        groups=args.groups, name=name)


def run(args, label: str, learned: bool, optimizer_name: str, splits, evaluator):
    """Train, bound, sample and score one model; returns its report, bounds and grid samples."""
    timer = EpochTimer()
    result, model, per_example = train_and_bound(
        args, args.num_timesteps, label, learned, optimizer_name, splits,
        network=unet_network(args, splits.data_shape), callbacks=[timer])
    result["epoch_seconds"] = timer.epoch_seconds
    if len(timer.epoch_seconds) > 1:
        later = timer.epoch_seconds[1:]
        result["seconds_per_step_after_first_epoch"] = sum(later) / (
            len(later) * (args.steps // args.epochs))
    sample_quality = {}
    for steps in args.fd_steps:
        start = time.perf_counter()
        samples = model.sample(args.num_samples, seed=2, num_steps=steps).numpy()
        seconds = time.perf_counter() - start
        scores, skipped = evaluator(samples)
        sample_quality[str(steps)] = {**scores, "sampling_seconds": seconds,
                                      **({"skipped": skipped} if skipped else {})}
    result["samples"] = sample_quality
    grid = {}
    for steps in args.grid_steps:
        start = time.perf_counter()
        grid[steps] = model.sample(args.grid_samples, seed=3, num_steps=steps).numpy()
        result.setdefault("grid_sampling_seconds", {})[str(steps)] = time.perf_counter() - start
    bits = result["nll"]["bits_per_dim"]
    fd = {k: round(v.get("frechet_distance", float("nan")), 2)
          for k, v in sample_quality.items()}
    print(f"{label} {optimizer_name}: NLL bound {bits[0]:.4f} bits/dim [{bits[1]:.4f}, "
          f"{bits[2]:.4f}]; FD by steps {fd}; train {result['train_seconds']:.0f} s",
          flush=True)
    return result, per_example, grid


def plot_samples(rows: list, steps: list, path: str, reference: np.ndarray):
    """A grid of panels: one row per ``(title, {steps: images})``, one column per step count,
    and a last row of held-out images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(rows) + 1, len(steps),
                                figsize=(2.2 * len(steps), 2.35 * (len(rows) + 1)),
                                squeeze=False)
    for row, (title, samples) in enumerate(rows):
        for column, count in enumerate(steps):
            axis = axes[row, column]
            axis.imshow(images_lib.image_grid(samples[count], ncols=4)[..., 0], cmap="gray",
                        vmin=0, vmax=255, interpolation="nearest")
            axis.set_title(f"{title}, {count} steps", fontsize=7)
    for column in range(len(steps)):
        axis = axes[len(rows), column]
        if column == 0:
            axis.imshow(images_lib.image_grid(reference, ncols=4)[..., 0], cmap="gray", vmin=0,
                        vmax=255, interpolation="nearest")
            axis.set_title("held-out images", fontsize=7)
    for axis in axes.ravel():
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.path.join("..", "shared", "data", "mnist"),
                        help="MNIST IDX files (the test split alone is split 8,000 / 2,000)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=6, help="fit epochs (logging granularity)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--base-channels", type=int, default=8)
    parser.add_argument("--channel-mults", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--num-res-blocks", type=int, default=1)
    parser.add_argument("--attention-resolutions", type=int, nargs="*", default=[],
                        help="spatial sizes with self-attention (none by default)")
    parser.add_argument("--groups", type=int, default=4, help="GroupNormalization groups")
    parser.add_argument("--schedule", default="cosine")
    parser.add_argument("--num-timesteps", type=int, default=1000)
    parser.add_argument("--timestep-sampler", default="uniform",
                        choices=("uniform", "loss_second_moment"))
    parser.add_argument("--prediction-type", default="v", choices=("x0", "v"),
                        help="how the reverse network's output gives x_hat")
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--optimizers", nargs="+", default=["adam", "kfac"],
                        choices=("adam", "kfac"))
    parser.add_argument("--adam-lr", type=float, default=2e-3)
    parser.add_argument("--kfac-lr", type=float, default=0.1)
    parser.add_argument("--kfac-damping", type=float, default=1e-3)
    parser.add_argument("--kfac-approximation", default="per_example",
                        choices=("per_example", "expand", "reduce"),
                        help="KFAC(approximation=...): per_example is right for NDM's "
                             "differenced calls (docs/kfac.md section 2)")
    parser.add_argument("--kfac-inverse-every", type=int, default=50)
    parser.add_argument("--kfac-statistics-examples", type=int, default=16,
                        help="fold only this many examples of each batch into K-FAC's factors")
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--eval-examples", type=int, default=300,
                        help="held-out images whose bound is reported")
    parser.add_argument("--timestep-samples", type=int, default=50,
                        help="strata over t for the bound (capped at T - 1: the exact sum)")
    parser.add_argument("--num-samples", type=int, default=200,
                        help="samples scored by Frechet distance / KID")
    parser.add_argument("--fd-steps", type=int, nargs="*", default=[10, 50],
                        help="sampling step counts scored by Frechet distance / KID")
    parser.add_argument("--grid-steps", type=int, nargs="+", default=[10, 50, 1000],
                        help="sampling step counts shown in the figure")
    parser.add_argument("--grid-samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=RESULTS)
    parser.add_argument("--images-dir", default=IMAGES)
    args = parser.parse_args()
    if args.steps % args.epochs:
        parser.error("--steps must be a multiple of --epochs")
    if args.warmup_steps >= args.steps:
        parser.error("--warmup-steps must be smaller than --steps")
    args.timestep_samples = min(args.timestep_samples, args.num_timesteps - 1)

    splits = data_lib.load_dataset("mnist", data_dir=args.data_dir)
    held_out = splits.eval[:args.eval_examples]
    dims = int(np.prod(splits.data_shape))
    evaluator = SampleEvaluator("images", splits.eval, dataset="mnist", train=splits.train)
    floor, floor_skipped = evaluator.data_floor(args.num_samples)
    print(f"data floor ({args.num_samples} training images vs {len(splits.eval)} held-out): "
          f"{floor or floor_skipped}", flush=True)
    command = "taskset -c " + ",".join(map(str, sorted(os.sched_getaffinity(0)))) + \
        " python -m benchmarks.ndm_mnist " + shlex.join(sys.argv[1:])
    start = time.perf_counter()
    results, comparisons, rows = [], [], []
    bounds = {}
    report = {
        "benchmark": "ndm_mnist",
        "command": command.strip(),
        "arguments": vars(args),
        "data": f"MNIST from {args.data_dir} via tfngd.data.load_dataset('mnist'): "
                f"{len(splits.train)} training / {len(splits.eval)} held-out images in [-1, 1] "
                f"(the test split only, split first 80% / last 20%); the bound is on the first "
                f"{len(held_out)} held-out images",
        "bound": "negative ELBO of the discrete-time chain in bits/dim (discretised Gaussian "
                 "decoder over 256 levels, no x0 clipping, EMA weights); the T - 1 KL terms "
                 f"estimated with {args.timestep_samples} strata over t (one draw each); "
                 "intervals: 95% Student-t over held-out images; paired differences use the "
                 "same images and seeded draws",
        "sample_quality": "Frechet distance and KID between the features of num_samples "
                          "ancestral samples (EMA weights, x_hat clipped to [-1, 1], seed 2) "
                          "and of all held-out images, in the feature space of "
                          "tfngd/assets/classifiers/mnist.keras; data_floor: num_samples "
                          "training images scored the same way",
        "data_floor": floor if floor else {"skipped": floor_skipped},
        "ddpm_training": "NeuralDiffusionModel(identity_transform=True): DDPM with the same "
                         "reverse network and parameterisation, trained on the same variational "
                         "bound with the same optimizer, schedule, steps and draws",
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_affinity": sorted(os.sched_getaffinity(0))},
        "results": results,
        "paired_comparisons": comparisons,
    }
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    for optimizer_name in args.optimizers:
        for label, learned in RUNS:
            result, bounds[(label, optimizer_name)], grid = run(
                args, label, learned, optimizer_name, splits, evaluator)
            results.append(result)
            rows.append((f"{label.upper()} {optimizer_name}", grid))
            report["total_seconds"] = time.perf_counter() - start
            with open(args.output, "w") as handle:  # after every run: partial results survive
                json.dump(report, handle, indent=1)
        comparisons += paired_comparisons(
            {label: bounds[(label, optimizer_name)] for label, _ in RUNS}, "ddpm", dims,
            {"optimizer": optimizer_name})
    if len(args.optimizers) > 1:
        for label, _ in RUNS:
            comparisons += paired_comparisons(
                {name: bounds[(label, name)] for name in args.optimizers}, args.optimizers[0],
                dims, {"transform": label})
    os.makedirs(args.images_dir, exist_ok=True)
    figure = os.path.join(args.images_dir, "ndm_mnist_samples.png")
    plot_samples(rows, args.grid_steps, figure, splits.eval[:args.grid_samples])
    report["figure"] = figure
    report["total_seconds"] = time.perf_counter() - start
    with open(args.output, "w") as handle:
        json.dump(report, handle, indent=1)
    print(f"wrote {args.output} and {figure}; total {report['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
