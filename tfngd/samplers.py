"""Graph-mode samplers: ancestral DDPM, DDIM and DPM-Solver++ (2M) on any respaced chain.

A sampler is a small object with one method, ``step``, that maps ``x_t`` and
the denoiser's predictions to ``x_s`` for the previous kept step ``s``
(diffusers' scheduler interface, reduced to what graph code needs).
:func:`sample` runs the whole chain as a ``tf.while_loop``, so it compiles
into one graph (and into a SavedModel) instead of a Python loop of model
calls. It is deterministic for a given integer seed: every random draw is a
stateless op seeded by ``(seed, step index)``.

A *multistep* sampler (``multistep = True``) also remembers earlier steps: it has
``initial_state(x_T)``, a tuple of tensors that :func:`sample` carries through the
loop, and its ``step`` takes ``state=`` and returns ``(x_s, new_state)``. The
single-step samplers carry an empty state, so their graphs are what they were.

* Ancestral (Ho et al. 2020): ``x_s = c1 x0_hat + c2 x_t + sigma z`` with
  ``sigma^2 = beta~`` (``"fixed_small"``) or ``beta = 1 - abar_t / abar_s``
  (``"fixed_large"``), or the network's own variance (``"learned_range"``, Nichol &
  Dhariwal 2021: ``log sigma^2`` interpolated between ``log beta`` and ``log beta~`` of
  the respaced chain, :func:`tfngd.gaussian_diffusion.learned_range_log_variance`);
  no noise at the last step.
* DDIM (Song et al. 2021): ``x_s = sqrt(abar_s) x0_hat +
  sqrt(1 - abar_s - sigma^2) eps_hat + sigma z`` with
  ``sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s)``.
* DPM-Solver++ (2M) (Lu et al. 2022, arXiv 2211.01095, Algorithm 2): the multistep
  second-order solver of the probability-flow ODE in the data prediction, with
  ``alpha = sqrt(abar)``, ``sigma = sqrt(1 - abar)``, ``lambda = log(alpha / sigma)`` and
  ``h = lambda_s - lambda_t``: ``x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - e^-h) D``,
  ``D = x0_hat + (h / (2 h_prev)) (x0_hat - x0_prev)``; first order (``D = x0_hat``,
  which is DDIM with eta = 0) at the first step and at the last one, which lands on
  ``abar = 1`` and returns ``x0_hat`` exactly.

Classifier-free guidance (Ho & Salimans 2022) is a wrapper around the
denoiser: ``out = out_u + w (out_c - out_u)`` (w = 1: purely conditional;
w = 0: unconditional). It is exact for every parameterisation because the
conversions between eps, x0 and v are affine in the network output. A
learned-variance output is guided on its prediction channels only; its variance
channels are the conditional pass's (as in GLIDE and guided-diffusion).
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from tfngd import gaussian_diffusion as gd
from tfngd import schedules

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")


class AncestralSampler:
    """Ancestral DDPM step with fixed small (``beta~``), fixed large (``beta``) or learned variance.

    With ``variance_type="learned_range"``, :meth:`step` takes the model's per-element
    ``log_variance`` (which :func:`sample` computes from the variance channels on the
    chain being run); the fixed types ignore it.
    """

    def __init__(self, variance_type: str = "fixed_small"):
        if variance_type not in gd.VARIANCE_TYPES:
            raise ValueError(
                f"Unknown variance_type {variance_type!r}; valid: {', '.join(gd.VARIANCE_TYPES)}"
            )
        self.variance_type = variance_type

    @property
    def uses_learned_variance(self) -> bool:
        return self.variance_type in gd.LEARNED_VARIANCE_TYPES

    def step(self, x_t, x0_hat, eps_hat, abar_t, abar_prev, noise, log_variance=None):
        del eps_hat
        c1, c2, posterior_var = gd.posterior_coefficients(abar_t, abar_prev)
        dtype = x_t.dtype
        if self.uses_learned_variance:
            if log_variance is None:
                raise ValueError(f"variance_type={self.variance_type!r}: step needs the model's "
                                 "log_variance")
            sigma = tf.exp(0.5 * tf.cast(log_variance, dtype))
        else:
            var = (posterior_var if self.variance_type == "fixed_small"
                   else 1.0 - abar_t / abar_prev)
            sigma = tf.cast(tf.sqrt(var), dtype)
        return (tf.cast(c1, dtype) * x0_hat + tf.cast(c2, dtype) * x_t + sigma * noise)


class DDIMSampler:
    """DDIM step; ``eta = 0`` is deterministic, ``eta = 1`` matches DDPM's ``beta~``."""

    def __init__(self, eta: float = 0.0):
        if not eta >= 0.0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = float(eta)

    def step(self, x_t, x0_hat, eps_hat, abar_t, abar_prev, noise, log_variance=None):
        """One DDIM step; a learned ``log_variance`` is ignored (DDIM sets its own)."""
        del log_variance
        sigma = (self.eta * tf.sqrt((1.0 - abar_prev) / (1.0 - abar_t))
                 * tf.sqrt(1.0 - abar_t / abar_prev))
        direction = tf.sqrt(tf.maximum(1.0 - abar_prev - tf.square(sigma), 0.0))
        dtype = x_t.dtype
        return (tf.cast(tf.sqrt(abar_prev), dtype) * x0_hat + tf.cast(direction, dtype) * eps_hat
                + tf.cast(sigma, dtype) * noise)


