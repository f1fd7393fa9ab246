"""Registration and capture on our denoisers: the right layers, exact outputs, clean restore."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfngd.networks import build_mlp_denoiser, build_unet
from tfngd.optimizers import KFAC, capture_layer_calls, find_registrable_layers


def tiny_unet():
    keras.utils.set_random_seed(0)
    return build_unet((8, 8, 1), base_channels=8, channel_mults=(1, 2), groups=4,
                      attention_resolutions=(4,), num_classes=3)


def unet_inputs(batch=2):
    rng = np.random.default_rng(0)
    return [tf.constant(rng.normal(size=(batch, 8, 8, 1)), tf.float32),
            tf.constant([3, 17][:batch], tf.int32), tf.constant([0, 3][:batch], tf.int32)]


def test_finds_every_dense_conv_and_group_norm_inside_nested_blocks():
    model = tiny_unet()
    layers = find_registrable_layers(model)
    kinds = {}
    for layer in layers:
        kinds[type(layer).__name__] = kinds.get(type(layer).__name__, 0) + 1
    every = [layer for layer in model._flatten_layers()
             if type(layer) in (keras.layers.Dense, keras.layers.Conv2D,
                                keras.layers.GroupNormalization)]
    assert len(layers) == len(every) == len({id(layer) for layer in layers})
    assert set(kinds) == {"Dense", "Conv2D", "GroupNormalization"}
    paths = {layer.path for layer in layers}
    assert any("attn" in p and "query" in p for p in paths)  # attention projections
    assert any("res" in p and "conv1" in p for p in paths)  # residual-block convolutions
    assert not any(isinstance(layer, keras.layers.Embedding) for layer in layers)


@pytest.mark.parametrize("build", ["unet", "mlp"])
@pytest.mark.parametrize("graph", [False, True])
def test_captured_forward_pass_is_bitwise_identical_and_restores_calls(build, graph):
    if build == "unet":
        model, inputs = tiny_unet(), unet_inputs()
    else:
        keras.utils.set_random_seed(0)
        model = build_mlp_denoiser(2, hidden_units=16, num_blocks=2)
        inputs = [tf.constant([[0.5, -1.0], [2.0, 0.1]]), tf.constant([1, 40])]
    layers = find_registrable_layers(model)

    def forward():
        with capture_layer_calls(layers) as calls:
            outputs = model(inputs, training=True)
        return outputs, len(calls), calls

    plain = model(inputs, training=True)
    if graph:
        outputs, count = tf.function(lambda: forward()[:2])()
    else:
        outputs, count, calls = forward()
        by_layer = {id(c.layer) for c in calls}
        assert by_layer == {id(layer) for layer in layers}
    np.testing.assert_array_equal(outputs.numpy(), plain.numpy())
    assert int(count) == len(layers)  # each layer of these models is called once
    assert not any("call" in layer.__dict__ for layer in layers)


def test_original_calls_are_restored_after_an_exception():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    dense = keras.layers.Dense(2, activation="silu")
    model = keras.Model(inputs, dense(inputs))
    with pytest.raises(RuntimeError, match="boom"):
        with capture_layer_calls([dense]):
            model(tf.ones((1, 3)))
            raise RuntimeError("boom")
    assert "call" not in dense.__dict__
    with capture_layer_calls([dense]) as calls:
        with pytest.raises(RuntimeError, match="already being captured"):
            with capture_layer_calls([dense]):
                pass
        model(tf.ones((1, 3)))
    assert len(calls) == 1 and "call" not in dense.__dict__


def test_activation_is_applied_after_the_recorded_pre_activation():
    inputs = keras.Input((3,))
    dense = keras.layers.Dense(2, activation="relu")
    model = keras.Model(inputs, dense(inputs))
    x = tf.constant([[1.0, -2.0, 3.0], [-1.0, 0.5, 0.0]])
    with capture_layer_calls([dense]) as calls:
        outputs = model(x)
    expected = x @ dense.kernel + dense.bias
    np.testing.assert_allclose(calls[0].outputs.numpy(), expected.numpy(), rtol=1e-6)
    np.testing.assert_allclose(outputs.numpy(), np.maximum(expected.numpy(), 0), rtol=1e-6)


def test_optimizer_capture_uses_the_registered_layers():
    model = tiny_unet()
    optimizer = KFAC().register(model)
    with optimizer.capture() as calls:
        model(unet_inputs(), training=True)
    assert len(calls) == len(find_registrable_layers(model))
