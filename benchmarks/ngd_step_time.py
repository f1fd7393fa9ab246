"""Per-step cost of every optimizer on the benchmark's models, timed in one process.

    taskset -c 0 python -m benchmarks.ngd_step_time --tasks checkerboard digits --steps 20

For each task of ``tfngd.bench.tasks`` (its model, batch and settings), each optimizer of
``--optimizers`` runs ``model.fit`` for one warm-up epoch (tracing, compilation, the
first inverses) and then ``--rounds`` timed epochs of ``--steps`` steps; the optimizers
take turns round by round, so that a change of machine load hits all of them alike.
Reports the median ms/step and its ratio to Adam's. Writes JSON to
``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics

from benchmarks.train_throughput import EpochTimer
from tfngd import data as data_lib
from tfngd.bench.tasks import base_config, get_task
from tfngd.config import SAMPLE_SPACE_METRICS, build_model, build_optimizer

DEFAULT_OPTIMIZERS = ("adam", "kfac", "ekfac", *SAMPLE_SPACE_METRICS)


def measure(task_name: str, optimizers, steps: int, rounds: int, overrides: dict) -> dict:
    task = get_task(task_name)
    splits = data_lib.load_dataset(task.dataset, seed=0)
    models, timers = {}, {}
    for name in optimizers:
        config = dataclasses.replace(base_config(task, overrides.get(name, {})), optimizer=name,
                                     epochs=rounds + 1, steps_per_epoch=steps,
                                     warmup_steps=1).validate()
        model = build_model(config, splits.data_shape, splits.num_classes)
        model.compile(optimizer=build_optimizer(config))
        models[name], timers[name] = (model, config), EpochTimer()
    batches = data_lib.training_batches(splits.train, config.batch_size, 0)
    for round_index in range(rounds + 1):
        for name in optimizers:
            model, _ = models[name]
            model.fit(batches, epochs=round_index + 1, initial_epoch=round_index,
                      steps_per_epoch=steps, callbacks=[timers[name]], verbose=0)
    result = {}
    for name in optimizers:
        model, config = models[name]
        seconds = timers[name].epoch_seconds[1:]  # epoch 0 traces and compiles
        result[name] = {"ms_per_step": 1000 * statistics.median(seconds) / steps,
                        "ms_per_step_rounds": [1000 * s / steps for s in seconds],
                        "params": model.denoiser.count_params(),
                        "cg_iterations": config.cg_iterations}
    if "adam" in result:
        for name in result:
            result[name]["ratio_to_adam"] = (result[name]["ms_per_step"]
                                             / result["adam"]["ms_per_step"])
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["checkerboard", "digits"])
    parser.add_argument("--optimizers", nargs="+", default=list(DEFAULT_OPTIMIZERS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cg-iterations", type=int, default=None,
                        help="CG steps of the sample-space optimizers (default: the config's)")
    parser.add_argument("--output", default="benchmarks/results/ngd_step_time.json")
    args = parser.parse_args()
    overrides = ({name: {"cg_iterations": args.cg_iterations} for name in SAMPLE_SPACE_METRICS}
                 if args.cg_iterations else {})
    results = {"command": "python -m benchmarks.ngd_step_time " + " ".join(
                   f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                   for k, v in vars(args).items() if v is not None and k != "output"),
               "machine": platform.platform(), "cpus": os.cpu_count(), "tasks": {}}
    for task in args.tasks:
        results["tasks"][task] = measure(task, args.optimizers, args.steps, args.rounds,
                                         overrides)
        for name, row in results["tasks"][task].items():
            print(f"{task:12s} {name:16s} {row['ms_per_step']:8.1f} ms/step "
                  f"({row.get('ratio_to_adam', float('nan')):.2f}x Adam)", flush=True)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
