"""``tfngd-sample``: a PNG grid of samples from a training run or an exported SavedModel."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

PROGRAM = "tfngd-sample"


def build_parser() -> argparse.ArgumentParser:
    from tfngd.config import SAMPLER_CHOICES
    from trainers import cli

    parser = argparse.ArgumentParser(
        prog=PROGRAM, formatter_class=cli.HelpFormatter,
        description="Draw samples and write them as a PNG grid (images) or scatter plot (2-D).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", help="a tfngd-train run directory (newest checkpoint, EMA)")
    source.add_argument("--saved-model", help="a SavedModel written by tfngd-export")
    parser.add_argument("--output", default="samples.png", help="PNG file to write")
    parser.add_argument("--num-samples", type=int, default=64, help="number of samples")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling steps (default: the run's sample_steps; 50 for SavedModels)")
    parser.add_argument("--sampler", choices=SAMPLER_CHOICES, default=None,
                        help="sampler (run dirs only; default: the run's; which ones a run "
                        "takes depends on its model kind)")
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta (run dirs only)")
    parser.add_argument("--label", type=int, default=None, help="class label (conditional)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance scale (conditional)")
    return parser


def samples_from_run(args):
    from tfngd import runs

    config, _, _ = runs.read_run_metadata(args.run_dir)  # check the options before loading
    settings = dataclasses.replace(
        config, sampler=args.sampler or config.sampler,
        eta=config.eta if args.eta is None else args.eta).validate()
    config, model, _ = runs.load_trained_model(args.run_dir)
    kwargs = settings.sample_kwargs()
    kwargs["num_steps"] = args.steps or config.sample_steps
    if config.model != "ndm":  # NDMs are unconditional
        kwargs.update(label=args.label, guidance_scale=args.guidance_scale)
    return model.sample(args.num_samples, seed=args.seed, **kwargs).numpy()


def samples_from_saved_model(args):
    import tensorflow as tf

    if not os.path.exists(os.path.join(args.saved_model, "saved_model.pb")):
        raise FileNotFoundError(f"{args.saved_model} holds no saved_model.pb")
    serving = tf.saved_model.load(args.saved_model).signatures["serving_default"]
    inputs = {
        "num_samples": tf.constant(args.num_samples, tf.int32),
        "seed": tf.constant(args.seed, tf.int64),
        "num_steps": tf.constant(args.steps or 50, tf.int32),
    }
    if "label" in serving.structured_input_signature[1]:
        inputs["label"] = tf.constant(args.label or 0, tf.int32)
        inputs["guidance_scale"] = tf.constant(
            1.0 if args.guidance_scale is None else args.guidance_scale, tf.float32)
    return serving(**inputs)["samples"].numpy()


def main(argv=None) -> int:
    from trainers import cli

    args = build_parser().parse_args(argv)
    if args.num_samples < 1:
        return cli.fail(PROGRAM, f"--num-samples must be >= 1, got {args.num_samples}")
    if args.steps is not None and args.steps < 1:
        return cli.fail(PROGRAM, f"--steps must be >= 1, got {args.steps}")
    import tensorflow as tf

    from tfngd import checkpointing, images
    from tfngd.config import ConfigError

    try:
        if args.run_dir:
            samples = samples_from_run(args)
        else:
            samples = samples_from_saved_model(args)
    except (FileNotFoundError, ConfigError, checkpointing.CheckpointError, ValueError,
            tf.errors.InvalidArgumentError) as err:
        message = err.message if isinstance(err, tf.errors.OpError) else err
        return cli.fail(PROGRAM, message)
    path = images.save_png(args.output, images.samples_to_image(samples))
    print(f"wrote {len(samples)} samples to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
