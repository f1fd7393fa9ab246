"""Sample quality against the number of steps: ancestral DDPM, DDIM and DPM-Solver++ (2M).

    python -m benchmarks.sampler_quality --run-dir /work/models/digits_cond

Draws ``--num-samples`` unconditional samples (``label=None``: the null label of a
class-conditional model) of a trained run's EMA model with each sampler at each number
of steps, from the same seed, and scores them with the benchmark's image metrics
(:class:`tfngd.bench.sample_quality.SampleEvaluator`: Frechet distance and KID in the
features of the data set's shipped classifier, against the held-out split). The
real-data floor is the same metrics on as many training images. Times are wall-clock
seconds of one sampler call after a first, tracing call of the same sampler (the
graph is traced once per sampler; ``num_steps`` is a tensor). Writes JSON to
benchmarks/results/ and a grid of the first samples (rows: sampler and steps) to
docs/images/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

SAMPLER_NAMES = ("ddpm", "ddim", "dpmpp_2m")
STEPS = (10, 20, 50, 1000)
GRID_SAMPLES = 12


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", default="/work/models/digits_cond")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (same for all)")
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLER_NAMES),
                        choices=SAMPLER_NAMES)
    parser.add_argument("--output", default="benchmarks/results/sampler_quality_digits.json")
    parser.add_argument("--grid", default="docs/images/sampler_quality_digits.png")
    args = parser.parse_args(argv)

    import tensorflow as tf

    from tfngd import data, images, runs
    from tfngd.bench.sample_quality import SampleEvaluator

    config, model, *_ = runs.load_trained_model(args.run_dir)
    splits = data.load_dataset(config.dataset, data_dir=config.data_dir)
    evaluator = SampleEvaluator("images", splits.eval, dataset=config.dataset,
                                train=splits.train)
    floor, skipped = evaluator.data_floor(args.num_samples, seed=args.seed)
    result = {
        "command": "python -m benchmarks.sampler_quality " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()),
        "run_dir": args.run_dir,
        "model": {"dataset": config.dataset, "schedule": config.schedule,
                  "num_timesteps": config.num_timesteps,
                  "prediction_type": config.prediction_type, "optimizer": config.optimizer,
                  "conditional": config.conditional},
        "num_samples": args.num_samples,
        "seed": args.seed,
        "label": None,
        "clip_x0": bool(config.clip_x0),
        "spacing": "trailing",
        "reference": f"{config.dataset} held-out split ({len(splits.eval)} images)",
        "floor": {"num_samples": min(args.num_samples, len(splits.train)), **floor,
                  "skipped": skipped},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "tensorflow": tf.__version__},
        "runs": [],
    }
    print("floor", floor, skipped, flush=True)
    grid_rows = []
    for name in args.samplers:
        # The first call traces the graph of this sampler (num_steps is a tensor input).
        _, trace_seconds = _timed(lambda name=name: model.sample(
            args.num_samples, seed=args.seed, num_steps=1, sampler=name,
            clip_x0=config.clip_x0))
        for steps in args.steps:
            samples, seconds = _timed(lambda name=name, steps=steps: model.sample(
                args.num_samples, seed=args.seed, num_steps=steps, sampler=name,
                clip_x0=config.clip_x0).numpy())
            scores, reason = evaluator(samples)
            row = {"sampler": name, "num_steps": steps, "seconds": round(seconds, 2),
                   "trace_seconds": round(trace_seconds, 2), **scores, "skipped": reason,
                   "loadavg": [round(v, 2) for v in os.getloadavg()]}
            result["runs"].append(row)
            grid_rows.append(samples[:GRID_SAMPLES])
            print(json.dumps(row), flush=True)
            os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
            with open(args.output, "w") as f:  # after every run: a partial table survives
                json.dump(result, f, indent=2)
    grid = images.image_grid(np.concatenate(grid_rows), ncols=GRID_SAMPLES, scale=4)
    images.save_png(args.grid, grid)
    result["grid"] = {"path": args.grid, "rows": [f"{r['sampler']} {r['num_steps']}"
                                                  for r in result["runs"]],
                      "samples_per_row": GRID_SAMPLES}
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.output} and {args.grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
