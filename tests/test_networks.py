"""Denoiser networks: shapes, initialisation, serialisation and numpy references of the blocks."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfngd.networks import (
    AttentionBlock,
    ResidualBlock,
    SinusoidalTimeEmbedding,
    build_mlp_denoiser,
    build_unet,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

TINY = dict(base_channels=8, groups=4)

# --------------------------------------------------------------------------- numpy references


def np_group_norm(x, gamma, beta, groups, eps=1e-5):
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    g = (g - mean) / np.sqrt(var + eps)
    return g.reshape(b, h, w, c) * gamma + beta


def np_silu(x):
    return x / (1.0 + np.exp(-x))


def np_conv2d_same(x, kernel, bias):
    """3x3 (or 1x1) stride-1 'same' convolution, NHWC, kernel [kh, kw, cin, cout]."""
    kh, kw = kernel.shape[:2]
    ph, pw = kh // 2, kw // 2
    padded = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
    for i in range(kh):
        for j in range(kw):
            patch = padded[:, i:i + x.shape[1], j:j + x.shape[2], :]
            out += patch @ kernel[i, j]
    return out + bias


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_attention_block(x, weights, num_heads, groups):
    """x + W_o MHA(GN(x)) over the H*W tokens; heads split along channels."""
    b, h, w, c = x.shape
    d = c // num_heads
    tokens = np_group_norm(x, weights["norm_gamma"], weights["norm_beta"], groups)
    tokens = tokens.reshape(b, h * w, c)
    heads = []
    for head in range(num_heads):
        sl = slice(head * d, (head + 1) * d)
        q = (tokens @ weights["wq"] + weights["bq"])[..., sl]
        k = (tokens @ weights["wk"] + weights["bk"])[..., sl]
        v = (tokens @ weights["wv"] + weights["bv"])[..., sl]
        attn = np_softmax(q @ np.swapaxes(k, 1, 2) / np.sqrt(d))
        heads.append(attn @ v)
    attended = np.concatenate(heads, axis=-1)
    out = attended @ weights["wo"] + weights["bo"]
    return x + out.reshape(b, h, w, c)


def randomize(model_or_layer, seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    for w in model_or_layer.weights:
        if w.dtype in ("int32", "int64"):
            continue
        w.assign(rng.normal(scale=scale, size=w.shape).astype(w.dtype))


def unet_inputs(shape, batch=2, num_classes=None, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, *shape)).astype(np.float32)
    t = rng.integers(0, 1000, size=batch).astype(np.int32)
    inputs = [x, t]
    if num_classes is not None:
        inputs.append(rng.integers(0, num_classes + 1, size=batch).astype(np.int32))
    return inputs


# --------------------------------------------------------------------------- U-Net


@pytest.mark.parametrize("shape", [(8, 8, 1), (28, 28, 1), (8, 8, 3)])
def test_unet_shapes_dtype_and_zero_init(shape):
    model = build_unet(shape, channel_mults=(1, 2, 2), **TINY)
    assert [tuple(i.shape) for i in model.inputs] == [(None, *shape), (None,)]
    out = model(unet_inputs(shape, batch=3), training=False)
    assert tuple(out.shape) == (3, *shape)
    assert out.dtype == tf.float32
    # The output convolution is zero-initialised: the network starts at exactly 0.
    assert np.all(out.numpy() == 0.0)


def test_conditional_unet_has_label_input_and_uses_it():
    shape = (8, 8, 1)
    model = build_unet(shape, channel_mults=(1, 2, 2), num_classes=3, **TINY)
    assert len(model.inputs) == 3
    assert model.inputs[2].dtype == "int32"
    x, t, _ = unet_inputs(shape, batch=2, num_classes=3)
    assert np.all(model([x, t, np.array([0, 3], np.int32)]).numpy() == 0.0)
    randomize(model)
    out = {lbl: model([x, t, np.full(2, lbl, np.int32)]).numpy() for lbl in range(4)}
    for lbl in range(1, 4):  # every label (null label 3 included) changes the output
        assert np.max(np.abs(out[lbl] - out[0])) > 1e-4
    # The time input changes the output as well.
    other_t = model([x, (t + 100) % 1000, np.zeros(2, np.int32)]).numpy()
    assert np.max(np.abs(other_t - out[0])) > 1e-4
    # Examples in a batch are independent (GroupNorm normalises per example).
    single = model([x[:1], t[:1], np.zeros(1, np.int32)]).numpy()
    np.testing.assert_allclose(single, out[0][:1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape,mults", [((10, 10, 1), (1, 2, 2)), ((8, 12, 1), (1, 2, 2, 2)),
                                         ((7, 8, 1), (1, 2))])
def test_unet_bad_image_size(shape, mults):
    with pytest.raises(ValueError) as info:
        build_unet(shape, channel_mults=mults, **TINY)
    message = str(info.value)
    assert "divisible" in message and str(2 ** (len(mults) - 1)) in message


def test_unet_other_validation():
    with pytest.raises(ValueError, match="dropout"):
        build_unet((8, 8, 1), dropout=1.0, **TINY)
    with pytest.raises(ValueError, match="channel_mults"):
        build_unet((8, 8, 1), channel_mults=(), **TINY)
    with pytest.raises(ValueError, match="groups"):
        build_unet((8, 8, 1), base_channels=6, groups=4)


@pytest.mark.parametrize("num_classes", [None, 3])
def test_unet_config_round_trip(num_classes, tmp_path):
    shape = (8, 8, 1)
    model = build_unet(shape, channel_mults=(1, 2), attention_resolutions=(4, 8), num_heads=2,
                       num_classes=num_classes, **TINY)
    randomize(model, seed=1)
    inputs = unet_inputs(shape, batch=2, num_classes=num_classes, seed=3)
    expected = model(inputs).numpy()
    assert np.max(np.abs(expected)) > 1e-3

    rebuilt = keras.Model.from_config(model.get_config())
    rebuilt.set_weights(model.get_weights())
    np.testing.assert_allclose(rebuilt(inputs).numpy(), expected, rtol=1e-5, atol=1e-6)

    clone = keras.models.clone_model(model)
    assert [type(layer).__name__ for layer in clone.layers] == [
        type(layer).__name__ for layer in model.layers]
    clone.set_weights(model.get_weights())
    np.testing.assert_allclose(clone(inputs).numpy(), expected, rtol=1e-5, atol=1e-6)

    path = tmp_path / "unet.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded(inputs).numpy(), expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("dim,max_period", [(16, 10000.0), (8, 100.0)])
def test_time_embedding_matches_numpy(dim, max_period):
    t = np.array([0, 1, 17, 250, 999], np.int32)
    layer = SinusoidalTimeEmbedding(dim, max_period=max_period)
    got = layer(t).numpy()
    half = dim // 2
    freqs = max_period ** (-np.arange(half) / half)
    args = t[:, None].astype(np.float64) * freqs[None, :]
    expected = np.concatenate([np.sin(args), np.cos(args)], axis=-1)
    assert got.shape == (5, dim)
    np.testing.assert_allclose(got, expected, atol=2e-4)
    np.testing.assert_array_equal(got[0], np.r_[np.zeros(half), np.ones(half)])
    assert SinusoidalTimeEmbedding.from_config(layer.get_config()).max_period == max_period
    for bad in (0, 3, 1):
        with pytest.raises(ValueError, match="even"):
            SinusoidalTimeEmbedding(bad)


@pytest.mark.parametrize("num_heads", [1, 2, 4])
def test_attention_block_matches_numpy_mha(num_heads):
    rng = np.random.default_rng(num_heads)
    x = rng.normal(size=(2, 4, 3, 8)).astype(np.float32)
    block = AttentionBlock(num_heads=num_heads, groups=4)
    block.build(x.shape)
    # Identity at init (zero output projection).
    np.testing.assert_array_equal(block(x).numpy(), x)
    randomize(block, seed=10 + num_heads, scale=0.5)
    weights = dict(
        norm_gamma=block.norm.gamma.numpy(), norm_beta=block.norm.beta.numpy(),
        wq=block.query.kernel.numpy(), bq=block.query.bias.numpy(),
        wk=block.key.kernel.numpy(), bk=block.key.bias.numpy(),
        wv=block.value.kernel.numpy(), bv=block.value.bias.numpy(),
        wo=block.out.kernel.numpy(), bo=block.out.bias.numpy(),
    )
    expected = np_attention_block(x.astype(np.float64), weights, num_heads, groups=4)
    np.testing.assert_allclose(block(x).numpy(), expected, rtol=1e-4, atol=1e-5)


def test_attention_block_rejects_bad_heads():
    with pytest.raises(ValueError, match="heads"):
        AttentionBlock(num_heads=3, groups=4).build((None, 4, 4, 8))


@pytest.mark.parametrize("in_channels,channels", [(8, 8), (4, 8)])
def test_residual_block_matches_numpy(in_channels, channels):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 4, in_channels)).astype(np.float32)
    emb = rng.normal(size=(2, 12)).astype(np.float32)
    block = ResidualBlock(channels, groups=4)
    block.build((x.shape, emb.shape))
    out0 = block([x, emb]).numpy()
    if in_channels == channels:  # zero-initialised last convolution: identity at init
        np.testing.assert_array_equal(out0, x)
    randomize(block, seed=2, scale=0.3)
    xd, ed = x.astype(np.float64), emb.astype(np.float64)
    h = np_conv2d_same(np_silu(np_group_norm(xd, block.norm1.gamma.numpy(),
                                             block.norm1.beta.numpy(), 4)),
                       block.conv1.kernel.numpy(), block.conv1.bias.numpy())
    h = h + (np_silu(ed) @ block.time_proj.kernel.numpy()
             + block.time_proj.bias.numpy())[:, None, None, :]
    h = np_silu(np_group_norm(h, block.norm2.gamma.numpy(), block.norm2.beta.numpy(), 4))
    h = np_conv2d_same(h, block.conv2.kernel.numpy(), block.conv2.bias.numpy())
    skip = xd if block.skip is None else np_conv2d_same(xd, block.skip.kernel.numpy(),
                                                        block.skip.bias.numpy())
    np.testing.assert_allclose(block([x, emb]).numpy(), skip + h, rtol=1e-4, atol=1e-4)


def test_residual_block_rejects_bad_groups():
    with pytest.raises(ValueError, match="groups"):
        ResidualBlock(12, groups=8).build(((None, 4, 4, 8), (None, 16)))


# --------------------------------------------------------------------------- MLP


@pytest.mark.parametrize("num_classes", [None, 4])
def test_mlp_denoiser_shapes_and_zero_init(num_classes):
    model = build_mlp_denoiser(2, hidden_units=32, num_blocks=2, num_classes=num_classes)
    assert len(model.inputs) == (2 if num_classes is None else 3)
    assert tuple(model.inputs[0].shape) == (None, 2)
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(5, 2)).astype(np.float32), np.arange(5, dtype=np.int32) * 100]
    if num_classes is not None:
        inputs.append(np.array([0, 1, 2, 3, 4], np.int32))
    out = model(inputs)
    assert tuple(out.shape) == (5, 2) and out.dtype == tf.float32
    assert np.all(out.numpy() == 0.0)
    randomize(model)
    out = model(inputs).numpy()
    assert np.all(np.isfinite(out)) and np.max(np.abs(out)) > 1e-3
    rebuilt = keras.Model.from_config(model.get_config())
    rebuilt.set_weights(model.get_weights())
    np.testing.assert_allclose(rebuilt(inputs).numpy(), out, rtol=1e-5, atol=1e-6)
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    np.testing.assert_allclose(clone(inputs).numpy(), out, rtol=1e-5, atol=1e-6)


def test_mlp_denoiser_validation_and_float32_output_under_mixed_precision():
    for kwargs in (dict(data_dim=0), dict(data_dim=2, hidden_units=0),
                   dict(data_dim=2, num_blocks=-1)):
        with pytest.raises(ValueError):
            build_mlp_denoiser(**kwargs)
    previous = keras.config.dtype_policy()
    try:
        keras.config.set_dtype_policy("mixed_float16")
        model = build_mlp_denoiser(3, hidden_units=16, num_blocks=1)
        out = model([np.zeros((2, 3), np.float32), np.zeros(2, np.int32)])
        assert out.dtype == tf.float32
    finally:
        keras.config.set_dtype_policy(previous)
