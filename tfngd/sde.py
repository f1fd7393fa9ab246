"""The score-SDE view of the diffusion models (Song et al. 2021).

References: Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole (2021), "Score-Based
Generative Modeling through Stochastic Differential Equations", ICLR (the SDEs, the
predictor-corrector sampler, the probability-flow ODE and its likelihood); Song, Durkan,
Murray & Ermon (2021b), "Maximum Likelihood Training of Score-Based Diffusion Models",
NeurIPS (the likelihood weighting); Hutchinson (1989) for the trace estimator. See
``docs/sde.md``.

**Forward SDEs** on ``t in [0, 1]``: ``dx = f(x, t) dt + g(t) dW`` with the linear drift
``f(x, t) = -1/2 beta(t) x`` of the variance-preserving family. With
``B(t) = int_0^t beta(s) ds`` every SDE here has the Gaussian marginal::

    x_t | x_0 ~ N(alpha(t) x_0, sigma(t)^2 I),    alpha(t) = exp(-B(t) / 2),

and the prior ``N(0, I)`` at ``t = 1``:

* :class:`VPSDE`: ``beta(t) = beta_min + t (beta_max - beta_min)``, ``g^2 = beta``,
  ``sigma^2 = 1 - exp(-B)``. With the defaults (0.1, 20) and ``N = 1000`` steps,
  ``beta(i / (N - 1)) / N`` is Ho et al.'s linear DDPM schedule (1e-4 to 2e-2).
* :class:`SubVPSDE`: the same ``beta(t)``, ``g^2 = beta (1 - exp(-2 B))``,
  ``sigma = 1 - exp(-B)`` (a smaller variance than VP at every t).
* :class:`DiscreteDDPMSDE`: the VP SDE of a trained :class:`GaussianDiffusion` (linear or
  cosine schedule). ``B`` is the monotone cubic interpolant of ``-log abar`` through the
  knots ``B(0) = 0``, ``B((i + 1) / T) = -log abar_i`` (``i = 0 .. T - 1``), so
  ``abar(t) = exp(-B(t))`` equals the table at ``t = (i + 1) / T``, ``beta(t) = dB/dt`` is
  continuous and positive (its mean over ``(i / T, (i + 1) / T]`` is ``-T log(1 - beta_i)``)
  and the SDE's exact transition over that cell is the DDPM step ``q(x_i | x_{i-1})``.

**Score** of an eps-predicting denoiser: ``score(x, t) = -eps_theta(x, t) / sigma(t)``; x0 and
v predictions are turned into eps with :func:`tfngd.gaussian_diffusion.prediction_to_x0_eps`
on the variance-preserving view ``x_t / s = sqrt(abar') x_0 + sqrt(1 - abar') eps`` with
``s^2 = alpha^2 + sigma^2`` and ``abar' = alpha^2 / s^2`` (``s = 1`` and ``abar' = alpha^2``
for VP; for sub-VP this defines what v means).

**Reverse-time SDE** ``dx = [f - g^2 score] dt + g dW`` (time running backwards) and
**probability-flow ODE** ``dx/dt = F(x, t) = f(x, t) - 1/2 g(t)^2 score(x, t)``; for the VP
family ``F = -1/2 beta(t) x + 1/2 g(t)^2 eps_theta / sigma(t)``.

**Denoiser time.** Every function here calls ``denoiser_fn(x, t)`` with continuous times
``t`` of shape ``[B]``; :func:`keras_denoiser_fn` maps them to a Keras denoiser's ``t``
input with :meth:`SDE.network_time` (``(N - 1) t`` for VP / sub-VP, Song et al.'s
convention; ``T t - 1`` for the discrete DDPM SDE, so ``t = (i + 1) / T`` is index ``i``),
rounded to the nearest integer (and clipped to the index range) when the input is an
integer, as it is for :func:`tfngd.networks.build_unet` and ``build_mlp_denoiser``.
"""

from __future__ import annotations

import abc
import math
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfngd import distribute, likelihood, samplers
from tfngd import gaussian_diffusion as gd
from tfngd.model import _STREAM_NOISE, _STREAM_T, DiffusionModel
from tfngd.validation import check_integer

SDE_NAMES = ("vp", "subvp", "ddpm")
PREDICTORS = ("reverse_diffusion", "euler_maruyama")
SDE_SAMPLERS = ("pc", "ode")
PROBES = ("rademacher", "gaussian")
# Exact divergence costs one backward pass per dimension: the default up to this many.
EXACT_DIVERGENCE_MAX_DIMS = 16
# 256-level data in [-1, 1] sit at -1 + 2k/255; bin k is [x_k - 1/255, x_k + 1/255).
BIN_WIDTH = 2.0 * likelihood.BIN_HALF_WIDTH


# -- input checks and shapes -----------------------------------------------------------------


def _checked_time(t) -> tf.Tensor:
    """``t`` as a float tensor; a ValueError when its value is known and outside [0, 1]."""
    t = tf.convert_to_tensor(t)
    if not t.dtype.is_floating:
        raise ValueError(f"t must be a float in [0, 1] (continuous time), got dtype {t.dtype.name}")
    value = tf.get_static_value(t)
    if value is not None:
        value = np.asarray(value)
        if not np.all(np.isfinite(value)) or np.any(value < 0.0) or np.any(value > 1.0):
            raise ValueError(
                f"t must lie in [0, 1], got values in [{np.min(value)}, {np.max(value)}]")
    return t


def _checked_finite(name: str, x: tf.Tensor) -> tf.Tensor:
    """``x``; a ValueError when its value is known and has NaN or infinity (in a graph, an
    ``InvalidArgumentError`` at run time)."""
    value = tf.get_static_value(x)
    if value is None:
        return tf.debugging.assert_all_finite(x, f"{name} has non-finite values (NaN or inf)")
    if not np.all(np.isfinite(value)):
        raise ValueError(f"{name} has {int(np.size(value) - np.isfinite(value).sum())} "
                         "non-finite values (NaN or infinity)")
    return x


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in gd.PREDICTION_TYPES:
        raise ValueError(f"Unknown prediction_type {prediction_type!r}; "
                         f"valid: {', '.join(gd.PREDICTION_TYPES)}")


def _check_eps_t(eps_t: float) -> None:
    if not (np.isfinite(eps_t) and 0.0 < eps_t < 1.0):
        raise ValueError(f"eps_t (the smallest time) must be in (0, 1), got {eps_t!r}")


