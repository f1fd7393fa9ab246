"""Learned reverse-process variances (``variance_type="learned_range"``) and the hybrid loss.

Nichol & Dhariwal (2021), section 3.1: the network outputs ``v`` next to its prediction
and ``log sigma^2 = frac log beta + (1 - frac) log beta~`` with ``frac = (v + 1) / 2``;
the hybrid objective ``L_simple + lambda L_vlb`` trains the variance through the
variational bound with the mean frozen. Every reference below is an independent numpy
computation (scipy's normal CDF for the discretised decoder).
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import special

from tfngd import config as config_lib
from tfngd import export, likelihood, samplers, schedules
from tfngd import gaussian_diffusion as gd
from tfngd.model import DiffusionModel
from tfngd.networks import build_mlp_denoiser, build_unet
from tfngd.optimizers import KFAC

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

T = 50


# -- independent numpy references ---------------------------------------------------------
def numpy_cosine_abar(num_timesteps: int, s: float = 0.008) -> np.ndarray:
    """``abar_t`` of the cosine schedule with betas capped at 0.999 (Nichol & Dhariwal)."""
    steps = np.arange(num_timesteps + 1) / num_timesteps
    f = np.cos((steps + s) / (1 + s) * np.pi / 2) ** 2
    betas = np.minimum(1 - f[1:] / f[:-1], 0.999)
    return np.cumprod(1 - betas)


def numpy_chain(abar_kept: np.ndarray):
    """``(log beta, clipped log beta~, c1, c2)`` of the chain through the kept steps."""
    abar_prev = np.append(1.0, abar_kept[:-1])
    beta = 1 - abar_kept / abar_prev
    beta_tilde = beta * (1 - abar_prev) / (1 - abar_kept)
    beta_tilde_clipped = np.append(beta_tilde[1], beta_tilde[1:])
    c1 = beta * np.sqrt(abar_prev) / (1 - abar_kept)
    c2 = (1 - abar_prev) * np.sqrt(1 - beta) / (1 - abar_kept)
    return np.log(beta), np.log(beta_tilde_clipped), c1, c2


def numpy_interpolation(v, log_beta, log_beta_tilde):
    frac = (v + 1) / 2
    return frac * log_beta + (1 - frac) * log_beta_tilde


def numpy_kl(m1, lv1, m2, lv2):
    return 0.5 * (-1 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))


def numpy_discretized_log_likelihood(x, mean, log_scale):
    sigma = np.exp(log_scale)
    upper = (x - mean + 1 / 255) / sigma
    lower = (x - mean - 1 / 255) / sigma
    middle = np.log(np.maximum(special.ndtr(upper) - special.ndtr(lower), 1e-12))
    return np.where(x < -0.999, special.log_ndtr(upper),
                    np.where(x > 0.999, special.log_ndtr(-lower), middle))


def numpy_vlb_bits(eps_hat, v, x0, x_t, t, abar, discrete):
    """The reference's ``_vb_terms_bpd`` for eps prediction on the full chain, per example."""
    log_beta, log_beta_tilde, c1, c2 = numpy_chain(abar)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    a = abar[t].reshape(shape)
    x0_hat = (x_t - np.sqrt(1 - a) * eps_hat) / np.sqrt(a)
    c1_t, c2_t = c1[t].reshape(shape), c2[t].reshape(shape)
    true_mean = c1_t * x0 + c2_t * x_t
    true_lv = log_beta_tilde[t].reshape(shape) + np.zeros_like(x0)
    model_mean = c1_t * x0_hat + c2_t * x_t
    model_lv = numpy_interpolation(v, log_beta[t].reshape(shape), log_beta_tilde[t].reshape(shape))
    axes = tuple(range(1, x0.ndim))
    kl = numpy_kl(true_mean, true_lv, model_mean, model_lv).mean(axis=axes) / np.log(2)
    if discrete:
        log_p = numpy_discretized_log_likelihood(x0, model_mean, 0.5 * model_lv)
    else:
        log_p = -0.5 * (np.log(2 * np.pi) + model_lv + (x0 - model_mean) ** 2 / np.exp(model_lv))
    decoder = -log_p.mean(axis=axes) / np.log(2)
    return np.where(t == 0, decoder, kl)


# -- helpers ------------------------------------------------------------------------------
def learned_diffusion(num_timesteps=T, **kwargs):
    return gd.GaussianDiffusion("cosine", num_timesteps, variance_type="learned_range", **kwargs)


