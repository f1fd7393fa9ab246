"""``tfngd-eval``: the likelihood (bits/dim) of a trained run on held-out data.

Loads the EMA weights of a ``tfngd-train`` run and scores the first
``--num-examples`` examples of a split, batch by batch, with one of:

* ``model="ddpm"`` runs: the DDPM variational bound,
  :func:`tfngd.likelihood.make_variational_bound` (full or respaced chain), with
  its breakdown into prior, decoder and KL terms;
* ``model="ndm"`` runs: the NDM bound,
  :meth:`tfngd.ndm.NeuralDiffusionModel.per_example_bound`;
* ``model="score_sde"`` runs, or ``--ode`` on a ``ddpm`` run (on its
  :class:`~tfngd.sde.DiscreteDDPMSDE` view): the probability-flow ODE likelihood,
  :func:`tfngd.sde.ode_likelihood` (exact divergence for low-dimensional data,
  Hutchinson for images, which are dequantised).

It prints the mean bits/dim with a 95% Student-t confidence interval over
examples; ``--output`` writes everything (with per-example values) as JSON.
See ``docs/likelihood.md`` and ``docs/sde.md``.
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
        description="Evaluate the likelihood (bits per dimension) of a trained run's EMA "
        "weights on held-out data, with a 95% confidence interval over examples: the "
        "variational bound of a ddpm or ndm run, the probability-flow ODE likelihood of a "
        "score_sde run (or of a ddpm run with --ode).",
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
    parser.add_argument("--ode", action="store_true",
                        help="ddpm runs: the probability-flow ODE likelihood on the chain's "
                        "DiscreteDDPMSDE view instead of the bound (score_sde runs always use "
                        "the ODE)")
    parser.add_argument("--rtol", type=float, default=1e-5,
                        help="ODE likelihood: Dormand-Prince relative tolerance")
    parser.add_argument("--atol", type=float, default=1e-5,
                        help="ODE likelihood: Dormand-Prince absolute tolerance")
    parser.add_argument("--timestep-samples", type=int, default=None,
                        help="ndm runs: estimate the T - 1 KL terms from K stratified draws of "
                        "t (default: all of them, exactly)")
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
    for name in ("rtol", "atol"):
        value = getattr(args, name)
        if not (math.isfinite(value) and 0 < value < 1):
            return f"--{name} must be in (0, 1), got {value}"
    if args.timestep_samples is not None and args.timestep_samples < 1:
        return f"--timestep-samples must be >= 1, got {args.timestep_samples}"
    if not os.path.isdir(args.run_dir):
        return f"--run-dir {args.run_dir}: no such directory"
    return None


def method_for(config, args) -> str:
    """``"bound"``, ``"ndm_bound"`` or ``"ode"``; a ``ValueError`` for options the run's
    kind of model does not take."""
    if config.model == "score_sde":
        if args.steps is not None:
            raise ValueError("--steps respaces the DDPM bound: a score_sde run is scored with "
                             "the probability-flow ODE (adaptive steps; see --rtol/--atol)")
        return "ode"
    if config.model == "ndm":
        if args.ode or args.steps is not None:
            raise ValueError("an ndm run is scored with its own bound: --ode and --steps do "
                             "not apply (--timestep-samples estimates the KL terms)")
        return "ndm_bound"
    if args.timestep_samples is not None:
        raise ValueError("--timestep-samples applies to ndm runs only")
    if args.ode and args.steps is not None:
        raise ValueError("--steps respaces the bound; it does not apply with --ode")
    return "ode" if args.ode else "bound"


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


def summarise(values) -> dict:
    from tfngd.metrics import mean_confidence_interval

    mean, low, high = mean_confidence_interval(values, 0.95)
    return {"mean": mean, "ci95_low": None if math.isnan(low) else low,
            "ci95_high": None if math.isnan(high) else high}


def evaluate(args) -> dict:
    """Score the examples with the run's method (:func:`method_for`); returns the
    JSON-ready results."""
    from tfngd import runs

    # Everything that can fail on bad input, before the model is built.
    config, _, _ = runs.read_run_metadata(args.run_dir)
    method = method_for(config, args)
    if args.steps is not None and args.steps > config.num_timesteps:
        raise ValueError(f"--steps must be <= {config.num_timesteps} (the run's chain), "
                         f"got {args.steps}")
    if args.timestep_samples is not None and args.timestep_samples > config.num_timesteps - 1:
        raise ValueError(f"--timestep-samples must be <= {config.num_timesteps - 1} (the "
                         f"run's T - 1 KL terms), got {args.timestep_samples}")
    examples = load_examples(config, args.split, args.num_examples)

    config, model, info = runs.load_trained_model(args.run_dir)
    header = {
        "run_dir": args.run_dir,
        "checkpoint": {"epoch": int(info["epoch"]), "step": int(info["step"])},
        "dataset": config.dataset,
        "model": config.model,
        "method": method,
        "split": args.split,
        "num_examples": len(examples),
        "data": "discrete (256 levels in [-1, 1])" if model.is_image_model else "continuous",
        "seed": args.seed,
    }
    if method == "ode":
        return {**header, **ode_results(args, model, examples)}
    if method == "ndm_bound":
        return {**header, **ndm_results(args, model, examples)}
    return {**header, **bound_results(args, model, examples)}


def _progress_bar(num_examples: int, batch_size: int, verbose: int, metric: str):
    """A Keras progress bar over the batches of ``num_examples`` examples."""
    import keras

    return keras.utils.Progbar(math.ceil(num_examples / batch_size), verbose=verbose,
                               unit_name="batch", stateful_metrics=[metric])


def _batches(examples, batch_size: int, verbose: int, metric: str):
    """``(index, batch, progress)`` over ``examples``, with a Keras progress bar."""
    from tfngd import likelihood

    progress = _progress_bar(len(examples), batch_size, verbose, metric)
    for batch_index, batch in likelihood.example_batches(examples, batch_size):
        yield batch_index, batch, progress


def ode_results(args, model, examples) -> dict:
    """The probability-flow ODE likelihood, batch by batch."""
    import numpy as np
    import tensorflow as tf

    from tfngd import sde as sde_lib

    if isinstance(model, sde_lib.ScoreSDEModel):
        sde, eps_t = model.sde, model.eps_t
    else:
        sde, eps_t = sde_lib.DiscreteDDPMSDE(model.diffusion), 1e-5

    def denoiser_fn(batch_size: int):
        """The EMA network's prediction (without learned-variance channels); a conditional
        model gets its null label (the unconditional model)."""
        label = None
        if model.num_classes is not None:
            label = tf.fill([batch_size], model.null_label)
        network = sde_lib.keras_denoiser_fn(model.ema_denoiser, sde, label)
        return lambda x, t: model.diffusion.split_output(network(x, t))[0]

    bits, nfe = [], []
    started = time.perf_counter()
    for index, batch, progress in _batches(examples, args.batch_size, args.verbose, "bits/dim"):
        out = sde_lib.ode_likelihood(denoiser_fn(len(batch)), sde, tf.constant(batch, tf.float32),
                                     tf.constant([args.seed, index], tf.int64),
                                     rtol=args.rtol, atol=args.atol,
                                     prediction_type=model.diffusion.prediction_type, eps_t=eps_t)
        bits.extend(out.bits_per_dim.numpy().tolist())
        nfe.append(int(out.num_function_evaluations.numpy()))
        progress.update(index + 1, [("bits/dim", float(np.mean(bits)))])
    return {
        "sde": type(sde).__name__,
        "rtol": args.rtol,
        "atol": args.atol,
        "eps_t": eps_t,
        "dequantized": bool(model.is_image_model),
        "network_evaluations_per_example": float(np.mean(nfe)),
        "seconds": time.perf_counter() - started,
        "bits_per_dim": summarise(bits),
        "nats_per_dim": summarise((np.asarray(bits) * math.log(2.0)).tolist()),
        "per_example_bits_per_dim": bits,
    }


def ndm_results(args, model, examples) -> dict:
    """The NDM bound (:meth:`~tfngd.ndm.NeuralDiffusionModel.per_example_bound`)."""
    import numpy as np

    started = time.perf_counter()
    nats = model.per_example_bound(examples, seed=args.seed,
                                   timestep_samples=args.timestep_samples,
                                   batch_size=args.batch_size)
    bits = (nats / (model.data_dims * math.log(2.0))).tolist()
    terms = model.diffusion.num_timesteps - 1
    return {
        "num_timesteps": model.diffusion.num_timesteps,
        "timestep_samples": terms if args.timestep_samples is None else args.timestep_samples,
        "seconds": time.perf_counter() - started,
        "bits_per_dim": summarise(bits),
        "nats_per_dim": summarise((np.asarray(nats) / model.data_dims).tolist()),
        "per_example_bits_per_dim": bits,
    }


def bound_results(args, model, examples) -> dict:
    """The DDPM variational bound on the full or a respaced chain, with its terms."""
    import numpy as np

    from tfngd import likelihood, schedules

    diffusion = model.diffusion
    num_timesteps = diffusion.num_timesteps
    discrete = model.is_image_model
    clip_x0 = discrete and not args.no_clip_x0
    timesteps = None
    if args.steps is not None:
        timesteps = schedules.respaced_timesteps(num_timesteps, args.steps, args.spacing).numpy()
    bound = likelihood.make_variational_bound(model.unconditional_network_fn(), diffusion,
                                              timesteps, clip_x0=clip_x0, discrete=discrete)

    per_example = {key: [] for key in ("bits_per_dim", "nats_per_dim", "prior_bpd",
                                       "decoder_bpd", "kl_bpd")}
    per_step_sum = None
    started = time.perf_counter()
    progress = _progress_bar(len(examples), args.batch_size, args.verbose, "bits/dim")
    for batch_index, batch, out in likelihood.bound_in_batches(bound, examples,
                                                               args.batch_size, args.seed):
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
        "chain": "full" if timesteps is None else "respaced",
        "num_steps": int(len(kept)),
        "spacing": None if timesteps is None else args.spacing,
        "num_timesteps": num_timesteps,
        "variance_type": diffusion.variance_type,
        "clip_x0": bool(clip_x0),
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
    lines = [
        f"{results['run_dir']} (epoch {results['checkpoint']['epoch']}, step "
        f"{results['checkpoint']['step']}, EMA weights, model {results['model']}): "
        f"{results['dataset']} {results['split']} split, {results['num_examples']} examples, "
        f"{results['data']} data",
    ]
    if results["method"] == "ode":
        lines.append(f"probability-flow ODE likelihood on the {results['sde']} (Dormand-Prince, "
                     f"rtol {results['rtol']:g}, atol {results['atol']:g}, from t = "
                     f"{results['eps_t']:g})"
                     + (", dequantised" if results["dequantized"] else ""))
    elif results["method"] == "ndm_bound":
        lines.append(f"NDM variational bound, {results['num_timesteps']} steps, "
                     f"{results['timestep_samples']} KL terms evaluated")
    else:
        chain = ("full chain" if results["chain"] == "full"
                 else f"respaced chain ({results['spacing']} spacing)")
        clipping = "x0 clipped to [-1, 1]" if results["clip_x0"] else "x0 not clipped"
        lines.append(f"DDPM variational bound, {chain} of {results['num_steps']} steps "
                     f"({results['num_timesteps']} trained), {results['variance_type']} "
                     f"variance, {clipping}")
    lines.append(f"bits/dim: {_interval(results['bits_per_dim'])}")
    if results["data"] == "continuous" and "nats_per_dim" in results:
        lines.append(f"nats/dim: {_interval(results['nats_per_dim'])}")
    if results["method"] == "bound":
        terms = [
            ("prior KL(q(x_T|x_0) || N(0, I))", results["prior_bpd"]),
            ("decoder -log p(x_0|x_t0)", results["decoder_bpd"]),
            (f"sum of {results['num_steps'] - 1} KL terms", results["kl_bpd"]),
        ]
        lines += [f"  {name:<34} {summary['mean']:.4f} bits/dim" for name, summary in terms]
    evaluations = results.get("network_evaluations_per_example")
    lines.append((f"{evaluations:g} network evaluations per example, " if evaluations else "")
                 + f"{results['seconds']:.1f} s")
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