class DPMSolverPlusPlus2M:
    """DPM-Solver++ (2M): multistep second-order solver of the probability-flow ODE.

    Lu, Zhou, Bao, Chen, Li, Zhu 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
    Diffusion Probabilistic Models" (arXiv 2211.01095), Algorithm 2. In the log-SNR
    ``lambda = log(alpha / sigma)`` (``alpha = sqrt(abar)``, ``sigma = sqrt(1 - abar)``)
    the ODE's exact solution from ``t`` to ``s`` is (variation of constants, Lu et al.)

        x_s = (sigma_s / sigma_t) x_t + sigma_s int_{lambda_t}^{lambda_s} e^l x0(l) dl;

    DPM-Solver++ (2M) replaces ``x0(l)`` by the current ``x0_hat`` plus the backward
    finite-difference slope ``(x0_hat - x0_prev) / h_prev`` of the previous step (a
    multistep method: no extra network call), with the slope's weight kept to leading
    order in ``h``:

        h = lambda_s - lambda_t,   r = h_prev / h
        D = (1 + 1 / (2 r)) x0_hat - (1 / (2 r)) x0_prev
        x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - e^-h) D

    The first step has no ``x0_prev`` and is first order (``D = x0_hat``: exactly DDIM
    with eta = 0). So is the last: it goes to ``abar = 1`` (``sigma_s = 0``,
    ``lambda_s = inf``, ``e^-h = 0``), where ``x_s = x0_hat`` is the exact solution of the
    step and the second-order term would be ``0 * inf`` (``1 / r = inf``); this is the
    reference implementations' first-order final step (``lower_order_final``;
    diffusers' ``final_sigmas_type="zero"``). With K = 2 steps the sampler is therefore
    DDIM; from K = 3 on the inner steps are second order.

    ``e^-h = alpha_t sigma_s / (sigma_t alpha_s)`` is formed from the ratios, so it is
    exact at both ends (``0`` at ``sigma_s = 0`` and at ``alpha_t = 0``, a zero-terminal-SNR
    start). The coefficients are computed in float64 and cast at use. Deterministic: the
    noise and a learned ``log_variance`` are ignored (as DDIM ignores them).
    """

    multistep = True

    def initial_state(self, x_t):
        """``(x0_prev, h_prev, has_prev)``: no previous step yet."""
        return (tf.zeros_like(x_t), tf.zeros([], tf.float64), tf.constant(False))

    def step(self, x_t, x0_hat, eps_hat, abar_t, abar_prev, noise, log_variance=None,
             state=None):
        """One step from ``abar_t`` to ``abar_prev``; returns ``(x_s, new_state)``."""
        del eps_hat, noise, log_variance
        x0_prev, h_prev, has_prev = self.initial_state(x_t) if state is None else state
        abar_t = tf.cast(abar_t, tf.float64)
        abar_prev = tf.cast(abar_prev, tf.float64)
        alpha_t, sigma_t = tf.sqrt(abar_t), tf.sqrt(1.0 - abar_t)
        alpha_s, sigma_s = tf.sqrt(abar_prev), tf.sqrt(1.0 - abar_prev)
        # lambda_s = inf at abar_prev = 1; lambda_t = -inf at abar_t = 0 (zero terminal SNR).
        h = (tf.math.log(alpha_s) - tf.math.log(sigma_s)) - (tf.math.log(alpha_t)
                                                             - tf.math.log(sigma_t))
        exp_neg_h = alpha_t * sigma_s / (sigma_t * alpha_s)
        second_order = tf.logical_and(has_prev, sigma_s > 0.0)
        # 1 / (2 r) = h / (2 h_prev); selected as a scalar so the unused inf never reaches x.
        correction = tf.where(second_order, h / (2.0 * h_prev), tf.zeros([], tf.float64))
        dtype = x_t.dtype
        data = x0_hat + tf.cast(correction, dtype) * (x0_hat - x0_prev)
        x_s = (tf.cast(sigma_s / sigma_t, dtype) * x_t
               + tf.cast(alpha_s * (1.0 - exp_neg_h), dtype) * data)
        return x_s, (x0_hat, h, tf.constant(True))


