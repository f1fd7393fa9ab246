"""``NaturalGradientModel``: a ``keras.Model`` whose ``fit`` feeds K-FAC its curvature.

With a :class:`~tfngd.optimizers.KFAC` optimizer (possibly inside Keras'
``LossScaleOptimizer``), ``train_step`` runs the capture / update_curvature /
apply sequence; with :class:`~tfngd.optimizers.SampleSpaceNGD` (squared error only) it
applies that optimizer's sample-space natural gradient; with any other optimizer it is
Keras' ordinary step. The
likelihood of the Fisher comes from the compiled loss:

* ``MeanSquaredError`` (or ``"mse"``): Gaussian, ``l_n = s_n ||y_n - f_n||^2`` with
  ``s_n = w_n / D`` (``D`` output elements per example, ``w_n`` the sample weight);
* ``SparseCategoricalCrossentropy(from_logits=True)`` or
  ``CategoricalCrossentropy(from_logits=True)``: categorical on the logits,
  ``s_n = w_n / P`` (``P`` positions per example, 1 for ``[N, K]`` logits);
* anything else needs ``KFAC(fisher="empirical")`` (real loss gradients).

Usage (functional or subclassed)::

    model = NaturalGradientModel(inputs, outputs)
    model.compile(optimizer=KFAC(learning_rate=0.1, damping=1e-3), loss="mse")
    model.fit(x, y, epochs=10)
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import keras
import tensorflow as tf

from tfngd import distribute, nonfinite
from tfngd.optimizers import bucketed_fisher
from tfngd.optimizers.kfac import KFAC
from tfngd.optimizers.sample_space import SampleSpaceNGD

_GAUSSIAN_LOSS_NAMES = ("mse", "mean_squared_error", "MeanSquaredError")
SUPPORTED_LOSSES = (
    "MeanSquaredError / 'mse' (gaussian), SparseCategoricalCrossentropy(from_logits=True) or "
    "CategoricalCrossentropy(from_logits=True) (categorical), all with "
    "reduction='sum_over_batch_size'"
)


def kfac_of(optimizer) -> KFAC | None:
    """The KFAC optimizer, unwrapping Keras' ``LossScaleOptimizer``; None otherwise."""
    if isinstance(optimizer, KFAC):
        return optimizer
    inner = getattr(optimizer, "inner_optimizer", None)
    return inner if isinstance(inner, KFAC) else None


def sample_space_of(optimizer) -> SampleSpaceNGD | None:
    """The :class:`SampleSpaceNGD` optimizer, or None; it cannot be loss-scaled."""
    if isinstance(getattr(optimizer, "inner_optimizer", None), SampleSpaceNGD):
        raise NotImplementedError("SampleSpaceNGD does not support loss scaling "
                                  "(mixed_float16); use the mixed_bfloat16 policy")
    return optimizer if isinstance(optimizer, SampleSpaceNGD) else None


def uses_curvature(optimizer) -> bool:
    """Whether the train step must feed the optimizer curvature (K-FAC, sample space)."""
    return kfac_of(optimizer) is not None or sample_space_of(optimizer) is not None


@dataclasses.dataclass
class ForwardPass:
    """What a training forward pass hands to :func:`gradients_and_curvature`.

    ``loss`` is the mean-over-examples objective that is differentiated;
    ``outputs`` the model output the likelihood is defined on; the Fisher's
    per-example scale ``s_n`` and likelihood are those of
    :meth:`KFAC.output_probes`. ``extras`` carries anything else the caller
    needs back (predictions, per-example losses).
    """

    loss: tf.Tensor
    outputs: tf.Tensor
    likelihood: str = "gaussian"
    per_example_scale: tf.Tensor | float | None = None
    extras: dict = dataclasses.field(default_factory=dict)


