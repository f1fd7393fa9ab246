"""Training throughput (images/second) of the default U-Net, with and without XLA.

    python -m benchmarks.train_throughput --dataset digits mnist --steps 60

Times ``model.fit`` steps after a warm-up epoch (tracing and compilation are
excluded) on the real data pipeline. Writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import keras

from tfngd import data as data_lib
from tfngd.config import TrainConfig, build_model, build_optimizer

MNIST_UNET = {"channel_mults": (1, 2, 2), "attention_resolutions": (7,)}


class EpochTimer(keras.callbacks.Callback):
    """Wall-clock seconds of every epoch of ``fit`` (``epoch_seconds``)."""

    def __init__(self):
        super().__init__()
        self.epoch_seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_seconds.append(time.perf_counter() - self._start)


def measure(dataset: str, jit_compile: bool, steps: int, batch_size: int, data_dir=None) -> dict:
    overrides = MNIST_UNET if dataset == "mnist" else {}
    config = TrainConfig(dataset=dataset, data_dir=data_dir, batch_size=batch_size,
                         optimizer="adam", jit_compile=jit_compile, epochs=2, steps_per_epoch=steps,
                         warmup_steps=1, **overrides).validate()
    splits = data_lib.load_dataset(dataset, data_dir=data_dir, seed=0)
    model = build_model(config, splits.data_shape, splits.num_classes)
    model.compile(optimizer=build_optimizer(config), jit_compile=jit_compile)
    timer = EpochTimer()
    model.fit(data_lib.training_batches(splits.train, batch_size, 0), epochs=2,
              steps_per_epoch=steps, callbacks=[timer], verbose=0)
    seconds = timer.epoch_seconds[-1]  # epoch 0 includes tracing/compilation
    return {
        "dataset": dataset, "image_shape": list(splits.data_shape), "jit_compile": jit_compile,
        "batch_size": batch_size, "steps": steps, "params": model.denoiser.count_params(),
        "seconds_per_step": seconds / steps, "images_per_second": steps * batch_size / seconds,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", nargs="+", default=["digits", "mnist"])
    parser.add_argument("--data-dir", default="../shared/data/mnist",
                        help="MNIST IDX directory (offline)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--output", default="benchmarks/results/train_throughput.json")
    args = parser.parse_args()
    results = []
    for dataset in args.dataset:
        for jit in (False, True):
            data_dir = args.data_dir if dataset == "mnist" else None
            row = measure(dataset, jit, args.steps, args.batch_size, data_dir)
            print(json.dumps(row))
            results.append(row)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"machine": platform.processor() or platform.machine(),
                   "cpus": os.cpu_count(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
