"""NDM vs DDPM on the 2-D checkerboard: the NLL bound, samples and the learned transform.

    taskset -c 1 python -m benchmarks.ndm_checkerboard

For each chain length ``T`` (default 20 and 1000, cosine schedule), trains for
the same number of steps, batch, learning-rate schedule and draws, with the
same reverse network (the residual MLP of :func:`tfngd.networks.build_mlp_denoiser`,
x0 parameterisation by default):

* ``ddpm``: :class:`tfngd.ndm.NeuralDiffusionModel` with ``identity_transform=True``,
  i.e. DDPM, trained on the same variational bound;
* ``ndm``: the learned transform ``F_phi(x, t) = x + c(t) NN_phi(x, t)`` (a second
  MLP of the same size), trained jointly on the bound;

both with Adam; and, on the first ``T``, ``ndm_kfac`` (NDM with
:class:`tfngd.optimizers.KFAC`; ``--no-kfac`` skips it). Each model reports the
NLL bound of held-out data (nats/dim of a continuous density, and bits/dim,
with 95% intervals over examples; see
:meth:`NeuralDiffusionModel.per_example_bound`), the paired difference to DDPM
on the same points, the sliced Wasserstein distance of ancestral samples to
held-out data (full chain and a few respaced steps), how far ``F_phi`` moved
the data, and training time. Writes ``benchmarks/results/ndm_checkerboard.json``
and, under ``docs/images/``, ``ndm_checkerboard_transform.png`` (``F_phi(x, t)``
of held-out points at several ``t``, one row per ``T``) and
``ndm_checkerboard_samples.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import keras
import numpy as np

from tfngd import data as data_lib
from tfngd import metrics
from tfngd.gaussian_diffusion import GaussianDiffusion
from tfngd.ndm import NeuralDiffusionModel, summarize_bound
from tfngd.networks import build_mlp_denoiser
from tfngd.optimizers import KFAC

RESULTS = os.path.join("benchmarks", "results", "ndm_checkerboard.json")
IMAGES = os.path.join("docs", "images")


def mlp_network(args):
    """``name -> model``: the residual MLP (``--hidden-units`` x ``--num-blocks``), 2-D."""
    return lambda name: build_mlp_denoiser(2, args.hidden_units, args.num_blocks, name=name)


def build(args, num_timesteps: int, learned: bool, seed: int,
          network=None) -> NeuralDiffusionModel:
    """NDM (``learned``) or DDPM; ``network(name)`` builds ``NN_phi`` and the reverse network
    (default :func:`mlp_network`)."""
    keras.utils.set_random_seed(seed)
    network = mlp_network(args) if network is None else network
    transform = network("transform")
    reverse = network("reverse")
    diffusion = GaussianDiffusion(args.schedule, num_timesteps,
                                  prediction_type=args.prediction_type)
    return NeuralDiffusionModel(transform, reverse, diffusion, identity_transform=not learned,
                                timestep_sampler=args.timestep_sampler, ema_decay=args.ema_decay,
                                seed=seed)


def make_optimizer(args, name: str):
    """Adam or K-FAC with a linear warm-up and a cosine decay to 10% of the peak rate."""
    peak = args.adam_lr if name == "adam" else args.kfac_lr
    rate = keras.optimizers.schedules.CosineDecay(
        0.0, args.steps - args.warmup_steps, alpha=0.1, warmup_target=peak,
        warmup_steps=args.warmup_steps)
    if name == "adam":
        return keras.optimizers.Adam(rate)
    return KFAC(learning_rate=rate, damping=args.kfac_damping,
                approximation=args.kfac_approximation,
                inverse_every=args.kfac_inverse_every,
                statistics_examples=args.kfac_statistics_examples, seed=0)


def train_and_bound(args, num_timesteps: int, label: str, learned: bool, optimizer_name: str,
                    splits, network=None,
                    callbacks=None) -> tuple[dict, NeuralDiffusionModel, np.ndarray]:
    """Train one model and bound ``args.eval_examples`` held-out examples.

    ``network(name)`` builds both networks (default :func:`mlp_network`);
    ``callbacks`` go to ``fit``. Returns its report (no sample metrics), the
    model and its per-example bounds (nats).
    """
    model = build(args, num_timesteps, learned, seed=args.seed, network=network)
    model.compile(optimizer=make_optimizer(args, optimizer_name))
    batches = data_lib.training_batches(splits.train, args.batch_size, seed=args.seed)
    start = time.perf_counter()
    history = model.fit(batches, epochs=args.epochs, steps_per_epoch=args.steps // args.epochs,
                        verbose=0, callbacks=callbacks)
    train_seconds = time.perf_counter() - start
    held_out = splits.eval[:args.eval_examples]
    strata = min(args.timestep_samples, num_timesteps - 1)
    start = time.perf_counter()
    per_example = model.per_example_bound(held_out, seed=1, timestep_samples=strata)
    nll_seconds = time.perf_counter() - start
    dims = model.data_dims
    result = {
        "model": label,
        "num_timesteps": num_timesteps,
        "transform": "learned" if learned else "identity (DDPM)",
        "optimizer": optimizer_name,
        # The trained networks' variables (model.trainable_variables also lists some of a
        # frozen transform's EMA copy for U-Nets).
        "trainable_parameters": int(sum(np.prod(v.shape) for network in model.trained_networks
                                        for v in network.trainable_variables)),
        "train_seconds": train_seconds,
        "nll_seconds": nll_seconds,
        "epoch_loss_nats_per_dim": [float(v) for v in history.history["loss"]],
        "epoch_terms_nats_per_dim": {key: [float(v) for v in history.history[key]]
                                     for key in ("prior", "diffusion", "reconstruction")},
        "nll": {**{key: (list(value) if isinstance(value, tuple) else value)
                   for key, value in summarize_bound(per_example, dims).items()},
                "timestep_samples": strata},
        "transform_displacement": transform_displacement(model, held_out, num_timesteps),
    }
    if optimizer_name == "kfac":
        result["kfac_skipped_updates"] = int(model.optimizer.skipped_updates.numpy())
    return result, model, per_example


def run(args, num_timesteps: int, label: str, learned: bool, optimizer_name: str,
        splits) -> tuple[dict, NeuralDiffusionModel, np.ndarray, dict]:
    """Train one model; returns its report, the model, its per-example bounds and samples."""
    result, model, per_example = train_and_bound(args, num_timesteps, label, learned,
                                                 optimizer_name, splits)
    held_out = splits.eval[:args.eval_examples]
    sample_metrics, samples = {}, {}
    for steps in sorted({num_timesteps, min(args.few_steps, num_timesteps)}, reverse=True):
        samples[steps] = model.sample(args.num_samples, seed=2, num_steps=steps).numpy()
        sample_metrics[str(steps)] = {
            "sliced_wasserstein": metrics.sliced_wasserstein(samples[steps], held_out, seed=0),
            "finite_fraction": float(np.isfinite(samples[steps]).all(axis=1).mean()),
        }
    result["samples"] = sample_metrics
    train_seconds = result["train_seconds"]
    nats, bits = result["nll"]["nats_per_dim"], result["nll"]["bits_per_dim"]
    print(f"T={num_timesteps} {label}: NLL bound {nats[0]:.3f} nats/dim [{nats[1]:.3f}, "
          f"{nats[2]:.3f}] = {bits[0]:.3f} bits/dim [{bits[1]:.3f}, {bits[2]:.3f}]; sliced W2 "
          f"{ {k: round(v['sliced_wasserstein'], 3) for k, v in sample_metrics.items()} }; "
          f"train {train_seconds:.0f} s", flush=True)
    return result, model, per_example, samples


def paired_comparisons(bounds: dict, baseline: str, dims: int, context: dict) -> list:
    """Each model's bound minus ``baseline``'s on the same examples and seeded draws.

    ``bounds`` maps labels to per-example bounds in nats; returns one record per
    other label (``context`` keys first) with the paired mean and 95% interval.
    """
    comparisons = []
    for label in bounds:
        if label == baseline:
            continue
        difference = (bounds[label] - bounds[baseline]) / dims
        interval = metrics.mean_confidence_interval(difference)
        comparisons.append({
            **context, "model": label,
            f"minus_{baseline}_nats_per_dim": list(interval),
            f"minus_{baseline}_bits_per_dim": [v / math.log(2.0) for v in interval],
            f"beats_{baseline}": bool(interval[2] < 0.0),
        })
        where = " ".join(f"{key}={value}" for key, value in context.items())
        print(f"{where} {label} - {baseline}: {interval[0]:+.3f} nats/dim "
              f"[{interval[1]:+.3f}, {interval[2]:+.3f}] (paired)", flush=True)
    return comparisons


def transform_displacement(model, points, num_timesteps) -> dict:
    """Mean ``|F(x, t) - x|`` (EMA weights) at a few ``t``: how far the transform moved the data."""
    return {str(t): float(np.abs(model.transform(points, t, use_ema=True).numpy()
                                 - points).mean())
            for t in plotted_timesteps(num_timesteps)}


def plotted_timesteps(num_timesteps) -> list:
    return sorted({0, num_timesteps // 4, num_timesteps // 2, 3 * num_timesteps // 4,
                   num_timesteps - 1})


def plot_transforms(models: dict, points, path):
    """One row per chain length: ``F_phi(x, t)`` of held-out points, coloured by data square."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colour = (np.floor(points[:, 0] / 2) + 2 * np.floor(points[:, 1] / 2)) % 8
    rows = sorted(models)
    columns = max(len(plotted_timesteps(t)) for t in rows)
    figure, axes = plt.subplots(len(rows), columns, figsize=(2.8 * columns, 2.9 * len(rows)),
                                squeeze=False)
    for row, num_timesteps in enumerate(rows):
        model = models[num_timesteps]
        for column, t in enumerate(plotted_timesteps(num_timesteps)):
            axis = axes[row, column]
            transformed = model.transform(points, t, use_ema=True).numpy()
            axis.scatter(transformed[:, 0], transformed[:, 1], c=colour, s=1, cmap="tab10")
            axis.set_title(f"T={num_timesteps}: F(x, {t}), c={model.transform_scale_table[t]:.2f}",
                           fontsize=8)
            axis.set_aspect("equal")
            axis.set_xlim(-5, 5)
            axis.set_ylim(-5, 5)
            axis.tick_params(labelsize=6)
    figure.suptitle("NDM (Adam) on the checkerboard: learned F_phi(x, t) of held-out data",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def plot_samples(panels: list, path):
    """A row of scatter plots: ``(title, points)`` panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.8))
    for axis, (title, points) in zip(axes, panels, strict=True):
        axis.scatter(points[:, 0], points[:, 1], s=0.5, c="k")
        axis.set_title(title, fontsize=8)
        axis.set_aspect("equal")
        axis.set_xlim(-5, 5)
        axis.set_ylim(-5, 5)
        axis.tick_params(labelsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--epochs", type=int, default=6, help="fit epochs (logging granularity)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--hidden-units", type=int, default=128)
    parser.add_argument("--num-blocks", type=int, default=3)
    parser.add_argument("--schedule", default="cosine")
    parser.add_argument("--num-timesteps", type=int, nargs="+", default=[20, 1000],
                        help="chain lengths T; K-FAC runs on the first")
    parser.add_argument("--timestep-sampler", default="loss_second_moment")
    parser.add_argument("--prediction-type", default="x0", choices=("x0", "v"),
                        help="how the reverse network's output gives x_hat")
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--adam-lr", type=float, default=4e-3)
    parser.add_argument("--kfac-lr", type=float, default=0.1)
    parser.add_argument("--kfac-damping", type=float, default=1e-3)
    parser.add_argument("--kfac-approximation", default="per_example",
                        choices=("per_example", "expand", "reduce"),
                        help="KFAC(approximation=...): per_example is right for NDM's "
                             "differenced calls (docs/kfac.md section 2)")
    parser.add_argument("--kfac-inverse-every", type=int, default=10)
    parser.add_argument("--kfac-statistics-examples", type=int, default=None,
                        help="fold only this many examples of each batch into K-FAC's factors")
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--eval-examples", type=int, default=2000)
    parser.add_argument("--timestep-samples", type=int, default=50,
                        help="strata over t for the bound (capped at T - 1: the exact sum)")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--few-steps", type=int, default=20,
                        help="also sample with this many respaced steps")
    parser.add_argument("--no-kfac", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=RESULTS)
    parser.add_argument("--images-dir", default=IMAGES)
    args = parser.parse_args()
    if args.steps % args.epochs:
        parser.error("--steps must be a multiple of --epochs")

    splits = data_lib.load_dataset("checkerboard", num_eval=max(args.eval_examples,
                                                                args.num_samples), seed=args.seed)
    held_out = splits.eval[:args.eval_examples]
    start = time.perf_counter()
    results, comparisons, transforms, panels = [], [], {}, [("held-out data",
                                                             held_out[:args.num_samples])]
    for index, num_timesteps in enumerate(args.num_timesteps):
        runs = [("ddpm", False, "adam"), ("ndm", True, "adam")]
        if index == 0 and not args.no_kfac:
            runs.append(("ndm_kfac", True, "kfac"))
        bounds = {}
        for label, learned, optimizer_name in runs:
            result, model, bounds[label], samples = run(args, num_timesteps, label, learned,
                                                        optimizer_name, splits)
            results.append(result)
            if label == "ndm":
                transforms[num_timesteps] = model
            if optimizer_name == "adam":
                panels += [(f"T={num_timesteps} {label}, {k} steps", v)
                           for k, v in samples.items()]
        comparisons += paired_comparisons(bounds, "ddpm", held_out.shape[1],
                                          {"num_timesteps": num_timesteps})

    os.makedirs(args.images_dir, exist_ok=True)
    plot_transforms(transforms, held_out, os.path.join(args.images_dir,
                                                       "ndm_checkerboard_transform.png"))
    plot_samples(panels, os.path.join(args.images_dir, "ndm_checkerboard_samples.png"))
    report = {
        "benchmark": "ndm_checkerboard",
        "command": "taskset -c 1 python -m benchmarks.ndm_checkerboard",
        "arguments": vars(args),
        "data": "tfngd.data checkerboard (continuous 2-D, coordinates in [-4, 4]); held-out "
                "split of the same generator; true differential entropy log(32) / 2 = "
                f"{math.log(32.0) / 2:.4f} nats/dim",
        "bound": "negative ELBO of the discrete-time chain (nats/dim of a continuous density; "
                 "bits/dim = nats/dim / ln 2), Gaussian decoder density, no x0 clipping, EMA "
                 "weights; KL terms stratified over t (exact sum when timestep_samples = T - 1); "
                 "intervals: 95% Student-t over held-out examples",
        "ddpm_training": "NeuralDiffusionModel(identity_transform=True): DDPM with the same "
                         "reverse network and parameterisation, trained on the same variational "
                         "bound with the same optimizer, schedule and steps",
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_affinity": sorted(os.sched_getaffinity(0))},
        "total_seconds": time.perf_counter() - start,
        "results": results,
        "paired_comparisons": comparisons,
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(report, handle, indent=1)
    print(f"wrote {args.output}; total {report['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