def _check_tolerances(rtol: float, atol: float) -> None:
    if not (np.isfinite(rtol) and rtol > 0 and np.isfinite(atol) and atol > 0):
        raise ValueError(f"rtol and atol must be finite numbers > 0, got {rtol!r}, {atol!r}")


def _per_example(values: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
    """A scalar, or ``[B]`` values reshaped to ``[B, 1, ..., 1]``, in ``like``'s dtype."""
    values = tf.cast(values, like.dtype)
    if values.shape.rank == 0:
        return values
    return tf.reshape(values, tf.concat([tf.shape(values), tf.ones([len(like.shape) - 1],
                                                                   tf.int32)], 0))


def _batch_times(t, x: tf.Tensor) -> tf.Tensor:
    """A scalar or ``[B]`` time as a ``[B]`` vector in ``x``'s dtype."""
    return tf.broadcast_to(tf.cast(t, x.dtype), tf.shape(x)[:1])


def _compiled(function):
    """``function`` as one graph when called eagerly (a solver loop calls it many times)."""
    return tf.function(function) if tf.executing_eagerly() else function


# -- the SDEs ----------------------------------------------------------------------------------


class SDE(abc.ABC):
    """A forward SDE of the variance-preserving family (see the module doc).

    Subclasses give ``beta(t)``, its integral ``B(t)``, the network-time map and, for
    non-VP members, ``g(t)`` and ``sigma(t)``; everything else (marginals, drift, prior,
    discretisations) is written once here. Times are float tensors (any shape) in [0, 1];
    values known when called (eager tensors, Python numbers) are checked.

    Args:
      num_steps: N, the default number of steps of the discretised reverse process; an
        integer timestep ``i`` (as in an evaluation bank) means ``t = (i + 1) / N``.
    """

    name = ""

    def __init__(self, num_steps: int):
        self.num_steps = check_integer("num_steps", num_steps, 1)

    @abc.abstractmethod
    def beta(self, t) -> tf.Tensor:
        """``beta(t)``, the rate of the drift ``-1/2 beta(t) x``."""

    @abc.abstractmethod
    def integrated_beta(self, t) -> tf.Tensor:
        """``B(t) = int_0^t beta(s) ds``."""

    @abc.abstractmethod
    def network_time(self, t) -> tf.Tensor:
        """The (float) value of the denoiser's ``t`` input at continuous time ``t``."""

    @abc.abstractmethod
    def get_config(self) -> dict:
        """Constructor arguments (for run metadata)."""

    # -- marginals -------------------------------------------------------------------------
    def alphas_cumprod(self, t) -> tf.Tensor:
        """``abar(t) = alpha(t)^2 = exp(-B(t))``."""
        return tf.exp(-self.integrated_beta(t))

    def marginal_mean_coefficient(self, t) -> tf.Tensor:
        """``alpha(t) = exp(-B(t) / 2)``: ``E[x_t | x_0] = alpha(t) x_0``."""
        return tf.exp(-0.5 * self.integrated_beta(t))

    def marginal_std(self, t) -> tf.Tensor:
        """``sigma(t) = sqrt(1 - exp(-B(t)))`` (VP; ``expm1`` keeps small t accurate)."""
        return tf.sqrt(-tf.math.expm1(-self.integrated_beta(t)))

    def diffusion(self, t) -> tf.Tensor:
        """``g(t) = sqrt(beta(t))`` (VP)."""
        return tf.sqrt(self.beta(t))

    def drift(self, x, t) -> tf.Tensor:
        """``f(x, t) = -1/2 beta(t) x`` (``t`` a scalar or ``[B]``)."""
        return -0.5 * _per_example(self.beta(t), x) * x

    def marginal_coefficients(self, t, like):
        """``(alpha(t), sigma(t))`` shaped to broadcast with ``like``."""
        return (_per_example(self.marginal_mean_coefficient(t), like),
                _per_example(self.marginal_std(t), like))

    def variance_preserving_view(self, t):
        """``(s, abar')`` with ``x_t / s = sqrt(abar') x_0 + sqrt(1 - abar') eps``.

        ``s^2 = alpha^2 + sigma^2`` and ``abar' = alpha^2 / s^2``: the scaling under which
        the DDPM parameterisations (x0, v) of :mod:`tfngd.gaussian_diffusion` apply.
        """
        alpha, sigma = self.marginal_mean_coefficient(t), self.marginal_std(t)
        scale_squared = tf.square(alpha) + tf.square(sigma)
        return tf.sqrt(scale_squared), tf.square(alpha) / scale_squared

    def snr(self, t) -> tf.Tensor:
        """Signal-to-noise ratio ``alpha(t)^2 / sigma(t)^2``."""
        return tf.square(self.marginal_mean_coefficient(t) / self.marginal_std(t))

    def time_of_index(self, index) -> tf.Tensor:
        """Continuous time ``(i + 1) / N`` (float32) of integer timestep ``i``."""
        return (tf.cast(index, tf.float32) + 1.0) / float(self.num_steps)

    # -- prior -----------------------------------------------------------------------------
    def prior_sample(self, shape, seed, dtype=tf.float32) -> tf.Tensor:
        """``x_1 ~ N(0, I)`` from a stateless seed (shape ``[2]``)."""
        return tf.random.stateless_normal(shape, seed=seed, dtype=dtype)

    def prior_log_prob(self, z) -> tf.Tensor:
        """Per-example ``log N(z; 0, I) = -1/2 sum(z^2) - D/2 log(2 pi)`` in nats."""
        return likelihood.sum_over_example(-0.5 * (tf.square(z) + math.log(2.0 * math.pi)))

    # -- discretisations (reverse process) -------------------------------------------------
    def step_alpha(self, t, dt) -> tf.Tensor:
        """``1 - beta_i = abar(t) / abar(t - dt)`` of the discrete step ending at ``t``."""
        return tf.exp(self.integrated_beta(t - dt) - self.integrated_beta(t))

    def discretize(self, x, t, dt):
        """``(f_i, G_i)`` of the forward step ``x_t = x_{t-dt} + f_i + G_i z``.

        VP: the exact step over ``[t - dt, t]``, ``beta_i = 1 - abar(t) / abar(t - dt)``,
        ``f_i = (sqrt(1 - beta_i) - 1) x``, ``G_i = sqrt(beta_i)`` (for the discrete DDPM
        SDE on its grid this is the DDPM step with the table's ``beta_i``).
        """
        alpha = self.step_alpha(t, dt)
        return (_per_example(tf.sqrt(alpha) - 1.0, x) * x,
                _per_example(tf.sqrt(1.0 - alpha), x))


class VPSDE(SDE):
    """Variance-preserving SDE with linear ``beta(t)`` (Song et al. 2021, eq. 11).

    Args:
      beta_min, beta_max: ``beta(0)`` and ``beta(1)``, ``0 < beta_min <= beta_max``.
      num_steps: N (default steps of the PC sampler); the denoiser's time input is
        ``(N - 1) t``.
    """

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, num_steps: int = 1000):
        super().__init__(num_steps)
        if not (np.isfinite(beta_min) and np.isfinite(beta_max) and 0 < beta_min <= beta_max):
            raise ValueError("beta_min and beta_max must be finite with 0 < beta_min <= beta_max, "
                             f"got {beta_min!r}, {beta_max!r}")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def beta(self, t):
        t = _checked_time(t)
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integrated_beta(self, t):
        t = _checked_time(t)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * tf.square(t)

    def network_time(self, t):
        return _checked_time(t) * float(self.num_steps - 1)

    def get_config(self) -> dict:
        return {"name": self.name, "beta_min": self.beta_min, "beta_max": self.beta_max,
                "num_steps": self.num_steps}


