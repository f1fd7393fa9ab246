"""``tfngd-train``: train a diffusion model with ``model.fit``.

With no arguments it trains the default U-Net on scikit-learn's 8x8 digits
(built in, no download) and writes, under ``runs/digits``: TensorBoard logs,
crash-safe checkpoints, ``samples.png``; and a SavedModel for TF Serving under
``saved_models/digits/<version>``. Re-running the same command resumes from
the last checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from tfngd import checkpointing, distribute, nonfinite, runs
from tfngd import data as data_lib
from tfngd.config import (
    RUNTIME_OPTIONS,
    ConfigError,
    TrainConfig,
    build_model,
    build_optimizer,
)

PROGRAM = "tfngd-train"


def build_parser() -> argparse.ArgumentParser:
    from trainers import cli

    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Train a DDPM-style diffusion model with model.fit. Re-running with the "
        "same --run-dir resumes from its last checkpoint.",
        formatter_class=cli.HelpFormatter,
    )
    parser.add_argument("--run-dir", default=None,
                        help="output directory (default: runs/<dataset>)")
    parser.add_argument("--export-root", default="saved_models",
                        help="SavedModels are written to <export-root>/<export-name>/<version>")
    parser.add_argument("--export-name", default=None, help="model name (default: <dataset>)")
    parser.add_argument("--no-export", action="store_true", help="skip the SavedModel export")
    parser.add_argument("--sample-every-epochs", type=int, default=5,
                        help="write a sample grid to TensorBoard every N epochs (0: never)")
    parser.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2),
                        help="Keras fit verbosity: 0 silent, 1 progress bar, 2 one line per epoch")
    parser.add_argument("--cpu-devices", type=int, default=None, metavar="N",
                        help="split the CPU into N logical devices, so that --strategy "
                             "mirrored runs N replicas without GPUs (tests, overhead "
                             "measurements)")
    cli.add_config_arguments(parser, TrainConfig())
    return parser


def prepare(config: TrainConfig, run_dir: str):
    """Everything that can fail on bad input, before any training: data, config checks."""
    config.validate()
    splits = data_lib.load_dataset(config.dataset, data_dir=config.data_dir,
                                   num_train=config.num_train, seed=config.seed)
    data_lib.validate_examples(splits.train, name=f"{config.dataset} training data")
    data_lib.validate_examples(splits.eval, expected_shape=splits.data_shape,
                               name=f"{config.dataset} evaluation data")
    if config.batch_size > len(splits.train):
        raise ConfigError(f"batch_size={config.batch_size} is larger than the "
                          f"{len(splits.train)} training examples")
    if config.conditional and splits.num_classes is None:
        raise ConfigError(f"conditional=True, but data set {config.dataset!r} has no labels")
    existing = os.path.join(run_dir, runs.CONFIG_FILE)
    if os.path.exists(existing):
        before = TrainConfig.load(existing).to_dict()
        changed = sorted(k for k, v in config.to_dict().items()
                         if before.get(k) != v and k not in RUNTIME_OPTIONS)
        if changed:
            raise ConfigError(
                f"{run_dir} holds a run with a different configuration (changed: "
                f"{', '.join(changed)}); pass --run-dir to start a new run, or the same options "
                "to resume it"
            )
    return splits


def next_version(export_root: str, name: str) -> int:
    base = os.path.join(export_root, name)
    versions = [int(v) for v in os.listdir(base) if v.isdigit()] if os.path.isdir(base) else []
    return max(versions, default=0) + 1


def train(config: TrainConfig, run_dir: str, *, export_root: str | None = "saved_models",
          export_name: str | None = None, sample_every_epochs: int = 5, verbose=1) -> dict:
    """Train (or resume) the run described by ``config`` in ``run_dir``; returns a summary."""
    from tfngd import callbacks, export, images

    splits = prepare(config, run_dir)
    strategy = distribute.make_strategy(config.strategy)
    try:
        distribute.check_global_batch(config.batch_size)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    chief = distribute.is_chief(strategy)
    if chief:
        runs.write_run_metadata(run_dir, config, splits.data_shape, splits.num_classes)
    with strategy.scope():
        model = build_model(config, splits.data_shape, splits.num_classes)
        model.compile(optimizer=build_optimizer(config), jit_compile=config.jit_compile)
        initial_epoch, start_step = checkpointing.resume_point(model,
                                                               runs.checkpoint_dir(run_dir))
    if start_step:
        print(f"{PROGRAM}: resuming {run_dir} at epoch {initial_epoch} (step {start_step})")

    labels = config.conditional
    train_ds = distribute.distribute_batches(strategy, data_lib.training_batches(
        splits.train, config.batch_size, config.seed, start_step=start_step,
        labels=splits.train_labels if labels else None,
    ))
    eval_ds = data_lib.evaluation_bank(
        splits.eval, config.num_timesteps, seed=config.seed + 1, batch_size=256,
        labels=splits.eval_labels if labels else None,
        min_timestep=1 if config.model == "ndm" else 0,
    )
    sample_kwargs = config.sample_kwargs()
    # Only the chief writes (checkpoints, logs, samples, export); every worker trains and
    # takes part in saving (reading K-FAC's replica-local statistics is collective).
    fit_callbacks = [checkpointing.CheckpointCallback(runs.checkpoint_dir(run_dir),
                                                      write=chief),
                     nonfinite.NonFiniteGuard(config.nonfinite_policy)]
    if chief:
        fit_callbacks.append(callbacks.DiffusionTensorBoard(
            runs.log_dir(run_dir), sample_every_epochs=sample_every_epochs,
            num_samples=min(config.samples_for(splits.data_shape), 1024),
            sample_steps=config.sample_steps, seed=config.seed,
            sampler=sample_kwargs.get("sampler"),
            sample_kwargs={k: v for k, v in sample_kwargs.items()
                           if k not in ("sampler", "num_steps")},
        ))
    started = time.perf_counter()
    history = {}
    if initial_epoch < config.epochs:
        history = model.fit(
            train_ds, epochs=config.epochs, steps_per_epoch=config.steps_per_epoch,
            initial_epoch=initial_epoch, validation_data=eval_ds, callbacks=fit_callbacks,
            shuffle=False, verbose=verbose,
        ).history
    train_seconds = time.perf_counter() - started

    summary = {
        "run_dir": run_dir,
        "train_seconds": train_seconds,
        "final_val_loss": history.get("val_loss", [None])[-1],
        "steps": int(model.optimizer.iterations.numpy()),
        "replicas": strategy.num_replicas_in_sync,
    }
    if not chief:
        return summary
    samples = model.sample(config.samples_for(splits.data_shape), seed=config.seed,
                           **sample_kwargs)
    summary["samples_png"] = images.save_png(os.path.join(run_dir, "samples.png"),
                                             images.samples_to_image(samples.numpy()))
    if export_root is not None and config.model != "ddpm":
        summary["saved_model"] = (f"not exported: the SavedModel sampler serves model='ddpm' "
                                  f"runs, this is model={config.model!r}")
    elif export_root is not None:
        name = export_name or config.dataset
        export_dir = os.path.join(export_root, name, str(next_version(export_root, name)))
        export.export_sampler(model, export_dir, sampler=config.sampling_method, eta=config.eta,
                              clip_x0=config.clip_x0)
        summary["saved_model"] = export_dir
    return summary


def main(argv=None) -> int:
    from trainers import cli

    args = build_parser().parse_args(argv)
    config = cli.config_from_args(args)
    if args.cpu_devices is not None:
        try:
            distribute.split_cpu(args.cpu_devices)
        except (ValueError, RuntimeError) as err:
            return cli.fail(PROGRAM, f"--cpu-devices: {err}")
    run_dir = args.run_dir or os.path.join("runs", config.dataset)
    if args.sample_every_epochs < 0:
        return cli.fail(PROGRAM, "--sample-every-epochs must be >= 0")
    try:
        summary = train(
            config, run_dir, export_root=None if args.no_export else args.export_root,
            export_name=args.export_name, sample_every_epochs=args.sample_every_epochs,
            verbose=args.verbose,
        )
    except (ConfigError, checkpointing.CheckpointError, data_lib.DataError,
            nonfinite.NonFiniteTrainingError) as err:
        return cli.fail(PROGRAM, err)
    for key, value in summary.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
