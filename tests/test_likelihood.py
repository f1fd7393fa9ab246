"""The likelihood primitives and the DDPM variational bound, against independent references:
tensorflow-probability's KL, scipy's normal CDF and density, closed forms computed in numpy
(a one-point data set with an oracle denoiser; Gaussian data with the optimal denoiser, whose
expected bound is a sum of Gaussian expectations), the ancestral sampler's variances, and
``tfngd-eval`` end to end on tiny trained runs."""

import json
import math

import numpy as np
import pytest
import scipy.stats
import tensorflow as tf
import tensorflow_probability as tfp

from tfngd import checkpointing, likelihood, runs, samplers, schedules
from tfngd.config import TrainConfig, build_model, build_optimizer
from tfngd.gaussian_diffusion import GaussianDiffusion
from trainers import evaluate as evaluate_cli
from trainers import train as train_cli

GRID = -1.0 + 2.0 * np.arange(256) / 255.0  # the 256 levels of [-1, 1]


# -- primitives --------------------------------------------------------------------------------


def test_normal_kl_matches_tfp_and_is_zero_for_equal_distributions():
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=50), rng.normal(size=50)
    lv1, lv2 = rng.normal(size=50), rng.normal(size=50)
    ours = likelihood.normal_kl(m1, lv1, m2, lv2).numpy()
    reference = tfp.distributions.kl_divergence(
        tfp.distributions.Normal(m1, np.exp(0.5 * lv1)),
        tfp.distributions.Normal(m2, np.exp(0.5 * lv2))).numpy()
    np.testing.assert_allclose(ours, reference, rtol=1e-10, atol=1e-12)
    assert np.all(ours > 0)
    # zero up to the rounding of (-1 + lv) - lv
    np.testing.assert_allclose(likelihood.normal_kl(m1, lv1, m1, lv1).numpy(), 0.0, atol=1e-15)


@pytest.mark.parametrize(("mean", "scale"), [(0.0, 0.01), (0.3, 0.002), (-0.97, 0.05),
                                             (0.99, 0.2), (-2.5, 1.0), (0.1, 3.0)])
def test_discretized_decoder_is_a_distribution_over_the_256_levels(mean, scale):
    log_p = likelihood.discretized_gaussian_log_likelihood(
        tf.constant(GRID), tf.constant(mean, tf.float64),
        tf.constant(math.log(scale), tf.float64)).numpy()
    assert np.all(np.isfinite(log_p))
    np.testing.assert_allclose(np.exp(log_p).sum(), 1.0, atol=1e-9)


def test_discretized_decoder_matches_scipy_bin_probabilities():
    mean, scale = 0.12, 0.04
    log_p = likelihood.discretized_gaussian_log_likelihood(
        tf.constant(GRID), tf.constant(mean, tf.float64),
        tf.constant(math.log(scale), tf.float64)).numpy()
    normal = scipy.stats.norm(mean, scale)
    upper, lower = GRID + 1.0 / 255.0, GRID - 1.0 / 255.0
    # above the mean, survival functions: a difference of two CDFs near 1 loses digits
    expected = np.log(np.where(GRID > mean, normal.sf(lower) - normal.sf(upper),
                               normal.cdf(upper) - normal.cdf(lower)))
    interior = slice(1, 255)
    keep = expected[interior] > math.log(1e-12)  # below that the primitive clamps
    assert keep.sum() > 20
    np.testing.assert_allclose(log_p[interior][keep], expected[interior][keep], rtol=1e-9)
    np.testing.assert_allclose(log_p[0], normal.logcdf(upper[0]), rtol=1e-9)
    np.testing.assert_allclose(log_p[-1], normal.logsf(lower[-1]), rtol=1e-9)