class SubVPSDE(VPSDE):
    """Sub-VP SDE (Song et al. 2021, eq. 29): ``g^2 = beta (1 - exp(-2 B))``.

    Its marginal std ``1 - exp(-B)`` is below VP's ``sqrt(1 - exp(-B))``; the reverse-
    diffusion predictor uses the Euler discretisation ``f_i = f dt``, ``G_i = g sqrt(dt)``.
    """

    name = "subvp"

    def diffusion(self, t):
        return tf.sqrt(self.beta(t) * -tf.math.expm1(-2.0 * self.integrated_beta(t)))

    def marginal_std(self, t):
        return -tf.math.expm1(-self.integrated_beta(t))

    def discretize(self, x, t, dt):
        return self.drift(x, t) * dt, _per_example(self.diffusion(t) * math.sqrt(dt), x)


class DiscreteDDPMSDE(SDE):
    """The VP SDE of a (trained) discrete DDPM; see the module doc for the convention.

    ``B(t) = -log abar(t)`` is the monotone cubic (Fritsch-Carlson / PCHIP) interpolant of
    the knots ``B(0) = 0``, ``B((i + 1) / T) = -log alphas_cumprod[i]``, so ``abar(t)``
    equals the table at ``t = (i + 1) / T``, ``beta(t) = dB/dt`` is continuous and
    positive, and the SDE's exact transition from ``i / T`` to ``(i + 1) / T`` is the DDPM
    step ``q(x_i | x_{i-1})`` (it depends only on the knot values). The knot slopes are the
    harmonic means of the neighbouring secants (one-sided at the ends). The denoiser's time
    input is the continuous index ``T t - 1``. Zero-terminal-SNR schedules (``abar = 0`` at
    the end) are refused: ``B(1)`` is infinite.
    """

    name = "ddpm"

    def __init__(self, diffusion: gd.GaussianDiffusion):
        if not isinstance(diffusion, gd.GaussianDiffusion):
            raise ValueError(f"DiscreteDDPMSDE needs a GaussianDiffusion, got {type(diffusion)}")
        if diffusion.zero_terminal_snr:
            raise ValueError("DiscreteDDPMSDE cannot represent a zero-terminal-SNR schedule "
                             "(abar = 0 at the last step makes B(1) infinite)")
        super().__init__(diffusion.num_timesteps)
        self.diffusion_config = diffusion.get_config()
        knots = np.concatenate([[0.0], -np.log(diffusion.alphas_cumprod)])
        secants = np.diff(knots) * self.num_steps  # > 0: every beta_i > 0
        slopes = np.concatenate([secants[:1], 2.0 / (1.0 / secants[:-1] + 1.0 / secants[1:]),
                                 secants[-1:]])
        self._knots, self._slopes = knots, slopes

    def _hermite(self, t):
        """Cell, position ``s in [0, 1]`` and the four Hermite data of ``t``'s cell."""
        t = _checked_time(t)
        position = t * float(self.num_steps)
        cell = tf.clip_by_value(tf.floor(position), 0.0, float(self.num_steps - 1))
        index = tf.cast(cell, tf.int32)
        knots = tf.constant(self._knots, t.dtype)
        # Slopes in units of B per cell (dB/ds), s the position inside the cell.
        slopes = tf.constant(self._slopes / self.num_steps, t.dtype)
        return (position - cell, tf.gather(knots, index), tf.gather(knots, index + 1),
                tf.gather(slopes, index), tf.gather(slopes, index + 1))

    def integrated_beta(self, t):
        s, left, right, left_slope, right_slope = self._hermite(t)
        return (left + s * left_slope
                + tf.square(s) * (3.0 * (right - left) - 2.0 * left_slope - right_slope)
                + s * tf.square(s) * (2.0 * (left - right) + left_slope + right_slope))

    def beta(self, t):
        s, left, right, left_slope, right_slope = self._hermite(t)
        per_cell = (left_slope
                    + 2.0 * s * (3.0 * (right - left) - 2.0 * left_slope - right_slope)
                    + 3.0 * tf.square(s) * (2.0 * (left - right) + left_slope + right_slope))
        return float(self.num_steps) * per_cell

    def network_time(self, t):
        return _checked_time(t) * float(self.num_steps) - 1.0

    def get_config(self) -> dict:
        return {"name": self.name, "diffusion": self.diffusion_config}


def make_sde(name: str, diffusion: gd.GaussianDiffusion | None = None, beta_min: float = 0.1,
             beta_max: float = 20.0, num_steps: int = 1000) -> SDE:
    """The SDE called ``name``: ``"vp"``, ``"subvp"`` or ``"ddpm"`` (needs ``diffusion``)."""
    if name == "vp":
        return VPSDE(beta_min, beta_max, num_steps)
    if name == "subvp":
        return SubVPSDE(beta_min, beta_max, num_steps)
    if name == "ddpm":
        if diffusion is None:
            raise ValueError("the 'ddpm' SDE is built from a GaussianDiffusion: pass diffusion=")
        return DiscreteDDPMSDE(diffusion)
    raise ValueError(f"Unknown SDE {name!r}; valid SDEs: {', '.join(SDE_NAMES)}")


