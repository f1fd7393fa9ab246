"""Neural Diffusion Models: DDPM reduction, NDM marginals, K-FAC residuals, training, I/O."""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfngd import data as data_lib
from tfngd import samplers
from tfngd.gaussian_diffusion import GaussianDiffusion
from tfngd.likelihood import (
    discretized_gaussian_log_likelihood,
    normal_kl,
    sum_over_example,
    variational_bound,
)
from tfngd.ndm import NeuralDiffusionModel
from tfngd.networks import build_mlp_denoiser, build_unet
from tfngd.optimizers import KFAC, diagnostics

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

T = 20


def randomise(network, seed, scale=0.3):
    """Random weights everywhere (the output layers are zero-initialised)."""
    rng = np.random.default_rng(seed)
    for w in network.weights:
        if len(w.shape) > 1:
            w.assign(rng.normal(scale=scale, size=w.shape).astype("float32")
                     / math.sqrt(float(np.prod(w.shape[:-1]))))
        else:
            w.assign(rng.normal(scale=0.1, size=w.shape).astype("float32"))
    return network


def mlp(name, seed=0, hidden=16):
    keras.utils.set_random_seed(seed)
    return build_mlp_denoiser(2, hidden_units=hidden, num_blocks=1, name=name)


def make_ndm(identity=False, seed=0, schedule="cosine", num_timesteps=T, randomise_transform=False,
             prediction_type="x0", **kwargs):
    transform = mlp("transform", seed)
    if randomise_transform:
        randomise(transform, seed + 100, scale=3.0)
    reverse = randomise(mlp("reverse", seed + 1), seed + 1)
    diffusion = GaussianDiffusion(schedule, num_timesteps, prediction_type=prediction_type)
    return NeuralDiffusionModel(transform, reverse, diffusion, identity_transform=identity,
                                seed=seed, **kwargs)


