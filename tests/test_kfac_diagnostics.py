"""``curvature_along_gradient``: K-FAC's and the exact Gauss-Newton curvature, against numpy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfngd.optimizers import KFAC, ForwardPass, diagnostics
from tfngd.optimizers.curvature_blocks import DenseBlock


def dense_model(d_in=3, d_out=4, seed=31):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((d_in,))
    layer = keras.layers.Dense(d_out, kernel_initializer="random_normal",
                               bias_initializer="random_normal")
    return keras.Model(inputs, layer(inputs)), layer


def per_example_jacobians(model, layer, x):
    """``[N, outputs, d_in + 1, d_out]`` Jacobians of the outputs in (kernel; bias)."""
    with tf.GradientTape(persistent=True) as tape:
        outputs = model(x)
    n, size = x.shape[0], outputs.shape[1]
    kernel = tape.jacobian(outputs, layer.kernel).numpy()  # [N, D, d_in, d_out]
    bias = tape.jacobian(outputs, layer.bias).numpy()[:, :, None]
    return np.concatenate([kernel, bias], axis=2).reshape(n, size, -1), outputs.numpy()


@pytest.mark.parametrize("likelihood", ["gaussian", "categorical"])
def test_both_curvatures_match_numpy(likelihood):
    """``exact`` is ``d^T (1/N sum J^T H J) d`` and ``kfac`` is ``vec(d)^T (A kron G) vec(d)``
    from numpy; for the Gaussian output layer of a linear model K-FAC is exact (ratio 1)."""
    model, layer = dense_model()
    x = np.random.default_rng(32).normal(size=(6, 3)).astype("float32")
    y = np.random.default_rng(33).normal(size=(6, 4)).astype("float32")
    optimizer = KFAC(fisher="exact").register(model)
    optimizer.build(model.trainable_variables)

    def forward():
        outputs = model(x, training=True)
        if likelihood == "gaussian":
            loss = tf.reduce_mean(tf.square(outputs - y))
        else:
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                tf.constant([0, 1, 2, 3, 0, 1]), outputs))
        return ForwardPass(loss, outputs, likelihood)

    (check,) = diagnostics.curvature_along_gradient(optimizer, model.trainable_variables,
                                                    forward)
    assert isinstance(check.block, DenseBlock)
    with tf.GradientTape() as tape:
        loss = forward().loss
    kernel_grad, bias_grad = tape.gradient(loss, [layer.kernel, layer.bias])
    direction = np.concatenate([kernel_grad.numpy(), bias_grad.numpy()[None]], axis=0)
    jacobians, logits = per_example_jacobians(model, layer, x)
    tangents = jacobians @ direction.reshape(-1)  # [N, D]
    if likelihood == "gaussian":
        exact = np.mean(2 / 4 * np.sum(tangents ** 2, axis=1))
    else:
        p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        exact = np.mean(np.sum(p * tangents ** 2, axis=1) - np.sum(p * tangents, axis=1) ** 2)
    np.testing.assert_allclose(check.exact, exact, rtol=1e-5)

    with tf.GradientTape(persistent=True) as tape:
        with optimizer.capture() as captured:
            result = forward()
    a, g, positions = (s.numpy() for s in optimizer.batch_statistics(
        tape, captured, result.outputs, likelihood)[0])
    kfac = positions * direction.reshape(-1) @ np.kron(a, g) @ direction.reshape(-1)
    np.testing.assert_allclose(check.kfac, kfac, rtol=1e-5)
    if likelihood == "gaussian":
        assert check.ratio == pytest.approx(1.0, rel=1e-5)


def test_the_optimizer_state_is_left_alone_and_bad_uses_are_refused():
    model, _ = dense_model()
    optimizer = KFAC(fisher="exact").register(model)
    x = np.ones((2, 3), "float32")

    def forward():
        outputs = model(x, training=True)
        return ForwardPass(tf.reduce_mean(tf.square(outputs)), outputs)

    with pytest.raises(ValueError, match="build the optimizer first"):
        diagnostics.curvature_along_gradient(optimizer, model.trainable_variables, forward)
    optimizer.build(model.trainable_variables)
    before = [v.numpy().copy() for v in optimizer.variables]
    diagnostics.curvature_along_gradient(optimizer, model.trainable_variables, forward)
    for b, v in zip(before, optimizer.variables, strict=True):
        np.testing.assert_array_equal(b, v.numpy())
    empirical = KFAC(fisher="empirical").register(model)
    empirical.build(model.trainable_variables)
    with pytest.raises(ValueError, match="empirical Fisher is not a Gauss-Newton"):
        diagnostics.curvature_along_gradient(empirical, model.trainable_variables, forward)