def test_discretized_decoder_is_accurate_in_float32_on_both_sides_of_the_mean():
    """Bins 5 to 6 scales from the mean (probabilities 1e-5 to 1e-7): above the mean a
    difference of two CDFs near 1 would lose most of the answer in float32."""
    centre = 128
    x = np.float32(GRID[[centre + 6, centre + 7, centre - 6, centre - 7, 0, 255]])
    mean, scale = np.float32(GRID[centre]), np.float32(0.01)
    log_p = likelihood.discretized_gaussian_log_likelihood(
        tf.constant(x), tf.constant(mean), tf.constant(np.log(scale))).numpy()
    inner = x[:4].astype(np.float64)
    normal = scipy.stats.norm(float(mean), float(scale))
    expected = np.log(np.where(inner > float(mean),
                               normal.sf(inner - 1 / 255) - normal.sf(inner + 1 / 255),
                               normal.cdf(inner + 1 / 255) - normal.cdf(inner - 1 / 255)))
    expected = np.append(expected, [normal.logcdf(-1.0 + 1 / 255), normal.logsf(1.0 - 1 / 255)])
    assert np.all(expected[:4] < math.log(1e-5)) and np.all(expected[:4] > math.log(1e-12))
    np.testing.assert_allclose(log_p, expected, rtol=1e-4)


def test_gaussian_log_likelihood_matches_scipy():
    rng = np.random.default_rng(1)
    x, mean, log_variance = rng.normal(size=20), rng.normal(size=20), rng.normal(size=20)
    np.testing.assert_allclose(
        likelihood.gaussian_log_likelihood(x, mean, log_variance).numpy(),
        scipy.stats.norm.logpdf(x, mean, np.exp(0.5 * log_variance)), rtol=1e-12)


def test_nats_to_bits_per_dim():
    nats = tf.constant([math.log(2.0) * 6.0, 0.0], tf.float64)
    np.testing.assert_allclose(likelihood.nats_to_bits_per_dim(nats, 3).numpy(), [2.0, 0.0])


# -- independent numpy references -------------------------------------------------------------


def chain_tables(diffusion, kept):
    """abar, beta' and the posterior variance of the chain through ``kept``, in numpy."""
    abar = diffusion.alphas_cumprod[np.asarray(kept)]
    abar_prev = np.append(1.0, abar[:-1])
    beta = 1.0 - abar / abar_prev
    posterior_variance = beta * (1.0 - abar_prev) / (1.0 - abar)
    return abar, beta, posterior_variance


def prior_kl_nats(x0, abar_last):
    """KL(N(sqrt(a) x0, 1 - a) || N(0, 1)) summed over the elements of ``x0``."""
    a = abar_last
    return np.sum(0.5 * (-1.0 - np.log(1.0 - a) + (1.0 - a) + a * x0**2))


# -- the bound for a one-point data set with an oracle denoiser ------------------------------


POINT = GRID[[0, 17, 128, 200, 255, 64, 3, 250, 90]].reshape(1, 3, 3, 1)  # includes both edges


def oracle_x0(point):
    """An x0-predicting denoiser that always answers ``point``."""
    return lambda x, t: tf.broadcast_to(tf.constant(point, x.dtype), tf.shape(x))


@pytest.mark.parametrize("kept", [None, [0, 3, 6, 9], [2, 4], [1, 2, 3, 5]])
@pytest.mark.parametrize("clip_x0", [True, False])
def test_oracle_bound_is_prior_plus_decoder_in_closed_form(kept, clip_x0):
    """With x0_hat = x0 and the posterior's own variance every KL term is 0, and the bound
    is the prior KL at the last kept step plus the discretised decoder at the decoder
    variance (the posterior variance between the first two kept steps), in closed form."""
    diffusion = GaussianDiffusion("cosine", 10, prediction_type="x0")
    x0 = tf.constant(np.repeat(POINT, 3, axis=0), tf.float64)
    out = likelihood.variational_bound(oracle_x0(POINT), diffusion, x0, seed=3, timesteps=kept,
                                       clip_x0=clip_x0)
    steps = np.arange(10) if kept is None else np.asarray(kept)
    abar, _, posterior_variance = chain_tables(diffusion, steps)
    sigma = math.sqrt(posterior_variance[1])
    point = POINT.ravel()
    normal = scipy.stats.norm(point, sigma)
    bins = normal.cdf(point + 1 / 255) - normal.cdf(point - 1 / 255)
    bins[point < -0.999] = normal.cdf(point + 1 / 255)[point < -0.999]
    bins[point > 0.999] = normal.sf(point - 1 / 255)[point > 0.999]
    dims_ln2 = point.size * math.log(2.0)
    expected_decoder = -np.log(bins).sum() / dims_ln2
    expected_prior = prior_kl_nats(point, abar[-1]) / dims_ln2

    np.testing.assert_array_equal(out["timesteps"].numpy(), steps)
    per_step = out["per_step_bpd"].numpy()
    assert per_step.shape == (len(steps),)
    np.testing.assert_allclose(per_step[1:], 0.0, atol=1e-14)  # rounding of (-1 + lv) - lv
    np.testing.assert_allclose(out["kl_bpd"].numpy(), 0.0, atol=1e-13)
    assert expected_decoder > 1.0  # not a vanishing term
    np.testing.assert_allclose(out["decoder_bpd"].numpy(), expected_decoder, rtol=1e-9)
    np.testing.assert_allclose(per_step[0], expected_decoder, rtol=1e-9)
    if kept is not None and kept[-1] < 9:
        assert expected_prior > 0.01
    np.testing.assert_allclose(out["prior_bpd"].numpy(), expected_prior, rtol=1e-9,
                               atol=1e-15)
    np.testing.assert_allclose(out["bits_per_dim"].numpy(), expected_decoder + expected_prior,
                               rtol=1e-9)
    np.testing.assert_allclose(out["nats_per_dim"].numpy(),
                               out["bits_per_dim"].numpy() * math.log(2.0), rtol=1e-12)


