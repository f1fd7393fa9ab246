"""``tfngd-export``: export a training run's EMA sampler as a SavedModel for TF Serving."""

from __future__ import annotations

import argparse
import os
import sys

PROGRAM = "tfngd-export"


def build_parser() -> argparse.ArgumentParser:
    from tfngd import samplers
    from trainers import cli

    parser = argparse.ArgumentParser(
        prog=PROGRAM, formatter_class=cli.HelpFormatter,
        description="Write <export-root>/<name>/<version>/, a SavedModel whose serving_default "
        "signature takes num_samples, seed and num_steps (plus label and guidance_scale for "
        "conditional models) and returns samples.",
    )
    parser.add_argument("--run-dir", required=True, help="a tfngd-train run directory")
    parser.add_argument("--export-root", default="saved_models", help="root of the exports")
    parser.add_argument("--name", default=None, help="model name (default: the run's dataset)")
    parser.add_argument("--version", type=int, default=None,
                        help="version number (default: one more than the newest)")
    parser.add_argument("--sampler", choices=samplers.SAMPLERS, default=None,
                        help="sampler baked into the export (default: the run's)")
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta (default: the run's)")
    parser.add_argument("--max-samples", type=int, default=64,
                        help="largest num_samples a request may ask for")
    return parser


def main(argv=None) -> int:
    from trainers import cli

    args = build_parser().parse_args(argv)
    if args.version is not None and args.version < 1:
        return cli.fail(PROGRAM, f"--version must be >= 1, got {args.version}")
    from tfngd import checkpointing, export, runs
    from tfngd.config import ConfigError
    from trainers.train import next_version

    try:
        config, _, _ = runs.read_run_metadata(args.run_dir)
        if config.model != "ddpm":
            raise ConfigError(f"{args.run_dir} is a model={config.model!r} run; the SavedModel "
                              "sampler serves model='ddpm' runs only")
        config, model, _ = runs.load_trained_model(args.run_dir)
        name = args.name or config.dataset
        version = args.version or next_version(args.export_root, name)
        export_dir = os.path.join(args.export_root, name, str(version))
        if os.path.exists(export_dir):
            return cli.fail(PROGRAM, f"{export_dir} exists; choose another --version")
        export.export_sampler(
            model, export_dir, sampler=args.sampler or config.sampling_method,
            eta=config.eta if args.eta is None else args.eta, clip_x0=config.clip_x0,
            max_samples=args.max_samples,
        )
    except (FileNotFoundError, ConfigError, checkpointing.CheckpointError, ValueError) as err:
        return cli.fail(PROGRAM, err)
    print(f"exported {export_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
