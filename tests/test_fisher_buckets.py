"""The diffusion-aware K-FAC Fisher: noise-level buckets and the loss weighting (issue 8).

References are built here with numpy from the network's weights and activations
(per-example Jacobians of a tiny Dense network, dense Kronecker products and dense
solves), not with the code under test.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfngd.config import ConfigError, TrainConfig, build_model, build_optimizer
from tfngd.gaussian_diffusion import GaussianDiffusion
from tfngd.model import DiffusionModel
from tfngd.networks import build_mlp_denoiser
from tfngd.optimizers import KFAC, NaturalGradientModel
from tfngd.optimizers.bucketed_fisher import (
    OBJECTIVE_TERMS,
    timestep_buckets,
)
from tfngd.optimizers.training import ForwardPass, gradients_and_curvature

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

D_IN, HIDDEN, D_OUT, N = 3, 4, 2, 10
BUCKETS = np.array([0, 1, 2, 0, 1, 0, 2, 2, 1, 0], np.int32)


def tiny_network(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((D_IN,))
    hidden = keras.layers.Dense(HIDDEN, activation="tanh", name="hidden")(inputs)
    return keras.Model(inputs, keras.layers.Dense(D_OUT, name="out")(hidden))


def data(seed=1):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(N, D_IN)).astype("float32"),
            rng.normal(size=(N, D_OUT)).astype("float32"))


def bucketed_kfac(buckets=3, **kwargs):
    optimizer = KFAC(fisher="exact", fisher_buckets=buckets, **kwargs)
    optimizer.bucketed_train_step = True  # a custom loop that feeds buckets (below)
    return optimizer


def forward_pass(network, x, y):
    """``L = mean_n 1/D ||y_n - f_n||^2`` with its per-example terms."""
    outputs = network(x, training=True)
    terms = tf.reduce_mean(tf.square(y - outputs), axis=-1)
    return ForwardPass(tf.reduce_mean(terms), outputs, "gaussian", 1.0 / D_OUT,
                       {OBJECTIVE_TERMS: terms})


def reference_factors(network, x, examples):
    """Per layer, numpy ``A`` (``[a, 1]`` second moment) and exact ``G`` over ``examples``:
    the output layer's pre-activation gradient of probe ``sqrt(2 s) e_d`` is that
    vector, the hidden layer's ``diag(1 - h^2) W2 sqrt(2 s) e_d`` (``s = 1 / D``)."""
    kernel1, bias1, kernel2, _ = (w.numpy().astype(np.float64) for w in network.weights)
    x = x[examples].astype(np.float64)
    h = np.tanh(x @ kernel1 + bias1)
    scale = 2.0 / D_OUT
    a1 = np.concatenate([x, np.ones((len(x), 1))], 1)
    a2 = np.concatenate([h, np.ones((len(x), 1))], 1)
    jacobians = (1.0 - h**2)[:, :, None] * kernel2[None]  # [n, hidden, out]
    g1 = scale * np.einsum("nho,nko->hk", jacobians, jacobians) / len(x)
    g2 = scale * np.eye(D_OUT)
    return [(a1.T @ a1 / len(x), g1), (a2.T @ a2 / len(x), g2)]


