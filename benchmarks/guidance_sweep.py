"""Classifier-free guidance on a class-conditional model: accuracy and quality against w.

    tfngd-train --conditional --optimizer adam --run-dir runs/digits_cond
    python -m benchmarks.guidance_sweep --run-dir runs/digits_cond

For every guidance scale ``w`` it draws ``--per-class`` samples of each class (one
``DiffusionModel.sample`` call, DDIM with ``--steps`` steps from the EMA weights, label
``k`` for sample ``k // per_class``; the same seed for every ``w``, so the runs share their
starting noise) and scores them with the benchmark's fixed feature classifier
(:mod:`tfngd.feature_classifier`, the one behind the Frechet distances of ``tfngd-bench``):

* ``accuracy``: the fraction of samples that the classifier assigns to the class they were
  drawn for, with a 95 % Student-t interval over the classes
  (:func:`tfngd.metrics.mean_confidence_interval` of the per-class accuracies);
* ``frechet_distance`` / ``kid`` of all samples against the held-out split
  (:class:`tfngd.bench.sample_quality.SampleEvaluator`; the classes are balanced in both);
* ``class_spread``: the mean over classes of the trace of the within-class feature
  covariance, relative to the same quantity on the training images: it falls below 1 when
  guidance trades diversity for fidelity.

``w = 0`` is the unconditional model (the null label), ``w = 1`` the plain conditional
model, ``w > 1`` the guided one (Ho & Salimans 2022; :func:`tfngd.samplers.denoiser_fn`).
Writes JSON (``--output``), a plot of the metrics against ``w`` and one image per run with a
class-per-row grid for a few scales (``--grid-scales``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from tfngd import data, images, metrics, runs
from tfngd.bench.sample_quality import SampleEvaluator
from tfngd.feature_classifier import FeatureExtractor, load_report


def class_spread(features: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Mean over classes of ``trace(Cov[features | class])``."""
    return float(np.mean([np.trace(np.cov(features[labels == k], rowvar=False))
                          for k in range(num_classes)]))


def guided_samples(model, per_class: int, scale: float, seed: int, steps: int) -> tuple:
    """``(samples [num_classes * per_class, ...], labels, seconds)`` for guidance ``scale``."""
    labels = np.repeat(np.arange(model.num_classes), per_class).astype(np.int32)
    start = time.perf_counter()
    samples = model.sample(len(labels), seed=seed, num_steps=steps, sampler="ddim",
                           label=labels, guidance_scale=scale).numpy()
    return samples, labels, time.perf_counter() - start


def score(samples, labels, extractor, evaluator, num_classes, train_spread) -> dict:
    features, logits = extractor.features_and_logits(np.clip(samples, -1.0, 1.0))
    hits = np.argmax(logits, axis=1) == labels
    per_class = [float(hits[labels == k].mean()) for k in range(num_classes)]
    mean, low, high = metrics.mean_confidence_interval(per_class)
    quality, skipped = evaluator(samples)
    if skipped:
        raise RuntimeError(skipped)
    return {"accuracy": mean, "accuracy_ci95": [low, high], "per_class_accuracy": per_class,
            "frechet_distance": quality["frechet_distance"], "kid": quality["kid"],
            "class_spread": class_spread(features, labels, num_classes) / train_spread}


def class_grid(samples, labels, num_classes: int, columns: int) -> np.ndarray:
    """One row per class: the first ``columns`` samples of each."""
    rows = [samples[labels == k][:columns] for k in range(num_classes)]
    return images.samples_to_image(np.concatenate(rows), ncols=columns)


def plot(results, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [r["guidance_scale"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    accuracy = np.array([r["accuracy"] for r in results])
    ci = np.array([r["accuracy_ci95"] for r in results])
    axes[0].errorbar(scales, accuracy, yerr=[accuracy - ci[:, 0], ci[:, 1] - accuracy],
                     marker="o", capsize=3)
    axes[0].set(xlabel="guidance scale w", ylabel="classifier accuracy", ylim=(0, 1.02))
    axes[1].plot(scales, [r["frechet_distance"] for r in results], marker="o")
    axes[1].set(xlabel="guidance scale w", ylabel="Frechet distance (classifier features)")
    axes[2].plot(scales, [r["class_spread"] for r in results], marker="o")
    axes[2].axhline(1.0, color="gray", lw=0.8, ls="--")
    axes[2].set(xlabel="guidance scale w", ylabel="within-class spread / data's")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", default="runs/digits_cond")
    parser.add_argument("--scales", type=float, nargs="+", default=[0, 0.5, 1, 1.5, 2, 3, 5])
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid-scales", type=float, nargs="+", default=[0, 1, 3])
    parser.add_argument("--grid-columns", type=int, default=10)
    parser.add_argument("--output", default="benchmarks/results/guidance_digits.json")
    parser.add_argument("--images", default="docs/images/guidance")
    args = parser.parse_args(argv)

    config, model, info = runs.load_trained_model(args.run_dir)
    if model.num_classes is None:
        parser.error(f"{args.run_dir} is not a class-conditional run (train it with "
                     "--conditional)")
    splits = data.load_dataset(config.dataset, config.data_dir)
    extractor = FeatureExtractor(config.dataset)
    evaluator = SampleEvaluator("images", splits.eval, config.dataset, train=splits.train)
    train_features = extractor.features(splits.train)
    train_spread = class_spread(train_features, splits.train_labels, model.num_classes)
    real = extractor.predict_labels(splits.eval) == splits.eval_labels

    results = []
    for scale in args.scales:
        samples, labels, seconds = guided_samples(model, args.per_class, scale, args.seed,
                                                  args.steps)
        result = {"guidance_scale": scale, "seconds": seconds,
                  **score(samples, labels, extractor, evaluator, model.num_classes,
                          train_spread)}
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "per_class_accuracy"}),
              flush=True)
        if scale in args.grid_scales:
            images.save_png(f"{args.images}_w{scale:g}.png",
                            class_grid(samples, labels, model.num_classes, args.grid_columns))
    floor, _ = evaluator.data_floor(model.num_classes * args.per_class)
    report = {
        "run_dir": args.run_dir, "step": int(info["step"]) if "step" in info else None,
        "dataset": config.dataset, "optimizer": config.optimizer,
        "sampler": "ddim", "steps": args.steps, "per_class": args.per_class, "seed": args.seed,
        "classifier_test_accuracy": load_report(config.dataset)["test_accuracy"],
        "classifier_accuracy_on_held_out_images": float(real.mean()),
        "data_floor": floor, "results": results,
    }
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    plot(results, f"{args.images}_sweep.png")
    print(f"wrote {args.output}, {args.images}_sweep.png")


if __name__ == "__main__":
    main()
