"""DPM-Solver++ (2M) against exact solutions of the probability-flow ODE.

Data ``x0 ~ N(mu, s^2)`` per dimension, denoised by the exact ``E[x0 | x_t]``: with
``a = sqrt(abar)``, ``v = abar s^2 + 1 - abar``, the ODE keeps ``(x_t - a mu) / sqrt(v)``
constant, so from ``x_T`` it reaches ``x_0 = mu + s (x_T - a_T mu) / sqrt(v_T)`` at
``abar = 1``, and the state at any ``abar`` is known in closed form. The solver's last step
lands on ``x0_hat`` of its last state (first order, as in the reference implementations),
which makes the final error ``O(sigma_1^2)`` on top of the ODE-integration error; the
order tests therefore compare against ``x0_hat`` of the exact state at the last kept step,
which isolates the integration error. Every run is float64 unless said otherwise.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfngd import export, samplers
from tfngd import gaussian_diffusion as gd
from tfngd.config import ConfigError, TrainConfig
from tfngd.model import DiffusionModel
from tfngd.networks import build_mlp_denoiser

MU, S = 0.3, 0.5
SHAPE = [16, 3]


def _abar(diffusion, t, dtype):
    return tf.cast(tf.gather(tf.constant(diffusion.alphas_cumprod, tf.float64), t), dtype)


def gaussian_oracle(diffusion, mu=MU, s=S):
    """Exact network output for data ``N(mu, s^2)`` in the diffusion's parameterisation."""

    def fn(x, t):
        abar = tf.reshape(_abar(diffusion, t, x.dtype), [-1] + [1] * (len(x.shape) - 1))
        a, b2 = tf.sqrt(abar), 1.0 - abar
        x0 = mu + a * s**2 / (abar * s**2 + b2) * (x - a * mu)
        return gd.prediction_target(x0, (x - a * x0) / tf.sqrt(b2), abar,
                                    diffusion.prediction_type)

    return fn


def x_T(shape=SHAPE, seed=0, dtype=tf.float64):
    """The sampler's initial noise for ``seed`` (draw 0 of the run)."""
    return tf.random.stateless_normal(shape, seed=samplers.step_seed(seed, 0),
                                      dtype=dtype).numpy()


def _v(abar, s=S):
    return abar * s**2 + 1.0 - abar


def ode_solution(x_start, abar_start, abar_end, mu=MU, s=S):
    """The probability-flow ODE from ``abar_start`` to ``abar_end`` for Gaussian data."""
    return (np.sqrt(abar_end) * mu
            + np.sqrt(_v(abar_end, s) / _v(abar_start, s)) * (x_start - np.sqrt(abar_start) * mu))


def posterior_mean(x, abar, mu=MU, s=S):
    return mu + np.sqrt(abar) * s**2 / _v(abar, s) * (x - np.sqrt(abar) * mu)


def runner(fn, diffusion, sampler, shape=SHAPE, dtype=tf.float64, clip_x0=False):
    """``run(seed, num_steps)``, traced once (``num_steps`` is a tensor)."""

    @tf.function(input_signature=[tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.int32)])
    def run(seed, num_steps):
        return samplers.sample(fn, diffusion, shape, seed, num_steps, sampler,
                               clip_x0=clip_x0, dtype=dtype)

    return lambda seed, k: run(tf.constant(seed, tf.int64), tf.constant(k, tf.int32)).numpy()


def uniform_log_snr_diffusion(num_timesteps=1280, lam_max=6.0, lam_min=-5.0):
    """A chain whose steps are equally spaced in ``lambda = log(alpha / sigma)``."""
    diffusion = gd.GaussianDiffusion("linear", num_timesteps, "x0")
    lam = np.linspace(lam_max, lam_min, num_timesteps)
    diffusion.alphas_cumprod = 1.0 / (1.0 + np.exp(-2.0 * lam))  # abar = sigmoid(2 lambda)
    return diffusion


def integration_errors(diffusion, name, steps):
    """Max error against ``x0_hat`` of the exact ODE state at the last kept step."""
    run = runner(gaussian_oracle(diffusion), diffusion, samplers.make_sampler(name))
    abar, x_start = diffusion.alphas_cumprod, x_T()
    errors = []
    for k in steps:
        t_last = int(round(diffusion.num_timesteps / k)) - 1  # trailing spacing, exact strides
        state = ode_solution(x_start, abar[-1], abar[t_last])
        errors.append(np.abs(run(0, k) - posterior_mean(state, abar[t_last])).max())
    return np.array(errors)