def make_sampler(name: str, variance_type: str = "fixed_small", eta: float = 0.0):
    """The sampler called ``name`` (one of :data:`SAMPLERS`).

    ``variance_type`` is the ancestral sampler's; ``eta`` is DDIM's and must be 0 for the
    deterministic ``"dpmpp_2m"``.
    """
    if name == "ddpm":
        return AncestralSampler(variance_type)
    if name == "ddim":
        return DDIMSampler(eta)
    if name == "dpmpp_2m":
        if eta != 0.0:
            raise ValueError(f"eta is DDIM's noise level; sampler 'dpmpp_2m' is deterministic "
                             f"and needs eta=0, got {eta}")
        return DPMSolverPlusPlus2M()
    raise ValueError(f"Unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")


def denoiser_fn(denoiser, label=None, guidance_scale=None, null_label: int | None = None,
                learned_variance: bool = False):
    """Wrap a denoiser ``model([x, t(, label)])`` as ``fn(x, t) -> prediction``.

    With ``label`` and ``guidance_scale`` given, applies classifier-free
    guidance against ``null_label`` in one batched call of size ``2B``. With
    ``learned_variance`` (the diffusion's ``learns_variance``: the output's last axis is
    the prediction, then as many variance channels) guidance combines the prediction
    channels only and keeps the conditional pass's variance channels.
    """
    if label is None:
        return lambda x, t: denoiser([x, t], training=False)
    if guidance_scale is None:
        return lambda x, t: denoiser([x, t, label], training=False)
    if null_label is None:
        raise ValueError("classifier-free guidance needs the model's null_label")

    def guided(x, t):
        both = denoiser(
            [tf.concat([x, x], 0), tf.concat([t, t], 0),
             tf.concat([label, tf.fill(tf.shape(label), null_label)], 0)],
            training=False,
        )
        conditional, unconditional = tf.split(both, 2, axis=0)
        variance = None
        if learned_variance:
            conditional, variance = tf.split(conditional, 2, axis=-1)
            unconditional, _ = tf.split(unconditional, 2, axis=-1)
        scale = tf.cast(guidance_scale, unconditional.dtype)
        scale = tf.reshape(scale, tf.concat([tf.shape(scale), tf.ones([len(x.shape) - 1],
                                                                      tf.int32)], 0))
        guided_prediction = unconditional + scale * (conditional - unconditional)
        if variance is None:
            return guided_prediction
        return tf.concat([guided_prediction, variance], axis=-1)

    return guided


def step_seed(seed, index):
    """The stateless seed of draw ``index`` of a run seeded with ``seed``."""
    return tf.stack([tf.cast(seed, tf.int64), tf.cast(index, tf.int64)])


def respaced_chain(diffusion: gd.GaussianDiffusion, num_steps, spacing: str = "trailing"):
    """``(timesteps, abar_kept, abar_prev_kept)`` of the respaced chain of ``num_steps`` steps.

    ``timesteps`` (int32 ``[K]``, ascending) are the kept original steps
    (:func:`tfngd.schedules.respaced_timesteps`); ``abar_kept[i]`` (float64) is ``abar`` at
    ``timesteps[i]`` and ``abar_prev_kept[i]`` that of the previous kept step (1 for
    ``i = 0``), so reverse step ``i`` goes from ``timesteps[i]`` to ``timesteps[i - 1]``.
    """
    timesteps = schedules.respaced_timesteps(diffusion.num_timesteps, num_steps, spacing)
    abar_kept = tf.gather(tf.constant(diffusion.alphas_cumprod, tf.float64), timesteps)
    abar_prev_kept = tf.concat([tf.ones([1], tf.float64), abar_kept[:-1]], axis=0)
    return timesteps, abar_kept, abar_prev_kept


def check_sampler(sampler, diffusion: gd.GaussianDiffusion) -> bool:
    """Whether ``sampler`` draws with the learned variance; ``ValueError`` if it cannot."""
    learned_sampler = getattr(sampler, "uses_learned_variance", False)
    if learned_sampler and not diffusion.learns_variance:
        raise ValueError(f"the sampler uses a learned variance, but the diffusion's "
                         f"variance_type is {diffusion.variance_type!r}")
    return learned_sampler


