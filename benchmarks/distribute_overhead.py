"""Per-step cost of data parallelism: one device against MirroredStrategy on logical CPUs.

    python -m benchmarks.distribute_overhead --steps 20

The CPU is split into two logical devices (:func:`tfngd.distribute.split_cpu`), which
share the machine's cores: two replicas do the same arithmetic as one device on the
whole batch, so the difference in step time is what the strategy adds (splitting the
batch, the gradient all-reduces, the ``merge_call`` of the once-only update, reading
K-FAC's replica-local statistics at a refresh), not a speed-up. On GPUs each replica has
its own device; run the same script there to see scaling.

For the main job's U-Net on the digits (batch 64: 32 per replica on two), times the
second of two epochs of ``--steps`` steps for Adam and for K-FAC's phases (as
:mod:`benchmarks.kfac_step_time`: ``base`` nothing due, ``stats`` statistics every step,
``inverse`` statistics and a refresh every step), under three strategies: ``none``,
``mirrored_1`` (MirroredStrategy on one logical device: the strategy's own machinery)
and ``mirrored_2`` (two replicas). ``refresh - stats`` under ``mirrored_2`` minus the
same under ``none`` is the cost of averaging the factors over the replicas at a
refresh. Writes ``benchmarks/results/distribute_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys

from tfngd import distribute

PHASES = {"base": (None, None), "stats": (1, None), "inverse": (1, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2,
                        help="time every configuration this many times (the minimum is kept)")
    parser.add_argument("--output", default=os.path.join("benchmarks", "results",
                                                         "distribute_overhead.json"))
    args = parser.parse_args()
    distribute.split_cpu(2)  # before TensorFlow initialises its devices

    import tensorflow as tf

    from benchmarks.kfac_step_time import NEVER, time_configuration
    from tfngd import data as data_lib
    from tfngd.config import TrainConfig

    strategies = {
        "none": tf.distribute.get_strategy(),
        "mirrored_1": tf.distribute.MirroredStrategy(["/cpu:0"]),
        "mirrored_2": tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]),
    }
    splits = data_lib.load_dataset("digits", seed=0)
    base = TrainConfig(warmup_steps=1, statistics_examples=None)
    configurations = {"adam": (base, {"optimizer": "adam"})}
    for phase, (every, inverse) in PHASES.items():
        configurations[f"kfac_{phase}"] = (base, {
            "optimizer": "kfac", "statistics_every": every or NEVER,
            "inverse_every": inverse or NEVER})
    rows = {}
    for name, (config, options) in configurations.items():
        for strategy_name, strategy in strategies.items():
            times = [time_configuration(config, splits, args.steps, strategy=strategy,
                                        **options)["ms_per_step"]
                     for _ in range(args.repeats)]
            rows.setdefault(name, {})[strategy_name] = min(times)
            print(f"{name} {strategy_name}: {min(times):.0f} ms/step ({times})", flush=True)
    overhead = {name: {s: row[s] / row["none"] for s in row} for name, row in rows.items()}
    refresh = {s: rows["kfac_inverse"][s] - rows["kfac_stats"][s] for s in strategies}
    statistics = {s: rows["kfac_stats"][s] - rows["kfac_base"][s] for s in strategies}
    report = {
        "benchmark": "distribute_overhead",
        "command": "python -m benchmarks.distribute_overhead " + shlex.join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "model": "default TrainConfig U-Net on digits, batch 64, K-FAC with statistics on "
                 "all examples, Cholesky inverses (the config defaults otherwise)",
        "ms_per_step": rows, "relative_to_none": overhead,
        "refresh_ms": refresh, "statistics_ms": statistics,
    }
    with open(args.output, "w") as handle:
        json.dump(report, handle, indent=1)
    print(json.dumps({"relative_to_none": overhead, "refresh_ms": refresh,
                      "statistics_ms": statistics}, indent=1))


if __name__ == "__main__":
    main()
