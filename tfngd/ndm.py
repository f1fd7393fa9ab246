"""Neural Diffusion Models: a learned forward transform ``F_phi`` (Bartosh, Vetrov & Naesseth 2023).

NDM (arXiv 2310.08337) transforms the data with a network ``F_phi(x, t)``
before the noise is injected, and trains that transform jointly with the
reverse model on the variational bound. This module is the discrete-time
version on the chain of a :class:`~tfngd.gaussian_diffusion.GaussianDiffusion`
(indices ``t = 0 .. T - 1``, ``alpha_t = sqrt(abar_t)``,
``sigma_t = sqrt(1 - abar_t)``; index ``-1`` stands for the data). Section 5
of the shared ``diffusion.md`` and ``docs/ndm.md`` have the background.

Forward process, defined through its marginals and posteriors (``s < t``)::

    q_phi(z_t | x)      = N(alpha_t F(x, t), sigma_t^2 I)
    q_phi(z_s | z_t, x) = N(mu_phi(x, z_t; s, t), st^2 I)
    mu_phi = alpha_s F(x, s) + sqrt(sigma_s^2 - st^2) (z_t - alpha_t F(x, t)) / sigma_t

with DDPM's posterior variance ``st^2 = sigma_{t|s}^2 sigma_s^2 / sigma_t^2``
(``beta~``), so that sampling ``z_t`` from its marginal and then ``z_s``
from the posterior gives ``z_s ~ N(alpha_s F(x, s), sigma_s^2 I)``. With
DDPM's posterior coefficients ``c1, c2`` of the pair ``(abar_t, abar_s)``
(:func:`~tfngd.gaussian_diffusion.posterior_coefficients`) one has
``sqrt(sigma_s^2 - st^2) / sigma_t = c2`` and ``alpha_s - c2 alpha_t = c1``, so::

    mu_phi = c1 F(x, s) + c2 z_t + c2 alpha_t (F(x, s) - F(x, t))

which is DDPM's ``c1 x + c2 z_t`` exactly when ``F(x, .) = x`` (the last
term is then exactly zero): the form used here.

Reverse process: ``p_theta(z_s | z_t) = q_phi(z_s | z_t, x_hat_theta(z_t, t))``
(the network predicts the data: its output is ``x_hat`` itself, "x0", or
``v`` with ``x_hat = alpha_t z_t - sigma_t v``, converted by
:func:`~tfngd.gaussian_diffusion.prediction_to_x0_eps`), with the variance
of :meth:`GaussianDiffusion.model_log_variance` (``beta~`` for
``"fixed_small"``, when the two variances are equal); ``p(z_{T-1}) = N(0, I)``.

Learned variances (``variance_type="learned_range"``, Nichol & Dhariwal 2021): the
reverse network outputs ``2C`` channels, the prediction and a value ``v`` per element
(:meth:`GaussianDiffusion.split_output`), and the reverse log-variance is
``lv_p = frac log beta_t + (1 - frac) log beta~_t``, ``frac = (v + 1) / 2``
(:func:`~tfngd.gaussian_diffusion.learned_range_log_variance`; ``v = -1`` is
``"fixed_small"`` exactly). NDM trains on the bound itself, so no hybrid loss is
needed: the KL term below simply uses the learned ``lv_p``, and so does the decoder
(its ``t = 0`` value, between ``log beta_0`` and ``log beta~_1``, as in the reference).
Sampling on a respaced chain interpolates between that chain's ``beta'`` and ``beta~'``
(:func:`~tfngd.gaussian_diffusion.respaced_log_variance_bounds`, as
:func:`tfngd.samplers.sample` does for DDPM).

Transform: ``F_phi(x, t) = x + c(t) NN_phi(x, t)`` with
``c(t) = (abar_0 - abar_t) / (abar_0 - abar_{T-1})``: 0 at ``t = 0`` (so
``F(x, 0) = x`` exactly and the decoder term does not involve ``phi``), 1 at
``t = T - 1``, growing with the injected noise variance. ``identity_transform``
forces ``c = 0``: the model is then DDPM with the same parameterisation, and
its bound is DDPM's bound, to the bit (tested).

Negative ELBO in nats per example (the decoder sees ``z_0 ~ N(alpha_0 x, sigma_0^2)``)::

    L = L_prior + sum_{t=1}^{T-1} L_t + L_rec
    L_prior = KL(q_phi(z_{T-1} | x) || N(0, I))
    L_t     = E_{z_t ~ q_phi(z_t|x)} KL(q_phi(z_{t-1} | z_t, x) || p_theta(z_{t-1} | z_t))
    L_rec   = -E log p_theta(x | z_0)

``L_t`` is Gaussian; for a fixed variance its variance part is parameter-free:
``L_t = const_t + ||mu_q - mu_p||^2 exp(-lv_p) / 2`` (with a learned variance,
``L_t = sum_d (lv_p - lv_q + exp(lv_q - lv_p) - 1) / 2 + ||mu_q - mu_p||^2 exp(-lv_p) / 2``).
The decoder ``p_theta(x | z_0)`` has mean ``x_hat_theta(z_0, 0)`` (the posterior to the
data) and DDPM's ``t = 0`` log-variance (learned with ``learned_range``); it is the
discretised Gaussian of
:func:`tfngd.likelihood.discretized_gaussian_log_likelihood` for images
(256 levels in [-1, 1]) and a Gaussian *density*
(:func:`tfngd.likelihood.gaussian_log_likelihood`) for continuous (vector)
data, so the 2-D bound is on a differential entropy (it can be negative).

Training (simulation-free): per example, ``t ~ U{1, ..., T - 1}`` (or the
loss-second-moment importance sampler, weight ``w_t``), ``eps ~ N(0, I)``,
``z_t = alpha_t F(x, t) + sigma_t eps`` in closed form; the estimate
``L_prior + (T - 1) w_t L_t + L_rec`` (one draw of ``z_0``) is unbiased for
``L``. The objective is its batch mean divided by the dimension ``D`` (nats
per dimension). The gradient reaches ``phi`` through ``z_t``, ``mu_q``,
``mu_p`` (``F`` evaluated at ``x`` and at ``x_hat``) and the prior.

Fisher for K-FAC (both networks registered): every term of the bound is a
squared residual plus a constant (use ``KFAC(approximation="per_example")``: see the
end of this paragraph), ``L = ||R||^2 + const`` with
``R = [sqrt((T - 1) w_t) r_t, r_rec, r_prior]``::

    r_t     = (mu_q - mu_p) sqrt(exp(-lv_p) / 2)
    r_rec   = (x - mu_dec) sqrt(exp(-lv_0) / 2)
    r_prior = alpha_{T-1} F(x, T - 1) / sqrt(2)

so the objective is ``mean_n s ||R_n||^2`` with ``s = 1 / D``: a Gaussian
likelihood in ``R`` with target 0, whose Fisher is the Gauss-Newton matrix of
the whole bound with respect to both networks (exact for continuous data).
For images the decoder is discretised and ``r_rec`` is its Gaussian
surrogate; coarsening an observation can only lower its Fisher information,
so the surrogate over-estimates that term's curvature (smaller steps, never
larger), while the gradient is the exact one. ``NN_phi`` is called on ``x``
(at ``t``, ``t - 1`` and ``T - 1``) and on ``x_hat`` (at ``t`` and ``t - 1``),
``x_hat_theta`` on ``z_t`` and ``z_0``: each network is called twice per step
(batched over its time points). ``R`` depends on ``phi`` through differences of
those evaluations (``F(x, t - 1) - F(x, t)``, ``F(x, s) - F(x_hat, s)``), so the
per-call gradients nearly cancel: K-FAC must build each layer's factors from the
per-example gradient summed over all its calls (``approximation="per_example"``,
:mod:`tfngd.optimizers.curvature_blocks`); expand, which adds the calls as independent
positions, overstated the transform's curvature by up to 5.9e4 on a U-Net and left it
untrained (docs/ndm.md section 6).

With a learned variance the KL and the decoder are no longer squared residuals in the
network output: per element, as functions of ``(mu_p, lv_p)``,
``KL = (lv_p - lv_q + exp(lv_q - lv_p) - 1) / 2 + (mu_q - mu_p)^2 exp(-lv_p) / 2``. The
Fisher of ``N(mu_p, exp(lv_p))`` in these coordinates is ``diag(exp(-lv_p), 1/2)``; it is
the KL's Hessian wherever ``p = q`` (there ``d^2 KL / d lv_p^2 = (exp(lv_q - lv_p) +
(mu_q - mu_p)^2 exp(-lv_p)) / 2 = 1/2``), and the expected Hessian of the decoder's NLL
``(lv + (x - mu)^2 exp(-lv)) / 2`` in ``lv`` is also ``1/2``. K-FAC gets this Fisher from
two more residual blocks, ``R = [.., sqrt((T - 1) w_t) r_t^var, r_rec^var]``::

    r_t^var   = lv_p / 2          (2 (d r^var / d lv)^2 = 1/2)
    r_rec^var = lv_0 / 2

with ``lv`` held constant (stop-gradient) inside ``r_t`` and ``r_rec``, which removes
a mean / log-variance cross term the Fisher does not have. Autodiff pulls ``1/2``
back through the learned-range map (``d lv / d v = (log beta_t - log beta~_t) / 2``)
and the network, so the variance channels' weights get the curvature
``(1/2) (d lv / d v)^2`` per element, with the same ``1 / D`` and ``(T - 1) w_t``
weights as their terms. ``||R||^2`` is then no longer the bound plus a constant (only
``R``'s Jacobian enters K-FAC's Gaussian probes; the gradient is always the bound's
own); the exact Hessian in ``v`` exceeds this Gauss-Newton by the residual-squared
terms ``(r_t^2 + ...) (d lv / d v)^2``, which vanish at the optimum (tested).
"""

