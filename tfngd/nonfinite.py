"""Non-finite losses and gradients: the step is skipped, counted, and (on request) training stops.

Every train step of the project (:class:`tfngd.model.DiffusionModel`,
:class:`tfngd.ndm.NeuralDiffusionModel`, :class:`tfngd.sde.ScoreSDEModel`,
:class:`tfngd.optimizers.NaturalGradientModel`) hands its gradients to
:func:`tfngd.distribute.apply_gradients_if_finite`: when the replicas' mean loss
or mean gradient holds a NaN or an infinity, the update is not applied. A
skipped step leaves the weights, the EMA weights, the optimizer's moments and
K-FAC's curvature (factors, inverses, momentum) exactly as they were; only the
step counter advances (``optimizer.iterations``: the data pipeline, the random
streams and the learning-rate schedule are indexed by it, so the rest of the run
is the run it would have been without that batch). The diffusion models count
such steps in the ``nonfinite_steps`` log (a model variable, so the count
survives a resume) and leave them out of the loss metrics.

What happens next is the run's ``nonfinite_policy``, carried out by
:class:`NonFiniteGuard` (a Keras callback):

* ``"skip"``: keep training and warn, with the step, on every skipped step;
* ``"stop"``: raise :class:`NonFiniteTrainingError` at the first skipped step
  (``terminate=True`` instead ends ``fit`` quietly, as
  ``keras.callbacks.TerminateOnNaN`` does; the benchmark uses it to mark a
  trial as diverged).

Either way nothing already trained is lost: the state after the error is the
state before the bad batch, and the last checkpoint is untouched.
"""

from __future__ import annotations

import sys

import keras
import tensorflow as tf

POLICIES = ("skip", "stop")
LOG_NAME = "nonfinite_steps"


class NonFiniteTrainingError(FloatingPointError):
    """Training stopped at a step whose loss or gradients were not finite."""


def all_finite(tensors) -> tf.Tensor:
    """A scalar bool: every element of every tensor (``None`` entries skipped) is finite."""
    checks = [tf.reduce_all(tf.math.is_finite(t)) for t in tensors if t is not None]
    return tf.reduce_all(tf.stack(checks)) if checks else tf.constant(True)


def zero_unless(value, finite):
    """``value`` where ``finite`` (a scalar bool, or None: always), zeros otherwise (for
    metrics that leave a skipped step out with weight 0: ``0 * NaN`` is NaN)."""
    if finite is None:
        return value
    return tf.where(finite, value, tf.zeros_like(value))


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"nonfinite_policy={policy!r} is not valid; choose one of: "
                         f"{', '.join(POLICIES)}")
    return policy


class NonFiniteGuard(keras.callbacks.Callback):
    """Carry out a ``nonfinite_policy`` after every training batch.

    Reads the ``nonfinite_steps`` log of the model's train step (the count of
    skipped steps so far). Args:
      policy: ``"skip"`` (warn and go on) or ``"stop"``.
      terminate: with ``"stop"``, end ``fit`` (``model.stop_training``) instead of
        raising :class:`NonFiniteTrainingError`.
      stream: where ``"skip"`` warnings go (default ``sys.stderr``).
    """

    def __init__(self, policy: str = "skip", terminate: bool = False, stream=None):
        super().__init__()
        self.policy = check_policy(policy)
        self.terminate = bool(terminate)
        self.stream = stream
        self._seen = None
        self.stopped_at_step = None

    def on_train_begin(self, logs=None):
        # The count the model starts this fit with (restored from a checkpoint): old news.
        counter = getattr(self.model, "nonfinite_steps", None)
        self._seen = 0.0 if counter is None else float(tf.convert_to_tensor(counter).numpy())

    def on_train_batch_end(self, batch, logs=None):
        value = (logs or {}).get(LOG_NAME)
        if value is None:
            return
        count = float(tf.reshape(tf.convert_to_tensor(value), [-1])[0])
        if count <= self._seen:
            return
        self._seen = count
        step = int(tf.convert_to_tensor(self.model.optimizer.iterations).numpy())
        message = (f"step {step}: the loss or the gradients are not finite (NaN or inf); the "
                   "update was not applied, so the weights, EMA weights and optimizer state are "
                   f"those after step {step - 1} ({int(count)} step(s) skipped in this run)")
        if self.policy == "skip":
            print(f"tfngd: warning: {message}; skipping it (nonfinite_policy='skip')",
                  file=self.stream or sys.stderr)
            return
        self.stopped_at_step = step
        if self.terminate:
            self.model.stop_training = True
            return
        raise NonFiniteTrainingError(
            f"{message}. Training stopped (nonfinite_policy='stop'); the last checkpoint is "
            "intact. Check the data, or lower the learning rate in a new run directory.")
