"""int8 post-training quantization of the trained digits sampler: size, speed, sample quality.

    python -m benchmarks.quantization --run-dir runs/digits_cond

Converts the run's EMA denoiser with :mod:`tfngd.quantization` (float32, int8 calibrated
on ``q(x_t | x_0)`` over the training split, dynamic range) and measures

* sizes: the Keras weights file (``.weights.h5``) and each ``.tflite`` file;
* per-call latency (median of ``--repeats`` after a warm-up) at batch 1 and
  ``--batch``: the TFLite interpreter with 1 and 2 threads, against the Keras
  denoiser in a ``tf.function`` (TensorFlow's default thread pools) on the same inputs;
* the denoiser's error on held-out forward-process draws (RMS over the output's std,
  overall and per quarter of the chain);
* seconds per full sample run (DDIM ``--steps`` steps, ``--batch`` samples): the graph
  sampler with the Keras denoiser against the same sampler with each TFLite model;
* sample quality, same seeds and noise for every model: Frechet distance and KID in the
  digits feature classifier's space (:class:`tfngd.bench.sample_quality.SampleEvaluator`)
  on ``--num-samples`` unconditional (null-label) samples, the per-sample RMS difference
  to the float samples, and the classifier's accuracy on ``--num-samples`` conditional
  samples (``label = k``, equal numbers per class).

Writes JSON to ``--output`` and a PNG of float vs int8 samples from the same seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import tensorflow as tf

from tfngd import data, images, quantization, runs
from tfngd.bench.sample_quality import SampleEvaluator
from tfngd.feature_classifier import FeatureExtractor

MODES = ("float32", "int8", "dynamic_range")


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (tracing, interpreter allocation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def relative_errors(model, denoisers, held_out) -> dict:
    inputs = [held_out[n] for n in quantization.INPUT_NAMES if n in held_out]
    reference = model.ema_denoiser(inputs, training=False).numpy()
    quarters = np.minimum(held_out["t"] * 4 // model.diffusion.num_timesteps, 3)
    result = {}
    for mode, denoiser in denoisers.items():
        error = denoiser.predict(*inputs) - reference
        result[mode] = {
            "rms_over_std": float(np.sqrt(np.mean(error ** 2)) / reference.std()),
            "per_quarter": [float(np.sqrt(np.mean(error[quarters == q] ** 2))
                                  / reference[quarters == q].std()) for q in range(4)],
        }
    return result


def draw(sample_fn, total: int, batch: int):
    """``total`` unconditional samples in batches of ``batch`` with seeds 0, 1, ..."""
    out = [np.asarray(sample_fn(batch, seed=i)) for i in range(-(-total // batch))]
    return np.concatenate(out)[:total]


def comparison_image(float_samples, int8_samples, per_row: int = 10) -> np.ndarray:
    """Float samples (left) and int8 samples from the same noise (right), one grid each."""
    left = images.samples_to_image(float_samples, ncols=per_row)
    right = images.samples_to_image(int8_samples, ncols=per_row)
    gap = np.full((left.shape[0], 12, left.shape[2]), 255, np.uint8)
    return np.concatenate([left, gap, right], axis=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", default="runs/digits_cond")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=100,
                        help="batch of the latency test and of the sample runs")
    parser.add_argument("--calibration-examples", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sample-repeats", type=int, default=3)
    parser.add_argument("--tflite-dir", default=None,
                        help="where to write the .tflite files (default: a temporary folder)")
    parser.add_argument("--output", default="benchmarks/results/quantization_digits.json")
    parser.add_argument("--image", default="docs/images/quantization_digits.png")
    parser.add_argument("--timing-only", action="store_true",
                        help="sizes, errors and timings only (no sample quality, no image)")
    args = parser.parse_args()

    config, model, _ = runs.load_trained_model(args.run_dir)
    splits = data.load_dataset(config.dataset, data_dir=config.data_dir)
    sample_kwargs = {"num_steps": args.steps, "sampler": "ddim", "eta": 0.0,
                     "clip_x0": config.clip_x0}
    result = {"run_dir": args.run_dir, "steps": args.steps, "batch": args.batch,
              "num_samples": args.num_samples, "sampler": "ddim, eta=0",
              "calibration_examples": args.calibration_examples,
              "parameters": int(model.ema_denoiser.count_params()),
              "cpu_count": os.cpu_count(), "load_average_start": os.getloadavg()}

    # -- conversion and sizes
    calibration = quantization.calibration_inputs(model, splits.train, splits.train_labels,
                                                  args.calibration_examples, seed=0)
    workdir = tempfile.mkdtemp(prefix="tfngd-quant-bench-")
    tflite_dir = args.tflite_dir or os.path.join(workdir, "tflite")
    start = time.perf_counter()
    paths = quantization.export_tflite(model, tflite_dir, MODES, calibration,
                                       "benchmark calibration, seed 0")
    result["conversion_seconds_all_modes"] = time.perf_counter() - start
    weights_path = os.path.join(workdir, "ema_denoiser.weights.h5")
    model.ema_denoiser.save_weights(weights_path)
    result["bytes"] = {"keras_weights_h5": os.path.getsize(weights_path),
                       **{mode: os.path.getsize(path) for mode, path in paths.items()}}
    with open(os.path.join(tflite_dir, quantization.METADATA_FILENAME)) as f:
        metadata = json.load(f)
    result["op_reports"] = {mode: {k: metadata["files"][mode][k] for k in
                                   ("float_ops", "tensor_types", "constant_bytes")}
                            for mode in MODES}

    # -- accuracy of one call on held-out forward-process draws
    held_out = quantization.calibration_inputs(model, splits.eval, splits.eval_labels, 1000,
                                               seed=1)
    denoisers = {mode: quantization.TFLiteDenoiser(paths[mode], num_threads=2)
                 for mode in MODES}
    result["denoiser_error"] = relative_errors(model, denoisers, held_out)

    # -- per-call latency
    keras_call = tf.function(lambda *inputs: model.ema_denoiser(list(inputs), training=False))
    latency = {}
    for batch in (1, args.batch):
        inputs = [held_out[n][:batch] for n in quantization.INPUT_NAMES]
        tensors = [tf.constant(v) for v in inputs]
        row = {"keras_tf_function": median_seconds(lambda t=tensors: keras_call(*t).numpy(),
                                                   args.repeats)}
        for mode in MODES:
            for threads in (1, 2):
                denoiser = quantization.TFLiteDenoiser(paths[mode], num_threads=threads)
                row[f"tflite_{mode}_threads{threads}"] = median_seconds(
                    lambda d=denoiser, i=inputs: d.predict(*i), args.repeats)
        latency[f"batch_{batch}"] = row
    result["seconds_per_call"] = latency

    # -- one full sample run
    def keras_sampler(n, seed, **kwargs):
        return model.sample(n, seed=seed, **sample_kwargs, **kwargs)

    def tflite_sampler(mode):
        return lambda n, seed, **kw: quantization.sample(denoisers[mode], model, n, seed=seed,
                                                         **sample_kwargs, **kw)

    samplers_by_name = {"keras": keras_sampler,
                        **{f"tflite_{mode}": tflite_sampler(mode) for mode in MODES}}
    result["seconds_per_sample_run"] = {
        name: median_seconds(lambda s=fn: np.asarray(s(args.batch, seed=0, label=3)),
                             args.sample_repeats)
        for name, fn in samplers_by_name.items()}

    if args.timing_only:
        result["load_average_end"] = os.getloadavg()
        _write(result, args.output)
        return

    # -- sample quality, same seeds for every model
    evaluator = SampleEvaluator("images", splits.eval, config.dataset, train=splits.train)
    classifier = FeatureExtractor(config.dataset)
    per_class = max(1, args.batch // model.num_classes)
    batch_labels = np.repeat(np.arange(model.num_classes), per_class)  # label = k, k = 0..9

    def conditional(sample_fn):
        out = []
        for i in range(-(-args.num_samples // len(batch_labels))):
            out.append(np.asarray(sample_fn(len(batch_labels), seed=1000 + i,
                                            label=batch_labels)))
        return np.concatenate(out)[:args.num_samples]

    quality, unconditional_samples, conditional_samples = {}, {}, {}
    for name, fn in samplers_by_name.items():
        start = time.perf_counter()
        unconditional_samples[name] = draw(fn, args.num_samples, args.batch)
        conditional_samples[name] = conditional(fn)
        metrics, skipped = evaluator(unconditional_samples[name])
        labels = np.tile(batch_labels, -(-args.num_samples // len(batch_labels)))
        predicted = classifier.predict_labels(conditional_samples[name])
        quality[name] = {**metrics, "skipped": skipped,
                         "conditional_accuracy": float(np.mean(
                             predicted == labels[:args.num_samples])),
                         "sampling_seconds": time.perf_counter() - start}
        if name != "keras":
            for kind, samples in (("unconditional", unconditional_samples),
                                  ("conditional", conditional_samples)):
                diff = samples[name] - samples["keras"]
                rms = np.sqrt(np.mean(diff ** 2, axis=tuple(range(1, diff.ndim))))
                quality[name][f"rms_diff_to_keras_{kind}"] = {
                    "mean": float(rms.mean()), "median": float(np.median(rms)),
                    "max": float(rms.max())}
    floor, _ = evaluator.data_floor(args.num_samples)
    quality["training_data_floor"] = floor
    result["quality"] = quality
    result["load_average_end"] = os.getloadavg()

    count = 10 * model.num_classes  # ten of each class, from the conditional runs
    pick = np.concatenate([np.arange(k * per_class, k * per_class + 10)
                           for k in range(model.num_classes)])[:count]
    images.save_png(args.image, comparison_image(conditional_samples["keras"][pick],
                                                 conditional_samples["tflite_int8"][pick]))
    _write(result, args.output)
    print(json.dumps(quality, indent=2))


def _write(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: result[k] for k in ("bytes", "denoiser_error", "seconds_per_call",
                                             "seconds_per_sample_run")}, indent=2))


if __name__ == "__main__":
    main()
