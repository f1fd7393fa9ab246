"""The layout of a training run's output directory, and loading a trained model from it.

::

    <run_dir>/config.json        the validated TrainConfig
    <run_dir>/run.json           what the config alone does not say: example shape, classes
    <run_dir>/checkpoints/       crash-safe checkpoints (see tfngd.checkpointing)
    <run_dir>/logs/              TensorBoard event files
    <run_dir>/samples.png        a grid of samples from the final EMA weights
"""

from __future__ import annotations

import json
import os

from tfngd import checkpointing
from tfngd.config import TrainConfig, build_model, build_optimizer

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def log_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "logs")


def write_run_metadata(run_dir: str, config: TrainConfig, data_shape, num_classes) -> None:
    os.makedirs(run_dir, exist_ok=True)
    config.save(os.path.join(run_dir, CONFIG_FILE))
    with open(os.path.join(run_dir, RUN_FILE), "w") as f:
        json.dump({"data_shape": list(data_shape), "num_classes": num_classes}, f)


def read_run_metadata(run_dir: str) -> tuple[TrainConfig, tuple, int | None]:
    """``(config, data_shape, num_classes)`` of the run in ``run_dir``."""
    config_path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{run_dir} is not a training run directory: no {CONFIG_FILE}")
    config = TrainConfig.load(config_path).validate()
    try:
        with open(os.path.join(run_dir, RUN_FILE)) as f:
            meta = json.load(f)
        return config, tuple(meta["data_shape"]), meta["num_classes"]
    except (OSError, ValueError, KeyError) as err:
        raise checkpointing.CheckpointError(f"cannot read {RUN_FILE} in {run_dir}: {err}") from err


def load_trained_model(run_dir: str):
    """Rebuild the run's model and restore its newest checkpoint: ``(config, model, info)``."""
    config, data_shape, num_classes = read_run_metadata(run_dir)
    model = build_model(config, data_shape, num_classes)
    model.compile(optimizer=build_optimizer(config))
    info = checkpointing.restore_checkpoint(model, checkpoint_dir(run_dir))
    if info is None:
        raise checkpointing.CheckpointError(f"no checkpoint in {checkpoint_dir(run_dir)}")
    return config, model, info
