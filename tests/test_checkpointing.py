"""Checkpoints: a killed save leaves the previous one usable; a corrupt or mismatched file
is refused with its name, and nothing of it is loaded."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tfngd import checkpointing
from tfngd.config import TrainConfig, build_model, build_optimizer

CONFIG = TrainConfig(dataset="checkerboard", hidden_units=16, num_blocks=2, num_timesteps=20,
                     optimizer="kfac", batch_size=16, epochs=1, steps_per_epoch=2,
                     warmup_steps=1, statistics_every=1, inverse_every=1)


def _trained(config=CONFIG, steps=2, seed=0):
    tf.keras.utils.set_random_seed(seed)
    model = build_model(config, (2,))
    model.compile(optimizer=build_optimizer(config))
    x = np.random.default_rng(seed).normal(size=(steps * 16, 2)).astype("float32")
    model.fit(x, batch_size=16, epochs=1, verbose=0, shuffle=False)
    return model


def _fresh(config=CONFIG, seed=1):
    tf.keras.utils.set_random_seed(seed)
    model = build_model(config, (2,))
    model.compile(optimizer=build_optimizer(config))
    model.optimizer.build(model.trainable_variables)
    return model


def _state(model) -> list:
    return [np.array(v.numpy()) for v in [*model.weights, *model.optimizer.variables]]


def _assert_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def _assert_refused_and_untouched(model, directory, path, match) -> str:
    """Restoring raises CheckpointError naming ``path`` and changes no variable of
    ``model``; returns the message."""
    before = _state(model)
    with pytest.raises(checkpointing.CheckpointError, match=match) as err:
        checkpointing.restore_checkpoint(model, directory)
    assert path in str(err.value)
    _assert_equal(_state(model), before)
    return str(err.value)


@pytest.fixture
def saved(tmp_path):
    model = _trained()
    directory = str(tmp_path / "checkpoints")
    path = checkpointing.save_checkpoint(model, directory, epoch=0)
    return model, directory, path


def test_restore_round_trips_every_variable(saved):
    model, directory, _ = saved
    fresh = _fresh()
    info = checkpointing.restore_checkpoint(fresh, directory)
    assert (info["epoch"], info["step"]) == (1, 2) and len(info["sha256"]) == 64
    _assert_equal(_state(fresh), _state(model))


def test_a_save_killed_while_writing_leaves_the_previous_checkpoint(saved, monkeypatch):
    model, directory, _ = saved
    first = _state(model)
    model.fit(np.ones((32, 2), "float32"), batch_size=16, epochs=1, verbose=0)

    def dies_half_way(path, *args, **kwargs):
        with open(path, "wb") as f:  # a partial HDF5 file, then the process is gone
            f.write(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(model, "save_weights", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        checkpointing.save_checkpoint(model, directory, epoch=1)
    monkeypatch.undo()
    assert any(n.startswith("tmp-") for n in os.listdir(directory))
    fresh = _fresh()
    assert checkpointing.restore_checkpoint(fresh, directory)["step"] == 2
    _assert_equal(_state(fresh), first)

    checkpointing.save_checkpoint(model, directory, epoch=1)  # the next save cleans up
    assert not any(n.startswith("tmp-") for n in os.listdir(directory))
    assert checkpointing.latest_checkpoint(directory)["step"] == 4


def test_a_save_killed_before_its_pointer_leaves_the_previous_checkpoint(saved, monkeypatch):
    model, directory, _ = saved
    first = _state(model)
    model.fit(np.ones((32, 2), "float32"), batch_size=16, epochs=1, verbose=0)
    real_replace = os.replace

    def dies_at_the_pointer(src, dst):
        if dst.endswith(checkpointing.POINTER):
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(checkpointing.os, "replace", dies_at_the_pointer)
    with pytest.raises(KeyboardInterrupt):
        checkpointing.save_checkpoint(model, directory, epoch=1)
    monkeypatch.undo()
    fresh = _fresh()
    assert checkpointing.restore_checkpoint(fresh, directory)["step"] == 2
    _assert_equal(_state(fresh), first)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_file_is_refused_by_name_and_nothing_is_loaded(saved, damage):
    _, directory, path = saved
    data = bytearray(open(path, "rb").read())
    if damage == "truncate":
        data = data[:len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    _assert_refused_and_untouched(_fresh(), directory, path, "is corrupt")


def test_a_damaged_file_without_a_recorded_digest_still_fails_cleanly(saved):
    """An older pointer has no SHA-256: the loader's own error, and still no partial load."""
    _, directory, path = saved
    pointer = os.path.join(directory, checkpointing.POINTER)
    info = json.load(open(pointer))
    del info["sha256"]
    json.dump(info, open(pointer, "w"))
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])
    message = _assert_refused_and_untouched(_fresh(), directory, path, "cannot restore")
    assert "Nothing was loaded" in message


@pytest.mark.parametrize("changes", [{"num_blocks": 3}, {"hidden_units": 32},
                                     {"optimizer": "adam"}])
def test_a_checkpoint_of_another_configuration_is_refused_and_nothing_is_loaded(saved,
                                                                                changes):
    _, directory, path = saved
    _assert_refused_and_untouched(_fresh(dataclasses.replace(CONFIG, **changes)), directory,
                                  path, "different model configuration")


def test_a_corrupt_pointer_or_a_missing_file_is_named(saved):
    _, directory, path = saved
    pointer = os.path.join(directory, checkpointing.POINTER)
    os.remove(path)
    with pytest.raises(checkpointing.CheckpointError, match="missing file"):
        checkpointing.latest_checkpoint(directory)
    open(pointer, "w").write("{not json")
    with pytest.raises(checkpointing.CheckpointError, match="corrupt checkpoint pointer") as err:
        checkpointing.latest_checkpoint(directory)
    assert pointer in str(err.value)
