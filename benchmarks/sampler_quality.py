"""Sample quality against the number of steps: ancestral DDPM, DDIM and DPM-Solver++ (2M).

    python -m benchmarks.sampler_quality --run-dir runs/digits_cond

Draws ``--num-samples`` unconditional samples (``label=None``: the null label of a
class-conditional model) of a trained run's EMA model with each sampler at each number
of steps, from the same seed, and scores them with the benchmark's image metrics
(:class:`tfngd.bench.sample_quality.SampleEvaluator`: Frechet distance and KID in the
features of the data set's shipped classifier, against the held-out split). The
real-data floor is the same metrics on as many training images. Times are wall-clock
seconds of one sampler call after a first, tracing call of the same sampler (the
graph is traced once per sampler; ``num_steps`` is a tensor). Writes JSON to
benchmarks/results/ and a grid (rows: sampler and steps) of ``--grid-samples`` samples
drawn in a separate small call of each sampler with the same seed to docs/images/.

The runs of one sampler are independent of the others', so the table may be measured
in parallel processes (``--samplers ddim --output part_ddim.json --no-grid``, ...) and
combined with ``--merge part_*.json`` (which also draws the grid unless ``--no-grid``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
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
    parser.add_argument("--run-dir", default="runs/digits_cond")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (same for all)")
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLER_NAMES),
                        choices=SAMPLER_NAMES)
    parser.add_argument("--output", default="benchmarks/results/sampler_quality_digits.json")
    parser.add_argument("--grid", default="docs/images/sampler_quality_digits.png")
    parser.add_argument("--grid-samples", type=int, default=GRID_SAMPLES)
    parser.add_argument("--no-grid", action="store_true", help="do not draw the grid")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="combine the runs of these results into --output (no metrics)")
    parser.add_argument("--floor-seeds", type=int, default=1,
                        help="score this many random training subsets for the floor's spread")
    parser.add_argument("--grid-only", action="store_true",
                        help="only draw the grid of --samplers x --steps (no metrics, no JSON)")
    args = parser.parse_args(argv)

    import tensorflow as tf

    from tfngd import data, runs
    from tfngd.bench.sample_quality import SampleEvaluator

    config, model, *_ = runs.load_trained_model(args.run_dir)
    if args.grid_only:
        draw_grid(model, config, [(n, k) for n in args.samplers for k in args.steps], args)
        print(f"wrote {args.grid}")
        return 0
    splits = data.load_dataset(config.dataset, data_dir=config.data_dir)
    evaluator = SampleEvaluator("images", splits.eval, dataset=config.dataset,
                                train=splits.train)
    floor, skipped = evaluator.data_floor(args.num_samples, seed=args.seed)
    result = {
        "command": " ".join(["python -m benchmarks.sampler_quality",
                             *(sys.argv[1:] if argv is None else argv)]),
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
    if args.floor_seeds > 1:
        # The spread of the metrics over subsets of real images of the same size: a lower
        # bound on their sampling noise (the subsets of a 1500-image split overlap).
        values = [evaluator.data_floor(args.num_samples, seed=args.seed + i)[0]
                  for i in range(args.floor_seeds)]
        result["floor"]["spread"] = {
            key: {"mean": float(np.mean([v[key] for v in values])),
                  "std": float(np.std([v[key] for v in values], ddof=1)),
                  "min": float(min(v[key] for v in values)),
                  "max": float(max(v[key] for v in values))}
            for key in ("frechet_distance", "kid")}
        result["floor"]["spread"]["seeds"] = [args.seed + i for i in range(args.floor_seeds)]
    print("floor", result["floor"], skipped, flush=True)
    if args.merge:
        result = merge(args.merge, result)
    for name in args.samplers if not args.merge else ():
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
            print(json.dumps(row), flush=True)
            _write(args.output, result)  # after every run: a partial table survives
    if not args.no_grid:
        rows = [(r["sampler"], r["num_steps"]) for r in result["runs"]]
        result["grid"] = draw_grid(model, config, rows, args)
    _write(args.output, result)
    print(f"wrote {args.output}" + ("" if args.no_grid else f" and {args.grid}"))
    return 0


def draw_grid(model, config, rows, args) -> dict:
    """A PNG with one row of ``--grid-samples`` samples per (sampler, steps), same seed."""
    from tfngd import images

    grid = [model.sample(args.grid_samples, seed=args.seed, num_steps=steps, sampler=name,
                         clip_x0=config.clip_x0).numpy() for name, steps in rows]
    images.save_png(args.grid, images.image_grid(np.concatenate(grid), ncols=args.grid_samples,
                                                 scale=4))
    return {"path": args.grid, "rows": [f"{n} {k}" for n, k in rows],
            "samples_per_row": args.grid_samples, "seed": args.seed}


def _write(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def merge(paths, result: dict) -> dict:
    """``result`` with the runs of the results at ``paths`` (same model, samples, seed),
    in sampler then step order."""
    runs, commands = {}, []
    for path in paths:
        with open(path) as f:
            part = json.load(f)
        for key in ("run_dir", "num_samples", "seed", "clip_x0"):
            if part[key] != result[key]:
                raise ValueError(f"{path}: {key}={part[key]!r}, expected {result[key]!r}")
        commands.append(part["command"])
        runs.update({(r["sampler"], r["num_steps"]): r for r in part["runs"]})
    order = {name: i for i, name in enumerate(SAMPLER_NAMES)}
    result["runs"] = [runs[key] for key in sorted(runs, key=lambda k: (order[k[0]], k[1]))]
    result["merged_from"] = {"files": list(paths), "commands": commands}
    return result


if __name__ == "__main__":
    raise SystemExit(main())
