"""``tfngd-train-latent``: latent diffusion (Rombach et al. 2022) with ``model.fit``.

Also ``python -m trainers.train_latent``.

Two stages in one run directory (default ``runs/latent_<dataset>``):

1. ``autoencoder/``: a :class:`~tfngd.autoencoder.KLAutoencoder` trained with ``fit``
   (TensorBoard logs in ``autoencoder/logs``, checkpoints in ``autoencoder/checkpoints``),
   its ``scale_factor`` fitted on the training split, saved as
   ``autoencoder/autoencoder.keras`` with ``autoencoder/report.json`` (held-out MSE);
2. the latent :class:`~tfngd.latent.LatentDiffusionModel` trained on the scaled latents
   of the training split (encoded once), with the same options, TensorBoard callback
   (decoded sample grids) and checkpoints as ``tfngd-train``; then ``samples.png``
   (decoded) and a SavedModel under ``<export-root>/<export-name>/<version>`` whose
   serving function samples latents and decodes them (uint8 images).

Re-running the same command resumes: a finished autoencoder is loaded, an unfinished
one continues from its checkpoint, and the latent model continues from its own. A
different configuration in an existing run directory is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from tfngd import checkpointing, runs
from tfngd import data as data_lib
from tfngd.config import ConfigError, TrainConfig

PROGRAM = "tfngd-train-latent"
AE_DIR = "autoencoder"
AE_FILE = "autoencoder.keras"
AE_REPORT = "report.json"
LATENT_CONFIG = "latent_config.json"

#: The latent stage's defaults: MNIST, Adam, a one-level U-Net on the 7x7 latents.
DEFAULTS = TrainConfig(dataset="mnist", optimizer="adam", learning_rate=1e-3,
                       base_channels=64, channel_mults=(1,), num_res_blocks=2,
                       attention_resolutions=(7,), batch_size=64, epochs=20,
                       steps_per_epoch=100, warmup_steps=100, ema_decay=0.999)


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """The first stage's options (``--ae-*``)."""

    latent_channels: int = 4
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    groups: int = 8
    beta: float = 1e-3
    learning_rate: float = 2e-3
    batch_size: int = 64
    epochs: int = 10
    steps_per_epoch: int = 100

    def validate(self) -> None:
        for name in ("latent_channels", "base_channels", "num_res_blocks", "groups",
                     "batch_size", "epochs", "steps_per_epoch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--ae-{name.replace('_', '-')} must be >= 1, got "
                                  f"{getattr(self, name)}")
        if not self.beta >= 0:
            raise ConfigError(f"--ae-beta must be >= 0, got {self.beta}")
        if not self.learning_rate > 0:
            raise ConfigError(f"--ae-learning-rate must be > 0, got {self.learning_rate}")

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["channel_mults"] = list(self.channel_mults)
        return values


def build_parser() -> argparse.ArgumentParser:
    from trainers import cli

    parser = argparse.ArgumentParser(
        prog=PROGRAM, formatter_class=cli.HelpFormatter,
        description="Latent diffusion: train a KL autoencoder, then a diffusion model on its "
        "latents. Re-running with the same --run-dir resumes.")
    parser.add_argument("--run-dir", default=None,
                        help="output directory (default: runs/latent_<dataset>)")
    parser.add_argument("--export-root", default="saved_models",
                        help="SavedModels are written to <export-root>/<export-name>/<version>")
    parser.add_argument("--export-name", default=None,
                        help="model name (default: latent_<dataset>)")
    parser.add_argument("--no-export", action="store_true", help="skip the SavedModel export")
    parser.add_argument("--sample-every-epochs", type=int, default=5,
                        help="write a decoded sample grid to TensorBoard every N epochs "
                             "(0: never)")
    parser.add_argument("--verbose", type=int, default=2, choices=(0, 1, 2),
                        help="Keras fit verbosity")
    ae = parser.add_argument_group("autoencoder (first stage)")
    defaults = AutoencoderConfig()
    for field in dataclasses.fields(AutoencoderConfig):
        value = getattr(defaults, field.name)
        kind = (cli._parse_int_tuple if isinstance(value, tuple) else type(value))
        ae.add_argument("--ae-" + field.name.replace("_", "-"), dest="ae_" + field.name,
                        type=kind, default=value, help=f"autoencoder {field.name}")
    cli.add_config_arguments(parser, DEFAULTS)
    return parser


def _check_same(path: str, values: dict, what: str) -> None:
    """Write ``values`` to ``path``; refuse when ``path`` holds different ones."""
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        changed = sorted(k for k in set(before) | set(values) if before.get(k) != values.get(k))
        if changed:
            raise ConfigError(f"{os.path.dirname(path)} holds a run with a different {what} "
                              f"(changed: {', '.join(changed)}); pass --run-dir to start a new "
                              "run, or the same options to resume it")
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(values, f, indent=2)


# Options of TrainConfig that the latent stage does not use or that do not fit it.
_UNSUPPORTED = {"model": "ddpm", "strategy": "none", "precision": "float32"}


