"""``DiffusionModel``: a ``keras.Model`` whose ``train_step`` runs the DDPM objective.

Usage::

    model = DiffusionModel(build_unet((8, 8, 1)), GaussianDiffusion("cosine", 1000))
    model.compile(optimizer=keras.optimizers.Adam(2e-4, global_clipnorm=1.0))
    model.fit(train_ds, epochs=10, steps_per_epoch=100, validation_data=eval_ds)
    images = model.sample(16, seed=0, num_steps=50)

One training step (Ho et al. 2020, Algorithm 1, with the extensions of
Nichol & Dhariwal 2021 and Hang et al. 2023):

1. ``t ~ p(t)`` (uniform, or importance-sampled with unbiasing weights),
   ``eps ~ N(0, I)``, ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``;
2. per-example loss ``L_n = w_snr(t_n) * mean ||target - f(x_t, t_n)||^2``
   (plus ``vlb_weight * T * L_vlb`` for a learned variance: the hybrid objective
   of Nichol & Dhariwal 2021, see :meth:`DiffusionModel.denoising_loss`);
3. objective ``mean_n(w_is(t_n) L_n)``; gradient step with the compiled
   optimizer; EMA update of the weights.

Every random draw is stateless and seeded by ``(seed, optimizer.iterations)``,
so a run restored from a checkpoint draws exactly what the uninterrupted run
would have drawn.

Data: each batch is either ``x_0``, a tuple ``(x_0, label)``, or a dict with
``"x0"`` and optionally ``"label"``, ``"t"`` and ``"noise"`` (a fixed
evaluation bank; ``test_step`` then uses the given ``t`` and ``noise``).
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from tfngd import distribute, likelihood, nonfinite, samplers
from tfngd.gaussian_diffusion import GaussianDiffusion
from tfngd.optimizers.bucketed_fisher import (
    OBJECTIVE_TERMS,
    timestep_buckets,
)
from tfngd.optimizers.training import ForwardPass, gradients_and_curvature, kfac_of
from tfngd.timestep_sampling import make_timestep_sampler
from tfngd.validation import check_integer

#: How the loss weights enter K-FAC's Fisher (``DiffusionModel(fisher_weighting=...)``).
FISHER_WEIGHTINGS = ("loss", "unweighted")
# Indices of the stateless random streams drawn at each step.
_STREAM_T, _STREAM_NOISE, _STREAM_LABEL_DROP = 0, 1, 2


def _optional_tensor(value, dtype):
    return None if value is None else tf.constant(value, dtype)


def ema_decay_at(step, decay: float, warmup: bool):
    """EMA decay at update ``step`` (0-based): ``min(decay, (1 + n) / (10 + n))`` with warm-up.

    The warm-up (used by TensorFlow's ``ExponentialMovingAverage`` with
    ``num_updates``) keeps the early average from being dominated by the
    random initialisation.
    """
    if not warmup:
        return tf.constant(decay, tf.float32)
    n = tf.cast(step, tf.float32) + 1.0
    return tf.minimum(decay, (1.0 + n) / (10.0 + n))


def _check_output_channels(denoiser: keras.Model, diffusion: GaussianDiffusion) -> None:
    """Reject a denoiser whose output channels do not fit the diffusion's variance type."""
    outputs = getattr(denoiser, "outputs", None)
    if not outputs or not denoiser.inputs:
        return
    data_channels = denoiser.inputs[0].shape[-1]
    got = outputs[0].shape[-1]
    if data_channels is None or got is None:
        return
    expected = diffusion.output_channels(data_channels)
    if got != expected:
        parts = ("the prediction, then the variance values" if diffusion.learns_variance
                 else "the prediction only")
        raise ValueError(
            f"the denoiser outputs {got} channels, but variance_type="
            f"{diffusion.variance_type!r} needs {expected} for data with {data_channels} "
            f"channels ({parts}); build the network with output_channels (U-Net) / out_dim "
            f"(MLP) = diffusion.output_channels({data_channels})")


def _per_channel_scale(output, prediction_scale, variance_scale):
    """A ``[B, 1, ..., 1, 2C]`` K-FAC scale: ``prediction_scale`` on the first C channels."""
    rank = len(output.shape)
    channels = output.shape[-1] // 2
    ones = tf.ones([1] * (rank - 1) + [channels], tf.float32)

    def spread(values):
        return tf.reshape(tf.cast(values, tf.float32), [-1] + [1] * (rank - 1)) * ones

    return tf.concat([spread(prediction_scale), spread(variance_scale)], axis=-1)


