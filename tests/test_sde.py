"""The score-SDE view (tfngd.sde): marginals, PF-ODE likelihood and sampling, PC sampling,
continuous-time training.

References are independent of the module: moment ODEs integrated with scipy, the DDPM
tables, and Gaussian data ``N(m, C)``, whose optimal eps-predictor
``eps*(x, t) = sigma (a^2 C + sigma^2 I)^{-1} (x - a m)`` (``a = alpha(t)``) makes every
marginal, the probability-flow map and the likelihood available in closed form.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import integrate, stats

from tfngd import data, likelihood
from tfngd import sde as sdelib
from tfngd.gaussian_diffusion import GaussianDiffusion
from tfngd.networks import build_mlp_denoiser
from tfngd.networks.blocks import time_embedding_mlp
from tfngd.optimizers import KFAC

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

BETA_MIN, BETA_MAX = 0.1, 20.0
MEAN = np.array([0.5, -0.25])


def rotated_covariance(scales, angle=0.5):
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return rotation @ np.diag(np.square(scales)) @ rotation.T


COVARIANCE = rotated_covariance([1.0, 0.6])


def gaussian_eps_oracle(sde, mean, covariance):
    """``fn(x, t)``: the exact eps of data N(mean, covariance) (x of any shape [B, ...])."""
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)

    def fn(x, t):
        flat = tf.reshape(x, [tf.shape(x)[0], -1])
        a = tf.cast(sde.marginal_mean_coefficient(t), x.dtype)[:, None]
        sigma = tf.cast(sde.marginal_std(t), x.dtype)[:, None]
        basis = tf.constant(eigenvectors, x.dtype)
        residual = tf.matmul(flat - a * tf.constant(mean, x.dtype), basis)
        residual = residual / (a**2 * tf.constant(eigenvalues, x.dtype) + sigma**2)
        return tf.reshape(sigma * tf.matmul(residual, basis, transpose_b=True), tf.shape(x))

    return fn


def marginal_moments(sde, t):
    a = float(sde.marginal_mean_coefficient(tf.constant(t, tf.float64)))
    sigma = float(sde.marginal_std(tf.constant(t, tf.float64)))
    return a, sigma


def pushforward_nll(sde, x, mean, covariance, eps_t=1e-5):
    """``-log`` density at ``eps_t`` of N(0, I) pushed back through the exact PF-ODE flow.

    For Gaussian data the flow from ``eps_t`` to 1 is affine: in the eigenbasis of C each
    coordinate is scaled by ``sqrt(v_1 / v_0)`` with ``v = a^2 lambda + sigma^2``.
    """
    eigenvalues, basis = np.linalg.eigh(covariance)
    a0, s0 = marginal_moments(sde, eps_t)
    a1, s1 = marginal_moments(sde, 1.0)
    ratio = np.sqrt((a1**2 * eigenvalues + s1**2) / (a0**2 * eigenvalues + s0**2))
    x1 = a1 * mean + ((x - a0 * mean) @ basis * ratio) @ basis.T
    dims = len(mean)
    return (0.5 * np.sum(x1**2, axis=1) + 0.5 * dims * math.log(2 * math.pi)
            - np.sum(np.log(ratio)))


# --------------------------------------------------------------------------- SDE marginals


def independent_squared_diffusion(name, t, integrated_beta):
    beta = BETA_MIN + t * (BETA_MAX - BETA_MIN)
    return beta if name == "vp" else beta * (1.0 - math.exp(-2.0 * integrated_beta))


@pytest.mark.parametrize("name", ["vp", "subvp"])
def test_marginals_solve_the_mean_and_variance_odes(name):
    # d/dt [B, m, v] = [beta, -beta m / 2, -beta v + g^2]: the moments of dx = -beta x/2 dt + g dW.
    def moment_odes(t, state):
        integrated_beta, mean, variance = state
        beta = BETA_MIN + t * (BETA_MAX - BETA_MIN)
        g2 = independent_squared_diffusion(name, t, integrated_beta)
        return [beta, -0.5 * beta * mean, -beta * variance + g2]

    times = np.array([1e-5, 1e-3, 0.05, 0.2, 0.5, 0.8, 1.0])
    solution = integrate.solve_ivp(moment_odes, (0.0, 1.0), [0.0, 1.0, 0.0], t_eval=times,
                                   rtol=1e-11, atol=1e-14, method="DOP853")
    sde = sdelib.make_sde(name, beta_min=BETA_MIN, beta_max=BETA_MAX)
    t = tf.constant(times, tf.float64)
    np.testing.assert_allclose(sde.integrated_beta(t).numpy(), solution.y[0], rtol=1e-9)
    np.testing.assert_allclose(sde.marginal_mean_coefficient(t).numpy(), solution.y[1], rtol=1e-8)
    np.testing.assert_allclose(np.square(sde.marginal_std(t).numpy()), solution.y[2], rtol=1e-6)
    g2 = [independent_squared_diffusion(name, s, b) for s, b in zip(times, solution.y[0],
                                                                      strict=True)]
    np.testing.assert_allclose(np.square(sde.diffusion(t).numpy()), g2, rtol=1e-9)
    x = tf.constant(np.ones((len(times), 3)))
    np.testing.assert_allclose(sde.drift(x, t).numpy()[:, 0],
                               -0.5 * (BETA_MIN + times * (BETA_MAX - BETA_MIN)))


def test_vp_sde_discretises_to_the_linear_ddpm_schedule():
    # Song et al.: beta_i = beta(i / (N - 1)) / N is Ho et al.'s 1e-4 .. 2e-2 table for N = 1000.
    sde = sdelib.VPSDE()
    grid = tf.constant(np.arange(1000) / 999.0, tf.float64)
    np.testing.assert_allclose(sde.beta(grid).numpy() / 1000.0,
                               GaussianDiffusion("linear", 1000).betas, rtol=1e-12)
    np.testing.assert_allclose(sde.network_time(grid).numpy(), np.arange(1000), atol=1e-9)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_discrete_ddpm_sde_reproduces_the_table(schedule):
    num_timesteps = 100
    diffusion = GaussianDiffusion(schedule, num_timesteps)
    sde = sdelib.make_sde("ddpm", diffusion)
    grid = np.arange(1, num_timesteps + 1) / num_timesteps
    t = tf.constant(grid, tf.float64)
    np.testing.assert_allclose(sde.alphas_cumprod(t).numpy(), diffusion.alphas_cumprod,
                               rtol=1e-10)
    np.testing.assert_allclose(np.square(sde.marginal_std(t).numpy()),
                               1.0 - diffusion.alphas_cumprod, rtol=1e-10)
    np.testing.assert_allclose(sde.network_time(t).numpy(), np.arange(num_timesteps), atol=1e-9)
    # beta(t) = -d log abar / dt: over each cell it integrates to -log(1 - beta_i) ...
    def beta_at(s):
        return float(sde.beta(tf.constant(s, tf.float64)))

    cells = [0, 1, num_timesteps // 2, num_timesteps - 2, num_timesteps - 1]
    integrals = [integrate.quad(beta_at, i / num_timesteps, (i + 1) / num_timesteps,
                                epsabs=1e-13, epsrel=1e-11)[0] for i in cells]
    np.testing.assert_allclose(integrals, -np.log1p(-diffusion.betas[cells]), rtol=1e-8)
    # ... and is positive and continuous (the ODE solvers see no jumps at the knots).
    fine = np.linspace(0.0, 1.0, 20001)
    betas = sde.beta(tf.constant(fine, tf.float64)).numpy()
    assert np.all(betas > 0)
    knots = grid[:-1]
    left = sde.beta(tf.constant(knots - 1e-9, tf.float64)).numpy()
    right = sde.beta(tf.constant(knots + 1e-9, tf.float64)).numpy()
    np.testing.assert_allclose(left, right, rtol=1e-5)
    # The reverse-diffusion discretisation on the grid is the DDPM step.
    x = tf.ones([num_timesteps, 1], tf.float64)
    f, big_g = sde.discretize(x, t, 1.0 / num_timesteps)
    np.testing.assert_allclose(f.numpy()[:, 0], np.sqrt(1.0 - diffusion.betas) - 1.0, atol=1e-12)
    np.testing.assert_allclose(np.square(big_g.numpy()[:, 0]), diffusion.betas, rtol=1e-9)


def test_denoiser_time_input_rounds_for_integer_networks():
    def echo_time_model(dtype):
        x = keras.Input((2,), name="x")
        t = keras.Input((), dtype=dtype, name="t")
        out = keras.layers.Lambda(lambda args: 0.0 * args[0] + tf.cast(args[1], "float32")[:, None]
                                  )([x, t])
        return keras.Model([x, t], out)

    times = tf.constant([1e-5, 0.4, 0.40049, 1.0], tf.float32)
    x = tf.zeros([4, 2])
    sde = sdelib.VPSDE()
    as_float = sdelib.keras_denoiser_fn(echo_time_model("float32"), sde)(x, times).numpy()[:, 0]
    np.testing.assert_allclose(as_float, 999.0 * times.numpy(), rtol=1e-6)
    as_int = sdelib.keras_denoiser_fn(echo_time_model("int32"), sde)(x, times).numpy()[:, 0]
    np.testing.assert_array_equal(as_int, [0, 400, 400, 999])
    ddpm = sdelib.DiscreteDDPMSDE(GaussianDiffusion("cosine", 50))
    on_grid = tf.constant((np.arange(50) + 1) / 50, tf.float32)
    indices = sdelib.keras_denoiser_fn(echo_time_model("int32"), ddpm)(
        tf.zeros([50, 2]), on_grid).numpy()[:, 0]
    np.testing.assert_array_equal(indices, np.arange(50))
    assert sdelib.keras_denoiser_fn(echo_time_model("int32"), ddpm)(
        x[:1], tf.constant([1e-5])).numpy()[0, 0] == 0  # index -1 + 0.0005 is clipped to 0


# --------------------------------------------------------------------------- eps and score


@pytest.mark.parametrize("name", ["vp", "subvp"])
def test_x0_and_v_predictions_give_the_eps_of_the_oracle(name):
    sde = sdelib.make_sde(name)
    eps_oracle = gaussian_eps_oracle(sde, MEAN, COVARIANCE)
    x = tf.constant(np.random.default_rng(0).normal(size=(3, 2)))
    for time in (1e-5, 0.3, 1.0):
        t = tf.fill([3], tf.constant(time, tf.float64))
        a, sigma = marginal_moments(sde, time)
        # Tweedie: E[x0 | x_t] = m + a C (a^2 C + sigma^2 I)^{-1} (x_t - a m).
        v_t = a**2 * COVARIANCE + sigma**2 * np.eye(2)
        x0 = MEAN + (a * COVARIANCE @ np.linalg.solve(v_t, (x.numpy() - a * MEAN).T)).T
        eps = eps_oracle(x, t).numpy()
        np.testing.assert_allclose(a * x0 + sigma * eps, x.numpy(), rtol=1e-9, atol=1e-12)
        # v on the variance-preserving view: abar' = a^2 / (a^2 + sigma^2).
        abar = a**2 / (a**2 + sigma**2)
        v = math.sqrt(abar) * eps - math.sqrt(1.0 - abar) * x0
        for prediction_type, output in (("x0", x0), ("v", v)):
            converted = sdelib.eps_function(lambda x, t, out=output: tf.constant(out), sde,
                                            prediction_type)(x, t)
            np.testing.assert_allclose(converted.numpy(), eps, rtol=1e-6, atol=1e-9)
        score = sdelib.score_function(eps_oracle, sde)(x, t).numpy()
        np.testing.assert_allclose(score, -np.linalg.solve(v_t, (x.numpy() - a * MEAN).T).T,
                                   rtol=1e-9)


# --------------------------------------------------------------------------- ODE likelihood


@pytest.mark.parametrize("name", ["vp", "subvp"])
def test_exact_ode_likelihood_of_gaussian_data(name):
    mean, covariance = np.array([0.2, -0.1]), rotated_covariance([1.2, 0.7])
    x = np.random.default_rng(1).multivariate_normal(mean, covariance, size=8)
    sde = sdelib.make_sde(name)
    result = sdelib.ode_likelihood(gaussian_eps_oracle(sde, mean, covariance), sde,
                                   tf.constant(x, tf.float32), seed=0)
    nll = result.negative_log_likelihood.numpy()
    model_nll = pushforward_nll(sde, x, mean, covariance)
    print(f"{name}: ODE likelihood NFE {int(result.num_function_evaluations)}, max relative "
          f"error {np.max(np.abs(nll / model_nll - 1)):.1e}")
    # The model (N(0, I) pushed through the exact flow) to solver accuracy ...
    np.testing.assert_allclose(nll, model_nll, rtol=2e-4)
    # ... and the data's own density up to the small prior mismatch at t = 1.
    data_nll = -stats.multivariate_normal(mean, covariance).logpdf(x)
    np.testing.assert_allclose(nll, data_nll, rtol=1e-3)
    np.testing.assert_allclose(result.bits_per_dim.numpy(), nll / (2 * math.log(2)), rtol=1e-6)
    assert 10 < int(result.num_function_evaluations) < 500


def test_hutchinson_estimate_is_unbiased_within_its_monte_carlo_error():
    sde = sdelib.VPSDE()
    points, replicas = 4, 64
    x = np.random.default_rng(2).multivariate_normal(MEAN, COVARIANCE, size=points)
    batch = np.repeat(x, replicas, axis=0)  # every row draws its own probe
    result = sdelib.ode_likelihood(gaussian_eps_oracle(sde, MEAN, COVARIANCE), sde,
                                   tf.constant(batch, tf.float32), seed=3,
                                   exact_divergence=False, probe="gaussian")
    estimates = result.negative_log_likelihood.numpy().reshape(points, replicas)
    standard_error = estimates.std(axis=1, ddof=1) / math.sqrt(replicas)
    exact = pushforward_nll(sde, x, MEAN, COVARIANCE)
    assert np.all(standard_error > 1e-3)  # a real Monte-Carlo estimate ...
    assert np.all(np.abs(estimates.mean(axis=1) - exact) < 4.5 * standard_error + 1e-3)


def test_rademacher_hutchinson_is_exact_for_a_diagonal_jacobian():
    # Diagonal covariance: dF/dx is diagonal and z^T J z = trace(J) when z_i^2 = 1.
    sde = sdelib.VPSDE()
    covariance = np.diag([0.8, 0.3])
    x = np.random.default_rng(4).multivariate_normal(MEAN, covariance, size=6)
    oracle = gaussian_eps_oracle(sde, MEAN, covariance)
    results = [sdelib.ode_likelihood(oracle, sde, tf.constant(x, tf.float32), seed=5,
                                     exact_divergence=exact).negative_log_likelihood.numpy()
               for exact in (False, True)]
    np.testing.assert_allclose(results[0], results[1], rtol=2e-5)
    np.testing.assert_allclose(results[0], pushforward_nll(sde, x, MEAN, covariance), rtol=5e-4)


def test_dequantized_image_likelihood_matches_the_discretized_gaussian():
    # 2x2x1 "images" with independent Gaussian pixels; data on the 256-level grid.
    rng = np.random.default_rng(6)
    pixel_mean, pixel_std = np.array([0.1, -0.2, 0.3, 0.0]), np.array([0.3, 0.4, 0.25, 0.5])
    levels = np.round((rng.normal(pixel_mean, pixel_std, size=(32, 4)) + 1.0) * 127.5)
    x = (-1.0 + np.clip(levels, 5, 250) / 127.5).reshape(32, 2, 2, 1)
    sde = sdelib.VPSDE()
    oracle = gaussian_eps_oracle(sde, pixel_mean, np.diag(pixel_std**2))
    result = sdelib.ode_likelihood(oracle, sde, tf.constant(x, tf.float32), seed=7)
    log_probability = likelihood.discretized_gaussian_log_likelihood(
        tf.constant(x.reshape(32, 4)), pixel_mean, np.log(pixel_std))
    reference = (likelihood.nats_to_bits_per_dim(-likelihood.sum_over_example(log_probability),
                                                 4)).numpy()
    bits = result.bits_per_dim.numpy()
    # One dequantisation draw per example: within the density's variation over a bin.
    assert np.max(np.abs(bits - reference)) < 0.03
    assert abs(np.mean(bits - reference)) < 0.006
    assert np.mean(reference) > 5.0  # the +log2(127.5) change of variables is in both
    with pytest.raises(ValueError, match="256-level"):
        sdelib.ode_likelihood(oracle, sde, tf.constant(x + 0.001, tf.float32), seed=7)


# --------------------------------------------------------------------------- samplers


def assert_gaussian_moments(samples, mean, covariance, covariance_tolerance):
    n = len(samples)
    standard_error = np.sqrt(np.diag(covariance) / n)
    assert np.all(np.abs(samples.mean(axis=0) - mean) < 4.5 * standard_error), samples.mean(0)
    scale = np.sqrt(np.outer(np.diag(covariance), np.diag(covariance)))
    relative = (np.cov(samples.T) - covariance) / scale
    assert np.max(np.abs(relative)) < covariance_tolerance, relative


def test_probability_flow_ode_samples_have_the_data_moments():
    sde = sdelib.VPSDE()
    samples, nfe = sdelib.ode_sample(gaussian_eps_oracle(sde, MEAN, COVARIANCE), sde,
                                     [10000, 2], seed=1)
    print(f"PF-ODE sampling NFE {int(nfe)}")
    assert 10 < int(nfe) < 500
    assert_gaussian_moments(samples.numpy(), MEAN, COVARIANCE, 0.06)


@pytest.mark.parametrize("name, predictor, corrector_steps", [
    ("vp", "reverse_diffusion", 1),
    ("subvp", "euler_maruyama", 1),
    ("ddpm", "reverse_diffusion", 0),
])
def test_predictor_corrector_samples_have_the_data_moments(name, predictor, corrector_steps):
    sde = sdelib.make_sde(name, GaussianDiffusion("cosine", 100))
    samples, nfe = sdelib.pc_sample(gaussian_eps_oracle(sde, MEAN, COVARIANCE), sde,
                                    [10000, 2], seed=2, num_steps=100, predictor=predictor,
                                    corrector_steps=corrector_steps)
    assert nfe == 100 * (1 + corrector_steps)
    # Finite-step Langevin inflates the variance by ~snr^2 (a few per cent at snr = 0.16).
    assert_gaussian_moments(samples.numpy(), MEAN, COVARIANCE, 0.075)


def test_langevin_corrector_converges_to_the_marginal():
    # Langevin steps at fixed t = 0.3 from a wrong start reach p_t = N(a m, a^2 C + sigma^2 I)
    # up to the finite-step bias (variance inflated by ~ snr^2, 2.6 % at snr = 0.16).
    sde, time = sdelib.VPSDE(), 0.3
    score = sdelib.score_function(gaussian_eps_oracle(sde, MEAN, COVARIANCE), sde)
    a, sigma = marginal_moments(sde, time)
    target_mean, target_covariance = a * MEAN, a**2 * COVARIANCE + sigma**2 * np.eye(2)
    x = tf.constant(np.random.default_rng(11).normal(size=(10000, 2)) * 2.0 + 1.0)
    for step in range(300):
        noise = tf.random.stateless_normal(x.shape, seed=[12, step], dtype=tf.float64)
        x = sdelib.langevin_step(score, x, tf.constant(time, tf.float64), noise, snr=0.16)
    assert_gaussian_moments(x.numpy(), target_mean, target_covariance, 0.075)


# --------------------------------------------------------------------------- training


def test_denoising_loss_matches_a_dense_computation():
    rng = np.random.default_rng(8)
    x0, noise, output = (rng.normal(size=(5, 3)).astype(np.float32) for _ in range(3))
    times = np.array([1e-5, 0.01, 0.3, 0.7, 1.0])
    integrated = BETA_MIN * times + 0.5 * (BETA_MAX - BETA_MIN) * times**2
    abar = np.exp(-integrated)
    likelihood_weight = (BETA_MIN + times * (BETA_MAX - BETA_MIN)) / (1.0 - abar)  # g^2/sigma^2
    t = tf.constant(times, tf.float32)
    for prediction_type, target, conversion in (
            ("eps", noise, np.ones(5)),
            ("v", np.sqrt(abar)[:, None] * noise - np.sqrt(1 - abar)[:, None] * x0, abar)):
        objective = sdelib.ContinuousTimeDiffusion(sdelib.VPSDE(), prediction_type,
                                                   likelihood_weighting=True)
        x_t = objective.q_sample(tf.constant(x0), t, tf.constant(noise)).numpy()
        np.testing.assert_allclose(x_t, np.sqrt(abar)[:, None] * x0
                                   + np.sqrt(1 - abar)[:, None] * noise, rtol=1e-5, atol=1e-6)
        loss = (objective.per_example_loss(tf.constant(output), x0, noise, t)
                * objective.loss_weights(t)).numpy()
        expected = np.mean((output - target) ** 2, axis=1) * conversion * likelihood_weight
        np.testing.assert_allclose(loss, expected, rtol=2e-4)
    # Integer timesteps (evaluation banks) mean t = (i + 1) / N.
    np.testing.assert_allclose(objective.continuous_time(tf.constant([0, 499, 999])).numpy(),
                               [1e-3, 0.5, 1.0], rtol=1e-6)


def test_importance_sampled_times_are_unbiased():
    sde, eps_t = sdelib.VPSDE(), 1e-5
    sampler = sdelib.ContinuousTimestepSampler(eps_t, sde, importance=True)
    t, weights = (v.numpy().astype(np.float64)
                  for v in sampler.sample(200000, tf.constant([1, 2], tf.int64)))
    assert t.min() >= eps_t and t.max() <= 1.0
    assert np.mean(t < 1e-3) > 0.15  # the proposal concentrates where g^2 / sigma^2 is large

    def lam(s):
        return float(sde.diffusion(tf.constant(s, tf.float64)) ** 2
                     / sde.marginal_std(tf.constant(s, tf.float64)) ** 2)

    uniform_mean = integrate.quad(lam, eps_t, 1.0, points=[1e-4, 1e-3, 1e-2, 0.1],
                                  limit=200)[0] / (1 - eps_t)
    lam_t = np.square(sde.diffusion(tf.constant(t)).numpy() / sde.marginal_std(
        tf.constant(t)).numpy())
    estimate = weights * lam_t  # nearly constant: a low-variance estimate
    np.testing.assert_allclose(estimate.mean(), uniform_mean, rtol=3e-3)
    assert estimate.std() < 0.05 * estimate.mean()
    linear = weights * t  # an unrelated function: unbiased for E_U[t] = (1 + eps_t) / 2
    assert abs(linear.mean() - (1 + eps_t) / 2) < 4 * linear.std() / math.sqrt(len(t))
    t, weights = sdelib.ContinuousTimestepSampler(eps_t).sample(1000, tf.constant([1, 2]))
    assert np.all(weights.numpy() == 1.0) and t.numpy().min() >= eps_t


def float_time_mlp(hidden=32):
    x = keras.Input((2,), name="x")
    t = keras.Input((), dtype="float32", name="t")
    h = keras.layers.Concatenate()([x, time_embedding_mlp(t, 16, hidden)])
    h = keras.layers.Dense(hidden, activation="silu")(h)
    h = keras.layers.Dense(hidden, activation="silu")(h)
    return keras.Model([x, t], keras.layers.Dense(2)(h))


def two_blob_data(n=256):
    rng = np.random.default_rng(9)
    centres = np.where(rng.integers(0, 2, size=(n, 1)) == 1, [1.0, -1.0], [-1.0, 0.5])
    return (centres + 0.2 * rng.normal(size=(n, 2))).astype(np.float32)


def test_score_sde_model_trains_with_adam():
    # Sub-VP, likelihood weighting with importance-sampled t, a float-time MLP, under XLA.
    keras.utils.set_random_seed(0)
    x0 = two_blob_data()
    model = sdelib.ScoreSDEModel(float_time_mlp(), sdelib.SubVPSDE(), likelihood_weighting=True,
                                 importance_sampling=True, ema_decay=0.0)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), jit_compile=True)
    rng = np.random.default_rng(10)
    bank = {"x0": x0, "t": rng.uniform(1e-5, 1.0, size=len(x0)).astype(np.float32),
            "noise": rng.normal(size=x0.shape).astype(np.float32)}
    before = model.evaluate(bank, batch_size=256, verbose=0, return_dict=True)
    history = model.fit(x0, batch_size=64, epochs=6, shuffle=False, verbose=0)
    after = model.evaluate(bank, batch_size=256, verbose=0, return_dict=True)
    assert np.all(np.isfinite(history.history["loss"]))
    # The loss at small t is mostly the irreducible noise, weighted by g^2 / sigma^2 ~ 1 / t.
    assert after["loss"] < 0.85 * before["loss"], (before, after)
    assert all(np.isfinite(after[f"loss_q{q}"]) for q in range(1, 5))
    samples = model.sample(8, seed=0, num_steps=10)
    assert samples.shape == (8, 2) and np.all(np.isfinite(samples.numpy()))


def test_score_sde_model_trains_with_kfac():
    # The project's MLP (integer time input) on VP; eager: tracing K-FAC costs ~30 s here.
    keras.utils.set_random_seed(0)
    x0 = two_blob_data()
    model = sdelib.ScoreSDEModel(build_mlp_denoiser(2, hidden_units=32, num_blocks=1),
                                 sdelib.VPSDE(), ema_decay=0.0)
    optimizer = KFAC(learning_rate=0.1, damping=1e-3, inverse_every=2, inverse_warmup_steps=2)
    model.compile(optimizer=optimizer, run_eagerly=True)
    bank = data.evaluation_bank(x0, model.diffusion.num_timesteps, seed=1, batch_size=256)
    before = model.evaluate(bank, verbose=0, return_dict=True)
    history = model.fit(x0, batch_size=64, epochs=1, shuffle=False, verbose=0)
    after = model.evaluate(bank, verbose=0, return_dict=True)
    assert np.all(np.isfinite(history.history["loss"]))
    assert int(optimizer.skipped_updates.numpy()) == 0
    assert {type(b.layer).__name__ for b in optimizer.blocks} == {"Dense"}
    assert after["loss"] < before["loss"], (before, after)


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_with_clear_errors():
    sde = sdelib.VPSDE()
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        sde.marginal_std(1.5)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        sdelib.SubVPSDE().diffusion(tf.constant([0.5, -0.1]))
    with pytest.raises(ValueError, match="float"):
        sde.beta(tf.constant([1]))
    with pytest.raises(ValueError, match="Unknown SDE 've'"):
        sdelib.make_sde("ve")
    with pytest.raises(ValueError, match="diffusion="):
        sdelib.make_sde("ddpm")
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        sdelib.DiscreteDDPMSDE(GaussianDiffusion("cosine", 10, "v", zero_terminal_snr=True))
    with pytest.raises(ValueError, match="beta_min"):
        sdelib.VPSDE(beta_min=0.0)
    oracle = gaussian_eps_oracle(sde, MEAN, COVARIANCE)
    with pytest.raises(ValueError, match="non-finite"):
        sdelib.ode_likelihood(oracle, sde, tf.constant([[0.0, np.nan]]), seed=0)
    with pytest.raises(ValueError, match="probe"):
        sdelib.ode_likelihood(oracle, sde, tf.zeros([1, 2]), seed=0, probe="sphere")
    with pytest.raises(ValueError, match="prediction_type"):
        sdelib.eps_function(oracle, sde, "score")
    with pytest.raises(ValueError, match="snr"):
        sdelib.pc_sample(oracle, sde, [2, 2], seed=0, snr=0.0)
    with pytest.raises(ValueError, match="predictor"):
        sdelib.pc_sample(oracle, sde, [2, 2], seed=0, predictor="heun")
    with pytest.raises(ValueError, match="eps_t"):
        sdelib.ode_sample(oracle, sde, [2, 2], seed=0, eps_t=0.0)
    with pytest.raises(ValueError, match="likelihood_weighting=True"):
        sdelib.ScoreSDEModel(build_mlp_denoiser(2, 8, 0), sde, importance_sampling=True)
    model = sdelib.ScoreSDEModel(build_mlp_denoiser(2, 8, 0), sde)
    with pytest.raises(ValueError, match="Unknown sampler 'ddim'"):
        model.sample(2, sampler="ddim")
    for kwargs, message in ((dict(num_samples=0), "num_samples must be an integer >= 1, got 0"),
                            (dict(num_samples=2.0), "num_samples must be an integer >= 1"),
                            (dict(num_steps=0), "num_steps must be an integer >= 1, got 0"),
                            (dict(num_steps=2.5), "num_steps must be an integer >= 1"),
                            (dict(corrector_steps=-1),
                             "corrector_steps must be an integer >= 0, got -1")):
        with pytest.raises(ValueError, match=message):
            model.sample(**(dict(num_samples=2, num_steps=3) | kwargs))
    assert not model._sample_functions  # refused before a sampler was built
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1, got 0"):
        sdelib.VPSDE(num_steps=0)