def draws(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype("float32")
    t = rng.integers(1, T, size=shape[0]).astype("int32")
    noise = rng.normal(size=shape).astype("float32")
    decoder_noise = rng.normal(size=shape).astype("float32")
    return tf.constant(x), tf.constant(t), tf.constant(noise), tf.constant(decoder_noise)


def ddpm_bound_terms(diffusion, reverse, x, t, noise, decoder_noise, images):
    """DDPM's bound with an x0 parameterisation, from GaussianDiffusion alone (per example)."""
    x_t = diffusion.q_sample(x, t, noise)
    q_mean, _, q_log_variance = diffusion.q_posterior_mean_variance(x, x_t, t)
    p_mean, _, p_log_variance, _ = diffusion.p_mean_variance(reverse([x_t, t]), x_t, t)
    kl = sum_over_example(normal_kl(q_mean, q_log_variance, p_mean, p_log_variance))

    t0 = tf.zeros_like(t)
    x_1 = diffusion.q_sample(x, t0, decoder_noise)
    mean0, _, log_variance0, _ = diffusion.p_mean_variance(reverse([x_1, t0]), x_1, t0)
    if images:
        log_likelihood = discretized_gaussian_log_likelihood(x, mean0, 0.5 * log_variance0)
    else:
        log_likelihood = -0.5 * (math.log(2 * math.pi) + log_variance0
                                 + tf.square(x - mean0) * tf.exp(-log_variance0))
    reconstruction = -sum_over_example(log_likelihood)

    last = tf.fill(tf.shape(t), diffusion.num_timesteps - 1)
    prior_mean, _, prior_log_variance = diffusion.q_mean_variance(x, last)
    prior = sum_over_example(normal_kl(prior_mean, prior_log_variance, 0.0, 0.0))
    return kl, reconstruction, prior


# ----------------------------------------------------------------- reduction to DDPM


@pytest.mark.parametrize("case", ["identity_option", "learned_at_init", "v_prediction",
                                  "identity_images"])
def test_identity_transform_gives_the_ddpm_bound_exactly(case):
    if case == "identity_images":
        keras.utils.set_random_seed(0)
        unet = dict(base_channels=8, channel_mults=(1,), attention_resolutions=(), groups=4)
        transform = randomise(build_unet((4, 4, 1), name="transform", **unet), 5, scale=3.0)
        reverse = randomise(build_unet((4, 4, 1), name="reverse", **unet), 6)
        model = NeuralDiffusionModel(transform, reverse,
                                     GaussianDiffusion("linear", T, prediction_type="x0"),
                                     identity_transform=True)
        _, t, noise, decoder_noise = draws((6, 4, 4, 1))
        levels = np.random.default_rng(3).integers(0, 256, size=(6, 4, 4, 1))
        x = tf.constant((levels / 127.5 - 1.0).astype("float32"))  # the 256-level grid
    else:
        # The identity option must ignore a transform network with large random outputs; a
        # learned model at init has F = x + c(t) * 0 (zero-initialised output layer).
        identity = case != "learned_at_init"
        model = make_ndm(identity=identity, randomise_transform=identity,
                         prediction_type="v" if case == "v_prediction" else "x0")
        x, t, noise, decoder_noise = draws((32, 2))
    terms = model.bound_terms(x, t, noise, decoder_noise)

    kl, reconstruction, prior = ddpm_bound_terms(model.diffusion, model.reverse_network, x, t,
                                                 noise, decoder_noise, case == "identity_images")
    np.testing.assert_array_equal(terms.timestep_kl.numpy(), kl.numpy())
    np.testing.assert_array_equal(terms.diffusion.numpy(), (T - 1) * kl.numpy())
    np.testing.assert_array_equal(terms.reconstruction.numpy(), reconstruction.numpy())
    np.testing.assert_array_equal(terms.prior.numpy(), prior.numpy())
    assert np.all(kl.numpy() > 0) and np.all(np.isfinite(terms.total.numpy()))


@pytest.mark.parametrize("prediction_type", ["x0", "v"])
def test_exact_bound_is_the_projects_ddpm_bound(prediction_type):
    """``per_example_bound`` (every t) of the identity model = ``likelihood.variational_bound``."""
    model = make_ndm(identity=True, randomise_transform=True, prediction_type=prediction_type)
    x = draws((8, 2))[0]
    ndm = model.per_example_bound(x.numpy(), seed=3)
    reverse = model.ema_reverse_network
    ddpm = variational_bound(lambda z, t: reverse([z, t], training=False), model.diffusion, x,
                             model.evaluation_batch_seed(3, 0), discrete=False)
    np.testing.assert_allclose(ndm, 2 * ddpm["nats_per_dim"].numpy(), rtol=1e-5)
    # A learned transform changes it (the transform network has large random weights).
    learned = make_ndm(randomise_transform=True, prediction_type=prediction_type)
    assert np.abs(learned.per_example_bound(x.numpy(), seed=3) - ndm).max() > 0.1


# ----------------------------------------------------------------- NDM posterior


@pytest.mark.parametrize("s,t", [(11, 12), (3, 17), (0, 5), (-1, 4)])
def test_posterior_gives_the_ndm_marginals(s, t):
    model = make_ndm(randomise_transform=True)
    points = np.array([[0.5, -1.0], [-2.0, 1.5]], dtype="float32")
    draws_per_point = 20000
    x = tf.constant(np.repeat(points, draws_per_point, axis=0))
    n = x.shape[0]
    rng = np.random.default_rng(0)
    abar = model.diffusion.alphas_cumprod
    transform_t = model.transform(x, t).numpy()
    z_t = np.sqrt(abar[t]) * transform_t + np.sqrt(1 - abar[t]) * rng.normal(size=x.shape)
    mean, variance = model.posterior_mean_variance(x, z_t.astype("float32"), t, s)
    z_s = (mean.numpy() + np.sqrt(variance.numpy()) * rng.normal(size=x.shape)).reshape(
        2, draws_per_point, 2)

    if s == -1:  # the posterior to the data is the data itself
        np.testing.assert_array_equal(variance.numpy(), 0.0)
        np.testing.assert_allclose(z_s, np.broadcast_to(points[:, None], z_s.shape), atol=1e-5)
        return
    expected_mean = np.sqrt(abar[s]) * model.transform(points, s).numpy()
    # The transform really moves the data, and differently at s and t: without the
    # c2 alpha_t (F(x, s) - F(x, t)) term the means below would be off by many errors.
    moved = np.abs(model.transform(points, t).numpy() - model.transform(points, s).numpy())
    assert moved.max() > 0.3
    sigma_s = math.sqrt(1 - abar[s])
    standard_error = sigma_s / math.sqrt(draws_per_point)
    np.testing.assert_allclose(z_s.mean(axis=1), expected_mean, atol=5 * standard_error)
    np.testing.assert_allclose(z_s.var(axis=1), sigma_s**2,
                               rtol=5 * math.sqrt(2 / draws_per_point))
    assert n == 2 * draws_per_point


def test_transform_is_the_identity_at_t0_and_scaled_by_c():
    model = make_ndm(randomise_transform=True)
    x = draws((16, 2))[0]
    np.testing.assert_array_equal(model.transform(x, 0).numpy(), x.numpy())
    abar = model.diffusion.alphas_cumprod
    scale = model.transform_scale(tf.range(T), tf.zeros([T, 1])).numpy()[:, 0]
    np.testing.assert_allclose(scale, (abar[0] - abar) / (abar[0] - abar[-1]), rtol=1e-6)
    assert scale[0] == 0.0 and scale[-1] == pytest.approx(1.0)
    network = model.transform_network([x, tf.fill([16], 7)]).numpy()
    np.testing.assert_allclose(model.transform(x, 7).numpy(), x.numpy() + scale[7] * network,
                               rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------- K-FAC residuals


def test_residuals_square_to_the_bound_and_carry_its_gradient():
    """``||R||^2 = L + const`` and the objective's gradient is that of ``mean s ||R||^2``."""
    model = make_ndm(randomise_transform=True)
    x, t, noise, decoder_noise = draws((16, 2), seed=4)
    weights = tf.constant(np.random.default_rng(1).uniform(0.5, 2.0, 16).astype("float32"))
    variables = model.transform_network.trainable_variables + \
        model.reverse_network.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        result = model.training_objective(x, t, noise, decoder_noise, weights)
        gauss_newton_loss = tf.reduce_mean(result.per_example_scale
                                           * tf.reduce_sum(tf.square(result.outputs), axis=1))
    terms = result.extras["terms"]
    diffusion = model.diffusion
    # Constants (fixed_small: the KL's variance part vanishes): the decoder's normaliser and
    # the prior's variance part.
    log_variance0 = diffusion.posterior_log_variance_clipped[0]
    log_variance_last = math.log(1 - diffusion.alphas_cumprod[-1])
    constant = 2 * (0.5 * (math.log(2 * math.pi) + log_variance0)
                    + 0.5 * (-1 - log_variance_last + math.exp(log_variance_last)))
    squared = tf.reduce_sum(tf.square(terms.residuals), axis=1).numpy()
    np.testing.assert_allclose(squared + constant, terms.total.numpy(), rtol=2e-5)
    np.testing.assert_array_equal(terms.diffusion.numpy(),
                                  (T - 1) * weights.numpy() * terms.timestep_kl.numpy())
    assert result.per_example_scale == 0.5

    exact = tape.gradient(result.loss, variables)
    surrogate = tape.gradient(gauss_newton_loss, variables)
    for g_exact, g_surrogate in zip(exact, surrogate, strict=True):
        np.testing.assert_allclose(g_surrogate.numpy(), g_exact.numpy(), rtol=1e-3,
                                   atol=1e-5 * float(tf.reduce_max(tf.abs(g_exact))))
    assert all(float(tf.reduce_max(tf.abs(g))) > 0 for g in exact)  # both networks learn


def curvature_along_gradient(approximation: str, num_timesteps: int = 1000) -> dict:
    """Per transform layer, K-FAC's ``d^T F d`` over the exact Gauss-Newton's along the
    gradient ``d`` (:func:`tfngd.optimizers.diagnostics.curvature_along_gradient`; one
    batch, exact probes, randomised transform so that every layer has a gradient)."""
    keras.utils.set_random_seed(0)
    transform = randomise(mlp("transform", 0), 5, scale=1.0)
    model = NeuralDiffusionModel(transform, randomise(mlp("reverse", 1), 1),
                                 GaussianDiffusion("cosine", num_timesteps, prediction_type="x0"),
                                 ema_decay=0.0)
    optimizer = KFAC(fisher="exact", approximation=approximation)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.compile(optimizer=optimizer)
    warned = [w for w in caught if "misjudges the transform's curvature" in str(w.message)]
    assert len(warned) == (approximation != "per_example")
    rng = np.random.default_rng(0)
    x = tf.constant(ring(64, 0))
    t = tf.constant(rng.integers(1, num_timesteps, 64), tf.int32)
    noise, decoder_noise = (tf.constant(rng.normal(size=x.shape), tf.float32) for _ in range(2))
    checks = diagnostics.curvature_along_gradient(
        optimizer, model.transform_network.trainable_variables
        + model.reverse_network.trainable_variables,
        lambda: model.training_objective(x, t, noise, decoder_noise, None))
    transform_variables = {id(v) for v in model.transform_network.trainable_variables}
    return {check.name: check.ratio for check in checks
            if id(check.block.variables[0]) in transform_variables}


def test_per_example_kfac_gets_the_transforms_curvature_where_expand_and_reduce_fail():
    """The bound depends on F_phi through F(x, t - 1) - F(x, t) and F(x, s) - F(x_hat, s):
    differenced calls of the same network. Along the gradient, approximation='per_example'
    is within a factor 4 of the exact Gauss-Newton on every transform layer (T = 1000);
    expand (calls as independent positions) overstates the output layer's by > 100x,
    reduce (inputs averaged over the calls) understates it by > 1000x."""
    per_example = curvature_along_gradient("per_example")
    assert len(per_example) == 8 and all(0.25 < r < 4 for r in per_example.values()), per_example
    assert curvature_along_gradient("expand")["out"] > 100
    assert curvature_along_gradient("reduce")["out"] < 1e-3


# ----------------------------------------------------------------- training


def ring(n, seed):
    angles = np.random.default_rng(seed).uniform(0, 2 * np.pi, size=n)
    return (2.0 * np.stack([np.cos(angles), np.sin(angles)], 1)).astype("float32")


@pytest.mark.parametrize("optimizer_name", ["adam", "kfac"])
def test_training_lowers_the_bound(optimizer_name):
    keras.utils.set_random_seed(0)
    model = NeuralDiffusionModel(mlp("transform", 0, 32), mlp("reverse", 1, 32),
                                 GaussianDiffusion("cosine", T, prediction_type="x0"),
                                 ema_decay=0.0, timestep_sampler="loss_second_moment")
    if optimizer_name == "adam":
        optimizer = keras.optimizers.Adam(3e-3)
    else:
        optimizer = KFAC(learning_rate=0.1, damping=1e-3, inverse_every=5,
                         approximation="per_example")
    model.compile(optimizer=optimizer, jit_compile=False)  # XLA compilation costs more here
    train, held_out = ring(2048, 0), ring(256, 1)
    transform_before = [w.numpy() for w in model.transform_network.weights]
    before = model.per_example_bound(held_out, seed=0).mean()

    history = model.fit(train, batch_size=128, epochs=3, shuffle=False, verbose=0)

    after = model.per_example_bound(held_out, seed=0).mean()
    print(f"{optimizer_name}: held-out bound {before / 2:.2f} -> {after / 2:.2f} nats/dim, "
          f"training loss {history.history['loss']}")
    assert after < 0.5 * before
    for key in ("loss", "prior", "diffusion", "reconstruction", "grad_norm"):
        assert np.all(np.isfinite(history.history[key]))
    assert not all(np.array_equal(b, w.numpy())
                   for b, w in zip(transform_before, model.transform_network.weights, strict=True))
    x = tf.constant(held_out[:8])
    np.testing.assert_array_equal(model.transform(x, 0).numpy(), x.numpy())
    if optimizer_name == "kfac":
        assert int(optimizer.skipped_updates.numpy()) == 0
        # Every variable of both networks is preconditioned (no first-order fallback).
        preconditioned = {id(v) for block in optimizer.blocks for v in block.variables}
        assert preconditioned == {id(v) for v in model.transform_network.trainable_variables
                                  + model.reverse_network.trainable_variables}


def test_identity_model_trains_only_the_reverse_network():
    model = make_ndm(identity=True, randomise_transform=True)
    optimizer = KFAC(learning_rate=0.05, damping=1e-2)
    model.compile(optimizer=optimizer, run_eagerly=True)
    before = [w.numpy() for w in model.transform_network.weights]
    model.fit(ring(128, 0), batch_size=64, epochs=1, verbose=0)
    assert all(np.array_equal(b, w.numpy())
               for b, w in zip(before, model.transform_network.weights, strict=True))
    preconditioned = {id(v) for block in optimizer.blocks for v in block.variables}
    assert preconditioned == {id(v) for v in model.reverse_network.trainable_variables}


# ----------------------------------------------------------------- sampling and NLL


def test_identity_sampler_is_ddpm_ancestral_sampling():
    model = make_ndm(identity=True, randomise_transform=True)
    reverse = model.reverse_network
    for num_steps in (T, 7):
        ndm = model.sample(64, seed=5, num_steps=num_steps, use_ema=False).numpy()
        ddpm = samplers.sample(lambda x, t: reverse([x, t], training=False), model.diffusion,
                               [64, 2], tf.constant(5, tf.int64), num_steps,
                               samplers.AncestralSampler("fixed_small"), "trailing").numpy()
        np.testing.assert_allclose(ndm, ddpm, rtol=1e-5, atol=1e-5)
    learned = make_ndm(randomise_transform=True)
    first = learned.sample(16, seed=1, num_steps=5).numpy()
    np.testing.assert_array_equal(first, learned.sample(16, seed=1, num_steps=5).numpy())
    assert np.all(np.isfinite(first)) and first.shape == (16, 2)


def test_negative_log_likelihood_reports_bits_and_an_interval():
    model = make_ndm(randomise_transform=True)
    x = ring(400, 2)
    exact = model.negative_log_likelihood(x, seed=0)
    sampled = model.negative_log_likelihood(x, seed=1, timestep_samples=4)
    mean, low, high = exact["bits_per_dim"]
    assert low < mean < high
    assert exact["nats_per_dim"][0] / math.log(2) == pytest.approx(mean, rel=1e-9)
    assert exact["timestep_samples"] == T - 1 and sampled["timestep_samples"] == 4
    assert exact["decoder"] == "gaussian_density" and exact["num_examples"] == 400
    # The stratified estimate is unbiased: it agrees with the exact sum within the intervals.
    assert abs(sampled["bits_per_dim"][0] - mean) < (high - low) + (
        sampled["bits_per_dim"][2] - sampled["bits_per_dim"][1])


# ----------------------------------------------------------------- save / restore


def test_weights_round_trip_reproduces_losses(tmp_path):
    def build():
        model = make_ndm(timestep_sampler="loss_second_moment")
        # Eagerly: a handful of steps, where tracing the K-FAC step would cost more.
        model.compile(optimizer=KFAC(learning_rate=0.05, damping=1e-2, inverse_every=2,
                                     approximation="per_example"), run_eagerly=True)
        return model

    train = ring(256, 0)
    model = build()
    model.fit(train[:192], batch_size=64, epochs=1, verbose=0, shuffle=False)
    path = str(tmp_path / "ndm.weights.h5")
    model.save_weights(path)
    restored = build()
    restored.load_weights(path)

    x, t, noise, decoder_noise = draws((32, 2), seed=9)
    for use_ema in (False, True):
        a = model.bound_terms(x, t, noise, decoder_noise, use_ema=use_ema).total.numpy()
        b = restored.bound_terms(x, t, noise, decoder_noise, use_ema=use_ema).total.numpy()
        np.testing.assert_array_equal(a, b)
    # The optimizer state (K-FAC factors, momentum, step counter) and the timestep sampler's
    # history came back too: the next steps are identical.
    losses = [m.fit({"x0": train[128:]}, batch_size=64, epochs=1, verbose=0,
                    shuffle=False).history["loss"] for m in (model, restored)]
    assert losses[0] == losses[1]
    assert int(restored.optimizer.iterations.numpy()) == 5


# ----------------------------------------------------------------- bad input


def test_bad_input_is_refused_with_a_clear_message():
    transform, reverse = mlp("transform"), mlp("reverse", 1)
    x0_diffusion = GaussianDiffusion("cosine", T, prediction_type="x0")
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        NeuralDiffusionModel(transform, reverse, GaussianDiffusion("cosine", T, "eps"))
    with pytest.raises(ValueError, match="min_snr_gamma"):
        NeuralDiffusionModel(transform, reverse,
                             GaussianDiffusion("cosine", T, "x0", min_snr_gamma=5.0))
    with pytest.raises(ValueError, match="two different models"):
        NeuralDiffusionModel(reverse, reverse, x0_diffusion)
    with pytest.raises(ValueError, match="must agree"):
        NeuralDiffusionModel(build_mlp_denoiser(3, 8, 1), reverse, x0_diffusion)
    with pytest.raises(ValueError, match="exactly two inputs"):
        NeuralDiffusionModel(build_mlp_denoiser(2, 8, 1, num_classes=3), reverse, x0_diffusion)
    with pytest.raises(ValueError, match="ema_decay"):
        NeuralDiffusionModel(transform, reverse, x0_diffusion, ema_decay=1.0)
    with pytest.raises(ValueError, match="timestep sampler"):
        NeuralDiffusionModel(transform, reverse, x0_diffusion, timestep_sampler="nope")

    model = NeuralDiffusionModel(transform, reverse, x0_diffusion)
    x, t, noise, decoder_noise = draws((4, 2))
    with pytest.raises(ValueError, match="t must be in"):
        model.bound_terms(x, tf.zeros([4], tf.int32), noise, decoder_noise)
    with pytest.raises(ValueError, match="timesteps must be"):
        model.transform(x, T)
    with pytest.raises(ValueError, match="s < t"):
        model.posterior_mean_variance(x, x, 3, 3)
    with pytest.raises(ValueError, match="timestep_samples"):
        model.per_example_bound(x.numpy(), timestep_samples=0)
    with pytest.raises(ValueError, match="non-finite"):
        model.per_example_bound(np.array([[0.0, np.nan]], "float32"))
    with pytest.raises(ValueError, match="shape"):
        model.per_example_bound(np.zeros((4, 3), "float32"))
    with pytest.raises(ValueError, match="num_steps"):
        model.sample(4, num_steps=0)
    with pytest.raises(ValueError, match="spacing"):
        model.sample(4, spacing="sideways")
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    with pytest.raises(ValueError, match="shape"):
        model.fit(np.zeros((8, 3), "float32"), batch_size=4, verbose=0)
    with pytest.raises(ValueError, match="labels"):
        model.fit((np.zeros((8, 2), "float32"), np.zeros(8, "int32")), batch_size=4, verbose=0)


# ----------------------------------------------------------------- learned variances


class VarianceValues(keras.layers.Layer):
    """A trainable variance value ``v`` per channel, the same for every example."""

    def __init__(self, channels, value=-1.0, **kwargs):
        super().__init__(**kwargs)
        self.channels, self.value = int(channels), float(value)

    def build(self, input_shape):
        self.v = self.add_weight(shape=(self.channels,), name="v",
                                 initializer=keras.initializers.Constant(self.value))

    def call(self, prediction):
        return keras.ops.zeros_like(prediction[..., :self.channels]) + self.v

    def get_config(self):
        return {**super().get_config(), "channels": self.channels, "value": self.value}


def with_variance_values(network, value=-1.0):
    """``network``'s output (the prediction), then a variance block ``v = value`` (2C channels)."""
    prediction = network.outputs[0]
    values = VarianceValues(prediction.shape[-1], value, name="variance_values")(prediction)
    return keras.Model(network.inputs, keras.layers.Concatenate()([prediction, values]),
                       name=f"{network.name}_with_variance")


def learned_diffusion(prediction_type="x0"):
    return GaussianDiffusion("cosine", T, prediction_type=prediction_type,
                             variance_type="learned_range")


def make_learned_ndm(seed=0, identity=False, hidden=16, randomised=True, **kwargs):
    """A learned_range NDM: random transform and a random reverse MLP with 2C outputs."""
    transform = mlp("transform", seed, hidden)
    keras.utils.set_random_seed(seed + 1)
    reverse = build_mlp_denoiser(2, hidden_units=hidden, num_blocks=1, name="reverse", out_dim=4)
    if randomised:
        randomise(transform, seed + 100, scale=3.0)
        randomise(reverse, seed + 1)
    return NeuralDiffusionModel(transform, reverse, learned_diffusion(),
                                identity_transform=identity, seed=seed, **kwargs)


def test_learned_variance_at_v_minus_one_is_the_fixed_small_model_exactly():
    """v = -1 gives frac = 0: lv = the clipped log beta~ exactly (also at t = 0), so the
    bound's terms and the mean residuals are fixed_small's to the bit (eager, per example),
    the graph-mode bound and the samples to rounding."""
    fixed = make_ndm(randomise_transform=True, seed=3)
    learned = NeuralDiffusionModel(fixed.transform_network,
                                   with_variance_values(fixed.reverse_network),
                                   learned_diffusion(), seed=3)
    x, t, noise, decoder_noise = draws((32, 2), seed=6)
    a = fixed.bound_terms(x, t, noise, decoder_noise)
    b = learned.bound_terms(x, t, noise, decoder_noise)
    for name in ("prior", "diffusion", "reconstruction", "timestep_kl", "total"):
        np.testing.assert_array_equal(getattr(b, name).numpy(), getattr(a, name).numpy())
    assert a.residuals.shape == (32, 6) and b.residuals.shape == (32, 10)
    np.testing.assert_array_equal(b.residuals[:, :6].numpy(), a.residuals.numpy())
    # The variance block is lv / 2 (scaled like its term): the clipped log beta~ here.
    log_beta_tilde = fixed.diffusion.posterior_log_variance_clipped
    expected = math.sqrt(T - 1) * 0.5 * log_beta_tilde[t.numpy()]
    np.testing.assert_allclose(b.residuals[:, 6:8].numpy(),
                               np.repeat(expected[:, None], 2, axis=1), rtol=1e-6)
    np.testing.assert_allclose(b.residuals[:, 8:].numpy(), 0.5 * log_beta_tilde[0], rtol=1e-6)
    # In graph mode (tf.function) grappler may fuse the two models' ops differently.
    held_out = ring(64, 3)
    np.testing.assert_allclose(learned.per_example_bound(held_out, seed=2),
                               fixed.per_example_bound(held_out, seed=2), rtol=1e-6)
    # Sampling: sqrt(beta~') vs exp(log(beta~') / 2) of the respaced chain.
    for num_steps in (T, 6):
        np.testing.assert_allclose(learned.sample(32, seed=4, num_steps=num_steps).numpy(),
                                   fixed.sample(32, seed=4, num_steps=num_steps).numpy(),
                                   rtol=1e-5, atol=1e-5)


def test_learned_variance_kl_and_decoder_match_numpy():
    model = make_learned_ndm(seed=2)
    x, t, noise, decoder_noise = draws((32, 2), seed=5)
    terms = model.bound_terms(x, t, noise, decoder_noise)
    x64, tn = x.numpy().astype(np.float64), t.numpy()
    noise64, decoder64 = noise.numpy().astype(np.float64), decoder_noise.numpy()
    betas = model.diffusion.betas
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    beta_tilde = betas * (1 - abar_prev) / (1 - abar)
    log_beta_tilde = np.log(np.append(beta_tilde[1], beta_tilde[1:]))

    def column(values):
        return values[:, None]

    def transform(points, times):
        return model.transform(points.astype("float32"), times).numpy().astype(np.float64)

    # The NDM posterior in its original form: alpha_s F(x, s) + sqrt(sigma_s^2 - st^2)
    # (z_t - alpha_t F(x, t)) / sigma_t, with st^2 = beta~_t.
    alpha_t, sigma_t = column(np.sqrt(abar[tn])), column(np.sqrt(1 - abar[tn]))
    alpha_s, sigma2_s = column(np.sqrt(abar_prev[tn])), column(1 - abar_prev[tn])
    z_t = alpha_t * transform(x64, tn) + sigma_t * noise64
    output = model.reverse_network([tf.constant(z_t, tf.float32), t]).numpy().astype(np.float64)
    x_hat, v = output[:, :2], output[:, 2:]

    def posterior_mean(data):
        return (alpha_s * transform(data, tn - 1) + np.sqrt(sigma2_s - column(beta_tilde[tn]))
                * (z_t - alpha_t * transform(data, tn)) / sigma_t)

    mean_q, mean_p = posterior_mean(x64), posterior_mean(x_hat)
    lv_q = column(log_beta_tilde[tn])
    frac = (v + 1) / 2
    lv_p = frac * column(np.log(betas[tn])) + (1 - frac) * lv_q
    assert np.abs(v).max() > 0.2  # the variance values really vary
    kl = 0.5 * (-1 + lv_p - lv_q + np.exp(lv_q - lv_p)
                + (mean_q - mean_p) ** 2 * np.exp(-lv_p)).sum(axis=1)
    np.testing.assert_allclose(terms.timestep_kl.numpy(), kl, rtol=2e-4)
    np.testing.assert_allclose(terms.diffusion.numpy(), (T - 1) * kl, rtol=2e-4)

    # The decoder uses the learned value at t = 0 (between log beta_0 and log beta~_1).
    z_0 = np.sqrt(abar[0]) * x64 + np.sqrt(1 - abar[0]) * decoder64
    output0 = model.reverse_network([tf.constant(z_0, tf.float32),
                                     tf.zeros([32], tf.int32)]).numpy().astype(np.float64)
    frac0 = (output0[:, 2:] + 1) / 2
    lv_0 = frac0 * np.log(betas[0]) + (1 - frac0) * log_beta_tilde[0]
    nll = 0.5 * (np.log(2 * np.pi) + lv_0 + (x64 - output0[:, :2]) ** 2 * np.exp(-lv_0))
    np.testing.assert_allclose(terms.reconstruction.numpy(), nll.sum(axis=1), rtol=2e-4)


def test_learned_identity_model_is_the_projects_learned_range_ddpm():
    """Identity transform: the bound is ``likelihood.variational_bound`` of the learned_range
    DDPM and the sampler is ``samplers.sample`` with the learned_range ancestral sampler."""
    model = make_learned_ndm(seed=4, identity=True)
    x = draws((8, 2))[0]
    reverse = model.ema_reverse_network
    ndm = model.per_example_bound(x.numpy(), seed=3)
    ddpm = variational_bound(lambda z, t: reverse([z, t], training=False), model.diffusion, x,
                             model.evaluation_batch_seed(3, 0), discrete=False)
    np.testing.assert_allclose(ndm, 2 * ddpm["nats_per_dim"].numpy(), rtol=1e-5)
    network = model.reverse_network
    # A respaced chain of 7 steps: the learned range between that chain's beta' and beta~'.
    ndm_samples = model.sample(64, seed=5, num_steps=7, use_ema=False).numpy()
    ddpm_samples = samplers.sample(
        lambda z, t: network([z, t], training=False), model.diffusion, [64, 2],
        tf.constant(5, tf.int64), 7, samplers.AncestralSampler("learned_range"),
        "trailing").numpy()
    np.testing.assert_allclose(ndm_samples, ddpm_samples, rtol=1e-5, atol=1e-5)


def test_variance_residuals_carry_the_fisher_of_the_log_variance():
    """Exact Hessian of the objective in the variance values ``v`` = the residuals'
    Gauss-Newton + the residual-squared terms that vanish at the optimum (at v = -1, where
    lv_p = lv_q, the KL's curvature in lv is 1/2 + r_t^2 and the decoder's r_rec^2)."""
    fixed = make_ndm(randomise_transform=True, seed=7)
    reverse = with_variance_values(fixed.reverse_network)
    model = NeuralDiffusionModel(fixed.transform_network, reverse, learned_diffusion(), seed=7)
    v = reverse.get_layer("variance_values").v
    x, t, noise, decoder_noise = draws((16, 2), seed=8)
    weights = tf.constant(np.random.default_rng(2).uniform(0.5, 2.0, 16).astype("float32"))
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            result = model.training_objective(x, t, noise, decoder_noise, weights)
        gradient = inner.gradient(result.loss, v)
        residuals = result.outputs
    hessian = outer.jacobian(gradient, v).numpy()
    jacobian = outer.jacobian(residuals, v).numpy()  # [N, 5D, 2]
    n, s = 16, result.per_example_scale
    gauss_newton = 2 * s / n * np.einsum("nja,njb->ab", jacobian, jacobian)
    diffusion = model.diffusion
    slope_t = 0.5 * (diffusion.log_betas - diffusion.posterior_log_variance_clipped)[t.numpy()]
    slope_0 = 0.5 * (diffusion.log_betas[0] - diffusion.posterior_log_variance_clipped[0])
    r = residuals.numpy()
    correction = s / n * (np.sum(r[:, 0:2] ** 2 * slope_t[:, None] ** 2, axis=0)
                          + np.sum(r[:, 2:4] ** 2, axis=0) * slope_0 ** 2)
    np.testing.assert_allclose(np.diag(hessian), np.diag(gauss_newton) + correction, rtol=1e-3)
    np.testing.assert_allclose(hessian - np.diag(np.diag(hessian)), 0.0, atol=1e-6)
    # The Gauss-Newton alone: the Fisher, (1/2) (d lv / d v)^2 with the terms' weights.
    fisher = s / n * (0.5 * np.sum((T - 1) * weights.numpy() * slope_t ** 2) + 0.5 * n
                      * slope_0 ** 2)
    np.testing.assert_allclose(np.diag(gauss_newton), fisher, rtol=1e-4)


def variance_kernel(model):
    """The columns of the reverse MLP's output layer that produce the variance values."""
    return model.reverse_network.get_layer("out").kernel.numpy()[:, 2:]


@pytest.mark.parametrize("optimizer_name", ["adam", "kfac"])
def test_learned_variance_trains_and_samples(optimizer_name):
    keras.utils.set_random_seed(0)
    model = make_learned_ndm(seed=0, randomised=False, ema_decay=0.0,
                             timestep_sampler="loss_second_moment")
    if optimizer_name == "adam":
        optimizer = keras.optimizers.Adam(3e-3)
    else:
        optimizer = KFAC(learning_rate=0.05, damping=1e-2, inverse_every=5,
                         approximation="per_example")
    model.compile(optimizer=optimizer, jit_compile=False)  # XLA compilation costs more here
    train = data_lib.make_toy_data("checkerboard", 64 * 8, seed=0)
    before = variance_kernel(model)
    epochs = 3 if optimizer_name == "adam" else 2  # 24 / 16 steps
    history = model.fit(train, batch_size=64, epochs=epochs, shuffle=False, verbose=0)
    losses = history.history["loss"]
    print(f"{optimizer_name}: learned_range training loss {losses}")
    for key in ("loss", "prior", "diffusion", "reconstruction", "grad_norm"):
        assert np.all(np.isfinite(history.history[key]))
    assert losses[-1] < losses[0]
    assert np.abs(variance_kernel(model) - before).max() > 1e-3  # the variance channels learn
    if optimizer_name == "kfac":
        assert int(optimizer.skipped_updates.numpy()) == 0
        preconditioned = {id(v) for block in optimizer.blocks for v in block.variables}
        assert preconditioned == {id(v) for v in model.transform_network.trainable_variables
                                  + model.reverse_network.trainable_variables}
    else:
        samples = model.sample(256, seed=1, num_steps=7).numpy()  # a respaced chain
        assert samples.shape == (256, 2) and np.all(np.isfinite(samples))


def test_learned_variance_needs_twice_the_output_channels():
    with pytest.raises(ValueError, match=r"reverse_network: .*needs 4 .*output_channels"):
        NeuralDiffusionModel(mlp("transform"), mlp("reverse", 1), learned_diffusion())
    keras.utils.set_random_seed(0)
    wide = build_mlp_denoiser(2, 8, 1, name="transform", out_dim=4)
    with pytest.raises(ValueError, match="transform_network must output a tensor shaped"):
        NeuralDiffusionModel(wide, build_mlp_denoiser(2, 8, 1, name="reverse", out_dim=4),
                             learned_diffusion())
