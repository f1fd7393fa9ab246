"""Log-likelihood primitives shared by every likelihood computation in the project.

One module owns these formulas (the DDPM bound, the NDM bound and the
probability-flow ODE likelihood all use them); see ``docs/likelihood.md``
and section 4 of the shared ``diffusion.md``.

* :func:`normal_kl`: ``KL(N(m1, e^lv1) || N(m2, e^lv2))`` elementwise, in nats::

      0.5 * (-1 + lv2 - lv1 + exp(lv1 - lv2) + (m1 - m2)^2 exp(-lv2))

* :func:`discretized_gaussian_log_likelihood`: the DDPM decoder
  ``log P(x_0 | x_1)`` of data quantised to 256 levels in [-1, 1] (Ho et al.
  2020, section 3.3): per element, with bin half-width ``1/255``,
  ``log[Phi((x - mu + 1/255)/sigma) - Phi((x - mu - 1/255)/sigma)]``, the
  lowest bin (``x < -0.999``) extended to ``-inf`` and the highest
  (``x > 0.999``) to ``+inf``; logs clamped at ``1e-12``. ``Phi`` is the exact
  normal CDF, ``Phi(z) = erfc(-z / sqrt 2) / 2``, and the edge bins use
  ``log Phi(z) = logerfc(-z / sqrt 2) - log 2`` (``tfp.math.logerfc``, finite
  far in the tails); the reference code uses a tanh approximation, which
  differs by less than ``1e-3`` in probability.
* :func:`nats_to_bits_per_dim`: divide a per-example sum of nats by
  ``D ln 2``.

Built on them (below): the DDPM variational bound in bits per dimension on the
full or a respaced chain, :func:`make_variational_bound` /
:func:`variational_bound` (Ho et al. 2020, appendix A; Nichol & Dhariwal 2021),
evaluated over a data set batch by batch with :func:`bound_in_batches`, with
:func:`gaussian_log_likelihood` as the decoder of continuous data, and the
single-timestep term of that bound that the hybrid objective of a learned-variance
model trains on, :func:`timestep_vlb_bits` (Nichol & Dhariwal 2021, section 3.1).
With ``variance_type="learned_range"`` every reverse variance here is the network's
(:meth:`tfngd.gaussian_diffusion.GaussianDiffusion.split_output` and
:func:`tfngd.gaussian_diffusion.learned_range_log_variance`).
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfngd import gaussian_diffusion as gd

BIN_HALF_WIDTH = 1.0 / 255.0
LOG_CLAMP = 1e-12


def normal_kl(mean1, log_variance1, mean2, log_variance2):
    """Elementwise ``KL(N(mean1, exp(log_variance1)) || N(mean2, exp(log_variance2)))`` in nats."""
    return 0.5 * (-1.0 + log_variance2 - log_variance1 + tf.exp(log_variance1 - log_variance2)
                  + tf.square(mean1 - mean2) * tf.exp(-log_variance2))


def _standard_normal_cdf(z):
    """``Phi(z)`` (TensorFlow has no ``ndtr``; ``erfc`` keeps the lower tail accurate)."""
    return 0.5 * tf.math.erfc(-z / math.sqrt(2.0))


def _standard_normal_log_cdf(z):
    """``log Phi(z)``, finite where ``Phi(z)`` underflows."""
    return tfp.math.logerfc(-z / math.sqrt(2.0)) - math.log(2.0)


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """Elementwise log-probability (nats) of x's 256-level bin under N(mean, e^(2 log_scale)).

    Args:
      x: data in [-1, 1] on the grid ``-1 + 2k/255``.
      mean: the decoder mean, broadcastable to ``x``.
      log_scale: the log standard deviation (half the log-variance).
    """
    centred = x - mean
    inverse_scale = tf.exp(-log_scale)
    upper = inverse_scale * (centred + BIN_HALF_WIDTH)
    lower = inverse_scale * (centred - BIN_HALF_WIDTH)
    log_cdf_upper = _standard_normal_log_cdf(upper)  # lowest bin: P(X < x + 1/255)
    log_survival_lower = _standard_normal_log_cdf(-lower)  # highest bin: P(X > x - 1/255)
    # Phi(u) - Phi(l) = Phi(-l) - Phi(-u): take the difference in the lower tail, where
    # erfc is accurate, instead of subtracting two numbers close to 1.
    reflect = centred > 0.0
    bin_probability = (_standard_normal_cdf(tf.where(reflect, -lower, upper))
                       - _standard_normal_cdf(tf.where(reflect, -upper, lower)))
    return tf.where(
        x < -0.999, log_cdf_upper,
        tf.where(x > 0.999, log_survival_lower,
                 tf.math.log(tf.maximum(bin_probability, LOG_CLAMP))))


def sum_over_example(values):
    """Sum over every axis but the first (per-example totals)."""
    return tf.reduce_sum(tf.reshape(values, [tf.shape(values)[0], -1]), axis=-1)


def nats_to_bits_per_dim(nats, dims):
    """Per-example nats (summed over ``dims`` elements) to bits per dimension."""
    return nats / (tf.cast(dims, nats.dtype) * math.log(2.0))


# -- the DDPM variational bound ----------------------------------------------------------------
#
# Everything below composes the four primitives above with the diffusion formulas of
# tfngd.gaussian_diffusion; the math is in docs/likelihood.md.

LOG_TWO_PI = math.log(2.0 * math.pi)


def gaussian_log_likelihood(x, mean, log_variance):
    """Elementwise ``log N(x; mean, exp(log_variance))`` in nats (the continuous decoder)."""
    return -0.5 * (LOG_TWO_PI + log_variance + tf.square(x - mean) * tf.exp(-log_variance))


def timestep_vlb_bits(diffusion, model_output, x0, x_t, t, discrete: bool,
                      clip_denoised: bool = False):
    """The term ``L_t`` of the variational bound at one draw ``x_t``, in bits per dimension.

    Per example (shape ``[B]``), with ``D`` the elements of an example::

        L_t = (1 / (D ln 2)) sum_d KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))  t > 0
        L_0 = -(1 / (D ln 2)) sum_d log p_theta(x_0 | x_1)                               t = 0

    the reference's ``_vb_terms_bpd`` (improved-diffusion): the Gaussian KL of
    :func:`normal_kl` and the decoder of :func:`discretized_gaussian_log_likelihood`
    (``discrete=True``, 256-level image data) or the Gaussian density of
    :func:`gaussian_log_likelihood` (continuous data). The reverse step is
    :meth:`~tfngd.gaussian_diffusion.GaussianDiffusion.p_mean_variance` of the full
    network output on the full chain (so a ``learned_range`` output sets the variance).
    ``t`` is an int32 ``[B]`` tensor; the computation runs in ``x0``'s dtype.
    """
    model_output = tf.cast(model_output, x0.dtype)
    true_mean, _, true_log_variance = diffusion.q_posterior_mean_variance(x0, x_t, t)
    model_mean, _, model_log_variance, _ = diffusion.p_mean_variance(
        model_output, x_t, t, clip_denoised=clip_denoised)
    model_log_variance = model_log_variance + tf.zeros_like(model_mean)
    dims = tf.reduce_prod(tf.shape(x0)[1:])
    kl = sum_over_example(normal_kl(true_mean, true_log_variance, model_mean, model_log_variance))
    if discrete:
        log_likelihood = discretized_gaussian_log_likelihood(x0, model_mean,
                                                             0.5 * model_log_variance)
    else:
        log_likelihood = gaussian_log_likelihood(x0, model_mean, model_log_variance)
    decoder = -sum_over_example(log_likelihood)
    return nats_to_bits_per_dim(tf.where(tf.equal(t, 0), decoder, kl), dims)


def validate_timesteps(timesteps, num_timesteps: int) -> np.ndarray:
    """The kept timesteps of a respaced chain as int32 numpy, or a ``ValueError``.

    They must be at least two distinct integers in ``[0, T - 1]`` in increasing order
    (the decoder's variance is the posterior variance between the first two).
    """
    try:
        kept = np.asarray(timesteps)
    except (TypeError, ValueError) as err:
        raise ValueError(f"timesteps: expected a sequence of integers ({err})") from err
    if kept.ndim != 1 or kept.size < 2:
        raise ValueError(f"timesteps must be a 1-D sequence of at least 2 steps, got shape "
                         f"{list(kept.shape)}")
    if not np.issubdtype(kept.dtype, np.integer):
        raise ValueError(f"timesteps must be integers, got dtype {kept.dtype}")
    if kept.min() < 0 or kept.max() > num_timesteps - 1:
        raise ValueError(f"timesteps must lie in [0, {num_timesteps - 1}], got values from "
                         f"{kept.min()} to {kept.max()}")
    if np.any(np.diff(kept) <= 0):
        raise ValueError("timesteps must be strictly increasing")
    return kept.astype(np.int32)


def _stateless_seed(seed) -> tf.Tensor:
    """An integer or a pair of integers as a ``[2]`` int64 stateless seed."""
    seed = tf.cast(seed, tf.int64)
    if seed.shape.rank == 0:
        return tf.stack([seed, tf.zeros([], tf.int64)])
    return tf.reshape(seed, [2])


class _RespacedChain:
    """Float64 tables of the chain through the kept steps ``t_0 < ... < t_{K-1}``.

    Step ``i`` goes from ``t_i`` to ``t_{i-1}`` (to the data for ``i = 0``):
    ``abar_prev_0 = 1``, ``(c1, c2, posterior variance) =
    posterior_coefficients(abar_{t_i}, abar_{t_{i-1}})``, and the reverse variance is the
    one :class:`tfngd.samplers.AncestralSampler` draws with on this chain: the posterior
    variance (``fixed_small``) or ``beta'_i = 1 - abar_{t_i} / abar_{t_{i-1}}``
    (``fixed_large``). At ``i = 0`` the posterior variance is 0 and both use the posterior
    variance of step 1 instead, the convention of the full chain's
    ``posterior_log_variance_clipped`` (Ho et al. 2020; Nichol & Dhariwal 2021).
    ``learned_range`` interpolates per element between ``log_beta`` (``log beta'_i``) and
    ``posterior_log_variance`` (the clipped ``log beta~'_i``), the tables of
    :func:`tfngd.gaussian_diffusion.respaced_log_variance_bounds`, as the reference's
    ``SpacedDiffusion`` does.
    """

    def __init__(self, diffusion, kept: np.ndarray):
        abar = diffusion.alphas_cumprod[kept]
        abar_prev = np.append(1.0, abar[:-1])
        c1, c2, _ = (
            value.numpy() for value in gd.posterior_coefficients(
                tf.constant(abar, tf.float64), tf.constant(abar_prev, tf.float64)))
        log_beta, posterior_log_variance = (
            value.numpy() for value in gd.respaced_log_variance_bounds(abar))
        if diffusion.variance_type == "fixed_large":
            reverse_log_variance = np.append(posterior_log_variance[0], log_beta[1:])
        else:  # fixed_small; learned_range interpolates per element (reverse_step)
            reverse_log_variance = posterior_log_variance
        self.abar = abar
        self.c1, self.c2 = c1, c2
        self.log_beta = log_beta
        self.posterior_log_variance = posterior_log_variance
        self.reverse_log_variance = reverse_log_variance

    @staticmethod
    def at(table: np.ndarray, index, like: tf.Tensor) -> tf.Tensor:
        return tf.cast(tf.gather(tf.constant(table, tf.float64), index), like.dtype)


def make_variational_bound(
    denoiser_fn,
    diffusion,
    timesteps=None,
    clip_x0: bool | None = None,
    discrete: bool | None = None,
):
    """A graph function ``bound(x0, seed) -> dict`` of the DDPM variational bound.

    The bound of Ho et al. (2020, eq. 5 and appendix A) as the reference code computes it
    (``calc_bpd_loop`` / ``_vb_terms_bpd`` / ``_prior_bpd`` of Nichol & Dhariwal 2021's
    improved-diffusion), per example, in bits per dimension (nats divided by ``D ln 2``)::

        bpd = L_prior + sum_{i >= 1} L_i + L_0
        L_prior = KL(q(x_{t_K-1} | x_0) || N(0, I))
        L_i     = KL(q(x_{t_i-1} | x_{t_i}, x_0) || p_theta(x_{t_i-1} | x_{t_i})),  i >= 1
        L_0     = -log p_theta(x_0 | x_{t_0})

    each ``L_i`` at one Monte-Carlo draw ``x_{t_i} ~ q(x_{t_i} | x_0)``, independent across
    steps. On the full chain (``timesteps=None``, ``t_i = i``) the posterior and the
    reverse process come from :meth:`GaussianDiffusion.q_posterior_mean_variance` and
    :meth:`GaussianDiffusion.p_mean_variance`; on a respaced chain they are the
    posteriors between consecutive kept steps
    (:func:`tfngd.gaussian_diffusion.posterior_coefficients`) with the reverse variance
    the respaced ancestral sampler uses (see :class:`_RespacedChain`); a
    ``learned_range`` model's variance interpolates between that chain's ``beta'`` and
    ``beta~'``. The respaced chain
    is itself a diffusion with the same marginals, so its bound is a valid (looser)
    bound on the same model's ``-log p(x_0)``.

    Decoder ``L_0``: for image data (``discrete=True``, values on the 256-level grid of
    ``[-1, 1]``) the discretised Gaussian of :func:`discretized_gaussian_log_likelihood`,
    so the bound is on a probability mass and is ``>= 0``. For continuous data
    (``discrete=False``, e.g. 2-D vectors) there is no quantisation: the Gaussian
    density ``N(x_0; mu, sigma^2)`` (:func:`gaussian_log_likelihood`), so the bound is on
    a density, may be negative, and is reported in nats per dimension as well as bits.

    Clipping: with ``clip_x0`` the predicted ``x_0`` is clipped to ``[-1, 1]`` before it
    forms the reverse mean, as the references do by default when evaluating (and as
    ``tfngd-sample`` does for images). It is a different reverse process, so the two
    conventions give different numbers: state which one you report.

    Args:
      denoiser_fn: ``fn(x_t, t) -> network output`` with ``t`` an int32 ``[B]`` tensor
        (:func:`tfngd.samplers.denoiser_fn` of a model's ``ema_denoiser``).
      diffusion: the model's :class:`~tfngd.gaussian_diffusion.GaussianDiffusion`.
      timesteps: None for the full chain of ``T`` steps, or the kept steps of a respaced
        chain: at least 2 increasing integers in ``[0, T - 1]`` (e.g.
        :func:`tfngd.schedules.respaced_timesteps`).
      clip_x0: clip the predicted ``x_0`` to ``[-1, 1]``; default: ``discrete``.
      discrete: use the 256-level decoder; default: True for ``[B, H, W, C]`` images,
        False for ``[B, D]`` vectors.

    Returns:
      ``bound(x0, seed)``: ``x0`` a float ``[B, ...]`` batch (the computation runs in its
      dtype), ``seed`` an integer or a pair of integers (the noise of kept step ``i`` is
      drawn with ``tf.random.experimental.stateless_fold_in(seed, i)``). It returns a dict
      of tensors: per example (``[B]``) ``bits_per_dim``, ``nats_per_dim``, ``prior_bpd``,
      ``decoder_bpd``, ``kl_bpd`` (the sum of the ``L_i``, ``i >= 1``); per kept step
      (``[K]``) ``timesteps`` and ``per_step_bpd``, the batch mean of ``L_0`` (index 0)
      and of each ``L_i``, so that ``sum(per_step_bpd) + mean(prior_bpd) =
      mean(bits_per_dim)``. Cost: ``K`` network evaluations per example.
    """
    if clip_x0 and discrete is not None and not discrete:
        raise ValueError("clip_x0=True clips x0 to [-1, 1], which only holds for image data; "
                         "pass clip_x0=False for continuous data")
    if timesteps is None:
        kept = np.arange(diffusion.num_timesteps, dtype=np.int32)
        chain = None
    else:
        kept = validate_timesteps(timesteps, diffusion.num_timesteps)
        chain = _RespacedChain(diffusion, kept)
    num_kept = len(kept)
    kept_tensor = tf.constant(kept, tf.int32)

    def reverse_step(x0, x_t, index, t, clip):
        """``(true mean, true log-var, model mean, model log-var)`` of kept step ``index``."""
        output = tf.cast(denoiser_fn(x_t, t), x0.dtype)
        if chain is None:
            true_mean, _, true_log_variance = diffusion.q_posterior_mean_variance(x0, x_t, t)
            model_mean, _, model_log_variance, _ = diffusion.p_mean_variance(
                output, x_t, t, clip_denoised=clip)
            return true_mean, true_log_variance, model_mean, model_log_variance
        prediction, var_values = diffusion.split_output(output)
        x0_hat, _ = gd.prediction_to_x0_eps(prediction, x_t, chain.at(chain.abar, index, x0),
                                            diffusion.prediction_type)
        if clip:
            x0_hat = tf.clip_by_value(x0_hat, -1.0, 1.0)
        c1, c2 = chain.at(chain.c1, index, x0), chain.at(chain.c2, index, x0)
        true_log_variance = chain.at(chain.posterior_log_variance, index, x0)
        if var_values is None:
            model_log_variance = chain.at(chain.reverse_log_variance, index, x0)
        else:
            model_log_variance = gd.learned_range_log_variance(
                var_values, chain.at(chain.log_beta, index, x0), true_log_variance)
        return (c1 * x0 + c2 * x_t, true_log_variance, c1 * x0_hat + c2 * x_t,
                model_log_variance)

    def noisy_sample(x0, seed, index):
        t = tf.fill([tf.shape(x0)[0]], kept_tensor[index])
        noise = tf.random.stateless_normal(
            tf.shape(x0), seed=tf.random.experimental.stateless_fold_in(seed, index),
            dtype=x0.dtype)
        return diffusion.q_sample(x0, t, noise), t

    @tf.function(reduce_retracing=True)
    def bound(x0, seed):
        x0 = tf.convert_to_tensor(x0)
        if not x0.dtype.is_floating:
            raise ValueError(f"x0 must be a float tensor, got dtype {x0.dtype.name}")
        if x0.shape.rank is None or x0.shape.rank < 2:
            raise ValueError(f"x0 must be a batch [B, ...] of examples, got shape {x0.shape}")
        is_discrete = x0.shape.rank == 4 if discrete is None else bool(discrete)
        clip = is_discrete if clip_x0 is None else bool(clip_x0)
        if clip and not is_discrete:
            raise ValueError("clip_x0=True clips x0 to [-1, 1], which only holds for image "
                             "data; pass clip_x0=False for continuous data")
        seed = _stateless_seed(seed)
        dims = tf.reduce_prod(tf.shape(x0)[1:])

        def bits(nats):
            return nats_to_bits_per_dim(nats, dims)

        # Prior: KL(q(x_T | x_0) || N(0, I)) at the last kept step.
        last = tf.fill([tf.shape(x0)[0]], kept_tensor[-1])
        prior_mean, _, prior_log_variance = diffusion.q_mean_variance(x0, last)
        zeros = tf.zeros_like(prior_mean)
        prior = sum_over_example(normal_kl(prior_mean, prior_log_variance, zeros, zeros))

        # Decoder: -log p(x_0 | x_{t_0}).
        x_t, t = noisy_sample(x0, seed, 0)
        _, _, decoder_mean, decoder_log_variance = reverse_step(x0, x_t, 0, t, clip)
        decoder_log_variance = decoder_log_variance + tf.zeros_like(decoder_mean)
        if is_discrete:
            log_likelihood = discretized_gaussian_log_likelihood(
                x0, decoder_mean, 0.5 * decoder_log_variance)
        else:
            log_likelihood = gaussian_log_likelihood(x0, decoder_mean, decoder_log_variance)
        decoder = -sum_over_example(log_likelihood)

        # KL terms of kept steps 1 .. K-1.
        def body(index, kl_total, per_step):
            x_t, t = noisy_sample(x0, seed, index)
            true_mean, true_log_variance, model_mean, model_log_variance = reverse_step(
                x0, x_t, index, t, clip)
            kl = sum_over_example(
                normal_kl(true_mean, true_log_variance, model_mean, model_log_variance))
            return index + 1, kl_total + kl, per_step.write(index, tf.reduce_mean(bits(kl)))

        per_step = tf.TensorArray(x0.dtype, size=num_kept).write(0, tf.reduce_mean(bits(decoder)))
        _, kl_total, per_step = tf.while_loop(
            lambda index, *_: index < num_kept, body,
            (tf.constant(1), tf.zeros_like(prior), per_step))

        total = prior + decoder + kl_total
        return {
            "bits_per_dim": bits(total),
            "nats_per_dim": total / tf.cast(dims, total.dtype),
            "prior_bpd": bits(prior),
            "decoder_bpd": bits(decoder),
            "kl_bpd": bits(kl_total),
            "per_step_bpd": per_step.stack(),
            "timesteps": kept_tensor,
        }

    return bound


def variational_bound(denoiser_fn, diffusion, x0, seed, timesteps=None,
                      clip_x0: bool | None = None, discrete: bool | None = None) -> dict:
    """The DDPM variational bound of the batch ``x0``: see :func:`make_variational_bound`.

    One call builds and traces a new graph; to evaluate many batches, build the function
    once with :func:`make_variational_bound` and call it per batch.
    """
    bound = make_variational_bound(denoiser_fn, diffusion, timesteps, clip_x0, discrete)
    return bound(x0, seed)


def example_batches(examples: np.ndarray, batch_size: int):
    """``(batch_index, batch)`` over ``examples`` in order, batches of ``batch_size`` (the
    last may be smaller): the batching of every likelihood evaluation, whose batch ``b`` is
    seeded with ``(seed, b)``."""
    for batch_index, start in enumerate(range(0, len(examples), batch_size)):
        yield batch_index, examples[start:start + batch_size]


def bound_in_batches(bound, examples: np.ndarray, batch_size: int, seed: int):
    """Evaluate ``bound`` (a :func:`make_variational_bound` function) on ``examples`` in
    batches of ``batch_size``: yields ``(batch_index, batch, outputs)`` in order.

    One graph serves every batch (the last may be smaller), and batch ``b`` draws its noise
    from the seed pair ``(seed, b)``, so every model scored with the same ``seed`` and
    ``batch_size`` sees the same draws.
    """
    concrete = bound.get_concrete_function(
        tf.TensorSpec([None, *examples.shape[1:]], tf.float32), tf.TensorSpec([2], tf.int64))
    for batch_index, batch in example_batches(examples, batch_size):
        yield batch_index, batch, concrete(tf.constant(batch, tf.float32),
                                           tf.constant([seed, batch_index], tf.int64))