# -- denoiser, eps and score -------------------------------------------------------------------


def denoiser_time_input(denoiser: keras.Model, sde: SDE):
    """``t -> `` the value of ``denoiser``'s ``t`` input (its second input).

    A float input gets :meth:`SDE.network_time`; an integer input gets it rounded to the
    nearest integer and clipped to ``[0, round(network_time(1))]``.
    """
    dtype = tf.as_dtype(denoiser.inputs[1].dtype)
    if not dtype.is_integer:
        return lambda t: tf.cast(sde.network_time(t), dtype)
    with tf.init_scope():  # eagerly, also when called inside a tf.function
        largest = float(np.round(sde.network_time(tf.constant(1.0, tf.float64)).numpy()))

    def integer_time(t):
        return tf.cast(tf.clip_by_value(tf.round(sde.network_time(t)), 0.0, largest), dtype)

    return integer_time


def keras_denoiser_fn(denoiser: keras.Model, sde: SDE, label=None, guidance_scale=None,
                      null_label: int | None = None):
    """``fn(x, t) -> prediction`` for a Keras denoiser at continuous times ``t`` (``[B]``).

    Wraps :func:`tfngd.samplers.denoiser_fn` (labels and classifier-free guidance) with
    :func:`denoiser_time_input`; the network runs in float32, the output takes ``x``'s dtype.
    """
    network_fn = samplers.denoiser_fn(denoiser, label, guidance_scale, null_label)
    time_input = denoiser_time_input(denoiser, sde)

    def fn(x, t):
        return tf.cast(network_fn(tf.cast(x, tf.float32), time_input(t)), x.dtype)

    return fn


def eps_function(denoiser_fn, sde: SDE, prediction_type: str = "eps"):
    """``eps(x, t)``: the denoiser's noise prediction at time ``t`` (a scalar or ``[B]``).

    x0 and v outputs are converted with :func:`tfngd.gaussian_diffusion.prediction_to_x0_eps`
    on the variance-preserving view of the SDE (:meth:`SDE.variance_preserving_view`).
    """
    _check_prediction_type(prediction_type)

    def eps(x, t):
        output = tf.cast(denoiser_fn(x, _batch_times(t, x)), x.dtype)
        if prediction_type == "eps":
            return output
        # float64: 1 - abar' is ~sigma^2 ~ 1e-6 near t = 0, lost in float32.
        x64 = tf.cast(x, tf.float64)
        scale, abar = sde.variance_preserving_view(tf.cast(t, tf.float64))
        _, eps_hat = gd.prediction_to_x0_eps(tf.cast(output, tf.float64),
                                             x64 / _per_example(scale, x64),
                                             _per_example(abar, x64), prediction_type)
        return tf.cast(eps_hat, x.dtype)

    return eps


def score_function(denoiser_fn, sde: SDE, prediction_type: str = "eps"):
    """``score(x, t) = -eps_theta(x, t) / sigma(t)``, the estimate of ``grad log p_t(x)``."""
    eps = eps_function(denoiser_fn, sde, prediction_type)
    return lambda x, t: -eps(x, t) / _per_example(sde.marginal_std(t), x)


def probability_flow_drift(eps_fn, sde: SDE, x, t) -> tf.Tensor:
    """``F(x, t) = f(x, t) - 1/2 g^2 score = f(x, t) + 1/2 g(t)^2 eps(x, t) / sigma(t)``."""
    coefficient = 0.5 * tf.square(sde.diffusion(t)) / sde.marginal_std(t)
    return sde.drift(x, t) + _per_example(coefficient, x) * eps_fn(x, t)


# -- predictor-corrector sampling ----------------------------------------------------------------


def langevin_step(score_fn, x, t, noise, snr: float, alpha=1.0):
    """One Langevin corrector step with Song et al.'s signal-to-noise step size rule.

    ``x + e s + sqrt(2 e) z`` with ``s = score_fn(x, t)``, ``z = noise`` and
    ``e = 2 alpha (snr ||z|| / ||s||)^2`` (Song et al. 2021, Algorithm 5; ``alpha`` is
    ``1 - beta_i`` of the current step for VP-type SDEs). The norms are per-example norms
    averaged over the batch, as in the reference code: a per-example ratio is unstable in
    low dimension, where ``||s|| -> 0`` at a mode.
    """
    s = score_fn(x, t)

    def mean_norm(v):
        return tf.reduce_mean(tf.norm(tf.reshape(v, [tf.shape(v)[0], -1]), axis=-1))

    step = 2.0 * alpha * tf.square(snr * tf.math.divide_no_nan(mean_norm(noise), mean_norm(s)))
    return x + step * s + tf.sqrt(2.0 * step) * noise


