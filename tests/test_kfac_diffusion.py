"""K-FAC on our diffusion denoisers through ``DiffusionModel.train_step``."""


import keras
import numpy as np
import pytest

from tfngd.gaussian_diffusion import GaussianDiffusion
from tfngd.model import DiffusionModel
from tfngd.networks import build_mlp_denoiser, build_unet
from tfngd.optimizers import KFAC

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def test_conditional_unet_trains_with_kfac_and_embedding_fallback():
    keras.utils.set_random_seed(0)
    denoiser = build_unet((8, 8, 1), base_channels=8, channel_mults=(1, 2), groups=4,
                          attention_resolutions=(4,), num_classes=3)
    model = DiffusionModel(denoiser, GaussianDiffusion("cosine", 50), num_classes=3)
    optimizer = KFAC(learning_rate=0.05, damping=1e-2, inverse_every=2)
    # Eagerly: tracing the ~50 blocks of this U-Net costs ~25 s on 2 CPU cores, and graph
    # mode is covered by the capture and jit tests.
    model.compile(optimizer=optimizer, run_eagerly=True)
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, size=(16, 8, 8, 1)).astype("float32")
    labels = rng.integers(0, 3, size=16).astype("int32")
    embedding = denoiser.get_layer("label_embedding").embeddings
    before = [w.numpy() for w in denoiser.trainable_weights]
    embedding_before = embedding.numpy()

    history = model.fit({"x0": x0, "label": labels}, batch_size=8, epochs=2, shuffle=False,
                        verbose=0)

    assert np.all(np.isfinite(history.history["loss"]))
    assert int(optimizer.skipped_updates.numpy()) == 0
    kinds = {type(b.layer).__name__ for b in optimizer.blocks}
    assert kinds == {"Dense", "Conv2D", "GroupNormalization"}
    changed = [not np.array_equal(b, w.numpy())
               for b, w in zip(before, denoiser.trainable_weights, strict=True)]
    assert all(changed)
    assert not np.array_equal(embedding_before, embedding.numpy())  # Adam fallback
    diagnostics = optimizer.diagnostics()
    assert all(np.isfinite(float(v)) for v in diagnostics.values())


def test_mlp_denoiser_loss_decreases_with_kfac():
    rng = np.random.default_rng(1)
    angles = rng.uniform(0, 2 * np.pi, size=512)
    x0 = np.stack([np.cos(angles), np.sin(angles)], 1).astype("float32")
    losses = {}
    for name, optimizer in (("kfac", KFAC(learning_rate=0.1, damping=1e-3, inverse_every=5)),
                            ("adam", keras.optimizers.Adam(2e-3))):
        keras.utils.set_random_seed(0)
        denoiser = build_mlp_denoiser(2, hidden_units=32, num_blocks=1)
        model = DiffusionModel(denoiser, GaussianDiffusion("cosine", 50))
        model.compile(optimizer=optimizer)
        history = model.fit(x0, batch_size=64, epochs=8, shuffle=False, verbose=0)
        losses[name] = (history.history["loss"][0], history.history["loss"][-1])
    print("2-D ring diffusion, epoch-mean loss first -> last epoch:", losses)
    first, last = losses["kfac"]
    assert last < 0.7 * first


def test_kfac_diagnostics_reach_tensorboard(tmp_path):
    from tensorflow.compat.v1.train import summary_iterator

    from tfngd.callbacks import DiffusionTensorBoard

    keras.utils.set_random_seed(0)
    model = DiffusionModel(build_mlp_denoiser(2, hidden_units=16, num_blocks=1),
                           GaussianDiffusion("cosine", 50))
    model.compile(optimizer=KFAC(learning_rate=0.05, damping=1e-2, inverse_every=2))
    x0 = np.random.default_rng(0).normal(size=(64, 2)).astype("float32")
    model.fit(x0, batch_size=32, epochs=2, shuffle=False, verbose=0,
              callbacks=[DiffusionTensorBoard(str(tmp_path), sample_every_epochs=0)])
    tags = {}
    for path in (tmp_path / "train").iterdir():
        for event in summary_iterator(str(path)):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
    assert tags["kfac/damping"] == [2, 4]
    assert "kfac/update_scale" in tags and "kfac/skipped_updates" in tags
    assert any(tag.endswith("A_eig_max") for tag in tags)


def test_curvature_timing_splits_step_times_by_scheduled_work(tmp_path):
    """The callback files each step's time under the work K-FAC's schedule says was due;
    the schedule mirror (``work_due``) agrees with what the optimizer did in the graph."""
    from tfngd.callbacks import DiffusionTensorBoard

    keras.utils.set_random_seed(0)
    model = DiffusionModel(build_mlp_denoiser(2, hidden_units=16, num_blocks=1),
                           GaussianDiffusion("cosine", 50))
    optimizer = KFAC(learning_rate=0.05, damping=1e-2, statistics_every=2, inverse_every=4,
                     inverse_warmup_steps=0)
    model.compile(optimizer=optimizer)
    callback = DiffusionTensorBoard(str(tmp_path), sample_every_epochs=0)
    x0 = np.random.default_rng(0).normal(size=(64, 2)).astype("float32")
    refreshes = []

    class RecordRefreshes(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            refreshes.append(int(optimizer.diagnostics()["kfac/inverse_refreshes"]))

    model.fit(x0, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[callback, RecordRefreshes()])
    due = [optimizer.work_due(step) for step in range(8)]
    assert due == [(True, True), (False, False), (True, False), (False, False),
                   (True, True), (False, False), (True, False), (False, False)]
    assert refreshes == [1, 1, 1, 1, 2, 2, 2, 2]  # the graph refreshed at steps 0 and 4
    # Step 0 traces and is left out: update steps 1, 3, 5, 7; statistics 2, 6; inverse 4.
    assert [len(callback._kfac_step_seconds[k]) for k in ("update", "statistics", "inverse")] \
        == [4, 2, 1]
    timing = callback._curvature_timing()
    assert set(timing) == {"kfac/time_update_step_ms", "kfac/time_statistics_ms",
                           "kfac/time_inverse_ms"}
    assert all(np.isfinite(v) for v in timing.values()) and timing["kfac/time_update_step_ms"] > 0