def mlp_model(seed=0, hidden=16, num_classes=None, randomize=0.0, diffusion=None, **kwargs):
    keras.utils.set_random_seed(seed)
    denoiser = build_mlp_denoiser(2, hidden_units=hidden, num_blocks=1, num_classes=num_classes,
                                  out_dim=4)
    model = DiffusionModel(denoiser, diffusion or learned_diffusion(), num_classes=num_classes,
                           **kwargs)
    if randomize:
        rng = np.random.default_rng(seed)
        for network in (model.denoiser, model.ema_denoiser):
            for weight, value in zip(network.weights, model.denoiser.get_weights(), strict=True):
                weight.assign(value + rng.normal(0, randomize, value.shape).astype(value.dtype))
    return model


def ring(n=256, seed=1):
    angles = np.random.default_rng(seed).uniform(0, 2 * np.pi, size=n)
    return np.stack([np.cos(angles), np.sin(angles)], 1).astype("float32")


# -- (a) the interpolation ----------------------------------------------------------------
def test_tables_match_independent_schedule():
    diffusion = learned_diffusion(1000)
    np.testing.assert_allclose(diffusion.alphas_cumprod, numpy_cosine_abar(1000), rtol=1e-12)
    log_beta, log_beta_tilde, _, _ = numpy_chain(numpy_cosine_abar(1000))
    np.testing.assert_allclose(diffusion.log_betas, log_beta, rtol=1e-10)
    np.testing.assert_allclose(diffusion.posterior_log_variance_clipped, log_beta_tilde,
                               rtol=1e-10)


@pytest.mark.parametrize("v", [1.0, -1.0, 0.0, 0.3, -0.7, 1.5])
def test_full_chain_log_variance(v):
    diffusion = learned_diffusion(1000)
    log_beta, log_beta_tilde, _, _ = numpy_chain(numpy_cosine_abar(1000))
    t = np.array([0, 1, 2, 10, 500, 998, 999])
    var_values = tf.fill([len(t), 3, 3, 1], v)
    got = diffusion.model_log_variance(tf.constant(t), var_values, var_values).numpy()
    expected = numpy_interpolation(v, log_beta[t], log_beta_tilde[t])
    np.testing.assert_allclose(got[:, 0, 0, 0], expected, rtol=1e-6)
    if v == 1.0:
        np.testing.assert_allclose(got[:, 0, 0, 0], np.log(diffusion.betas[t]), rtol=1e-6)
    if v == -1.0:
        np.testing.assert_allclose(got[:, 0, 0, 0],
                                   diffusion.posterior_log_variance_clipped[t], rtol=1e-6)