from __future__ import annotations

import math
import typing
import warnings

import keras
import numpy as np
import tensorflow as tf

from tfngd import data as data_lib
from tfngd import distribute, nonfinite, samplers, schedules
from tfngd.gaussian_diffusion import (
    GaussianDiffusion,
    learned_range_log_variance,
    posterior_coefficients,
    prediction_to_x0_eps,
    respaced_log_variance_bounds,
)
from tfngd.likelihood import (
    discretized_gaussian_log_likelihood,
    gaussian_log_likelihood,
    nats_to_bits_per_dim,
    normal_kl,
    sum_over_example,
)
from tfngd.metrics import mean_confidence_interval
from tfngd.model import PrebuiltModel, _check_output_channels, ema_decay_at
from tfngd.optimizers.training import ForwardPass, gradients_and_curvature, kfac_of
from tfngd.timestep_sampling import make_timestep_sampler

# Indices of the stateless random streams drawn at each step.
_STREAM_T, _STREAM_NOISE, _STREAM_DECODER_NOISE = 0, 1, 2
#: How the reverse network's output gives ``x_hat``: itself ("x0"), or
#: ``alpha_t z_t - sigma_t v`` ("v", well conditioned at both ends of the chain).
REVERSE_PARAMETERISATIONS = ("x0", "v")


def ndm_posterior_mean(transform_s, transform_t, z_t, c1, c2, sqrt_abar_t):
    """``mu = c1 F(x, s) + c2 z_t + c2 alpha_t (F(x, s) - F(x, t))`` (the module docstring).

    Equal to ``alpha_s F(x, s) + sqrt(sigma_s^2 - st^2) (z_t - alpha_t F(x, t)) / sigma_t``
    for DDPM's coefficients ``c1, c2`` of the pair ``(s, t)``, and to DDPM's
    posterior mean ``c1 x + c2 z_t`` when both transforms are ``x``.
    """
    return c1 * transform_s + c2 * z_t + (c2 * sqrt_abar_t) * (transform_s - transform_t)


def summarize_bound(per_example_nats, dims: int, level: float = 0.95) -> dict:
    """Mean and ``level`` interval of per-example bounds (nats) in bits/dim and nats/dim.

    ``{"bits_per_dim": (mean, low, high), "nats_per_dim": (...), "num_examples"}``; the
    interval is :func:`tfngd.metrics.mean_confidence_interval` over examples.
    """
    nats = np.asarray(per_example_nats, np.float64)
    bits = nats_to_bits_per_dim(tf.constant(nats), dims).numpy()
    return {
        "bits_per_dim": mean_confidence_interval(bits, level),
        "nats_per_dim": mean_confidence_interval(nats / dims, level),
        "num_examples": int(nats.size),
    }