def pc_sample(denoiser_fn, sde: SDE, shape, seed, num_steps: int | None = None,
              snr: float = 0.16, corrector_steps: int = 1, predictor: str = "reverse_diffusion",
              prediction_type: str = "eps", eps_t: float = 1e-3, dtype=tf.float32):
    """Predictor-corrector sampling (Song et al. 2021, Algorithms 4 and 5), in graph code.

    Times ``t_k = 1 - k (1 - eps_t) / N``, ``k = 0 .. N``, ``dt = (1 - eps_t) / N``. From
    ``x ~ N(0, I)``, for ``k = 0 .. N - 1``:

    1. corrector: ``corrector_steps`` Langevin steps at ``t_k`` (:func:`langevin_step`):
       ``x <- x + e s(x, t_k) + sqrt(2 e) z`` with the signal-to-noise rule
       ``e = 2 alpha_k (snr ||z|| / ||s||)^2``, ``alpha_k = abar(t_k) / abar(t_k - dt)``;
    2. predictor from ``t_k`` to ``t_{k+1}``: reverse diffusion
       ``x <- x - f_k + G_k^2 s(x, t_k) + G_k z`` with ``(f_k, G_k) = sde.discretize`` (for
       VP: ``(2 - sqrt(1 - beta_k)) x + beta_k s + sqrt(beta_k) z``), or Euler-Maruyama
       ``x <- x - [f - g^2 s] dt + g sqrt(dt) z``. The last step adds no noise.

    Args:
      denoiser_fn: ``fn(x, t) -> network output`` at continuous times ``t`` (``[B]``), e.g.
        :func:`keras_denoiser_fn`.
      sde: the :class:`SDE` the denoiser was trained for.
      shape: the batch shape ``[B, ...]``.
      seed: integer seed; draw ``i`` uses the stateless seed ``(seed, i)``.
      num_steps: N (default ``sde.num_steps``).
      snr: the corrector's signal-to-noise ratio ``r`` (0.16 for VP in Song et al.).
      corrector_steps: Langevin steps per time step (0: predictor only).
      predictor: ``"reverse_diffusion"`` or ``"euler_maruyama"``.
      prediction_type: the denoiser's parameterisation.
      eps_t: the last time.

    Returns:
      ``(samples, nfe)``: samples of ``shape`` and the number of network evaluations,
      ``N (1 + corrector_steps)``.
    """
    num_steps = sde.num_steps if num_steps is None else num_steps
    num_steps = check_integer("num_steps", num_steps, 1)
    corrector_steps = check_integer("corrector_steps", corrector_steps, 0)
    if not (np.isfinite(snr) and snr > 0):
        raise ValueError(f"snr must be a finite number > 0, got {snr!r}")
    if predictor not in PREDICTORS:
        raise ValueError(f"Unknown predictor {predictor!r}; valid: {', '.join(PREDICTORS)}")
    _check_eps_t(eps_t)
    score = score_function(denoiser_fn, sde, prediction_type)
    dt = (1.0 - eps_t) / num_steps
    draws_per_step = corrector_steps + 1
    x = sde.prior_sample(shape, samplers.step_seed(seed, 0), dtype)

    def noise(index):
        return tf.random.stateless_normal(tf.shape(x), seed=samplers.step_seed(seed, index),
                                          dtype=dtype)

    def corrector(k, t, x):
        alpha = tf.cast(sde.step_alpha(t, dt), dtype)

        def langevin(j, x):
            z = noise(1 + k * draws_per_step + j)
            return j + 1, langevin_step(score, x, t, z, snr, alpha)

        _, x = tf.while_loop(lambda j, _: j < corrector_steps, langevin, (0, x))
        return x

    def predictor_step(k, t, x):
        s = score(x, t)
        z = noise(1 + k * draws_per_step + corrector_steps)
        z = z * tf.cast(k < num_steps - 1, dtype)
        if predictor == "reverse_diffusion":
            f, big_g = sde.discretize(x, t, dt)
            return x - f + tf.square(big_g) * s + big_g * z
        g = _per_example(sde.diffusion(t), x)
        return x - (sde.drift(x, t) - tf.square(g) * s) * dt + g * math.sqrt(dt) * z

    def body(k, x):
        t = 1.0 - tf.cast(k, dtype) * dt
        x = corrector(k, t, x)
        return k + 1, predictor_step(k, t, x)

    def run(x):
        return tf.while_loop(lambda k, _: k < num_steps, body, (0, x),
                             shape_invariants=(tf.TensorShape([]), x.shape))[1]

    return _compiled(run)(x), num_steps * draws_per_step


# -- probability-flow ODE: sampling and likelihood ----------------------------------------------


def ode_sample(denoiser_fn, sde: SDE, shape, seed, prediction_type: str = "eps",
               rtol: float = 1e-5, atol: float = 1e-5, eps_t: float = 1e-3, dtype=tf.float32):
    """Samples by solving the probability-flow ODE from ``t = 1`` to ``eps_t``.

    ``x(1) ~ N(0, I)`` (stateless seed ``(seed, 0)``), then Dormand-Prince
    (``tfp.math.ode.DormandPrince``, adaptive RK45 with the given tolerances) on
    ``dx/ds = -F(x, -s)`` for ``s = -t`` from -1 to ``-eps_t`` (the solver integrates
    forward in time). One step size is shared by the batch.

    Returns:
      ``(samples, nfe)``: samples of ``shape`` and the number of evaluations of ``F`` (one
      network call each).
    """
    _check_eps_t(eps_t)
    _check_tolerances(rtol, atol)
    eps_fn = eps_function(denoiser_fn, sde, prediction_type)

    def ode_fn(s, x):
        # Dense output: stages may fall past the end time; the drift is frozen there.
        t = tf.clip_by_value(-s, eps_t, 1.0)
        return -probability_flow_drift(eps_fn, sde, x, t)

    z = sde.prior_sample(shape, samplers.step_seed(seed, 0), dtype)
    results = tfp.math.ode.DormandPrince(rtol=rtol, atol=atol).solve(
        _compiled(ode_fn), -1.0, z, solution_times=[-eps_t])
    return results.states[-1], results.diagnostics.num_ode_fn_evaluations


class ODELikelihood(NamedTuple):
    """Per-example results of :func:`ode_likelihood`.

    ``negative_log_likelihood`` is in nats: ``-log p(x)`` for continuous data, or
    ``-log p(y)`` of the dequantised ``y in [0, 256)^D`` for 256-level data;
    ``bits_per_dim`` is it divided by ``D ln 2``; ``num_function_evaluations`` counts the
    evaluations of the drift (each with its divergence).
    """

    bits_per_dim: tf.Tensor
    negative_log_likelihood: tf.Tensor
    num_function_evaluations: tf.Tensor


def _drift_and_exact_divergence(drift_fn, x, t):
    """``F(x, t)`` and ``div F = sum_i dF_i / dx_i`` with one backward pass per dimension."""
    batch = tf.shape(x)[0]
    flat_x = tf.reshape(x, [batch, -1])
    dims = flat_x.shape[-1]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(flat_x)
        drift = drift_fn(tf.reshape(flat_x, tf.shape(x)), t)
        flat_drift = tf.reshape(drift, [batch, -1])
        components = [flat_drift[:, i] for i in range(dims)]
    divergence = tf.add_n([tape.gradient(components[i], flat_x)[:, i] for i in range(dims)])
    del tape
    return drift, divergence


