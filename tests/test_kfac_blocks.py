"""Curvature blocks against independent references (docs/kfac.md, section 7).

* one linear layer + squared error: one K-FAC step with lr 1 and tiny damping
  lands on the least-squares solution;
* factors vs numpy; the exact per-layer Fisher from per-example Jacobians vs
  ``R (A kron G)`` where the Kronecker form is exact; the MC estimate of ``G``
  converges to the exact one;
* the fast preconditioner (both damping modes) vs a dense solve;
* Conv2D patch factors vs an explicit numpy im2col, for every padding /
  stride / dilation / kernel size combination Keras allows;
* GroupNorm diagonal vs numpy per-example gradients.
"""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfngd.optimizers import KFAC, NaturalGradientModel, find_registrable_layers
from tfngd.optimizers.curvature_blocks import Conv2DBlock, DenseBlock, GroupNormBlock


def exact_kfac(**kwargs):
    """A KFAC whose factors are the last batch's exact-Fisher factors."""
    defaults = dict(learning_rate=1.0, damping=1e-8, fisher="exact", statistics_decay=0.0,
                    momentum=0.0, kl_clip=None, inverse_every=1)
    return KFAC(**{**defaults, **kwargs})


def curvature_step(model, optimizer, x, loss_fn=None, likelihood="gaussian", apply=True):
    """One capture / update_curvature (/ apply) step; returns the captured calls."""
    with tf.GradientTape(persistent=True) as tape:
        with optimizer.capture() as captured:
            outputs = model(x, training=True)
        loss = loss_fn(outputs) if loss_fn is not None else tf.reduce_sum(outputs)
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.update_curvature(tape, captured, outputs, likelihood)
    if apply:
        optimizer.apply(grads, model.trainable_variables)
    return captured


def with_bias_column(a):
    return np.concatenate([a, np.ones_like(a[:, :1])], axis=1)


# -- the exactness test: linear least squares in one step -------------------------------
@pytest.mark.parametrize("damping_mode,inverse_method",
                         [("pi", "eigh"), ("eigen", "eigh"), ("pi", "cholesky")])
@pytest.mark.parametrize("decay", [0.0, 0.95])
def test_one_step_on_linear_least_squares(damping_mode, inverse_method, decay):
    rng = np.random.default_rng(0)
    n, d_in, d_out = 64, 5, 3
    x = rng.normal(size=(n, d_in)).astype("float32") + 0.5
    y = (x @ rng.normal(size=(d_in, d_out)) + rng.normal(size=d_out)
         + 0.3 * rng.normal(size=(n, d_out))).astype("float32")
    keras.utils.set_random_seed(1)
    inputs = keras.Input((d_in,))
    model = NaturalGradientModel(inputs, keras.layers.Dense(d_out)(inputs))
    # The pi split damps each factor by ~sqrt(lambda), so the effective perturbation of
    # the product is O(sqrt(lambda)): pi mode needs a smaller lambda for the same accuracy.
    damping = 1e-8 if damping_mode == "eigen" else 1e-12
    optimizer = exact_kfac(damping=damping, damping_mode=damping_mode,
                           inverse_method=inverse_method, statistics_decay=decay)
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(x, y, batch_size=n, epochs=1, shuffle=False, verbose=0)

    solution, *_ = np.linalg.lstsq(with_bias_column(x).astype(np.float64), y, rcond=None)
    kernel, bias = (v.numpy() for v in model.layers[-1].weights)
    np.testing.assert_allclose(np.concatenate([kernel, bias[None]]), solution, atol=1e-4)