# -------------------------------------------------------------------- order of convergence


def test_second_order_on_a_uniform_log_snr_chain():
    d = uniform_log_snr_diffusion()
    steps = (40, 80, 160)
    dpm = integration_errors(d, "dpmpp_2m", steps)
    ddim = integration_errors(d, "ddim", steps)
    dpm_rates, ddim_rates = dpm[:-1] / dpm[1:], ddim[:-1] / ddim[1:]
    # Halving h: error / 4 for a second-order method, / 2 for a first-order one
    # (measured 3.92, 3.98 and 1.97, 1.98).
    np.testing.assert_allclose(dpm_rates, 4.0, rtol=0.1)
    np.testing.assert_allclose(ddim_rates, 2.0, rtol=0.1)
    assert np.all(dpm < ddim / 10)


def test_converges_on_the_cosine_chain():
    """The project's chain (cosine, T = 1000, eps prediction, trailing respacing)."""
    d = gd.GaussianDiffusion("cosine", 1000, "eps")
    # Near t = T the trailing grid is not refined in lambda (its first steps stay
    # ~log 2 wide), so the rate approaches 4 only slowly: 2.3, 2.9, 3.2 at K = 50..200.
    dpm = integration_errors(d, "dpmpp_2m", (100, 200))
    ddim = integration_errors(d, "ddim", (100, 200))
    assert dpm[0] / dpm[1] > 2.8 and ddim[0] / ddim[1] < 2.2
    # Against the ODE's exact end point at abar = 1, final step included. Its
    # O(sigma_1^2) error and the integration error have opposite signs here, so the
    # total is not monotone beyond K = 50 (measured 2.3e-5 at K = 200, 6.3e-5 at 1000).
    exact = ode_solution(x_T(), d.alphas_cumprod[-1], 1.0)
    dpm_run = runner(gaussian_oracle(d), d, samplers.DPMSolverPlusPlus2M())
    ddim_run = runner(gaussian_oracle(d), d, samplers.DDIMSampler(0.0))
    dpm_errors = np.array([np.abs(dpm_run(0, k) - exact).max() for k in (10, 20, 50, 200, 1000)])
    ddim_errors = np.array([np.abs(ddim_run(0, k) - exact).max()
                            for k in (10, 20, 50, 200, 1000)])
    assert np.all(np.diff(dpm_errors[:3]) < 0), dpm_errors
    assert np.all(dpm_errors < ddim_errors / 2), (dpm_errors, ddim_errors)
    assert np.all(dpm_errors[3:] < 1e-4), dpm_errors


# -------------------------------------------------------------------- numpy reference


def numpy_dpmpp_2m(x, abar_steps, x0_fn):
    """DPM-Solver++ (2M) as written in Lu et al. 2022, Algorithm 2, in numpy.

    ``abar_steps``: the kept abar from the start down to the last kept step; the run
    ends with a first-order step to abar = 1, which returns the data prediction.
    """
    lam = 0.5 * np.log(abar_steps / (1.0 - abar_steps))
    alpha, sigma = np.sqrt(abar_steps), np.sqrt(1.0 - abar_steps)
    x0_prev = None
    for i in range(len(abar_steps) - 1):
        x0 = x0_fn(x, abar_steps[i])
        h = lam[i + 1] - lam[i]
        if x0_prev is None:
            d = x0
        else:
            r = (lam[i] - lam[i - 1]) / h
            d = (1.0 + 1.0 / (2.0 * r)) * x0 - 1.0 / (2.0 * r) * x0_prev
        x = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * (np.exp(-h) - 1.0) * d
        x0_prev = x0
    return x0_fn(x, abar_steps[-1])


@pytest.mark.parametrize("prediction_type, clip_x0, mu, num_steps", [
    ("eps", False, MU, 6), ("v", False, MU, 3), ("x0", True, 0.8, 7)])
def test_matches_a_numpy_implementation(prediction_type, clip_x0, mu, num_steps):
    d = gd.GaussianDiffusion("cosine", 100, prediction_type)
    timesteps = np.sort(np.round(np.arange(100, 0, -100 / num_steps)).astype(int) - 1)
    abar_steps = d.alphas_cumprod[timesteps[::-1]]

    def x0_fn(x, abar):
        x0 = posterior_mean(x, abar, mu=mu)
        return np.clip(x0, -1.0, 1.0) if clip_x0 else x0

    expected = numpy_dpmpp_2m(x_T(), abar_steps, x0_fn)
    out = runner(gaussian_oracle(d, mu=mu), d, samplers.DPMSolverPlusPlus2M(),
                 clip_x0=clip_x0)(0, num_steps)
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)
    if clip_x0:
        assert np.abs(out).max() <= 1.0 and np.any(np.abs(out) == 1.0)  # clipping was active


