"""``SampleSpaceNGD`` against dense references and closed forms.

The reference of every metric is built here from its definition (docs/ngd-variants.md),
in float64 numpy, from the exact Jacobian ``J = df/dtheta`` of a tiny network (one
``tape.jacobian`` of its outputs, independent of the optimizer's sample-space map):
``phi = (G + lambda I)^{-1} (g + lambda mu phi_prev)`` by a dense solve in parameter
space, where the optimizer works in the sample space (Cholesky or conjugate gradients).
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfngd import checkpointing
from tfngd import data as data_lib
from tfngd.config import ConfigError, TrainConfig, build_model, build_optimizer
from tfngd.optimizers import NaturalGradientModel, SampleSpaceNGD, gradients_and_curvature
from tfngd.optimizers.sample_space import (
    KERNEL_JITTER,
    METRICS,
    conjugate_gradient,
    median_bandwidth,
)
from tfngd.optimizers.training import ForwardPass

N, D_IN, D_OUT = 6, 3, 2


def _network(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((D_IN,)), keras.layers.Dense(5, activation="tanh"),
                             keras.layers.Dense(D_OUT)])


def _batch(seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D_IN)).astype(np.float32)
    y = rng.normal(size=(N, D_OUT)).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, size=N).astype(np.float32) / D_OUT  # s_n
    return x, y, scale


def _direction(optimizer, model, x, y, scale):
    """The optimizer's direction for ``L = 1/N sum_n s_n ||y_n - f_n||^2``."""
    variables = model.trainable_variables

    def forward():
        f = model(x)
        loss = tf.reduce_mean(scale * tf.reduce_sum(tf.square(y - f), axis=1))
        return ForwardPass(loss, f, "gaussian", per_example_scale=scale)

    directions, _ = gradients_and_curvature(optimizer, variables, forward)
    return np.concatenate([d.numpy().ravel() for d in directions])


def _exact_quantities(model, x, y, scale):
    """Float64 ``J`` ``[N, D, n]``, ``f``, ``e = dL/df``, ``g``, per-example ``grad l_n``."""
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        f = model(x)
        per_example = scale * tf.reduce_sum(tf.square(y - f), axis=1)
    jac = tape.jacobian(f, variables, experimental_use_pfor=False)
    J = np.concatenate([j.numpy().reshape(N, D_OUT, -1) for j in jac], axis=2)
    per_grads = tape.jacobian(per_example, variables, experimental_use_pfor=False)
    G_n = np.concatenate([j.numpy().reshape(N, -1) for j in per_grads], axis=1)
    f = f.numpy().astype(np.float64)
    e = 2.0 * scale[:, None] * (f - y) / N
    return J.astype(np.float64), f, e, G_n.mean(axis=0).astype(np.float64), G_n.astype(
        np.float64)


def _rbf(a, b, sigma):
    d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    return np.exp(-d2 / (2 * sigma**2))


def _jitter(K):
    return K + KERNEL_JITTER * np.mean(np.diag(K)) * np.eye(len(K))


def _reference_metric(metric, J, f, scale, G_n, sigma, points):
    """``G`` of each metric, from its definition."""
    h2 = (2.0 * scale / N)[:, None] * np.ones((N, D_OUT))  # Gauss-Newton output weights
    if metric == "gauss_newton":
        return np.einsum("nd,ndi,ndj->ij", h2, J, J)
    if metric == "empirical":
        return G_n.T @ G_n / N
    if metric == "stein":
        K = _jitter(_rbf(f, f, sigma))
        hJ = np.sqrt(h2)[:, :, None] * J  # particle velocities, whitened: [N, D, n]
        return np.einsum("ndi,nm,mdj->ij", hJ, np.linalg.inv(K), hJ)
    centres = f[:points]
    w = 2.0 * scale / N
    k = _rbf(f, centres, sigma)  # [N, M]
    grad_k = -(f[:, None, :] - centres[None, :, :]) / sigma**2 * k[:, :, None]  # [N, M, D]
    T = np.einsum("n,nmd,ndi->mi", w, grad_k, J)
    Kw = _jitter(np.einsum("n,nid,njd->ij", w, grad_k, grad_k))
    return T.T @ np.linalg.solve(Kw, T)