def _drift_and_hutchinson_divergence(drift_fn, x, t, probe):
    """``F(x, t)`` and Hutchinson's ``z^T (dF/dx) z`` (one vector-Jacobian product)."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        drift = drift_fn(x, t)
    vjp = tape.gradient(drift, x, output_gradients=probe)
    return drift, likelihood.sum_over_example(vjp * probe)


def dequantize_256(x, seed):
    """Uniform dequantisation of 256-level data in [-1, 1]: ``x + (2u - 1) / 255``.

    ``x = -1 + 2k/255`` (ValueError otherwise); ``u ~ U[0, 1)^D`` from the stateless seed.
    The result is the image of ``y = k + u in [0, 256)^D`` under the affine map
    ``x = -1 + (2y - 1) / 255`` (bin ``k`` to ``[x_k - 1/255, x_k + 1/255)``, the bins of
    :func:`tfngd.likelihood.discretized_gaussian_log_likelihood`), whose Jacobian is
    ``(2/255)^D``.
    """
    value = tf.get_static_value(x)
    if value is not None:
        levels = (np.asarray(value, np.float64) + 1.0) / BIN_WIDTH
        if np.any(np.abs(value) > 1.0 + 1e-6) or np.max(np.abs(levels - np.round(levels))) > 1e-3:
            raise ValueError("dequantize=True needs 256-level data in [-1, 1] (values "
                             "-1 + 2k/255); pass dequantize=False for continuous data")
    u = tf.random.stateless_uniform(tf.shape(x), seed=seed, dtype=x.dtype)
    return x + (2.0 * u - 1.0) * (BIN_WIDTH / 2.0)


def ode_likelihood(denoiser_fn, sde: SDE, x, seed, exact_divergence: bool | None = None,
                   rtol: float = 1e-5, atol: float = 1e-5, dequantize: bool | None = None,
                   prediction_type: str = "eps", probe: str = "rademacher",
                   eps_t: float = 1e-5) -> ODELikelihood:
    """Negative log-likelihood and bits/dim of ``x`` under the probability-flow ODE.

    Solves ``d/dt [x, delta] = [F(x, t), div F(x, t)]`` from ``t = eps_t`` (``x(eps_t) = x``,
    ``delta = 0``) to ``t = 1`` with Dormand-Prince; the instantaneous change of variables
    (``d log p_t(x(t)) / dt = -div F``) gives ``log p(x) = log N(x(1); 0, I) + delta(1)``.

    ``div F`` is exact (sum of the Jacobian's diagonal, one backward pass per dimension) or
    Hutchinson's ``z^T (dF/dx) z`` with one probe ``z`` per example, drawn once per solve
    (Rademacher or standard normal; unbiased, ``E[z z^T] = I``).

    With 256-level data in [-1, 1] (``dequantize``; the default for rank-4 image batches)
    ``x`` is replaced by ``x + (2u - 1) / 255`` (:func:`dequantize_256`) and the density is
    reported for ``y = k + u in [0, 256)^D``: ``-log p(y) = -log p(x) - D log(2/255)``,
    i.e. ``log2(127.5) = 6.994`` bits/dim above the [-1, 1]-scale value. By Jensen's
    inequality its expectation over ``u`` bounds the discrete ``-log P(k)`` from above.

    Args:
      denoiser_fn: ``fn(x, t) -> network output`` at continuous times (``[B]``).
      sde: the :class:`SDE`.
      x: a batch ``[B, ...]`` of data.
      seed: integer seed of the probes (stream 0) and the dequantisation noise (stream 1).
      exact_divergence: default: exact for ``D <= EXACT_DIVERGENCE_MAX_DIMS``.
      rtol, atol: Dormand-Prince tolerances.
      dequantize: see above; default ``x.shape.rank == 4``.
      prediction_type: the denoiser's parameterisation.
      probe: Hutchinson probe, ``"rademacher"`` or ``"gaussian"``.
      eps_t: the starting time (the density is that of ``x_{eps_t}``).

    Returns:
      :class:`ODELikelihood` (per-example bits/dim and nats, and the solver's NFE).
    """
    _check_eps_t(eps_t)
    _check_tolerances(rtol, atol)
    _check_prediction_type(prediction_type)
    if probe not in PROBES:
        raise ValueError(f"Unknown probe {probe!r}; valid: {', '.join(PROBES)}")
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_floating:
        x = tf.cast(x, tf.float32)
    if x.shape.rank is None or x.shape.rank < 2 or None in x.shape[1:]:
        raise ValueError(f"x must be a batch [B, ...] with a known example shape, got {x.shape}")
    x = _checked_finite("x", x)
    dims = int(np.prod(x.shape[1:]))
    if dequantize is None:
        dequantize = x.shape.rank == 4
    if exact_divergence is None:
        exact_divergence = dims <= EXACT_DIVERGENCE_MAX_DIMS
    log_jacobian = 0.0
    if dequantize:
        x = dequantize_256(x, samplers.step_seed(seed, 1))
        log_jacobian = dims * math.log(BIN_WIDTH)  # log |dx/dy|
    eps_fn = eps_function(denoiser_fn, sde, prediction_type)

    def drift_fn(x, t):
        return probability_flow_drift(eps_fn, sde, x, t)

    if not exact_divergence:
        probe_seed = samplers.step_seed(seed, 0)
        if probe == "rademacher":
            bits = tf.random.stateless_uniform(tf.shape(x), seed=probe_seed, minval=0,
                                               maxval=2, dtype=tf.int32)
            probe_vector = tf.cast(2 * bits - 1, x.dtype)
        else:
            probe_vector = tf.random.stateless_normal(tf.shape(x), seed=probe_seed,
                                                      dtype=x.dtype)

    def ode_fn(t, state):
        x_t, _ = state
        t = tf.clip_by_value(t, eps_t, 1.0)  # stages past t = 1 (dense output): frozen drift
        if exact_divergence:
            return list(_drift_and_exact_divergence(drift_fn, x_t, t))
        return list(_drift_and_hutchinson_divergence(drift_fn, x_t, t, probe_vector))

    initial_state = [x, tf.zeros(tf.shape(x)[:1], x.dtype)]
    results = tfp.math.ode.DormandPrince(rtol=rtol, atol=atol).solve(
        _compiled(ode_fn), eps_t, initial_state, solution_times=[1.0])
    z, delta_logp = results.states[0][-1], results.states[1][-1]
    negative_log_likelihood = -(sde.prior_log_prob(z) + delta_logp) - log_jacobian
    return ODELikelihood(likelihood.nats_to_bits_per_dim(negative_log_likelihood, dims),
                         negative_log_likelihood, results.diagnostics.num_ode_fn_evaluations)


# -- continuous-time training ------------------------------------------------------------------


class ContinuousTimeDiffusion:
    """The training interface of :class:`GaussianDiffusion`, for continuous times.

    ``DiffusionModel.denoising_loss`` calls ``q_sample``, ``loss_weights`` and
    ``per_example_loss``; here ``t`` is a float time in ``(0, 1]`` (an integer ``i`` means
    ``(i + 1) / N``, see :meth:`SDE.time_of_index`).

    The loss is denoising score matching in eps form (Song et al. 2021, eq. 7, with
    ``score = -eps / sigma``): ``lambda(t) / sigma^2 ||eps_hat - eps||^2`` with
    ``lambda = sigma^2`` (weight 1) or, with ``likelihood_weighting``, Song et al. (2021b)'s
    ``lambda = g^2`` (weight ``g(t)^2 / sigma(t)^2``). An x0 or v network is trained on
    its own target, weighted by :func:`tfngd.gaussian_diffusion.min_snr_weight` with
    ``gamma = inf`` (``1``, ``abar'``, ``snr``: the factors that turn the eps, v and x0
    squared errors into the eps squared error), so every parameterisation minimises the
    same objective.
    """

    def __init__(self, sde: SDE, prediction_type: str = "eps",
                 likelihood_weighting: bool = False):
        _check_prediction_type(prediction_type)
        self.sde = sde
        self.prediction_type = prediction_type
        self.likelihood_weighting = bool(likelihood_weighting)

    @property
    def num_timesteps(self) -> int:
        """N: the grid of integer timesteps (evaluation banks, loss quartiles)."""
        return self.sde.num_steps

    variance_type = "fixed_small"  # the network predicts no variance
    learns_variance = False

    @staticmethod
    def output_channels(data_channels: int) -> int:
        """Channels of the network output: the prediction only (no learned variance)."""
        return data_channels

    @staticmethod
    def split_output(model_output):
        """``(prediction, None)``: the whole output is the prediction."""
        return model_output, None

    def continuous_time(self, t) -> tf.Tensor:
        """Float32 times; integer timesteps ``i`` become ``(i + 1) / N``."""
        t = tf.convert_to_tensor(t)
        if t.dtype.is_integer:
            return self.sde.time_of_index(t)
        return tf.cast(t, tf.float32)

    def q_sample(self, x0, t, noise):
        """``x_t = alpha(t) x_0 + sigma(t) eps``."""
        alpha, sigma = self.sde.marginal_coefficients(self._time64(t), x0)
        return alpha * x0 + sigma * noise

    def loss_weights(self, t) -> tf.Tensor:
        """Per-example float32 weights (see the class doc)."""
        t = self._time64(t)
        weight = gd.min_snr_weight(self.sde.snr(t), tf.constant(np.inf, tf.float64),
                                   self.prediction_type)
        if self.likelihood_weighting:
            weight = weight * tf.square(self.sde.diffusion(t) / self.sde.marginal_std(t))
        return tf.cast(weight, tf.float32)

    def per_example_loss(self, model_output, x0, noise, t):
        """Mean squared error against the parameterisation's target, per example."""
        _, abar = self.sde.variance_preserving_view(self._time64(t))
        if self.prediction_type == "v":  # the only target that uses abar: in float64
            x0, noise = tf.cast(x0, tf.float64), tf.cast(noise, tf.float64)
        target = gd.prediction_target(x0, noise, _per_example(abar, x0), self.prediction_type)
        error = tf.square(tf.cast(model_output, tf.float32) - tf.cast(target, tf.float32))
        return tf.reduce_mean(tf.reshape(error, [tf.shape(error)[0], -1]), axis=-1)

    def _time64(self, t):
        # The coefficients in float64: 1 - abar' ~ sigma^2 ~ 1e-5 near eps_t.
        return tf.cast(self.continuous_time(t), tf.float64)

    def get_config(self) -> dict:
        return {"sde": self.sde.get_config(), "prediction_type": self.prediction_type,
                "likelihood_weighting": self.likelihood_weighting}


class ContinuousTimestepSampler:
    """Training times: ``t ~ U(eps_t, 1)`` (weight 1) or importance-sampled.

    With ``importance`` (for the likelihood weighting, Song et al. 2021b, section 5), ``t``
    is drawn from ``p(t)`` roughly proportional to ``g(t)^2 / sigma(t)^2`` and weighted by
    ``1 / ((1 - eps_t) p(t))``, which keeps the objective an unbiased estimate of its
    uniform-t value while making ``weight * g^2 / sigma^2`` nearly constant. ``p`` is
    piecewise constant on ``num_cells`` geometric cells of ``[eps_t, 1]`` whose masses are
    trapezoid integrals of ``g^2 / sigma^2`` (so the density of the draws is known exactly).

    The interface is that of :mod:`tfngd.timestep_sampling` (``sample``, ``update``).
    """

    def __init__(self, eps_t: float = 1e-5, sde: SDE | None = None, importance: bool = False,
                 num_cells: int = 2048):
        _check_eps_t(eps_t)
        if importance and sde is None:
            raise ValueError("importance sampling of t needs the SDE")
        self.eps_t = float(eps_t)
        self.importance = bool(importance)
        if self.importance:
            edges = np.geomspace(self.eps_t, 1.0, num_cells + 1)
            time = tf.constant(edges, tf.float64)
            weight = (tf.square(sde.diffusion(time) / sde.marginal_std(time))).numpy()
            masses = 0.5 * (weight[1:] + weight[:-1]) * np.diff(edges)
            density = masses / masses.sum() / np.diff(edges)
            # Upper end of each cell's share of [0, 1] (the last one, 1, is never compared).
            self._cumulative = (np.cumsum(masses) / masses.sum())[:-1].astype(np.float32)
            self._left = edges[:-1].astype(np.float32)
            self._width = np.diff(edges).astype(np.float32)
            self._cell_weights = (1.0 / ((1.0 - self.eps_t) * density)).astype(np.float32)

    def sample(self, batch_size, seed):
        """``(t, weights)``: float32 times in ``[eps_t, 1]`` and unbiasing weights."""
        position, choice = tf.unstack(tf.random.stateless_uniform([2, batch_size], seed=seed))
        if not self.importance:
            return self.eps_t + (1.0 - self.eps_t) * position, tf.ones([batch_size], tf.float32)
        # Inverse CDF (XLA compiles searchsorted; it does not compile stateless_categorical).
        cell = tf.searchsorted(tf.constant(self._cumulative), choice, side="right")
        t = tf.gather(self._left, cell) + position * tf.gather(self._width, cell)
        return tf.minimum(t, 1.0), tf.gather(self._cell_weights, cell)

    def update(self, t, losses):
        """Nothing to record (the proposal is fixed)."""
        del t, losses
        return tf.no_op()


class ScoreSDEModel(DiffusionModel):
    """A :class:`DiffusionModel` trained in continuous time on an :class:`SDE`.

    Each step draws ``t ~ U(eps_t, 1)`` (Song et al. 2021 use ``eps_t = 1e-5``),
    ``x_t = alpha(t) x_0 + sigma(t) eps`` and minimises the eps-form denoising
    score-matching loss of :class:`ContinuousTimeDiffusion` (optionally with the likelihood
    weighting, and with importance-sampled ``t`` for it). Everything else is the parent's:
    ``train_step`` (and so K-FAC through ``gradients_and_curvature``), ``denoising_loss``,
    EMA, labels and classifier-free-guidance dropout. Only the time draw
    (:class:`ContinuousTimestepSampler`), the diffusion object, the time fed to the
    denoiser, the loss quartiles (``loss_q1``: ``t < 1/4``) and ``test_step``'s draw are
    replaced. ``test_step`` draws ``t ~ U(eps_t, 1)`` or uses the batch's ``"t"`` (float
    times, or integer timesteps ``i`` meaning ``(i + 1) / N``).

    The denoiser's time input gets :func:`denoiser_time_input` (rounded for the integer
    inputs of the project's networks). :meth:`sample` runs :func:`pc_sample` or
    :func:`ode_sample`.
    """

    def __init__(self, denoiser: keras.Model, sde: SDE, prediction_type: str = "eps",
                 likelihood_weighting: bool = False, importance_sampling: bool = False,
                 eps_t: float = 1e-5, ema_decay: float = 0.999, ema_warmup: bool = True,
                 num_classes: int | None = None, class_dropout: float = 0.1,
                 evaluate_with_ema: bool = True, seed: int = 0, **kwargs):
        if not isinstance(sde, SDE):
            raise ValueError(f"sde must be an SDE (VPSDE, SubVPSDE, DiscreteDDPMSDE), got {sde!r}")
        if importance_sampling and not likelihood_weighting:
            raise ValueError("importance_sampling draws t for the likelihood weighting: it needs "
                             "likelihood_weighting=True")
        _check_eps_t(eps_t)
        super().__init__(denoiser, ContinuousTimeDiffusion(sde, prediction_type,
                                                           likelihood_weighting),
                         timestep_sampler="uniform", ema_decay=ema_decay, ema_warmup=ema_warmup,
                         num_classes=num_classes, class_dropout=class_dropout,
                         evaluate_with_ema=evaluate_with_ema, seed=seed, **kwargs)
        self.sde = sde
        self.eps_t = float(eps_t)
        self.timestep_sampler = ContinuousTimestepSampler(eps_t, sde, importance_sampling)
        self.timestep_sampler_name = "importance" if importance_sampling else "uniform"
        self._time_input = denoiser_time_input(denoiser, sde)

    def _denoiser_inputs(self, x_t, t, label):
        return super()._denoiser_inputs(
            x_t, self._time_input(self.diffusion.continuous_time(t)), label)

    def _quartile_of(self, t):
        t = self.diffusion.continuous_time(t)
        return tf.minimum(tf.cast(tf.floor(4.0 * t), tf.int32), 3)

    def test_step(self, data):
        x0, label, t, noise = self._unpack(data)
        x0 = tf.cast(x0, tf.float32)
        batch = tf.shape(x0)[0]
        if t is None:
            t = self.eps_t + (1.0 - self.eps_t) * tf.random.stateless_uniform(
                [batch], seed=self._step_seed(_STREAM_T))
        t = self.diffusion.continuous_time(t)
        if noise is None:
            noise = tf.random.stateless_normal(tf.shape(x0), seed=self._step_seed(_STREAM_NOISE))
        denoiser = self.ema_denoiser if self.evaluate_with_ema else self.denoiser
        result = self.denoising_loss(denoiser, x0, t, tf.cast(noise, tf.float32), label,
                                     tf.ones([batch]), training=False)
        objective, per_example = result.loss, result.extras["per_example"]
        self.loss_tracker.update_state(objective, sample_weight=tf.cast(batch, tf.float32))
        self._update_quartiles(per_example, t)
        return distribute.step_logs(self.metrics[:-1])

    def sample(self, num_samples: int, seed: int = 0, num_steps: int | None = None,
               sampler: str = "pc", snr: float = 0.16, corrector_steps: int = 1,
               eps_t: float = 1e-3, rtol: float = 1e-5, atol: float = 1e-5, label=None,
               guidance_scale=None, use_ema: bool = True) -> tf.Tensor:
        """Samples with :func:`pc_sample` (``num_steps``, ``snr``, ``corrector_steps``) or
        :func:`ode_sample` (``rtol``, ``atol``), from the EMA weights by default."""
        if sampler not in SDE_SAMPLERS:
            raise ValueError(f"Unknown sampler {sampler!r} for a ScoreSDEModel; valid: "
                             f"{', '.join(SDE_SAMPLERS)}")
        num_samples = check_integer("num_samples", num_samples, 1)
        if num_steps is not None:
            num_steps = check_integer("num_steps", num_steps, 1)
        corrector_steps = check_integer("corrector_steps", corrector_steps, 0)
        label, guidance_scale = self.check_conditioning(label, guidance_scale, num_samples)
        key = ("sde_sample", num_samples, sampler, num_steps, float(snr), corrector_steps,
               float(eps_t), float(rtol), float(atol), label is None, guidance_scale is None,
               use_ema)

        def build():
            denoiser = self.ema_denoiser if use_ema else self.denoiser
            shape = [num_samples, *self.data_shape]
            prediction_type = self.diffusion.prediction_type

            @tf.function(reduce_retracing=True)
            def run(seed, label, guidance_scale):
                fn = keras_denoiser_fn(denoiser, self.sde, label, guidance_scale,
                                       self.null_label)
                if sampler == "pc":
                    return pc_sample(fn, self.sde, shape, seed, num_steps, snr, corrector_steps,
                                     prediction_type=prediction_type, eps_t=eps_t)[0]
                return ode_sample(fn, self.sde, shape, seed, prediction_type, rtol, atol,
                                  eps_t)[0]

            return run

        return self.graph_function(key, build)(
            tf.constant(seed, tf.int64),
            None if label is None else tf.constant(label, tf.int32),
            None if guidance_scale is None else tf.constant(guidance_scale, tf.float32))
