"""Samplers driven by oracle denoisers whose exact outputs are known in closed form.

* Single-point data ``x*``: the optimal eps predictor is
  ``(x_t - sqrt(abar_t) x*) / sqrt(1 - abar_t)``, so every step predicts ``x0 = x*``
  and both DDIM (eta = 0) and ancestral DDPM must return ``x*`` exactly.
* Gaussian data ``N(mu, s^2 I)``: ``E[x0 | x_t] = mu + a s^2 / (a^2 s^2 + b^2) (x_t - a mu)``
  with ``a = sqrt(abar_t)``, ``b = sqrt(1 - abar_t)``; the final moments of each chain are
  computed by an independent scalar numpy recursion.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tfngd import gaussian_diffusion as gd
from tfngd import samplers

X_STAR = np.array([0.7, -0.4, 0.05, -0.95], np.float32)
MU, S = 0.5, 0.3


def trailing(T, K):
    return np.sort(np.round(np.arange(T, 0, -T / K)).astype(np.int64) - 1)


def _abar_tf(diffusion, t, dtype):
    return tf.cast(tf.gather(tf.constant(diffusion.alphas_cumprod, tf.float64), t), dtype)


def _convert(eps, x0, abar, prediction_type):
    if prediction_type == "eps":
        return eps
    if prediction_type == "x0":
        return x0
    return tf.sqrt(abar) * eps - tf.sqrt(1.0 - abar) * x0


def point_oracle(diffusion, x_star):
    """Optimal prediction for data concentrated on ``x_star`` (diffusion's parameterisation)."""

    def fn(x, t):
        abar = _abar_tf(diffusion, t, x.dtype)[:, None]
        x0 = tf.cast(x_star, x.dtype)[None, :] * tf.ones_like(x)
        eps = (x - tf.sqrt(abar) * x0) / tf.sqrt(1.0 - abar)
        return _convert(eps, x0, abar, diffusion.prediction_type)

    return fn


def gaussian_oracle(diffusion, mu, s):
    """Optimal prediction for data ``N(mu, s^2 I)``."""

    def fn(x, t):
        abar = _abar_tf(diffusion, t, x.dtype)[:, None]
        a, b2 = tf.sqrt(abar), 1.0 - abar
        x0 = mu + a * s**2 / (abar * s**2 + b2) * (x - a * mu)
        eps = (x - a * x0) / tf.sqrt(b2)
        return _convert(eps, x0, abar, diffusion.prediction_type)

    return fn


def compiled_sampler(fn, diffusion, shape, sampler, spacing="trailing", dtype=tf.float32,
                     clip_x0=False):
    @tf.function(input_signature=[tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.int32)])
    def run(seed, num_steps):
        return samplers.sample(fn, diffusion, shape, seed, num_steps, sampler, spacing,
                               clip_x0=clip_x0, dtype=dtype)

    return lambda seed, k: run(tf.constant(seed, tf.int64), tf.constant(k, tf.int32)).numpy()


def ref_chain_moments(abar_all, steps, mu, s, kind, eta=0.0, start_var=1.0):
    """Mean and variance of the output of a DDIM / DDPM chain with the Gaussian oracle.

    Tracks y = x_t - a_t mu; each step maps y_s = g y_t + sigma z (linear-Gaussian).
    """
    y_mean = 0.0 - np.sqrt(abar_all[steps[-1]]) * mu  # x_T ~ N(0, start_var)
    y_var = start_var
    for i in range(len(steps) - 1, -1, -1):
        a_t = abar_all[steps[i]]
        a_s = abar_all[steps[i - 1]] if i > 0 else 1.0
        v_t = a_t * s**2 + (1 - a_t)
        k = np.sqrt(a_t) * s**2 / v_t  # x0_hat - mu = k y_t
        if kind == "ddim":
            sigma = eta * np.sqrt((1 - a_s) / (1 - a_t)) * np.sqrt(1 - a_t / a_s)
            d = np.sqrt(max(1 - a_s - sigma**2, 0.0))
            # x_s = sqrt(a_s) x0_hat + d eps_hat, eps_hat = (x_t - sqrt(a_t) x0_hat) / sqrt(1 - a_t)
            g = np.sqrt(a_s) * k + d * (1 - np.sqrt(a_t) * k) / np.sqrt(1 - a_t)
        else:
            beta = 1 - a_t / a_s
            c1 = beta * np.sqrt(a_s) / (1 - a_t)
            c2 = (1 - a_s) * np.sqrt(1 - beta) / (1 - a_t)
            g = c1 * k + c2
            sigma = np.sqrt(beta * (1 - a_s) / (1 - a_t))
        if i == 0:
            sigma = 0.0
        y_mean, y_var = g * y_mean, g**2 * y_var + sigma**2
    return mu + y_mean, y_var