@pytest.mark.parametrize("solver", ["direct", "cg"])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("momentum", [0.0, 0.6])
def test_the_direction_is_the_damped_natural_gradient_of_the_metric(metric, solver, momentum):
    x, y, scale = _batch()
    model = _network()
    sigma, points, damping = 0.7, 4, 1e-2
    optimizer = SampleSpaceNGD(learning_rate=0.1, metric=metric, solver=solver,
                               damping=damping, momentum=momentum, cg_iterations=200,
                               cg_tolerance=1e-7, kernel_bandwidth=sigma, kernel_points=points)
    optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(3)
    previous = [rng.normal(size=v.shape).astype(np.float32) for v in model.trainable_variables]
    if momentum:
        for slot, value in zip(optimizer._previous_directions, previous, strict=True):
            slot.assign(value)
    got = _direction(optimizer, model, x, y, scale)

    J, f, _, g, G_n = _exact_quantities(model, x, y, scale)
    G = _reference_metric(metric, J, f, scale, G_n, sigma, points)
    phi_prev = np.concatenate([p.ravel() for p in previous]).astype(np.float64)
    want = np.linalg.solve(G + damping * np.eye(len(g)),
                           g + damping * momentum * phi_prev * (momentum > 0))
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_gauss_newton_step_is_the_minimum_norm_interpolating_step():
    """Linear model with more weights (n = 12) than residuals (m = N D = 6), the regime the
    sample-space form is for: with lambda -> 0 and eta = 1 the Gauss-Newton step is
    ``-pinv(J) (f - y)``, the smallest step after which the model interpolates the batch."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5)).astype(np.float32)
    y = rng.normal(size=(3, 2)).astype(np.float32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)])
    variables = model.trainable_variables
    start = [v.numpy() for v in variables]
    design = np.concatenate([x, np.ones((3, 1), np.float32)], axis=1).astype(np.float64)
    weights = np.concatenate([start[0], start[1][None]], axis=0).astype(np.float64)
    residual = design @ weights - y
    want = weights - np.linalg.pinv(design) @ residual  # min-norm change, per output
    for solver in ("direct", "cg"):
        optimizer = SampleSpaceNGD(learning_rate=1.0, solver=solver, damping=1e-6,
                                   cg_iterations=100, cg_tolerance=1e-7)

        def forward():
            f = model(x)
            return ForwardPass(tf.reduce_mean(tf.square(y - f)), f, "gaussian")

        directions, _ = gradients_and_curvature(optimizer, variables, forward)
        optimizer.apply(directions, variables)
        np.testing.assert_allclose(variables[0].numpy(), want[:5], atol=1e-4, err_msg=solver)
        np.testing.assert_allclose(variables[1].numpy(), want[5], atol=1e-4, err_msg=solver)
        np.testing.assert_allclose(model(x).numpy(), y, atol=1e-4, err_msg=solver)
        for v, value in zip(variables, start, strict=True):
            v.assign(value)


class _Shift(keras.layers.Layer):
    """``f_n = x_n + theta``: every particle moves by the same velocity ``u``."""

    def build(self, input_shape):
        self.theta = self.add_weight(shape=(input_shape[-1],), initializer="zeros")

    def call(self, x):
        return x + self.theta


def test_stein_metric_of_a_translation_is_its_closed_form():
    """A translation moves all particles alike: the smoothest RKHS field moving them is
    constant on them, of squared norm ``u^T u * 1^T K^{-1} 1`` (per unit weight), so
    ``G = (2 s / N) 1^T K^{-1} 1 I`` and ``phi = g / (G + lambda)``."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 2)).astype(np.float32)
    y = rng.normal(size=(12, 2)).astype(np.float32)
    inputs = keras.Input((2,))
    model = keras.Model(inputs, _Shift()(inputs))
    sigma, damping, s = 0.8, 1e-3, 0.5
    optimizer = SampleSpaceNGD(metric="stein", solver="direct", damping=damping,
                               kernel_bandwidth=sigma)
    got = _direction(optimizer, model, x, y, np.full(12, s, np.float32))
    K = _jitter(_rbf(x.astype(np.float64), x.astype(np.float64), sigma))
    metric = 2 * s / 12 * np.ones(12) @ np.linalg.solve(K, np.ones(12))
    g = 2 * s * (x - y).mean(axis=0)
    np.testing.assert_allclose(got, g / (metric + damping), rtol=1e-4)


class _LocationScale(keras.layers.Layer):
    """``y = mu + sigma x``: the 1-D Gaussian family ``N(mu, sigma^2)`` pushed from ``x``."""

    def build(self, input_shape):
        self.mu = self.add_weight(shape=(), initializer="zeros")
        self.sigma = self.add_weight(shape=(), initializer="ones")

    def call(self, x):
        return self.mu + self.sigma * x