@pytest.mark.parametrize("kept", [[0, 4, 9], [1, 2, 5, 7]])
def test_respaced_reverse_variance_is_the_ancestral_samplers(kept):
    """``fixed_large`` on a respaced chain: with the oracle the means agree, so each KL term
    is the KL between the posterior variance and the variance the respaced ancestral
    sampler draws with (read off its step: ``(step(noise=1) - step(noise=0))^2``)."""
    diffusion = GaussianDiffusion("cosine", 10, prediction_type="x0",
                                  variance_type="fixed_large")
    x0 = tf.constant(POINT, tf.float64)
    out = likelihood.variational_bound(oracle_x0(POINT), diffusion, x0, seed=0, timesteps=kept)
    abar, _, posterior_variance = chain_tables(diffusion, kept)
    sampler = samplers.AncestralSampler("fixed_large")
    expected = []
    for i in range(1, len(kept)):
        def step(noise, i=i):
            return sampler.step(tf.zeros([1], tf.float64), tf.zeros([1], tf.float64), None,
                                tf.constant(abar[i], tf.float64),
                                tf.constant(abar[i - 1], tf.float64),
                                tf.constant([noise], tf.float64)).numpy()[0]
        sampler_variance = (step(1.0) - step(0.0)) ** 2
        ratio = posterior_variance[i] / sampler_variance
        expected.append(0.5 * (ratio - 1.0 - math.log(ratio)) / math.log(2.0))
    assert max(expected) > 0.05
    np.testing.assert_allclose(out["per_step_bpd"].numpy()[1:], expected, rtol=1e-9,
                               atol=1e-14)


# -- Gaussian data with the optimal denoiser ---------------------------------------------------

MEAN, STD = np.array([0.3, -0.5]), np.array([0.5, 1.2])


def optimal_eps(diffusion):
    """``eps*(x_t) = sqrt(1 - abar) (x_t - sqrt(abar) m) / (abar s^2 + 1 - abar)``: the exact
    conditional mean of the noise for data ``N(m, diag(s^2))``."""
    def fn(x, t):
        abar = diffusion.abar(t, x)
        return (tf.sqrt(1.0 - abar) * (x - tf.sqrt(abar) * MEAN)
                / (abar * STD**2 + 1.0 - abar))
    return fn


