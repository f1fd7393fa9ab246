"""Inpainting held-out digits: RePaint with the trained prior against the mean and harmonic fills.

    python -m benchmarks.inpainting_digits                       # the full measurement
    python -m benchmarks.inpainting_digits --num-images 32 --settings 20:1:1   # a quick look

The model is the class-conditional digits U-Net of ``--run-dir`` (trained on
``load_dataset("digits").train`` only; the script checks the run's config for that), the
images the 297 of the held-out split ``load_dataset("digits").eval``. Masks (1 = known):
``centre`` (the centre 4x4 square is missing), ``left`` (the left half), ``bottom`` (the
bottom half), ``random50`` (each pixel missing with probability 1/2, drawn per image).

For every mask: the masked-region MSE and PSNR (per image, then the mean and its 95%
Student-t interval over images, :func:`tfngd.metrics.mean_confidence_interval`), the
shipped digits classifier's accuracy on the completed images against the true labels
(:class:`tfngd.feature_classifier.FeatureExtractor`), and the seconds per image. Methods:
``mean`` and ``harmonic`` (:mod:`tfngd.inpainting`), and RePaint for every ``--settings``
entry ``K:j:r`` (num_steps, jump_length, resample; ``r = 1`` is plain replacement), both
unconditional (the null label) and with the true label (no guidance). Times are wall
clock on this machine's shared CPU cores, after a warm-up call that traces the graph.

Writes ``benchmarks/results/inpainting_digits.json`` (after every run, so a partial run
leaves its numbers) and ``docs/images/inpainting_digits.png``: for each mask, rows =
original, masked (missing pixels grey), mean fill, harmonic fill, then RePaint per setting
(unconditional), then the last setting with the true label, a white row between masks;
columns = the first ``--grid-images`` held-out digits.

A single RePaint output is one sample of ``p(x_missing | x_known)``; its expected squared
error is the posterior variance *plus* the squared distance of the posterior mean from the
truth, twice the error of the posterior mean when the model is right. ``--average-seeds N``
also scores the average of N samples (an estimate of that mean, as the smooth baselines are).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import tensorflow as tf

from tfngd import data, feature_classifier, images, inpainting, metrics, runs

MASKS = ("centre", "left", "bottom", "random50")
LABEL_MODES = ("none", "true")


def make_masks(name: str, num_images: int, seed: int) -> np.ndarray:
    """``[N, 8, 8, 1]`` float32 masks, 1 = known."""
    mask = np.ones((num_images, 8, 8, 1), np.float32)
    if name == "centre":
        mask[:, 2:6, 2:6] = 0.0
    elif name == "left":
        mask[:, :, :4] = 0.0
    elif name == "bottom":
        mask[:, 4:, :] = 0.0
    elif name == "random50":
        rng = np.random.default_rng(seed)
        mask = (rng.uniform(size=mask.shape) >= 0.5).astype(np.float32)
        empty = mask.reshape(num_images, -1).sum(axis=1) == 0
        mask[empty, 0, 0, 0] = 1.0  # at least one known pixel (never needed at 64 pixels)
    else:
        raise ValueError(f"unknown mask {name!r}; valid: {', '.join(MASKS)}")
    return mask


def parse_settings(text: str) -> list[tuple[int, int, int]]:
    settings = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3:
            raise ValueError(f"--settings: expected K:j:r entries, got {item!r}")
        settings.append(tuple(int(p) for p in parts))
    return settings


def interval(values) -> dict:
    mean, low, high = metrics.mean_confidence_interval(values)
    return {"mean": mean, "low": low, "high": high}


def score(completed, originals, mask, labels, classifier) -> dict:
    mse = inpainting.masked_mse(completed, originals, mask)
    predicted = classifier.predict_labels(np.clip(completed, -1.0, 1.0))
    correct = (predicted == labels).astype(np.float64)
    return {"mse": interval(mse), "psnr_db": interval(inpainting.psnr(mse)),
            "psnr_of_mean_mse_db": float(inpainting.psnr(mse.mean())),
            "accuracy": interval(correct)}


def check_training_split(config, splits) -> dict:
    """The run must have trained on the digits train split only (all of it, or a prefix)."""
    if config.dataset != "digits":
        raise SystemExit(f"the run at --run-dir trained on {config.dataset!r}, not digits")
    train = splits.train.reshape(len(splits.train), -1)
    held_out = splits.eval.reshape(len(splits.eval), -1)
    train_rows = {row.tobytes() for row in train}
    duplicates = int(sum(row.tobytes() in train_rows for row in held_out))
    return {"dataset": config.dataset, "num_train": config.num_train,
            "trained_on": "tfngd.data.load_dataset('digits').train"
                          + ("" if config.num_train is None else f"[:{config.num_train}]"),
            "train_examples": len(splits.train) if config.num_train is None
            else int(config.num_train),
            "eval_examples": len(splits.eval),
            "eval_images_identical_to_a_train_image": duplicates}


def markdown_table(result: dict) -> str:
    """The results as a Markdown table: one row per (mask, method)."""
    lines = ["| mask | method | denoiser calls | masked MSE (95% CI) | PSNR dB (95% CI) "
             "| classifier accuracy (95% CI) | s / image |",
             "| --- | --- | ---: | --- | --- | --- | ---: |"]

    def ci(entry, digits):
        return (f"{entry['mean']:.{digits}f} [{entry['low']:.{digits}f}, "
                f"{entry['high']:.{digits}f}]")

    for name, entry in result["masks"].items():
        for method, values in entry["methods"].items():
            lines.append(f"| {name} | {method} | {values.get('denoiser_calls', 0)} "
                         f"| {ci(values['mse'], 3)} | {ci(values['psnr_db'], 2)} "
                         f"| {ci(values['accuracy'], 3)} | {values['seconds_per_image']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", default="runs/digits_cond")
    parser.add_argument("--num-images", type=int, default=None,
                        help="the first N held-out digits (default: all 297)")
    parser.add_argument("--settings", default="50:1:1,250:1:1,50:5:5",
                        help="RePaint settings K:j:r (num_steps:jump_length:resample)")
    parser.add_argument("--masks", default=",".join(MASKS))
    parser.add_argument("--labels", default=",".join(LABEL_MODES),
                        help="none (unconditional) and/or true (the true label)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--average-seeds", type=int, default=1,
                        help="also score the mean of this many RePaint samples per image "
                             "(seeds seed .. seed + N - 1), an estimate of the posterior mean")
    parser.add_argument("--grid-images", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/inpainting_digits.json")
    parser.add_argument("--png", default="docs/images/inpainting_digits.png")
    parser.add_argument("--report", default=None, metavar="JSON",
                        help="print the Markdown table of an existing result file and exit")
    args = parser.parse_args(argv)
    if args.report:
        with open(args.report) as f:
            print(markdown_table(json.load(f)))
        return 0
    settings = parse_settings(args.settings)
    mask_names = [m.strip() for m in args.masks.split(",")]
    label_modes = [m.strip() for m in args.labels.split(",")]
    for mode in label_modes:
        if mode not in LABEL_MODES:
            raise SystemExit(f"--labels: unknown mode {mode!r}; valid: {', '.join(LABEL_MODES)}")

    config, model, info = runs.load_trained_model(args.run_dir)
    splits = data.load_dataset("digits")
    originals, labels = splits.eval, splits.eval_labels
    if args.num_images is not None:
        originals, labels = originals[:args.num_images], labels[:args.num_images]
    classifier = feature_classifier.FeatureExtractor("digits")
    num = len(originals)
    result = {
        "command": "python -m benchmarks.inpainting_digits " + " ".join(sys.argv[1:] if argv is None
                                                                          else argv),
        "model": {"run_dir": args.run_dir, "checkpoint": info.get("file"),
                  "step": info.get("step"), "sha256": info.get("sha256"),
                  "schedule": config.schedule, "num_timesteps": config.num_timesteps,
                  "prediction_type": config.prediction_type, "clip_x0": True,
                  "sampler": "ancestral DDPM, fixed_small, trailing spacing"},
        "split_check": check_training_split(config, splits),
        "num_images": num, "seed": args.seed,
        "classifier_accuracy_on_originals": float(np.mean(
            classifier.predict_labels(originals) == labels)),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "tensorflow": tf.__version__,
                    "note": "2 CPU cores shared with other jobs: times are indicative"},
        "masks": {},
    }

    def save():
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)

    grid_rows = []
    shown = slice(0, min(args.grid_images, num))
    for name in mask_names:
        mask = make_masks(name, num, args.seed)
        entry = result["masks"][name] = {"missing_fraction": float(1.0 - mask.mean()),
                                         "methods": {}}
        masked_view = np.where(mask == 1, originals, 0.0)
        rows = [originals[shown], masked_view[shown]]
        baselines = (("mean", inpainting.mean_fill), ("harmonic", inpainting.harmonic_fill))
        for method, fill in baselines:
            start = time.perf_counter()
            completed = fill(originals, mask)
            seconds = time.perf_counter() - start
            entry["methods"][method] = {**score(completed, originals, mask, labels, classifier),
                                        "seconds_per_image": seconds / num}
            rows.append(completed[shown])
            print(f"{name:9s} {method:24s} mse {entry['methods'][method]['mse']['mean']:.4f}",
                  flush=True)
        last_labelled = None
        for num_steps, jump, resample in settings:
            schedule = inpainting.repaint_schedule(num_steps, jump, resample)
            for mode in label_modes:
                label = labels if mode == "true" else None
                # Warm-up: trace the graph (twice: the second call generalises the shapes).
                for steps in (1, 2):
                    inpainting.inpaint(model, originals, mask, seed=args.seed, num_steps=steps,
                                       label=label)
                start = time.perf_counter()
                completed = inpainting.inpaint(model, originals, mask, seed=args.seed,
                                               num_steps=num_steps, jump_length=jump,
                                               resample=resample, label=label)
                seconds = time.perf_counter() - start
                key = f"repaint_K{num_steps}_j{jump}_r{resample}_{mode}_label"
                entry["methods"][key] = {
                    **score(completed, originals, mask, labels, classifier),
                    "num_steps": num_steps, "jump_length": jump, "resample": resample,
                    "label": mode, "denoiser_calls": inpainting.num_denoiser_calls(schedule),
                    "seconds_per_image": seconds / num, "seconds_total": seconds,
                }
                print(f"{name:9s} {key:34s} mse {entry['methods'][key]['mse']['mean']:.4f} "
                      f"acc {entry['methods'][key]['accuracy']['mean']:.3f} "
                      f"{seconds:.1f}s", flush=True)
                if args.average_seeds > 1:
                    draws = [completed] + [
                        inpainting.inpaint(model, originals, mask, seed=args.seed + k,
                                           num_steps=num_steps, jump_length=jump,
                                           resample=resample, label=label)
                        for k in range(1, args.average_seeds)]
                    averaged = np.mean(draws, axis=0)
                    mean_key = f"{key}_mean_of_{args.average_seeds}"
                    entry["methods"][mean_key] = {
                        **score(averaged, originals, mask, labels, classifier),
                        **{k: v for k, v in entry["methods"][key].items()
                           if k not in ("seconds_per_image", "seconds_total", "mse", "psnr_db",
                                        "psnr_of_mean_mse_db", "accuracy")},
                        "samples_averaged": args.average_seeds,
                        "seconds_per_image": seconds * args.average_seeds / num,
                    }
                    print(f"{name:9s} {mean_key:34s} mse "
                          f"{entry['methods'][mean_key]['mse']['mean']:.4f}", flush=True)
                if mode == "none":
                    rows.append(completed[shown])
                else:
                    last_labelled = completed[shown]
                save()
        if last_labelled is not None:
            rows.append(last_labelled)
        if grid_rows:  # a white row between masks
            grid_rows.append(np.ones_like(originals[shown]))
        grid_rows.extend(rows)
    save()
    if grid_rows and args.png:
        grid = images.image_grid(np.concatenate(grid_rows), ncols=shown.stop, scale=4)
        images.save_png(args.png, grid)
        result["png"] = args.png
        result["png_rows_per_mask"] = (["original", "masked", "mean", "harmonic"]
                                       + [f"repaint K{k} j{j} r{r} unconditional"
                                          for k, j, r in settings]
                                       + (["repaint last setting, true label"]
                                          if "true" in label_modes else []))
        save()
    print(markdown_table(result))
    print(f"wrote {args.out}" + (f" and {args.png}" if args.png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