def test_kernel_wasserstein_metric_of_gaussians_is_the_identity():
    """The Wasserstein-2 metric of ``N(mu, sigma^2)`` in ``(mu, sigma)`` is the identity
    (``W_2^2 = dmu^2 + dsigma^2``); on the 400 particles it is their L2 metric
    ``E[(u_mu + u_sigma x)^2]``, the sample moments ``[[1, mean x], [mean x, mean x^2]]``
    (every particle velocity is a gradient field). The kernel estimate restricts the
    potentials, so it is a lower bound, and with 30 Nystrom points a close one: within
    10%. (Two weights and ``M`` points: the ``M x M`` system is ``lambda K`` but for rank 2,
    so lambda cannot be tiny in float32.)"""
    x = np.sort(np.random.default_rng(0).normal(size=(400, 1)).astype(np.float32), axis=0)
    x = np.random.default_rng(1).permutation(x)
    inputs = keras.Input((1,))
    model = keras.Model(inputs, _LocationScale()(inputs))
    damping = 1e-2
    optimizer = SampleSpaceNGD(metric="wasserstein_kernel", solver="direct", damping=damping,
                               kernel_points=30)
    optimizer.build(model.trainable_variables)
    tape_outputs = {}
    for column in np.eye(2, dtype=np.float32):
        with tf.GradientTape(persistent=True) as tape:
            f = model(x)
            # weights w_n = 2 mean(s) / N = 1 / N: the empirical distribution of the outputs
            loss = tf.reduce_mean(0.5 * tf.square(f))
        gradients = [tf.constant(column[0]), tf.constant(column[1])]
        direction = optimizer.natural_gradient(tape, f, loss, gradients,
                                               model.trainable_variables,
                                               per_example_scale=0.5)
        tape_outputs[tuple(column)] = np.array([d.numpy() for d in direction])
    inverse = np.stack([tape_outputs[(1.0, 0.0)], tape_outputs[(0.0, 1.0)]], axis=1)
    estimate = np.linalg.inv(inverse.astype(np.float64)) - damping * np.eye(2)
    moments = np.array([[1.0, x.mean()], [x.mean(), (x**2).mean()]])
    assert np.linalg.eigvalsh(moments - estimate).min() > -1e-3
    assert np.linalg.eigvalsh(estimate - 0.9 * moments).min() > 0
    np.testing.assert_allclose(moments, np.eye(2), atol=0.2)  # close to the population


def test_the_kernel_wasserstein_metric_is_below_the_gauss_newton_metric():
    """Restricting the potentials can only lower ``||u||_W^2 <= ||J u||^2_{L2}``: in
    directions ``u``, ``u^T G_W u <= u^T G_GN u`` (dense references of both)."""
    x, y, _ = _batch()
    scale = np.full(N, 0.5, np.float32)
    model = _network()
    J, f, _, _, G_n = _exact_quantities(model, x, y, scale)
    for sigma in (0.3, 1.0, 3.0):
        G_w = _reference_metric("wasserstein_kernel", J, f, scale, G_n, sigma, N)
        G_gn = _reference_metric("gauss_newton", J, f, scale, G_n, sigma, N)
        assert np.linalg.eigvalsh(G_gn - G_w).min() > -1e-6 * np.abs(G_gn).max()


