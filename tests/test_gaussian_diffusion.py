"""GaussianDiffusion tables and formulas against numpy references written from the papers."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tfngd import gaussian_diffusion as gd

GAMMA = 5.0

# --------------------------------------------------------------------------- references


def ref_betas(name, T):
    if name == "linear":
        return np.linspace(1e-4 * 1000 / T, 2e-2 * 1000 / T, T)
    s = 0.008
    u = np.arange(T + 1) / T
    f = np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
    return np.minimum(1 - f[1:] / f[:-1], 0.999)


def ref_tables(name, T):
    betas = ref_betas(name, T)
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    var = betas * (1 - abar_prev) / (1 - abar)
    c1 = betas * np.sqrt(abar_prev) / (1 - abar)
    c2 = (1 - abar_prev) * np.sqrt(alphas) / (1 - abar)
    return dict(betas=betas, alphas=alphas, abar=abar, abar_prev=abar_prev, var=var, c1=c1, c2=c2)


def bayes_posterior(x0, x_t, abar_prev, alpha_t, beta_t):
    """q(x_{t-1} | x_t, x_0) by Bayes: prior q(x_{t-1}|x0) times likelihood q(x_t|x_{t-1}).

    prior N(sqrt(abar_prev) x0, 1 - abar_prev); likelihood in x_{t-1}:
    N(x_t; sqrt(alpha_t) x_{t-1}, beta_t). Precision-weighted combination.
    """
    prior_prec = 1.0 / (1.0 - abar_prev)
    lik_prec = alpha_t / beta_t
    var = 1.0 / (prior_prec + lik_prec)
    mean = var * (prior_prec * np.sqrt(abar_prev) * x0 + np.sqrt(alpha_t) / beta_t * x_t)
    return mean, var


def joint_conditioning(x0, x_t, abar_prev, abar_t, alpha_t):
    """Same posterior from the joint Gaussian of (x_{t-1}, x_t) given x0 (Schur complement)."""
    v_prev = 1.0 - abar_prev
    v_t = 1.0 - abar_t
    cov = np.sqrt(alpha_t) * v_prev
    mean = np.sqrt(abar_prev) * x0 + cov / v_t * (x_t - np.sqrt(abar_t) * x0)
    return mean, v_prev - cov**2 / v_t


def bcast(v, rank):
    return np.reshape(v, (-1,) + (1,) * (rank - 1))


# --------------------------------------------------------------------------- tables


@pytest.mark.parametrize("name,T", [("cosine", 1000), ("linear", 1000), ("cosine", 50)])
def test_tables_match_numpy(name, T):
    d = gd.GaussianDiffusion(name, T)
    ref = ref_tables(name, T)
    assert d.alphas_cumprod.dtype == np.float64
    np.testing.assert_allclose(d.betas, ref["betas"], rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(d.alphas_cumprod, ref["abar"], rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(d.alphas_cumprod_prev, ref["abar_prev"], rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(d.posterior_variance, ref["var"], rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(d.posterior_mean_coef1, ref["c1"], rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(d.posterior_mean_coef2, ref["c2"], rtol=1e-9, atol=1e-15)
    assert d.posterior_variance[0] == 0.0
    assert d.posterior_log_variance_clipped[0] == pytest.approx(np.log(ref["var"][1]), rel=1e-12)
    np.testing.assert_allclose(
        d.posterior_log_variance_clipped[1:], np.log(ref["var"][1:]), rtol=1e-10
    )
    assert np.all(np.isfinite(d.posterior_log_variance_clipped))


def test_gather_shapes_and_dtype():
    d = gd.GaussianDiffusion("cosine", 100)
    x = tf.zeros([3, 4, 5, 2], tf.float16)
    abar = d.abar(tf.constant([0, 50, 99]), x)
    assert abar.shape == (3, 1, 1, 1) and abar.dtype == tf.float16
    snr = d.snr(tf.constant([0, 50, 99]))
    assert snr.dtype == tf.float64
    ref = ref_tables("cosine", 100)["abar"][[0, 50, 99]]
    np.testing.assert_allclose(snr.numpy(), ref / (1 - ref), rtol=1e-12)


# --------------------------------------------------------------------------- forward process


def test_q_sample_exact_on_fixed_noise():
    T = 1000
    d = gd.GaussianDiffusion("cosine", T)
    abar = ref_tables("cosine", T)["abar"]
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(6, 3, 3, 2))
    noise = rng.normal(size=x0.shape)
    t = np.array([0, 1, 250, 500, 998, 999])
    got = d.q_sample(tf.constant(x0), tf.constant(t), tf.constant(noise)).numpy()
    a = bcast(abar[t], 4)
    np.testing.assert_allclose(got, np.sqrt(a) * x0 + np.sqrt(1 - a) * noise, rtol=1e-12,
                               atol=1e-12)
    mean, var, log_var = d.q_mean_variance(tf.constant(x0), tf.constant(t))
    np.testing.assert_allclose(mean.numpy(), np.sqrt(a) * x0, rtol=1e-12)
    np.testing.assert_allclose(np.broadcast_to(var.numpy(), x0.shape),
                               np.broadcast_to(1 - a, x0.shape), rtol=1e-12)
    np.testing.assert_allclose(np.broadcast_to(log_var.numpy(), x0.shape),
                               np.broadcast_to(np.log(1 - a), x0.shape), rtol=1e-12)


@pytest.mark.parametrize("t", [0, 100, 500, 900, 999])
def test_q_sample_monte_carlo_moments(t):
    T = 1000
    d = gd.GaussianDiffusion("linear", T)
    abar = ref_tables("linear", T)["abar"][t]
    n = 400_000
    x0_value = np.array([0.7, -1.3], np.float64)
    x0 = np.broadcast_to(x0_value, (n, 2))
    noise = tf.random.stateless_normal([n, 2], seed=[1, t], dtype=tf.float64)
    samples = d.q_sample(tf.constant(x0), tf.fill([n], t), noise).numpy()
    mean = samples.mean(axis=0)
    var = samples.var(axis=0)
    std_true = np.sqrt(1 - abar)
    # 5-sigma Monte Carlo tolerances: se(mean) = std / sqrt(n), se(var) = var sqrt(2/n).
    np.testing.assert_allclose(mean, np.sqrt(abar) * x0_value, atol=5 * std_true / np.sqrt(n))
    np.testing.assert_allclose(var, 1 - abar, atol=5 * (1 - abar) * np.sqrt(2 / n))


# --------------------------------------------------------------------------- posterior


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_posterior_matches_bayes(name):
    T = 1000
    d = gd.GaussianDiffusion(name, T)
    ref = ref_tables(name, T)
    rng = np.random.default_rng(1)
    t = np.array([1, 2, 10, 300, 700, 999])
    x0 = rng.normal(size=(len(t), 5))
    x_t = rng.normal(size=(len(t), 5))
    mean, var, log_var = d.q_posterior_mean_variance(tf.constant(x0), tf.constant(x_t),
                                                     tf.constant(t))
    a_prev = bcast(ref["abar_prev"][t], 2)
    a_t = bcast(ref["abar"][t], 2)
    alpha = bcast(ref["alphas"][t], 2)
    beta = bcast(ref["betas"][t], 2)
    m_bayes, v_bayes = bayes_posterior(x0, x_t, a_prev, alpha, beta)
    m_joint, v_joint = joint_conditioning(x0, x_t, a_prev, a_t, alpha)
    np.testing.assert_allclose(m_bayes, m_joint, rtol=1e-8, atol=1e-10)  # the two references
    np.testing.assert_allclose(mean.numpy(), m_bayes, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(var.numpy()[:, 0], v_bayes[:, 0], rtol=1e-8)
    np.testing.assert_allclose(log_var.numpy()[:, 0], np.log(v_bayes[:, 0]), rtol=1e-8)


def test_posterior_at_t0_is_delta_at_x0():
    d = gd.GaussianDiffusion("cosine", 1000)
    x0 = tf.constant([[0.3, -0.2]], tf.float64)
    x_t = tf.constant([[5.0, 7.0]], tf.float64)
    mean, var, log_var = d.q_posterior_mean_variance(x0, x_t, tf.constant([0]))
    np.testing.assert_allclose(mean.numpy(), x0.numpy(), rtol=1e-12)
    assert var.numpy().item() == 0.0
    assert log_var.numpy().item() == pytest.approx(np.log(d.posterior_variance[1]), rel=1e-12)


def test_posterior_coefficients_respaced_pair_is_bayes():
    # A respaced step from t to s < t: beta = 1 - abar_t / abar_s.
    abar = ref_tables("cosine", 1000)["abar"]
    a_t, a_s = abar[700], abar[400]
    c1, c2, var = gd.posterior_coefficients(tf.constant(a_t), tf.constant(a_s))
    x0, x_t = 0.37, -1.1
    m, v = bayes_posterior(x0, x_t, a_s, a_t / a_s, 1 - a_t / a_s)
    assert float(c1) * x0 + float(c2) * x_t == pytest.approx(m, rel=1e-10)
    assert float(var) == pytest.approx(v, rel=1e-10)


# --------------------------------------------------------------------------- parameterisations


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_prediction_round_trip(prediction_type):
    rng = np.random.default_rng(2)
    x0 = rng.normal(size=(5, 4))
    noise = rng.normal(size=(5, 4))
    abar = bcast(np.array([0.9999, 0.9, 0.5, 0.1, 1e-3]), 2)
    x_t = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
    target = gd.prediction_target(tf.constant(x0), tf.constant(noise), tf.constant(abar),
                                  prediction_type)
    expected_target = {"eps": noise, "x0": x0,
                       "v": np.sqrt(abar) * noise - np.sqrt(1 - abar) * x0}[prediction_type]
    np.testing.assert_allclose(target.numpy(), expected_target, rtol=1e-12, atol=1e-12)
    x0_hat, eps_hat = gd.prediction_to_x0_eps(target, tf.constant(x_t), tf.constant(abar),
                                              prediction_type)
    assert x0_hat.dtype == tf.float64
    np.testing.assert_allclose(x0_hat.numpy(), x0, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(eps_hat.numpy(), noise, rtol=1e-9, atol=1e-9)


def test_v_round_trip_at_zero_snr():
    x_t = tf.constant([[0.4, -2.0]], tf.float64)
    v = tf.constant([[1.5, 0.25]], tf.float64)
    x0_hat, eps_hat = gd.prediction_to_x0_eps(v, x_t, tf.constant(0.0, tf.float64), "v")
    np.testing.assert_allclose(x0_hat.numpy(), -v.numpy())
    np.testing.assert_allclose(eps_hat.numpy(), x_t.numpy())


def test_eps_from_x0():
    x_t, x0, abar = 0.8, -0.3, 0.6
    got = gd.eps_from_x0(tf.constant(x_t, tf.float64), tf.constant(x0, tf.float64),
                         tf.constant(abar, tf.float64))
    assert float(got) == pytest.approx((x_t - np.sqrt(abar) * x0) / np.sqrt(1 - abar), rel=1e-12)


# --------------------------------------------------------------------------- Min-SNR


def ref_min_snr(snr, gamma, prediction_type):
    m = np.minimum(snr, gamma)
    return {"eps": m / snr, "v": m / (snr + 1), "x0": m}[prediction_type]


def _wrong_output(prediction_type, x0_hat, x_t, abar):
    """The network output of each parameterisation that corresponds to the estimate x0_hat."""
    eps_hat = (x_t - np.sqrt(abar) * x0_hat) / np.sqrt(1 - abar)
    return {"eps": eps_hat, "x0": x0_hat,
            "v": np.sqrt(abar) * eps_hat - np.sqrt(1 - abar) * x0_hat}[prediction_type]


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_min_snr_weight_formula(prediction_type):
    snr = np.array([1e-4, 0.3, 1.0, 4.99, 5.0, 5.01, 30.0, 1e5])
    got = gd.min_snr_weight(tf.constant(snr), tf.constant(GAMMA, tf.float64), prediction_type)
    np.testing.assert_allclose(got.numpy(), ref_min_snr(snr, GAMMA, prediction_type), rtol=1e-12)
    if prediction_type == "eps":
        assert np.all(got.numpy() <= 1.0 + 1e-12)  # a "max" instead of "min" would exceed 1


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_min_snr_weighted_error_equals_x0_error_float64(prediction_type):
    abar = ref_tables("cosine", 1000)["abar"]
    t = np.array([0, 5, 100, 400, 600, 800, 999])
    a = bcast(abar[t], 2)
    snr = abar[t] / (1 - abar[t])
    rng = np.random.default_rng(3)
    x0 = rng.normal(size=(len(t), 6))
    noise = rng.normal(size=(len(t), 6))
    x0_hat = x0 + rng.normal(size=x0.shape)  # arbitrary wrong estimate
    x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
    output = _wrong_output(prediction_type, x0_hat, x_t, a)
    target = gd.prediction_target(tf.constant(x0), tf.constant(noise), tf.constant(a),
                                  prediction_type).numpy()
    weight = gd.min_snr_weight(tf.constant(snr), tf.constant(GAMMA, tf.float64),
                               prediction_type).numpy()
    weighted = weight * np.sum((output - target) ** 2, axis=1)
    expected = np.minimum(snr, GAMMA) * np.sum((x0 - x0_hat) ** 2, axis=1)
    np.testing.assert_allclose(weighted, expected, rtol=1e-7)


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_min_snr_loss_of_diffusion_object(prediction_type):
    T = 1000
    d = gd.GaussianDiffusion("cosine", T, prediction_type, min_snr_gamma=GAMMA)
    abar = ref_tables("cosine", T)["abar"]
    t = np.array([3, 100, 400, 600, 800, 990])
    a = bcast(abar[t], 4)
    snr = abar[t] / (1 - abar[t])
    rng = np.random.default_rng(4)
    x0 = rng.normal(size=(len(t), 2, 2, 1))
    noise = rng.normal(size=x0.shape)
    x0_hat = x0 + 0.5 * rng.normal(size=x0.shape)
    x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
    output = _wrong_output(prediction_type, x0_hat, x_t, a)
    tt = tf.constant(t, tf.int32)
    weights = d.loss_weights(tt)
    assert weights.dtype == tf.float32
    np.testing.assert_allclose(weights.numpy(), ref_min_snr(snr, GAMMA, prediction_type),
                               rtol=1e-6)
    loss = d.per_example_loss(tf.constant(output, tf.float32), tf.constant(x0, tf.float32),
                              tf.constant(noise, tf.float32), tt) * weights
    expected = np.minimum(snr, GAMMA) * np.mean((x0 - x0_hat) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(loss.numpy(), expected, rtol=2e-3)


def test_loss_weights_are_one_without_min_snr():
    d = gd.GaussianDiffusion("cosine", 100, "v")
    w = d.loss_weights(tf.constant([0, 50, 99]))
    np.testing.assert_array_equal(w.numpy(), np.ones(3, np.float32))


def test_min_snr_zero_terminal_snr_is_finite():
    d = gd.GaussianDiffusion("cosine", 100, "v", zero_terminal_snr=True, min_snr_gamma=GAMMA)
    w = d.loss_weights(tf.constant([0, 50, 99])).numpy()
    assert np.all(np.isfinite(w))
    assert w[-1] == 0.0


def test_per_example_loss_is_mse():
    d = gd.GaussianDiffusion("linear", 100, "eps")
    rng = np.random.default_rng(5)
    out, x0, noise = (rng.normal(size=(3, 4, 2)).astype(np.float32) for _ in range(3))
    loss = d.per_example_loss(out, x0, noise, tf.constant([1, 2, 3]))
    np.testing.assert_allclose(loss.numpy(), np.mean((out - noise) ** 2, axis=(1, 2)), rtol=1e-6)


# --------------------------------------------------------------------------- reverse process


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_p_mean_variance(variance_type, prediction_type):
    T = 1000
    d = gd.GaussianDiffusion("cosine", T, prediction_type, variance_type)
    ref = ref_tables("cosine", T)
    t = np.array([0, 1, 2, 500, 999])
    a = bcast(ref["abar"][t], 2)
    rng = np.random.default_rng(6)
    x_t = rng.normal(size=(len(t), 3))
    x0_hat = rng.normal(size=(len(t), 3))
    output = _wrong_output(prediction_type, x0_hat, x_t, a)
    mean, var, log_var, x0_out = d.p_mean_variance(tf.constant(output), tf.constant(x_t),
                                                   tf.constant(t))
    np.testing.assert_allclose(x0_out.numpy(), x0_hat, rtol=1e-7, atol=1e-7)
    expected_mean = bcast(ref["c1"][t], 2) * x0_hat + bcast(ref["c2"][t], 2) * x_t
    np.testing.assert_allclose(mean.numpy(), expected_mean, rtol=1e-7, atol=1e-7)
    if variance_type == "fixed_small":
        expected_var = np.append(ref["var"][1], ref["var"][1:])[t]
    else:
        expected_var = np.append(ref["var"][1], ref["betas"][1:])[t]
    np.testing.assert_allclose(var.numpy()[:, 0], expected_var, rtol=1e-10)
    np.testing.assert_allclose(log_var.numpy()[:, 0], np.log(expected_var), rtol=1e-10)


def test_p_mean_variance_clip_denoised():
    d = gd.GaussianDiffusion("cosine", 1000, "x0")
    x_t = np.array([[0.5, -0.5, 0.1]])
    x0_hat = np.array([[3.0, -2.0, 0.4]])
    t = np.array([300])
    mean, _, _, x0_out = d.p_mean_variance(tf.constant(x0_hat), tf.constant(x_t), tf.constant(t),
                                           clip_denoised=True)
    clipped = np.clip(x0_hat, -1, 1)
    np.testing.assert_allclose(x0_out.numpy(), clipped)
    ref = ref_tables("cosine", 1000)
    np.testing.assert_allclose(mean.numpy(), ref["c1"][300] * clipped + ref["c2"][300] * x_t,
                               rtol=1e-9)


# --------------------------------------------------------------------------- validation


def test_rejects_unknown_prediction_type():
    with pytest.raises(ValueError) as info:
        gd.GaussianDiffusion(prediction_type="score")
    for valid in ("eps", "x0", "v"):
        assert valid in str(info.value)
    for fn in (lambda: gd.prediction_target(1.0, 1.0, 0.5, "score"),
               lambda: gd.prediction_to_x0_eps(1.0, 1.0, 0.5, "score"),
               lambda: gd.min_snr_weight(1.0, 5.0, "score")):
        with pytest.raises(ValueError, match="score"):
            fn()


def test_rejects_unknown_variance_type():
    with pytest.raises(ValueError, match="fixed_small"):
        gd.GaussianDiffusion(variance_type="learned")


def test_rejects_unknown_schedule():
    with pytest.raises(ValueError, match="cosine"):
        gd.GaussianDiffusion(schedule="sigmoid")


def test_zero_terminal_snr_requires_v_or_x0():
    with pytest.raises(ValueError, match="zero_terminal_snr"):
        gd.GaussianDiffusion(prediction_type="eps", zero_terminal_snr=True)
    for ok in ("v", "x0"):
        d = gd.GaussianDiffusion("linear", 100, prediction_type=ok, zero_terminal_snr=True)
        assert abs(d.alphas_cumprod[-1]) <= 1e-12


@pytest.mark.parametrize("gamma", [0.0, -1.0, float("nan"), float("inf")])
def test_rejects_bad_gamma(gamma):
    with pytest.raises(ValueError, match="min_snr_gamma"):
        gd.GaussianDiffusion(min_snr_gamma=gamma)


def test_get_config_round_trip():
    d = gd.GaussianDiffusion("linear", 200, "v", "fixed_large", True, 3.0)
    d2 = gd.GaussianDiffusion(**d.get_config())
    assert d2.get_config() == d.get_config()
    np.testing.assert_array_equal(d2.betas, d.betas)