def reverse_step(fn, diffusion: gd.GaussianDiffusion, sampler, x, t, abar_t, abar_prev, noise,
                 clip_x0: bool = False, log_variance_bounds=None, **step_kwargs):
    """One reverse step ``x_t -> x_prev`` of a (respaced) chain: the denoiser, then ``sampler``.

    Calls ``fn(x, t)``, converts its prediction to ``(x0_hat, eps_hat)``
    (:func:`tfngd.gaussian_diffusion.prediction_to_x0_eps`; with ``clip_x0`` the ``x_0``
    is clipped to [-1, 1] and ``eps`` recomputed from it) and returns
    ``sampler.step(x, x0_hat, eps_hat, abar_t, abar_prev, noise)``. For a sampler with a
    learned variance, ``log_variance_bounds = (log beta', log beta~')`` of this step of the
    chain (:func:`tfngd.gaussian_diffusion.respaced_log_variance_bounds`) turn the
    network's variance channels into the step's ``log_variance``. ``step_kwargs`` go to
    ``sampler.step`` (a multistep sampler's ``state``; it then returns ``(x_prev, state)``).
    """
    dtype = x.dtype
    output = tf.cast(fn(x, tf.fill([tf.shape(x)[0]], t)), dtype)
    prediction, var_values = diffusion.split_output(output)
    x0_hat, eps_hat = gd.prediction_to_x0_eps(
        prediction, x, tf.cast(abar_t, dtype), diffusion.prediction_type
    )
    if clip_x0:
        x0_hat = tf.clip_by_value(x0_hat, -1.0, 1.0)
        eps_hat = gd.eps_from_x0(x, x0_hat, tf.cast(abar_t, dtype))
    if log_variance_bounds is not None:
        step_kwargs["log_variance"] = gd.learned_range_log_variance(var_values,
                                                                    *log_variance_bounds)
    return sampler.step(x, x0_hat, eps_hat, abar_t, abar_prev, noise, **step_kwargs)


def sample(
    fn: Callable,
    diffusion: gd.GaussianDiffusion,
    shape,
    seed,
    num_steps,
    sampler=None,
    spacing: str = "trailing",
    clip_x0: bool = False,
    dtype=tf.float32,
):
    """Run a sampler over a respaced chain of ``num_steps`` steps, in graph code.

    Args:
      fn: ``fn(x, t) -> network output`` (see :func:`denoiser_fn`).
      diffusion: the model's :class:`GaussianDiffusion` (schedule and parameterisation).
      shape: shape of the batch of samples (a list or a 1-D int tensor).
      seed: integer seed (Python int or scalar tensor).
      num_steps: K, Python int or int32 scalar tensor, ``1 <= K <= T``.
      sampler: an :class:`AncestralSampler`, :class:`DDIMSampler` or
        :class:`DPMSolverPlusPlus2M` (default: DDIM, eta=0); a multistep sampler's state
        is carried through the loop.
      spacing: respacing convention (see :mod:`tfngd.schedules`).
      clip_x0: clip the predicted ``x_0`` to [-1, 1] at every step (and
        recompute ``eps`` from it).

    With a ``learned_range`` diffusion ``fn`` returns the prediction and the variance
    channels (:meth:`GaussianDiffusion.split_output`); the prediction drives every
    sampler, and an ancestral ``learned_range`` sampler draws with the learned variance
    interpolated between the respaced chain's ``beta'`` and ``beta~'``
    (:func:`tfngd.gaussian_diffusion.respaced_log_variance_bounds`), as the reference's
    ``SpacedDiffusion`` does. DDIM and DPM-Solver++ ignore the variance channels.

    Returns:
      The samples ``x_0``, of the given shape.
    """
    sampler = sampler or DDIMSampler(0.0)
    learned_sampler = check_sampler(sampler, diffusion)
    timesteps, abar_kept, abar_prev_kept = respaced_chain(diffusion, num_steps, spacing)
    if learned_sampler:
        log_beta_kept, log_beta_tilde_kept = gd.respaced_log_variance_bounds(abar_kept)
    x = tf.random.stateless_normal(shape, seed=step_seed(seed, 0), dtype=dtype)

    multistep = getattr(sampler, "multistep", False)
    state = sampler.initial_state(x) if multistep else ()

    def body(i, x, state):
        noise = tf.random.stateless_normal(tf.shape(x), seed=step_seed(seed, i + 1), dtype=dtype)
        noise = noise * tf.cast(i > 0, dtype)
        bounds = (log_beta_kept[i], log_beta_tilde_kept[i]) if learned_sampler else None
        stepped = reverse_step(fn, diffusion, sampler, x, timesteps[i], abar_kept[i],
                               abar_prev_kept[i], noise, clip_x0, bounds,
                               **({"state": state} if multistep else {}))
        x, state = stepped if multistep else (stepped, state)
        return i - 1, x, state

    _, x, _ = tf.while_loop(
        lambda i, *_: i >= 0,
        body,
        (tf.shape(timesteps)[0] - 1, x, state),
        shape_invariants=(tf.TensorShape([]), x.shape,
                          tf.nest.map_structure(lambda v: v.shape, state)),
    )
    return x