class BoundTerms(typing.NamedTuple):
    """One Monte-Carlo estimate of the negative ELBO, per example, in nats.

    ``diffusion`` is the unbiased estimate ``(T - 1) w_t L_t`` of the sum of
    the ``T - 1`` KL terms; ``timestep_kl`` the single term ``L_t`` at the
    drawn ``t``; ``residuals`` the ``[N, 3 D]`` vector ``R`` with
    ``||R||^2 = total + const`` (the Gauss-Newton outputs of K-FAC); ``[N, 5 D]``
    with a learned variance, whose last two blocks carry the variance's Fisher
    (module docstring; ``||R||^2`` is then not the bound).
    """

    prior: tf.Tensor
    diffusion: tf.Tensor
    reconstruction: tf.Tensor
    timestep_kl: tf.Tensor
    residuals: tf.Tensor

    @property
    def total(self) -> tf.Tensor:
        return self.prior + self.diffusion + self.reconstruction


def _fisher_residuals(difference, log_variance, learned: bool):
    """``(r, r^var)`` of one Gaussian term with mean error ``difference`` (module docstring).

    ``r = difference sqrt(exp(-lv) / 2)`` with ``lv`` held constant (stop-gradient: the
    Fisher has no mean / log-variance cross term), and, for a learned variance,
    ``r^var = lv / 2`` (``2 (d r^var / d lv)^2 = 1/2``, the Fisher in ``lv``); None otherwise.
    """
    residual = difference * tf.sqrt(0.5 * tf.exp(-tf.stop_gradient(log_variance)))
    return residual, (0.5 * log_variance if learned else None)


def _check_network(network, name: str, diffusion: GaussianDiffusion | None = None) -> tuple:
    """The example shape of ``network``'s ``x`` input, after checking its inputs and output.

    With ``diffusion`` given and learning the variance (the reverse network of a
    ``learned_range`` model), the output must have ``diffusion.output_channels(C)`` = 2C
    channels on its last axis (:func:`tfngd.model._check_output_channels`, the check of
    :class:`~tfngd.model.DiffusionModel`); otherwise it is shaped like ``x``.
    """
    if not isinstance(network, keras.Model):
        raise ValueError(f"{name} must be a keras.Model [x, t] -> output shaped like x, "
                         f"got {type(network).__name__}")
    if len(network.inputs) != 2:
        raise ValueError(f"{name} must take exactly two inputs [x, t] (class conditioning is not "
                         f"supported by NDM), got {len(network.inputs)}: "
                         f"{[i.name for i in network.inputs]}")
    shape = tuple(network.inputs[0].shape[1:])
    expected = shape
    if diffusion is not None and diffusion.learns_variance:
        try:
            _check_output_channels(network, diffusion)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
        expected = shape[:-1] + (diffusion.output_channels(shape[-1]),)
    if tuple(network.outputs[0].shape[1:]) != expected:
        raise ValueError(f"{name} must output a tensor shaped like its input x {list(shape)}"
                         + ("" if expected == shape else
                            f" with {expected[-1]} channels (prediction, then variance values)")
                         + f", got {list(network.outputs[0].shape[1:])}")
    if len(shape) not in (1, 3):
        raise ValueError(f"{name}: examples must be vectors (D,) or images (H, W, C), "
                         f"got shape {list(shape)}")
    return shape


