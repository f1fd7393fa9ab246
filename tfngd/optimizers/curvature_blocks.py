"""Curvature blocks: what Fisher approximation each kind of layer gets (one class per kind).

A block owns the curvature state of one layer (running factors, their
eigendecompositions or damped inverses) and answers three questions with the
same small interface, in the spirit of kfac-jax's ``curvature_blocks``:

* :meth:`CurvatureBlock.batch_statistics` / :meth:`accumulate_statistics`
  (or both at once, :meth:`update_statistics`): fold one minibatch of captured
  layer inputs and per-example output gradients into the running factors;
* :meth:`update_inverse`: refresh the cached decomposition (every ``T`` steps);
* :meth:`precondition`: multiply the layer's gradients by the damped inverse
  Fisher block.

Notation (docs/kfac.md): ``N`` examples, ``R`` positions sharing the weights
(1 for a Dense layer on ``[N, d]``, the number of tokens for a Dense layer on
``[N, ..., d]``, ``H_out * W_out`` for a Conv2D), ``a_bar`` the layer input (an
image patch for a convolution) with a 1 appended when the layer has a bias,
``g`` the gradient of the per-example loss with respect to the layer's
pre-activation output, at a sampled target (one "probe"; the probes are
pre-scaled so that their sum over probes estimates the output Hessian).

Kronecker-factored blocks (Martens & Grosse 2015, "Optimizing Neural Networks
with Kronecker-factored Approximate Curvature"; Grosse & Martens 2016, "A
Kronecker-factored approximate Fisher matrix for convolution layers", the
"K-FAC-expand" convention)::

    A = 1/(N R) sum_{n,r} a_bar a_bar^T         G = 1/(N R) sum_probes sum_{n,r} g g^T
    F_layer ~= R (A kron G)         acting on the row-major vec of W = [kernel; bias]

or, with ``approximation="reduce"`` (K-FAC-reduce, Eschenhagen et al. 2023,
"Kronecker-Factored Approximate Curvature for Modern Neural Network
Architectures"), the inputs averaged and the output gradients summed over the
positions first::

    a_n = 1/R sum_r a_bar[n, r]      g_n = sum_r g[n, r]
    A = 1/N sum_n a_n a_n^T          G = 1/N sum_probes sum_n g_n g_n^T
    F_layer ~= A kron G              (stored with R := 1, so every formula below holds)

Expand is exact (given the factorisation) when the loss treats each position
as an example (per-pixel losses); reduce is exact when the positions are
pooled before the loss. Both coincide for ``R = 1``. Reduce never forms the
``N R x d_in`` patch products: its factor cost is ``N d_in^2`` instead of
``N R d_in^2`` (a factor 64 on an 8x8 feature map).

Both treat the calls of a layer evaluated ``k`` times per example (several
calls, or one call on ``k`` stacked copies of the batch) as further positions.
When the calls' outputs are *differenced* before the loss, their gradients
nearly cancel and both fail: a Neural Diffusion Model's bound depends on its
transform through ``F(x, t - 1) - F(x, t)`` and ``F(x, s) - F(x_hat, s)``, and
along the gradient expand overstated the transform's curvature by up to
``5.9e4`` and reduce was off by factors from ``0.006`` to ``1.9e3`` (docs/kfac.md
section 2, ``benchmarks/kfac_curvature_check.py``).
``approximation="per_example"`` builds the factors from each example's whole
gradient matrix, every call, copy and position summed first (with ``a_bar`` and
``g`` of one position ``[d_in]`` and ``[d_out]``, per probe)::

    M_n = sum_{calls, copies, r} a_bar g^T                   (d_in x d_out)
    S_A = 1/N sum_probes sum_n M_n M_n^T     S_G = 1/N sum_probes sum_n M_n^T M_n
    tau = tr S_A = tr S_G = 1/N sum_probes sum_n ||M_n||_F^2
    A = S_A / sqrt(tau)     G = S_G / sqrt(tau)     F_layer ~= A kron G   (R := 1)

(``S_A`` and ``S_G`` are what is stored and averaged, over steps and replicas; ``A``
and ``G`` are formed at each refresh: :meth:`KroneckerFactoredBlock.kronecker_factors`.)

``A kron G`` is the Kronecker product nearest, in this moment-matching sense, to
the exact per-example Fisher ``1/N sum vec(M_n) vec(M_n)^T``: it has the right
trace (``tr A tr G = tau``), reduces to ``E[a a^T] kron E[g g^T]`` when every
``M_n = a_n g_n^T`` with ``a`` independent of ``g`` (the K-FAC assumption), and
gives zero curvature to calls that cancel exactly. Cost: ``N R d_in d_out``
to form ``M`` plus ``N d_in d_out (d_in + d_out)`` for the products (expand:
``N R (d_in^2 + d_out^2)``); memory ``N d_in d_out`` per probe.

Damping (``lambda``), two modes:

* ``"pi"``: ``(F + lambda I)^-1 ~= R^-1 (A + pi sqrt(l') I)^-1 kron (G + sqrt(l')/pi I)^-1``
  with ``l' = lambda / R`` and ``pi = sqrt((tr A / dim A) / (tr G / dim G))``, so
  ``U = (A + pi sqrt(l') I)^-1 dW (G + sqrt(l')/pi I)^-1 / R``;
* ``"eigen"``: exact damping of the Kronecker product in its eigenbasis,
  ``U = Q_A [(Q_A^T dW Q_G) / (R l_A l_G^T + lambda)] Q_G^T``.

Both modes decompose the factors with ``tf.linalg.eigh`` (symmetrised,
eigenvalues clipped at 0; see :func:`symmetric_eigh` for the fallback). The
pi mode can instead invert the damped factors by Cholesky
(``inverse_method="cholesky"``): XLA lowers ``eigh`` to a slow Jacobi
iteration but Cholesky to LAPACK/cuSOLVER-speed code (docs/kfac.md).

Diagonal "scale-and-shift" block for GroupNormalization's ``gamma``/``beta``
(per channel, ``x_hat`` the normalised input, ``dy`` the output gradient)::

    F_gamma = 1/N sum_probes sum_n (sum_hw x_hat dy)^2
    F_beta  = 1/N sum_probes sum_n (sum_hw dy)^2
    U = dW / (F + lambda)

All statistics are accumulated in float32 whatever the compute dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import tensorflow as tf

from tfngd.nonfinite import all_finite

DAMPING_MODES = ("pi", "eigen")
INVERSE_METHODS = ("eigh", "cholesky")
APPROXIMATIONS = ("expand", "reduce", "per_example")
# Relative jitter (times the largest diagonal entry) added before a Cholesky factorisation, so
# that float32 rounding can never make a PSD factor plus damping look indefinite.
_CHOLESKY_JITTER = 1e-6
_TINY = 1e-30


def _float32(x):
    return tf.cast(x, tf.float32)


def symmetric_eigh(matrix):
    """Eigendecomposition of a PSD factor that never raises.

    Symmetrises and decomposes in float32; eigenvalues are clipped at 0. If
    the decomposition is not finite although the factor is, it falls back to
    the factor's diagonal (``Q = I``, ``l = diag``: a cheap PSD approximation,
    rather than a second, float64 solver that would double the XLA compile
    time). Returns ``(eigenvalues, eigenvectors, ok, fell_back)``; ``ok`` is
    False only for a non-finite factor, whose placeholders must not be used
    (the caller keeps its previous cache).
    """
    matrix = _float32(matrix)
    symmetric = 0.5 * (matrix + tf.transpose(matrix))
    ok = all_finite([symmetric])
    identity = tf.eye(tf.shape(symmetric)[0], dtype=tf.float32)
    symmetric = tf.where(ok, symmetric, identity)
    values, vectors = tf.linalg.eigh(symmetric)
    fell_back = tf.logical_and(ok, tf.logical_not(all_finite([values, vectors])))
    values = tf.where(fell_back, tf.linalg.diag_part(symmetric), values)
    vectors = tf.where(fell_back, identity, vectors)
    return tf.maximum(values, 0.0), vectors, ok, fell_back


def damped_cholesky_inverse(matrix, shift):
    """``(sym(M) + (shift + jitter) I)^-1`` by Cholesky, and whether it is finite.

    The jitter (``1e-6`` times the largest diagonal entry) keeps the
    factorisation from failing on rounding errors (TensorFlow's CPU kernel
    raises on an indefinite input, XLA returns NaN).
    """
    matrix = _float32(matrix)
    symmetric = 0.5 * (matrix + tf.transpose(matrix))
    identity = tf.eye(tf.shape(symmetric)[0], dtype=tf.float32)
    jitter = _CHOLESKY_JITTER * tf.maximum(tf.reduce_max(tf.linalg.diag_part(symmetric)), _TINY)
    damped = symmetric + (shift + jitter) * identity
    ok = all_finite([damped])
    inverse = tf.linalg.cholesky_solve(tf.linalg.cholesky(tf.where(ok, damped, identity)),
                                       identity)
    return inverse, tf.logical_and(ok, all_finite([inverse]))


def pi_split(a_factor, g_factor):
    """``pi = sqrt((tr A / dim A) / (tr G / dim G))``; 1 when either trace vanishes."""
    a_mean = tf.linalg.trace(a_factor) / tf.cast(tf.shape(a_factor)[0], tf.float32)
    g_mean = tf.linalg.trace(g_factor) / tf.cast(tf.shape(g_factor)[0], tf.float32)
    usable = tf.logical_and(a_mean > _TINY, g_mean > _TINY)
    ratio = tf.where(usable, a_mean, 1.0) / tf.where(usable, g_mean, 1.0)
    return tf.sqrt(ratio)


def validate_modes(damping_mode: str, inverse_method: str, approximation: str = "expand",
                   eigenvalue_correction: bool = False) -> None:
    """Raise a ``ValueError`` for an unknown or incompatible damping mode / inverse method
    / Kronecker approximation / eigenvalue correction (EKFAC)."""
    if approximation not in APPROXIMATIONS:
        raise ValueError(f"approximation must be one of {APPROXIMATIONS}, got {approximation!r}")
    if damping_mode not in DAMPING_MODES:
        raise ValueError(f"damping_mode must be one of {DAMPING_MODES}, got {damping_mode!r}")
    if inverse_method not in INVERSE_METHODS:
        raise ValueError(f"inverse_method must be one of {INVERSE_METHODS}, "
                         f"got {inverse_method!r}")
    if inverse_method == "cholesky" and damping_mode != "pi":
        raise ValueError("inverse_method='cholesky' needs damping_mode='pi' (the eigen mode "
                         "damps in the eigenbasis)")
    if eigenvalue_correction and (damping_mode != "eigen" or inverse_method != "eigh"):
        raise ValueError("eigenvalue_correction (EKFAC) rescales the factors' eigenbasis: it "
                         "needs damping_mode='eigen' and inverse_method='eigh', got "
                         f"{damping_mode!r} and {inverse_method!r}")


def _state_name(layer, suffix: str, bucket: int | None = None) -> str:
    """The optimizer-variable name of a block's state; a noise-level bucket ``b >= 1`` of
    a bucketed Fisher (``KFAC(fisher_buckets=B)``) adds ``_bucket{b}`` (bucket 0 keeps
    the pooled Fisher's names, so ``B = 1`` checkpoints are unchanged)."""
    name = f"{layer.path.replace('/', '_')}_kfac_{suffix}"
    return name if not bucket else f"{name}_bucket{bucket}"


class CurvatureBlock:
    """The curvature of one layer's trainable variables.

    Subclasses set ``variables`` (the model variables the block
    preconditions, in a fixed order) in ``__init__`` and implement the
    statistics, inverse and preconditioning methods below.
    """

    #: The exact Keras layer class the block models.
    layer_type: type = keras.layers.Layer

    def __init__(self, layer, damping_mode: str = "pi", inverse_method: str = "eigh",
                 approximation: str = "expand", eigenvalue_correction: bool = False):
        reason = self.unsupported_reason(layer)
        if reason is not None:
            raise NotImplementedError(f"{type(self).__name__} cannot model layer "
                                      f"'{layer.path}': {reason}")
        validate_modes(damping_mode, inverse_method, approximation, eigenvalue_correction)
        self.layer = layer
        self.damping_mode = damping_mode
        self.inverse_method = inverse_method
        self.approximation = approximation
        self.eigenvalue_correction = bool(eigenvalue_correction)
        self.variables: list = []
        #: The noise-level bucket whose Fisher the block holds (None: the pooled Fisher).
        self.bucket: int | None = None

    @classmethod
    def unsupported_reason(cls, layer) -> str | None:
        """Why this block cannot model ``layer`` (None when it can)."""
        if type(layer) is not cls.layer_type:
            return f"expected a {cls.layer_type.__name__}, got {type(layer).__name__}"
        if getattr(layer, "quantization_mode", None) is not None:
            return "quantized layers are not supported"
        if getattr(layer, "lora_enabled", False):
            return "LoRA-enabled layers are not supported"
        return None

    @property
    def name(self) -> str:
        return self.layer.path

    def state_name(self, suffix: str) -> str:
        return _state_name(self.layer, suffix, self.bucket)

    # -- interface -----------------------------------------------------------
    def create_state(self, optimizer) -> None:
        """Create the block's optimizer variables: running statistics with
        ``optimizer.add_statistics_variable`` (replica-local), caches with
        ``optimizer.add_variable``."""
        raise NotImplementedError

    def batch_statistics(self, inputs: Sequence, output_gradients: Sequence[Sequence],
                         examples=None, example_weights=None) -> list:
        """Minibatch statistics from the layer's calls in one forward pass.

        Args:
          inputs: the layer input of each call.
          output_gradients: for each call, the list (over probes) of
            per-example gradients with respect to that call's pre-activation
            output (not divided by ``N``).
          examples: ``N``, the number of examples of the loss (default: the
            first call's batch). A call's batch must be ``k N``: ``k`` stacked
            copies of the examples (a model that batches several evaluations
            of a network, e.g. at several times, into one call), example-major
            within each copy. Every copy of every call is a set of further
            positions of the same ``N`` examples.
          example_weights: ``c_n >= 0`` (``[N]``) or None: the statistics become the
            ``c``-weighted means ``sum_n c_n x_n / sum_n c_n`` of the per-example terms
            ``x_n`` instead of the plain means (0/1 weights select the examples of one
            noise-level bucket, ``KFAC(fisher_buckets=B)``; ``sum_n c_n`` must be > 0).
            Supported by the expand and reduce Kronecker factors and GroupNorm.
        """
        raise NotImplementedError

    def accumulate_statistics(self, statistics: Sequence, decay) -> None:
        """``running <- decay * running + (1 - decay) * batch`` for each statistic."""
        for running, batch in zip(self.running_statistics, statistics, strict=True):
            running.assign(decay * running + (1.0 - decay) * batch)

    def update_statistics(self, inputs, output_gradients, decay, examples=None) -> None:
        self.accumulate_statistics(self.batch_statistics(inputs, output_gradients, examples),
                                   decay)

    @property
    def running_statistics(self) -> list:
        """The optimizer variables holding the running (uncorrected) statistics."""
        raise NotImplementedError

    def cached_state(self) -> list:
        """The optimizer variables holding the cached inverses / decompositions."""
        return []

    def update_inverse(self, damping, correction) -> tf.Tensor:
        """Refresh the cached decomposition; returns whether it succeeded.

        ``correction`` is the EMA bias correction ``1 / (1 - decay^k)``.
        """
        raise NotImplementedError

    def precondition(self, gradients: Sequence, damping, correction) -> list:
        """Damped inverse Fisher block times the gradients (same order as ``variables``)."""
        raise NotImplementedError

    def curvature_along(self, statistics: Sequence, gradients: Sequence) -> tf.Tensor:
        """``d^T F d`` for the direction ``d = gradients`` (same order as ``variables``) under
        the undamped Fisher block of ``statistics`` (what :meth:`batch_statistics` returns)."""
        raise NotImplementedError

    def diagnostics(self) -> dict:
        """Scalars describing the curvature from the last inverse refresh."""
        raise NotImplementedError


def _example_count(inputs: Sequence, examples=None) -> tf.Tensor:
    """``N`` as an int32 scalar: ``examples``, or the first call's batch size."""
    if examples is None:
        return tf.shape(inputs[0])[0]
    return tf.cast(examples, tf.int32)


def _copies(values, examples) -> tf.Tensor:
    """``[k, N, ...]``: a call's ``[k N, ...]`` tensor split into its ``k`` stacked copies."""
    return tf.reshape(values, tf.concat([[-1, examples], tf.shape(values)[1:]], 0))


def _products_through_matrices(rows, gradients) -> tuple:
    """``(sum_n M_n M_n^T, sum_n M_n^T M_n)`` with ``M_n = a_n^T g_n`` formed explicitly
    (``rows`` ``a``: ``[N, P, d_in]``, ``gradients`` ``g``: ``[N, P, d_out]``)."""
    matrices = tf.einsum("npi,npo->nio", rows, gradients)
    return (tf.einsum("nio,njo->ij", matrices, matrices),
            tf.einsum("nio,nip->op", matrices, matrices))


def _products_through_gram(rows, gradients) -> tuple:
    """The same sums through the ``P x P`` Gram matrices ``a_n a_n^T`` and ``g_n g_n^T``."""
    a_gram = tf.einsum("npi,nqi->npq", rows, rows)
    g_gram = tf.einsum("npo,nqo->npq", gradients, gradients)
    return (tf.einsum("npi,npj->ij", rows, tf.einsum("npq,nqj->npj", g_gram, rows)),
            tf.einsum("npo,npr->or", gradients, tf.einsum("npq,nqr->npr", a_gram, gradients)))


def _row_weights(example_weights, examples, rows) -> tf.Tensor:
    """``[k N R, 1]``: each row of a call's ``[k N, R, d]`` rows (``k`` stacked copies of the
    ``N`` examples, copy-major) weighted by its example's weight."""
    copies = tf.shape(rows)[0] // examples
    per_call_row = tf.tile(_float32(example_weights), [copies])  # [k N]
    return tf.reshape(tf.repeat(per_call_row, tf.shape(rows)[1]), (-1, 1))


def _sum_per_example(values, examples, channels: int) -> tf.Tensor:
    """``[N, channels]``: ``values`` (``[k N, ..., channels]``, ``k`` stacked copies of the
    ``N`` examples) summed over the copies and every position in between."""
    values = tf.reshape(_float32(values), (-1, examples, tf.reduce_prod(tf.shape(values)[1:-1]),
                                           channels))
    return tf.reduce_sum(values, axis=(0, 2))


class KroneckerFactoredBlock(CurvatureBlock):
    """Shared machinery of the Dense and Conv2D blocks: ``F ~= R (A kron G)``.

    Subclasses define the rows of ``a`` (``_input_rows``) and the shape of the
    kernel as a ``[d_in, d_out]`` matrix.
    """

    def __init__(self, layer, damping_mode: str = "pi", inverse_method: str = "eigh",
                 approximation: str = "expand", eigenvalue_correction: bool = False):
        super().__init__(layer, damping_mode, inverse_method, approximation,
                         eigenvalue_correction)
        self.has_bias = layer.bias is not None
        self.variables = [layer.kernel] + ([layer.bias] if self.has_bias else [])
        kernel_shape = tuple(layer.kernel.shape)
        self.output_dim = int(kernel_shape[-1])
        self.kernel_rows = 1
        for size in kernel_shape[:-1]:
            self.kernel_rows *= int(size)
        self.input_dim = self.kernel_rows + int(self.has_bias)

    def _input_rows(self, inputs) -> tf.Tensor:
        """``[N, R, kernel_rows]`` float32 rows ``a`` (image patches for a convolution)."""
        raise NotImplementedError

    def create_state(self, optimizer) -> None:
        def add(shape, suffix, initializer="zeros"):
            return optimizer.add_variable(shape, initializer=initializer, dtype="float32",
                                          name=self.state_name(suffix))

        def statistic(shape, suffix, initializer="zeros"):
            return optimizer.add_statistics_variable(shape, initializer=initializer,
                                                     name=self.state_name(suffix))

        d_a, d_g = self.input_dim, self.output_dim
        self.a_factor = statistic((d_a, d_a), "A")
        self.g_factor = statistic((d_g, d_g), "G")
        self.positions = statistic((), "positions", "ones")
        if self.damping_mode == "pi":
            self.a_inverse = add((d_a, d_a), "A_inverse")
            self.g_inverse = add((d_g, d_g), "G_inverse")
        else:
            self.a_eigenvectors = add((d_a, d_a), "A_eigenvectors")
            self.a_eigenvalues = add((d_a,), "A_eigenvalues")
            self.g_eigenvectors = add((d_g, d_g), "G_eigenvectors")
            self.g_eigenvalues = add((d_g,), "G_eigenvalues")
        if self.eigenvalue_correction:
            # EKFAC: the Fisher's diagonal in the Kronecker eigenbasis, the mean of the
            # batches' estimates since the basis was last refreshed, with the Kronecker
            # eigenvalues counted as one more estimate (sum and count).
            self.kfe_sum = statistic((d_a, d_g), "kfe_sum")
            self.kfe_count = statistic((), "kfe_count", "ones")
        # eigh: A min, A max, G min, G max eigenvalues; cholesky: A, G mean eigenvalue and pi.
        self.spectrum = add((4,), "spectrum")
        self.decomposition_fallbacks = optimizer.add_variable(
            (), dtype="int64", name=self.state_name("decomposition_fallbacks"))

    @property
    def running_statistics(self) -> list:
        kfe = [self.kfe_sum, self.kfe_count] if self.eigenvalue_correction else []
        return [self.a_factor, self.g_factor, self.positions, *kfe]

    def cached_state(self) -> list:
        if self.damping_mode == "pi":
            return [self.a_inverse, self.g_inverse]
        return [self.a_eigenvectors, self.a_eigenvalues, self.g_eigenvectors, self.g_eigenvalues]

    def accumulate_statistics(self, statistics, decay) -> None:
        a_batch, g_batch, positions = statistics[:3]
        self.a_factor.assign(decay * self.a_factor + (1.0 - decay) * a_batch)
        self.g_factor.assign(decay * self.g_factor + (1.0 - decay) * g_batch)
        self.positions.assign(positions)  # a shape property, not averaged
        if self.eigenvalue_correction:  # a plain mean: the basis is only that old
            self.kfe_sum.assign_add(statistics[3])
            self.kfe_count.assign_add(1.0)

    def batch_statistics(self, inputs, output_gradients, examples=None,
                         example_weights=None) -> list:
        """``[A, G, R]`` of this batch (``R = 1`` for ``approximation="reduce"``).

        The positions of example ``n`` are those of every call and every stacked copy
        (see :meth:`CurvatureBlock.batch_statistics`). Expand folds all rows into ``A``
        and ``G`` and stores ``R`` = rows / ``N``; reduce averages the inputs and sums
        the output gradients over all positions of an example first.
        """
        examples = _example_count(inputs, examples)
        if example_weights is not None and (self.approximation == "per_example"
                                            or self.eigenvalue_correction):
            raise NotImplementedError("example_weights (a bucketed Fisher) need "
                                      "approximation 'expand' or 'reduce', without EKFAC")
        if self.approximation == "reduce":
            factors = self._reduced_statistics(inputs, output_gradients, examples,
                                               example_weights)
        elif self.approximation == "per_example":
            factors = self._per_example_statistics(inputs, output_gradients, examples)
        else:
            factors = self._expanded_statistics(inputs, output_gradients, examples,
                                                example_weights)
        if self.eigenvalue_correction:
            factors.append(self._eigenbasis_second_moments(inputs, output_gradients, examples))
        return factors

    def _expanded_statistics(self, inputs, output_gradients, examples,
                             example_weights=None) -> list:
        """Expand: every row (position, call, copy) of ``a`` and ``g`` an example (with
        ``example_weights``, every row weighted by its example's ``c_n``)."""
        a_sum = tf.zeros((self.input_dim, self.input_dim), tf.float32)
        g_sum = tf.zeros((self.output_dim, self.output_dim), tf.float32)
        rows = tf.constant(0.0)
        for call_inputs, probe_gradients in zip(inputs, output_gradients, strict=True):
            a = self._input_rows(call_inputs)  # [kN, R, kernel_rows]
            row_weights = (None if example_weights is None
                           else _row_weights(example_weights, examples, a))
            a = self._with_bias_column(tf.reshape(a, (-1, self.kernel_rows)))
            weighted_a = a if row_weights is None else a * row_weights
            a_sum += tf.matmul(weighted_a, a, transpose_a=True)
            for g in probe_gradients:
                g = tf.reshape(_float32(g), (-1, self.output_dim))
                weighted_g = g if row_weights is None else g * row_weights
                g_sum += tf.matmul(weighted_g, g, transpose_a=True)
            rows += (tf.cast(tf.shape(a)[0], tf.float32) if row_weights is None
                     else tf.reduce_sum(row_weights))
        rows = tf.maximum(rows, 1.0) if example_weights is None else tf.maximum(rows, _TINY)
        count = (tf.maximum(tf.cast(examples, tf.float32), 1.0) if example_weights is None
                 else tf.maximum(tf.reduce_sum(_float32(example_weights)), _TINY))
        return [a_sum / rows, g_sum / rows, rows / count]

    def _reduced_statistics(self, inputs, output_gradients, examples,
                            example_weights=None) -> list:
        """K-FAC-reduce over every position of an example: ``a_n`` the mean of its
        input rows (all calls, copies and positions), ``g_n`` the sum of their gradients
        (with ``example_weights``, the means over examples weighted by ``c_n``)."""
        row_sum = tf.zeros((examples, self.kernel_rows), tf.float32)
        positions = tf.constant(0.0)
        g_total = None
        for call_inputs, probe_gradients in zip(inputs, output_gradients, strict=True):
            rows = self._input_rows(call_inputs)  # [kN, R, kernel_rows]
            rows = tf.reshape(rows, (-1, examples, tf.shape(rows)[1], self.kernel_rows))
            row_sum += tf.reduce_sum(rows, axis=(0, 2))
            positions += tf.cast(tf.shape(rows)[0] * tf.shape(rows)[2], tf.float32)
            g_call = [_sum_per_example(g, examples, self.output_dim) for g in probe_gradients]
            g_total = g_call if g_total is None else [
                total + g for total, g in zip(g_total, g_call, strict=True)]
        a = self._with_bias_column(row_sum / tf.maximum(positions, 1.0))
        if example_weights is None:
            count, weights = tf.maximum(tf.cast(examples, tf.float32), 1.0), None
        else:
            weights = tf.reshape(_float32(example_weights), (-1, 1))
            count = tf.maximum(tf.reduce_sum(weights), _TINY)
        g_sum = tf.zeros((self.output_dim, self.output_dim), tf.float32)
        for g in g_total:
            g_sum += tf.matmul(g if weights is None else g * weights, g, transpose_a=True)
        a_sum = tf.matmul(a if weights is None else a * weights, a, transpose_a=True)
        return [a_sum / count, g_sum / count, tf.constant(1.0)]

    def _per_example_statistics(self, inputs, output_gradients, examples) -> list:
        """``[S_A, S_G, 1]``, the second moments ``1/N sum M_n M_n^T`` and ``1/N sum M_n^T
        M_n`` of the per-example gradient matrices ``M_n`` (module docstring; every call,
        stacked copy and position of an example summed into one ``M_n``). They are
        averaged as they are (over steps, and over replicas, linearly) and normalised
        into ``A, G`` by :meth:`kronecker_factors`.

        With ``a_n`` (``[P, d_in]``) and ``g_n`` (``[P, d_out]``) the ``P`` rows of example
        ``n`` over all calls, copies and positions, ``M_n = a_n^T g_n``, and the products
        are formed through ``M_n`` (``P d_in d_out + d_in d_out (d_in + d_out)`` per
        example) when a call has several positions (convolutions, Dense over tokens:
        ``P`` large), or else through the ``P x P`` Gram matrices, ``M_n M_n^T = a_n^T
        (g_n g_n^T) a_n`` and ``M_n^T M_n = g_n^T (a_n a_n^T) g_n`` (``P^2 (d_in + d_out)
        + P (d_in^2 + d_out^2)``: a Dense layer on vectors called a few times, where
        forming ``M_n`` would cost ``d / (2 P)`` times more); the same numbers up to
        rounding (tested).
        """
        count = tf.maximum(tf.cast(examples, tf.float32), 1.0)
        use_gram = self.per_example_gram
        if use_gram is None:  # one position per call (static shapes): Gram; otherwise M_n
            use_gram = all(None not in call[0].shape[1:-1] and math.prod(call[0].shape[1:-1]) == 1
                           for call in output_gradients)
        rows, per_probe = self._per_example_matrices(inputs, output_gradients, examples)
        m_m_t = tf.zeros((self.input_dim, self.input_dim), tf.float32)
        m_t_m = tf.zeros((self.output_dim, self.output_dim), tf.float32)
        for gradients in per_probe:
            products = (_products_through_gram if use_gram
                        else _products_through_matrices)(rows, gradients)
            m_m_t, m_t_m = m_m_t + products[0], m_t_m + products[1]
        return [m_m_t / count, m_t_m / count, tf.constant(1.0)]

    def _per_example_matrices(self, inputs, output_gradients, examples):
        """``(rows, [gradients per probe])``: ``[N, P, d_in]`` and ``[N, P, d_out]``, the
        rows of every call, copy and position of each example (``M_n = rows_n^T g_n``)."""
        rows = tf.concat([self._per_example_rows(self._with_bias_column(
            self._input_rows(call_inputs)), examples) for call_inputs in inputs], axis=1)
        gradients = [tf.concat([self._per_example_rows(tf.reshape(
            _float32(call[probe]), (tf.shape(call[probe])[0], -1, self.output_dim)),
            examples) for call in output_gradients], axis=1)
            for probe in range(len(output_gradients[0]))]
        return rows, gradients

    def _eigenbasis_second_moments(self, inputs, output_gradients, examples) -> tf.Tensor:
        """EKFAC (George et al. 2018): ``s = 1/N sum_probes sum_n (Q_A^T M_n Q_G)^2``, the
        diagonal of the per-example Fisher ``1/N sum_n vec(M_n) vec(M_n)^T`` in the current
        Kronecker eigenbasis ``Q_A kron Q_G`` (every position of an example summed into
        ``M_n``). Its best-in-Frobenius-norm diagonal there, where K-FAC uses
        ``R lambda_A lambda_G`` (equal when ``a`` and ``g`` are independent and positions
        uncorrelated). Costs ``P (d_in^2 + d_out^2) + P d_in d_out`` per example."""
        count = tf.maximum(tf.cast(examples, tf.float32), 1.0)
        rows, gradients = self._per_example_matrices(inputs, output_gradients, examples)
        rows = tf.einsum("npi,ia->npa", rows, self.a_eigenvectors)
        total = tf.zeros((self.input_dim, self.output_dim), tf.float32)
        for probe in gradients:
            probe = tf.einsum("npo,og->npg", probe, self.g_eigenvectors)
            total += tf.reduce_sum(tf.square(tf.einsum("npa,npg->nag", rows, probe)), axis=0)
        return total / count

    #: Force the per-example products through ``M_n`` (False) or the Gram matrices (True);
    #: None: Gram for layers with one position per call (tests set it to compare the two).
    per_example_gram: bool | None = None

    @staticmethod
    def _per_example_rows(values, examples) -> tf.Tensor:
        """``[N, k R, d]``: a call's ``[k N, R, d]`` rows regrouped by example."""
        copies = _copies(values, examples)  # [k, N, R, d]
        shape = tf.shape(copies)
        return tf.reshape(tf.transpose(copies, [1, 0, 2, 3]),
                          (shape[1], shape[0] * shape[2], shape[3]))

    def _with_bias_column(self, a) -> tf.Tensor:
        """``a_bar``: the rows (last axis) with a 1 appended when the layer has a bias."""
        if self.has_bias:
            return tf.concat([a, tf.ones_like(a[..., :1])], axis=-1)
        return a

    # -- inverse ---------------------------------------------------------------
    def kronecker_factors(self, statistics=None, correction=1.0) -> tuple:
        """``(A, G, R)`` with ``F_layer ~= R (A kron G)``, from the running statistics (times
        the EMA bias ``correction``) or from one batch's ``statistics``. For
        ``approximation="per_example"`` the stored moments are normalised here:
        ``A = S_A / sqrt(tau)``, ``G = S_G / sqrt(tau)`` with ``tau = tr S_A = tr S_G``."""
        a, g, positions = (statistics if statistics is not None else self.running_statistics)[:3]
        a, g = a * correction, g * correction
        if self.approximation == "per_example":
            root = tf.sqrt(tf.maximum(tf.linalg.trace(a), _TINY))
            a, g = a / root, g / root
        return a, g, positions

    def update_inverse(self, damping, correction) -> tf.Tensor:
        if self.inverse_method == "cholesky":
            return self._update_cholesky_inverses(damping, correction)
        a_factor, g_factor, _ = self.kronecker_factors(correction=correction)
        a_values, a_vectors, a_ok, a_fell_back = symmetric_eigh(a_factor)
        g_values, g_vectors, g_ok, g_fell_back = symmetric_eigh(g_factor)
        ok = tf.logical_and(a_ok, g_ok)
        self.decomposition_fallbacks.assign_add(
            tf.cast(a_fell_back, tf.int64) + tf.cast(g_fell_back, tf.int64))
        if self.damping_mode == "pi":
            pi = pi_split(a_factor, g_factor)
            root = tf.sqrt(damping / self.positions)
            a_inverse = tf.matmul(a_vectors / (a_values + pi * root), a_vectors, transpose_b=True)
            g_inverse = tf.matmul(g_vectors / (g_values + root / pi), g_vectors, transpose_b=True)
            ok = tf.logical_and(ok, all_finite([a_inverse, g_inverse]))
            new_state = [(self.a_inverse, a_inverse), (self.g_inverse, g_inverse)]
        else:
            new_state = [(self.a_eigenvectors, a_vectors), (self.a_eigenvalues, a_values),
                         (self.g_eigenvectors, g_vectors), (self.g_eigenvalues, g_values)]
            if self.eigenvalue_correction:  # a new basis: start from K-FAC's eigenvalues
                new_state += [(self.kfe_sum, self.positions * a_values[:, None]
                               * g_values[None, :]), (self.kfe_count, tf.constant(1.0))]
        extremes = tf.stack([tf.reduce_min(a_values), tf.reduce_max(a_values),
                             tf.reduce_min(g_values), tf.reduce_max(g_values)])
        new_state.append((self.spectrum, extremes))
        return self._assign_if(ok, new_state)

    def _update_cholesky_inverses(self, damping, correction) -> tf.Tensor:
        a_factor, g_factor, _ = self.kronecker_factors(correction=correction)
        pi = pi_split(a_factor, g_factor)
        root = tf.sqrt(damping / self.positions)
        a_inverse, a_ok = damped_cholesky_inverse(a_factor, pi * root)
        g_inverse, g_ok = damped_cholesky_inverse(g_factor, root / pi)
        mean_eigenvalues = [tf.linalg.trace(f) / tf.cast(tf.shape(f)[0], tf.float32)
                            for f in (a_factor, g_factor)]
        return self._assign_if(tf.logical_and(a_ok, g_ok), [
            (self.a_inverse, a_inverse), (self.g_inverse, g_inverse),
            (self.spectrum, tf.stack([*mean_eigenvalues, pi, 0.0]))])

    @staticmethod
    def _assign_if(ok, new_state) -> tf.Tensor:
        """Assign the new cache only when it is valid (the previous one is kept otherwise)."""
        for variable, value in new_state:
            variable.assign(tf.where(ok, value, variable))
        return ok

    # -- preconditioning -----------------------------------------------------
    def _gradient_matrix(self, gradients) -> tf.Tensor:
        """``dW = [kernel gradient as [d_in, d_out]; bias gradient]``."""
        kernel_grad = tf.reshape(_float32(gradients[0]), (self.kernel_rows, self.output_dim))
        if not self.has_bias:
            return kernel_grad
        return tf.concat([kernel_grad, _float32(gradients[1])[None, :]], axis=0)

    def _split(self, matrix) -> list:
        kernel = tf.reshape(matrix[: self.kernel_rows], self.variables[0].shape)
        if not self.has_bias:
            return [kernel]
        return [kernel, matrix[self.kernel_rows]]

    def curvature_along(self, statistics, gradients) -> tf.Tensor:
        a_factor, g_factor, positions = self.kronecker_factors(statistics)
        direction = self._gradient_matrix(gradients)
        return positions * tf.reduce_sum((a_factor @ direction @ g_factor) * direction)

    def precondition(self, gradients, damping, correction) -> list:
        grad = self._gradient_matrix(gradients)
        if self.damping_mode == "pi":
            update = self.a_inverse @ grad @ self.g_inverse / self.positions
        else:
            q_a, q_g = self.a_eigenvectors, self.g_eigenvectors
            rotated = tf.matmul(q_a, grad, transpose_a=True) @ q_g
            scale = (self.eigenbasis_scale() if self.eigenvalue_correction else
                     self.positions * self.a_eigenvalues[:, None] * self.g_eigenvalues[None, :])
            update = q_a @ tf.matmul(rotated / (scale + damping), q_g, transpose_b=True)
        return self._split(update)

    def eigenbasis_scale(self) -> tf.Tensor:
        """EKFAC's curvature ``s`` in the eigenbasis (``[d_in, d_out]``): the mean of the
        Kronecker eigenvalues at the last refresh and the batches' estimates since."""
        return self.kfe_sum / tf.maximum(self.kfe_count, 1.0)

    def diagnostics(self) -> dict:
        names = (("A_mean_eig", "G_mean_eig", "pi") if self.inverse_method == "cholesky"
                 else ("A_eig_min", "A_eig_max", "G_eig_min", "G_eig_max"))
        result = {name: self.spectrum[i] for i, name in enumerate(names)}
        result["decomposition_fallbacks"] = self.decomposition_fallbacks
        return result


class DenseBlock(KroneckerFactoredBlock):
    """A ``keras.layers.Dense`` on ``[N, ..., d_in]``: the middle axes are positions ``R``."""

    layer_type = keras.layers.Dense

    def _input_rows(self, inputs):
        inputs = _float32(inputs)
        return tf.reshape(inputs, (tf.shape(inputs)[0], -1, self.kernel_rows))


class Conv2DBlock(KroneckerFactoredBlock):
    """A channels-last ``keras.layers.Conv2D`` (any padding, stride or dilation Keras allows).

    ``a`` rows are the ``k_h * k_w * C_in`` image patches, in the order of
    ``kernel.reshape(-1, C_out)``, extracted with ``tf.image.extract_patches``
    (whose ``SAME`` padding and ``rates`` match ``tf.nn.convolution``'s; the
    tests check patches @ kernel == conv output). ``R = H_out * W_out``.
    """

    layer_type = keras.layers.Conv2D

    @classmethod
    def unsupported_reason(cls, layer):
        reason = super().unsupported_reason(layer)
        if reason is not None:
            return reason
        if layer.data_format != "channels_last":
            return "only data_format='channels_last' is supported"
        if layer.groups != 1:
            return f"grouped convolutions (groups={layer.groups}) are not supported"
        if layer.padding not in ("same", "valid"):
            return f"padding={layer.padding!r} is not supported"
        return None

    def _input_rows(self, inputs):
        kernel_h, kernel_w = self.layer.kernel_size
        patches = tf.image.extract_patches(
            _float32(inputs),
            sizes=[1, kernel_h, kernel_w, 1],
            strides=[1, *self.layer.strides, 1],
            rates=[1, *self.layer.dilation_rate, 1],
            padding=self.layer.padding.upper(),
        )
        return tf.reshape(patches, (tf.shape(patches)[0], -1, self.kernel_rows))


class GroupNormBlock(CurvatureBlock):
    """Diagonal scale-and-shift Fisher of ``keras.layers.GroupNormalization`` (channels last)."""

    layer_type = keras.layers.GroupNormalization

    @classmethod
    def unsupported_reason(cls, layer):
        reason = super().unsupported_reason(layer)
        if reason is not None:
            return reason
        spec = getattr(layer, "input_spec", None)
        last_axis = spec.ndim - 1 if spec is not None and spec.ndim else -1
        if layer.axis not in (-1, last_axis):
            return f"only the last (channels) axis can be normalised (axis={layer.axis})"
        if not (layer.scale or layer.center):
            return "the layer has neither gamma nor beta"
        return None

    def __init__(self, layer, damping_mode: str = "pi", inverse_method: str = "eigh",
                 approximation: str = "expand", eigenvalue_correction: bool = False):
        # Its diagonal Fisher is already exact in its (the coordinate) basis: the eigenvalue
        # correction has nothing to correct.
        super().__init__(layer, damping_mode, inverse_method, approximation,
                         eigenvalue_correction)
        self.variables = ([layer.gamma] if layer.scale else []) + (
            [layer.beta] if layer.center else [])
        self.channels = int(self.variables[0].shape[0])

    def create_state(self, optimizer) -> None:
        self.fisher_diagonals = [
            optimizer.add_statistics_variable((self.channels,),
                                              name=self.state_name(f"{v.name}_fisher"))
            for v in self.variables
        ]
        self.spectrum = optimizer.add_variable((2,), dtype="float32",
                                               name=self.state_name("fisher_extremes"))

    @property
    def running_statistics(self) -> list:
        return self.fisher_diagonals

    def normalized_inputs(self, inputs) -> tf.Tensor:
        """``x_hat`` as ``[N, P, C]`` (P = positions), in float32."""
        x = _float32(inputs)
        groups = self.layer.groups
        grouped = tf.reshape(x, (tf.shape(x)[0], -1, groups, self.channels // groups))
        mean, variance = tf.nn.moments(grouped, axes=[1, 3], keepdims=True)
        x_hat = (grouped - mean) * tf.math.rsqrt(variance + self.layer.epsilon)
        return tf.reshape(x_hat, (tf.shape(x)[0], -1, self.channels))

    def batch_statistics(self, inputs, output_gradients, examples=None,
                         example_weights=None) -> list:
        """Per channel, ``1/N sum_probes sum_n t_n^2`` with ``t_n`` an example's
        ``sum_hw x_hat dy`` (gamma) or ``sum_hw dy`` (beta) of one call, the calls'
        terms treated as independent (the diagonal analogue of expand's extra
        positions); with ``approximation="per_example"`` the terms are summed over the
        calls and stacked copies first, which is the exact diagonal."""
        count = _example_count(inputs, examples)
        x_hats = [self.normalized_inputs(call_inputs) for call_inputs in inputs]
        sums = [tf.zeros((self.channels,), tf.float32) for _ in self.variables]
        for probe in range(len(output_gradients[0])):
            per_call = []  # per call: its [k N, C] terms of gamma, then of beta
            for x_hat, probe_gradients in zip(x_hats, output_gradients, strict=True):
                dy = tf.reshape(_float32(probe_gradients[probe]), tf.shape(x_hat))
                per_call.append(([tf.reduce_sum(x_hat * dy, axis=1)] if self.layer.scale else [])
                                + ([tf.reduce_sum(dy, axis=1)] if self.layer.center else []))
            for index in range(len(self.variables)):
                terms = [call[index] for call in per_call]
                if self.approximation == "per_example":
                    terms = [tf.add_n([tf.reduce_sum(_copies(t, count), axis=0) for t in terms])]
                if example_weights is None:
                    sums[index] += tf.add_n([tf.reduce_sum(tf.square(t), axis=0)
                                             for t in terms])
                else:  # t: [k N, C], k stacked copies of the examples
                    sums[index] += tf.add_n([tf.reduce_sum(
                        tf.square(t) * tf.tile(_float32(example_weights),
                                               [tf.shape(t)[0] // count])[:, None], axis=0)
                        for t in terms])
        if example_weights is None:
            examples = tf.maximum(tf.cast(count, tf.float32), 1.0)
        else:
            examples = tf.maximum(tf.reduce_sum(_float32(example_weights)), _TINY)
        return [s / examples for s in sums]

    def update_inverse(self, damping, correction) -> tf.Tensor:
        diagonal = tf.concat([f * correction for f in self.fisher_diagonals], axis=0)
        self.spectrum.assign(tf.stack([tf.reduce_min(diagonal), tf.reduce_max(diagonal)]))
        return tf.constant(True)  # nothing to decompose: the diagonal is used as is

    def curvature_along(self, statistics, gradients) -> tf.Tensor:
        return tf.add_n([tf.reduce_sum(f * tf.square(_float32(g)))
                         for f, g in zip(statistics, gradients, strict=True)])

    def precondition(self, gradients, damping, correction) -> list:
        return [_float32(g) / (f * correction + damping)
                for g, f in zip(gradients, self.fisher_diagonals, strict=True)]

    def diagnostics(self) -> dict:
        return {"fisher_min": self.spectrum[0], "fisher_max": self.spectrum[1]}


BLOCK_TYPES: dict[type, type[CurvatureBlock]] = {
    keras.layers.Dense: DenseBlock,
    keras.layers.Conv2D: Conv2DBlock,
    keras.layers.GroupNormalization: GroupNormBlock,
}


def block_type_for(layer) -> type[CurvatureBlock] | None:
    """The block class for ``layer``'s exact type (subclasses may override ``call``: None)."""
    return BLOCK_TYPES.get(type(layer))