def test_log_variance_is_per_element():
    diffusion = learned_diffusion(1000)
    log_beta, log_beta_tilde, _, _ = numpy_chain(numpy_cosine_abar(1000))
    v = np.random.default_rng(0).uniform(-1.5, 1.5, size=(4, 5)).astype("float64")
    t = np.array([0, 3, 200, 999])
    got = diffusion.model_log_variance(tf.constant(t), tf.constant(v), tf.constant(v)).numpy()
    expected = numpy_interpolation(v, log_beta[t][:, None], log_beta_tilde[t][:, None])
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_p_mean_variance_splits_the_output():
    diffusion = learned_diffusion()
    rng = np.random.default_rng(0)
    eps_hat = rng.normal(size=(3, 2))
    v = rng.uniform(-1, 1, size=(3, 2))
    x_t = tf.constant(rng.normal(size=(3, 2)))
    t = tf.constant([0, 7, 49])
    mean, variance, log_variance, _ = diffusion.p_mean_variance(
        tf.constant(np.concatenate([eps_hat, v], -1)), x_t, t)
    fixed = gd.GaussianDiffusion("cosine", T)
    fixed_mean, _, _, _ = fixed.p_mean_variance(tf.constant(eps_hat), x_t, t)
    np.testing.assert_allclose(mean.numpy(), fixed_mean.numpy(), rtol=1e-12)
    log_beta, log_beta_tilde, _, _ = numpy_chain(numpy_cosine_abar(T))
    expected = numpy_interpolation(v, log_beta[[0, 7, 49]][:, None],
                                   log_beta_tilde[[0, 7, 49]][:, None])
    np.testing.assert_allclose(log_variance.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(variance.numpy(), np.exp(expected), rtol=1e-12)
    with pytest.raises(ValueError, match="var_values"):
        diffusion.model_log_variance(t, x_t)
    with pytest.raises(ValueError, match="even number of channels"):
        diffusion.split_output(tf.zeros([2, 3]))


@pytest.mark.parametrize("kept", [[0, 9, 30, 49], [3, 20], list(range(T))])
def test_respaced_chain_log_variance(kept):
    diffusion = learned_diffusion()
    abar = numpy_cosine_abar(T)
    log_beta, log_beta_tilde, _, _ = numpy_chain(abar[kept])
    got_beta, got_tilde = gd.respaced_log_variance_bounds(diffusion.alphas_cumprod[kept])
    np.testing.assert_allclose(got_beta.numpy(), log_beta, rtol=1e-10)
    np.testing.assert_allclose(got_tilde.numpy(), log_beta_tilde, rtol=1e-10)
    chain = likelihood._RespacedChain(diffusion, np.array(kept))
    np.testing.assert_allclose(chain.log_beta, log_beta, rtol=1e-10)
    np.testing.assert_allclose(chain.posterior_log_variance, log_beta_tilde, rtol=1e-10)
    for v in (-1.0, 1.0, 0.25):
        got = gd.learned_range_log_variance(tf.constant(v, tf.float64), got_beta, got_tilde)
        np.testing.assert_allclose(got.numpy(), numpy_interpolation(v, log_beta, log_beta_tilde),
                                   rtol=1e-10)
    if len(kept) == T:  # every step kept: the full chain's tables
        np.testing.assert_allclose(got_beta.numpy(), diffusion.log_betas, rtol=1e-12)
        np.testing.assert_allclose(got_tilde.numpy(), diffusion.posterior_log_variance_clipped,
                                   rtol=1e-12)


def test_ancestral_sampler_uses_respaced_learned_variance():
    """``samplers.sample`` against a numpy ancestral loop on the respaced chain."""
    diffusion = learned_diffusion()
    v_value, eps_scale, seed, num_steps = 0.4, 0.3, 7, 4
    kept = np.array(schedules.respaced_timesteps(T, num_steps, "trailing"))

    def fn(x, t):
        return tf.concat([eps_scale * x, tf.fill(tf.shape(x), v_value)], -1)

    got = samplers.sample(fn, diffusion, [5, 2], seed, num_steps,
                          samplers.AncestralSampler("learned_range"), "trailing").numpy()

    abar = numpy_cosine_abar(T)[kept]
    log_beta, log_beta_tilde, c1, c2 = numpy_chain(abar)
    sigma = np.exp(0.5 * numpy_interpolation(v_value, log_beta, log_beta_tilde))
    x = tf.random.stateless_normal([5, 2], seed=samplers.step_seed(seed, 0)).numpy()
    x = x.astype(np.float64)
    for i in range(num_steps - 1, -1, -1):
        x0_hat = (x - np.sqrt(1 - abar[i]) * eps_scale * x) / np.sqrt(abar[i])
        noise = tf.random.stateless_normal([5, 2], seed=samplers.step_seed(seed, i + 1)).numpy()
        x = c1[i] * x0_hat + c2[i] * x + (sigma[i] * noise if i > 0 else 0.0)
    np.testing.assert_allclose(got, x, rtol=2e-4, atol=2e-5)


def test_ddim_ignores_the_variance_channels():
    diffusion = learned_diffusion()
    draws = []
    for v in (-1.0, 1.0):
        def fn(x, t, v=v):
            return tf.concat([0.2 * x, tf.fill(tf.shape(x), v)], -1)
        draws.append(samplers.sample(fn, diffusion, [4, 2], 3, 5,
                                     samplers.DDIMSampler(0.5)).numpy())
    np.testing.assert_array_equal(draws[0], draws[1])
    with pytest.raises(ValueError, match="learned variance"):
        samplers.sample(lambda x, t: x, gd.GaussianDiffusion("cosine", T), [2, 2], 0, 3,
                        samplers.AncestralSampler("learned_range"))


def test_guidance_applies_to_the_prediction_channels_only():
    keras.utils.set_random_seed(0)

    class Fake:
        def __call__(self, inputs, training=False):
            x, _, label = inputs
            label = tf.cast(label, tf.float32)[:, None]
            return tf.concat([x + label, 10.0 * label + tf.zeros_like(x)], -1)

    x = tf.constant([[0.5, -0.5]])
    t = tf.constant([3])
    fn = samplers.denoiser_fn(Fake(), tf.constant([2]), 3.0, null_label=5,
                              learned_variance=True)
    out = fn(x, t).numpy()
    # prediction: u + 3 (c - u) with c = x + 2, u = x + 5; variance: the conditional pass's.
    np.testing.assert_allclose(out[:, :2], x.numpy() + 5 + 3 * (2 - 5))
    np.testing.assert_allclose(out[:, 2:], [[20.0, 20.0]])


# -- (b) the vlb term against numpy -------------------------------------------------------
@pytest.mark.parametrize("discrete", [True, False])
def test_timestep_vlb_matches_numpy(discrete):
    diffusion = learned_diffusion()
    rng = np.random.default_rng(3)
    shape = (6, 4, 4, 1) if discrete else (6, 3)
    x0 = (rng.integers(0, 256, size=shape) * 2 / 255 - 1) if discrete else rng.normal(size=shape)
    x0[0].flat[0], x0[0].flat[1] = -1.0, 1.0  # the two edge bins
    t = np.array([0, 0, 1, 5, 30, 49])
    noise = rng.normal(size=shape)
    x_t = diffusion.q_sample(tf.constant(x0), tf.constant(t), tf.constant(noise)).numpy()
    eps_hat = noise + 0.3 * rng.normal(size=shape)
    v = rng.uniform(-1.2, 1.2, size=shape)
    got = likelihood.timestep_vlb_bits(
        diffusion, tf.constant(np.concatenate([eps_hat, v], -1)), tf.constant(x0),
        tf.constant(x_t), tf.constant(t, tf.int32), discrete=discrete).numpy()
    expected = numpy_vlb_bits(eps_hat, v, x0, x_t, t, numpy_cosine_abar(T), discrete)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)


