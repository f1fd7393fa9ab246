"""The KFAC optimizer as a Keras optimizer: serialisation, checkpoints, NaN guard, XLA,
the first-order fallback, and NaturalGradientModel training with ``fit``."""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits
from tensorflow.python.framework import config as tf_config

from tfngd.optimizers import KFAC, NaturalGradientModel


def regression_data(n=128, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    labels = rng.integers(0, 3, size=n).astype("int32")
    y = np.stack([np.sin(x[:, 0]) + x[:, 1] * x[:, 2], np.cos(x[:, 3]) + 0.5 * labels],
                 axis=1).astype("float32")
    return x, labels, y


def regressor(seed=0, with_embedding=True):
    """An MLP regressor (Dense, some with activations); optionally an Embedding input."""
    keras.utils.set_random_seed(seed)
    x_in = keras.Input((4,), name="x")
    h = keras.layers.Dense(16, activation="tanh", name="hidden1")(x_in)
    inputs = [x_in]
    if with_embedding:
        label = keras.Input((), dtype="int32", name="label")
        h = keras.layers.Add()([h, keras.layers.Embedding(3, 16, name="label_emb")(label)])
        inputs.append(label)
    h = keras.layers.Dense(16, activation="silu", name="hidden2")(h)
    outputs = keras.layers.Dense(2, name="out")(h)
    return NaturalGradientModel(inputs, outputs)


def kfac(**kwargs):
    defaults = dict(learning_rate=0.05, damping=1e-2, inverse_every=3, statistics_every=2,
                    momentum=0.9, kl_clip=1e-2, fallback_learning_rate=1e-2, seed=3)
    return KFAC(**{**defaults, **kwargs})


def batches(count, batch=16):
    x, labels, y = regression_data(count * batch)
    return [((x[i:i + batch], labels[i:i + batch]), y[i:i + batch])
            for i in range(0, count * batch, batch)]


def train(model, data):
    for inputs, targets in data:
        model.train_on_batch(inputs, targets)


@contextlib.contextmanager
def op_determinism():
    tf.config.experimental.enable_op_determinism()
    try:
        yield
    finally:
        tf_config.disable_op_determinism()  # keeps XLA available to the other tests


# -- serialisation -----------------------------------------------------------------------
def test_config_round_trip_with_schedules():
    optimizer = KFAC(
        learning_rate=keras.optimizers.schedules.ExponentialDecay(0.3, 100, 0.5),
        damping=3e-3, damping_mode="eigen", inverse_method="eigh", fisher="empirical",
        mc_samples=2, statistics_examples=12,
        statistics_decay=0.9, statistics_every=2, inverse_every=7, inverse_warmup_steps=3,
        kl_clip=keras.optimizers.schedules.ExponentialDecay(1e-3, 800, 10.0), momentum=0.5,
        fallback_learning_rate=keras.optimizers.schedules.CosineDecay(1e-3, 50), seed=11,
        skip_unsupported_layers=True, weight_decay=1e-4, global_clipnorm=1.0, use_ema=True,
        name="my_kfac",
    )
    config = optimizer.get_config()
    restored = KFAC.from_config(dict(config))  # Keras' from_config edits its argument
    assert restored.get_config() == config
    assert float(restored.kl_clip(400)) == pytest.approx(1e-3 * 10**0.5, rel=1e-6)
    again = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(again, KFAC) and again.get_config() == config
    for key in ("damping", "damping_mode", "inverse_method", "fisher", "mc_samples",
                "statistics_examples",
                "statistics_decay", "statistics_every", "inverse_every", "inverse_warmup_steps",
                "kl_clip", "momentum",
                "fallback_learning_rate", "seed", "skip_unsupported_layers"):
        assert key in config


def test_kl_clip_holds_each_step_to_its_scheduled_trust_region():
    """With ``nu < 1`` the step ``dW = -eta nu U`` has quadratic KL ``eta^2 nu^2 <U, g> =
    -eta nu <dW, g> = kappa_k``: check it against kappa_k = 1e-6 * 3^k, from the weight change
    and the loss gradient of each batch (taken here, independently of the optimizer)."""
    kappa = keras.optimizers.schedules.ExponentialDecay(1e-6, decay_steps=1, decay_rate=3.0)
    model = regressor(with_embedding=False)
    model.compile(optimizer=kfac(kl_clip=kappa, momentum=0.0), loss="mse")
    for step, ((x, _), y) in enumerate(batches(4)):
        with tf.GradientTape() as tape:
            loss = keras.losses.MeanSquaredError()(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        before = [v.numpy() for v in model.trainable_variables]
        model.train_on_batch(x, y)
        diagnostics = model.optimizer.diagnostics()
        nu = float(diagnostics["kfac/update_scale"])
        inner = sum(float(np.sum((v.numpy() - b) * g.numpy()))
                    for v, b, g in zip(model.trainable_variables, before, grads, strict=True))
        assert nu < 1, step
        assert -0.05 * nu * inner == pytest.approx(1e-6 * 3.0**step, rel=1e-3), step
        # the diagnostic is read after the step: the clip of the next one
        assert float(diagnostics["kfac/kl_clip"]) == pytest.approx(1e-6 * 3.0**(step + 1))


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="damping_mode"):
        KFAC(damping_mode="tikhonov")
    with pytest.raises(ValueError, match="fisher"):
        KFAC(fisher="ggn")
    with pytest.raises(ValueError, match="cholesky"):
        KFAC(damping_mode="eigen", inverse_method="cholesky")
    with pytest.raises(ValueError, match="inverse_every"):
        KFAC(inverse_every=0)
    with pytest.raises(ValueError, match="kl_clip"):
        KFAC(kl_clip=0.0)
    with pytest.raises(NotImplementedError, match="gradient_accumulation"):
        KFAC(gradient_accumulation_steps=2)


def test_unregistered_optimizer_and_unsupported_loss_fail_clearly():
    inputs = keras.Input((3,))
    plain = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    plain.compile(optimizer=KFAC(), loss="mse")
    with pytest.raises(ValueError, match="register"):
        plain.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0)
    model = regressor(with_embedding=False)
    with pytest.raises(ValueError, match="MeanSquaredError"):
        model.compile(optimizer=KFAC(), loss="mae")
    model.compile(optimizer=KFAC(fisher="empirical"), loss="mae")  # empirical: any loss