def expected_gaussian_bound_nats_per_dim(diffusion, kept):
    """``E[bound]`` in nats/dim for data ``N(m, s^2)`` and the optimal denoiser, exactly.

    ``x0_hat`` is the posterior mean ``E[x0 | x_t]``, so ``E[(x0 - x0_hat)^2]`` is the
    posterior variance ``s^2 (1 - a) / (a s^2 + 1 - a)``. Each KL term is then
    ``0.5 (v_q/v_p - 1 + log(v_p/v_q)) + 0.5 c1^2 E[(x0 - x0_hat)^2] / v_p``, the
    continuous decoder ``0.5 log(2 pi v) + E[(x0 - x0_hat)^2] / (2 v)`` and the prior
    ``0.5 (a (m^2 + s^2) - a - log(1 - a))``.
    """
    abar, beta, posterior_variance = chain_tables(diffusion, kept)
    abar_prev = np.append(1.0, abar[:-1])
    c1 = beta * np.sqrt(abar_prev) / (1.0 - abar)

    def x0_error(a):
        return STD**2 * (1.0 - a) / (a * STD**2 + 1.0 - a)

    a_last = abar[-1]
    total = np.sum(0.5 * (a_last * (MEAN**2 + STD**2) - a_last - np.log(1.0 - a_last)))
    decoder_variance = posterior_variance[1]
    total += np.sum(0.5 * np.log(2 * np.pi * decoder_variance)
                    + x0_error(abar[0]) / (2 * decoder_variance))
    for i in range(1, len(kept)):
        v_q = posterior_variance[i]
        v_p = v_q if diffusion.variance_type == "fixed_small" else beta[i]
        total += np.sum(0.5 * (v_q / v_p - 1.0 + np.log(v_p / v_q))
                        + 0.5 * c1[i] ** 2 * x0_error(abar[i]) / v_p)
    return total / MEAN.size


GAUSSIAN_ENTROPY = float(np.mean(0.5 * np.log(2 * np.pi * np.e * STD**2)))  # E[-log p] per dim


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_gaussian_bound_matches_its_expectation_and_bounds_the_exact_nll(variance_type):
    diffusion = GaussianDiffusion("cosine", 200, prediction_type="eps",
                                  variance_type=variance_type)
    x0 = MEAN + STD * np.random.default_rng(0).standard_normal((4096, 2))
    bound = likelihood.make_variational_bound(optimal_eps(diffusion), diffusion,
                                              discrete=False)
    out = bound(tf.constant(x0), 7)
    nats = out["nats_per_dim"].numpy()
    mean, error = nats.mean(), nats.std(ddof=1) / math.sqrt(len(nats))
    expected = expected_gaussian_bound_nats_per_dim(diffusion, np.arange(200))
    assert abs(mean - expected) < 4 * error, (mean, expected, error)
    # The exact NLL of the data distribution is E[-log N(x; m, s^2)], its entropy; the bound
    # is above it, and with 200 steps within a fraction of a nat per dimension (the gap
    # of the fixed variances at the smallest t does not vanish as T grows).
    assert expected > GAUSSIAN_ENTROPY
    assert mean > GAUSSIAN_ENTROPY - 4 * error
    assert mean - GAUSSIAN_ENTROPY < (0.8 if variance_type == "fixed_small" else 0.2)
    np.testing.assert_allclose(out["bits_per_dim"].numpy(), nats / math.log(2.0), rtol=1e-12)
    per_step = out["per_step_bpd"].numpy()
    np.testing.assert_allclose(per_step.sum() + out["prior_bpd"].numpy().mean(),
                               out["bits_per_dim"].numpy().mean(), rtol=1e-10)


def test_gaussian_bound_grows_as_the_chain_is_respaced_to_fewer_steps():
    diffusion = GaussianDiffusion("cosine", 200, prediction_type="eps")
    x0 = tf.constant(MEAN + STD * np.random.default_rng(1).standard_normal((2048, 2)))
    means = {}
    for num_steps in (200, 40, 10):
        kept = schedules.respaced_timesteps(200, num_steps, "linspace").numpy()
        out = likelihood.variational_bound(optimal_eps(diffusion), diffusion, x0, seed=2,
                                           timesteps=kept, discrete=False)
        nats = out["nats_per_dim"].numpy()
        means[num_steps] = nats.mean()
        expected = expected_gaussian_bound_nats_per_dim(diffusion, kept)
        assert abs(nats.mean() - expected) < 4 * nats.std(ddof=1) / math.sqrt(len(nats))
    assert means[200] < means[40] < means[10]
    assert means[10] > means[200] + 10.0