def test_hybrid_loss_matches_numpy():
    """The model's loss: MSE of the prediction plus vlb_weight * T * L_t at its own output."""
    model = mlp_model(randomize=0.3, vlb_weight=0.004)
    rng = np.random.default_rng(4)
    x0 = rng.normal(size=(8, 2)).astype("float32")
    noise = rng.normal(size=(8, 2)).astype("float32")
    t = np.array([0, 1, 2, 5, 10, 20, 40, 49], dtype=np.int32)
    weights = rng.uniform(0.5, 1.5, size=8).astype("float32")
    result = model.denoising_loss(model.denoiser, tf.constant(x0), tf.constant(t),
                                  tf.constant(noise), None, tf.constant(weights), False)
    output = result.outputs.numpy().astype(np.float64)
    eps_hat, v = output[:, :2], output[:, 2:]
    abar = numpy_cosine_abar(T)
    x_t = np.sqrt(abar[t])[:, None] * x0 + np.sqrt(1 - abar[t])[:, None] * noise
    vlb = numpy_vlb_bits(eps_hat, v, x0.astype(np.float64), x_t, t, abar, discrete=False)
    mse = ((eps_hat - noise) ** 2).mean(-1)
    np.testing.assert_allclose(result.extras["vlb"].numpy(), vlb, rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(result.extras["mse"].numpy(), mse, rtol=1e-5)
    per_example = mse + 0.004 * T * vlb
    np.testing.assert_allclose(result.extras["per_example"].numpy(), per_example, rtol=2e-4)
    np.testing.assert_allclose(result.loss.numpy(), np.mean(per_example * weights), rtol=2e-4)
    # K-FAC scale: s_n = w / D on the prediction, the log-variance Fisher on v.
    scale = np.asarray(result.per_example_scale)
    np.testing.assert_allclose(scale[:, :2], np.repeat(weights[:, None] / 2, 2, 1), rtol=1e-6)
    log_beta, log_beta_tilde, _, _ = numpy_chain(abar)
    expected_v = weights * 0.004 * T * (log_beta[t] - log_beta_tilde[t]) ** 2 / (16 * 2 * np.log(2))
    np.testing.assert_allclose(scale[:, 2:], np.repeat(expected_v[:, None], 2, 1), rtol=1e-5)


# -- (c) stop-gradient --------------------------------------------------------------------
def test_vlb_trains_only_the_variance_channels():
    model = mlp_model(randomize=0.3)
    rng = np.random.default_rng(5)
    x0 = tf.constant(rng.normal(size=(16, 2)).astype("float32"))
    noise = tf.constant(rng.normal(size=(16, 2)).astype("float32"))
    t = tf.constant(rng.integers(0, T, size=16).astype("int32"))
    out_layer = model.denoiser.get_layer("out")
    with tf.GradientTape(persistent=True) as tape:
        result = model.denoising_loss(model.denoiser, x0, t, noise, None, tf.ones([16]), True)
        vlb = tf.reduce_mean(result.extras["vlb"])
        mse = tf.reduce_mean(result.extras["mse"])
        output = result.outputs
    kernel_vlb, bias_vlb = tape.gradient(vlb, [out_layer.kernel, out_layer.bias])
    kernel_mse = tape.gradient(mse, out_layer.kernel)
    output_vlb = tape.gradient(vlb, output).numpy()
    del tape
    np.testing.assert_array_equal(output_vlb[:, :2], 0.0)
    assert np.abs(output_vlb[:, 2:]).max() > 0
    np.testing.assert_array_equal(kernel_vlb.numpy()[:, :2], 0.0)
    np.testing.assert_array_equal(bias_vlb.numpy()[:2], 0.0)
    assert np.abs(kernel_vlb.numpy()[:, 2:]).max() > 0
    np.testing.assert_array_equal(kernel_mse.numpy()[:, 2:], 0.0)
    assert np.abs(kernel_mse.numpy()[:, :2]).max() > 0


# -- (d) training -------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["adam", "kfac"])
def test_tiny_model_trains(optimizer):
    model = mlp_model(hidden=32)
    opt = (KFAC(learning_rate=0.1, damping=1e-3, inverse_every=5) if optimizer == "kfac"
           else keras.optimizers.Adam(2e-3))
    model.compile(optimizer=opt)
    history = model.fit(ring(512), batch_size=64, epochs=6, shuffle=False, verbose=0)
    losses, vlbs = history.history["loss"], history.history["vlb"]
    assert np.all(np.isfinite(losses)) and np.all(np.isfinite(vlbs))
    assert losses[-1] < 0.6 * losses[0]
    assert vlbs[-1] < vlbs[0]
    if optimizer == "kfac":
        assert int(opt.skipped_updates.numpy()) == 0
    logs = model.evaluate(ring(128, seed=2), batch_size=64, verbose=0, return_dict=True)
    assert {"loss", "loss_q1", "loss_q4", "vlb"} <= set(logs) and "grad_norm" not in logs
    assert np.isfinite(logs["vlb"]) and logs["vlb"] > 0


# -- (e) the bound ------------------------------------------------------------------------
@pytest.mark.parametrize("timesteps", [None, [0, 4, 17, 49], [0, 25, 49]])
@pytest.mark.parametrize("discrete", [True, False])
def test_bound_with_v_minus_one_equals_fixed_small(timesteps, discrete):
    shape = (4, 4, 4, 1) if discrete else (16, 2)
    rng = np.random.default_rng(6)
    x0 = (rng.integers(0, 256, size=shape) * 2 / 255 - 1 if discrete
          else rng.normal(size=shape)).astype("float32")

    def fixed_fn(x, t):
        return 0.3 * x + 0.01 * tf.cast(t, x.dtype)[(...,) + (None,) * (len(x.shape) - 1)]

    def learned_fn(v):
        return lambda x, t: tf.concat([fixed_fn(x, t), tf.fill(tf.shape(x), v)], -1)

    fixed = likelihood.variational_bound(fixed_fn, gd.GaussianDiffusion("cosine", T), x0, 11,
                                         timesteps=timesteps)
    diffusion = learned_diffusion()
    same = likelihood.variational_bound(learned_fn(-1.0), diffusion, x0, 11, timesteps=timesteps)
    for key in ("bits_per_dim", "kl_bpd", "decoder_bpd", "prior_bpd", "per_step_bpd"):
        np.testing.assert_allclose(same[key].numpy(), fixed[key].numpy(), rtol=1e-5, atol=1e-7)
    other = likelihood.variational_bound(learned_fn(0.5), diffusion, x0, 11, timesteps=timesteps)
    assert np.all(np.isfinite(other["bits_per_dim"].numpy()))
    assert not np.allclose(other["bits_per_dim"].numpy(), fixed["bits_per_dim"].numpy())


def test_respaced_bound_per_step_matches_numpy():
    """Kept step i of a respaced bound, with a learned v, against numpy on that chain."""
    diffusion = learned_diffusion()
    kept = np.array([0, 10, 30, 49])
    rng = np.random.default_rng(8)
    x0 = rng.normal(size=(32, 2)).astype("float64")
    v_value = 0.6

    def fn(x, t):
        return tf.concat([0.5 * x, tf.fill(tf.shape(x), tf.constant(v_value, x.dtype))], -1)

    out = likelihood.variational_bound(fn, diffusion, tf.constant(x0), 5, timesteps=kept)
    abar = numpy_cosine_abar(T)[kept]
    log_beta, log_beta_tilde, c1, c2 = numpy_chain(abar)
    seed = likelihood._stateless_seed(5)
    for i in range(1, len(kept)):
        noise = tf.random.stateless_normal(
            x0.shape, seed=tf.random.experimental.stateless_fold_in(seed, i),
            dtype=tf.float64).numpy()
        x_t = np.sqrt(abar[i]) * x0 + np.sqrt(1 - abar[i]) * noise
        x0_hat = (x_t - np.sqrt(1 - abar[i]) * 0.5 * x_t) / np.sqrt(abar[i])
        model_lv = numpy_interpolation(v_value, log_beta[i], log_beta_tilde[i])
        kl = numpy_kl(c1[i] * x0 + c2[i] * x_t, log_beta_tilde[i], c1[i] * x0_hat + c2[i] * x_t,
                      model_lv).sum(-1)
        np.testing.assert_allclose(out["per_step_bpd"].numpy()[i],
                                   np.mean(kl / (2 * np.log(2))), rtol=1e-9)


# -- construction, config, export ---------------------------------------------------------
def test_mismatched_output_channels_are_rejected():
    with pytest.raises(ValueError, match=r"outputs 2 channels.*learned_range.*needs 4"):
        DiffusionModel(build_mlp_denoiser(2, 8, 1), learned_diffusion())
    with pytest.raises(ValueError, match=r"outputs 4 channels.*fixed_small.*needs 2"):
        DiffusionModel(build_mlp_denoiser(2, 8, 1, out_dim=4), gd.GaussianDiffusion("cosine", T))
    with pytest.raises(ValueError, match="vlb_weight"):
        DiffusionModel(build_mlp_denoiser(2, 8, 1, out_dim=4), learned_diffusion(),
                       vlb_weight=-1.0)
    with pytest.raises(ValueError, match="vlb_weight"):
        DiffusionModel(build_mlp_denoiser(2, 8, 1, out_dim=4), learned_diffusion(),
                       vlb_weight=math.nan)
    with pytest.raises(ValueError, match="output_channels"):
        build_unet((8, 8, 1), base_channels=8, groups=4, output_channels=0)


def test_config_doubles_the_output_and_validates_vlb_weight():
    config = config_lib.TrainConfig(variance_type="learned_range", vlb_weight=0.01,
                                    base_channels=8, groups=4, epochs=2, warmup_steps=10)
    config.validate()
    model = config_lib.build_model(config, (8, 8, 1))
    assert model.denoiser.outputs[0].shape[-1] == 2
    assert model.denoiser.get_layer("out_conv").kernel.shape[-1] == 2
    assert model.vlb_weight == 0.01
    mlp = config_lib.build_denoiser(config, (2,), None)
    assert mlp.outputs[0].shape[-1] == 4
    fixed = config_lib.build_denoiser(config_lib.TrainConfig(), (2,), None)
    assert fixed.outputs[0].shape[-1] == 2
    for bad in (-0.1, math.inf, math.nan):
        with pytest.raises(config_lib.ConfigError, match="vlb_weight"):
            config_lib.TrainConfig(vlb_weight=bad).validate()
    assert "vlb_weight" in config_lib.OPTION_HELP


def test_learned_range_export_matches_in_process_sampling(tmp_path):
    # v prediction (as test_export.py's conditional model): with eps prediction the last
    # step's abar ~ 1e-5 amplifies a random network's error far beyond float32.
    model = mlp_model(seed=2, num_classes=3, randomize=0.1,
                      diffusion=learned_diffusion(20, prediction_type="v"))
    path = export.export_sampler(model, str(tmp_path / "lv" / "1"), sampler="ddpm",
                                 max_steps=10)
    loaded = tf.saved_model.load(path)
    serve = loaded.signatures[export.SIGNATURE_NAME]
    for scale in (1.0, 2.5):
        got = serve(num_samples=tf.constant(6), seed=tf.constant(4, tf.int64),
                    num_steps=tf.constant(8), label=tf.constant(1),
                    guidance_scale=tf.constant(scale))["samples"].numpy()
        expected = model.sample(6, seed=4, num_steps=8, sampler="ddpm", label=1,
                                guidance_scale=scale).numpy()
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert export.read_export_metadata(path)["diffusion"]["variance_type"] == "learned_range"