# -- factors against numpy and against the exact Fisher -----------------------------------
def test_dense_factors_over_tokens_match_numpy_and_the_exact_fisher():
    """Dense on [N, T, d]: R = T, and with exact probes F = R (A kron G) exactly."""
    rng = np.random.default_rng(1)
    n, tokens, d_in, d_out = 3, 4, 3, 2
    x = rng.normal(size=(n, tokens, d_in)).astype("float32")
    inputs = keras.Input((tokens, d_in))
    layer = keras.layers.Dense(d_out)
    model = keras.Model(inputs, layer(inputs))
    optimizer = exact_kfac().register(model)
    curvature_step(model, optimizer, x, apply=False)
    (block,) = optimizer.blocks

    a = with_bias_column(x.reshape(-1, d_in))
    np.testing.assert_allclose(block.a_factor.numpy(), a.T @ a / (n * tokens), rtol=1e-5)
    scale = 1.0 / (tokens * d_out)  # Keras MSE: a mean over all output elements
    np.testing.assert_allclose(block.g_factor.numpy(), 2 * scale * np.eye(d_out), rtol=1e-6)
    assert block.positions.numpy() == tokens

    # Exact Fisher of the mean loss: F = 1/N sum_n J_n^T (2 s I) J_n, J_n = d f_n / d vec(W).
    with tf.GradientTape(persistent=True) as tape:
        outputs = model(x)
    jac_kernel = tape.jacobian(outputs, layer.kernel).numpy().reshape(n, tokens * d_out, -1)
    jac_bias = tape.jacobian(outputs, layer.bias).numpy().reshape(n, tokens * d_out, -1)
    jac = np.concatenate([jac_kernel, jac_bias], axis=2)  # row-major vec of [kernel; bias]
    fisher = np.einsum("npi,npj->ij", jac, jac) * 2 * scale / n
    kronecker = block.positions.numpy() * np.kron(block.a_factor.numpy(), block.g_factor.numpy())
    np.testing.assert_allclose(kronecker, fisher, rtol=1e-5, atol=1e-7)


def two_layer_model(d_in=3, hidden=4, d_out=2):
    keras.utils.set_random_seed(2)
    inputs = keras.Input((d_in,))
    hidden_layer = keras.layers.Dense(hidden, activation="tanh")
    outputs = keras.layers.Dense(d_out)(hidden_layer(inputs))
    return keras.Model(inputs, outputs), hidden_layer


def test_hidden_layer_fisher_of_one_example_is_kronecker():
    """For one example the hidden layer's Fisher is exactly a a^T kron E[g g^T]."""
    model, hidden = two_layer_model()
    x = np.random.default_rng(3).normal(size=(1, 3)).astype("float32")
    optimizer = exact_kfac().register(model)
    curvature_step(model, optimizer, x, apply=False)
    block = optimizer.blocks[0]
    assert block.layer is hidden

    with tf.GradientTape(persistent=True) as tape:
        outputs = model(x)
    jac = np.concatenate([tape.jacobian(outputs, hidden.kernel).numpy().reshape(2, -1),
                          tape.jacobian(outputs, hidden.bias).numpy().reshape(2, -1)], axis=1)
    fisher = jac.T @ jac * 2 * (1.0 / 2)  # s = 1/D, D = 2
    kronecker = np.kron(block.a_factor.numpy(), block.g_factor.numpy())
    np.testing.assert_allclose(kronecker, fisher, rtol=1e-4, atol=1e-7)


def test_mc_estimate_of_g_converges_to_the_exact_factor():
    model, _ = two_layer_model(d_out=3)
    x = np.random.default_rng(4).normal(size=(16, 3)).astype("float32")
    exact = exact_kfac().register(model)
    curvature_step(model, exact, x, apply=False)
    g_exact = exact.blocks[0].g_factor.numpy()

    errors = {}
    for samples in (4, 64):
        trials = []
        for seed in range(3):
            mc = exact_kfac(fisher="mc", mc_samples=samples, seed=seed).register(model)
            curvature_step(model, mc, x, apply=False)
            g_mc = mc.blocks[0].g_factor.numpy()
            trials.append(np.linalg.norm(g_mc - g_exact) / np.linalg.norm(g_exact))
        errors[samples] = np.mean(trials)
    # 16x the samples: ~4x smaller error (1/sqrt(M)); allow generous slack.
    assert errors[64] < errors[4] / 2.0, errors
    assert errors[64] < 0.25, errors


# -- the fast preconditioner against a dense solve -------------------------------------
def random_spd(rng, size):
    m = rng.normal(size=(size, size))
    return (m @ m.T / size + 0.1 * np.eye(size)).astype("float32")


@pytest.mark.parametrize("damping_mode,inverse_method",
                         [("pi", "eigh"), ("eigen", "eigh"), ("pi", "cholesky")])