# --------------------------------------------------------------------------- point oracle


# The "linspace" cases also guard the float32/float64 tf.linspace regression (test_schedules.py).
@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
@pytest.mark.parametrize("kind", ["ddim", "ddpm_small", "ddpm_large"])
def test_point_oracle_recovers_x_star(prediction_type, spacing, kind):
    d = gd.GaussianDiffusion("cosine", 1000, prediction_type)
    sampler = {"ddim": samplers.DDIMSampler(0.0),
               "ddpm_small": samplers.AncestralSampler("fixed_small"),
               "ddpm_large": samplers.AncestralSampler("fixed_large")}[kind]
    run = compiled_sampler(point_oracle(d, X_STAR), d, [3, 4], sampler, spacing)
    cases = [(1, 0), (2, 1), (7, 2), (50, 3), (1000, 4)]
    if prediction_type == "eps" and spacing == "trailing":
        # A single step from t = T - 1 (abar ~ 4e-9) must compute
        # x0 = (x - sqrt(1 - abar) eps) / sqrt(abar): float32 rounding of x and eps is
        # amplified ~1e4 times. Ill-conditioned by nature, so that case is checked in float64
        # (test_point_oracle_float64_is_exact). With >= 2 steps the last step is at low t.
        cases = cases[1:]
    for k, seed in cases:
        out = run(seed, k)
        assert out.shape == (3, 4) and out.dtype == np.float32
        np.testing.assert_allclose(out, np.broadcast_to(X_STAR, (3, 4)), atol=1e-4,
                                   err_msg=f"num_steps={k}")


@pytest.mark.parametrize("prediction_type", ["x0", "v"])
def test_point_oracle_zero_terminal_snr(prediction_type):
    d = gd.GaussianDiffusion("linear", 200, prediction_type, zero_terminal_snr=True)
    for sampler in (samplers.DDIMSampler(0.0), samplers.AncestralSampler("fixed_small")):
        run = compiled_sampler(point_oracle(d, X_STAR), d, [2, 4], sampler)
        for k in (1, 10, 200):
            np.testing.assert_allclose(run(k, k), np.broadcast_to(X_STAR, (2, 4)), atol=1e-4)


def test_point_oracle_float64_is_exact():
    d = gd.GaussianDiffusion("cosine", 1000, "eps")
    run = compiled_sampler(point_oracle(d, X_STAR), d, [2, 4], samplers.DDIMSampler(0.0),
                           dtype=tf.float64)
    for k in (1, 2, 37, 1000):
        out = run(k, k)
        assert out.dtype == np.float64
        np.testing.assert_allclose(out, np.broadcast_to(X_STAR.astype(np.float64), (2, 4)),
                                   atol=1e-7, err_msg=f"num_steps={k}")


def test_clip_x0_clips_the_prediction():
    x_star = np.array([3.0, -2.0, 0.5, -0.25], np.float32)
    d = gd.GaussianDiffusion("cosine", 100, "eps")
    run = compiled_sampler(point_oracle(d, x_star), d, [2, 4], samplers.DDIMSampler(0.0),
                           clip_x0=True)
    np.testing.assert_allclose(run(0, 20), np.broadcast_to(np.clip(x_star, -1, 1), (2, 4)),
                               atol=1e-5)


