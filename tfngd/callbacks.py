"""Training callbacks: TensorBoard logging with sample grids, and PNG sample snapshots.

:class:`DiffusionTensorBoard` writes, at the optimizer's step
(``model.optimizer.iterations``):

* every metric of the epoch logs (``loss``, ``loss_q1`` .. ``loss_q4``,
  ``grad_norm``) to ``<log_dir>/train`` and the ``val_`` metrics, without
  the prefix, to ``<log_dir>/validation``, so TensorBoard overlays them;
* ``learning_rate`` (the optimizer's current value: a schedule is evaluated
  at ``iterations``, i.e. the rate the next update will use),
  ``step_time_seconds`` (mean wall-clock time of a training step over the
  epoch; the first epoch includes tracing; each step is waited for, so the
  time is honest on accelerators) and, with ``batch_size`` given,
  ``examples_per_second``; with a K-FAC optimizer, ``kfac/time_*_ms``: the mean
  step without curvature work and the extra time of statistics and inverse
  steps, from the epoch's step times (see ``_curvature_timing``);
* every ``update_freq`` steps (when it is an integer), the same scalars of
  the running epoch under ``batch/<name>``;
* every ``sample_every_epochs`` epochs, an image ``samples``: a grid (image
  models) or a scatter raster (2-D models) of samples from the EMA weights,
  drawn with a fixed seed so that frames are comparable.

Its tags differ from those of ``keras.callbacks.TensorBoard`` (``epoch_*``,
``batch_*``), so both may share a log directory in one ``fit``.
:class:`SampleGridSaver` writes the same pictures as PNG files.
"""

from __future__ import annotations

import os
import time

import keras
import numpy as np
import tensorflow as tf

from tfngd import images, samplers
from tfngd.optimizers.training import kfac_of
from tfngd.sde import SDE_SAMPLERS

# Kinds of K-FAC steps whose wall-clock times are averaged separately (see _curvature_timing).
_KFAC_STEP_KINDS = ("update", "statistics", "inverse")

_VAL_PREFIX = "val_"


def _to_numpy(value) -> np.ndarray:
    # Through a tf.Tensor: numpy's own conversion of a keras.Variable is deprecated.
    return tf.convert_to_tensor(value).numpy()


def _to_float(value) -> float:
    return float(_to_numpy(value))


def _current_step(model) -> int:
    """``optimizer.iterations`` as an int (reading it waits for the step to finish)."""
    return int(_to_numpy(model.optimizer.iterations))


def current_learning_rate(optimizer) -> float:
    """The rate the optimizer's next update will use (a schedule is evaluated at ``iterations``)."""
    return _to_float(optimizer.learning_rate)


def sample_image(
    model,
    num_samples: int,
    seed: int = 0,
    num_steps: int = 50,
    sampler: str = "ddim",
    sample_kwargs: dict | None = None,
    **image_kwargs,
) -> np.ndarray:
    """Draw samples from the EMA weights and render them with :func:`images.samples_to_image`.

    ``num_steps`` is capped at the model's chain length; ``sample_kwargs`` go
    to ``model.sample`` (``eta``, ``clip_x0``, ``label``, ``guidance_scale``,
    ...). A class-conditional model without a given ``label`` draws sample
    ``k`` of class ``k % num_classes`` (one class per grid column).
    """
    sample_kwargs = dict(sample_kwargs or {})
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and sample_kwargs.get("label") is None:
        sample_kwargs["label"] = np.arange(num_samples) % num_classes
        image_kwargs.setdefault("ncols", min(num_classes, num_samples))
    sample_kwargs.setdefault("use_ema", True)
    num_steps = min(int(num_steps), model.diffusion.num_timesteps)
    if sampler is not None:  # None: the model's sample() has no choice of sampler (NDM)
        sample_kwargs["sampler"] = sampler
    samples = model.sample(num_samples, seed=seed, num_steps=num_steps, **sample_kwargs)
    return images.samples_to_image(_to_numpy(samples), **image_kwargs)


def _check_sampling_args(every: int, num_samples: int, sample_steps: int, sampler: str) -> None:
    if int(every) != every or every < 0:
        raise ValueError(f"the sampling period must be an integer >= 0, got {every!r}")
    if num_samples < 1 or sample_steps < 1:
        raise ValueError(
            f"num_samples and sample_steps must be >= 1, got {num_samples}, {sample_steps}"
        )
    valid = (*samplers.SAMPLERS, *SDE_SAMPLERS)
    if sampler is not None and sampler not in valid:
        raise ValueError(f"Unknown sampler {sampler!r}; valid: {', '.join(valid)} (or None)")


