"""bfloat16 mixed precision: bfloat16 compute, float32 variables and curvature, close to float32."""

from __future__ import annotations

import keras
import numpy as np

from tfngd import data as data_lib
from tfngd.config import TrainConfig, build_model, build_optimizer


def train(precision: str):
    config = TrainConfig(dataset="digits", base_channels=8, groups=4, channel_mults=(1,),
                         attention_resolutions=(), batch_size=32, epochs=2, steps_per_epoch=10,
                         warmup_steps=3, statistics_every=1, inverse_every=5,
                         precision=precision).validate()
    splits = data_lib.load_dataset("digits")
    model = build_model(config, splits.data_shape)
    model.compile(optimizer=build_optimizer(config))
    history = model.fit(data_lib.training_batches(splits.train, 32, seed=0), epochs=2,
                        steps_per_epoch=10, verbose=0,
                        validation_data=data_lib.evaluation_bank(splits.eval, 1000, seed=1,
                                                                 batch_size=256))
    return model, history.history


def test_bfloat16_training_keeps_float32_state_and_tracks_the_float32_run():
    """K-FAC on the U-Net under mixed_bfloat16: the convolutions compute in bfloat16, the
    weights, the network output and every K-FAC factor are float32, no step is skipped,
    and the losses stay within 2% of the float32 run's (measured: 0.05%)."""
    reference, reference_history = train("float32")
    model, history = train("mixed_bfloat16")
    assert keras.config.dtype_policy().name == "float32"  # build_model restored it
    convolutions = [layer for layer in model.denoiser._flatten_layers()
                    if isinstance(layer, keras.layers.Conv2D)]
    assert convolutions and all(layer.compute_dtype == "bfloat16" for layer in convolutions)
    assert all(v.dtype == "float32" for v in model.weights if "int" not in v.dtype)
    assert model.denoiser.outputs[0].dtype == "float32"
    factors = [v for block in model.optimizer.blocks for v in block.running_statistics]
    assert factors and all(v.dtype == "float32" for v in factors)
    assert int(model.optimizer.skipped_updates.numpy()) == 0
    for key in ("loss", "val_loss"):
        assert np.all(np.isfinite(history[key]))
        np.testing.assert_allclose(history[key], reference_history[key], rtol=0.02)
    assert not np.allclose(history["loss"], reference_history["loss"], rtol=1e-7)  # bf16 ran
    samples = model.sample(4, seed=0, num_steps=5).numpy()
    assert samples.dtype == np.float32 and np.all(np.isfinite(samples))