def test_preconditioner_matches_dense_damped_solve(damping_mode, inverse_method):
    rng = np.random.default_rng(5)
    d_in, d_out, positions, damping = 3, 3, 5.0, 0.1
    layer = keras.layers.Dense(d_out)
    layer.build((None, d_in))
    block = DenseBlock(layer, damping_mode, inverse_method)
    block.create_state(KFAC())
    a, g = random_spd(rng, d_in + 1), random_spd(rng, d_out)
    block.a_factor.assign(a)
    block.g_factor.assign(g)
    block.positions.assign(positions)
    assert bool(block.update_inverse(tf.constant(damping), tf.constant(1.0)))

    kernel_grad = rng.normal(size=(d_in, d_out)).astype("float32")
    bias_grad = rng.normal(size=d_out).astype("float32")
    update = block.precondition([kernel_grad, bias_grad], tf.constant(damping), 1.0)
    update = np.concatenate([update[0].numpy(), update[1].numpy()[None]])

    grad = np.concatenate([kernel_grad, bias_grad[None]]).astype(np.float64).reshape(-1)
    a, g = a.astype(np.float64), g.astype(np.float64)
    if damping_mode == "pi":
        pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
        root = np.sqrt(damping / positions)
        matrix = positions * np.kron(a + pi * root * np.eye(d_in + 1),
                                     g + root / pi * np.eye(d_out))
    else:
        matrix = positions * np.kron(a, g) + damping * np.eye((d_in + 1) * d_out)
    expected = np.linalg.solve(matrix, grad).reshape(d_in + 1, d_out)
    np.testing.assert_allclose(update, expected, rtol=2e-4, atol=1e-6)