class DiffusionTensorBoard(keras.callbacks.Callback):
    """TensorBoard scalars and sample images for a :class:`~tfngd.model.DiffusionModel`.

    Args:
      log_dir: root directory; events go to ``log_dir/train`` and ``log_dir/validation``.
      sample_every_epochs: write a ``samples`` image every this many epochs (0: never).
      num_samples: samples per image.
      sample_steps: sampler steps (capped at the chain length).
      sampler: one of :data:`tfngd.samplers.SAMPLERS` (``"ddim"``, ``"ddpm"``,
        ``"dpmpp_2m"``) or of :data:`tfngd.sde.SDE_SAMPLERS`.
      seed: sampling seed (the same every time, so frames are comparable).
      update_freq: ``"epoch"``, or ``"batch"`` / an integer N: also write
        ``batch/*`` scalars every N optimizer steps. Batch-level metrics are
        the running means of the epoch so far (Keras' metric semantics).
      batch_size: examples per step; when given, ``examples_per_second`` is logged.
      image_kwargs: extra arguments of :func:`images.samples_to_image`
        (``scale``, ``extent``, ``size``, ``ncols``).
      sample_kwargs: extra arguments of ``model.sample`` (``eta``, ``clip_x0``,
        ``label``, ``guidance_scale``); see :func:`sample_image`.
    """

    def __init__(
        self,
        log_dir: str,
        sample_every_epochs: int = 1,
        num_samples: int = 16,
        sample_steps: int = 50,
        sampler: str = "ddim",
        seed: int = 0,
        update_freq: str | int = "epoch",
        batch_size: int | None = None,
        image_kwargs: dict | None = None,
        sample_kwargs: dict | None = None,
    ):
        super().__init__()
        _check_sampling_args(sample_every_epochs, num_samples, sample_steps, sampler)
        if update_freq == "batch":
            update_freq = 1
        if update_freq != "epoch" and not (isinstance(update_freq, int) and update_freq >= 1):
            raise ValueError(
                f"update_freq must be 'epoch', 'batch' or an integer >= 1, got {update_freq!r}"
            )
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.log_dir = os.fspath(log_dir)
        self.sample_every_epochs = int(sample_every_epochs)
        self.num_samples = int(num_samples)
        self.sample_steps = int(sample_steps)
        self.sampler = sampler
        self.seed = int(seed)
        self.update_freq = update_freq
        self.batch_size = batch_size
        self.image_kwargs = dict(image_kwargs or {})
        self.sample_kwargs = dict(sample_kwargs or {})
        self._writers: dict[str, tf.summary.SummaryWriter] = {}
        self._reset_timer(0)
        self._batch_start = None
        self._first_batch = True
        self._last_batch_write = 0

    # -- writers -------------------------------------------------------------
    def _writer(self, name: str) -> tf.summary.SummaryWriter:
        if name not in self._writers:
            self._writers[name] = tf.summary.create_file_writer(os.path.join(self.log_dir, name))
        return self._writers[name]

    def _write_scalars(self, writer_name: str, scalars: dict, step: int) -> None:
        # record_if(True): keras.callbacks.TensorBoard(update_freq=N) leaves a
        # record_if(step % N == 0) context open during training.
        with self._writer(writer_name).as_default(step=step), tf.summary.record_if(True):
            for tag, value in scalars.items():
                tf.summary.scalar(tag, value)

    def _close_writers(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers = {}

    # -- timing --------------------------------------------------------------
    def _reset_timer(self, step: int) -> None:
        self._epoch_seconds = 0.0
        self._epoch_steps = 0
        self._timer_step = step
        self._kfac_step_seconds = {kind: [] for kind in _KFAC_STEP_KINDS}

    def _record_kfac_step(self, step_before: int, seconds: float) -> None:
        """File one step's time under the curvature work K-FAC scheduled for it."""
        kfac = kfac_of(self.model.optimizer)
        if kfac is None or not kfac.built:
            return
        statistics, inverse = kfac.work_due(step_before)
        kind = "inverse" if inverse else "statistics" if statistics else "update"
        self._kfac_step_seconds[kind].append(seconds)

    def _curvature_timing(self) -> dict:
        """``kfac/time_*_ms``: where a K-FAC step's time goes, from this epoch's step times.

        ``time_update_step_ms`` is the mean step with no curvature work due (forward,
        backward, preconditioned update); ``time_statistics_ms`` the extra time of a
        step that also updates the factors; ``time_inverse_ms`` the extra time of a
        step that also refreshes the inverses (over a statistics step). Differences of
        means, so only as good as the number of steps of each kind in the epoch.
        """
        means = {kind: float(np.mean(times)) for kind, times in self._kfac_step_seconds.items()
                 if times}
        scalars = {}
        if "update" in means:
            scalars["kfac/time_update_step_ms"] = 1000.0 * means["update"]
            if "statistics" in means:
                scalars["kfac/time_statistics_ms"] = 1000.0 * (means["statistics"]
                                                               - means["update"])
        below = means.get("statistics", means.get("update"))
        if "inverse" in means and below is not None:
            scalars["kfac/time_inverse_ms"] = 1000.0 * (means["inverse"] - below)
        return scalars

    def _extra_scalars(self, seconds_per_step: float | None) -> dict:
        scalars = {"learning_rate": current_learning_rate(self.model.optimizer)}
        if seconds_per_step is not None:
            scalars["step_time_seconds"] = seconds_per_step
            if self.batch_size is not None and seconds_per_step > 0:
                scalars["examples_per_second"] = self.batch_size / seconds_per_step
        # Curvature diagnostics of natural-gradient optimizers (damping, KL-clip scale,
        # factor eigenvalue ranges, skipped updates), named "kfac/...".
        diagnostics = getattr(self.model.optimizer, "diagnostics", None)
        if callable(diagnostics):
            scalars.update({name: _to_float(value) for name, value in diagnostics().items()})
        return scalars

    # -- Keras hooks ---------------------------------------------------------
    def on_train_begin(self, logs=None):
        self._last_batch_write = _current_step(self.model)
        self._first_batch = True

    def on_epoch_begin(self, epoch, logs=None):
        self._reset_timer(_current_step(self.model))

    def on_train_batch_begin(self, batch, logs=None):
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        step = _current_step(self.model)  # waits for the step: the timing is honest
        if self._batch_start is None:
            return
        seconds = time.perf_counter() - self._batch_start
        self._batch_start = None
        # One call covers steps_per_execution steps; a skipped (loss-scaled) step counts as one.
        steps = max(step - self._timer_step, 1)
        if steps == 1 and not self._first_batch:
            self._record_kfac_step(self._timer_step, seconds)  # the step's iterations before it
        self._timer_step = step
        self._epoch_seconds += seconds
        self._epoch_steps += steps
        self._first_batch = False  # the first call of fit traces the train function
        if self.update_freq == "epoch" or step // self.update_freq <= (
            self._last_batch_write // self.update_freq
        ):
            return
        self._last_batch_write = step
        scalars = {name: _to_float(v) for name, v in (logs or {}).items()
                   if not name.startswith(_VAL_PREFIX)}
        scalars.update(self._extra_scalars(seconds / steps))
        self._write_scalars("train", {f"batch/{k}": v for k, v in scalars.items()}, step)

    def on_epoch_end(self, epoch, logs=None):
        step = _current_step(self.model)
        logs = logs or {}
        train = {k: _to_float(v) for k, v in logs.items() if not k.startswith(_VAL_PREFIX)}
        val = {k[len(_VAL_PREFIX):]: _to_float(v) for k, v in logs.items()
               if k.startswith(_VAL_PREFIX)}
        mean_step = self._epoch_seconds / self._epoch_steps if self._epoch_steps else None
        train.update(self._extra_scalars(mean_step))
        train.update(self._curvature_timing())
        self._write_scalars("train", train, step)
        if val:
            self._write_scalars("validation", val, step)
        if self.sample_every_epochs and (epoch + 1) % self.sample_every_epochs == 0:
            self.write_samples(step)
        for writer in self._writers.values():
            writer.flush()

    def on_train_end(self, logs=None):
        self._close_writers()

    def write_samples(self, step: int) -> np.ndarray:
        """Sample, write the picture as image ``samples`` at ``step``, and return it."""
        picture = sample_image(self.model, self.num_samples, self.seed, self.sample_steps,
                               self.sampler, self.sample_kwargs, **self.image_kwargs)
        with self._writer("train").as_default(step=step), tf.summary.record_if(True):
            tf.summary.image("samples", picture[None], max_outputs=1)
        return picture