def test_conjugate_gradient_and_median_bandwidth():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(8, 8))
    matrix = tf.constant(a @ a.T + np.eye(8), tf.float32)
    rhs = tf.constant(rng.normal(size=8), tf.float32)
    solution, steps, residual = conjugate_gradient(lambda v: tf.linalg.matvec(matrix, v), rhs,
                                                   50, 1e-6)
    np.testing.assert_allclose(solution.numpy(), np.linalg.solve(matrix.numpy(), rhs.numpy()),
                               rtol=1e-3, atol=1e-4)
    assert int(steps) <= 12 and float(residual) <= 1e-5
    _, steps, _ = conjugate_gradient(lambda v: tf.linalg.matvec(matrix, v), rhs, 3, 1e-6)
    assert int(steps) == 3
    points = rng.normal(size=(7, 2)).astype(np.float32)
    distances = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))[np.triu_indices(7, 1)]
    assert float(median_bandwidth(tf.constant(points))) == pytest.approx(
        np.sort(distances)[len(distances) // 2], rel=1e-5)


def test_invalid_arguments_are_refused_by_name():
    for kwargs, name in [({"metric": "fisher"}, "metric"), ({"solver": "lu"}, "solver"),
                         ({"damping": 0.0}, "damping"), ({"momentum": 1.0}, "momentum"),
                         ({"cg_iterations": 0}, "cg_iterations"),
                         ({"cg_tolerance": 0.0}, "cg_tolerance"),
                         ({"kernel_points": 2.5}, "kernel_points"),
                         ({"kernel_bandwidth": -1.0}, "kernel_bandwidth")]:
        with pytest.raises(ValueError, match=name):
            SampleSpaceNGD(**kwargs)
    with pytest.raises(ConfigError, match="cg_iterations"):
        TrainConfig(optimizer="dual", cg_iterations=0).validate()


def test_natural_gradient_model_fits_a_regression_and_refuses_cross_entropy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype(np.float32)
    y = np.sin(x @ np.array([[1.0], [-2.0], [0.5]], np.float32))
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(16, activation="tanh")(inputs)
    model = NaturalGradientModel(inputs, keras.layers.Dense(1)(hidden))
    model.compile(optimizer=SampleSpaceNGD(learning_rate=0.5, damping=1e-3), loss="mse")
    before = model.evaluate(x, y, verbose=0)
    model.fit(x, y, batch_size=32, epochs=20, verbose=0)
    assert model.evaluate(x, y, verbose=0) < 0.1 * before
    other = NaturalGradientModel(inputs, keras.layers.Dense(3)(hidden))
    with pytest.raises(ValueError, match="squared-error"):
        other.compile(optimizer=SampleSpaceNGD(),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))


BASE = TrainConfig(dataset="checkerboard", hidden_units=16, num_blocks=1, num_timesteps=50,
                   batch_size=16, epochs=1, steps_per_epoch=6, warmup_steps=1, seed=5,
                   cg_iterations=4)


@pytest.mark.parametrize("optimizer", ["dual", "dual_empirical", "stein", "kwng"])
def test_diffusion_training_resumes_from_a_checkpoint_bit_for_bit(optimizer, tmp_path):
    """The config builds the optimizer with its metric; SPRING's direction is state that a
    checkpoint carries: 3 + 3 steps from a checkpoint equal 6 uninterrupted steps."""
    tf.config.experimental.enable_op_determinism()
    config = dataclasses.replace(BASE, optimizer=optimizer, momentum=0.5).validate()
    assert build_optimizer(config).metric == {"dual": "gauss_newton",
                                              "dual_empirical": "empirical"}.get(
        optimizer, {"stein": "stein", "kwng": "wasserstein_kernel"}.get(optimizer))
    splits = data_lib.load_dataset(config.dataset, seed=0)
    batches = np.stack([b.numpy() for b in data_lib.training_batches(
        splits.train, config.batch_size, seed=0).take(6)])

    def fresh():
        tf.keras.utils.set_random_seed(config.seed)
        model = build_model(config, splits.data_shape)
        model.compile(optimizer=build_optimizer(config))
        return model

    def fit(model, part):
        model.fit(tf.data.Dataset.from_tensor_slices(part), epochs=1, verbose=0)

    reference = fresh()
    fit(reference, batches)
    first = fresh()
    fit(first, batches[:3])
    checkpointing.save_checkpoint(first, str(tmp_path), epoch=1)
    resumed = fresh()
    resumed.optimizer.build(resumed.denoiser.trainable_variables)
    checkpointing.restore_checkpoint(resumed, str(tmp_path))
    fit(resumed, batches[3:])
    for got, want in zip([*resumed.weights, *resumed.optimizer.variables],
                         [*reference.weights, *reference.optimizer.variables], strict=True):
        np.testing.assert_array_equal(got.numpy(), want.numpy(), err_msg=got.name)
    assert np.any(resumed.optimizer._previous_directions[0].numpy() != 0)


@pytest.mark.parametrize("metric", ["gauss_newton", "wasserstein_kernel"])
def test_xla_compiled_steps_match_the_graph_steps(metric):
    """The CG loop of JVPs and VJPs compiles with XLA and computes the same two steps (the
    second with SPRING momentum) up to float rounding: XLA reorders sums, and CG on an
    ill-conditioned system amplifies that (seen: up to 4e-4 after two steps, 2e-4 after
    four, varying from run to run with the thread scheduling of the graph kernels)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 3)).astype(np.float32)
    y = np.sin(x[:, :2]).astype(np.float32)
    weights = {}
    for jit in (False, True):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((3,))
        hidden = keras.layers.Dense(8, activation="tanh")(inputs)
        model = NaturalGradientModel(inputs, keras.layers.Dense(2)(hidden))
        model.compile(optimizer=SampleSpaceNGD(learning_rate=0.3, metric=metric, damping=0.1,
                                               momentum=0.5, cg_iterations=5),
                      loss="mse", jit_compile=jit)
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        weights[jit] = [v.numpy() for v in model.trainable_variables]
    for graph, xla in zip(weights[False], weights[True], strict=True):
        np.testing.assert_allclose(xla, graph, rtol=1e-2, atol=1e-3)