# -- Conv2D patches against an explicit im2col --------------------------------------------
def numpy_patches(x, kernel_size, stride, dilation, padding):
    """im2col rows in (k_h, k_w, C_in) order, with TensorFlow's SAME padding rule."""
    n, height, width, channels = x.shape
    span = (kernel_size - 1) * dilation + 1
    pads = []
    for size in (height, width):
        if padding == "same":
            out = -(-size // stride)
            total = max((out - 1) * stride + span - size, 0)
            pads.append((total // 2, total - total // 2))
        else:
            pads.append((0, 0))
    padded = np.pad(x, [(0, 0), pads[0], pads[1], (0, 0)])
    out_h = (padded.shape[1] - span) // stride + 1
    out_w = (padded.shape[2] - span) // stride + 1
    rows = np.zeros((n, out_h, out_w, kernel_size, kernel_size, channels), x.dtype)
    for i, j in itertools.product(range(out_h), range(out_w)):
        for ki, kj in itertools.product(range(kernel_size), range(kernel_size)):
            rows[:, i, j, ki, kj] = padded[:, i * stride + ki * dilation,
                                           j * stride + kj * dilation]
    return rows.reshape(n * out_h * out_w, -1), out_h * out_w


CONV_CASES = [
    (k, s, d, p)
    for k, s, d, p in itertools.product((1, 3), (1, 2), (1, 2), ("same", "valid"))
    if not (s > 1 and d > 1)  # Keras forbids strides > 1 with dilation_rate > 1
]


@pytest.mark.parametrize("kernel_size,stride,dilation,padding", CONV_CASES)
def test_conv_factors_match_explicit_im2col(kernel_size, stride, dilation, padding):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 7, 6, 3)).astype("float32")
    inputs = keras.Input((7, 6, 3))
    conv = keras.layers.Conv2D(4, kernel_size, strides=stride, dilation_rate=dilation,
                               padding=padding, bias_initializer="random_normal")
    model = keras.Model(inputs, conv(inputs))
    optimizer = exact_kfac().register(model)
    captured = curvature_step(model, optimizer, x, apply=False)
    (block,) = optimizer.blocks

    patches, positions = numpy_patches(x, kernel_size, stride, dilation, padding)
    # The patch order is the kernel's: patches @ kernel + bias reproduces the layer.
    conv_out = patches @ conv.kernel.numpy().reshape(-1, 4) + conv.bias.numpy()
    np.testing.assert_allclose(conv_out, captured[0].outputs.numpy().reshape(-1, 4), atol=1e-5)
    a = with_bias_column(patches)
    np.testing.assert_allclose(block.a_factor.numpy(), a.T @ a / a.shape[0], rtol=1e-5,
                               atol=1e-6)
    assert block.positions.numpy() == positions
    # Exact probes over the D = positions * 4 outputs with s = 1/D: G = 2 s I.
    np.testing.assert_allclose(block.g_factor.numpy(), 2 / (positions * 4) * np.eye(4),
                               rtol=1e-5)


@pytest.mark.parametrize("kernel_size,stride,dilation,padding", CONV_CASES)
def test_reduce_factors_are_the_exact_fisher_of_a_pooled_convolution(kernel_size, stride,
                                                                       dilation, padding):
    """K-FAC-reduce: A from position-averaged patches, G from position-summed gradients.

    With global average pooling after the convolution, y_n = mean_r(a_nr) W + b, so
    the exact Fisher of the mean squared error is (1/N sum_n a_n a_n^T) kron 2sI:
    the reduce factors reproduce it exactly (and expand does not).
    """
    rng = np.random.default_rng(16)
    n, filters = 3, 2
    x = rng.normal(size=(n, 7, 6, 3)).astype("float32")
    inputs = keras.Input((7, 6, 3))
    conv = keras.layers.Conv2D(filters, kernel_size, strides=stride, dilation_rate=dilation,
                               padding=padding, bias_initializer="random_normal")
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(conv(inputs)))
    optimizer = exact_kfac(approximation="reduce").register(model)
    curvature_step(model, optimizer, x, apply=False)
    (block,) = optimizer.blocks

    patches, positions = numpy_patches(x, kernel_size, stride, dilation, padding)
    a = with_bias_column(patches.reshape(n, positions, -1).mean(axis=1))
    np.testing.assert_allclose(block.a_factor.numpy(), a.T @ a / n, rtol=1e-5, atol=1e-6)
    assert block.positions.numpy() == 1.0

    with tf.GradientTape(persistent=True) as tape:
        outputs = model(x)
    jac = np.concatenate(
        [tape.jacobian(outputs, conv.kernel).numpy().reshape(n, filters, -1),
         tape.jacobian(outputs, conv.bias).numpy().reshape(n, filters, -1)], axis=2)
    fisher = np.einsum("npi,npj->ij", jac, jac) * 2 * (1.0 / filters) / n
    kronecker = block.positions.numpy() * np.kron(block.a_factor.numpy(),
                                                  block.g_factor.numpy())
    np.testing.assert_allclose(kronecker, fisher, rtol=1e-4, atol=1e-7)


def test_reduce_equals_expand_without_weight_sharing_and_rejects_unknown_names():
    model, _ = two_layer_model()
    x = np.random.default_rng(17).normal(size=(5, 3)).astype("float32")
    factors = {}
    for approximation in ("expand", "reduce", "per_example"):
        optimizer = exact_kfac(approximation=approximation).register(model)
        curvature_step(model, optimizer, x, apply=False)
        factors[approximation] = [f.numpy() for b in optimizer.blocks
                                  for f in b.kronecker_factors()]
    for expand, reduce in zip(factors["expand"], factors["reduce"], strict=True):
        np.testing.assert_allclose(reduce, expand, rtol=1e-6)
    # Per-example factors are scaled differently (tr A tr G = tau), their product is the same
    # here: a linear model with exact probes has the same g for every example. (Expand's and
    # reduce's factors are the stored statistics themselves.)
    blocks = len(factors["expand"]) // 3
    for block in range(blocks):
        a, g, r = factors["expand"][3 * block:3 * block + 3]
        a_pe, g_pe, r_pe = factors["per_example"][3 * block:3 * block + 3]
        if block == blocks - 1:  # the output layer
            np.testing.assert_allclose(np.kron(a_pe, g_pe) * r_pe, np.kron(a, g) * r,
                                       rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="approximation must be one of"):
        KFAC(approximation="mean")