# --------------------------------------------------------------------------- Gaussian oracle


def _check_moments(out, ref_mean, ref_var, mu, s):
    """Sample mean/std against the chain recursion and the data distribution (5-sigma MC)."""
    m = out.size
    ref_std = np.sqrt(ref_var)
    tol_mean, tol_std = 5 * s / np.sqrt(m), 5 * s / np.sqrt(2 * m)
    # The chain's own discretisation bias is well inside the Monte Carlo tolerance, so matching
    # (mu, s) within the tolerance is a meaningful statement about the data distribution.
    assert abs(ref_mean - mu) < tol_mean / 2 and abs(ref_std - s) < tol_std / 2
    assert abs(out.mean() - mu) < tol_mean
    assert abs(out.std() - s) < tol_std
    assert abs(out.mean() - ref_mean) < tol_mean
    assert abs(out.std() - ref_std) < tol_std


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_ddim_gaussian_oracle_matches_data_distribution(prediction_type):
    T, K, n = 1000, 500, 20_000
    d = gd.GaussianDiffusion("cosine", T, prediction_type)
    run = compiled_sampler(gaussian_oracle(d, MU, S), d, [n, 2], samplers.DDIMSampler(0.0))
    out = run(11, K).astype(np.float64).ravel()
    ref_mean, ref_var = ref_chain_moments(d.alphas_cumprod, trailing(T, K), MU, S, "ddim")
    _check_moments(out, ref_mean, ref_var, MU, S)


def test_ddim_few_steps_matches_chain_recursion():
    # With 5 steps DDIM is visibly biased for s != 1; the numpy recursion predicts the bias.
    T, K, n = 1000, 5, 20_000
    d = gd.GaussianDiffusion("linear", T, "eps")
    run = compiled_sampler(gaussian_oracle(d, MU, S), d, [n, 2], samplers.DDIMSampler(0.0))
    out = run(3, K).astype(np.float64).ravel()
    ref_mean, ref_var = ref_chain_moments(d.alphas_cumprod, trailing(T, K), MU, S, "ddim")
    m = out.size
    ref_std = np.sqrt(ref_var)
    assert abs(out.mean() - ref_mean) < 5 * ref_std / np.sqrt(m)
    assert abs(out.std() - ref_std) < 5 * ref_std / np.sqrt(2 * m)


@pytest.mark.parametrize("kind", ["ddim_eta1", "ddpm_small"])
def test_stochastic_samplers_match_data_distribution(kind):
    T, K, n = 1000, 1000, 20_000
    d = gd.GaussianDiffusion("cosine", T, "eps")
    sampler = (samplers.DDIMSampler(1.0) if kind == "ddim_eta1"
               else samplers.AncestralSampler("fixed_small"))
    run = compiled_sampler(gaussian_oracle(d, MU, S), d, [n, 2], sampler)
    out = run(5, K).astype(np.float64).ravel()
    ref_mean, ref_var = ref_chain_moments(d.alphas_cumprod, trailing(T, K), MU, S,
                                          "ddim" if kind == "ddim_eta1" else "ddpm", eta=1.0)
    _check_moments(out, ref_mean, ref_var, MU, S)


