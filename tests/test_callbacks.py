"""TensorBoard and PNG callbacks, checked by reading the event files of real ``fit`` runs."""

from __future__ import annotations

import glob
import os
from collections import defaultdict

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfngd import callbacks
from tfngd.gaussian_diffusion import GaussianDiffusion
from tfngd.model import DiffusionModel
from tfngd.networks import build_mlp_denoiser, build_unet

EPOCHS, STEPS, BATCH = 3, 3, 4
BOUNDARIES, RATES = [4, 7], [1e-3, 5e-4, 2.5e-4]
METRICS = ["loss", "loss_q1", "loss_q2", "loss_q3", "loss_q4", "grad_norm"]


def piecewise_rate(step: int) -> float:
    """PiecewiseConstantDecay by hand: RATES[i] for BOUNDARIES[i-1] < step <= BOUNDARIES[i]."""
    return RATES[sum(step > b for b in BOUNDARIES)]


def read_events(directory: str) -> dict:
    """``{tag: [(step, value), ...]}`` over every event file in ``directory``, sorted by step.

    Scalars are floats; images are the decoded ``uint8`` arrays.
    """
    events = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "images":
                    # The tensor holds [width, height, png, ...] as strings.
                    png = value.tensor.string_val[2]
                    decoded = tf.io.decode_png(png).numpy()
                    events[value.tag].append((event.step, decoded))
                elif value.HasField("tensor") and not value.tensor.string_val:
                    events[value.tag].append((event.step, float(tf.make_ndarray(value.tensor))))
    return {tag: sorted(values, key=lambda sv: sv[0]) for tag, values in events.items()}


def steps_of(series) -> list[int]:
    return [step for step, _ in series]


def values_of(series) -> np.ndarray:
    return np.array([value for _, value in series])


def image_model() -> DiffusionModel:
    denoiser = build_unet((8, 8, 1), base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                          attention_resolutions=(), groups=4)
    # Not ("linear", 20): its last beta is 1 (abar = 0), so eps-prediction samples are NaN.
    return DiffusionModel(denoiser, GaussianDiffusion("cosine", 20), ema_decay=0.9)


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """One fit, two log dirs, each shared by a DiffusionTensorBoard and a Keras TensorBoard."""
    root = tmp_path_factory.mktemp("image_run")
    shared, own = str(root / "shared"), str(root / "own")
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    train = rng.uniform(-1, 1, (32, 8, 8, 1)).astype(np.float32)
    val = rng.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32)
    model = image_model()
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(BOUNDARIES, RATES)
    model.compile(optimizer=keras.optimizers.Adam(schedule))
    history = model.fit(
        tf.data.Dataset.from_tensor_slices(train).repeat().batch(BATCH),
        epochs=EPOCHS, steps_per_epoch=STEPS,
        validation_data=tf.data.Dataset.from_tensor_slices(val).batch(BATCH),
        callbacks=[
            callbacks.DiffusionTensorBoard(shared, num_samples=4, sample_steps=3,
                                           batch_size=BATCH),
            # update_freq=3 leaves a record_if(batch % 3 == 0) context open during fit (for
            # every writer): the batch/* scalars of `own`, at steps 2, 4, 6, 8, must survive it.
            keras.callbacks.TensorBoard(shared, update_freq=3),
            callbacks.DiffusionTensorBoard(own, sample_every_epochs=2, num_samples=4,
                                           sample_steps=100, update_freq=2),
            keras.callbacks.TensorBoard(own, write_graph=False),
        ],
        verbose=0,
    )
    return {
        "history": history.history,
        "shared_train": read_events(os.path.join(shared, "train")),
        "shared_val": read_events(os.path.join(shared, "validation")),
        "own_train": read_events(os.path.join(own, "train")),
        "own_dir": own,
        "steps": int(model.optimizer.iterations.numpy()),
    }


