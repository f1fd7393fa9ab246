"""``tfngd-bench``: the honest optimizer benchmark (see BENCHMARKS.md).

    tfngd-bench --tasks checkerboard 8gaussians swissroll --optimizers adam adamw sgd kfac \\
        --seeds 3

Stage 1 tunes every optimizer with the same number of short runs, stage 2 runs
each winner on the full horizon for several seeds; the report compares steps
and wall-clock seconds to the first-order target, values at matched steps and
seconds, and sample quality. Each finished trial is a JSON file under
``<output>/trials``: re-running the same command resumes; ``--report-only``
re-renders ``REPORT.md`` and ``results.json`` from those files.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import warnings

PROGRAM = "tfngd-bench"
DEFAULT_OUTPUT = os.path.join("benchmarks", "results", "optimizers")
DEFAULT_DATA_DIR = os.path.join("..", "shared", "data", "mnist")


def build_parser() -> argparse.ArgumentParser:
    from trainers import cli

    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Benchmark optimizers on diffusion tasks with equal tuning budgets, several "
        "seeds, and steps and wall-clock seconds to a first-order target.",
        formatter_class=cli.HelpFormatter,
    )
    parser.add_argument("--tasks", nargs="+", default=["checkerboard", "8gaussians", "swissroll"],
                        help="tasks: checkerboard, 8gaussians, swissroll, digits, mnist "
                        "(space or comma separated)")
    parser.add_argument("--optimizers", nargs="+", default=None,
                        help="optimizers (default: every one of tfngd.config.OPTIMIZERS)")
    parser.add_argument("--seeds", default="3", help="stage-2 seeds per optimizer")
    parser.add_argument("--tune-steps", default=None,
                        help="tuning horizon in steps (default: per task)")
    parser.add_argument("--steps", default=None, help="full horizon in steps (default: per task)")
    parser.add_argument("--eval-every", default=None,
                        help="validation interval in steps; must divide both horizons "
                        "(default: per task)")
    parser.add_argument("--grid", action="append", default=[], metavar="OPT:PARAM=V1,V2",
                        help="replace one value list of an optimizer's tuning grid, e.g. "
                        "adam:learning_rate=1e-3,2e-3 or kfac:damping=1e-3,1e-2 "
                        "(OPT=V1,V2 means the learning rate); repeatable")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        dest="overrides",
                        help="override a shared TrainConfig option of every task, e.g. "
                        "hidden_units=64 (not the optimizer's hyperparameters); repeatable")
    parser.add_argument("--num-samples", default=None,
                        help="final samples per stage-2 run (default: per task)")
    parser.add_argument("--curve-samples", default=None,
                        help="samples at every evaluation point of a stage-2 run, 0 disables "
                        "(default: per task)")
    parser.add_argument("--bpd-chain-steps", default=None,
                        help="steps of the respaced chain on which stage-2 trials of image "
                        "tasks score held-out bits/dim (at least 2), or 'full' for the "
                        "whole T-step chain, the bound comparable with published numbers "
                        "(about T/100 times slower) (default: 100)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="output directory")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                        help="MNIST IDX directory (task mnist)")
    parser.add_argument("--report-only", action="store_true",
                        help="only re-render REPORT.md and results.json from --output")
    parser.add_argument("--jit", action="store_true", help="compile the train steps with XLA")
    return parser


def _split(values) -> tuple[str, ...]:
    return tuple(part.strip() for value in values for part in value.split(",") if part.strip())


def _integer(option: str, text, minimum: int = 1) -> int | None:
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError as err:
        raise ValueError(f"{option} must be an integer, got {text!r}") from err
    if value < minimum:
        kind = "positive" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"{option} must be {kind}, got {value}")
    return value


def settings_from_args(args):
    """The validated :class:`~tfngd.bench.protocol.BenchSettings` of the command line."""
    from tfngd.bench import grids, protocol
    from tfngd.config import OPTIMIZERS

    overrides = dict(protocol.parse_override(text) for text in args.overrides)
    tasks = _split(args.tasks)
    return protocol.BenchSettings(
        tasks=tasks,
        optimizers=_split(args.optimizers) if args.optimizers else tuple(OPTIMIZERS),
        seeds=_integer("--seeds", args.seeds),
        tune_steps=_integer("--tune-steps", args.tune_steps),
        steps=_integer("--steps", args.steps),
        eval_every=_integer("--eval-every", args.eval_every),
        grids=grids.grid_overrides(args.grid),
        config_overrides=overrides,
        num_samples=_integer("--num-samples", args.num_samples),
        curve_samples=_integer("--curve-samples", args.curve_samples, minimum=0),
        bpd_chain_steps=(args.bpd_chain_steps if args.bpd_chain_steps in (None, "full")
                         else _integer("--bpd-chain-steps", args.bpd_chain_steps, minimum=2)),
        data_dir=args.data_dir,
        jit=args.jit,
    ).validate()


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # fit(validation_data=dataset) passes shuffle=True to its internal evaluation: harmless.
    warnings.filterwarnings("ignore", message=r".*`shuffle=True` was passed.*")
    from trainers import cli

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.report_only:
        from tfngd.bench.report import render_report

        try:
            render_report(args.output, progress=print)
        except (FileNotFoundError, ValueError, KeyError) as err:
            return cli.fail(PROGRAM, err)
        return 0

    from tfngd.bench import benchmark, tasks

    try:
        settings = settings_from_args(args)
    except ValueError as err:
        return cli.fail(PROGRAM, err)
    needing = [name for name in settings.tasks if tasks.get_task(name).needs_data_dir]
    if needing and not os.path.isdir(args.data_dir):
        return cli.fail(PROGRAM, f"--data-dir {args.data_dir} does not exist (needed by task "
                                 f"{', '.join(needing)})")
    command = shlex.join([PROGRAM, *argv])
    from tfngd.config import ConfigError
    from tfngd.data import DataError

    try:
        benchmark.run_benchmark(settings, args.output, command)
    except (ConfigError, DataError, FileNotFoundError) as err:
        return cli.fail(PROGRAM, err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