def test_respaced_bound_with_every_timestep_equals_the_full_chain():
    """The full chain reads GaussianDiffusion's tables, the respaced path builds its own from
    posterior_coefficients: with all T steps kept they are the same bound, draw for draw."""
    for variance_type in ("fixed_small", "fixed_large"):
        diffusion = GaussianDiffusion("cosine", 50, prediction_type="eps",
                                      variance_type=variance_type)
        x0 = tf.constant(MEAN + STD * np.random.default_rng(2).standard_normal((64, 2)))
        full = likelihood.variational_bound(optimal_eps(diffusion), diffusion, x0, seed=5,
                                            discrete=False)
        every = likelihood.variational_bound(optimal_eps(diffusion), diffusion, x0, seed=5,
                                             timesteps=np.arange(50), discrete=False)
        for key in ("bits_per_dim", "prior_bpd", "decoder_bpd", "kl_bpd", "per_step_bpd"):
            np.testing.assert_allclose(every[key].numpy(), full[key].numpy(), rtol=1e-9,
                                       err_msg=f"{variance_type} {key}")


def test_seeds_make_the_draws_reproducible():
    diffusion = GaussianDiffusion("cosine", 30, prediction_type="eps")
    x0 = tf.constant(MEAN + STD * np.random.default_rng(3).standard_normal((16, 2)))
    bound = likelihood.make_variational_bound(optimal_eps(diffusion), diffusion,
                                              discrete=False)
    first, again = bound(x0, 11)["bits_per_dim"].numpy(), bound(x0, 11)["bits_per_dim"].numpy()
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(bound(x0, tf.constant([11, 0]))["bits_per_dim"].numpy(),
                                  first)  # an integer seed s is the pair (s, 0)
    assert not np.allclose(bound(x0, tf.constant([11, 1]))["bits_per_dim"].numpy(), first)


def test_bound_in_batches_seeds_batch_b_with_the_pair_seed_b():
    """Ten examples in batches of 4: batches 0, 1, 2 of sizes 4, 4, 2, in order, and each
    batch's values are the bound's on that batch with the seed pair (seed, b)."""
    diffusion = GaussianDiffusion("cosine", 30, prediction_type="eps")
    x0 = (MEAN + STD * np.random.default_rng(4).standard_normal((10, 2))).astype(np.float32)
    bound = likelihood.make_variational_bound(optimal_eps(diffusion), diffusion,
                                              discrete=False)
    assert [(b, len(batch)) for b, batch in likelihood.example_batches(x0, 4)] == [
        (0, 4), (1, 4), (2, 2)]
    batches = list(likelihood.bound_in_batches(bound, x0, 4, seed=7))
    np.testing.assert_array_equal(np.concatenate([batch for _, batch, _ in batches]), x0)
    for b, batch, out in batches:
        direct = bound(tf.constant(batch), tf.constant([7, b], tf.int64))["bits_per_dim"]
        np.testing.assert_allclose(out["bits_per_dim"].numpy(), direct.numpy(), rtol=1e-6)


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"timesteps": [0]}, ["at least 2"]),
    ({"timesteps": [3, 1, 5]}, ["increasing"]),
    ({"timesteps": [0, 5, 30]}, ["[0, 29]"]),
    ({"timesteps": [0.0, 1.5]}, ["integers"]),
    ({"clip_x0": True, "discrete": False}, ["clip_x0", "continuous"]),
])
def test_bad_arguments_raise_value_errors_naming_the_problem(kwargs, words):
    diffusion = GaussianDiffusion("cosine", 30)
    with pytest.raises(ValueError) as info:
        likelihood.make_variational_bound(optimal_eps(diffusion), diffusion, **kwargs)
    for word in words:
        assert word in str(info.value)


# -- tfngd-eval ----------------------------------------------------------------------------------


def tiny_run(run_dir, **overrides) -> str:
    """A run directory as ``tfngd-train`` writes it (config.json, run.json, a checkpoint),
    made with the same functions but without the cost of ``model.fit``: the weights are
    the initial ones, perturbed so that the denoiser's output is not identically zero."""
    options = {"dataset": "digits", "num_train": 64, "base_channels": 8, "groups": 4,
               "channel_mults": (1,), "attention_resolutions": (), "num_timesteps": 20,
               "sample_steps": 3, "optimizer": "adam", "hidden_units": 16, "num_blocks": 1}
    config = TrainConfig(**{**options, **overrides}).validate()
    splits = train_cli.prepare(config, str(run_dir))
    runs.write_run_metadata(str(run_dir), config, splits.data_shape, splits.num_classes)
    model = build_model(config, splits.data_shape, splits.num_classes)
    model.compile(optimizer=build_optimizer(config))
    model.optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    model.ema_denoiser.set_weights([w + 0.05 * rng.standard_normal(w.shape).astype(w.dtype)
                                    for w in model.ema_denoiser.get_weights()])
    checkpointing.save_checkpoint(model, runs.checkpoint_dir(str(run_dir)), epoch=0)
    return str(run_dir)


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("likelihood") / "digits")


