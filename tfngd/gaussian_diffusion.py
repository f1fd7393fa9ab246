"""The Gaussian diffusion math: one module owns every formula.

Notation follows Ho et al. (2020) and Nichol & Dhariwal (2021)
("improved-diffusion"): ``beta_t``, ``alpha_t = 1 - beta_t``,
``abar_t = prod_{s <= t} alpha_s``, timesteps indexed ``0 .. T - 1``.

Forward process::

    q(x_t | x_0)           = N(sqrt(abar_t) x_0, (1 - abar_t) I)
    q(x_{t-1} | x_t, x_0)  = N(c1 x_0 + c2 x_t, beta~_t I)
    c1 = beta_t sqrt(abar_{t-1}) / (1 - abar_t)
    c2 = (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t)
    beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)

Every formula is written once in terms of a pair ``(abar_t, abar_prev)``, so
that it serves the full chain (where ``abar_prev = abar_{t-1}``) and any
respaced chain (where ``abar_prev`` is ``abar`` at the previous kept step and
``beta_t = 1 - abar_t / abar_prev``) alike.

Parameterisations of the network output (``prediction_type``):

* ``"eps"``: the noise ``eps``;
* ``"x0"``: the clean sample ``x_0``;
* ``"v"``: ``v = sqrt(abar) eps - sqrt(1 - abar) x_0`` (Salimans & Ho 2022).

Loss weighting: Min-SNR-gamma (Hang et al. 2023) with ``snr = abar / (1 - abar)``:
``min(snr, gamma) / snr`` for eps, ``min(snr, gamma) / (snr + 1)`` for v and
``min(snr, gamma)`` for x0 prediction. Each weight makes the loss equal to
``min(snr, gamma) * ||x_0 - x0_hat||^2``.

Reverse-process variance (``variance_type``): ``"fixed_small"`` (``beta~_t``),
``"fixed_large"`` (``beta_t``) or ``"learned_range"`` (Nichol & Dhariwal 2021,
section 3.1, eq. 15): the network outputs twice the data channels (last axis),
the prediction above and a value ``v`` per element, and::

    log sigma_t^2 = frac log beta_t + (1 - frac) log beta~_t,   frac = (v + 1) / 2

with ``log beta~_0`` clipped to ``log beta~_1``. :meth:`GaussianDiffusion.split_output`
(the split) and :func:`learned_range_log_variance` (the interpolation) are the only
places that spell this out; on a respaced chain the same interpolation takes the
respaced chain's ``beta'`` and ``beta~'`` (:func:`respaced_log_variance_bounds`).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfngd import schedules

PREDICTION_TYPES = ("eps", "x0", "v")
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")
LEARNED_VARIANCE_TYPES = ("learned_range",)


def output_channels(variance_type: str, data_channels: int) -> int:
    """Channels (last axis) of the network output for data with ``data_channels`` channels.

    ``2 * data_channels`` for a learned variance (prediction, then variance values),
    ``data_channels`` otherwise.
    """
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(
            f"Unknown variance_type {variance_type!r}; valid: {', '.join(VARIANCE_TYPES)}"
        )
    return 2 * int(data_channels) if variance_type in LEARNED_VARIANCE_TYPES else int(data_channels)


def learned_range_log_variance(var_values, log_beta, log_beta_tilde):
    """The learned-range reverse log-variance (Nichol & Dhariwal 2021, eq. 15).

    ``log sigma^2 = frac * log_beta + (1 - frac) * log_beta_tilde`` with
    ``frac = (var_values + 1) / 2``: ``var_values = 1`` gives ``beta``, ``-1`` gives
    ``beta~`` (both are the bounds of the range, not hard limits: ``v`` is unconstrained).
    ``log_beta`` and ``log_beta_tilde`` (the *clipped* posterior log-variance, finite at
    the first step) are those of the chain being run: the full chain's tables or a
    respaced chain's (:func:`respaced_log_variance_bounds`). They are cast to
    ``var_values``' dtype and must broadcast against it.
    """
    var_values = tf.convert_to_tensor(var_values)
    frac = (var_values + 1.0) / 2.0
    log_beta = tf.cast(log_beta, var_values.dtype)
    log_beta_tilde = tf.cast(log_beta_tilde, var_values.dtype)
    return frac * log_beta + (1.0 - frac) * log_beta_tilde


def respaced_log_variance_bounds(abar_kept):
    """``(log beta', clipped log beta~')`` of the chain through kept steps with ``abar_kept``.

    ``abar_kept`` (float64, ``[K]``, a tensor or array; K may be dynamic) holds
    ``abar`` at the kept steps ``t_0 < ... < t_{K-1}``; step ``i`` goes from ``t_i`` to
    ``t_{i-1}`` (``abar_{t_{-1}} = 1``) with ``beta'_i = 1 - abar_{t_i} / abar_{t_{i-1}}``
    and posterior variance ``beta~'_i`` (:func:`posterior_coefficients`). As on the full
    chain, ``beta~'_0 = 0`` is replaced by ``beta~'_1`` (by ``beta'_0`` when ``K = 1``,
    where no noise is ever drawn with it). These are the two ends of the learned range
    on that chain, as in the reference's ``SpacedDiffusion``; with every step kept they
    are the full chain's ``log(betas)`` and ``posterior_log_variance_clipped``.
    """
    abar = tf.cast(tf.convert_to_tensor(abar_kept), tf.float64)
    abar_prev = tf.concat([tf.ones([1], tf.float64), abar[:-1]], axis=0)
    _, _, posterior_variance = posterior_coefficients(abar, abar_prev)
    beta = 1.0 - abar / abar_prev
    num_kept = tf.shape(abar)[0]
    first = tf.where(num_kept >= 2, posterior_variance[tf.minimum(1, num_kept - 1)], beta[0])
    clipped = tf.concat([tf.reshape(first, [1]), posterior_variance[1:]], axis=0)
    return tf.math.log(beta), tf.math.log(clipped)


def _broadcast_to_rank(values: tf.Tensor, rank: int) -> tf.Tensor:
    """Reshape a per-example ``[B]`` tensor to ``[B, 1, ..., 1]`` of the given rank."""
    return tf.reshape(values, tf.concat([tf.shape(values), tf.ones([rank - 1], tf.int32)], 0))


def posterior_coefficients(abar_t, abar_prev):
    """Coefficients of ``q(x_prev | x_t, x_0) = N(c1 x_0 + c2 x_t, var)``.

    Works for any pair of consecutive steps of a (possibly respaced) chain:
    ``beta = 1 - abar_t / abar_prev``. Returns ``(c1, c2, var)``.
    """
    beta = 1.0 - abar_t / abar_prev
    alpha = 1.0 - beta
    c1 = beta * tf.sqrt(abar_prev) / (1.0 - abar_t)
    c2 = (1.0 - abar_prev) * tf.sqrt(alpha) / (1.0 - abar_t)
    var = beta * (1.0 - abar_prev) / (1.0 - abar_t)
    return c1, c2, var


def forward_transition(x_s, abar_t, abar_s, noise):
    """Draw ``x_t ~ q(x_t | x_s) = N(sqrt(abar_t / abar_s) x_s, (1 - abar_t / abar_s) I)``.

    The forward process between any two steps ``s < t`` of a (respaced) chain, with the
    given standard normal ``noise``; ``abar_s = 1`` makes it ``q(x_t | x_0)``. ``abar_t``
    and ``abar_s`` (any float dtype) are cast to ``x_s``' dtype after the ratio is formed
    and must broadcast against it.
    """
    ratio = abar_t / abar_s
    dtype = x_s.dtype
    return (tf.cast(tf.sqrt(ratio), dtype) * x_s
            + tf.cast(tf.sqrt(1.0 - ratio), dtype) * noise)


def prediction_to_x0_eps(model_output, x_t, abar_t, prediction_type: str):
    """Convert a network output in any parameterisation to ``(x0_hat, eps_hat)``.

    ``abar_t`` must broadcast against ``x_t``.
    """
    sqrt_abar = tf.sqrt(abar_t)
    sqrt_one_minus = tf.sqrt(1.0 - abar_t)
    if prediction_type == "eps":
        eps = model_output
        x0 = (x_t - sqrt_one_minus * eps) / sqrt_abar
    elif prediction_type == "x0":
        x0 = model_output
        eps = (x_t - sqrt_abar * x0) / sqrt_one_minus
    elif prediction_type == "v":
        x0 = sqrt_abar * x_t - sqrt_one_minus * model_output
        eps = sqrt_one_minus * x_t + sqrt_abar * model_output
    else:
        raise ValueError(
            f"Unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}"
        )
    return x0, eps


def eps_from_x0(x_t, x0, abar_t):
    """The noise that maps ``x0`` to ``x_t``: ``(x_t - sqrt(abar) x0) / sqrt(1 - abar)``."""
    return (x_t - tf.sqrt(abar_t) * x0) / tf.sqrt(1.0 - abar_t)


def prediction_target(x0, noise, abar_t, prediction_type: str):
    """What the network should output for ``x_t = sqrt(abar) x0 + sqrt(1 - abar) noise``."""
    if prediction_type == "eps":
        return noise
    if prediction_type == "x0":
        return x0
    if prediction_type == "v":
        return tf.sqrt(abar_t) * noise - tf.sqrt(1.0 - abar_t) * x0
    raise ValueError(
        f"Unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}"
    )


def min_snr_weight(snr, gamma, prediction_type: str):
    """Min-SNR-gamma loss weight (Hang et al. 2023) for one parameterisation.

    With these weights every parameterisation's squared error equals
    ``min(snr, gamma) * ||x_0 - x0_hat||^2``.
    """
    clipped = tf.minimum(snr, gamma)
    if prediction_type == "eps":
        return clipped / snr
    if prediction_type == "v":
        return clipped / (snr + 1.0)
    if prediction_type == "x0":
        return clipped
    raise ValueError(
        f"Unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}"
    )


class GaussianDiffusion:
    """Schedule tables and the DDPM formulas for one chain of T steps.

    Args:
      schedule: ``"linear"`` or ``"cosine"``.
      num_timesteps: T.
      prediction_type: ``"eps"``, ``"x0"`` or ``"v"``.
      variance_type: ``"fixed_small"`` (``beta~_t``), ``"fixed_large"``
        (``beta_t``, with ``beta~_1`` at t = 0 as in improved-diffusion) or
        ``"learned_range"`` (the network outputs twice the data channels and the
        variance interpolates between ``beta~_t`` and ``beta_t``; see the module doc).
      zero_terminal_snr: rescale the schedule so that ``abar_{T-1} = 0``.
        Requires ``prediction_type="v"`` or ``"x0"`` (eps cannot be
        converted to x0 at zero SNR).
      min_snr_gamma: if set, weight the loss by Min-SNR-gamma.

    All tables are float64 numpy arrays; tensors returned by the methods take
    the dtype of their ``x`` argument.
    """

    def __init__(
        self,
        schedule: str = "cosine",
        num_timesteps: int = 1000,
        prediction_type: str = "eps",
        variance_type: str = "fixed_small",
        zero_terminal_snr: bool = False,
        min_snr_gamma: float | None = None,
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"Unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}"
            )
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(
                f"Unknown variance_type {variance_type!r}; valid: {', '.join(VARIANCE_TYPES)}"
            )
        if zero_terminal_snr and prediction_type == "eps":
            raise ValueError(
                "zero_terminal_snr=True needs prediction_type 'v' or 'x0': an eps prediction "
                "cannot be turned into x0 at zero signal-to-noise ratio"
            )
        if min_snr_gamma is not None and not (np.isfinite(min_snr_gamma) and min_snr_gamma > 0):
            raise ValueError(f"min_snr_gamma must be a finite number > 0, got {min_snr_gamma!r}")
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.variance_type = variance_type
        self.zero_terminal_snr = zero_terminal_snr
        self.min_snr_gamma = min_snr_gamma

        betas = schedules.make_betas(schedule, num_timesteps, zero_terminal_snr)
        self.num_timesteps = int(num_timesteps)
        self.betas = betas
        self.alphas_cumprod = np.cumprod(1.0 - betas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        # Posterior tables, written with the shared formula so they cannot drift.
        c1, c2, var = posterior_coefficients(
            tf.constant(self.alphas_cumprod), tf.constant(self.alphas_cumprod_prev)
        )
        self.posterior_mean_coef1 = c1.numpy()
        self.posterior_mean_coef2 = c2.numpy()
        self.posterior_variance = var.numpy()
        # log(beta~_0) = log(0): use log(beta~_1) there, as the reference code does.
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        # The upper end of the learned range (the reference uses log(betas), unclipped).
        self.log_betas = np.log(betas)

    def get_config(self) -> dict:
        return {
            "schedule": self.schedule,
            "num_timesteps": self.num_timesteps,
            "prediction_type": self.prediction_type,
            "variance_type": self.variance_type,
            "zero_terminal_snr": self.zero_terminal_snr,
            "min_snr_gamma": self.min_snr_gamma,
        }

    # -- table look-up ---------------------------------------------------
    def gather(self, table: np.ndarray, t, like: tf.Tensor) -> tf.Tensor:
        """``table[t]`` in float64, cast to ``like``'s dtype and shaped to broadcast with it."""
        values = tf.gather(tf.constant(table, tf.float64), t)
        return _broadcast_to_rank(tf.cast(values, like.dtype), len(like.shape))

    def abar(self, t, like: tf.Tensor) -> tf.Tensor:
        return self.gather(self.alphas_cumprod, t, like)

    def snr(self, t) -> tf.Tensor:
        """Signal-to-noise ratio ``abar_t / (1 - abar_t)`` (float64, shape of ``t``)."""
        abar = tf.gather(tf.constant(self.alphas_cumprod, tf.float64), t)
        return abar / (1.0 - abar)

    # -- forward process -------------------------------------------------
    def q_mean_variance(self, x0, t):
        """Mean, variance and log-variance of ``q(x_t | x_0)``."""
        abar = self.abar(t, x0)
        return tf.sqrt(abar) * x0, 1.0 - abar, tf.math.log(1.0 - abar)

    def q_sample(self, x0, t, noise):
        """Draw ``x_t ~ q(x_t | x_0)`` with the given standard normal ``noise``."""
        abar = self.abar(t, x0)
        return tf.sqrt(abar) * x0 + tf.sqrt(1.0 - abar) * noise

    def q_posterior_mean_variance(self, x0, x_t, t):
        """Mean, variance and clipped log-variance of ``q(x_{t-1} | x_t, x_0)``."""
        mean = (
            self.gather(self.posterior_mean_coef1, t, x_t) * x0
            + self.gather(self.posterior_mean_coef2, t, x_t) * x_t
        )
        return (
            mean,
            self.gather(self.posterior_variance, t, x_t),
            self.gather(self.posterior_log_variance_clipped, t, x_t),
        )

    # -- reverse process -------------------------------------------------
    @property
    def learns_variance(self) -> bool:
        """True when the network also outputs the reverse variance (``learned_range``)."""
        return self.variance_type in LEARNED_VARIANCE_TYPES

    def output_channels(self, data_channels: int) -> int:
        """Channels of the network output for this variance type (:func:`output_channels`)."""
        return output_channels(self.variance_type, data_channels)

    def split_output(self, model_output):
        """``(prediction, var_values)`` of a network output; ``var_values`` is None if fixed.

        With ``learned_range`` the last axis holds ``2C`` channels: the first ``C`` are
        the eps / x0 / v prediction, the last ``C`` the variance values ``v`` of
        :func:`learned_range_log_variance`. With a fixed variance the output is the
        prediction itself.
        """
        if not self.learns_variance:
            return model_output, None
        channels = model_output.shape[-1]
        if channels is None or channels % 2:
            raise ValueError(
                f"variance_type={self.variance_type!r} needs a network output with an even "
                f"number of channels (prediction, then variance values), got shape "
                f"{model_output.shape}")
        prediction, var_values = tf.split(model_output, 2, axis=-1)
        return prediction, var_values

    def model_log_variance(self, t, like, var_values=None):
        """Log-variance of ``p(x_{t-1} | x_t)`` on the full chain.

        ``fixed_small``: clipped ``log beta~_t``; ``fixed_large``: ``log beta_t``
        (``log beta~_1`` at t = 0); ``learned_range``: :func:`learned_range_log_variance`
        of ``var_values`` (required; the second half of the network output) between
        ``log beta_t`` and the clipped ``log beta~_t``, shaped like ``var_values``.
        """
        if self.learns_variance:
            if var_values is None:
                raise ValueError(f"variance_type={self.variance_type!r}: the log-variance "
                                 "depends on the network output; pass var_values")
            return learned_range_log_variance(
                var_values, self.gather(self.log_betas, t, var_values),
                self.gather(self.posterior_log_variance_clipped, t, var_values))
        if self.variance_type == "fixed_small":
            return self.gather(self.posterior_log_variance_clipped, t, like)
        large = np.log(np.append(self.posterior_variance[1], self.betas[1:]))
        return self.gather(large, t, like)

    def p_mean_variance(self, model_output, x_t, t, clip_denoised: bool = False):
        """Mean, variance, log-variance and the predicted ``x_0`` of ``p(x_{t-1} | x_t)``.

        The mean is the posterior mean at the predicted ``x_0`` (clipped to
        [-1, 1] first when ``clip_denoised``). ``model_output`` is the full network
        output (with the variance channels for ``learned_range``, see :meth:`split_output`).
        """
        prediction, var_values = self.split_output(model_output)
        x0_hat, _ = prediction_to_x0_eps(prediction, x_t, self.abar(t, x_t), self.prediction_type)
        if clip_denoised:
            x0_hat = tf.clip_by_value(x0_hat, -1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(x0_hat, x_t, t)
        log_variance = self.model_log_variance(t, x_t, var_values)
        return mean, tf.exp(log_variance), log_variance, x0_hat

    # -- training objective ----------------------------------------------
    def loss_weights(self, t) -> tf.Tensor:
        """Per-example loss weight (float32, shape of ``t``): Min-SNR-gamma or 1."""
        if self.min_snr_gamma is None:
            return tf.ones(tf.shape(t), tf.float32)
        weight = min_snr_weight(self.snr(t), tf.constant(self.min_snr_gamma, tf.float64),
                                self.prediction_type)
        return tf.cast(weight, tf.float32)

    def per_example_loss(self, model_output, x0, noise, t):
        """Mean squared error of the prediction, averaged over all but the batch axis.

        This is ``L_simple`` (for eps prediction) before any per-example weight.
        With ``learned_range`` the variance channels of ``model_output`` are ignored
        (split off with :meth:`split_output`): the MSE trains the prediction only.
        """
        if self.learns_variance and model_output.shape[-1] == 2 * x0.shape[-1]:
            model_output, _ = self.split_output(model_output)
        target = prediction_target(x0, noise, self.abar(t, x0), self.prediction_type)
        error = tf.square(tf.cast(model_output, tf.float32) - tf.cast(target, tf.float32))
        return tf.reduce_mean(tf.reshape(error, [tf.shape(error)[0], -1]), axis=-1)