def prepare(config: TrainConfig, ae_config: AutoencoderConfig, run_dir: str):
    """Everything that can fail on bad input, before any training."""
    config.validate()
    ae_config.validate()
    for option, only in _UNSUPPORTED.items():
        if getattr(config, option) != only:
            raise ConfigError(f"--{option} {getattr(config, option)} is not supported by "
                              f"latent diffusion (only {only})")
    splits = data_lib.load_dataset(config.dataset, data_dir=config.data_dir,
                                   num_train=config.num_train, seed=config.seed)
    if splits.kind != "image":
        raise ConfigError(f"latent diffusion needs an image data set, {config.dataset!r} "
                          f"holds vectors of shape {list(splits.data_shape)}")
    data_lib.validate_examples(splits.train, name=f"{config.dataset} training data")
    data_lib.validate_examples(splits.eval, expected_shape=splits.data_shape,
                               name=f"{config.dataset} evaluation data")
    for what, batch in (("--batch-size", config.batch_size),
                        ("--ae-batch-size", ae_config.batch_size)):
        if batch > len(splits.train):
            raise ConfigError(f"{what} {batch} is larger than the {len(splits.train)} "
                              "training examples")
    if config.conditional and splits.num_classes is None:
        raise ConfigError(f"conditional=True, but data set {config.dataset!r} has no labels")
    factor = 2 ** (len(ae_config.channel_mults) - 1)
    height, width = splits.data_shape[:2]
    if height % factor or width % factor:
        raise ConfigError(f"--ae-channel-mults {ae_config.channel_mults}: the {height}x{width} "
                          f"images are not divisible by {factor}")
    latent_hw = height // factor
    unet_factor = 2 ** (len(config.channel_mults) - 1)
    if latent_hw % unet_factor:
        raise ConfigError(f"--channel-mults {config.channel_mults}: the {latent_hw}x"
                          f"{width // factor} latents are not divisible by {unet_factor}")
    _check_same(os.path.join(run_dir, AE_DIR, "config.json"),
                {**ae_config.to_dict(), "dataset": config.dataset,
                 "num_train": config.num_train, "seed": config.seed}, "autoencoder config")
    _check_same(os.path.join(run_dir, LATENT_CONFIG),
                {k: v for k, v in json.loads(json.dumps(config.to_dict())).items()
                 if k not in ("jit_compile", "nonfinite_policy")}, "configuration")
    return splits


def train_autoencoder(ae_config: AutoencoderConfig, splits, run_dir: str, seed: int = 0,
                      verbose=2) -> tuple:
    """Train (or load, or resume) the first stage; returns ``(autoencoder, report)``."""
    import keras

    from tfngd import autoencoder as ae_lib

    directory = os.path.join(run_dir, AE_DIR)
    path = os.path.join(directory, AE_FILE)
    report_path = os.path.join(directory, AE_REPORT)
    if os.path.exists(path) and os.path.exists(report_path):
        with open(report_path) as f:
            return ae_lib.load_autoencoder(path), {**json.load(f), "loaded": True}
    keras.utils.set_random_seed(seed)
    model = ae_lib.KLAutoencoder(
        splits.data_shape, latent_channels=ae_config.latent_channels,
        base_channels=ae_config.base_channels, channel_mults=ae_config.channel_mults,
        num_res_blocks=ae_config.num_res_blocks, groups=ae_config.groups,
        beta=ae_config.beta, seed=seed)
    total = ae_config.epochs * ae_config.steps_per_epoch
    model.compile(optimizer=keras.optimizers.Adam(
        keras.optimizers.schedules.CosineDecay(ae_config.learning_rate, total, alpha=0.05),
        global_clipnorm=1.0))
    ckpt = os.path.join(directory, "checkpoints")
    initial_epoch, start_step = checkpointing.resume_point(model, ckpt)
    started = time.perf_counter()
    if initial_epoch < ae_config.epochs:
        model.fit(data_lib.training_batches(splits.train, ae_config.batch_size, seed,
                                            start_step=start_step),
                  epochs=ae_config.epochs, steps_per_epoch=ae_config.steps_per_epoch,
                  initial_epoch=initial_epoch, shuffle=False, verbose=verbose,
                  validation_data=splits.eval, validation_batch_size=500,
                  callbacks=[checkpointing.CheckpointCallback(ckpt),
                             keras.callbacks.TensorBoard(os.path.join(directory, "logs"))])
    train_seconds = time.perf_counter() - started
    scale = model.fit_scale_factor(splits.train)
    reconstructions = model.reconstruct(splits.eval)
    import numpy as np

    report = {
        "steps": int(model.optimizer.iterations.numpy()),
        "train_seconds": train_seconds,
        "scale_factor": scale,
        "latent_shape": list(model.latent_shape),
        "eval_reconstruction_mse": float(np.mean((reconstructions - splits.eval) ** 2)),
        "num_parameters": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
    }
    model.save(path)
    with open(report_path, "w") as f:
        json.dump(report, f, indent=2)
    return model, report