def test_epoch_scalars_one_per_epoch_at_optimizer_steps(image_run):
    events = image_run["shared_train"]
    assert image_run["steps"] == EPOCHS * STEPS
    expected_steps = [STEPS * (e + 1) for e in range(EPOCHS)]
    for tag in [*METRICS, "learning_rate", "step_time_seconds", "examples_per_second"]:
        assert tag in events, (tag, sorted(events))
        assert steps_of(events[tag]) == expected_steps, tag
        assert np.isfinite(values_of(events[tag])).all(), tag
    np.testing.assert_allclose(values_of(events["loss"]), image_run["history"]["loss"], rtol=1e-6)
    np.testing.assert_allclose(values_of(events["grad_norm"]), image_run["history"]["grad_norm"],
                               rtol=1e-6)
    step_time = values_of(events["step_time_seconds"])
    assert (step_time > 0).all()
    np.testing.assert_allclose(values_of(events["examples_per_second"]), BATCH / step_time,
                               rtol=1e-5)
    assert not any(tag.startswith("val_") for tag in events)


def test_learning_rate_follows_the_schedule(image_run):
    series = image_run["shared_train"]["learning_rate"]
    expected = [piecewise_rate(step) for step in steps_of(series)]
    assert expected == [1e-3, 5e-4, 2.5e-4]   # the run crosses both boundaries
    np.testing.assert_allclose(values_of(series), expected, rtol=1e-6)


def test_validation_metrics_go_to_the_validation_writer(image_run):
    events = image_run["shared_val"]
    for tag in ["loss", "loss_q1", "loss_q2", "loss_q3", "loss_q4"]:
        assert steps_of(events[tag]) == [3, 6, 9], tag
    assert "grad_norm" not in events and "learning_rate" not in events
    np.testing.assert_allclose(values_of(events["loss"]), image_run["history"]["val_loss"],
                               rtol=1e-6)


def test_sample_grid_image_every_epoch(image_run):
    series = image_run["shared_train"]["samples"]
    assert steps_of(series) == [3, 6, 9]
    for _, grid in series:
        # 4 samples of 8x8 upscaled 4x in a 2x2 grid with 1-pixel padding.
        assert grid.shape == (2 * 33 + 1, 2 * 33 + 1, 1) and grid.dtype == np.uint8
        assert (grid[0] == 255).all()   # top padding row


def test_keras_tensorboard_still_logs(image_run):
    own = image_run["own_train"]
    assert steps_of(own["epoch_loss"]) == [0, 1, 2]   # Keras' epoch axis
    np.testing.assert_allclose(values_of(own["epoch_loss"]), image_run["history"]["loss"],
                               rtol=1e-6)
    assert len(own["epoch_learning_rate"]) == EPOCHS
    assert len(read_events(os.path.join(image_run["own_dir"], "validation"))["epoch_loss"]) == 3
    shared = image_run["shared_train"]
    # Keras' epoch-mode callback writes its batch_* scalars to whichever writer is the
    # default (the shared one's), hence each step twice.
    assert sorted(set(steps_of(shared["batch_loss"]))) == [3, 6, 9]
    assert steps_of(shared["epoch_loss"]) == [0, 1, 2]
    assert len(image_run["shared_val"]["epoch_loss"]) == EPOCHS


def test_batch_level_scalars_and_sampling_period(image_run):
    events = image_run["own_train"]
    batch_steps = [2, 4, 6, 8]
    for tag in [f"batch/{name}" for name in [*METRICS, "learning_rate", "step_time_seconds"]]:
        assert steps_of(events[tag]) == batch_steps, tag
    np.testing.assert_allclose(values_of(events["batch/learning_rate"]),
                               [piecewise_rate(s) for s in batch_steps], rtol=1e-6)
    assert "batch/examples_per_second" not in events   # no batch_size given
    assert steps_of(events["loss"]) == [3, 6, 9]
    assert steps_of(events["samples"]) == [6]           # sample_every_epochs=2
    assert os.path.isdir(os.path.join(image_run["own_dir"], "validation"))