def test_ddim_eta1_equals_ancestral_fixed_small():
    """DDIM with eta = 1 is DDPM with beta~: same moments and, with the same noise, same paths."""
    T, K = 1000, 40
    d = gd.GaussianDiffusion("cosine", T, "eps")
    steps = trailing(T, K)
    m1, v1 = ref_chain_moments(d.alphas_cumprod, steps, MU, S, "ddim", eta=1.0)
    m2, v2 = ref_chain_moments(d.alphas_cumprod, steps, MU, S, "ddpm")
    assert m1 == pytest.approx(m2, rel=1e-9) and v1 == pytest.approx(v2, rel=1e-9)
    fn = gaussian_oracle(d, MU, S)
    a = compiled_sampler(fn, d, [256, 2], samplers.DDIMSampler(1.0))(9, K)
    b = compiled_sampler(fn, d, [256, 2], samplers.AncestralSampler("fixed_small"))(9, K)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_single_step_formulas():
    """One ``step`` call of each sampler against the paper formulas in numpy."""
    abar_t, abar_s = 0.3, 0.8
    rng = np.random.default_rng(0)
    x_t, x0, eps, z = (rng.normal(size=(2, 3)) for _ in range(4))
    args = [tf.constant(v, tf.float64) for v in (x_t, x0, eps, abar_t, abar_s)]
    args.append(tf.constant(z))
    for eta in (0.0, 0.5, 1.0):
        sigma = eta * np.sqrt((1 - abar_s) / (1 - abar_t)) * np.sqrt(1 - abar_t / abar_s)
        expected = (np.sqrt(abar_s) * x0 + np.sqrt(1 - abar_s - sigma**2) * eps + sigma * z)
        np.testing.assert_allclose(samplers.DDIMSampler(eta).step(*args).numpy(), expected,
                                   rtol=1e-10)
    beta = 1 - abar_t / abar_s
    mean = (beta * np.sqrt(abar_s) / (1 - abar_t) * x0
            + (1 - abar_s) * np.sqrt(1 - beta) / (1 - abar_t) * x_t)
    small = mean + np.sqrt(beta * (1 - abar_s) / (1 - abar_t)) * z
    large = mean + np.sqrt(beta) * z
    np.testing.assert_allclose(samplers.AncestralSampler("fixed_small").step(*args).numpy(),
                               small, rtol=1e-10)
    np.testing.assert_allclose(samplers.AncestralSampler("fixed_large").step(*args).numpy(),
                               large, rtol=1e-10)


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("sampler", [samplers.DDIMSampler(0.0), samplers.DDIMSampler(0.5),
                                     samplers.AncestralSampler("fixed_large")])
def test_determinism(sampler):
    d = gd.GaussianDiffusion("cosine", 100, "eps")
    run = compiled_sampler(gaussian_oracle(d, MU, S), d, [8, 2], sampler)
    a, b, c = run(1, 20), run(1, 20), run(2, 20)
    np.testing.assert_array_equal(a, b)
    assert np.max(np.abs(a - c)) > 1e-2
    # Eager execution gives the same numbers as the compiled sampler.
    eager = samplers.sample(gaussian_oracle(d, MU, S), d, [8, 2], 1, 20, sampler).numpy()
    np.testing.assert_allclose(eager, a, atol=1e-6)


# --------------------------------------------------------------------------- guidance


class FakeConditionalDenoiser:
    """``out = x * (label + 1) + t``; records how it is called."""

    def __init__(self):
        self.calls = []

    def __call__(self, inputs, training=False):
        assert training is False
        self.calls.append([tuple(i.shape) for i in inputs])
        if len(inputs) == 2:
            x, t = inputs
            return x * 100.0 + tf.cast(t, x.dtype)[:, None]
        x, t, label = inputs
        scale = tf.cast(label, x.dtype)[:, None] + 1.0
        return x * scale + tf.cast(t, x.dtype)[:, None]


def test_classifier_free_guidance_arithmetic():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3)).astype(np.float32)
    t = np.array([5, 6, 7, 8], np.int32)
    label = np.array([0, 1, 2, 1], np.int32)
    null = 3

    def out(lbl):
        return x * (lbl[:, None] + 1.0) + t[:, None]

    out_c, out_u = out(label), out(np.full(4, null))
    for w in (0.0, 1.0, 2.5, np.array([0.0, 1.0, 3.0, -1.0], np.float32)):
        fake = FakeConditionalDenoiser()
        fn = samplers.denoiser_fn(fake, tf.constant(label), w, null_label=null)
        got = fn(tf.constant(x), tf.constant(t)).numpy()
        w_b = np.reshape(w, (-1, 1)) if np.ndim(w) else w
        np.testing.assert_allclose(got, out_u + w_b * (out_c - out_u), rtol=1e-6)
        assert fake.calls == [[(8, 3), (8,), (8,)]]  # one batched call of size 2B
    # Without guidance the label is passed through; without a label the model is unconditional.
    fake = FakeConditionalDenoiser()
    got = samplers.denoiser_fn(fake, tf.constant(label))(tf.constant(x), tf.constant(t))
    np.testing.assert_allclose(got.numpy(), out_c, rtol=1e-6)
    got = samplers.denoiser_fn(fake)(tf.constant(x), tf.constant(t))
    np.testing.assert_allclose(got.numpy(), x * 100.0 + t[:, None], rtol=1e-6)
    with pytest.raises(ValueError, match="null_label"):
        samplers.denoiser_fn(fake, tf.constant(label), 2.0, null_label=None)


