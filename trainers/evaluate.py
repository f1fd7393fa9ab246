"""``tfngd-eval``: the DDPM variational bound (bits/dim) of a trained run on held-out data.

Loads the EMA weights of a ``tfngd-train`` run, evaluates
:func:`tfngd.likelihood.make_variational_bound` on the first ``--num-examples``
examples of a split, batch by batch, and prints the mean bits/dim with a 95%
Student-t confidence interval over examples and the breakdown into prior,
decoder and KL terms; ``--output`` writes everything (with the per-step
terms and per-example totals) as JSON. See ``docs/likelihood.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

PROGRAM = "tfngd-eval"
SPLITS = ("eval", "train")


def build_parser() -> argparse.ArgumentParser:
    from tfngd import schedules
    from trainers import cli

    parser = argparse.ArgumentParser(
        prog=PROGRAM, formatter_class=cli.HelpFormatter,
        description="Evaluate the DDPM variational bound (bits per dimension) of a trained "
        "run's EMA weights on held-out data, with a 95% confidence interval over examples.",
    )
    parser.add_argument("--run-dir", required=True,
                        help="a tfngd-train run directory (newest checkpoint, EMA weights)")
    parser.add_argument("--split", choices=SPLITS, default="eval",
                        help="eval: the data set's held-out split (Keras' validation data); "
                        "train: the training split")
    parser.add_argument("--num-examples", type=int, default=None,
                        help="evaluate the first N examples of the split (default: all of it)")
    parser.add_argument("--batch-size", type=int, default=100, help="examples per batch")
    parser.add_argument("--steps", type=int, default=None,
                        help="respaced chain of N steps, 2 <= N <= T (default: the full chain)")
    parser.add_argument("--spacing", choices=schedules.SPACINGS, default="linspace",
                        help="how --steps picks the kept timesteps; linspace keeps t = 0 and "
                        "T - 1, like improved-diffusion's respacing")
    parser.add_argument("--no-clip-x0", action="store_true",
                        help="do not clip the predicted x0 to [-1, 1] (images are clipped by "
                        "default, as in the reference evaluations; vectors never are)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Monte-Carlo draws")
    parser.add_argument("--output", default=None, help="write the results to this JSON file")
    parser.add_argument("--verbose", type=int, choices=(0, 1), default=1,
                        help="1: a progress bar over batches; 0: only the results")
    return parser


def check_arguments(args) -> str | None:
    """The first problem with the numeric arguments, or None."""
    if args.num_examples is not None and args.num_examples < 1:
        return f"--num-examples must be >= 1, got {args.num_examples}"
    if args.batch_size < 1:
        return f"--batch-size must be >= 1, got {args.batch_size}"
    if args.steps is not None and args.steps < 2:
        return (f"--steps must be >= 2 (the decoder's variance needs two kept steps), "
                f"got {args.steps}")
    if not os.path.isdir(args.run_dir):
        return f"--run-dir {args.run_dir}: no such directory"
    return None


def load_examples(config, split: str, num_examples: int | None):
    """The first ``num_examples`` (None: all) examples of the run's data set ``split``."""
    from tfngd import data as data_lib

    splits = data_lib.load_dataset(config.dataset, data_dir=config.data_dir,
                                   num_train=config.num_train, seed=config.seed)
    examples = splits.eval if split == "eval" else splits.train
    if num_examples is None:
        return examples
    if num_examples > len(examples):
        raise ValueError(f"--num-examples {num_examples} is more than the {len(examples)} "
                         f"examples of the {config.dataset} {split} split")
    return examples[:num_examples]


def model_denoiser_fn(model):
    """``fn(x_t, t)`` of the EMA weights; a conditional model gets its null label
    (the unconditional model, as ``tfngd-sample`` draws without ``--label``)."""
    import tensorflow as tf

    from tfngd import samplers

    if model.num_classes is None:
        return samplers.denoiser_fn(model.ema_denoiser)

    def unconditional(x, t):
        null = tf.fill(tf.shape(t), model.null_label)
        return samplers.denoiser_fn(model.ema_denoiser, label=null)(x, t)

    return unconditional


def summarise(values) -> dict:
    from tfngd.metrics import mean_confidence_interval

    mean, low, high = mean_confidence_interval(values, 0.95)
    return {"mean": mean, "ci95_low": None if math.isnan(low) else low,
            "ci95_high": None if math.isnan(high) else high}