def dense_called_twice(combine, d_in=3, d_out=2, approximation="expand", stacked=False,
                       same_input=False, **kfac_options):
    """One Dense layer applied to both halves of a [N, 2, d_in] input, in two calls or
    (``stacked``) in one call on the two halves stacked along the batch axis; ``combine``
    joins the two outputs; ``same_input``: both halves equal. Returns (model, layer, block
    after one exact-Fisher step, x)."""
    rng = np.random.default_rng(18)
    x = rng.normal(size=(5, 2, d_in)).astype("float32")
    if same_input:
        x[:, 1] = x[:, 0]
    keras.utils.set_random_seed(19)
    inputs = keras.Input((2, d_in))
    layer = keras.layers.Dense(d_out, bias_initializer="random_normal")
    if stacked:
        both = layer(keras.ops.concatenate([inputs[:, 0], inputs[:, 1]], axis=0))
        first, second = keras.ops.split(both, 2, axis=0)
    else:
        first, second = layer(inputs[:, 0]), layer(inputs[:, 1])
    model = keras.Model(inputs, combine(first, second))
    optimizer = exact_kfac(approximation=approximation, **kfac_options).register(model)
    curvature_step(model, optimizer, x, apply=False)
    (block,) = optimizer.blocks
    return model, layer, block, x


def per_example_jacobians(model, layer, x) -> np.ndarray:
    """``[N, D, params]``: each example's Jacobian of the D outputs in (kernel; bias)."""
    with tf.GradientTape(persistent=True) as tape:
        outputs = model(x)
    n, size = x.shape[0], int(np.prod(outputs.shape[1:]))
    return np.concatenate([tape.jacobian(outputs, layer.kernel).numpy().reshape(n, size, -1),
                           tape.jacobian(outputs, layer.bias).numpy().reshape(n, size, -1)],
                          axis=2)


def exact_fisher_of_mse(model, layer, x):
    """F = 1/N sum_n J_n^T (2/D) J_n for the Keras MSE over D output elements."""
    jac = per_example_jacobians(model, layer, x)
    n, size = jac.shape[:2]
    return np.einsum("npi,npj->ij", jac, jac) * 2 / size / n


