"""``SampleSpaceNGD``: natural gradient solved in the space of samples (the dual form).

One optimizer, four metrics; docs/ngd-variants.md states each one (objective, metric,
update, cost per step) and derives the formulas below once.

Notation. The train step's :class:`~tfngd.optimizers.ForwardPass` defines the objective
as the Gaussian likelihood ``L = 1/N sum_n s_n ||y_n - f_n||^2`` of the outputs ``f``
(``N`` examples, ``D`` output elements each, ``s`` the per-example or per-element scale),
``g = dL/dtheta`` its gradient, ``e = dL/df`` its output gradient and ``J = df/dtheta``.
The Gauss-Newton matrix of ``L`` is ``J^T diag(h^2) J`` with ``h = sqrt(2 s / N)``.

Each metric is a linear map of the outputs into a sample space of dimension ``m``,
``z = C^T f`` with the coefficients ``C`` held fixed (no gradient through them), a
positive-definite ``m x m`` matrix ``K``, and the pulled-back metric
``G = Jt^T K^{-1} Jt`` with ``Jt = dz/dtheta``:

* ``gauss_newton``: ``z = h * f``, ``K = I``, ``m = N D``;
* ``empirical``: ``z_n = sqrt(N) <e_n, f_n>``, ``K = I``, ``m = N``;
* ``stein`` (particle-based): ``z = h * f``, ``K = k(Y, Y) kron I_D``, ``m = N D``;
* ``wasserstein_kernel`` (kernel-based): ``z_j = sum_n w_n <grad_y k(Y_j, y_n), f_n>``,
  ``K_ij = sum_n w_n <grad_y k(Y_i, y_n), grad_y k(Y_j, y_n)>``, ``m = M``.

(``gauss_newton``: the Gauss-Newton / Fisher matrix; ``empirical``: the empirical Fisher
``1/N sum_n grad l_n grad l_n^T``; ``stein``: the RKHS norm, under the SVGD kernel ``k``,
of the smoothest velocity field that moves every particle ``y_n = f_n`` as the weights
do; ``wasserstein_kernel``: the kernelised Wasserstein information matrix of the outputs'
distribution, Arbel et al. 2020, with potentials spanned by ``k(Y_j, .)`` at ``M``
Nystrom points ``Y_j``, particle weights ``w_n = 2 mean(s_n) / N``.)

The step with damping ``lambda`` and SPRING momentum ``mu`` (Goldshlager et al. 2024) is
``phi_k = argmin_phi -2 g^T phi + phi^T G phi + lambda ||phi - mu phi_{k-1}||^2``::

    phi_k = (G + lambda I)^{-1} (g + lambda mu phi_{k-1})
          = Jt^T (Jt Jt^T + lambda K)^{-1} (rho - mu Jt phi_{k-1}) + mu phi_{k-1}   (1)
          = (b - Jt^T (Jt Jt^T + lambda K)^{-1} Jt b) / lambda,  b = g + lambda mu phi_{k-1}  (2)

(1) needs a sample-space residual ``rho`` with ``g = Jt^T K^{-1} rho``: ``e / h`` for
``gauss_newton``, ``1 / sqrt(N)`` for ``empirical``, ``K e / h`` for ``stein``; the
``wasserstein_kernel`` gradient is not in that form and uses (2). Both need one solve
with the ``m x m`` matrix ``A = Jt Jt^T + lambda K``: ``solver="direct"`` forms ``Jt``
(``tape.jacobian``, ``m`` vectorised backward passes over the whole batch) and ``A``, and
solves with Cholesky; ``solver="cg"`` runs conjugate gradients with ``A a = Jt (Jt^T a) +
lambda K a``, one vector-Jacobian product (``Jt^T a``, a backward pass) and one
Jacobian-vector product (``Jt v``, the backward pass of that backward pass) per
iteration, never forming ``Jt``. ``W <- W - eta phi_k`` (after Keras' clipping, which
acts on ``phi_k``).

The train steps (:func:`tfngd.optimizers.gradients_and_curvature`) call
:meth:`SampleSpaceNGD.natural_gradient` with the forward pass's tape and hand the
direction to ``apply``; one device only (the batch's system is not split over replicas).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tfngd import distribute
from tfngd.optimizers.arguments import (
    require_choice,
    require_counts,
    require_fraction,
    require_positive,
)

METRICS = ("gauss_newton", "empirical", "stein", "wasserstein_kernel")
SOLVERS = ("direct", "cg")
# Relative nugget of the kernel matrices (times their mean diagonal): an RBF Gram matrix
# of close particles is numerically singular.
KERNEL_JITTER = 1e-4


def rbf_kernel(points, centres, bandwidth):
    """``k(x, c) = exp(-||x - c||^2 / (2 sigma^2))``: ``[P, Q]`` for ``[P, d]``, ``[Q, d]``."""
    squared = (tf.reduce_sum(tf.square(points), 1)[:, None]
               + tf.reduce_sum(tf.square(centres), 1)[None, :]
               - 2.0 * tf.matmul(points, centres, transpose_b=True))
    return tf.exp(-tf.maximum(squared, 0.0) / (2.0 * tf.square(bandwidth)))


def median_bandwidth(points):
    """The median heuristic: ``sigma`` = the median distance between two of the points."""
    count = tf.shape(points)[0]
    squared = (tf.reduce_sum(tf.square(points), 1)[:, None]
               + tf.reduce_sum(tf.square(points), 1)[None, :]
               - 2.0 * tf.matmul(points, points, transpose_b=True))
    upper = tf.linalg.band_part(tf.ones([count, count]), 0, -1) - tf.eye(count)
    distances = tf.sqrt(tf.maximum(tf.boolean_mask(squared, upper > 0), 0.0))
    ordered = tf.sort(distances)
    median = ordered[tf.size(ordered) // 2]
    return tf.maximum(median, 1e-6)


def conjugate_gradient(matvec, rhs, iterations: int, tolerance: float):
    """Solve ``A x = rhs`` (``A`` symmetric positive definite, given as ``matvec``) from
    ``x = 0``: at most ``iterations`` steps, stopping once ``||r|| <= tolerance ||rhs||``.
    Returns ``(x, steps taken, ||r|| / ||rhs||)`` (Hestenes & Stiefel 1952)."""
    rhs_norm = tf.maximum(tf.norm(rhs), 1e-30)

    def not_done(step, x, r, p, rs):
        return tf.logical_and(step < iterations, tf.sqrt(rs) > tolerance * rhs_norm)

    def body(step, x, r, p, rs):
        ap = matvec(p)
        alpha = rs / tf.maximum(tf.reduce_sum(p * ap), 1e-30)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = tf.reduce_sum(r * r)
        return step + 1, x, r, r + (rs_new / tf.maximum(rs, 1e-30)) * p, rs_new

    start = (tf.constant(0), tf.zeros_like(rhs), rhs, rhs, tf.reduce_sum(rhs * rhs))
    steps, x, _, _, rs = tf.while_loop(not_done, body, start)
    return x, steps, tf.sqrt(rs) / rhs_norm


class _SampleSpaceMap:
    """``Jt = dz/dtheta`` of one batch, matrix-free: ``Jt^T a`` is a backward pass of the
    recorded forward pass, ``Jt v`` the backward pass of that backward pass (it is linear
    in ``a``, so differentiating it at ``a = 0`` gives the Jacobian-vector product)."""

    def __init__(self, tape, z, variables):
        self.tape, self.z, self.variables = tape, z, variables
        self._origin = tf.zeros_like(z)
        with tf.GradientTape(persistent=True) as self._outer:
            self._outer.watch(self._origin)
            self._transposed_at_origin = self.transpose_times(self._origin)

    def transpose_times(self, a) -> list:
        return self.tape.gradient(self.z, self.variables, output_gradients=a,
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def times(self, vectors) -> tf.Tensor:
        return self._outer.gradient(self._transposed_at_origin, self._origin,
                                    output_gradients=vectors,
                                    unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def solve(self, rhs, damping, kernel_times, iterations, tolerance):
        def matvec(a):
            return self.times(self.transpose_times(a)) + damping * kernel_times(a)

        return conjugate_gradient(matvec, rhs, iterations, tolerance)


class _ExplicitSampleSpaceMap(_SampleSpaceMap):
    """``Jt`` formed (``tape.jacobian``: ``m`` vectorised backward passes) and the
    sample-space system solved exactly by Cholesky."""

    def __init__(self, tape, z, variables):
        self.tape, self.z, self.variables = tape, z, variables
        m = tf.shape(z)[0]
        jacobians = tape.jacobian(z, variables, experimental_use_pfor=True,
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
        self.rows = [tf.reshape(j, [m, -1]) for j in jacobians]

    def transpose_times(self, a) -> list:
        return [tf.reshape(tf.linalg.matvec(rows, a, transpose_a=True), v.shape)
                for rows, v in zip(self.rows, self.variables, strict=True)]

    def times(self, vectors) -> tf.Tensor:
        return tf.add_n([tf.linalg.matvec(rows, tf.reshape(v, [-1]))
                         for rows, v in zip(self.rows, vectors, strict=True)])

    def solve(self, rhs, damping, kernel_matrix, iterations, tolerance):
        del iterations, tolerance
        gram = tf.add_n([tf.matmul(rows, rows, transpose_b=True) for rows in self.rows])
        system = gram + damping * kernel_matrix
        solution = tf.linalg.cholesky_solve(tf.linalg.cholesky(system), rhs[:, None])[:, 0]
        return solution, tf.constant(1), _relative_residual(system, solution, rhs)


def _relative_residual(matrix, solution, rhs):
    return (tf.norm(tf.linalg.matvec(matrix, solution) - rhs)
            / tf.maximum(tf.norm(rhs), 1e-30))


class _Metric:
    """What one metric needs from one batch: ``z``'s coefficients ``C`` (so ``z = C^T f``),
    ``K`` as a matrix (direct solver) and as a product (CG), and ``rho`` (None: form (2))."""

    def __init__(self, name, outputs, output_gradient, scale, kernel_points, bandwidth):
        self.name = name
        f = tf.reshape(tf.cast(outputs, tf.float32), [tf.shape(outputs)[0], -1])
        e = tf.reshape(tf.cast(output_gradient, tf.float32), tf.shape(f))
        count = tf.cast(tf.shape(f)[0], tf.float32)
        h = tf.sqrt(2.0 * scale / count)
        whitened_residual = tf.math.divide_no_nan(e, h)
        particles = tf.stop_gradient(f)
        self.flat_outputs = f
        self.kernel_factor = None  # [N, N] (stein) or [M, M] (wasserstein_kernel)
        if name == "gauss_newton":
            self.coefficients, self.rho = h, tf.reshape(whitened_residual, [-1])
        elif name == "empirical":
            self.coefficients = tf.sqrt(count) * e
            self.rho = tf.fill([tf.shape(f)[0]], 1.0 / tf.sqrt(count))
        elif name == "stein":
            sigma = median_bandwidth(particles) if bandwidth is None else bandwidth
            self.kernel_factor = _with_jitter(rbf_kernel(particles, particles, sigma))
            self.coefficients = h
            self.rho = tf.reshape(tf.matmul(self.kernel_factor, whitened_residual), [-1])
        elif name == "wasserstein_kernel":
            sigma = median_bandwidth(particles) if bandwidth is None else bandwidth
            centres = particles[:tf.minimum(kernel_points, tf.shape(f)[0])]
            weights = tf.reduce_mean(tf.square(h), axis=1)  # w_n = 2 mean_d(s_nd) / N
            values = rbf_kernel(particles, centres, sigma)  # [N, M]
            # grad_y k(Y_j, y_n) = -(y_n - Y_j) / sigma^2 k(Y_j, y_n): [N, M, D]
            self.potential_gradients = (-(particles[:, None, :] - centres[None, :, :])
                                        / tf.square(sigma) * values[:, :, None])
            self._weights = weights
            gram = tf.einsum("n,nid,njd->ij", weights, self.potential_gradients,
                             self.potential_gradients)
            self.kernel_factor = _with_jitter(gram)
            self.coefficients, self.rho = None, None
        else:
            require_choice("metric", name, METRICS)

    def z(self, outputs) -> tf.Tensor:
        """``C^T f``, to be recorded on the forward pass's tape."""
        f = tf.reshape(tf.cast(outputs, tf.float32), tf.shape(self.flat_outputs))
        if self.name == "empirical":
            return tf.reduce_sum(self.coefficients * f, axis=1)
        if self.name == "wasserstein_kernel":
            return tf.einsum("n,njd,nd->j", self._weights, self.potential_gradients, f)
        return tf.reshape(self.coefficients * f, [-1])

    def kernel_times(self, a) -> tf.Tensor:
        if self.kernel_factor is None:
            return a
        if self.name == "stein":  # (k kron I_D) a, a laid out example-major
            rows = tf.shape(self.kernel_factor)[0]
            return tf.reshape(tf.matmul(self.kernel_factor, tf.reshape(a, [rows, -1])), [-1])
        return tf.linalg.matvec(self.kernel_factor, a)

    def kernel_matrix(self, m) -> tf.Tensor:
        if self.kernel_factor is None:
            return tf.eye(m)
        if self.name == "stein":
            elements = m // tf.shape(self.kernel_factor)[0]
            return tf.reshape(self.kernel_factor[:, None, :, None]
                              * tf.eye(elements)[None, :, None, :], [m, m])
        return self.kernel_factor