def gradients_and_curvature(optimizer, variables, forward: Callable[[], ForwardPass],
                            jit_compile: bool = False, example_buckets=None):
    """Gradients of ``forward().loss``; with K-FAC, also this step's curvature statistics;
    with :class:`SampleSpaceNGD`, its natural-gradient direction in place of the gradients.

    The one place that spells out the natural-gradient train-step sequence (used by
    :class:`NaturalGradientModel`, :class:`tfngd.model.DiffusionModel` and
    :class:`tfngd.ndm.NeuralDiffusionModel`)::

        with persistent tape, optimizer.capture():  forward pass
        gradients = tape.gradient(scaled loss)
        kfac.update_curvature(tape, captured, outputs, likelihood, s_n, loss)
        # or, SampleSpaceNGD: the direction it applies, from the same tape
        gradients = optimizer.natural_gradient(tape, outputs, loss, gradients, ...)

    With any other optimizer it is a plain tape. ``jit_compile``: run the sequence as
    one XLA-compiled function (what a replica of a ``tf.distribute`` strategy compiles
    on its own device, :func:`tfngd.distribute.split_jit_compile`; everything in it is
    local to the replica). Returns ``(gradients, forward_pass)``; the caller then applies
    the gradients (:func:`tfngd.distribute.apply_gradients_if_finite`).

    ``example_buckets`` (``[N]`` int, a ``KFAC(fisher_buckets=B > 1)`` optimizer only, and
    then required): the noise-level bucket of each example of a bucketed Fisher
    (:mod:`tfngd.optimizers.bucketed_fisher`). ``forward().extras[OBJECTIVE_TERMS]`` must
    then hold the per-example terms whose mean is the loss; the loss is split into the
    buckets' shares ``L_b`` (:func:`~tfngd.optimizers.bucketed_fisher.loss_shares`), one
    gradient ``g_b`` is taken per share and recorded with the optimizer
    (:meth:`KFAC.record_bucket_gradients`), the statistics are bucketed, and the returned
    gradients are ``g = sum_b g_b``.
    """
    buckets = _bucket_count(kfac_of(optimizer), example_buckets)
    if not jit_compile:
        return _gradients_and_curvature(optimizer, variables, forward, example_buckets, buckets)
    traced = {}

    def compiled():
        gradients, result = _gradients_and_curvature(optimizer, variables, forward,
                                                     example_buckets, buckets)
        traced["likelihood"] = result.likelihood
        return gradients, (result.loss, result.outputs, result.per_example_scale,
                           result.extras)

    gradients, (loss, outputs, scale, extras) = tf.function(compiled, jit_compile=True)()
    return gradients, ForwardPass(loss, outputs, traced["likelihood"], scale, extras)


def _bucket_count(kfac, example_buckets) -> int:
    """``B`` of a bucketed-Fisher step (``example_buckets`` given), else 1."""
    if example_buckets is None:
        return 1
    if kfac is None or kfac.fisher_buckets < 2:
        raise ValueError("example_buckets needs a KFAC optimizer with fisher_buckets > 1 "
                         "(a bucketed Fisher)")
    kfac.bucketed_train_step = True
    return kfac.fisher_buckets


def _gradients_and_curvature(optimizer, variables, forward, example_buckets, buckets):
    kfac, dual = kfac_of(optimizer), sample_space_of(optimizer)
    capture = kfac.capture() if kfac is not None else contextlib.nullcontext()
    with tf.GradientTape(persistent=kfac is not None or dual is not None) as tape:
        with capture as captured:
            result = forward()
        losses = ([result.loss] if buckets == 1
                  else bucketed_fisher.loss_shares(result.extras, example_buckets, buckets))
        scaled_losses = [optimizer.scale_loss(loss) for loss in losses]
    share_gradients = [tape.gradient(loss, variables) for loss in scaled_losses]
    # A variable the loss does not reach has no gradient in any share (None, as usual).
    gradients = share_gradients[0] if buckets == 1 else [
        None if share_gradients[0][i] is None
        else tf.add_n([grads[i] for grads in share_gradients]) for i in range(len(variables))]
    if kfac is not None:
        kfac.update_curvature(tape, captured, result.outputs, result.likelihood,
                              per_example_scale=result.per_example_scale, loss=result.loss,
                              example_buckets=example_buckets)
        if buckets > 1:
            kfac.record_bucket_gradients(share_gradients, variables)
    if dual is not None:
        gradients = dual.natural_gradient(tape, result.outputs, result.loss, gradients,
                                          variables, result.likelihood,
                                          result.per_example_scale)
    del tape
    return gradients, result