class PrebuiltModel(keras.Model):
    """A Keras model whose layers are all built when it is constructed (the diffusion
    models: they are never called on a data batch to be built).

    Under a ``tf.distribute`` strategy Keras' ``fit`` and ``evaluate`` first build the
    model symbolically from a batch reduced over the replicas; under
    ``MultiWorkerMirroredStrategy`` that reduction fails for a dict batch (Keras 3.15:
    ``strategy.reduce("MEAN", {"x0": PerReplica, ...})``). Such a model needs nothing
    from the batch: only its optimizer is built (in the strategy's scope).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # Steps skipped because their loss or gradients were not finite (tfngd.nonfinite);
        # a model variable, so checkpoints carry it.
        self.nonfinite_steps = keras.Variable(0, dtype="int64", trainable=False,
                                              name=nonfinite.LOG_NAME)

    def _finish_step(self, finite, *args):
        """Once for all replicas: ``_after_update(*args)`` (EMA, timestep sampler) after an
        applied step; after a skipped one, only ``nonfinite_steps`` counts it."""

        def finish(finite, *args):
            def applied():
                self._after_update(*args)
                return tf.constant(True)

            def skipped():
                self.nonfinite_steps.assign_add(1)
                return tf.constant(False)

            return tf.cond(finite, applied, skipped)

        distribute.run_once(finish, finite, *args)

    def _train_logs(self, gradients, finite):
        """The train step's logs: ``metrics`` with the (global) gradient norm of an
        applied step, and ``nonfinite_steps``."""
        self.grad_norm_tracker.update_state(
            nonfinite.zero_unless(tf.linalg.global_norm(gradients), finite),
            sample_weight=tf.cast(finite, tf.float32))
        return distribute.step_logs(self.metrics, {nonfinite.LOG_NAME: self.nonfinite_steps})

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if not all(layer.built for layer in self._flatten_layers()):
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        if self.optimizer is not None and not self.optimizer.built:
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_variables)
        return None


class DiffusionModel(PrebuiltModel):
    """A denoising diffusion model trained with any Keras optimizer.

    Args:
      denoiser: a Keras model ``[x, t(, label)] -> prediction`` (see
        :mod:`tfngd.networks`).
      diffusion: the :class:`GaussianDiffusion` (schedule, parameterisation,
        loss weighting).
      timestep_sampler: ``"uniform"`` or ``"loss_second_moment"``.
      ema_decay: decay of the exponential moving average of the weights
        (0 disables averaging: the EMA copy then equals the weights).
      ema_warmup: use ``min(decay, (1 + n) / (10 + n))`` at update n.
      num_classes: classes of a conditional denoiser (its null label is
        ``num_classes``), or None.
      class_dropout: probability of replacing a label by the null label in
        training (classifier-free guidance).
      evaluate_with_ema: ``test_step`` scores the EMA weights.
      vlb_weight: ``lambda`` of the hybrid objective ``L_simple + lambda L_vlb`` of a
        ``learned_range`` diffusion (Nichol & Dhariwal 2021: 0.001; see
        :meth:`denoising_loss`); finite and ``>= 0``; ignored for a fixed variance.
      seed: base seed of the stateless random streams.
      fisher_weighting: how the per-example loss weights enter the K-FAC Fisher
        (the gradient is always that of the weighted objective). ``"loss"``: the
        Fisher of the loss-weighted likelihood, per-example scale ``s_n = w_is(t_n)
        w_snr(t_n) / D`` (importance weight times Min-SNR weight over the ``D`` output
        elements), so ``G`` of the output layer is ``2 mean_n s_n`` times the identity.
        ``"unweighted"``: ``s_n = 1 / D``, the Fisher of the unweighted Gaussian
        likelihood, every timestep's curvature counted equally (for learned_range, the
        variance channels' scale also drops ``w_is``); with uniform weights (no Min-SNR,
        uniform timesteps) both are the same. Defaults to ``"loss"``.

    With a ``KFAC(fisher_buckets=B)`` optimizer the Fisher is bucketed by timestep:
    ``B`` equal-width bins of ``t`` (:mod:`tfngd.optimizers.bucketed_fisher`).

    The denoiser's output must have ``diffusion.output_channels(C)`` channels on its
    last axis (``C`` those of its ``x`` input): ``C`` for a fixed variance, ``2C`` for
    ``learned_range``; anything else is a ``ValueError`` at construction.
    """

    def __init__(
        self,
        denoiser: keras.Model,
        diffusion: GaussianDiffusion,
        timestep_sampler: str = "uniform",
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
        num_classes: int | None = None,
        class_dropout: float = 0.1,
        evaluate_with_ema: bool = True,
        seed: int = 0,
        vlb_weight: float = 0.001,
        fisher_weighting: str = "loss",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if fisher_weighting not in FISHER_WEIGHTINGS:
            raise ValueError(f"fisher_weighting must be one of {FISHER_WEIGHTINGS}, "
                             f"got {fisher_weighting!r}")
        self.fisher_weighting = fisher_weighting
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if not 0.0 <= class_dropout <= 1.0:
            raise ValueError(f"class_dropout must be in [0, 1], got {class_dropout}")
        if (isinstance(vlb_weight, bool) or not isinstance(vlb_weight, (int, float))
                or not math.isfinite(vlb_weight) or vlb_weight < 0):
            raise ValueError(f"vlb_weight must be a finite number >= 0, got {vlb_weight!r}")
        _check_output_channels(denoiser, diffusion)
        conditional = len(denoiser.inputs) == 3
        if conditional != (num_classes is not None):
            raise ValueError(
                "num_classes must be given exactly when the denoiser takes a label input "
                f"(denoiser inputs: {[i.name for i in denoiser.inputs]}, num_classes={num_classes})"
            )
        self.denoiser = denoiser
        self.ema_denoiser = keras.models.clone_model(denoiser)
        self.ema_denoiser.set_weights(denoiser.get_weights())
        self.ema_denoiser.trainable = False
        self.diffusion = diffusion
        self.timestep_sampler = make_timestep_sampler(timestep_sampler, diffusion.num_timesteps)
        self.timestep_sampler_name = timestep_sampler
        self.ema_decay = float(ema_decay)
        self.ema_warmup = bool(ema_warmup)
        self.num_classes = num_classes
        self.class_dropout = float(class_dropout)
        self.evaluate_with_ema = bool(evaluate_with_ema)
        self.seed = int(seed)
        self._replica_jit_compile = False  # set by compile (tfngd.distribute.split_jit_compile)
        self.vlb_weight = float(vlb_weight)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.quartile_trackers = [keras.metrics.Mean(name=f"loss_q{q + 1}") for q in range(4)]
        # The hybrid objective's variational-bound part (bits/dim, unweighted): learned_range.
        self.vlb_tracker = (keras.metrics.Mean(name="vlb") if diffusion.learns_variance
                            else None)
        self.grad_norm_tracker = keras.metrics.Mean(name="grad_norm")
        self._sample_functions = {}
        self.built = True

    #: The respacing (:mod:`tfngd.schedules`) that :meth:`sample`, the export
    #: (:func:`tfngd.export.export_sampler`) and :func:`tfngd.inpainting.inpaint` use when
    #: none is given. ``"trailing"`` starts at ``t = T - 1``; clipping the predicted ``x0``
    #: keeps that first step sane for data in [-1, 1]. Latent models override it
    #: (:class:`tfngd.latent.LatentDiffusionModel`).
    default_spacing = "trailing"

    # -- Keras plumbing ----------------------------------------------------
    @property
    def data_shape(self) -> tuple:
        return tuple(self.denoiser.inputs[0].shape[1:])

    @property
    def is_image_model(self) -> bool:
        """Image data lives in [-1, 1] (x0 clipping applies); vector data is unbounded."""
        return len(self.data_shape) == 3

    @property
    def null_label(self) -> int | None:
        return self.num_classes

    def call(self, inputs, training=False):
        return self.denoiser(inputs, training=training)

    def compile(self, *args, jit_compile="auto", **kwargs):
        """Keras ``compile``; a K-FAC optimizer gets the denoiser's layers registered. On several
        replicas ``jit_compile=True`` compiles each replica's step with XLA
        (:func:`tfngd.distribute.split_jit_compile`)."""
        jit_compile, self._replica_jit_compile = distribute.split_jit_compile(jit_compile)
        super().compile(*args, jit_compile=jit_compile, **kwargs)
        kfac = kfac_of(self.optimizer)
        if kfac is not None and not kfac.is_registered:
            kfac.register(self.denoiser)
        if kfac is not None and kfac.fisher_buckets > 1:
            if self.distribute_strategy.num_replicas_in_sync > 1:
                raise NotImplementedError(
                    f"fisher_buckets={kfac.fisher_buckets} is not supported on several "
                    "replicas (tf.distribute); use fisher_buckets=1 or one device")
            kfac.bucketed_train_step = True  # this train step buckets examples by timestep

    @property
    def metrics(self):
        return [*self._evaluation_metrics, self.grad_norm_tracker]

    @property
    def _evaluation_metrics(self):
        vlb = [] if self.vlb_tracker is None else [self.vlb_tracker]
        return [self.loss_tracker, *self.quartile_trackers, *vlb]

    # -- data --------------------------------------------------------------
    def _unpack(self, data):
        """Returns ``(x0, label, t, noise)``; the last three may be None."""
        if isinstance(data, dict):
            return data["x0"], data.get("label"), data.get("t"), data.get("noise")
        if isinstance(data, (tuple, list)):
            x0 = data[0]
            label = data[1] if len(data) > 1 else None
            return x0, label, None, None
        return data, None, None, None

    def _denoiser_inputs(self, x_t, t, label):
        if self.num_classes is None:
            return [x_t, t]
        if label is None:
            raise ValueError("this model is class-conditional: batches must carry a label")
        return [x_t, t, tf.cast(label, tf.int32)]

    def _step_seed(self, stream: int):
        step = tf.cast(self.optimizer.iterations, tf.int64)
        return tf.stack([tf.constant(self.seed, tf.int64) * 1000003 + stream, step])

    # -- objective -----------------------------------------------------------
    def denoising_loss(self, denoiser, x0, t, noise, label, importance_weights,
                       training) -> ForwardPass:
        """The objective ``mean_n w_is(t_n) L_n`` as a :class:`ForwardPass`.

        Fixed variance: ``L_n = w_snr(t_n) mean_D ||target - f||^2`` (``L_simple``). The
        objective is the Gaussian likelihood ``mean_n s_n ||target_n - f_n||^2`` with
        ``s_n = w_is w_snr / D`` whose Fisher K-FAC approximates (the Fisher does
        not depend on the target, so eps, x0 and v prediction share it);
        ``fisher_weighting="unweighted"`` hands K-FAC ``s_n = 1 / D`` instead.

        ``learned_range`` (Nichol & Dhariwal 2021, section 3.1, the hybrid objective
        ``L_hybrid = L_simple + lambda L_vlb`` with ``lambda = vlb_weight``): the output
        is split into the prediction ``f`` and the variance values ``v``
        (:meth:`GaussianDiffusion.split_output`), and::

            L_n = w_snr(t_n) mean_D ||target - f||^2 + vlb_weight * T * L_{t_n}(sg(f), v)

        where ``L_t`` is the single-timestep term of the variational bound in bits per
        dimension (:func:`tfngd.likelihood.timestep_vlb_bits`: the KL of the Gaussian
        posterior ``q(x_{t-1} | x_t, x_0)`` from ``p_theta(x_{t-1} | x_t)`` for
        ``t > 0``, the discretised-decoder NLL, or the Gaussian density NLL for vector
        data, at ``t = 0``, unclipped) and ``sg`` is a stop-gradient on the prediction:
        ``L_vlb`` trains only the variance, ``L_simple`` only the mean. Scaling: the
        paper's ``L_vlb = sum_t L_t`` has ``T`` terms, estimated by ``T * L_t`` at one
        uniform ``t``, so ``lambda L_vlb`` is ``vlb_weight * T * L_t``; the reference code
        (improved-diffusion's ``RESCALED_MSE``) adds ``L_t * T / 1000``, the same thing at
        its ``lambda = 0.001``. ``extras``: ``per_example`` (``L_n``, what the
        importance sampler records, as the reference's resampler does), ``mse`` (the
        weighted MSE part: the quartile metrics) and ``vlb`` (``L_t`` in bits/dim).

        K-FAC: the Fisher of the learned-range output is the Gaussian one on the
        prediction channels (as above) and, on the variance channels, the Fisher of
        ``N(mu, sigma^2)`` with respect to ``log sigma^2`` (1/2 per element) pulled back
        through ``d log sigma^2 / d v = (log beta_t - log beta~_t) / 2`` and scaled like
        the ``L_vlb`` term: ``s_nv = w_is vlb_weight T (log beta_t - log beta~_t)^2 /
        (16 D ln 2)`` per element, in the form ``s ||y - f||^2`` that
        :meth:`KFAC.output_probes` takes.
        """
        x_t = self.diffusion.q_sample(x0, t, noise)
        output = denoiser(self._denoiser_inputs(x_t, t, label), training=training)
        prediction, var_values = self.diffusion.split_output(output)
        snr_weights = self.diffusion.loss_weights(t)
        mse = self.diffusion.per_example_loss(prediction, x0, noise, t) * snr_weights
        elements = tf.cast(tf.reduce_prod(tf.shape(prediction)[1:]), tf.float32)
        # The weights the Fisher sees (fisher_weighting): the loss's, or none.
        if self.fisher_weighting == "loss":
            fisher_importance, fisher_snr = importance_weights, snr_weights
        else:
            fisher_importance, fisher_snr = (tf.ones_like(importance_weights),
                                             tf.ones_like(snr_weights))
        scale = fisher_importance * fisher_snr / elements
        extras = {"mse": mse}
        if var_values is None:
            per_example = mse
        else:
            frozen = tf.concat([tf.stop_gradient(prediction), var_values], axis=-1)
            vlb = tf.cast(likelihood.timestep_vlb_bits(
                self.diffusion, frozen, x0, x_t, t, discrete=self.is_image_model), tf.float32)
            vlb_scale = self.vlb_weight * self.diffusion.num_timesteps
            per_example = mse + vlb_scale * vlb
            extras["vlb"] = vlb
            log_ratio = tf.cast(tf.gather(tf.constant(
                self.diffusion.log_betas - self.diffusion.posterior_log_variance_clipped,
                tf.float64), t), tf.float32)
            variance_scale = (fisher_importance * vlb_scale * tf.square(log_ratio)
                              / (16.0 * elements * math.log(2.0)))
            scale = _per_channel_scale(output, scale, variance_scale)
        extras["per_example"] = per_example
        extras[OBJECTIVE_TERMS] = per_example * importance_weights
        objective = tf.reduce_mean(extras[OBJECTIVE_TERMS])
        return ForwardPass(objective, output, "gaussian", per_example_scale=scale,
                           extras=extras)

    def _quartile_of(self, t):
        """The quartile (0..3, 0 = least noise) of the chain that each ``t`` lies in."""
        return tf.minimum(t * 4 // self.diffusion.num_timesteps, 3)

    def _update_quartiles(self, per_example, t, weight=1.0):
        quartile = self._quartile_of(t)
        for q, tracker in enumerate(self.quartile_trackers):
            tracker.update_state(per_example,
                                 sample_weight=tf.cast(quartile == q, tf.float32) * weight)

    def _update_loss_metrics(self, objective, extras, t, batch, finite=None):
        """The loss, the per-quartile (weighted) MSE and, for learned_range, ``L_vlb``;
        a skipped (not ``finite``) training step is left out."""
        weight = 1.0 if finite is None else tf.cast(finite, tf.float32)
        objective, mse = (nonfinite.zero_unless(value, finite) for value in
                          (objective, extras["mse"]))
        self.loss_tracker.update_state(objective, sample_weight=tf.cast(batch, tf.float32)
                                       * weight)
        self._update_quartiles(mse, t, weight)
        if self.vlb_tracker is not None:
            vlb = nonfinite.zero_unless(extras["vlb"], finite)
            self.vlb_tracker.update_state(vlb, sample_weight=tf.ones_like(vlb) * weight)

    def train_step(self, data):
        x0, label, _, _ = self._unpack(data)
        x0 = tf.cast(x0, tf.float32)
        batch = tf.shape(x0)[0]
        # Draws for the whole global batch, this replica's rows (tfngd.distribute).
        t, importance_weights = distribute.rows_of_global_batch(
            lambda rows: self.timestep_sampler.sample(rows, self._step_seed(_STREAM_T)), batch)
        noise = distribute.rows_of_global_batch(
            lambda rows: tf.random.stateless_normal(tf.concat([[rows], tf.shape(x0)[1:]], 0),
                                                    seed=self._step_seed(_STREAM_NOISE)), batch)
        if self.num_classes is not None and label is None:
            raise ValueError("this model is class-conditional: batches must carry a label")
        if self.num_classes is not None and self.class_dropout > 0:
            drop = distribute.rows_of_global_batch(
                lambda rows: tf.random.stateless_uniform(
                    [rows], seed=self._step_seed(_STREAM_LABEL_DROP)), batch)
            label = tf.where(drop < self.class_dropout, self.null_label, tf.cast(label, tf.int32))

        variables = self.denoiser.trainable_variables

        def forward():
            return self.denoising_loss(self.denoiser, x0, t, noise, label, importance_weights,
                                       training=True)

        kfac = kfac_of(self.optimizer)
        example_buckets = (timestep_buckets(t, self.diffusion.num_timesteps, kfac.fisher_buckets)
                           if kfac is not None and kfac.fisher_buckets > 1 else None)
        gradients, result = gradients_and_curvature(
            self.optimizer, variables, forward, jit_compile=self._replica_jit_compile,
            example_buckets=example_buckets)
        objective, per_example = result.loss, result.extras["per_example"]
        gradients, finite = distribute.apply_gradients_if_finite(self.optimizer, gradients,
                                                                 variables, objective)
        self._finish_step(finite, *distribute.all_gather_rows((t, per_example)))

        self._update_loss_metrics(objective, result.extras, t, batch, finite)
        return self._train_logs(gradients, finite)

    def _after_update(self, t, per_example):
        """The state updated once per step from the global batch: EMA, timestep sampler."""
        self.update_ema()
        self.timestep_sampler.update(t, per_example)
        return tf.constant(True)

    def test_step(self, data):
        x0, label, t, noise = self._unpack(data)
        x0 = tf.cast(x0, tf.float32)
        batch = tf.shape(x0)[0]
        if t is None:
            t = tf.random.stateless_uniform([batch], seed=self._step_seed(_STREAM_T), minval=0,
                                            maxval=self.diffusion.num_timesteps, dtype=tf.int32)
        if noise is None:
            noise = tf.random.stateless_normal(tf.shape(x0), seed=self._step_seed(_STREAM_NOISE))
        denoiser = self.ema_denoiser if self.evaluate_with_ema else self.denoiser
        result = self.denoising_loss(
            denoiser, x0, tf.cast(t, tf.int32), tf.cast(noise, tf.float32), label,
            tf.ones([batch]), training=False,
        )
        self._update_loss_metrics(result.loss, result.extras, t, batch)
        return distribute.step_logs(self._evaluation_metrics)

    # -- EMA -----------------------------------------------------------------
    def update_ema(self):
        """``ema <- d * ema + (1 - d) * w`` for every weight of the denoiser."""
        decay = ema_decay_at(self.optimizer.iterations - 1, self.ema_decay, self.ema_warmup)
        for ema_var, var in zip(self.ema_denoiser.weights, self.denoiser.weights, strict=True):
            d = tf.cast(decay, ema_var.dtype)
            ema_var.assign(d * ema_var + (1.0 - d) * tf.cast(var, ema_var.dtype))

    # -- sampling ------------------------------------------------------------
    def check_conditioning(self, label, guidance_scale, batch: int):
        """``(label, guidance_scale)`` for a batch of ``batch`` draws, checked before any work.

        ``label``: ``None``, one integer or ``batch`` integers in ``[0, num_classes]``
        (``num_classes`` is the null label); it comes back as int32 ``[batch]``, the null
        label for an unconditional draw of a conditional model, ``None`` for an
        unconditional model. ``guidance_scale``: ``None`` or a finite number, and only
        with a ``label`` (classifier-free guidance compares the labelled and the null-label
        predictions). ``ValueError`` names what is wrong.
        """
        if guidance_scale is not None:
            if label is None:
                raise ValueError("guidance_scale needs a label (classifier-free guidance "
                                 "compares the labelled and the null-label predictions)")
            if isinstance(guidance_scale, bool) \
                    or not isinstance(guidance_scale, (int, float, np.integer, np.floating)) \
                    or not np.isfinite(guidance_scale):
                raise ValueError(f"guidance_scale must be a finite number, got "
                                 f"{guidance_scale!r}")
        if label is None:
            if self.num_classes is None:
                return None, guidance_scale
            return np.full([batch], self.null_label, np.int32), guidance_scale
        if self.num_classes is None:
            raise ValueError("label: the model is unconditional (num_classes=None); pass "
                             "label=None")
        array = np.asarray(label)
        if array.ndim > 1 or not np.issubdtype(array.dtype, np.integer) \
                or (array.ndim == 1 and len(array) != batch):
            raise ValueError(f"label must be an integer or {batch} integers (one per draw), "
                             f"got {label!r}")
        if np.any((array < 0) | (array > self.num_classes)):
            raise ValueError(f"label must be in [0, {self.num_classes}] ({self.num_classes} "
                             f"is the null label), got {array.tolist()}")
        return np.broadcast_to(array, [batch]).astype(np.int32), guidance_scale

    def network_fn(self, denoiser, label=None, guidance_scale=None):
        """``fn(x_t, t)`` of ``denoiser`` (e.g. :attr:`ema_denoiser`) for the samplers:
        conditional on ``label``, guided with ``guidance_scale`` against the null label
        (:func:`tfngd.samplers.denoiser_fn`)."""
        return samplers.denoiser_fn(denoiser, label, guidance_scale, self.null_label,
                                    learned_variance=self.diffusion.learns_variance)

    def unconditional_network_fn(self, denoiser=None):
        """``fn(x_t, t)`` of ``denoiser`` (default :attr:`ema_denoiser`), unconditional: a
        class-conditional model gets its null label (the unconditional model that
        classifier-free guidance trains alongside), sized to the batch at call time. The
        full network output, learned-variance channels included: what likelihood
        evaluations score."""
        denoiser = self.ema_denoiser if denoiser is None else denoiser
        if self.num_classes is None:
            return self.network_fn(denoiser)

        def unconditional(x, t):
            return self.network_fn(denoiser, tf.fill(tf.shape(t), self.null_label))(x, t)

        return unconditional

    def graph_function(self, key, build):
        """The ``tf.function`` that ``build()`` returns, built once per ``key`` (the hashable
        settings it closes over) and kept on the model, so that repeated calls with the
        same settings (sampling, inpainting) trace once."""
        if key not in self._sample_functions:
            self._sample_functions[key] = build()
        return self._sample_functions[key]

    def sample(
        self,
        num_samples: int,
        seed: int = 0,
        num_steps: int | None = None,
        sampler: str = "ddim",
        eta: float = 0.0,
        spacing: str | None = None,
        clip_x0: bool = True,
        label=None,
        guidance_scale=None,
        use_ema: bool = True,
        denoiser=None,
    ) -> tf.Tensor:
        """Draw samples in [-1, 1] (for images) with a graph-mode sampler.

        ``num_steps`` defaults to the full chain, ``spacing`` to :attr:`default_spacing`;
        ``label`` and ``guidance_scale`` as in :meth:`check_conditioning`. ``clip_x0``
        applies to image models only (vector data is unbounded and never clipped). ``denoiser``: a
        callable with the network's call convention ``denoiser([x, t(, label)],
        training=False)`` to run in place of the EMA (``use_ema``) or raw network, e.g.
        a :class:`tfngd.quantization.TFLiteDenoiser`. See :func:`tfngd.samplers.sample`.
        """
        clip_x0 = clip_x0 and self.is_image_model
        spacing = self.default_spacing if spacing is None else spacing
        if num_steps is None:
            num_steps = self.diffusion.num_timesteps
        num_steps = check_integer("num_steps", num_steps, 1, self.diffusion.num_timesteps,
                                  detail=" (the length of the chain)")
        num_samples = check_integer("num_samples", num_samples, 1)
        label, guidance_scale = self.check_conditioning(label, guidance_scale, num_samples)
        if denoiser is None:
            denoiser = self.ema_denoiser if use_ema else self.denoiser
        key = ("sample", num_samples, sampler, float(eta), spacing, clip_x0, label is None,
               guidance_scale is None, denoiser)

        def build():
            step = samplers.make_sampler(sampler, self.diffusion.variance_type, eta)

            @tf.function(reduce_retracing=True)
            def run(seed, num_steps, label, guidance_scale):
                return samplers.sample(self.network_fn(denoiser, label, guidance_scale),
                                       self.diffusion, [num_samples, *self.data_shape],
                                       seed, num_steps, step, spacing, clip_x0)

            return run

        return self.graph_function(key, build)(
            tf.constant(seed, tf.int64), tf.constant(num_steps, tf.int32),
            _optional_tensor(label, tf.int32), _optional_tensor(guidance_scale, tf.float32),
        )
