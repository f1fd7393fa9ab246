"""How good is K-FAC's Fisher for a model? Its curvature along the gradient against the exact one.

For each curvature block, with ``d`` the block's part of the gradient of one
batch's loss, :func:`curvature_along_gradient` compares

* ``kfac = d^T F_block d``: the block's Fisher approximation built from this
  batch's statistics alone (:meth:`KFAC.batch_statistics`, no running average,
  no damping; the optimizer's state is left as it is), and
* ``exact = d^T GGN d``: the exact generalised Gauss-Newton matrix of the
  same likelihood, ``1/N sum_n (J_n d)^T H_n (J_n d)``, with ``J_n d`` the
  directional derivative of example ``n``'s output (forward-mode autodiff,
  one Jacobian-vector product per block) and ``H_n`` the output Hessian:
  ``2 s_n I`` for the Gaussian ``l_n = s_n ||y_n - f_n||^2``,
  ``s_n (diag(p) - p p^T)`` per position for a categorical on logits.

For the Gaussian and categorical likelihoods the Fisher is this GGN (Martens
2020, "New insights and perspectives on the natural gradient method"), so
``kfac / exact`` is 1 where the Kronecker factorisation is exact and its
deviation from 1 is how far the step along the gradient is off (the step
size scales as ``1 / ratio`` along ``d``). The estimate of ``kfac`` is
exact with ``KFAC(fisher="exact")``; ``"mc"`` adds probe noise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import tensorflow as tf

from tfngd.optimizers.curvature_blocks import CurvatureBlock
from tfngd.optimizers.kfac import KFAC, default_per_example_scale
from tfngd.optimizers.training import ForwardPass


@dataclasses.dataclass(frozen=True)
class CurvatureCheck:
    """One block's curvature along its gradient: K-FAC's and the exact Gauss-Newton's."""

    block: CurvatureBlock
    kfac: float
    exact: float

    @property
    def name(self) -> str:
        return self.block.name

    @property
    def ratio(self) -> float:
        """``kfac / exact`` (inf when the exact curvature vanishes and K-FAC's does not)."""
        if self.exact > 0:
            return self.kfac / self.exact
        return 1.0 if self.kfac == 0 else float("inf")


def output_hessian_quadratic(tangents, outputs, likelihood: str, per_example_scale) -> tf.Tensor:
    """``1/N sum_n u_n^T H_n u_n`` for output tangents ``u = J d`` (module docstring)."""
    u = tf.cast(tangents, tf.float32)
    n = tf.shape(u)[0]
    scale = tf.cast(per_example_scale, tf.float32)
    if likelihood == "gaussian":
        per_example = 2.0 * tf.reduce_sum(tf.reshape(tf.square(u), (n, -1)), axis=1)
    elif likelihood == "categorical":
        p = tf.nn.softmax(tf.cast(outputs, tf.float32), axis=-1)
        per_position = tf.reduce_sum(p * tf.square(u), -1) - tf.square(tf.reduce_sum(p * u, -1))
        per_example = tf.reduce_sum(tf.reshape(per_position, (n, -1)), axis=1)
    else:
        raise ValueError(f"likelihood must be 'gaussian' or 'categorical', got {likelihood!r}")
    return tf.reduce_mean(scale * per_example)


def curvature_along_gradient(optimizer: KFAC, variables: list,
                             forward: Callable[[], ForwardPass]) -> list[CurvatureCheck]:
    """Per block of ``optimizer`` (registered and built), K-FAC's and the exact curvature
    along this batch's gradient of ``forward().loss`` (eager; see the module docstring).

    ``forward`` is the training forward pass of the model (what a train step hands to
    :func:`~tfngd.optimizers.gradients_and_curvature`); it is run once with the tape and
    once more per block under forward-mode autodiff, so it must be deterministic.
    """
    if not optimizer.built:
        raise ValueError("build the optimizer first (optimizer.build(variables))")
    if optimizer.fisher == "empirical":
        raise ValueError("the empirical Fisher is not a Gauss-Newton matrix: use fisher='mc' "
                         "or 'exact'")
    with tf.GradientTape(persistent=True) as tape:
        with optimizer.capture() as captured:
            result = forward()
    gradients = tape.gradient(result.loss, variables)
    statistics = optimizer.batch_statistics(tape, captured, result.outputs, result.likelihood,
                                            result.per_example_scale, result.loss)
    del tape
    gradient_of = {id(v): g for g, v in zip(gradients, variables, strict=True)}
    checks = []
    for block, block_statistics in zip(optimizer.blocks, statistics, strict=True):
        block_gradients = [gradient_of.get(id(v)) for v in block.variables]
        if block_statistics is None or any(g is None for g in block_gradients):
            continue
        block_gradients = [tf.convert_to_tensor(g) for g in block_gradients]
        with tf.autodiff.ForwardAccumulator([v.value for v in block.variables],
                                            block_gradients) as accumulator:
            again = forward()
        scale = (default_per_example_scale(again.outputs, again.likelihood)
                 if again.per_example_scale is None else again.per_example_scale)
        exact = output_hessian_quadratic(accumulator.jvp(again.outputs), again.outputs,
                                         again.likelihood, scale)
        checks.append(CurvatureCheck(block,
                                     float(block.curvature_along(block_statistics,
                                                                 block_gradients)),
                                     float(exact)))
    return checks