class SampleGridSaver(keras.callbacks.Callback):
    """Write ``samples_epoch{N:04d}.png`` every ``every_epochs`` epochs and ``samples_final.png``.

    ``N`` is the 1-based epoch number. Samples come from the EMA weights with
    a fixed seed; ``every_epochs=0`` writes only the final picture (with
    ``save_final``). The other arguments are those of :class:`DiffusionTensorBoard`.
    """

    def __init__(
        self,
        directory: str,
        every_epochs: int = 1,
        num_samples: int = 16,
        sample_steps: int = 50,
        sampler: str = "ddim",
        seed: int = 0,
        save_final: bool = True,
        image_kwargs: dict | None = None,
        sample_kwargs: dict | None = None,
    ):
        super().__init__()
        _check_sampling_args(every_epochs, num_samples, sample_steps, sampler)
        self.directory = os.fspath(directory)
        self.every_epochs = int(every_epochs)
        self.num_samples = int(num_samples)
        self.sample_steps = int(sample_steps)
        self.sampler = sampler
        self.seed = int(seed)
        self.save_final = bool(save_final)
        self.image_kwargs = dict(image_kwargs or {})
        self.sample_kwargs = dict(sample_kwargs or {})
        self._last = None  # (step, picture) of the newest snapshot

    def on_train_begin(self, logs=None):
        self._last = None

    def _picture(self) -> np.ndarray:
        step = _current_step(self.model)
        if self._last is None or self._last[0] != step:
            picture = sample_image(self.model, self.num_samples, self.seed, self.sample_steps,
                                   self.sampler, self.sample_kwargs, **self.image_kwargs)
            self._last = (step, picture)
        return self._last[1]

    def on_epoch_end(self, epoch, logs=None):
        if self.every_epochs and (epoch + 1) % self.every_epochs == 0:
            images.save_png(os.path.join(self.directory, f"samples_epoch{epoch + 1:04d}.png"),
                            self._picture())

    def on_train_end(self, logs=None):
        if self.save_final:
            images.save_png(os.path.join(self.directory, "samples_final.png"), self._picture())