def _with_jitter(matrix):
    """``K + KERNEL_JITTER * mean(diag K) * I``."""
    size = tf.shape(matrix)[0]
    nugget = KERNEL_JITTER * tf.reduce_mean(tf.linalg.diag_part(matrix))
    return matrix + tf.maximum(nugget, 1e-12) * tf.eye(size)


@keras.saving.register_keras_serializable(package="tfngd")
class SampleSpaceNGD(keras.optimizers.Optimizer):
    """Natural-gradient descent solved in the sample space (see the module docstring).

    Dual (sample-space) natural gradient with ``metric="gauss_newton"`` or
    ``"empirical"``; the particle-based (``"stein"``) and kernel-based
    (``"wasserstein_kernel"``) variants change the metric, not the machinery. Every
    trainable variable is preconditioned jointly (no layer registration, no fallback).

    Args:
      learning_rate: float or ``LearningRateSchedule``; ``eta``. Defaults to 0.1.
      metric: one of :data:`METRICS`. Defaults to ``"gauss_newton"``.
      solver: ``"cg"`` (matrix-free conjugate gradients; the default) or ``"direct"``
        (forms the ``m x n`` Jacobian ``Jt``: small problems and tests).
      damping: ``lambda``, added to the metric of the mean loss as K-FAC's is. Defaults
        to 1e-3.
      momentum: SPRING's ``mu`` in [0, 1) (0: no momentum, no state). Defaults to 0.
      cg_iterations: at most this many CG steps per update. Defaults to 10.
      cg_tolerance: stop CG once the residual is this fraction of the right-hand side.
        Defaults to 1e-3.
      kernel_points: ``M``, Nystrom points of ``wasserstein_kernel`` (the first ``M``
        examples' outputs; batches are shuffled). Defaults to 64.
      kernel_bandwidth: ``sigma`` of the RBF kernel of ``stein`` and
        ``wasserstein_kernel``; None: the median heuristic on the batch's outputs.
      weight_decay, clipnorm, clipvalue, global_clipnorm, use_ema, ema_momentum,
      ema_overwrite_frequency, loss_scale_factor, name: as for every Keras optimizer;
        clipping acts on the direction ``phi``. Loss scaling and
        ``gradient_accumulation_steps`` are not supported.
    """

    def __init__(self, learning_rate=0.1, metric: str = "gauss_newton", solver: str = "cg",
                 damping: float = 1e-3, momentum: float = 0.0, cg_iterations: int = 10,
                 cg_tolerance: float = 1e-3, kernel_points: int = 64,
                 kernel_bandwidth: float | None = None, weight_decay=None, clipnorm=None,
                 clipvalue=None, global_clipnorm=None, use_ema=False, ema_momentum=0.99,
                 ema_overwrite_frequency=None, loss_scale_factor=None,
                 gradient_accumulation_steps=None, name=None, **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, weight_decay=weight_decay,
                         clipnorm=clipnorm, clipvalue=clipvalue,
                         global_clipnorm=global_clipnorm, use_ema=use_ema,
                         ema_momentum=ema_momentum,
                         ema_overwrite_frequency=ema_overwrite_frequency,
                         loss_scale_factor=loss_scale_factor,
                         gradient_accumulation_steps=gradient_accumulation_steps, **kwargs)
        if gradient_accumulation_steps:
            raise NotImplementedError("SampleSpaceNGD does not support "
                                      "gradient_accumulation_steps")
        require_choice("metric", metric, METRICS)
        require_choice("solver", solver, SOLVERS)
        require_positive("damping", damping)
        require_fraction("momentum", momentum)
        require_counts(cg_iterations=cg_iterations, kernel_points=kernel_points)
        if not 0.0 < cg_tolerance < 1.0:
            raise ValueError(f"cg_tolerance must be in (0, 1), got {cg_tolerance}")
        if kernel_bandwidth is not None:
            require_positive("kernel_bandwidth", kernel_bandwidth)
        self.metric = metric
        self.solver = solver
        self.damping = float(damping)
        self.momentum = float(momentum)
        self.cg_iterations = int(cg_iterations)
        self.cg_tolerance = float(cg_tolerance)
        self.kernel_points = int(kernel_points)
        self.kernel_bandwidth = None if kernel_bandwidth is None else float(kernel_bandwidth)

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._previous_directions = (self.add_optimizer_variables(var_list, "spring_direction")
                                     if self.momentum > 0 else [None] * len(var_list))
        self._solver_steps = self.add_variable((), initializer="zeros", dtype="int32",
                                               name="solver_steps")
        self._solver_residual = self.add_variable((), initializer="zeros", dtype="float32",
                                                  name="solver_residual")

    @tf.autograph.experimental.do_not_convert
    def natural_gradient(self, tape, outputs, loss, gradients, variables,
                         likelihood: str = "gaussian", per_example_scale=None) -> list:
        """The direction ``phi_k`` (one tensor per variable) of this batch.

        ``tape``: the persistent tape that recorded the forward pass (it is re-entered to
        record ``z``); ``outputs``, ``loss``, ``likelihood``, ``per_example_scale``: the
        :class:`~tfngd.optimizers.ForwardPass`; ``gradients``: ``dL/dvariables``.
        """
        if likelihood != "gaussian":
            raise ValueError(f"SampleSpaceNGD needs a gaussian likelihood (squared error), "
                             f"got {likelihood!r}")
        if distribute.replicated():
            raise NotImplementedError("SampleSpaceNGD solves each batch's sample-space system "
                                      "on one device; it does not run on several replicas")
        if not self.built:
            self.build(variables)
        gradients = [tf.zeros(v.shape, tf.float32) if g is None
                     else tf.cast(tf.convert_to_tensor(g), tf.float32)
                     for g, v in zip(gradients, variables, strict=True)]
        metric = _Metric(self.metric, outputs, tape.gradient(loss, outputs),
                         self._element_scale(outputs, per_example_scale), self.kernel_points,
                         self.kernel_bandwidth)
        with tape:
            z = metric.z(outputs)
        operator = (_ExplicitSampleSpaceMap if self.solver == "direct"
                    else _SampleSpaceMap)(tape, z, variables)
        kernel = (metric.kernel_matrix(tf.shape(z)[0]) if self.solver == "direct"
                  else metric.kernel_times)
        previous = [None if p is None else tf.convert_to_tensor(p)
                    for p in self._previous_directions]

        def solve(rhs):
            solution, steps, residual = operator.solve(rhs, self.damping, kernel,
                                                       self.cg_iterations, self.cg_tolerance)
            self._solver_steps.assign(steps)
            self._solver_residual.assign(residual)
            return solution

        if metric.rho is not None:  # form (1)
            rhs = metric.rho
            if self.momentum > 0:
                rhs -= self.momentum * operator.times(previous)
            directions = operator.transpose_times(solve(rhs))
            if self.momentum > 0:
                directions = [d + self.momentum * p for d, p in zip(directions, previous,
                                                                     strict=True)]
            return directions
        b = gradients  # form (2)
        if self.momentum > 0:
            b = [g + self.damping * self.momentum * p for g, p in zip(gradients, previous,
                                                                       strict=True)]
        correction = operator.transpose_times(solve(operator.times(b)))
        return [(bi - ci) / self.damping for bi, ci in zip(b, correction, strict=True)]

    @staticmethod
    def _element_scale(outputs, per_example_scale):
        """``s`` per example and output element, ``[N, D]`` (default ``1 / D``)."""
        count = tf.shape(outputs)[0]
        elements = tf.reduce_prod(tf.shape(outputs)[1:])
        if per_example_scale is None:
            return tf.fill([count, elements], 1.0 / tf.cast(elements, tf.float32))
        scale = tf.cast(per_example_scale, tf.float32)
        if scale.shape.rank == 1:
            scale = tf.reshape(scale, [-1] + [1] * (outputs.shape.rank - 1))
        return tf.reshape(scale * tf.ones(tf.shape(outputs), tf.float32), [count, elements])

    def update_step(self, gradient, variable, learning_rate):
        """``W <- W - eta phi`` (``gradient`` is the direction ``phi``), keeping ``phi``
        for SPRING's momentum."""
        previous = self._previous_directions[self._get_variable_index(variable)]
        if previous is not None:
            self.assign(previous, tf.cast(gradient, previous.dtype))
        self.assign_sub(variable, tf.cast(learning_rate, variable.dtype)
                        * tf.cast(gradient, variable.dtype))

    def diagnostics(self) -> dict[str, tf.Tensor]:
        """TensorBoard scalars: solver steps and relative residual of the last update."""
        if not self.built:
            return {}
        return {"ngd/solver_steps": tf.convert_to_tensor(self._solver_steps),
                "ngd/solver_residual": tf.convert_to_tensor(self._solver_residual)}

    def get_config(self):
        config = super().get_config()
        config.update({"metric": self.metric, "solver": self.solver, "damping": self.damping,
                       "momentum": self.momentum, "cg_iterations": self.cg_iterations,
                       "cg_tolerance": self.cg_tolerance, "kernel_points": self.kernel_points,
                       "kernel_bandwidth": self.kernel_bandwidth})
        return config