class NeuralDiffusionModel(PrebuiltModel):
    """A Neural Diffusion Model: learned transform ``F_phi`` and data-predicting reverse model.

    ``compile`` / ``fit`` / ``evaluate`` work as for any Keras model; with a
    :class:`~tfngd.optimizers.KFAC` optimizer both networks get curvature
    blocks and the Fisher is the Gauss-Newton matrix of the bound (module
    docstring). Batches are ``x``, a tuple ``(x,)`` or a dict with ``"x0"``
    (and, for ``evaluate``, optionally fixed ``"t"`` in ``[1, T - 1]``,
    ``"noise"`` and ``"decoder_noise"``).

    Args:
      transform_network: ``NN_phi``, a Keras model ``[x, t] -> output shaped
        like x`` (e.g. :func:`tfngd.networks.build_mlp_denoiser` for vectors,
        :func:`tfngd.networks.build_unet` for images); ``F = x + c(t) NN``.
      reverse_network: ``x_hat_theta``, the same kind of model (predicts the data);
        with ``variance_type="learned_range"`` it outputs ``2C`` channels on its last
        axis (``diffusion.output_channels(C)``: the prediction, then the variance
        values; checked at construction), the transform network ``C``.
      diffusion: the chain; ``prediction_type`` ``"x0"`` or ``"v"`` (how the
        reverse network's output gives ``x_hat``), no Min-SNR weighting
        (the objective is the bound) and any ``variance_type`` (``"learned_range"``:
        learned reverse and decoder variances, trained on the bound).
      identity_transform: force ``c(t) = 0`` (``F(x, t) = x``: DDPM). The
        transform network is then frozen (``trainable = False``) and never
        trained.
      timestep_sampler: ``"uniform"`` or ``"loss_second_moment"`` over
        ``t = 1 .. T - 1`` (importance weights keep the bound unbiased).
      ema_decay, ema_warmup: exponential moving average of both networks'
        weights (as :class:`tfngd.model.DiffusionModel`; 0 disables it).
      evaluate_with_ema: ``evaluate`` scores the EMA weights.
      seed: base seed of the stateless random streams (draws at step ``k``
        are a function of ``(seed, k)``).
    """

    def __init__(
        self,
        transform_network: keras.Model,
        reverse_network: keras.Model,
        diffusion: GaussianDiffusion,
        identity_transform: bool = False,
        timestep_sampler: str = "uniform",
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
        evaluate_with_ema: bool = True,
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(diffusion, GaussianDiffusion):
            raise ValueError("diffusion must be a GaussianDiffusion, got "
                             f"{type(diffusion).__name__}")
        if diffusion.prediction_type not in REVERSE_PARAMETERISATIONS:
            raise ValueError(
                "NDM's reverse model predicts the data x_hat(z_t, t): diffusion.prediction_type "
                f"must be one of {REVERSE_PARAMETERISATIONS}, got {diffusion.prediction_type!r} "
                "(eps gives x_hat = (z_t - sigma_t eps) / alpha_t, which blows up where alpha_t "
                "is small and is then fed to F_phi)")
        if diffusion.min_snr_gamma is not None:
            raise ValueError("NDM trains on the variational bound: diffusion.min_snr_gamma must be "
                             f"None, got {diffusion.min_snr_gamma}")
        if diffusion.num_timesteps < 2:
            raise ValueError("NDM needs a chain of at least 2 steps, got "
                             f"{diffusion.num_timesteps}")
        if transform_network is reverse_network:
            raise ValueError("transform_network and reverse_network must be two different models")
        transform_shape = _check_network(transform_network, "transform_network")
        reverse_shape = _check_network(reverse_network, "reverse_network", diffusion)
        if transform_shape != reverse_shape:
            raise ValueError(f"transform_network takes examples of shape {list(transform_shape)}, "
                             f"reverse_network {list(reverse_shape)}: they must agree")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.diffusion = diffusion
        self.identity_transform = bool(identity_transform)
        if self.identity_transform:
            transform_network.trainable = False
        self.transform_network = transform_network
        self.reverse_network = reverse_network
        self.ema_transform_network = self._ema_copy(transform_network)
        self.ema_reverse_network = self._ema_copy(reverse_network)
        # t = 1 .. T - 1 is drawn as 1 + a draw over T - 1 values.
        self.timestep_sampler = make_timestep_sampler(timestep_sampler,
                                                      diffusion.num_timesteps - 1)
        self.timestep_sampler_name = timestep_sampler
        self.ema_decay = float(ema_decay)
        self.ema_warmup = bool(ema_warmup)
        self.evaluate_with_ema = bool(evaluate_with_ema)
        self.seed = int(seed)
        self._replica_jit_compile = False  # set by compile (tfngd.distribute.split_jit_compile)

        abar = diffusion.alphas_cumprod
        if self.identity_transform:
            self.transform_scale_table = np.zeros_like(abar)
        else:
            self.transform_scale_table = (abar[0] - abar) / (abar[0] - abar[-1])
        # abar at indices -1 .. T - 1 (the data, index -1, has abar = 1).
        self._abar_from_data = np.append(1.0, abar)

        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.prior_tracker = keras.metrics.Mean(name="prior")
        self.diffusion_tracker = keras.metrics.Mean(name="diffusion")
        self.reconstruction_tracker = keras.metrics.Mean(name="reconstruction")
        self.grad_norm_tracker = keras.metrics.Mean(name="grad_norm")
        self._sample_functions = {}
        self._bound_functions = {}
        self.built = True

    @staticmethod
    def _ema_copy(network):
        copy = keras.models.clone_model(network)
        copy.set_weights(network.get_weights())
        copy.trainable = False
        return copy

    # -- Keras plumbing ----------------------------------------------------
    @property
    def data_shape(self) -> tuple:
        return tuple(self.reverse_network.inputs[0].shape[1:])

    @property
    def data_dims(self) -> int:
        return int(np.prod(self.data_shape))

    @property
    def is_image_model(self) -> bool:
        """Images are discretised data in [-1, 1]; vectors are continuous and unbounded."""
        return len(self.data_shape) == 3

    @property
    def trained_networks(self) -> list:
        """The networks the optimizer trains (and K-FAC preconditions)."""
        if self.identity_transform:
            return [self.reverse_network]
        return [self.transform_network, self.reverse_network]

    def call(self, inputs, training=False):
        """``x_hat_theta(z_t, t)`` for ``inputs = [z_t, t]``."""
        z_t, t = inputs
        return self._predict_data(self.reverse_network, tf.cast(z_t, tf.float32),
                                  tf.cast(t, tf.int32), training)[0]

    def compile(self, *args, jit_compile="auto", **kwargs):
        """Keras ``compile``; a K-FAC optimizer gets both networks' layers registered. On several
        replicas ``jit_compile=True`` compiles each replica's step with XLA
        (:func:`tfngd.distribute.split_jit_compile`)."""
        jit_compile, self._replica_jit_compile = distribute.split_jit_compile(jit_compile)
        super().compile(*args, jit_compile=jit_compile, **kwargs)
        kfac = kfac_of(self.optimizer)
        if kfac is not None and not self.identity_transform and kfac.approximation != "per_example":
            warnings.warn(
                f"KFAC(approximation={kfac.approximation!r}) misjudges the transform's curvature: "
                "the bound depends on differences of its evaluations (F(x, t - 1) - F(x, t), "
                "F(x, s) - F(x_hat, s)), whose gradients nearly cancel, and expand / reduce "
                "factor the calls as if independent / as if they saw the same input (off by up "
                "to 1e5 along the gradient). Use approximation='per_example' (docs/kfac.md).",
                stacklevel=2)
        if kfac is not None and not kfac.is_registered:
            kfac.register(self.trained_networks)
            # Registered with a list, K-FAC cannot find the variables itself: build it here.
            self.optimizer.build(self._trained_variables())

    def _trained_variables(self) -> list:
        return [v for network in self.trained_networks for v in network.trainable_variables]

    @property
    def metrics(self):
        return [self.loss_tracker, self.prior_tracker, self.diffusion_tracker,
                self.reconstruction_tracker, self.grad_norm_tracker]

    def _networks(self, use_ema: bool):
        """``(NN_phi or None for the identity transform, x_hat_theta)``."""
        if use_ema:
            transform, reverse = self.ema_transform_network, self.ema_reverse_network
        else:
            transform, reverse = self.transform_network, self.reverse_network
        return (None if self.identity_transform else transform), reverse

    def _step_seed(self, stream: int):
        step = tf.cast(self.optimizer.iterations, tf.int64)
        return tf.stack([tf.constant(self.seed, tf.int64) * 1000003 + stream, step])

    def _unpack(self, data):
        """Returns ``(x, t, noise, decoder_noise)``; the last three may be None."""
        if isinstance(data, dict):
            if "x0" not in data:
                raise ValueError(f"a dict batch needs the key 'x0', got keys {sorted(data)}")
            x = data["x0"]
            t, noise, decoder_noise = data.get("t"), data.get("noise"), data.get("decoder_noise")
        elif isinstance(data, (tuple, list)) and len(data) == 1:
            x, t, noise, decoder_noise = data[0], None, None, None
        else:
            x, t, noise, decoder_noise = data, None, None, None
        if isinstance(x, (tuple, list, dict)):
            raise ValueError("NDM batches are x, (x,) or {'x0': x}: labels, targets and "
                             f"multiple inputs are not supported, got a {type(x).__name__} "
                             f"of {len(x)}")
        x = tf.cast(x, tf.float32)
        if tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(f"examples have shape {list(x.shape[1:])}, the model's networks take "
                             f"{list(self.data_shape)}")
        return x, t, noise, decoder_noise

    # -- the transform and the posterior -------------------------------------
    def transform_scale(self, t, like: tf.Tensor) -> tf.Tensor:
        """``c(t)`` (0 at ``t = 0``), shaped to broadcast with ``like``."""
        return self.diffusion.gather(self.transform_scale_table, t, like)

    def _transform(self, network, x, t, training=False):
        """``x + c(t) network([x, t])``; ``x`` itself for the identity transform (None)."""
        if network is None:
            return x
        t = tf.cast(t, tf.int32)
        return x + self.transform_scale(t, x) * network([x, t], training=training)

    def transform(self, x, t, use_ema: bool = False) -> tf.Tensor:
        """``F_phi(x, t) = x + c(t) NN_phi(x, t)`` for a batch ``x`` and integer ``t`` ([N])."""
        x = tf.convert_to_tensor(x, tf.float32)
        t = tf.convert_to_tensor(t, tf.int32)
        if t.shape.rank == 0:
            t = tf.fill(tf.shape(x)[:1], t)
        self._check_timesteps(t, allow_data=False)
        return self._transform(self._networks(use_ema)[0], x, t)

    def _check_timesteps(self, t, allow_data: bool) -> None:
        if tf.executing_eagerly():
            low = -1 if allow_data else 0
            values = np.asarray(t)
            if values.size and (values.min() < low or values.max() >= self.diffusion.num_timesteps):
                raise ValueError(f"timesteps must be integers in [{low}, "
                                 f"{self.diffusion.num_timesteps - 1}], got values in "
                                 f"[{values.min()}, {values.max()}]")

    def _pair_coefficients(self, t, s, like):
        """``c1, c2, var`` of the pair ``(s, t)`` (``s = -1``: the data) and ``alpha_t``."""
        table = tf.constant(self._abar_from_data, tf.float64)
        abar_t = tf.gather(table, tf.cast(t, tf.int32) + 1)
        abar_s = tf.gather(table, tf.cast(s, tf.int32) + 1)
        c1, c2, variance = posterior_coefficients(abar_t, abar_s)
        rank = len(like.shape)

        def shaped(values):
            return tf.reshape(tf.cast(values, like.dtype),
                              tf.concat([tf.shape(values), tf.ones([rank - 1], tf.int32)], 0))

        return shaped(c1), shaped(c2), shaped(variance), shaped(tf.sqrt(abar_t))

    def _predict_data(self, reverse, z_t, t, training=False):
        """``(x_hat_theta(z_t, t), var_values)`` from the reverse network's output.

        The output is split by :meth:`GaussianDiffusion.split_output` (``var_values`` is
        None for a fixed variance) and its prediction converted by
        :func:`tfngd.gaussian_diffusion.prediction_to_x0_eps`.
        """
        output = reverse([z_t, t], training=training)
        prediction, var_values = self.diffusion.split_output(output)
        x_hat = prediction_to_x0_eps(prediction, z_t, self.diffusion.abar(t, z_t),
                                     self.diffusion.prediction_type)[0]
        return x_hat, var_values

    def _transforms(self, network, x, times, training=False) -> list:
        """``[F(x, t) for t in times]`` from one batched call of the network (fewer, larger
        ops; the K-FAC statistics are the same as from separate calls)."""
        if network is None:
            return [x for _ in times]
        stacked = self._transform(network, tf.concat([x] * len(times), axis=0),
                                  tf.concat([tf.cast(t, tf.int32) for t in times], axis=0),
                                  training)
        return tf.split(stacked, len(times), axis=0)

    def _posterior_mean_from(self, transform_s, transform_t, z_t, t, s):
        """Mean and variance of ``q_phi(z_s | z_t, x)`` from ``F(x, s)`` and ``F(x, t)``."""
        c1, c2, variance, sqrt_abar_t = self._pair_coefficients(t, s, z_t)
        return ndm_posterior_mean(transform_s, transform_t, z_t, c1, c2, sqrt_abar_t), variance

    def _posterior_mean(self, network, x, z_t, t, s, training=False):
        """Mean and variance of ``q_phi(z_s | z_t, x)`` (``s = -1``: the data)."""
        # F(x, s) at s = -1 (the data) is x = F(x, 0), since c(0) = 0.
        transform_s, transform_t = self._transforms(network, x, [tf.maximum(s, 0), t], training)
        return self._posterior_mean_from(transform_s, transform_t, z_t, t, s)

    def posterior_mean_variance(self, x, z_t, t, s, use_ema: bool = False):
        """Mean and variance of ``q_phi(z_s | z_t, x)`` for any ``-1 <= s < t`` (``s = -1``: data).

        ``t`` and ``s`` are int arrays of shape ``[N]`` (or scalars). The
        reverse process is this posterior with ``x`` replaced by ``x_hat``.
        """
        x = tf.convert_to_tensor(x, tf.float32)
        z_t = tf.convert_to_tensor(z_t, tf.float32)
        n = tf.shape(x)[:1]
        t = tf.convert_to_tensor(t, tf.int32)
        s = tf.convert_to_tensor(s, tf.int32)
        t = tf.fill(n, t) if t.shape.rank == 0 else t
        s = tf.fill(n, s) if s.shape.rank == 0 else s
        self._check_timesteps(t, allow_data=False)
        self._check_timesteps(s, allow_data=True)
        if tf.executing_eagerly() and np.any(np.asarray(s) >= np.asarray(t)):
            raise ValueError("posterior_mean_variance needs s < t for every example")
        return self._posterior_mean(self._networks(use_ema)[0], x, z_t, t, s)

    # -- the bound -----------------------------------------------------------
    def _diffusion_kl(self, transform, reverse, x, t, noise, transforms_of_x=None,
                      training=False):
        """``L_t`` per example, its residual ``r_t`` and ``r_t^var`` (module docstring; None
        for a fixed variance), at ``s = t - 1``.

        ``transforms_of_x``: ``(F(x, t), F(x, t - 1))`` when already computed.
        """
        s = t - 1
        if transforms_of_x is None:
            transforms_of_x = self._transforms(transform, x, [t, s], training)
        transform_t, transform_s = transforms_of_x
        z_t = self.diffusion.q_sample(transform_t, t, noise)
        x_hat, var_values = self._predict_data(reverse, z_t, t, training)
        hat_t, hat_s = self._transforms(transform, x_hat, [t, s], training)
        mean_q, _ = self._posterior_mean_from(transform_s, transform_t, z_t, t, s)
        mean_p, _ = self._posterior_mean_from(hat_s, hat_t, z_t, t, s)
        log_variance_q = self.diffusion.gather(self.diffusion.posterior_log_variance_clipped, t,
                                               z_t)
        log_variance_p = self.diffusion.model_log_variance(t, z_t, var_values)
        kl = sum_over_example(normal_kl(mean_q, log_variance_q, mean_p, log_variance_p))
        residual, variance_residual = _fisher_residuals(mean_q - mean_p, log_variance_p,
                                                        var_values is not None)
        return kl, residual, variance_residual

    def _reconstruction(self, reverse, x, decoder_noise, training=False):
        """``-log p(x | z_0)`` per example, its (surrogate) residual ``r_rec`` and
        ``r_rec^var`` (None for a fixed variance).

        The decoder's log-variance is ``model_log_variance`` at ``t = 0``: with
        ``learned_range`` the network's value (between ``log beta_0`` and ``log beta~_1``),
        as in the reference (improved-diffusion's ``_vb_terms_bpd``) and
        :func:`tfngd.likelihood.timestep_vlb_bits`.
        """
        t0 = tf.zeros(tf.shape(x)[:1], tf.int32)
        z_0 = self.diffusion.q_sample(x, t0, decoder_noise)  # F(x, 0) = x: no transform call
        x_hat, var_values = self._predict_data(reverse, z_0, t0, training)
        # The posterior to the data with x_hat for x: c1 x_hat + c2 z_0 (c1 = 1, c2 = 0 up to
        # rounding), DDPM's decoder mean.
        mean, _ = self._posterior_mean_from(x_hat, x_hat, z_0, t0, t0 - 1)
        log_variance = self.diffusion.model_log_variance(t0, x, var_values)
        if self.is_image_model:
            log_likelihood = discretized_gaussian_log_likelihood(x, mean, 0.5 * log_variance)
        else:
            log_likelihood = gaussian_log_likelihood(x, mean, log_variance)
        residual, variance_residual = _fisher_residuals(x - mean, log_variance,
                                                        var_values is not None)
        return -sum_over_example(log_likelihood), residual, variance_residual

    def _prior(self, transform_last):
        """``KL(q_phi(z_{T-1} | x) || N(0, I))`` per example and its residual ``r_prior``,
        from ``F(x, T - 1)``."""
        last = tf.fill(tf.shape(transform_last)[:1], self.diffusion.num_timesteps - 1)
        mean, _, log_variance = self.diffusion.q_mean_variance(transform_last, last)
        kl = sum_over_example(normal_kl(mean, log_variance, 0.0, 0.0))
        return kl, mean * math.sqrt(0.5)

    def _last(self, x):
        return tf.fill(tf.shape(x)[:1], self.diffusion.num_timesteps - 1)

    def bound_terms(self, x, t, noise, decoder_noise, importance_weights=None,
                    use_ema: bool = False, training: bool = False) -> BoundTerms:
        """The single-``t`` estimate of the negative ELBO for given draws (per example, nats).

        Args:
          x: data ``[N, ...]``.
          t: int ``[N]`` in ``[1, T - 1]``: the KL term each example estimates.
          noise: ``eps`` of ``z_t = alpha_t F(x, t) + sigma_t eps``, shaped like ``x``.
          decoder_noise: ``eps`` of ``z_0 = alpha_0 x + sigma_0 eps``, shaped like ``x``.
          importance_weights: ``w_t`` of the timestep sampler (``[N]``), or None for 1.
          use_ema: score the EMA networks.
          training: the networks' training flag.
        """
        x = tf.convert_to_tensor(x, tf.float32)
        t = tf.cast(t, tf.int32)
        if tf.executing_eagerly():
            values = np.asarray(t)
            if values.min() < 1 or values.max() >= self.diffusion.num_timesteps:
                raise ValueError(f"t must be in [1, {self.diffusion.num_timesteps - 1}] (t = 0 is "
                                 f"the decoder term), got values in [{values.min()}, "
                                 f"{values.max()}]")
        transform, reverse = self._networks(use_ema)
        transform_t, transform_s, transform_last = self._transforms(
            transform, x, [t, t - 1, self._last(x)], training)
        kl, diffusion_residual, diffusion_variance_residual = self._diffusion_kl(
            transform, reverse, x, t, tf.cast(noise, tf.float32), (transform_t, transform_s),
            training)
        reconstruction, reconstruction_residual, reconstruction_variance_residual = (
            self._reconstruction(reverse, x, tf.cast(decoder_noise, tf.float32), training))
        prior, prior_residual = self._prior(transform_last)
        weights = (tf.ones_like(kl) if importance_weights is None
                   else tf.cast(importance_weights, kl.dtype))
        terms = self.diffusion.num_timesteps - 1
        scale = tf.sqrt(terms * weights)
        rows = tf.shape(x)[0]
        blocks = [
            tf.reshape(diffusion_residual, [rows, -1]) * scale[:, None],
            tf.reshape(reconstruction_residual, [rows, -1]),
            tf.reshape(prior_residual, [rows, -1]),
        ]
        if diffusion_variance_residual is not None:  # learned_range: the variance's Fisher
            blocks += [tf.reshape(diffusion_variance_residual, [rows, -1]) * scale[:, None],
                       tf.reshape(reconstruction_variance_residual, [rows, -1])]
        residuals = tf.concat(blocks, axis=1)
        return BoundTerms(prior=prior, diffusion=terms * weights * kl,
                          reconstruction=reconstruction, timestep_kl=kl, residuals=residuals)

    def training_objective(self, x, t, noise, decoder_noise, importance_weights,
                           use_ema: bool = False, training: bool = True) -> ForwardPass:
        """``mean_n L_n / D`` as a :class:`ForwardPass` for K-FAC.

        ``outputs`` is the residual ``R`` (Gaussian likelihood with target 0)
        and ``per_example_scale`` is ``1 / D``, so that the objective is
        ``mean_n s ||R_n||^2`` plus a constant; ``extras["terms"]`` is the
        :class:`BoundTerms`.
        """
        terms = self.bound_terms(x, t, noise, decoder_noise, importance_weights, use_ema,
                                 training)
        dims = float(self.data_dims)
        objective = tf.reduce_mean(terms.total) / dims
        return ForwardPass(objective, terms.residuals, "gaussian", per_example_scale=1.0 / dims,
                           extras={"terms": terms})

    # -- train / test steps --------------------------------------------------
    def _update_term_metrics(self, objective, terms: BoundTerms, batch, finite=None):
        """The bound and its terms per dimension; a skipped (not ``finite``) training step
        is left out."""
        dims = float(self.data_dims)
        weight = tf.cast(batch, tf.float32)
        if finite is not None:
            weight *= tf.cast(finite, tf.float32)
        pairs = ((self.loss_tracker, objective),
                 (self.prior_tracker, tf.reduce_mean(terms.prior) / dims),
                 (self.diffusion_tracker, tf.reduce_mean(terms.diffusion) / dims),
                 (self.reconstruction_tracker, tf.reduce_mean(terms.reconstruction) / dims))
        for tracker, value in pairs:
            tracker.update_state(nonfinite.zero_unless(value, finite), sample_weight=weight)

    def train_step(self, data):
        x, _, _, _ = self._unpack(data)
        batch = tf.shape(x)[0]

        def draws(rows):  # for the whole global batch (tfngd.distribute)
            step, weights = self.timestep_sampler.sample(rows, self._step_seed(_STREAM_T))
            shape = tf.concat([[rows], tf.shape(x)[1:]], 0)
            return (step, weights,
                    tf.random.stateless_normal(shape, seed=self._step_seed(_STREAM_NOISE)),
                    tf.random.stateless_normal(shape,
                                               seed=self._step_seed(_STREAM_DECODER_NOISE)))

        step, importance_weights, noise, decoder_noise = distribute.rows_of_global_batch(
            draws, batch)
        t = step + 1
        variables = self._trained_variables()
        gradients, result = gradients_and_curvature(
            self.optimizer, variables, jit_compile=self._replica_jit_compile,
            forward=lambda: self.training_objective(x, t, noise, decoder_noise,
                                                    importance_weights))
        gradients, finite = distribute.apply_gradients_if_finite(self.optimizer, gradients,
                                                                 variables, result.loss)
        terms = result.extras["terms"]
        self._finish_step(finite, *distribute.all_gather_rows((step, terms.timestep_kl)))
        self._update_term_metrics(result.loss, terms, batch, finite)
        return self._train_logs(gradients, finite)

    def _after_update(self, step, timestep_kl):
        """The state updated once per step from the global batch: EMA, timestep sampler."""
        self.update_ema()
        self.timestep_sampler.update(step, timestep_kl)
        return tf.constant(True)

    def test_step(self, data):
        x, t, noise, decoder_noise = self._unpack(data)
        batch = tf.shape(x)[0]
        if t is None:
            t = tf.random.stateless_uniform([batch], seed=self._step_seed(_STREAM_T), minval=1,
                                            maxval=self.diffusion.num_timesteps, dtype=tf.int32)
        if noise is None:
            noise = tf.random.stateless_normal(tf.shape(x), seed=self._step_seed(_STREAM_NOISE))
        if decoder_noise is None:
            decoder_noise = tf.random.stateless_normal(
                tf.shape(x), seed=self._step_seed(_STREAM_DECODER_NOISE))
        result = self.training_objective(x, t, noise, decoder_noise, None,
                                         use_ema=self.evaluate_with_ema, training=False)
        self._update_term_metrics(result.loss, result.extras["terms"], batch)
        return distribute.step_logs(self.metrics[:-1])

    # -- EMA -----------------------------------------------------------------
    def update_ema(self):
        """``ema <- d * ema + (1 - d) * w`` for every weight of both networks."""
        decay = ema_decay_at(self.optimizer.iterations - 1, self.ema_decay, self.ema_warmup)
        pairs = ((self.ema_transform_network, self.transform_network),
                 (self.ema_reverse_network, self.reverse_network))
        for ema_network, network in pairs:
            for ema_var, var in zip(ema_network.weights, network.weights, strict=True):
                d = tf.cast(decay, ema_var.dtype)
                ema_var.assign(d * ema_var + (1.0 - d) * tf.cast(var, ema_var.dtype))

    # -- likelihood ------------------------------------------------------------
    def _validated_data(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32) if not tf.is_tensor(x) else x.numpy()
        data_lib.validate_examples(x, self.data_shape, name="x")
        return np.asarray(x, np.float32)

    def _bound_functions_for(self, use_ema: bool):
        if use_ema not in self._bound_functions:
            transform, reverse = self._networks(use_ema)

            @tf.function(reduce_retracing=True)
            def kl_term(x, t, noise):
                return self._diffusion_kl(transform, reverse, x, t, noise)[0]

            @tf.function(reduce_retracing=True)
            def endpoint_terms(x, decoder_noise):
                transform_last = self._transforms(transform, x, [self._last(x)])[0]
                return (self._prior(transform_last)[0]
                        + self._reconstruction(reverse, x, decoder_noise)[0])

            self._bound_functions[use_ema] = (kl_term, endpoint_terms)
        return self._bound_functions[use_ema]

    @staticmethod
    def evaluation_batch_seed(seed: int, batch_index: int) -> tf.Tensor:
        """The ``[2]`` stateless seed of evaluation batch ``batch_index``:
        ``fold_in([seed, 0], batch_index)``."""
        return tf.random.experimental.stateless_fold_in(
            tf.constant([int(seed), 0], tf.int64), int(batch_index))

    def per_example_bound(self, x, seed: int = 0, timestep_samples: int | None = None,
                          batch_size: int = 1024, use_ema: bool | None = None) -> np.ndarray:
        """The negative ELBO of each example in nats (float64 ``[N]``).

        The ``T - 1`` KL terms are estimated by stratified sampling:
        ``{1, ..., T - 1}`` is cut into ``K = timestep_samples`` contiguous
        strata of sizes ``n_k``, one ``t_k`` is drawn uniformly in each, and
        ``sum_k n_k L_{t_k}`` is unbiased for the sum (``K = T - 1``, the
        default None, is the exact sum over ``t``); each term, the prior and
        the decoder take one draw of the noise.

        Draws follow :func:`tfngd.likelihood.make_variational_bound`: batch
        ``b`` has the seed ``batch_seed(seed, b) = fold_in([seed, 0], b)``; the
        decoder noise uses ``fold_in(batch_seed, 0)`` and stratum ``k`` (first
        timestep ``e_k``) ``fold_in(batch_seed, e_k)``, so with ``K = T - 1``
        the identity-transform model reproduces that function's DDPM bound
        with ``seed = batch_seed`` (tested); the draws of ``t`` within the
        strata use ``fold_in(batch_seed, T + k)``.
        """
        x = self._validated_data(x)
        terms = self.diffusion.num_timesteps - 1
        strata = terms if timestep_samples is None else timestep_samples
        if isinstance(strata, bool) or int(strata) != strata or not 1 <= strata <= terms:
            raise ValueError(f"timestep_samples must be an integer in [1, {terms}] (or None for "
                             f"all {terms} terms), got {timestep_samples!r}")
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        strata, batch_size = int(strata), int(batch_size)
        use_ema = self.evaluate_with_ema if use_ema is None else bool(use_ema)
        kl_term, endpoint_terms = self._bound_functions_for(use_ema)
        edges = 1 + (np.arange(strata + 1) * terms) // strata  # stratum k: [edges[k], edges[k+1])
        sizes = np.diff(edges).astype(np.float64)
        results = []
        for index, start in enumerate(range(0, len(x), batch_size)):
            batch = tf.constant(x[start:start + batch_size])
            rows = int(batch.shape[0])

            batch_seed = self.evaluation_batch_seed(seed, index)

            def draw_seed(stream, batch_seed=batch_seed):
                return tf.random.experimental.stateless_fold_in(batch_seed, stream)

            total = endpoint_terms(batch, tf.random.stateless_normal(batch.shape, draw_seed(0)))
            total = total.numpy().astype(np.float64)
            for k in range(strata):
                offset = tf.random.stateless_uniform(
                    [rows], draw_seed(self.diffusion.num_timesteps + k), 0, int(sizes[k]),
                    dtype=tf.int32)
                noise = tf.random.stateless_normal(batch.shape, draw_seed(int(edges[k])))
                kl = kl_term(batch, int(edges[k]) + offset, noise)
                total += sizes[k] * kl.numpy().astype(np.float64)
            results.append(total)
        return np.concatenate(results)

    def negative_log_likelihood(self, x, seed: int = 0, timestep_samples: int | None = None,
                                batch_size: int = 1024, use_ema: bool | None = None,
                                level: float = 0.95) -> dict:
        """The bound on a data set: mean and ``level`` interval, in bits/dim and nats/dim.

        Per-example bounds come from :meth:`per_example_bound`; the interval is
        :func:`tfngd.metrics.mean_confidence_interval` over examples (it covers
        the data and the Monte-Carlo spread). Returns
        ``{"bits_per_dim": (mean, low, high), "nats_per_dim": (...),
        "num_examples", "timestep_samples", "decoder"}``.
        """
        nats = self.per_example_bound(x, seed, timestep_samples, batch_size, use_ema)
        summary = summarize_bound(nats, self.data_dims, level)
        summary.update({
            "timestep_samples": (self.diffusion.num_timesteps - 1 if timestep_samples is None
                                 else int(timestep_samples)),
            "decoder": "discretized_gaussian" if self.is_image_model else "gaussian_density",
        })
        return summary

    # -- sampling --------------------------------------------------------------
    def sample(self, num_samples: int, seed: int = 0, num_steps: int | None = None,
               spacing: str = "trailing", clip_x0: bool = True,
               use_ema: bool = True) -> tf.Tensor:
        """Ancestral samples ``z_s ~ q_phi(z_s | z_t, x_hat(z_t, t))`` on a respaced chain.

        ``num_steps`` kept steps (default: the whole chain) chosen by
        ``spacing`` (:func:`tfngd.schedules.respaced_timesteps`); the
        posterior of each kept pair ``(s, t)`` uses that pair's coefficients,
        and the last step returns ``x_hat`` (the posterior to the data has
        variance 0). ``clip_x0`` clips ``x_hat`` to [-1, 1] for image models
        (vector data are never clipped). With ``learned_range`` the noise scale is the
        network's, interpolated between the respaced chain's ``beta'`` and ``beta~'``
        (:func:`~tfngd.gaussian_diffusion.respaced_log_variance_bounds` and
        :func:`~tfngd.gaussian_diffusion.learned_range_log_variance`, as in
        :func:`tfngd.samplers.sample`).
        """
        if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        if num_steps is None:
            num_steps = self.diffusion.num_timesteps
        if not 1 <= num_steps <= self.diffusion.num_timesteps:
            raise ValueError(f"num_steps must be in [1, {self.diffusion.num_timesteps}] (the "
                             f"length of the chain), got {num_steps}")
        if spacing not in schedules.SPACINGS:
            raise ValueError(f"Unknown spacing {spacing!r}; valid: {', '.join(schedules.SPACINGS)}")
        clip_x0 = bool(clip_x0) and self.is_image_model
        key = (int(num_samples), spacing, clip_x0, bool(use_ema))
        if key not in self._sample_functions:
            transform, reverse = self._networks(use_ema)
            shape = [int(num_samples), *self.data_shape]

            learned = self.diffusion.learns_variance

            @tf.function(reduce_retracing=True)
            def run(seed, num_steps):
                timesteps = schedules.respaced_timesteps(self.diffusion.num_timesteps, num_steps,
                                                         spacing)
                previous = tf.concat([[-1], timesteps[:-1]], axis=0)
                if learned:  # the two ends of the learned range on the respaced chain
                    log_beta, log_beta_tilde = respaced_log_variance_bounds(
                        tf.gather(tf.constant(self.diffusion.alphas_cumprod, tf.float64),
                                  timesteps))
                z = tf.random.stateless_normal(shape, seed=samplers.step_seed(seed, 0))

                def body(i, z):
                    t = tf.fill([shape[0]], timesteps[i])
                    s = tf.fill([shape[0]], previous[i])
                    x_hat, var_values = self._predict_data(reverse, z, t)
                    if clip_x0:
                        x_hat = tf.clip_by_value(x_hat, -1.0, 1.0)
                    mean, variance = self._posterior_mean(transform, x_hat, z, t, s)
                    noise = tf.random.stateless_normal(shape, seed=samplers.step_seed(seed, i + 1))
                    if learned:  # as samplers.sample / AncestralSampler; no noise at the end
                        log_variance = learned_range_log_variance(var_values, log_beta[i],
                                                                  log_beta_tilde[i])
                        scale = tf.exp(0.5 * log_variance) * tf.cast(i > 0, z.dtype)
                    else:
                        scale = tf.sqrt(variance)
                    return i - 1, mean + scale * noise

                _, z = tf.while_loop(lambda i, _: i >= 0, body, (tf.shape(timesteps)[0] - 1, z))
                return z

            self._sample_functions[key] = run
        return self._sample_functions[key](tf.constant(seed, tf.int64),
                                           tf.constant(num_steps, tf.int32))