def test_eval_cli_end_to_end_on_a_tiny_image_run(image_run, tmp_path, capsys):
    output = tmp_path / "bound.json"
    assert evaluate_cli.main(["--run-dir", image_run, "--num-examples", "10", "--batch-size",
                              "4", "--seed", "3", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "bits/dim:" in printed and "95% CI" in printed and "x0 clipped" in printed
    results = json.loads(output.read_text())
    assert results["clip_x0"] is True and results["chain"] == "full"
    assert results["num_steps"] == results["network_evaluations_per_example"] == 20
    per_example = np.array(results["per_example_bits_per_dim"])
    assert per_example.shape == (10,) and np.all(np.isfinite(per_example)) and np.all(
        per_example > 0)
    summary = results["bits_per_dim"]
    assert summary["ci95_low"] < summary["mean"] < summary["ci95_high"]
    np.testing.assert_allclose(summary["mean"], per_example.mean(), rtol=1e-12)
    np.testing.assert_allclose(
        sum(results["per_step_bpd"]) + results["prior_bpd"]["mean"], summary["mean"],
        rtol=1e-5)

    # The same numbers from the library on the same examples and draws (batch 2 = seed (3, 2)).
    config, model, _ = runs.load_trained_model(image_run)
    examples = evaluate_cli.load_examples(config, "eval", 10)
    direct = likelihood.variational_bound(
        samplers.denoiser_fn(model.ema_denoiser), model.diffusion,
        tf.constant(examples[8:10]), tf.constant([3, 2], tf.int64))
    np.testing.assert_allclose(per_example[8:], direct["bits_per_dim"].numpy(), rtol=1e-5)


def test_eval_cli_respaced_and_unclipped(image_run, tmp_path, capsys):
    output = tmp_path / "respaced.json"
    assert evaluate_cli.main(["--run-dir", image_run, "--num-examples", "6", "--steps", "5",
                              "--no-clip-x0", "--verbose", "0", "--output", str(output)]) == 0
    assert "x0 not clipped" in capsys.readouterr().out
    results = json.loads(output.read_text())
    assert results["clip_x0"] is False and results["chain"] == "respaced"
    assert results["timesteps"] == [0, 5, 10, 14, 19]  # linspace keeps t = 0 and T - 1
    assert len(results["per_step_bpd"]) == 5 and math.isfinite(results["bits_per_dim"]["mean"])


def test_eval_cli_on_a_vector_run_reports_nats(tmp_path, capsys):
    run_dir = tiny_run(tmp_path / "toy", dataset="checkerboard", num_train=256)
    output = tmp_path / "toy.json"
    assert evaluate_cli.main(["--run-dir", run_dir, "--num-examples", "8", "--verbose", "0",
                              "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "nats/dim:" in printed and "continuous" in printed
    results = json.loads(output.read_text())
    assert results["clip_x0"] is False  # vectors are unbounded: never clipped
    np.testing.assert_allclose(results["nats_per_dim"]["mean"],
                               results["bits_per_dim"]["mean"] * math.log(2.0), rtol=1e-6)


@pytest.mark.parametrize(("argv", "words"), [
    (["--num-examples", "0"], ["--num-examples", ">= 1"]),
    (["--batch-size", "-1"], ["--batch-size", ">= 1"]),
    (["--steps", "1"], ["--steps", ">= 2"]),
    (["--steps", "21"], ["--steps", "<= 20"]),
    (["--num-examples", "5000"], ["5000", "297", "eval"]),
])
def test_eval_cli_bad_numbers_fail_with_one_line(image_run, capsys, argv, words):
    assert evaluate_cli.main(["--run-dir", image_run, "--verbose", "0", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("tfngd-eval: error:")
    for word in words:
        assert word in err


def test_eval_cli_missing_or_foreign_run_dir(tmp_path, capsys):
    assert evaluate_cli.main(["--run-dir", str(tmp_path / "nowhere")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert evaluate_cli.main(["--run-dir", str(tmp_path)]) == 2
    assert "not a training run directory" in capsys.readouterr().err