def test_event_accumulator_reads_the_run(image_run):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(
        os.path.join(image_run["own_dir"], "train"),
        size_guidance={event_accumulator.TENSORS: 0, event_accumulator.IMAGES: 0},
    )
    acc.Reload()
    tags = acc.Tags()["tensors"]
    assert "samples" in tags and "learning_rate" in tags
    assert [e.step for e in acc.Tensors("learning_rate")] == [3, 6, 9]


# --------------------------------------------------------------------------- 2-D data


@pytest.fixture(scope="module")
def points_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("points_run")
    keras.utils.set_random_seed(1)
    data = np.random.default_rng(1).normal(size=(64, 2)).astype(np.float32)
    # x0 prediction: the zero-initialised output layer keeps early samples near 0, inside
    # the default extent [-4, 4]^2 (eps prediction would put them far outside).
    model = DiffusionModel(build_mlp_denoiser(2, hidden_units=16, num_blocks=1),
                           GaussianDiffusion("cosine", 20, prediction_type="x0"), ema_decay=0.9)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.fit(
        tf.data.Dataset.from_tensor_slices(data).repeat().batch(16),
        epochs=EPOCHS, steps_per_epoch=STEPS,
        callbacks=[
            callbacks.DiffusionTensorBoard(str(root / "tb"), num_samples=64, sample_steps=5,
                                           image_kwargs={"size": 64}),
            callbacks.DiffusionTensorBoard(str(root / "no_samples"), sample_every_epochs=0),
            callbacks.SampleGridSaver(str(root / "png"), every_epochs=2, num_samples=64,
                                      sample_steps=5, image_kwargs={"size": 48}),
        ],
        verbose=0,
    )
    return root


def test_points_model_writes_scatter_images(points_run):
    events = read_events(str(points_run / "tb" / "train"))
    series = events["samples"]
    assert steps_of(series) == [3, 6, 9]
    for _, image in series:
        assert image.shape == (64, 64, 1)
        assert (image < 128).any() and (image == 255).any()   # dark dots on white
    assert not os.path.exists(points_run / "tb" / "validation")   # no validation data
    assert "samples" not in read_events(str(points_run / "no_samples" / "train"))


def test_sample_grid_saver_writes_pngs(points_run):
    png_dir = points_run / "png"
    assert sorted(os.listdir(png_dir)) == ["samples_epoch0002.png", "samples_final.png"]
    final = tf.io.decode_png(tf.io.read_file(str(png_dir / "samples_final.png"))).numpy()
    assert final.shape == (48, 48, 1) and (final < 128).any()


@pytest.mark.parametrize("kwargs", [{"sample_every_epochs": -1}, {"num_samples": 0},
                                    {"sampler": "euler"}, {"update_freq": 0},
                                    {"update_freq": "step"}, {"batch_size": 0}])
def test_diffusion_tensorboard_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        callbacks.DiffusionTensorBoard(str(tmp_path), **kwargs)


def test_sample_image_of_a_conditional_model_puts_one_class_per_column():
    denoiser = build_unet((8, 8, 1), base_channels=4, channel_mults=(1,), num_res_blocks=1,
                          attention_resolutions=(), groups=2, num_classes=3)
    model = DiffusionModel(denoiser, GaussianDiffusion("cosine", 20), num_classes=3)
    grid = callbacks.sample_image(model, 7, seed=0, num_steps=2)
    assert grid.shape == (3 * 33 + 1, 3 * 33 + 1, 1)   # 3 columns (classes), 3 rows
    # A given label overrides the default, and the layout is near-square again.
    grid = callbacks.sample_image(model, 4, num_steps=2, sample_kwargs={"label": 1})
    assert grid.shape == (2 * 33 + 1, 2 * 33 + 1, 1)