def likelihood_of_loss(loss) -> str:
    """``"gaussian"`` or ``"categorical"`` for a compiled loss; ValueError otherwise."""
    if isinstance(loss, str) and loss in _GAUSSIAN_LOSS_NAMES:
        return "gaussian"
    if loss is keras.losses.mean_squared_error:
        return "gaussian"
    if isinstance(loss, keras.losses.Loss) and loss.reduction == "sum_over_batch_size":
        if isinstance(loss, keras.losses.MeanSquaredError):
            return "gaussian"
        categorical = (keras.losses.SparseCategoricalCrossentropy,
                       keras.losses.CategoricalCrossentropy)
        if (isinstance(loss, categorical) and loss.from_logits
                and getattr(loss, "ignore_class", None) is None
                and not getattr(loss, "label_smoothing", 0)):
            return "categorical"
    raise ValueError(
        f"NaturalGradientModel cannot infer a Fisher likelihood from the loss {loss!r}. "
        f"Supported: {SUPPORTED_LOSSES}. For other losses use KFAC(fisher='empirical')."
    )


@keras.saving.register_keras_serializable(package="tfngd")
class NaturalGradientModel(keras.Model):
    """A Keras model trained with K-FAC natural gradient when compiled with ``KFAC``.

    ``compile`` registers the model with the KFAC optimizer; ``train_step``
    records the registered layers' pre-activations, computes the gradient,
    feeds the Fisher statistics (likelihood from the compiled loss, see the
    module doc) and applies the preconditioned update.
    """

    def compile(self, *args, jit_compile="auto", **kwargs):
        jit_compile, self._replica_jit_compile = distribute.split_jit_compile(jit_compile)
        super().compile(*args, jit_compile=jit_compile, **kwargs)
        optimizer = kfac_of(self.optimizer)
        if optimizer is not None:
            if optimizer.fisher != "empirical":
                likelihood_of_loss(self.loss)  # fail at compile time, not inside fit
            if not optimizer.is_registered and not optimizer.built:
                optimizer.register(self)
        if sample_space_of(self.optimizer) is not None and likelihood_of_loss(
                self.loss) != "gaussian":
            raise ValueError("SampleSpaceNGD needs a squared-error loss (MeanSquaredError)")

    def _per_example_scale(self, likelihood: str, y_pred, sample_weight):
        dims = list(y_pred.shape[1:])
        if likelihood == "categorical":
            dims = dims[:-1]
        if any(d is None for d in dims):
            elements = tf.cast(tf.reduce_prod(tf.shape(y_pred)[1:1 + len(dims)]), tf.float32)
        else:
            elements = tf.constant(float(max(1, _product(dims))), tf.float32)
        if sample_weight is None:
            return 1.0 / elements
        weight = tf.cast(sample_weight, tf.float32)
        if weight.shape.rank and weight.shape.rank > 1:
            raise ValueError("NaturalGradientModel supports per-example sample weights only")
        return weight / elements

    def train_step(self, data):
        if not uses_curvature(self.optimizer):
            return super().train_step(data)
        kfac = kfac_of(self.optimizer)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)

        def forward():
            y_pred = self(x, training=True)
            # Keras divides the loss by the number of replicas (its optimizers sum the
            # replicas' gradients); tfngd.distribute averages them: undo the division.
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                                     training=True) * distribute.replicas()
            if kfac is not None and kfac.fisher == "empirical":
                return ForwardPass(loss, y_pred)
            likelihood = likelihood_of_loss(self.loss)
            return ForwardPass(loss, y_pred, likelihood,
                               self._per_example_scale(likelihood, y_pred, sample_weight))

        variables = self.trainable_variables
        gradients, result = gradients_and_curvature(
            self.optimizer, variables, forward,
            jit_compile=getattr(self, "_replica_jit_compile", False))
        _, finite = distribute.apply_gradients_if_finite(self.optimizer, gradients, variables,
                                                         result.loss)
        y_pred = result.outputs
        for metric in self.metrics:
            if metric.name == "loss":  # a skipped (non-finite) step is left out
                metric.update_state(
                    nonfinite.zero_unless(result.loss, finite),
                    sample_weight=tf.cast(tf.shape(y_pred)[0], tf.float32)
                    * tf.cast(finite, tf.float32))
        self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        return distribute.step_logs(self.metrics)


def _product(values) -> int:
    result = 1
    for value in values:
        result *= int(value)
    return result