def test_timestep_buckets_are_equal_width_bins_of_t():
    t = tf.constant([0, 249, 250, 500, 749, 750, 999])
    np.testing.assert_array_equal(timestep_buckets(t, 1000, 4), [0, 0, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(timestep_buckets(t, 1000, 1), np.zeros(7))
    with pytest.raises(ValueError, match="fisher_buckets"):
        timestep_buckets(t, 1000, 0)


def test_each_buckets_factors_are_kfac_on_its_examples_alone():
    network = tiny_network()
    x, y = data()
    optimizer = bucketed_kfac(statistics_examples=None).register(network)
    optimizer.build(network.trainable_variables)
    pooled = KFAC(fisher="exact").register(network)
    pooled.build(network.trainable_variables)
    with tf.GradientTape(persistent=True) as tape:
        with optimizer.capture() as captured:
            result = forward_pass(network, x, y)
    statistics, present = optimizer.bucket_statistics(tape, captured, result.outputs, BUCKETS,
                                                      per_example_scale=1.0 / D_OUT)
    assert [bool(p) for p in present] == [True, True, True]
    for bucket in range(3):
        examples = np.flatnonzero(BUCKETS == bucket)
        reference = reference_factors(network, x, examples)
        with tf.GradientTape(persistent=True) as alone_tape:
            with pooled.capture() as alone_captured:
                alone = forward_pass(network, x[examples], y[examples])
        alone_statistics = pooled.batch_statistics(alone_tape, alone_captured, alone.outputs)
        for layer, (a_ref, g_ref) in enumerate(reference):
            a, g, positions = (s.numpy() for s in statistics[bucket][layer])
            np.testing.assert_allclose(a, a_ref, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-7)
            assert positions == 1.0
            for got, want in zip(statistics[bucket][layer], alone_statistics[layer],
                                 strict=True):
                np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-7)


def test_an_empty_bucket_is_absent_and_keeps_its_statistics():
    network = tiny_network()
    x, y = data()
    optimizer = bucketed_kfac(buckets=4).register(network)
    optimizer.build(network.trainable_variables)
    with tf.GradientTape(persistent=True) as tape:
        with optimizer.capture() as captured:
            result = forward_pass(network, x, y)
    _, present = optimizer.bucket_statistics(tape, captured, result.outputs, BUCKETS)
    assert [bool(p) for p in present] == [True, True, True, False]
    optimizer.update_curvature(tape, captured, result.outputs, example_buckets=BUCKETS)
    last = optimizer._require_registration().bucket_blocks[3]
    assert all(np.all(v.numpy() == 0) for b in last for v in (b.a_factor, b.g_factor))
    assert float(optimizer._statistics_weights[3].numpy()) == 0.0
    assert float(optimizer._statistics_weights[0].numpy()) > 0.0


def test_the_update_is_the_sum_of_dense_solves_of_the_bucket_gradients():
    damping = 1e-2
    network = tiny_network()
    x, y = data()
    optimizer = bucketed_kfac(learning_rate=1.0, damping=damping, damping_mode="eigen",
                              statistics_decay=0.0, kl_clip=None, momentum=0.0)
    optimizer.register(network)
    variables = network.trainable_variables
    before = [v.numpy().astype(np.float64) for v in variables]
    # Reference gradients of each bucket's share 1/N sum_{n in b} l_n (plain tapes).
    shares = []
    for bucket in range(3):
        with tf.GradientTape() as tape:
            terms = tf.reduce_mean(tf.square(y - network(x, training=True)), axis=-1)
            share = tf.reduce_sum(terms * (BUCKETS == bucket)) / N
        shares.append([g.numpy().astype(np.float64) for g in tape.gradient(share, variables)])
    factors = [reference_factors(network, x, np.flatnonzero(BUCKETS == b)) for b in range(3)]

    gradients, _ = gradients_and_curvature(
        optimizer, variables, lambda: forward_pass(network, x, y),
        example_buckets=tf.constant(BUCKETS))
    optimizer.apply(gradients, variables)

    for layer in range(2):
        kernel, bias = 2 * layer, 2 * layer + 1
        expected = 0.0
        for bucket in range(3):
            a, g = factors[bucket][layer]
            gradient = np.concatenate([shares[bucket][kernel], shares[bucket][bias][None]], 0)
            fisher = np.kron(a, g)  # row-major vec of [kernel; bias]
            solve = np.linalg.solve(fisher + damping * np.eye(len(fisher)), gradient.ravel())
            expected = expected + solve.reshape(gradient.shape)
        step = np.concatenate([before[kernel] - variables[kernel].numpy(),
                               (before[bias] - variables[bias].numpy())[None]], 0)
        np.testing.assert_allclose(step, expected, rtol=2e-3, atol=1e-5)
    # The pooled update of the output layer differs: the buckets matter here.
    a, g = reference_factors(network, x, np.arange(N))[1]
    total = np.concatenate([sum(s[2] for s in shares), sum(s[3] for s in shares)[None]], 0)
    pooled = np.linalg.solve(np.kron(a, g) + damping * np.eye(len(a) * len(g)),
                             total.ravel()).reshape(total.shape)
    assert not np.allclose(pooled, expected, rtol=1e-2)  # expected: the output layer's


def one_bucketed_step(jit: bool) -> list:
    """The weights after one bucketed K-FAC step inside a tf.function (XLA or not)."""
    x, y = data()
    network = tiny_network()
    optimizer = bucketed_kfac(learning_rate=1.0, damping=1e-2, statistics_decay=0.0)
    optimizer.register(network)
    variables = network.trainable_variables

    @tf.function
    def step():
        gradients, _ = gradients_and_curvature(
            optimizer, variables, lambda: forward_pass(network, x, y), jit_compile=jit,
            example_buckets=tf.constant(BUCKETS))
        optimizer.apply(gradients, variables)

    step()
    return [v.numpy() for v in variables]


def test_the_xla_compiled_bucketed_step_equals_the_graph_step():
    for graph, xla in zip(one_bucketed_step(False), one_bucketed_step(True), strict=True):
        np.testing.assert_allclose(xla, graph, rtol=1e-4, atol=1e-6)


def test_example_buckets_need_a_bucketed_kfac():
    network = tiny_network()
    x, y = data()
    for optimizer in (KFAC(fisher="exact"), keras.optimizers.SGD()):
        with pytest.raises(ValueError, match="fisher_buckets > 1"):
            gradients_and_curvature(optimizer, network.trainable_variables,
                                    lambda: forward_pass(network, x, y),
                                    example_buckets=tf.constant(BUCKETS))


def diffusion_model(buckets=None, weighting="loss", gamma=None, fisher="mc", **kfac_kwargs):
    """A tiny 2-D DiffusionModel with K-FAC (``buckets=None``: the argument left out)."""
    if buckets is not None:
        kfac_kwargs["fisher_buckets"] = buckets
    keras.utils.set_random_seed(0)
    model = DiffusionModel(build_mlp_denoiser(2, hidden_units=8, num_blocks=1),
                           GaussianDiffusion("cosine", 40, min_snr_gamma=gamma),
                           fisher_weighting=weighting, ema_decay=0.9)
    model.compile(optimizer=KFAC(learning_rate=0.1, inverse_every=2, fisher=fisher,
                                 **kfac_kwargs))
    return model


def ring(n=96, seed=3):
    angles = np.random.default_rng(seed).uniform(0, 2 * np.pi, size=n)
    return np.stack([np.cos(angles), np.sin(angles)], 1).astype("float32")


def denoiser_statistics(model, t):
    """This batch's K-FAC statistics of every block at timesteps ``t`` (the model's
    optimizer's Fisher; noise: ``ring_noise``)."""
    optimizer = model.optimizer
    optimizer.build(model.denoiser.trainable_variables)
    x0 = ring(len(t))
    noise = ring_noise(len(t))
    with tf.GradientTape(persistent=True) as tape:
        with optimizer.capture() as captured:
            result = model.denoising_loss(model.denoiser, x0, tf.constant(t), noise, None,
                                          tf.ones([len(t)]), training=True)
    statistics = optimizer.batch_statistics(tape, captured, result.outputs, "gaussian",
                                            result.per_example_scale, result.loss)
    return [[s.numpy() for s in stats] for stats in statistics], result


def ring_noise(n):
    return np.random.default_rng(4).normal(size=(n, 2)).astype("float32")


def test_empirical_fisher_type_folds_the_outer_products_of_the_denoising_residuals():
    t = np.array([0, 3, 9, 17, 25, 33, 39, 12], np.int32)
    statistics, result = denoiser_statistics(diffusion_model(fisher="empirical"), t)
    # eps prediction, l_n = mean_d (f_n - eps_n)^2 with D = 2: the per-example gradient at
    # the output layer's pre-activation (the network output) is N dL/df_n = (f_n - eps_n),
    # and its G is the mean of their outer products (the MC / exact Fisher's is I).
    residuals = result.outputs.numpy() - ring_noise(len(t))
    expected = residuals.T @ residuals / len(t)
    np.testing.assert_allclose(statistics[-1][1], expected, rtol=1e-5, atol=1e-7)
    assert np.abs(expected - np.eye(2)).max() > 0.1  # not the Fisher's G by accident
    exact, _ = denoiser_statistics(diffusion_model(fisher="exact"), t)
    for (a_empirical, *_), (a_exact, *_) in zip(statistics, exact, strict=True):
        np.testing.assert_array_equal(a_empirical, a_exact)  # the inputs are the same


def test_unweighted_fisher_divides_the_output_layers_g_by_the_mean_min_snr_weight():
    t = np.array([0, 3, 9, 17, 25, 33, 39, 12], np.int32)
    weighted, result = denoiser_statistics(diffusion_model(gamma=5.0, fisher="exact"), t)
    unweighted, _ = denoiser_statistics(
        diffusion_model(gamma=5.0, weighting="unweighted", fisher="exact"), t)
    snr_weights = GaussianDiffusion("cosine", 40, min_snr_gamma=5.0).loss_weights(
        tf.constant(t)).numpy()
    assert np.ptp(snr_weights) > 0.1  # the weights differ between the timesteps
    # Output layer (last block): G = 2 mean_n s_n I, s_n = w_snr(t_n) / D resp. 1 / D.
    g_weighted, g_unweighted = weighted[-1][1], unweighted[-1][1]
    np.testing.assert_allclose(g_unweighted, np.eye(2), rtol=1e-6, atol=1e-7)  # 2 (1/2) I
    np.testing.assert_allclose(g_weighted, np.mean(snr_weights) * g_unweighted, rtol=1e-5)
    for (a_w, *_), (a_u, *_) in zip(weighted, unweighted, strict=True):
        np.testing.assert_array_equal(a_w, a_u)  # inputs do not depend on the weights
    # The gradient is that of the weighted loss in both (the loss is unchanged).
    np.testing.assert_allclose(result.loss.numpy(), np.mean(result.extras["per_example"]))


def test_with_uniform_weights_both_fisher_weightings_give_identical_factors():
    t = np.array([0, 3, 9, 17, 25, 33, 39, 12], np.int32)
    weighted, _ = denoiser_statistics(diffusion_model(fisher="exact"), t)
    unweighted, _ = denoiser_statistics(diffusion_model(weighting="unweighted",
                                                        fisher="exact"), t)
    for a, b in zip(weighted, unweighted, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)


def test_one_bucket_is_bit_identical_to_the_default_optimizer():
    """(Against the code before buckets existed this was checked once by hand: the
    weights and optimizer variables after this run were bit-identical.)"""
    runs = []
    for buckets in (None, 1):
        model = diffusion_model(buckets)
        model.fit(ring(), batch_size=32, epochs=2, shuffle=False, verbose=0)
        runs.append([v.numpy() for v in [*model.weights, *model.optimizer.variables]])
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_bucketed_fisher_trains_through_fit_and_resumes_bit_identically(tmp_path):
    tf.config.experimental.enable_op_determinism()
    x0 = ring(96)
    straight = diffusion_model(buckets=2, gamma=5.0)
    straight.fit(x0, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert int(straight.optimizer.skipped_updates.numpy()) == 0
    names = [v.name for v in straight.optimizer.variables]
    assert any("bucket1" in name for name in names)

    first = diffusion_model(buckets=2, gamma=5.0)
    first.fit(x0[:48], batch_size=16, epochs=1, shuffle=False, verbose=0)
    path = str(tmp_path / "bucketed.weights.h5")
    first.save_weights(path)
    keras.utils.set_random_seed(7)
    resumed = DiffusionModel(build_mlp_denoiser(2, hidden_units=8, num_blocks=1),
                             GaussianDiffusion("cosine", 40, min_snr_gamma=5.0), ema_decay=0.9)
    resumed.compile(optimizer=KFAC(learning_rate=0.1, inverse_every=2, fisher_buckets=2))
    resumed.optimizer.build(resumed.denoiser.trainable_variables)
    resumed.load_weights(path)
    assert int(resumed.optimizer.iterations.numpy()) == 3
    resumed.fit(x0[48:], batch_size=16, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(straight.weights, resumed.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)
    for a, b in zip(straight.optimizer.variables, resumed.optimizer.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)


def test_unsupported_configurations_fail_clearly():
    for value in (0, 1.5, True):
        with pytest.raises(ValueError, match="fisher_buckets"):
            KFAC(fisher_buckets=value)
    with pytest.raises(ValueError, match="per_example"):
        KFAC(fisher_buckets=2, approximation="per_example")
    with pytest.raises(ValueError, match="EKFAC"):
        KFAC(fisher_buckets=2, damping_mode="eigen", eigenvalue_correction=True)
    with pytest.raises(ValueError, match="clipvalue"):
        KFAC(fisher_buckets=2, clipvalue=1.0)
    with pytest.raises(ValueError, match="fisher_weighting"):
        DiffusionModel(build_mlp_denoiser(2, hidden_units=8, num_blocks=1),
                       GaussianDiffusion("cosine", 40), fisher_weighting="snr")
    inputs = keras.Input((3,))
    plain = NaturalGradientModel(inputs, keras.layers.Dense(2)(inputs))
    plain.compile(optimizer=KFAC(fisher_buckets=2), loss="mse")
    with pytest.raises(ValueError, match="NaturalGradientModel"):
        plain.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0)


def test_config_options_build_and_validate():
    base = TrainConfig(dataset="checkerboard", hidden_units=8, num_blocks=1, num_timesteps=50,
                       epochs=1, steps_per_epoch=5, warmup_steps=1)
    config = dataclasses.replace(base, fisher_buckets=4, fisher_weighting="unweighted",
                                 min_snr_gamma=5.0).validate()
    assert build_optimizer(config).fisher_buckets == 4
    assert build_model(config, (2,)).fisher_weighting == "unweighted"
    assert build_optimizer(base.validate()).fisher == "mc"
    for optimizer in ("kfac", "ekfac"):
        empirical = dataclasses.replace(base, optimizer=optimizer, fisher_type="empirical")
        assert build_optimizer(empirical.validate()).fisher == "empirical"
    for changes, message in (({"fisher_buckets": 0}, "fisher_buckets"),
                             ({"fisher_buckets": 2, "optimizer": "adam"}, "optimizer 'kfac'"),
                             ({"fisher_buckets": 2, "optimizer": "ekfac"}, "optimizer 'kfac'"),
                             ({"fisher_buckets": 2, "model": "ndm", "prediction_type": "x0"},
                              "model 'ddpm'"),
                             ({"fisher_buckets": 2, "strategy": "mirrored"}, "one device"),
                             ({"fisher_weighting": "snr"}, "fisher_weighting"),
                             ({"fisher_weighting": "unweighted", "optimizer": "adam"},
                              "fisher_weighting"),
                             ({"fisher_type": "exact"}, "fisher_type"),
                             ({"fisher_type": "empirical", "optimizer": "dual"},
                              "optimizer 'kfac' or 'ekfac'"),
                             ({"fisher_type": "empirical", "fisher_weighting": "unweighted"},
                              "fisher_type='empirical' has none")):
        with pytest.raises(ConfigError, match=message):
            dataclasses.replace(base, **changes).validate()