def evaluate(args) -> dict:
    """Run the bound over the examples; returns the JSON-ready results."""
    import keras
    import numpy as np
    import tensorflow as tf

    from tfngd import likelihood, runs, schedules

    # Everything that can fail on bad input, before the model is built.
    config, _, _ = runs.read_run_metadata(args.run_dir)
    num_timesteps = config.num_timesteps
    if args.steps is not None and args.steps > num_timesteps:
        raise ValueError(f"--steps must be <= {num_timesteps} (the run's chain), "
                         f"got {args.steps}")
    examples = load_examples(config, args.split, args.num_examples)

    config, model, info = runs.load_trained_model(args.run_dir)
    diffusion = model.diffusion
    discrete = model.is_image_model
    clip_x0 = discrete and not args.no_clip_x0
    timesteps = None
    if args.steps is not None:
        timesteps = schedules.respaced_timesteps(num_timesteps, args.steps, args.spacing).numpy()
    bound = likelihood.make_variational_bound(model_denoiser_fn(model), diffusion, timesteps,
                                              clip_x0=clip_x0, discrete=discrete)
    # One graph for every batch size (the last batch may be smaller).
    bound = bound.get_concrete_function(
        tf.TensorSpec([None, *examples.shape[1:]], tf.float32), tf.TensorSpec([2], tf.int64))

    num_batches = math.ceil(len(examples) / args.batch_size)
    progress = keras.utils.Progbar(num_batches, verbose=args.verbose, unit_name="batch",
                                   stateful_metrics=["bits/dim"])
    per_example = {key: [] for key in ("bits_per_dim", "nats_per_dim", "prior_bpd",
                                       "decoder_bpd", "kl_bpd")}
    per_step_sum = None
    started = time.perf_counter()
    for batch_index in range(num_batches):
        batch = examples[batch_index * args.batch_size:(batch_index + 1) * args.batch_size]
        out = bound(tf.constant(batch, tf.float32),
                    tf.constant([args.seed, batch_index], tf.int64))
        for key, values in per_example.items():
            values.extend(out[key].numpy().tolist())
        # per_step_bpd is a batch mean: weight by the batch size to average over examples.
        weighted = out["per_step_bpd"].numpy().astype(np.float64) * len(batch)
        per_step_sum = weighted if per_step_sum is None else per_step_sum + weighted
        progress.update(batch_index + 1,
                        [("bits/dim", float(np.mean(per_example["bits_per_dim"])))])
    seconds = time.perf_counter() - started

    kept = out["timesteps"].numpy()
    results = {
        "run_dir": args.run_dir,
        "checkpoint": {"epoch": int(info["epoch"]), "step": int(info["step"])},
        "dataset": config.dataset,
        "split": args.split,
        "num_examples": len(examples),
        "data": "discrete (256 levels in [-1, 1])" if discrete else "continuous",
        "chain": "full" if timesteps is None else "respaced",
        "num_steps": int(len(kept)),
        "spacing": None if timesteps is None else args.spacing,
        "num_timesteps": num_timesteps,
        "variance_type": diffusion.variance_type,
        "clip_x0": bool(clip_x0),
        "seed": args.seed,
        "network_evaluations_per_example": int(len(kept)),
        "seconds": seconds,
        "bits_per_dim": summarise(per_example["bits_per_dim"]),
        "nats_per_dim": summarise(per_example["nats_per_dim"]),
        "prior_bpd": summarise(per_example["prior_bpd"]),
        "decoder_bpd": summarise(per_example["decoder_bpd"]),
        "kl_bpd": summarise(per_example["kl_bpd"]),
        "timesteps": kept.tolist(),
        "per_step_bpd": (per_step_sum / len(examples)).tolist(),
        "per_example_bits_per_dim": per_example["bits_per_dim"],
    }
    return results


def _interval(summary: dict) -> str:
    if summary["ci95_low"] is None:
        return f"{summary['mean']:.4f} (one example: no interval)"
    return (f"{summary['mean']:.4f} (95% CI {summary['ci95_low']:.4f} .. "
            f"{summary['ci95_high']:.4f})")


def report(results: dict) -> str:
    chain = ("full chain" if results["chain"] == "full"
             else f"respaced chain ({results['spacing']} spacing)")
    clipping = ("x0 clipped to [-1, 1]" if results["clip_x0"]
                else "x0 not clipped")
    lines = [
        f"{results['run_dir']} (epoch {results['checkpoint']['epoch']}, step "
        f"{results['checkpoint']['step']}, EMA weights): {results['dataset']} "
        f"{results['split']} split, {results['num_examples']} examples",
        f"{chain} of {results['num_steps']} steps ({results['num_timesteps']} trained), "
        f"{results['variance_type']} variance, {clipping}, {results['data']} data",
        f"bits/dim: {_interval(results['bits_per_dim'])}",
    ]
    if results["data"] == "continuous":
        lines.append(f"nats/dim: {_interval(results['nats_per_dim'])}")
    terms = [
        ("prior KL(q(x_T|x_0) || N(0, I))", results["prior_bpd"]),
        ("decoder -log p(x_0|x_t0)", results["decoder_bpd"]),
        (f"sum of {results['num_steps'] - 1} KL terms", results["kl_bpd"]),
    ]
    lines += [f"  {name:<34} {summary['mean']:.4f} bits/dim" for name, summary in terms]
    lines += [
        f"{results['network_evaluations_per_example']} network evaluations per example, "
        f"{results['seconds']:.1f} s",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    from trainers import cli

    args = build_parser().parse_args(argv)
    problem = check_arguments(args)
    if problem:
        return cli.fail(PROGRAM, problem)
    import tensorflow as tf

    from tfngd import checkpointing
    from tfngd import data as data_lib
    from tfngd.config import ConfigError

    try:
        results = evaluate(args)
    except (FileNotFoundError, ConfigError, checkpointing.CheckpointError, data_lib.DataError,
            ValueError, tf.errors.InvalidArgumentError) as err:
        message = err.message if isinstance(err, tf.errors.OpError) else err
        return cli.fail(PROGRAM, message)
    print(report(results))
    if args.output:
        try:
            directory = os.path.dirname(os.path.abspath(args.output))
            os.makedirs(directory, exist_ok=True)
            with open(args.output, "w") as f:
                json.dump(results, f, indent=2)
        except OSError as err:
            return cli.fail(PROGRAM, f"cannot write --output {args.output}: {err}")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
