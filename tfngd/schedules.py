"""Noise schedules and timestep respacing.

The beta tables are computed once in float64 with numpy (they are constants of
the model), and cast to the compute dtype where they are used.

* Linear schedule (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"):
  ``beta`` from 1e-4 to 2e-2 over T = 1000 steps, rescaled by ``1000 / T``.
* Cosine schedule (Nichol & Dhariwal 2021, "Improved DDPM"):
  ``abar(t) = cos^2(((t / T + s) / (1 + s)) * pi / 2)``, ``s = 0.008``,
  ``beta_t = min(1 - abar_t / abar_{t-1}, 0.999)``.
* Zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and
  Sample Steps are Flawed", Algorithm 1): shift and scale ``sqrt(abar)`` so that
  ``abar_T = 0`` while ``abar_1`` is unchanged.

Respacing (sampling with K of the T steps) follows the three conventions of
diffusers' schedulers; the lists are computed with TensorFlow ops so that the
number of steps can be a runtime input of an exported sampler:

* ``linspace``: ``round(linspace(0, T - 1, K))``
* ``leading``:  ``arange(K) * (T // K)``
* ``trailing``: ``round(arange(T, 0, -T / K)) - 1``
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from tfngd.validation import check_integer

SCHEDULES = ("linear", "cosine")
SPACINGS = ("linspace", "leading", "trailing")


def linear_betas(num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Ho et al.'s linear schedule, scaled so any T spans the same noise range.

    For T <= 20 the scaled end point reaches 1; betas are capped at ``max_beta``
    (as the cosine schedule is) so that ``abar`` stays positive.
    """
    scale = 1000.0 / num_timesteps
    betas = np.linspace(scale * 1e-4, scale * 2e-2, num_timesteps, dtype=np.float64)
    return np.minimum(betas, max_beta)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule: ``abar(t) = cos^2((t/T + s)/(1 + s) * pi/2)``."""

    def abar(t):
        return math.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2

    return np.array(
        [min(1.0 - abar(i + 1) / abar(i), max_beta) for i in range(num_timesteps)],
        dtype=np.float64,
    )


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. (2023), Algorithm 1: make ``abar_T = 0`` and keep ``abar_1``."""
    sqrt_abar = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_abar[0], sqrt_abar[-1]
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def make_betas(name: str, num_timesteps: int, zero_terminal_snr: bool = False) -> np.ndarray:
    """The float64 beta table of the schedule called ``name``."""
    num_timesteps = check_integer("num_timesteps", num_timesteps, 2)
    if name == "linear":
        betas = linear_betas(num_timesteps)
    elif name == "cosine":
        betas = cosine_betas(num_timesteps)
    else:
        raise ValueError(f"Unknown schedule {name!r}; valid schedules: {', '.join(SCHEDULES)}")
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def respaced_timesteps(num_timesteps: int, num_steps, spacing: str = "trailing") -> tf.Tensor:
    """The ``num_steps`` original timesteps a respaced sampler visits, ascending.

    Args:
      num_timesteps: T, the length of the training chain.
      num_steps: K, a Python int or an int32 scalar tensor with ``1 <= K <= T``.
      spacing: ``"linspace"``, ``"leading"`` or ``"trailing"``.

    Returns:
      An int32 tensor of shape ``[K]`` with strictly increasing values in
      ``[0, T - 1]``.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"Unknown spacing {spacing!r}; valid spacings: {', '.join(SPACINGS)}")
    if isinstance(num_steps, (int, np.integer)) and not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
    k = tf.cast(num_steps, tf.int32)
    big_t = tf.constant(num_timesteps, tf.int32)
    with tf.control_dependencies([
        tf.debugging.assert_greater_equal(k, 1, message="num_steps must be >= 1"),
        tf.debugging.assert_less_equal(k, big_t, message=f"num_steps must be <= {num_timesteps}"),
    ]):
        k = tf.identity(k)
    if spacing == "linspace":
        last = tf.cast(big_t - 1, tf.float64)
        steps = tf.round(tf.linspace(tf.zeros([], tf.float64), last, k))
    elif spacing == "leading":
        steps = tf.cast(tf.range(k) * (big_t // k), tf.float64)
    else:
        stride = tf.cast(big_t, tf.float64) / tf.cast(k, tf.float64)
        offsets = stride * tf.range(tf.cast(k, tf.float64))
        descending = tf.round(tf.cast(big_t, tf.float64) - offsets)
        steps = tf.reverse(descending, axis=[0]) - 1.0
    return tf.cast(steps, tf.int32)
