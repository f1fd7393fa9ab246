"""The KL autoencoder (tfngd.autoencoder), latent diffusion (tfngd.latent) and its export.

Tiny models on the 8x8 digits: an autoencoder 8x8x1 -> 4x4x2 trained for a few dozen
steps (module fixture) and a one-level U-Net on its latents.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfngd import autoencoder as ae_lib
from tfngd import data, export, latent
from tfngd.gaussian_diffusion import GaussianDiffusion
from tfngd.model import DiffusionModel
from tfngd.networks import build_unet

T = 20
ARCH = dict(latent_channels=2, base_channels=8, channel_mults=(1, 2), groups=4)


@pytest.fixture(scope="module")
def digits():
    splits = data.load_dataset("digits")
    return splits.train[:512], splits.eval[:128]


@pytest.fixture(scope="module")
def trained(digits):
    """A tiny autoencoder, the validation MSE before and after 48 steps of training."""
    train, evaluation = digits
    keras.utils.set_random_seed(0)
    model = ae_lib.KLAutoencoder((8, 8, 1), beta=1e-3, **ARCH)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    before = model.evaluate(evaluation, batch_size=128, verbose=0, return_dict=True)["mse"]
    model.fit(data.training_batches(train, 32, 0), steps_per_epoch=48, epochs=1, verbose=0)
    after = model.evaluate(evaluation, batch_size=128, verbose=0, return_dict=True)["mse"]
    model.fit_scale_factor(train)
    return model, before, after


def _latent_unet(shape, seed=1):
    keras.utils.set_random_seed(seed)
    return build_unet(shape, base_channels=8, channel_mults=(1,), attention_resolutions=(),
                      groups=4)


def _randomize(network, scale, seed):
    rng = np.random.default_rng(seed)
    for weight in network.weights:
        value = weight.numpy()
        weight.assign(value + rng.normal(0.0, scale, value.shape).astype(value.dtype))


@pytest.fixture(scope="module")
def latent_model(trained):
    model = latent.LatentDiffusionModel(_latent_unet(trained[0].latent_shape),
                                        GaussianDiffusion("cosine", T), trained[0])
    _randomize(model.ema_denoiser, 0.05, 0)
    return model


# -- the autoencoder ---------------------------------------------------------------------

def test_kl_divergence_matches_the_closed_form():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(3, 4, 4, 2))
    logvar = rng.normal(size=(3, 4, 4, 2))
    sigma = np.exp(0.5 * logvar)
    # KL(N(m, s^2) || N(0, 1)) = -log s + (s^2 + m^2) / 2 - 1/2 per element.
    expected = (-np.log(sigma) + (sigma ** 2 + mean ** 2) / 2 - 0.5).reshape(3, -1).sum(1)
    np.testing.assert_allclose(ae_lib.kl_divergence(mean, logvar), expected, rtol=1e-5)
    np.testing.assert_allclose(ae_lib.kl_divergence(np.zeros((2, 3)), np.zeros((2, 3))), 0.0)


def test_loss_terms_are_reconstruction_plus_beta_kl(trained, digits):
    model = trained[0]
    x = digits[1][:4]
    noise = np.random.default_rng(1).normal(size=(4, *model.latent_shape)).astype(np.float32)
    terms = model.loss_terms(x, noise)
    moments = model.encoder(x).numpy()
    mean, logvar = moments[..., :2], moments[..., 2:]
    z = mean + np.exp(0.5 * logvar) * noise  # the reparameterised sample
    x_hat = model.decoder(z).numpy()
    reconstruction = ((x - x_hat) ** 2).reshape(4, -1).sum(1)
    np.testing.assert_allclose(terms["reconstruction"], reconstruction, rtol=1e-4)
    np.testing.assert_allclose(terms["kl"], ae_lib.kl_divergence(mean, logvar), rtol=1e-5)
    np.testing.assert_allclose(terms["loss"], reconstruction + 1e-3 * terms["kl"].numpy(),
                               rtol=1e-4)
    assert np.all(terms["kl"].numpy() > 0)


def test_training_reduces_the_reconstruction_error(trained, digits):
    model, before, after = trained
    assert after < 0.5 * before, (before, after)
    # reconstruct = clip(D(mean(x))): the held-out error is the validation MSE (unclipped
    # outputs can only be further from [-1, 1] data).
    evaluation = digits[1]
    mse = float(np.mean((model.reconstruct(evaluation) - evaluation) ** 2))
    assert mse <= after + 1e-6


def test_scale_factor_is_one_over_the_latent_std(trained, digits):
    model = trained[0]
    means = model.encoder(digits[0]).numpy()[..., :model.latent_channels]
    np.testing.assert_allclose(float(model.scale_factor.numpy()), 1.0 / means.std(), rtol=1e-4)
    scaled = latent.encode_dataset(model, digits[0])
    np.testing.assert_allclose(scaled.std(), 1.0, rtol=1e-4)
    np.testing.assert_allclose(scaled, means * float(model.scale_factor.numpy()), rtol=1e-5,
                               atol=1e-6)


def test_keras_file_round_trip(trained, digits, tmp_path):
    model = trained[0]
    path = str(tmp_path / "ae.keras")
    model.save(path)
    loaded = ae_lib.load_autoencoder(path)
    assert loaded.get_config() == model.get_config()
    assert float(loaded.scale_factor.numpy()) == float(model.scale_factor.numpy())
    np.testing.assert_array_equal(loaded.reconstruct(digits[1][:8]),
                                  model.reconstruct(digits[1][:8]))


def test_autoencoder_rejects_bad_input(trained):
    model = trained[0]
    with pytest.raises(ValueError, match="image_shape"):
        model.encode(np.zeros((2, 7, 7, 1)))
    with pytest.raises(ValueError, match="latent_shape"):
        model.decode(np.zeros((2, 4, 4, 3)))
    with pytest.raises(ValueError, match="beta"):
        ae_lib.KLAutoencoder((8, 8, 1), beta=-1.0, **ARCH)
    with pytest.raises(ValueError, match="divisible"):
        ae_lib.KLAutoencoder((6, 6, 1), channel_mults=(1, 2, 2), base_channels=8, groups=4)


# -- latent diffusion ---------------------------------------------------------------------

def test_latents_are_never_clipped(trained):
    """x0 prediction of 5 everywhere: the last DDIM step returns x0_hat. Pixel space clips
    it to 1; latent space keeps 5."""
    shape = trained[0].latent_shape
    diffusion = GaussianDiffusion("cosine", T, prediction_type="x0")
    models = {}
    for name in ("latent", "pixel"):
        unet = _latent_unet(shape)
        unet.get_layer("out_conv").bias.assign(np.full(shape[-1], 5.0, np.float32))
        models[name] = (latent.LatentDiffusionModel(unet, diffusion, trained[0], ema_decay=0.0)
                        if name == "latent" else DiffusionModel(unet, diffusion, ema_decay=0.0))
    assert not models["latent"].is_image_model and models["pixel"].is_image_model
    np.testing.assert_allclose(models["latent"].sample(2, num_steps=3), 5.0, rtol=1e-4)
    np.testing.assert_allclose(models["pixel"].sample(2, num_steps=3), 1.0, rtol=1e-4)


def test_latent_sampler_decodes_to_images(latent_model):
    latents = latent_model.sample(5, seed=3, num_steps=4)
    assert latents.shape == (5, 4, 4, 2)
    images = latent_model.sample(5, seed=3, num_steps=4, decode=True).numpy()
    assert images.shape == (5, 8, 8, 1)
    assert images.min() >= -1.0 and images.max() <= 1.0 and images.std() > 0
    scale = float(latent_model.autoencoder.scale_factor.numpy())
    expected = np.clip(latent_model.autoencoder.decoder(latents / scale).numpy(), -1, 1)
    np.testing.assert_allclose(images, expected, atol=1e-5)
    # Without a spacing the latent model samples on its default, the leading chain.
    assert latent_model.default_spacing == "leading" != DiffusionModel.default_spacing
    np.testing.assert_array_equal(
        latents, latent_model.sample(5, seed=3, num_steps=4, spacing="leading"))
    assert np.max(np.abs(latents - latent_model.sample(5, seed=3, num_steps=4,
                                                        spacing="trailing"))) > 1e-3


def test_latent_model_training_step(trained, digits):
    model = latent.LatentDiffusionModel(_latent_unet(trained[0].latent_shape),
                                        GaussianDiffusion("cosine", T), trained[0])
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    ae_before = [w.numpy().copy() for w in trained[0].weights]
    history = model.fit(data.training_batches(latent.encode_dataset(trained[0], digits[0]),
                                              32, 0), steps_per_epoch=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    assert len(model.trainable_variables) == len(model.denoiser.trainable_variables)
    for before, weight in zip(ae_before, trained[0].weights, strict=True):
        np.testing.assert_array_equal(before, weight.numpy())  # the autoencoder is frozen


def test_shape_mismatches_are_refused(trained, latent_model, tmp_path):
    wrong = _latent_unet((4, 4, 3))
    with pytest.raises(ValueError, match="autoencoder's latents have shape"):
        latent.LatentDiffusionModel(wrong, GaussianDiffusion("cosine", T), trained[0])
    z = keras.Input((2, 2, 2))
    bad_decoder = keras.Model(z, keras.layers.Conv2D(1, 1)(z))
    with pytest.raises(ValueError, match=r"decoder takes inputs of shape \[2, 2, 2\]"):
        export.export_sampler(latent_model, str(tmp_path / "x" / "1"), decoder=bad_decoder)
    v = keras.Input((4, 4, 2))
    flat = keras.Model(v, keras.layers.Flatten()(v))
    with pytest.raises(ValueError, match="decoder must output images"):
        export.export_sampler(latent_model, str(tmp_path / "y" / "1"), decoder=flat)
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")


# -- the SavedModel that decodes ------------------------------------------------------------

def test_decoding_export_served_by_saved_model_cli(latent_model, tmp_path):
    cli = shutil.which("saved_model_cli")
    if cli is None:
        pytest.skip("saved_model_cli is not installed")
    # No spacing given: the export uses the latent model's default_spacing (leading).
    path = export.export_sampler(latent_model, str(tmp_path / "latent" / "1"),
                                 decoder=latent_model.image_decoder(), max_samples=4)
    meta = export.read_export_metadata(path)
    assert meta["decoder"] == {"name": "latent_decoder", "latent_shape": [4, 4, 2],
                               "image_shape": [8, 8, 1]}
    assert meta["output"] == {"name": "samples", "dtype": "uint8", "shape": [None, 8, 8, 1]}
    assert meta["sampler"]["clip_x0"] is False and meta["data_shape"] == [4, 4, 2]
    assert meta["sampler"]["spacing"] == "leading"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"

    result = subprocess.run(
        [cli, "run", "--dir", path, "--tag_set", "serve", "--signature_def",
         export.SIGNATURE_NAME, "--input_exprs", "num_samples=3;seed=7;num_steps=4",
         "--outdir", str(tmp_path / "out"), "--overwrite"],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    served = np.load(tmp_path / "out" / f"{export.OUTPUT_KEY}.npy")
    assert served.shape == (3, 8, 8, 1) and served.dtype == np.uint8
    expected = latent_model.sample(3, seed=7, num_steps=4, decode=True).numpy()
    expected = np.clip(np.round((expected + 1.0) * 127.5), 0, 255)
    assert np.abs(served.astype(int) - expected).max() <= 1
    assert len(np.unique(served)) > 2


# -- the trainer's checks -------------------------------------------------------------------

def test_trainer_rejects_bad_options(tmp_path, capsys):
    from trainers import train_latent

    base = ["--dataset", "digits", "--run-dir", str(tmp_path / "run"), "--no-export"]
    assert train_latent.main([*base, "--ae-channel-mults", "1,2,2,2,2"]) == 2
    assert "not divisible by 16" in capsys.readouterr().err
    assert train_latent.main([*base, "--ae-beta", "-1"]) == 2
    assert "--ae-beta must be >= 0" in capsys.readouterr().err
    assert train_latent.main([*base, "--model", "ndm", "--prediction-type", "x0"]) == 2
    assert "not supported by latent diffusion" in capsys.readouterr().err
    # A finished check records the run's configuration; a different one is refused.
    config = train_latent.DEFAULTS.__class__(dataset="digits", channel_mults=(1,),
                                             attention_resolutions=())
    ae_config = train_latent.AutoencoderConfig(channel_mults=(1, 2))
    train_latent.prepare(config, ae_config, str(tmp_path / "run2"))
    with pytest.raises(train_latent.ConfigError, match="changed: beta"):
        train_latent.prepare(config, train_latent.AutoencoderConfig(channel_mults=(1, 2),
                                                                    beta=0.5),
                             str(tmp_path / "run2"))


def test_resnet_block_without_embedding_has_no_time_projection():
    x = keras.Input((4, 4, 8))
    block = ae_lib.ResidualBlock(8, groups=4)
    out = block(x)
    assert block.time_proj is None and out.shape == (None, 4, 4, 8)
    value = tf.random.normal((2, 4, 4, 8))
    np.testing.assert_allclose(block(value), value, atol=1e-6)  # zero-initialised conv2