# -------------------------------------------------------------------- first and last steps


def test_one_step_is_the_data_prediction_and_two_steps_are_ddim():
    d = gd.GaussianDiffusion("cosine", 1000, "x0")
    fn = gaussian_oracle(d)
    dpm = runner(fn, d, samplers.DPMSolverPlusPlus2M(), dtype=tf.float32)
    ddim = runner(fn, d, samplers.DDIMSampler(0.0), dtype=tf.float32)
    one = dpm(3, 1)
    assert np.all(np.isfinite(one))
    np.testing.assert_allclose(one, posterior_mean(x_T(seed=3, dtype=tf.float32),
                                                   d.alphas_cumprod[-1]), rtol=1e-6)
    np.testing.assert_allclose(dpm(3, 2), ddim(3, 2), rtol=1e-6, atol=1e-6)
    assert np.abs(dpm(3, 3) - ddim(3, 3)).max() > 1e-3  # from 3 steps on it is second order


def test_final_step_to_abar_one_returns_x0_hat_exactly():
    step = samplers.DPMSolverPlusPlus2M()
    x_t = tf.constant([[0.3, -2.0, 1.5]], tf.float32)
    x0_hat = tf.constant([[0.25, -0.75, 0.5]], tf.float32)
    state = (tf.constant([[9.0, -9.0, 3.0]], tf.float32), tf.constant(1e-8, tf.float64),
             tf.constant(True))
    x_s, (x0_kept, h, has_prev) = step.step(x_t, x0_hat, None, tf.constant(0.999, tf.float64),
                                            tf.constant(1.0, tf.float64), None, state=state)
    np.testing.assert_array_equal(x_s.numpy(), x0_hat.numpy())
    np.testing.assert_array_equal(x0_kept.numpy(), x0_hat.numpy())
    assert np.isinf(h.numpy()) and bool(has_prev)


@pytest.mark.parametrize("prediction_type", ["x0", "v"])
def test_point_data_is_recovered_exactly_with_zero_terminal_snr(prediction_type):
    """Data on one point: every x0_hat is that point; abar_T = 0 makes lambda_T = -inf."""
    d = gd.GaussianDiffusion("linear", 200, prediction_type, zero_terminal_snr=True)
    assert d.alphas_cumprod[-1] == 0.0
    point = np.array([0.7, -0.4, 0.05], np.float32)

    def fn(x, t):
        abar = tf.reshape(_abar(d, t, x.dtype), [-1, 1])
        x0 = tf.broadcast_to(tf.constant(point), tf.shape(x))
        return gd.prediction_target(x0, gd.eps_from_x0(x, x0, abar), abar, prediction_type)

    run = runner(fn, d, samplers.DPMSolverPlusPlus2M(), dtype=tf.float32)
    for k in (1, 2, 3, 10, 200):
        out = run(k, k)
        assert np.all(np.isfinite(out)), k
        np.testing.assert_allclose(out, np.broadcast_to(point, out.shape), atol=1e-5,
                                   err_msg=f"num_steps={k}")


# -------------------------------------------------------------------- guidance, variance


def test_classifier_free_guidance_goes_through_the_solver():
    """The Gaussian oracle is affine in mu, so guidance with scale w is the oracle of
    ``mu_u + w (mu_c - mu_u)``: the guided solve must equal that unguided one."""
    d = gd.GaussianDiffusion("cosine", 1000, "eps")
    means = tf.constant([0.4, -0.2, 0.0], tf.float64)  # label 2 is the null label
    w = 2.5

    def denoiser(inputs, training=False):
        x, t, label = inputs
        mu = tf.reshape(tf.gather(means, label), [-1, 1])
        return gaussian_oracle(d, mu=mu)(x, t)

    labels = tf.zeros([SHAPE[0]], tf.int32)
    guided = samplers.denoiser_fn(denoiser, labels, tf.constant(w, tf.float32), null_label=2)
    out = runner(guided, d, samplers.DPMSolverPlusPlus2M())(0, 20)
    mu_w = float(means[2] + w * (means[0] - means[2]))
    reference = runner(gaussian_oracle(d, mu=mu_w), d, samplers.DPMSolverPlusPlus2M())(0, 20)
    np.testing.assert_allclose(out, reference, rtol=1e-9, atol=1e-9)
    exact = ode_solution(x_T(), d.alphas_cumprod[-1], 1.0, mu=mu_w)
    assert np.abs(out - exact).max() < 0.01