def train(config: TrainConfig, ae_config: AutoencoderConfig, run_dir: str, *,
          export_root: str | None = "saved_models", export_name: str | None = None,
          sample_every_epochs: int = 5, verbose=2) -> dict:
    """Both stages of the run in ``run_dir``; returns a summary."""
    import keras

    from tfngd import callbacks, export, images, latent
    from tfngd.config import build_denoiser, build_diffusion, build_optimizer

    splits = prepare(config, ae_config, run_dir)
    autoencoder, ae_report = train_autoencoder(ae_config, splits, run_dir, config.seed, verbose)
    started = time.perf_counter()
    train_latents = latent.encode_dataset(autoencoder, splits.train)
    eval_latents = latent.encode_dataset(autoencoder, splits.eval)
    encode_seconds = time.perf_counter() - started

    num_classes = splits.num_classes if config.conditional else None
    keras.utils.set_random_seed(config.seed)
    model = latent.LatentDiffusionModel(
        build_denoiser(config, autoencoder.latent_shape, num_classes),
        build_diffusion(config), autoencoder,
        timestep_sampler=config.timestep_sampler, ema_decay=config.ema_decay,
        num_classes=num_classes, class_dropout=config.class_dropout,
        vlb_weight=config.vlb_weight, fisher_weighting=config.fisher_weighting,
        seed=config.seed)
    model.compile(optimizer=build_optimizer(config), jit_compile=config.jit_compile)
    initial_epoch, start_step = checkpointing.resume_point(model, runs.checkpoint_dir(run_dir))
    if start_step:
        print(f"{PROGRAM}: resuming {run_dir} at epoch {initial_epoch} (step {start_step})")
    labels = config.conditional
    train_ds = data_lib.training_batches(
        train_latents, config.batch_size, config.seed, start_step=start_step,
        labels=splits.train_labels if labels else None)
    eval_ds = data_lib.evaluation_bank(
        eval_latents, config.num_timesteps, seed=config.seed + 1, batch_size=256,
        labels=splits.eval_labels if labels else None)
    # The spacing is the model's default_spacing ("leading" for latents).
    sample_kwargs = {"sampler": config.sampling_method, "num_steps": config.sample_steps,
                     "eta": config.eta}
    num_samples = config.samples_for(splits.data_shape)
    fit_callbacks = [
        checkpointing.CheckpointCallback(runs.checkpoint_dir(run_dir)),
        callbacks.DiffusionTensorBoard(
            runs.log_dir(run_dir), sample_every_epochs=sample_every_epochs,
            num_samples=num_samples, sample_steps=config.sample_steps, seed=config.seed,
            sampler=config.sampling_method, batch_size=config.batch_size,
            sample_kwargs={"eta": config.eta, "decode": True}),
    ]
    started = time.perf_counter()
    history = {}
    if initial_epoch < config.epochs:
        history = model.fit(train_ds, epochs=config.epochs,
                            steps_per_epoch=config.steps_per_epoch,
                            initial_epoch=initial_epoch, validation_data=eval_ds,
                            callbacks=fit_callbacks, shuffle=False, verbose=verbose).history
    train_seconds = time.perf_counter() - started
    summary = {
        "run_dir": run_dir,
        "autoencoder": ae_report,
        "encode_seconds": encode_seconds,
        "train_seconds": train_seconds,
        "final_val_loss": history.get("val_loss", [None])[-1],
        "steps": int(model.optimizer.iterations.numpy()),
    }
    samples = model.sample(num_samples, seed=config.seed, decode=True, **sample_kwargs)
    summary["samples_png"] = images.save_png(os.path.join(run_dir, "samples.png"),
                                             images.samples_to_image(samples.numpy()))
    if export_root is not None:
        from trainers.train import next_version

        name = export_name or f"latent_{config.dataset}"
        export_dir = os.path.join(export_root, name, str(next_version(export_root, name)))
        export.export_sampler(model, export_dir, sampler=config.sampling_method,
                              eta=config.eta, decoder=model.image_decoder())
        summary["saved_model"] = export_dir
    summary["model"] = model
    return summary


def main(argv=None) -> int:
    from trainers import cli

    args = build_parser().parse_args(argv)
    config = cli.config_from_args(args)
    ae_config = AutoencoderConfig(**{f.name: getattr(args, "ae_" + f.name)
                                     for f in dataclasses.fields(AutoencoderConfig)})
    run_dir = args.run_dir or os.path.join("runs", f"latent_{config.dataset}")
    if args.sample_every_epochs < 0:
        return cli.fail(PROGRAM, "--sample-every-epochs must be >= 0")
    try:
        summary = train(config, ae_config, run_dir,
                        export_root=None if args.no_export else args.export_root,
                        export_name=args.export_name,
                        sample_every_epochs=args.sample_every_epochs, verbose=args.verbose)
    except (ConfigError, ValueError, checkpointing.CheckpointError, data_lib.DataError) as err:
        return cli.fail(PROGRAM, err)
    summary.pop("model")
    for key, value in summary.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