# -- checkpoints -------------------------------------------------------------------------
def test_checkpoint_round_trip_continues_exactly(tmp_path):
    data = batches(10)
    with op_determinism():
        straight = regressor()
        straight.compile(optimizer=kfac(), loss="mse")
        train(straight, data)

        first = regressor()
        first.compile(optimizer=kfac(), loss="mse")
        train(first, data[:4])
        path = str(tmp_path / "ckpt.weights.h5")
        first.save_weights(path)

        resumed = regressor(seed=99)  # different initial weights: everything must come back
        resumed.compile(optimizer=kfac(), loss="mse")
        resumed.optimizer.build(resumed.trainable_variables)
        resumed.load_weights(path)
        assert int(resumed.optimizer.iterations.numpy()) == 4
        train(resumed, data[4:])

    for a, b in zip(straight.weights, resumed.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in zip(straight.optimizer.variables, resumed.optimizer.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)


# -- NaN guard ---------------------------------------------------------------------------
def test_non_finite_batch_leaves_weights_and_curvature_unchanged():
    model = regressor()
    model.compile(optimizer=kfac(statistics_every=1), loss="mse")
    data = batches(3)
    train(model, data[:2])
    optimizer = model.optimizer
    counters = {id(optimizer.iterations), id(optimizer.skipped_updates)}
    before_weights = [w.numpy() for w in model.weights]
    before_state = [v.numpy() for v in optimizer.variables if id(v) not in counters]

    (x, labels), y = data[2]
    x = x.copy()
    x[3, 1] = np.nan
    model.train_on_batch((x, labels), y)

    assert int(optimizer.skipped_updates.numpy()) == 1
    for before, after in zip(before_weights, model.weights, strict=True):
        np.testing.assert_array_equal(before, after.numpy())
    after_state = [v for v in optimizer.variables if id(v) not in counters]
    for before, after in zip(before_state, after_state, strict=True):
        np.testing.assert_array_equal(before, after.numpy(), err_msg=after.name)
    train(model, data[:1])  # and training goes on
    assert int(optimizer.skipped_updates.numpy()) == 1
    assert all(np.isfinite(w.numpy()).all() for w in model.weights)


# -- XLA ---------------------------------------------------------------------------------
@pytest.mark.parametrize("inverse_method", ["eigh", "cholesky"])
def test_fit_with_jit_compile_matches_graph_mode(inverse_method):
    """Both damping modes share the XLA-relevant code (eigh, probes, conds): pi mode only."""
    x, labels, y = regression_data(96)
    weights = []
    for jit in (False, True):
        model = regressor()
        model.compile(optimizer=kfac(inverse_method=inverse_method), loss="mse",
                      jit_compile=jit)
        assert model.jit_compile is jit
        model.fit((x, labels), y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        weights.append([w.numpy() for w in model.weights])
    for a, b in zip(*weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


# -- first-order fallback ------------------------------------------------------------------
def test_variables_without_a_block_get_adam():
    model = regressor()
    optimizer = kfac(fallback_learning_rate=0.01)
    model.compile(optimizer=optimizer, loss="mse")
    embedding = model.get_layer("label_emb").embeddings
    (x, labels), y = batches(1)[0]
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y, model((x, labels), training=True))
    gradient = tf.convert_to_tensor(tape.gradient(loss, embedding))
    reference = keras.Variable(embedding.numpy())
    keras.optimizers.Adam(0.01, epsilon=1e-7).apply([gradient], [reference])
    model.train_on_batch((x, labels), y)
    np.testing.assert_allclose(embedding.numpy(), reference.numpy(), rtol=1e-5, atol=1e-7)
    assert {type(b.layer).__name__ for b in optimizer.blocks} == {"Dense"}
    assert len(optimizer.blocks) == 3


def test_diagnostics_report_scalars():
    model = regressor()
    model.compile(optimizer=kfac(), loss="mse")
    train(model, batches(2))
    diagnostics = model.optimizer.diagnostics()
    for key in ("kfac/damping", "kfac/update_scale", "kfac/skipped_updates",
                "kfac/inverse_refreshes", "kfac/hidden1/A_eig_min", "kfac/out/G_eig_max"):
        assert key in diagnostics, sorted(diagnostics)
        assert diagnostics[key].shape == ()
    assert 0 < float(diagnostics["kfac/update_scale"]) <= 1
    assert float(diagnostics["kfac/hidden1/A_eig_max"]) >= float(
        diagnostics["kfac/hidden1/A_eig_min"]) >= 0


# -- training with fit ----------------------------------------------------------------------
def fit_loss(model, optimizer, inputs, targets, loss, epochs, batch_size):
    model.compile(optimizer=optimizer, loss=loss)
    initial = model.evaluate(inputs, targets, verbose=0)
    model.fit(inputs, targets, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
    return initial, model.evaluate(inputs, targets, verbose=0)


def test_mlp_regressor_trains_with_fit():
    x, labels, y = regression_data(512)
    results = {}
    for name, optimizer in (("kfac", KFAC(learning_rate=0.1, damping=1e-3, inverse_every=5)),
                            ("adam", keras.optimizers.Adam(1e-2))):
        results[name] = fit_loss(regressor(with_embedding=False), optimizer, x, y, "mse",
                                 epochs=5, batch_size=64)
    print("MLP regressor, MSE at init -> after 40 steps:", results)
    initial, final = results["kfac"]
    assert final < 0.2 * initial


def conv_classifier():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.Conv2D(16, 3, strides=2, padding="same")(h)
    h = keras.layers.GroupNormalization(4)(h)
    h = keras.layers.Activation("relu")(h)
    outputs = keras.layers.Dense(10)(keras.layers.Flatten()(h))
    return NaturalGradientModel(inputs, outputs)


def test_conv_classifier_on_digits_trains_with_fit():
    digits = load_digits()
    x = (digits.images[..., None] / 16.0).astype("float32")
    y = digits.target.astype("int32")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    results = {}
    for name, optimizer in (
            ("kfac", KFAC(learning_rate=0.1, damping=1e-3, inverse_every=5)),
            ("kfac_reduce", KFAC(learning_rate=0.1, damping=1e-3, inverse_every=5,
                                 approximation="reduce")),
            ("adam", keras.optimizers.Adam(1e-2))):
        results[name] = fit_loss(conv_classifier(), optimizer, x, y, loss, epochs=2,
                                 batch_size=64)
    print("digits conv classifier, CE at init -> after 58 steps:", results)
    for name in ("kfac", "kfac_reduce"):
        initial, final = results[name]
        assert final < 0.1 * initial, name


# -- schedules of the statistics and inverses -----------------------------------------------
@pytest.mark.parametrize("warmup", [0, 2])
def test_statistics_and_inverse_refresh_schedules(warmup):
    model = regressor(with_embedding=False)
    optimizer = kfac(statistics_every=2, inverse_every=3, inverse_warmup_steps=warmup)
    model.compile(optimizer=optimizer, loss="mse")
    data = [((x,), y) for (x, _), y in batches(7)]
    history = []
    for inputs, targets in data:
        model.train_on_batch(inputs, targets)
        refreshes = int(optimizer.diagnostics()["kfac/inverse_refreshes"])
        history.append((optimizer.blocks[0].a_factor.numpy().copy(), refreshes))
    # Statistics at steps 0, 2, 4, 6 (and 1 in the warm-up); inverses at steps 0, 3, 6 (and 1
    # in the warm-up).
    changed = [not np.array_equal(history[i][0], history[i - 1][0]) for i in range(1, 7)]
    assert changed == [warmup > 1, True, False, True, False, True]
    expected = [1, 1, 1, 2, 2, 2, 3] if warmup == 0 else [1, 2, 2, 3, 3, 3, 4]
    assert [count for _, count in history] == expected


def test_decomposition_failure_falls_back_to_the_diagonal(monkeypatch):
    model = regressor(with_embedding=False)
    optimizer = kfac(damping_mode="eigen")
    model.compile(optimizer=optimizer, loss="mse", run_eagerly=True)

    def failing_eigh(matrix):
        nan = tf.fill(tf.shape(matrix), float("nan"))
        return nan[0], nan

    monkeypatch.setattr(tf.linalg, "eigh", failing_eigh)
    (x, _), y = batches(1)[0]
    model.train_on_batch(x, y)
    block = optimizer.blocks[0]
    assert int(block.decomposition_fallbacks.numpy()) == 2  # A and G
    np.testing.assert_array_equal(block.a_eigenvectors.numpy(), np.eye(5))
    np.testing.assert_allclose(block.a_eigenvalues.numpy(), np.diag(block.a_factor.numpy()) /
                               float(optimizer._statistics_weight.numpy()), rtol=1e-6)
    assert int(optimizer.skipped_updates.numpy()) == 0
    assert all(np.isfinite(w.numpy()).all() for w in model.weights)


def test_mixed_bfloat16_policy_keeps_float32_factors():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = regressor(with_embedding=False)
        optimizer = kfac()
        model.compile(optimizer=optimizer, loss="mse")
        x, _, y = regression_data(64)
        history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert np.all(np.isfinite(history.history["loss"]))
    assert all(v.dtype == "float32" for v in optimizer.variables
               if "kfac" in v.name and v.dtype not in ("int64", "int32"))
    assert int(optimizer.skipped_updates.numpy()) == 0


# -- memory of the curvature state --------------------------------------------------------
@pytest.mark.parametrize(("damping_mode", "cached"), [("pi", "squares"), ("eigen", "eigen")])
def test_state_sizes_count_factors_inverses_momentum_and_fallback(damping_mode, cached):
    model = regressor()  # hidden1 4->16, label_emb 3x16 (fallback), hidden2 16->16, out 16->2
    optimizer = kfac(damping_mode=damping_mode)
    model.compile(optimizer=optimizer, loss="mse")
    model.train_on_batch(*batches(1)[0])
    # (input dim + bias, output dim) of each Kronecker block, counted by hand.
    dims = [(5, 16), (17, 16), (17, 2)]
    squares = sum(a * a + g * g for a, g in dims)
    eigen = squares + sum(a + g for a, g in dims)
    parameters = sum((a - 1) * g + g for a, g in dims)
    assert optimizer.state_sizes() == {
        "factors": squares,
        "inverses": squares if cached == "squares" else eigen,
        "momentum": parameters,
        "fallback": 2 * 3 * 16,
    }


def test_statistics_examples_uses_the_first_examples_of_the_batch():
    """The factors from a 16-example batch with ``statistics_examples=6`` equal those from
    its first 6 examples alone (exact Fisher: deterministic probes); the gradient step still
    uses the whole batch."""
    (x, labels), y = batches(1)[0]
    factors = {}
    for name, inputs, targets, subset in (("subset", (x, labels), y, 6),
                                          ("first6", (x[:6], labels[:6]), y[:6], None)):
        model = regressor()
        optimizer = kfac(fisher="exact", statistics_examples=subset)
        model.compile(optimizer=optimizer, loss="mse")
        model.train_on_batch(inputs, targets)
        factors[name] = [v.numpy() for block in optimizer.blocks
                         for v in block.running_statistics]
    for a, b in zip(factors["subset"], factors["first6"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="statistics_examples"):
        KFAC(statistics_examples=0)
