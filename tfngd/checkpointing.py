"""Crash-safe training checkpoints and resume.

A checkpoint is a Keras ``.weights.h5`` file holding every variable of the
model (denoiser, EMA copy, timestep-sampler history) and of its optimizer
(step count, moments), plus a small JSON pointer that names the newest
complete file and the epoch it ends. Writes are atomic: the weights go to a
temporary file that is flushed to disk (``fsync``) and renamed into place, then
the pointer is replaced the same way (and the directory entry synced), so a run
killed at any moment, or a machine that loses power, leaves the previous
checkpoint usable; half-written temporaries of a killed save are removed by the
next one. The ``keep`` newest checkpoints are kept.

Restoring is all or nothing: a file that is corrupt or was written by another
model configuration raises :class:`CheckpointError` naming the file, and every
variable keeps the value it had before the attempt.

Because every random draw of :class:`tfngd.model.DiffusionModel` is seeded by
the optimizer's step and the data pipeline is step-indexed
(:func:`tfngd.data.training_batches`), a resumed run continues exactly as
the uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import keras
import tensorflow as tf

POINTER = "checkpoint.json"
_TEMPORARY_PREFIX = "tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (corrupt, or made by a different model)."""


def _fsync(path: str) -> None:
    """Flush ``path`` (a file, or a directory's entries) to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def latest_checkpoint(directory: str) -> dict | None:
    """The pointer ``{"path", "epoch", "step", "sha256"}`` of the newest checkpoint, or
    None (``sha256``: of the file as written; absent in pointers of older versions)."""
    pointer = os.path.join(directory, POINTER)
    if not os.path.exists(pointer):
        return None
    try:
        with open(pointer) as f:
            info = json.load(f)
        info["path"] = os.path.join(directory, info["file"])
        int(info["epoch"]), int(info["step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"corrupt checkpoint pointer {pointer}: {err}") from err
    if not os.path.exists(info["path"]):
        raise CheckpointError(f"checkpoint pointer {pointer} names a missing file {info['path']}")
    return info


def save_checkpoint(model: keras.Model, directory: str, epoch: int, keep: int = 2,
                    write: bool = True) -> str | None:
    """Atomically write the model and optimizer state reached at the end of ``epoch``.

    ``write=False`` (the non-chief workers of a multi-worker run) reads every variable
    as the chief does (reading K-FAC's replica-local statistics is a collective
    operation every worker must join) into a scratch file that is then deleted; nothing
    of the checkpoint directory changes. Returns the checkpoint's path (None then).
    """
    os.makedirs(directory, exist_ok=True)
    step = int(model.optimizer.iterations.numpy())
    name = f"ckpt-{step:09d}.weights.h5"
    if not write:
        scratch = tempfile.mkdtemp(prefix="worker-", dir=directory)
        try:
            model.save_weights(os.path.join(scratch, name))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return None
    for stale in os.listdir(directory):  # left by a save that was killed half-way
        if stale.startswith(_TEMPORARY_PREFIX) or stale == POINTER + ".tmp":
            os.remove(os.path.join(directory, stale))
    tmp = os.path.join(directory, f"{_TEMPORARY_PREFIX}{name}")
    model.save_weights(tmp)
    _fsync(tmp)
    os.replace(tmp, os.path.join(directory, name))
    pointer_tmp = os.path.join(directory, POINTER + ".tmp")
    with open(pointer_tmp, "w") as f:
        json.dump({"file": name, "epoch": epoch + 1, "step": step,
                   "sha256": _sha256(os.path.join(directory, name))}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer_tmp, os.path.join(directory, POINTER))
    _fsync(directory)
    checkpoints = sorted(n for n in os.listdir(directory)
                         if n.startswith("ckpt-") and n.endswith(".weights.h5"))
    for old in checkpoints[:-keep]:
        os.remove(os.path.join(directory, old))
    return os.path.join(directory, name)


def restore_checkpoint(model: keras.Model, directory: str) -> dict | None:
    """Load the newest checkpoint into a compiled ``model``.

    Returns the pointer (with ``epoch``: the number of finished epochs and
    ``step``: the optimizer step), or None when there is no checkpoint.
    Raises :class:`CheckpointError` when the file is unreadable or does not
    match the model.
    """
    info = latest_checkpoint(directory)
    if info is None:
        return None
    if model.optimizer is None:
        raise CheckpointError("compile the model before restoring a checkpoint")
    expected = info.get("sha256")
    if expected is not None and _sha256(info["path"]) != expected:
        raise CheckpointError(
            f"{info['path']} is corrupt: its SHA-256 differs from the one recorded when it was "
            "written (truncated or overwritten); nothing was loaded")
    model.optimizer.build(model.trainable_variables)
    variables = list({id(v): v for v in [*model.weights, *model.optimizer.variables]}.values())
    before = [tf.convert_to_tensor(v) for v in variables]
    try:
        model.load_weights(info["path"])
        restored_step = int(model.optimizer.iterations.numpy())
        if restored_step != info["step"]:
            raise CheckpointError(f"it holds optimizer step {restored_step}, its pointer says "
                                  f"{info['step']}")
    except Exception as err:  # h5py, shape and structure errors all mean "unusable"
        for variable, value in zip(variables, before, strict=True):  # no partial load
            variable.assign(value)
        raise CheckpointError(
            f"cannot restore {info['path']}: {err}. The file is corrupt or was written by a "
            "different model configuration; use a new output directory or the original "
            "config. Nothing was loaded."
        ) from err
    return info


def resume_point(model: keras.Model, directory: str) -> tuple[int, int]:
    """:func:`restore_checkpoint`, then ``(finished epochs, optimizer step)`` to resume
    ``fit`` from (``initial_epoch`` and the data's ``start_step``); ``(0, 0)`` when there
    is no checkpoint."""
    restored = restore_checkpoint(model, directory)
    return (restored["epoch"], restored["step"]) if restored else (0, 0)


class CheckpointCallback(keras.callbacks.Callback):
    """Save a checkpoint every ``every_epochs`` epochs and at the end of training.

    In a multi-worker run every worker has the callback and only the chief writes
    (``write``, see :func:`save_checkpoint`).
    """

    def __init__(self, directory: str, every_epochs: int = 1, keep: int = 2,
                 write: bool = True):
        super().__init__()
        if every_epochs < 1:
            raise ValueError(f"every_epochs must be >= 1, got {every_epochs}")
        self.directory = directory
        self.every_epochs = every_epochs
        self.keep = keep
        self.write = write
        self._last_saved_epoch = None
        self._epoch = None

    def on_epoch_end(self, epoch, logs=None):
        self._epoch = epoch
        if (epoch + 1) % self.every_epochs == 0:
            save_checkpoint(self.model, self.directory, epoch, self.keep, self.write)
            self._last_saved_epoch = epoch

    def on_train_end(self, logs=None):
        if self._epoch is not None and self._last_saved_epoch != self._epoch:
            save_checkpoint(self.model, self.directory, self._epoch, self.keep, self.write)