def test_learned_variance_channels_are_ignored():
    learned = gd.GaussianDiffusion("cosine", 100, "eps", variance_type="learned_range")
    fixed = gd.GaussianDiffusion("cosine", 100, "eps")
    oracle = gaussian_oracle(fixed)

    def with_variance(x, t):
        return tf.concat([oracle(x, t), 5.0 * tf.sin(x)], axis=-1)

    sampler = samplers.make_sampler("dpmpp_2m", learned.variance_type)
    # Equal up to float64 rounding (the concat/split changes how the graph's ops fuse).
    np.testing.assert_allclose(runner(with_variance, learned, sampler)(1, 9),
                               runner(oracle, fixed, sampler)(1, 9), rtol=1e-12, atol=1e-12)


# -------------------------------------------------------------------- model, export, names


@pytest.fixture(scope="module")
def conditional_model():
    keras.utils.set_random_seed(4)
    mlp = build_mlp_denoiser(2, hidden_units=16, num_blocks=1, num_classes=3)
    model = DiffusionModel(mlp, gd.GaussianDiffusion("linear", 20, prediction_type="v"),
                           num_classes=3)
    rng = np.random.default_rng(4)
    for weight in model.ema_denoiser.weights:  # the zero-initialised output layer does work
        weight.assign(weight.numpy() + rng.normal(0.0, 0.2, weight.shape).astype("float32"))
    return model


def test_export_serves_dpmpp_2m(conditional_model):
    """The serving function of the SavedModel export (the graph ``export_sampler`` writes)."""
    serve, signature, metadata = export.build_serving_function(
        conditional_model, sampler="dpmpp_2m", max_samples=8)
    assert metadata["sampler"]["name"] == "dpmpp_2m"
    served = tf.function(serve, input_signature=signature)(
        tf.constant(5), tf.constant(11, tf.int64), tf.constant(7), tf.constant(1),
        tf.constant(2.0))[export.OUTPUT_KEY].numpy()
    in_process = conditional_model.sample(5, seed=11, num_steps=7, sampler="dpmpp_2m",
                                          label=1, guidance_scale=2.0).numpy()
    assert served.shape == (5, 2) and np.all(np.isfinite(served))
    np.testing.assert_allclose(served, in_process, rtol=1e-5, atol=1e-5)


def test_bad_names_and_eta_are_refused(conditional_model):
    assert "dpmpp_2m" in samplers.SAMPLERS
    assert isinstance(samplers.make_sampler("dpmpp_2m"), samplers.DPMSolverPlusPlus2M)
    with pytest.raises(ValueError, match="Unknown sampler 'dpmpp_3m'.*dpmpp_2m"):
        samplers.make_sampler("dpmpp_3m")
    with pytest.raises(ValueError, match="eta"):
        samplers.make_sampler("dpmpp_2m", eta=0.5)
    with pytest.raises(ValueError, match="Unknown sampler 'dpm'"):
        conditional_model.sample(2, sampler="dpm")
    with pytest.raises(ValueError, match="eta"):
        export.build_serving_function(conditional_model, sampler="dpmpp_2m", eta=0.5)
    with pytest.raises(ValueError, match="valid samplers: ddpm, ddim, dpmpp_2m"):
        export.build_serving_function(conditional_model, sampler="dpmpp2m")
    assert TrainConfig(sampler="dpmpp_2m").validate().sample_kwargs()["sampler"] == "dpmpp_2m"
    with pytest.raises(ConfigError, match="eta"):
        TrainConfig(sampler="dpmpp_2m", eta=0.5).validate()
    with pytest.raises(ConfigError, match="sampler='dpmpp_2m'.*model='ndm'"):
        TrainConfig(model="ndm", prediction_type="x0", sampler="dpmpp_2m").validate()


def test_command_lines_accept_dpmpp_2m():
    from trainers import export as export_cli
    from trainers import sample as sample_cli

    assert export_cli.build_parser().parse_args(
        ["--run-dir", "r", "--sampler", "dpmpp_2m"]).sampler == "dpmpp_2m"
    assert sample_cli.build_parser().parse_args(
        ["--run-dir", "r", "--sampler", "dpmpp_2m"]).sampler == "dpmpp_2m"
    with pytest.raises(SystemExit):
        export_cli.build_parser().parse_args(["--run-dir", "r", "--sampler", "dpmpp_3m"])