def test_guidance_inside_sampler_uses_guided_prediction():
    """w = 1 gives the conditional sample, w = 0 the unconditional one (point oracles)."""
    d = gd.GaussianDiffusion("cosine", 100, "eps")
    targets = {0: np.array([0.5, 0.5]), 1: np.array([-0.5, 0.25]), 2: np.array([0.0, -0.75])}

    def model(inputs, training=False):
        x, t, label = inputs
        x_star = tf.gather(tf.constant(np.stack([targets[i] for i in range(3)]), x.dtype), label)
        abar = _abar_tf(d, t, x.dtype)[:, None]
        return (x - tf.sqrt(abar) * x_star) / tf.sqrt(1.0 - abar)

    label = tf.constant([0, 1])
    for w, expected in ((1.0, np.stack([targets[0], targets[1]])),
                        (0.0, np.stack([targets[2], targets[2]]))):
        fn = samplers.denoiser_fn(model, label, w, null_label=2)
        out = compiled_sampler(fn, d, [2, 2], samplers.DDIMSampler(0.0))(0, 10)
        np.testing.assert_allclose(out, expected, atol=1e-4)


# --------------------------------------------------------------------------- validation


def test_sampler_validation():
    with pytest.raises(ValueError, match="fixed_small"):
        samplers.AncestralSampler("learned")
    for eta in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="eta"):
            samplers.DDIMSampler(eta)
    with pytest.raises(ValueError) as info:
        samplers.make_sampler("euler")
    assert "ddpm" in str(info.value) and "ddim" in str(info.value)
    assert isinstance(samplers.make_sampler("ddpm", "fixed_large"), samplers.AncestralSampler)
    assert samplers.make_sampler("ddpm", "fixed_large").variance_type == "fixed_large"
    assert samplers.make_sampler("ddim", eta=0.3).eta == 0.3
    d = gd.GaussianDiffusion("cosine", 100, "eps")
    with pytest.raises(ValueError, match="spacing"):
        samplers.sample(point_oracle(d, X_STAR), d, [1, 4], 0, 5, spacing="middle")


# --------------------------------------------------------------------------- graph mode


def test_sample_traces_once_for_tensor_num_steps():
    d = gd.GaussianDiffusion("cosine", 1000, "eps")
    oracle = point_oracle(d, X_STAR)
    fn_calls, traces = [], []

    def fn(x, t):
        fn_calls.append(1)
        return oracle(x, t)

    @tf.function
    def run(seed, num_steps):
        traces.append(1)
        return samplers.sample(fn, d, [2, 4], seed, num_steps)

    for k in (3, 10, 100, 1000):
        out = run(tf.constant(k, tf.int64), tf.constant(k, tf.int32))
        np.testing.assert_allclose(out.numpy(), np.broadcast_to(X_STAR, (2, 4)), atol=1e-4)
    assert len(traces) == 1
    # The network is traced into a tf.while_loop body once: no Python loop over steps.
    assert len(fn_calls) == 1
    graph = run.get_concrete_function(tf.TensorSpec([], tf.int64),
                                      tf.TensorSpec([], tf.int32)).graph
    assert any(op.type in ("While", "StatelessWhile") for op in graph.get_operations())
