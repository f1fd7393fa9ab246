"""K-FAC against Adam: per-step time breakdown, amortised step time and curvature memory.

    python -m benchmarks.kfac_step_time --dataset digits --steps 20
    python -m benchmarks.kfac_step_time --dataset digits --steps 20 \
        --statistics-examples 16 --inverse-method cholesky --measure-amortised 10 100
    python -m benchmarks.kfac_step_time --dataset mnist --steps 6
    python -m benchmarks.kfac_step_time --dataset digits --steps 40 --approximation reduce \
        --inverse-method cholesky --measure-amortised 10 100

Every configuration trains the task's U-Net with ``model.fit`` for two epochs
of ``--steps`` steps on the real data pipeline and times the second epoch
(the first holds tracing, compilation, the inverse warm-up and the first
refresh). The breakdown comes from four K-FAC variants of the same step::

    base       statistics and inverses never due after step 0: forward, backward,
               preconditioned update (the persistent tape and the block matmuls)
    +stats     statistics every step: + probe backward pass, patches, factor products
    +inverse   statistics and inverse refresh every step: + eigh / Cholesky of every factor

so ``statistics = (+stats) - base`` and ``inverse = (+inverse) - (+stats)``
per occurrence, and a configuration with statistics every ``k`` and
inverses every ``T`` steps costs ``base + statistics / k + inverse / T`` per
step (amortised). ``--measure-amortised K T`` also times that configuration
directly over ``max(steps, T)`` steps; ``--repeats R`` times Adam and that
configuration R times, alternating, and reports the median ratio. Memory:
float32 values of optimizer state from ``KFAC.state_sizes`` (Adam keeps two moments per parameter).
Writes JSON to ``benchmarks/results/kfac_step_time_<dataset>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform

import keras
import tensorflow as tf

from benchmarks.train_throughput import MNIST_UNET, EpochTimer
from tfngd import data as data_lib
from tfngd import distribute
from tfngd.config import TrainConfig, build_model, build_optimizer
from tfngd.optimizers import kfac_of

TASK_OVERRIDES = {"digits": {}, "mnist": MNIST_UNET}
NEVER = 10**9  # a period longer than any run: only step 0 (and the warm-up) is due


def time_configuration(config: TrainConfig, splits, steps: int, strategy=None,
                       **kfac_options) -> dict:
    """Mean seconds per step of the second epoch, and the optimizer's state sizes
    (``strategy``: a ``tf.distribute`` strategy to train under; default none)."""
    config = dataclasses.replace(config, epochs=2, steps_per_epoch=steps, **kfac_options)
    config.validate()
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        model = build_model(config, splits.data_shape, splits.num_classes)
        optimizer = build_optimizer(config)
        if kfac_of(optimizer) is not None:
            kfac_of(optimizer).inverse_warmup_steps = 0  # timing only: no per-step refreshes
        model.compile(optimizer=optimizer, jit_compile=config.jit_compile)
    timer = EpochTimer()
    batches = data_lib.training_batches(splits.train, config.batch_size, 0)
    model.fit(distribute.distribute_batches(strategy, batches), epochs=2,
              steps_per_epoch=steps, callbacks=[timer], verbose=0)
    kfac = kfac_of(model.optimizer)
    row = {"ms_per_step": 1000.0 * timer.epoch_seconds[1] / steps,
           "first_epoch_s": timer.epoch_seconds[0]}
    if kfac is not None:
        row["state_sizes"] = kfac.state_sizes()
        row["skipped_updates"] = int(kfac.skipped_updates.numpy())
    row["params"] = model.denoiser.count_params()
    keras.backend.clear_session()
    return row


def measure(dataset: str, steps: int, amortised: tuple[int, int] | None, data_dir=None,
            inverse_method: str = "eigh", jit_compile: bool = False,
            statistics_examples: int | None = None, approximation: str = "expand",
            repeats: int = 1) -> dict:
    splits = data_lib.load_dataset(dataset, data_dir=data_dir, seed=0)
    base = TrainConfig(dataset=dataset, data_dir=data_dir, warmup_steps=1, optimizer="adam",
                       jit_compile=jit_compile, **TASK_OVERRIDES[dataset])
    kfac = dataclasses.replace(base, optimizer="kfac", learning_rate=0.1,
                               inverse_method=inverse_method,
                               statistics_examples=statistics_examples,
                               kfac_approximation=approximation)

    def kfac_timing(statistics_every, inverse_every, steps_):
        return time_configuration(kfac, splits, steps_, statistics_every=statistics_every,
                                  inverse_every=inverse_every)

    rows = {"adam": time_configuration(base, splits, steps)}
    print(f"[{dataset}] adam {rows['adam']['ms_per_step']:.0f} ms/step", flush=True)
    for name, (k, t) in (("base", (NEVER, NEVER)), ("stats", (1, NEVER)), ("inverse", (1, 1))):
        rows[name] = kfac_timing(k, t, steps)
        print(f"[{dataset}] kfac {name} {rows[name]['ms_per_step']:.0f} ms/step", flush=True)
    adam_ms = rows["adam"]["ms_per_step"]
    breakdown = {
        "adam_step_ms": adam_ms,
        "forward_backward_update_ms": rows["base"]["ms_per_step"],
        "statistics_ms_each": rows["stats"]["ms_per_step"] - rows["base"]["ms_per_step"],
        "inverse_ms_each": rows["inverse"]["ms_per_step"] - rows["stats"]["ms_per_step"],
    }

    def predicted(k, t):
        return (breakdown["forward_backward_update_ms"] + breakdown["statistics_ms_each"] / k
                + breakdown["inverse_ms_each"] / t)

    schedules = [(1, 10), (5, 50), (10, 100), (20, 200)]
    if amortised and tuple(amortised) not in schedules:
        schedules.append(tuple(amortised))
    result = {
        "dataset": dataset, "steps": steps, "inverse_method": inverse_method,
        "statistics_examples": statistics_examples, "approximation": approximation,
        "jit_compile": jit_compile, "batch_size": base.batch_size, "params": rows["adam"]["params"],
        "timings": rows, "breakdown": breakdown,
        "amortised_predicted": [
            {"statistics_every": k, "inverse_every": t, "ms_per_step": predicted(k, t),
             "ratio_to_adam": predicted(k, t) / adam_ms} for k, t in schedules],
        "state_sizes": rows["base"]["state_sizes"],
        "adam_state_values": 2 * rows["adam"]["params"],
    }
    if amortised:
        k, t = amortised
        pairs = [(adam_ms, kfac_timing(k, t, max(steps, t))["ms_per_step"])]
        for _ in range(repeats - 1):  # Adam and K-FAC alternate, so both see the same drift
            pairs.append((time_configuration(base, splits, steps)["ms_per_step"],
                          kfac_timing(k, t, max(steps, t))["ms_per_step"]))
        ratios = sorted(kfac_ms / adam_ms_ for adam_ms_, kfac_ms in pairs)
        median = ratios[len(ratios) // 2] if len(ratios) % 2 else (
            0.5 * (ratios[len(ratios) // 2 - 1] + ratios[len(ratios) // 2]))
        result["amortised_measured"] = {
            "statistics_every": k, "inverse_every": t, "ms_per_step": pairs[0][1],
            "ratio_to_adam": pairs[0][1] / pairs[0][0],
            "repeats": [{"adam_ms": a, "kfac_ms": m, "ratio": m / a} for a, m in pairs],
            "median_ratio": median}
        for adam_ms_, kfac_ms in pairs:
            print(f"[{dataset}] kfac k={k} T={t} measured {kfac_ms:.0f} ms/step against Adam "
                  f"{adam_ms_:.0f} ({kfac_ms / adam_ms_:.2f}x)", flush=True)
        print(f"[{dataset}] median ratio over {len(pairs)} pairs: {median:.2f}x", flush=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=sorted(TASK_OVERRIDES), default="digits")
    parser.add_argument("--data-dir", default="../shared/data/mnist",
                        help="MNIST IDX directory (offline)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--measure-amortised", type=int, nargs=2, metavar=("K", "T"),
                        default=None, help="also time statistics every K / inverses every T")
    parser.add_argument("--repeats", type=int, default=1,
                        help="time (Adam, amortised K-FAC) this many times, alternating, and "
                             "report the median ratio")
    parser.add_argument("--inverse-method", choices=("eigh", "cholesky"), default="eigh")
    parser.add_argument("--statistics-examples", type=int, default=None,
                        help="K-FAC statistics from the first N examples of each batch")
    parser.add_argument("--approximation", choices=("expand", "reduce"), default="expand",
                        help="K-FAC factors of shared weights (KFAC(approximation=...))")
    parser.add_argument("--jit", action="store_true", help="compile the train step with XLA")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    data_dir = args.data_dir if args.dataset == "mnist" else None
    result = measure(args.dataset, args.steps, args.measure_amortised, data_dir,
                     args.inverse_method, args.jit, args.statistics_examples, args.approximation,
                     args.repeats)
    result.update({"machine": platform.machine(), "cpus": os.cpu_count(),
                   "tensorflow": tf.__version__, "keras": keras.__version__,
                   "load_average_at_end": os.getloadavg()})
    suffix = ("_jit" if args.jit else "") + (
        f"_{args.inverse_method}" if args.inverse_method != "eigh" else "") + (
        f"_m{args.statistics_examples}" if args.statistics_examples else "") + (
        f"_{args.approximation}" if args.approximation != "expand" else "")
    output = args.output or f"benchmarks/results/kfac_step_time_{args.dataset}{suffix}.json"
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: result[k] for k in ("breakdown", "amortised_predicted", "state_sizes",
                                             "adam_state_values")}, indent=1))


if __name__ == "__main__":
    main()