@pytest.mark.parametrize("stacked", [False, True])
def test_a_layer_called_twice_counts_both_calls_as_positions_of_the_same_examples(stacked):
    """Expand: two calls on N examples (or one call on the batch stacked twice) are 2
    positions of each example (R = 2, not 1); with each call's output its own loss term,
    R (A kron G) is the exact Fisher."""
    model, layer, block, x = dense_called_twice(lambda a, b: keras.ops.stack([a, b], axis=1),
                                                stacked=stacked)
    assert block.positions.numpy() == 2.0
    a = with_bias_column(x.reshape(-1, x.shape[-1]))
    np.testing.assert_allclose(block.a_factor.numpy(), a.T @ a / a.shape[0], rtol=1e-5)
    kronecker = block.positions.numpy() * np.kron(block.a_factor.numpy(),
                                                  block.g_factor.numpy())
    np.testing.assert_allclose(kronecker, exact_fisher_of_mse(model, layer, x),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("stacked", [False, True])
def test_reduce_pools_over_the_calls_of_a_layer_called_twice(stacked):
    """Reduce: y = W a_1 + W a_2 pools the calls before the loss, so the inputs
    averaged and the gradients summed over both calls give the exact Fisher."""
    model, layer, block, x = dense_called_twice(lambda a, b: a + b, approximation="reduce",
                                                stacked=stacked)
    assert block.positions.numpy() == 1.0
    a = with_bias_column(x.mean(axis=1))
    np.testing.assert_allclose(block.a_factor.numpy(), a.T @ a / a.shape[0], rtol=1e-5)
    np.testing.assert_allclose(np.kron(block.a_factor.numpy(), block.g_factor.numpy()),
                               exact_fisher_of_mse(model, layer, x), rtol=1e-5, atol=1e-7)


def per_example_fisher(model, layer, x):
    """The per-example gradient matrices M_n (per output probe) of the Keras MSE, and the
    per-example Kronecker factors built from them (numpy)."""
    jac = per_example_jacobians(model, layer, x)
    n, size = jac.shape[:2]
    d_out = layer.bias.shape[0]
    matrices = jac.reshape(n, size, -1, d_out) * np.sqrt(2 / size)  # [N, probes, d_in, d_out]
    tau = np.sum(matrices ** 2) / n
    a = np.einsum("npio,npjo->ij", matrices, matrices) / n / np.sqrt(tau)
    g = np.einsum("npio,npiq->oq", matrices, matrices) / n / np.sqrt(tau)
    return a, g


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("same_input", [False, True])
def test_per_example_factors_match_numpy_per_example_gradients(stacked, same_input):
    """approximation='per_example' on a Dense layer called twice, its outputs differenced
    (y = W x_1 - 0.5 W x_2): A and G from the per-example gradient matrices M_n (numpy,
    from per-example Jacobians); on the same input they give the exact Fisher."""
    def combine(a, b):
        return a - 0.5 * b

    model, layer, block, x = dense_called_twice(combine, stacked=stacked,
                                                same_input=same_input,
                                                approximation="per_example")
    assert block.positions.numpy() == 1.0
    a, g = per_example_fisher(model, layer, x)
    a_factor, g_factor, _ = block.kronecker_factors()
    np.testing.assert_allclose(a_factor.numpy(), a, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g_factor.numpy(), g, rtol=1e-5, atol=1e-7)
    if same_input:
        np.testing.assert_allclose(np.kron(a, g), exact_fisher_of_mse(model, layer, x),
                                   rtol=1e-5, atol=1e-7)


def test_per_example_products_through_gram_or_matrices_agree():
    """The Gram route and the explicit M_n route give the same factors, and a Dense layer
    on vectors (one position per call) takes the Gram route by default."""
    def combine(a, b):
        return a - 0.5 * b

    forced = {}
    for gram in (True, False):
        DenseBlock.per_example_gram = gram
        try:
            forced[gram] = dense_called_twice(combine, approximation="per_example")[2]
        finally:
            DenseBlock.per_example_gram = None
    default = dense_called_twice(combine, approximation="per_example")[2]
    for gram, matrices, chosen in zip(forced[True].running_statistics,
                                      forced[False].running_statistics,
                                      default.running_statistics, strict=True):
        np.testing.assert_allclose(matrices.numpy(), gram.numpy(), rtol=1e-5, atol=1e-8)
        np.testing.assert_array_equal(chosen.numpy(), gram.numpy())


def test_differenced_calls_defeat_expand_and_reduce_but_not_per_example():
    """y = W x - 0.5 W x (two calls on the same input): the exact Fisher is that of 0.5 W x.
    Expand counts the calls as independent positions (R = 2, 1 + 0.25 against 0.25: 5x);
    reduce averages the inputs and sums the gradients (exact here, as the inputs agree);
    per_example is exact. y = W x - W x does not depend on W: per_example gives zero."""
    def half(a, b):
        return a - 0.5 * b

    fishers = {}
    for approximation in ("expand", "reduce", "per_example"):
        model, layer, block, x = dense_called_twice(half, same_input=True,
                                                    approximation=approximation)
        a_factor, g_factor, positions = (f.numpy() for f in block.kronecker_factors())
        fishers[approximation] = positions * np.kron(a_factor, g_factor)
    exact = exact_fisher_of_mse(model, layer, x)
    np.testing.assert_allclose(fishers["expand"], 5.0 * exact, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fishers["reduce"], exact, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fishers["per_example"], exact, rtol=1e-5, atol=1e-7)
    _, _, cancelled, _ = dense_called_twice(lambda a, b: a - b, same_input=True,
                                            approximation="per_example")
    np.testing.assert_array_equal(cancelled.g_factor.numpy(), 0.0)
    np.testing.assert_array_equal(cancelled.a_factor.numpy(), 0.0)


def test_per_example_takes_calls_with_different_positions():
    """A Dense layer on 3 tokens and on their mean: M_n sums over every row of both calls."""
    inputs = keras.Input((3, 4))
    keras.utils.set_random_seed(29)
    layer = keras.layers.Dense(2, bias_initializer="random_normal")
    tokens, pooled = layer(inputs), layer(keras.ops.mean(inputs, axis=1))
    model = keras.Model(inputs, keras.ops.sum(tokens, axis=1) - pooled)
    x = np.random.default_rng(30).normal(size=(4, 3, 4)).astype("float32")
    optimizer = exact_kfac(approximation="per_example").register(model)
    curvature_step(model, optimizer, x, apply=False)
    a, g = per_example_fisher(model, layer, x)
    a_factor, g_factor, _ = optimizer.blocks[0].kronecker_factors()
    np.testing.assert_allclose(a_factor.numpy(), a, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g_factor.numpy(), g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("approximation", ["expand", "reduce", "per_example"])
def test_statistics_examples_keeps_the_same_examples_in_every_stacked_copy(approximation):
    """statistics_examples=3 on a call over the batch stacked twice: the factors are those
    of the first 3 examples alone (in both copies), not of the first 3 rows."""
    def combine(a, b):
        return keras.ops.stack([a, b], axis=1) if approximation == "expand" else a + b

    _, _, subset, _ = dense_called_twice(combine, approximation=approximation, stacked=True,
                                         statistics_examples=3)
    model, _, _, x = dense_called_twice(combine, approximation=approximation, stacked=True)
    optimizer = exact_kfac(approximation=approximation).register(model)
    curvature_step(model, optimizer, x[:3], apply=False)
    for got, expected in zip(subset.running_statistics, optimizer.blocks[0].running_statistics,
                             strict=True):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-7)


def test_unsupported_conv_configurations_raise_clear_errors():
    grouped = keras.layers.Conv2D(4, 3, groups=2)
    grouped.build((None, 6, 6, 4))
    with pytest.raises(NotImplementedError, match="grouped"):
        Conv2DBlock(grouped)
    channels_first = keras.layers.Conv2D(4, 3, data_format="channels_first")
    channels_first.build((None, 3, 6, 6))
    with pytest.raises(NotImplementedError, match="channels_last"):
        Conv2DBlock(channels_first)
    with pytest.raises(ValueError, match="grouped"):
        find_registrable_layers([grouped])
    assert find_registrable_layers([grouped], skip_unsupported=True) == []
    with pytest.raises(ValueError, match="dilation_rate"):
        keras.layers.Conv2D(4, 3, strides=2, dilation_rate=2)  # Keras' own check

    class MyDense(keras.layers.Dense):
        pass

    custom = MyDense(2)
    custom.build((None, 3))
    assert find_registrable_layers([custom]) == []  # subclasses may override call
    with pytest.raises(NotImplementedError, match="expected a Dense"):
        DenseBlock(custom)


# -- GroupNorm ---------------------------------------------------------------------------
def test_group_norm_diagonal_matches_numpy_per_example_gradients():
    rng = np.random.default_rng(7)
    n, size, channels, d_out = 4, 3, 6, 2
    x = rng.normal(size=(n, size, size, channels)).astype("float32") * 2 + 1
    inputs = keras.Input((size, size, channels))
    norm = keras.layers.GroupNormalization(groups=3, epsilon=1e-5,
                                           gamma_initializer="random_normal",
                                           beta_initializer="random_normal")
    keras.utils.set_random_seed(8)
    head = keras.layers.Dense(d_out)
    model = keras.Model(inputs, head(keras.layers.Flatten()(norm(inputs))))
    optimizer = exact_kfac().register(model)
    curvature_step(model, optimizer, x, apply=False)
    block = next(b for b in optimizer.blocks if isinstance(b, GroupNormBlock))

    with tf.GradientTape(persistent=True) as tape:
        outputs = model(x)
    scale = 1.0 / d_out
    for variable, fisher in zip((norm.gamma, norm.beta), block.fisher_diagonals, strict=True):
        jac = tape.jacobian(outputs, variable).numpy()  # [N, D, C]: per-example gradients
        expected = 2 * scale * np.sum(jac ** 2, axis=(0, 1)) / n
        np.testing.assert_allclose(fisher.numpy(), expected, rtol=1e-4, atol=1e-7)

    update = block.precondition([tf.ones(channels), tf.ones(channels)], 0.5, 1.0)
    np.testing.assert_allclose(update[0].numpy(),
                               1 / (block.fisher_diagonals[0].numpy() + 0.5), rtol=1e-6)


@pytest.mark.parametrize("approximation", ["per_example", "expand"])
def test_group_norm_called_twice(approximation):
    """A GroupNorm applied to two inputs whose outputs are summed: per_example sums each
    example's per-channel terms over the calls before squaring, the exact diagonal of the
    Fisher; expand adds the calls' squares (the cross terms left out)."""
    rng = np.random.default_rng(27)
    n, size, channels, d_out = 4, 3, 6, 2
    x = rng.normal(size=(n, size, size, channels)).astype("float32")
    shift = rng.normal(size=x.shape).astype("float32")
    inputs = keras.Input((size, size, channels))
    norm = keras.layers.GroupNormalization(groups=3, gamma_initializer="random_normal",
                                           beta_initializer="random_normal")
    keras.utils.set_random_seed(28)
    head = keras.layers.Dense(d_out)
    summed = norm(inputs) + 0.5 * norm(inputs * inputs + keras.ops.convert_to_tensor(shift))
    model = keras.Model(inputs, head(keras.layers.Flatten()(summed)))
    optimizer = exact_kfac(approximation=approximation).register(model)
    curvature_step(model, optimizer, x, apply=False)
    block = next(b for b in optimizer.blocks if isinstance(b, GroupNormBlock))
    with tf.GradientTape(persistent=True) as tape:
        outputs = model(x)
    for variable, fisher in zip((norm.gamma, norm.beta), block.fisher_diagonals, strict=True):
        jac = tape.jacobian(outputs, variable).numpy()  # [N, D, C]
        exact = 2 / d_out * np.sum(jac ** 2, axis=(0, 1)) / n
        if approximation == "per_example":
            np.testing.assert_allclose(fisher.numpy(), exact, rtol=1e-4, atol=1e-7)
        else:
            assert not np.allclose(fisher.numpy(), exact, rtol=1e-2)


# -- the other likelihoods -----------------------------------------------------------------
def single_dense(d_in=3, d_out=4, seed=9):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((d_in,))
    layer = keras.layers.Dense(d_out, kernel_initializer="random_normal")
    return keras.Model(inputs, layer(inputs))


def test_exact_categorical_g_is_the_softmax_hessian():
    model = single_dense()
    x = np.random.default_rng(10).normal(size=(8, 3)).astype("float32")
    optimizer = exact_kfac().register(model)
    curvature_step(model, optimizer, x, likelihood="categorical", apply=False)
    p = tf.nn.softmax(model(x)).numpy().astype(np.float64)
    hessian = np.mean([np.diag(q) - np.outer(q, q) for q in p], axis=0)  # s_n = 1
    np.testing.assert_allclose(optimizer.blocks[0].g_factor.numpy(), hessian, rtol=1e-5,
                               atol=1e-7)


def test_mc_categorical_g_is_unbiased():
    model = single_dense()
    x = np.random.default_rng(11).normal(size=(8, 3)).astype("float32")
    optimizer = exact_kfac(fisher="mc", mc_samples=300).register(model)
    curvature_step(model, optimizer, x, likelihood="categorical", apply=False)
    p = tf.nn.softmax(model(x)).numpy().astype(np.float64)
    hessian = np.mean([np.diag(q) - np.outer(q, q) for q in p], axis=0)
    np.testing.assert_allclose(optimizer.blocks[0].g_factor.numpy(), hessian, atol=0.02)


def test_empirical_g_uses_the_real_per_example_gradients():
    model = single_dense()
    rng = np.random.default_rng(12)
    x = rng.normal(size=(8, 3)).astype("float32")
    y = rng.normal(size=(8, 4)).astype("float32")
    optimizer = exact_kfac(fisher="empirical").register(model)
    with tf.GradientTape(persistent=True) as tape:
        with optimizer.capture() as captured:
            outputs = model(x)
        loss = tf.reduce_mean(tf.reduce_mean(tf.square(outputs - y), axis=-1))
    optimizer.update_curvature(tape, captured, outputs, loss=loss)
    residual = 2.0 / 4 * (outputs.numpy() - y)  # d l_n / d f_n with l_n = mean_d (f - y)^2
    np.testing.assert_allclose(optimizer.blocks[0].g_factor.numpy(), residual.T @ residual / 8,
                               rtol=1e-5, atol=1e-7)
