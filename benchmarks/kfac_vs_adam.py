"""K-FAC against Adam on the main job: validation loss at equal steps, one seed each.

    python -m benchmarks.kfac_vs_adam                    # trains both (or resumes), then reports
    python -m benchmarks.kfac_vs_adam --run-root /tmp/full   # report runs trained elsewhere

Trains the main job (``tfngd-train`` defaults: digits U-Net, 3000 steps,
warm-up + cosine schedule) once with each configuration of ``CONFIGS`` in
``<run-root>/{adam,kfac,kfac_reduce}`` through :func:`trainers.train.train`; a finished
run directory is not retrained (it resumes at its end). Reads the
per-epoch validation losses (EMA weights, the fixed evaluation bank) and step
times back from the runs' TensorBoard logs and writes
``benchmarks/results/kfac_vs_adam_digits.json`` and a plot of validation loss
against steps. This is the equal-steps check of issue 3; the multi-seed,
tuned, wall-clock comparison is ``tfngd-bench`` (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import numpy as np
import tensorflow as tf

from tfngd import runs
from tfngd.config import TrainConfig

CONFIGS = {
    "adam": TrainConfig(optimizer="adam"),
    "kfac": TrainConfig(optimizer="kfac"),
    # K-FAC-reduce: the factorisation that meets the 1.3x step-time goal (docs/kfac.md).
    "kfac_reduce": TrainConfig(optimizer="kfac", kfac_approximation="reduce"),
}


def scalar_series(log_dir: str, tag: str) -> list[tuple[int, float]]:
    """``(step, value)`` pairs of a TF2 scalar summary in every event file under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(log_dir, size_guidance={"tensors": 0})
    accumulator.Reload()
    if tag not in accumulator.Tags()["tensors"]:
        return []
    return [(event.step, float(tf.make_ndarray(event.tensor_proto)))
            for event in accumulator.Tensors(tag)]


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first evaluated step whose loss is <= ``target`` (None: never)."""
    for step, value in curve:
        if value <= target:
            return step
    return None


def main():
    from trainers.train import train

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-root", default="runs/kfac_vs_adam")
    parser.add_argument("--output", default="benchmarks/results/kfac_vs_adam_digits.json")
    parser.add_argument("--plot", default="docs/images/kfac_vs_adam_digits.png")
    args = parser.parse_args()
    results = {}
    for name, config in CONFIGS.items():
        run_dir = os.path.join(args.run_root, name)
        previous = os.path.join(run_dir, runs.CONFIG_FILE)
        if os.path.exists(previous):
            config = TrainConfig.load(previous)  # report what that run was trained with
            expected = CONFIGS[name]
            if (config.optimizer, config.kfac_approximation_used) != (
                    expected.optimizer, expected.kfac_approximation_used):
                raise SystemExit(f"{run_dir} holds a {config.optimizer} "
                                 f"({config.kfac_approximation_used}) run, not {name}")
        summary = train(config, run_dir, export_root=None, sample_every_epochs=0, verbose=2)
        log_dir = runs.log_dir(run_dir)
        validation = scalar_series(os.path.join(log_dir, "validation"), "loss")
        step_times = scalar_series(os.path.join(log_dir, "train"), "step_time_seconds")
        results[name] = {
            "config": dataclasses.asdict(config),
            "validation_loss": validation,
            "final_validation_loss": validation[-1][1] if validation else None,
            "steps": summary["steps"],
            "median_epoch_step_seconds": float(np.median([v for _, v in step_times[1:]]))
            if len(step_times) > 1 else None,
            "first_epoch_step_seconds": step_times[0][1] if step_times else None,
        }
    target = results["adam"]["final_validation_loss"]
    for name in CONFIGS:
        if name != "adam":
            results[name]["steps_to_adam_final"] = steps_to_reach(
                results[name]["validation_loss"], target)
    results["adam_final_target"] = target
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)
    plot(results, args.plot)
    for name in CONFIGS:
        print(name, {k: v for k, v in results[name].items()
                     if k not in ("config", "validation_loss")})


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.6), dpi=120)
    for name in CONFIGS:
        steps, values = zip(*results[name]["validation_loss"], strict=True)
        axis.plot(steps, values, marker=".", label=name)
    axis.axhline(results["adam_final_target"], color="gray", lw=0.8, ls="--",
                 label="Adam final")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("validation loss (EMA, fixed bank)")
    axis.set_ylim(top=min(0.25, axis.get_ylim()[1]))
    axis.set_title("digits U-Net (main job), 3000 steps, seed 0")
    axis.legend()
    figure.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    figure.savefig(path)


if __name__ == "__main__":
    main()
