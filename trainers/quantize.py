"""``tfngd-quantize``: a training run's EMA denoiser as float32 / int8 TensorFlow Lite files.

Writes ``<export-root>/<name>/tflite/denoiser_<mode>.tflite`` (beside the SavedModel
versions of ``tfngd-export``; TF Serving loads numeric version directories only) and
``tflite_export.json``. int8 is calibrated on ``q(x_t | x_0)`` over the run's training
images at timesteps spread over the chain (:mod:`tfngd.quantization`).
"""

from __future__ import annotations

import argparse
import os
import sys

PROGRAM = "tfngd-quantize"


def build_parser() -> argparse.ArgumentParser:
    from tfngd import quantization
    from trainers import cli

    parser = argparse.ArgumentParser(
        prog=PROGRAM, formatter_class=cli.HelpFormatter,
        description="Convert a run's EMA denoiser to TensorFlow Lite: float32, int8 "
        "post-training quantization (calibrated on the forward process) and/or "
        "dynamic-range quantization.",
    )
    parser.add_argument("--run-dir", required=True, help="a tfngd-train run directory")
    parser.add_argument("--export-root", default="saved_models", help="root of the exports")
    parser.add_argument("--name", default=None, help="model name (default: the run's dataset)")
    parser.add_argument("--output-dir", default=None,
                        help="where to write (default: <export-root>/<name>/tflite)")
    parser.add_argument("--modes", nargs="+", default=["float32", "int8"],
                        choices=quantization.MODES, help="what to write")
    parser.add_argument("--calibration-examples", type=int,
                        default=quantization.DEFAULT_CALIBRATION_EXAMPLES,
                        help="representative examples x_t ~ q(x_t | x_0) for int8")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration draws")
    return parser


def main(argv=None) -> int:
    from trainers import cli

    args = build_parser().parse_args(argv)
    if args.calibration_examples < 1:
        return cli.fail(PROGRAM, f"--calibration-examples must be >= 1, got "
                        f"{args.calibration_examples}")
    from tfngd import checkpointing, quantization, runs
    from tfngd import data as data_lib
    from tfngd.config import ConfigError

    try:
        config, _, _ = runs.read_run_metadata(args.run_dir)
        if config.model != "ddpm":
            raise ConfigError(f"{args.run_dir} is a model={config.model!r} run; TFLite "
                              "conversion takes model='ddpm' runs only")
        config, model, _ = runs.load_trained_model(args.run_dir)
        output_dir = args.output_dir or os.path.join(args.export_root,
                                                     args.name or config.dataset, "tflite")
        calibration, description = None, None
        if "int8" in args.modes:
            splits = data_lib.load_dataset(config.dataset, data_dir=config.data_dir,
                                           num_train=config.num_train, seed=config.seed)
            calibration = quantization.calibration_inputs(
                model, splits.train, splits.train_labels if model.num_classes else None,
                args.calibration_examples, seed=args.seed)
            description = (f"{args.calibration_examples} draws of q(x_t | x_0), x_0 from the "
                           f"{config.dataset} training split, t stratified over [0, "
                           f"{model.diffusion.num_timesteps}), seed {args.seed}")
        paths = quantization.export_tflite(model, output_dir, args.modes, calibration,
                                           description)
    except (FileNotFoundError, ConfigError, checkpointing.CheckpointError, ValueError) as err:
        return cli.fail(PROGRAM, err)
    for mode, path in paths.items():
        print(f"wrote {mode}: {path} ({os.path.getsize(path)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
