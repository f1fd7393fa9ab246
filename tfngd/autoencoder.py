"""A KL-regularised convolutional autoencoder: the first stage of latent diffusion.

Rombach et al. 2022 (*High-Resolution Image Synthesis with Latent Diffusion
Models*, section 3.1) train the diffusion model in the latent
space of an autoencoder whose encoder outputs a diagonal Gaussian posterior

    q(z | x) = N(z; mu(x), diag(exp(logvar(x))))

and whose decoder maps a latent back to an image, ``x_hat = D(z)``. The
training objective, per example, is

    L(x) = sum_d (x_d - D(z)_d)^2 + beta * KL(q(z | x) || N(0, I)),
    z = mu + exp(logvar / 2) * eps,   eps ~ N(0, I)   (reparameterisation),
    KL = 1/2 sum_k (mu_k^2 + exp(logvar_k) - 1 - logvar_k),

the squared error summed over the ``D`` pixels (a Gaussian decoder of fixed
variance 1/2) and the KL summed over the latent elements (:func:`kl_divergence`).
Like LDM's "KL-reg" models, ``beta`` is small (default 1e-3 here): the KL only
keeps the latents from drifting to arbitrary scales, it does not make the
autoencoder a generative model. The latents then have some spread ``std(z)``;
the diffusion model is trained on ``scale_factor * z`` with
``scale_factor = 1 / std(z)`` over the training set (LDM's ``scale_factor``,
there computed on the first batch), so that the scaled latents have unit
variance like the ``N(0, I)`` prior at the end of the forward process
(:meth:`KLAutoencoder.fit_scale_factor`).

Architecture (:func:`build_encoder`, :func:`build_decoder`): a stem
convolution, per resolution level ``num_res_blocks`` time-free
:class:`~tfngd.networks.blocks.ResidualBlock` s (GroupNorm, swish) and a
stride-2 convolution, a middle residual block, then ``GN -> swish -> conv`` to
``2 * latent_channels`` (mean and log-variance); the decoder mirrors it with
nearest-neighbour upsampling. Two levels map MNIST ``28x28x1`` to ``7x7x4``
latents (``f = 4``, 784 -> 196 numbers).

:class:`KLAutoencoder` is a ``keras.Model`` with its own ``train_step``
(``compile(optimizer=...)`` then ``fit(images)``); it saves and loads as a
``.keras`` file (its config: the architecture and ``beta``; its weights: the
networks and ``scale_factor``). Every random draw is stateless, seeded by
``(seed, optimizer.iterations)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from tfngd import likelihood
from tfngd.networks.blocks import AttentionBlock, ResidualBlock
from tfngd.validation import check_integer

#: Log-variance is clipped to this range before exponentiation (as LDM's
#: ``DiagonalGaussianDistribution`` does, [-30, 20]), so the posterior stays finite.
LOGVAR_RANGE = (-30.0, 20.0)


def kl_divergence(mean, logvar):
    """``KL(N(mean, diag(exp(logvar))) || N(0, I))`` per example, summed over all but axis 0.

    ``1/2 sum (mean^2 + exp(logvar) - 1 - logvar)`` (Kingma & Welling 2014, appendix B):
    :func:`tfngd.likelihood.normal_kl` against the standard normal.
    """
    mean = tf.convert_to_tensor(mean, tf.float32)
    logvar = tf.convert_to_tensor(logvar, tf.float32)
    return likelihood.sum_over_example(likelihood.normal_kl(mean, logvar, 0.0, 0.0))


def _check_architecture(image_shape, latent_channels, base_channels, channel_mults,
                        num_res_blocks, groups):
    if len(image_shape) != 3 or any(int(s) < 1 for s in image_shape):
        raise ValueError(f"image_shape must be (H, W, C) with positive sizes, got "
                         f"{tuple(image_shape)}")
    for name, value in (("latent_channels", latent_channels), ("base_channels", base_channels),
                        ("num_res_blocks", num_res_blocks), ("groups", groups)):
        check_integer(name, value, 1)
    if not channel_mults or any(int(m) < 1 for m in channel_mults):
        raise ValueError(f"channel_mults must be a non-empty sequence of integers >= 1, got "
                         f"{tuple(channel_mults)}")
    factor = 2 ** (len(channel_mults) - 1)
    height, width = int(image_shape[0]), int(image_shape[1])
    if height % factor or width % factor:
        raise ValueError(f"image size {height}x{width} must be divisible by {factor} for "
                         f"{len(channel_mults)} resolution levels "
                         f"(channel_mults={tuple(channel_mults)})")
    for mult in channel_mults:
        if (base_channels * mult) % groups:
            raise ValueError(f"groups={groups} must divide every level's channels "
                             f"(base_channels * channel_mults = {base_channels * mult})")


def build_encoder(image_shape: Sequence[int], latent_channels: int = 4, base_channels: int = 32,
                  channel_mults: Sequence[int] = (1, 2, 2), num_res_blocks: int = 1,
                  attention: bool = False, groups: int = 8,
                  name: str = "encoder") -> keras.Model:
    """``x [B, H, W, C] -> [B, H/f, W/f, 2 * latent_channels]`` (mean, then log-variance).

    ``f = 2 ** (len(channel_mults) - 1)``. ``attention`` adds an
    :class:`~tfngd.networks.blocks.AttentionBlock` in the middle (LDM's encoders have one).
    """
    _check_architecture(image_shape, latent_channels, base_channels, channel_mults,
                        num_res_blocks, groups)
    x_in = keras.Input(shape=tuple(int(s) for s in image_shape), name="x")
    h = layers.Conv2D(base_channels, 3, padding="same", name="stem")(x_in)
    for level, mult in enumerate(channel_mults):
        for block in range(num_res_blocks):
            h = ResidualBlock(base_channels * mult, groups, name=f"down{level}_res{block}")(h)
        if level != len(channel_mults) - 1:
            h = layers.Conv2D(h.shape[-1], 3, strides=2, padding="same",
                              name=f"down{level}_downsample")(h)
    h = ResidualBlock(h.shape[-1], groups, name="mid_res")(h)
    if attention:
        h = AttentionBlock(1, groups, name="mid_attn")(h)
    h = layers.GroupNormalization(groups, epsilon=1e-5, name="out_norm")(h)
    h = layers.Activation("silu", name="out_act")(h)
    moments = layers.Conv2D(2 * latent_channels, 3, padding="same", name="moments")(h)
    return keras.Model(x_in, moments, name=name)


def build_decoder(image_shape: Sequence[int], latent_channels: int = 4, base_channels: int = 32,
                  channel_mults: Sequence[int] = (1, 2, 2), num_res_blocks: int = 1,
                  attention: bool = False, groups: int = 8,
                  name: str = "decoder") -> keras.Model:
    """``z [B, H/f, W/f, latent_channels] -> x_hat [B, H, W, C]`` (unbounded; images are
    in [-1, 1], :meth:`KLAutoencoder.decode` clips)."""
    _check_architecture(image_shape, latent_channels, base_channels, channel_mults,
                        num_res_blocks, groups)
    height, width, channels = (int(s) for s in image_shape)
    factor = 2 ** (len(channel_mults) - 1)
    z_in = keras.Input(shape=(height // factor, width // factor, latent_channels), name="z")
    h = layers.Conv2D(base_channels * channel_mults[-1], 3, padding="same", name="stem")(z_in)
    h = ResidualBlock(h.shape[-1], groups, name="mid_res")(h)
    if attention:
        h = AttentionBlock(1, groups, name="mid_attn")(h)
    for level, mult in reversed(list(enumerate(channel_mults))):
        for block in range(num_res_blocks):
            h = ResidualBlock(base_channels * mult, groups, name=f"up{level}_res{block}")(h)
        if level != 0:
            h = layers.UpSampling2D(2, interpolation="nearest", name=f"up{level}_upsample")(h)
            h = layers.Conv2D(h.shape[-1], 3, padding="same", name=f"up{level}_upconv")(h)
    h = layers.GroupNormalization(groups, epsilon=1e-5, name="out_norm")(h)
    h = layers.Activation("silu", name="out_act")(h)
    out = layers.Conv2D(channels, 3, padding="same", name="out_conv")(h)
    out = layers.Activation("linear", dtype="float32", name="output")(out)
    return keras.Model(z_in, out, name=name)


@keras.saving.register_keras_serializable(package="tfngd")
class KLAutoencoder(keras.Model):
    """The KL-regularised autoencoder (see the module docstring for the objective).

    Args:
      image_shape: ``(H, W, C)`` of the images (values in [-1, 1]).
      latent_channels: channels of the latent ``z``.
      base_channels, channel_mults, num_res_blocks, attention, groups: the
        architecture of :func:`build_encoder` / :func:`build_decoder`.
      beta: weight of the KL term (finite, ``>= 0``).
      seed: base seed of the reparameterisation noise.

    Metrics: ``loss`` (the objective), ``reconstruction`` (summed squared error per
    example), ``mse`` (per pixel) and ``kl`` (per example). ``test_step`` decodes the
    posterior mean (deterministic), so ``val_mse`` is the reconstruction error of
    :meth:`reconstruct`.
    """

    def __init__(self, image_shape: Sequence[int], latent_channels: int = 4,
                 base_channels: int = 32, channel_mults: Sequence[int] = (1, 2, 2),
                 num_res_blocks: int = 1, attention: bool = False, groups: int = 8,
                 beta: float = 1e-3, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) \
                or not np.isfinite(beta) or beta < 0:
            raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.latent_channels = int(latent_channels)
        self.base_channels = int(base_channels)
        self.channel_mults = tuple(int(m) for m in channel_mults)
        self.num_res_blocks = int(num_res_blocks)
        self.attention = bool(attention)
        self.groups = int(groups)
        self.beta = float(beta)
        self.seed = int(seed)
        arch = dict(latent_channels=self.latent_channels, base_channels=self.base_channels,
                    channel_mults=self.channel_mults, num_res_blocks=self.num_res_blocks,
                    attention=self.attention, groups=self.groups)
        self.encoder = build_encoder(self.image_shape, **arch)
        self.decoder = build_decoder(self.image_shape, **arch)
        # 1 / std of the training latents (fit_scale_factor); a weight, so .keras files
        # and checkpoints carry it.
        self.scale_factor = keras.Variable(1.0, dtype="float32", trainable=False,
                                           name="scale_factor")
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.reconstruction_tracker = keras.metrics.Mean(name="reconstruction")
        self.mse_tracker = keras.metrics.Mean(name="mse")
        self.kl_tracker = keras.metrics.Mean(name="kl")
        self.built = True

    def get_config(self):
        return {**super().get_config(), "image_shape": list(self.image_shape),
                "latent_channels": self.latent_channels, "base_channels": self.base_channels,
                "channel_mults": list(self.channel_mults),
                "num_res_blocks": self.num_res_blocks, "attention": self.attention,
                "groups": self.groups, "beta": self.beta, "seed": self.seed}

    @property
    def latent_shape(self) -> tuple:
        """``(H/f, W/f, latent_channels)``."""
        return tuple(int(s) for s in self.decoder.inputs[0].shape[1:])

    @property
    def metrics(self):
        return [self.loss_tracker, self.reconstruction_tracker, self.mse_tracker,
                self.kl_tracker]

    # -- the posterior -------------------------------------------------------
    def posterior(self, x, training=False):
        """``(mean, logvar)`` of ``q(z | x)``, each ``[B, *latent_shape]``."""
        moments = self.encoder(tf.cast(x, tf.float32), training=training)
        mean, logvar = tf.split(moments, 2, axis=-1)
        return mean, tf.clip_by_value(logvar, *LOGVAR_RANGE)

    def call(self, x, training=False):
        """The reconstruction ``D(mean(x))`` (unclipped)."""
        mean, _ = self.posterior(x, training=training)
        return self.decoder(mean, training=training)

    def loss_terms(self, x, noise, training=False) -> dict:
        """Per-example ``reconstruction`` (summed squared error), ``kl`` and ``loss``.

        ``noise`` (``[B, *latent_shape]``, or None for the posterior mean) is the
        ``eps`` of the reparameterised sample ``z = mean + exp(logvar / 2) eps``.
        """
        x = tf.cast(x, tf.float32)
        mean, logvar = self.posterior(x, training=training)
        z = mean if noise is None else mean + tf.exp(0.5 * logvar) * noise
        x_hat = self.decoder(z, training=training)
        squared = tf.reshape(tf.square(x - x_hat), [tf.shape(x)[0], -1])
        reconstruction = tf.reduce_sum(squared, axis=1)
        kl = kl_divergence(mean, logvar)
        return {"reconstruction": reconstruction, "mse": tf.reduce_mean(squared, axis=1),
                "kl": kl, "loss": reconstruction + self.beta * kl}

    def _update_metrics(self, terms):
        self.loss_tracker.update_state(terms["loss"])
        self.reconstruction_tracker.update_state(terms["reconstruction"])
        self.mse_tracker.update_state(terms["mse"])
        self.kl_tracker.update_state(terms["kl"])
        return {m.name: m.result() for m in self.metrics}

    @staticmethod
    def _images_of(data):
        if isinstance(data, dict):
            return data["x0"]
        if isinstance(data, (tuple, list)):
            return data[0]
        return data

    def train_step(self, data):
        x = tf.cast(self._images_of(data), tf.float32)
        step = tf.cast(self.optimizer.iterations, tf.int64)
        noise = tf.random.stateless_normal(
            tf.concat([tf.shape(x)[:1], self.latent_shape], 0),
            seed=tf.stack([tf.constant(self.seed, tf.int64), step]))
        with tf.GradientTape() as tape:
            terms = self.loss_terms(x, noise, training=True)
            objective = tf.reduce_mean(terms["loss"])
        variables = self.trainable_variables
        gradients = tape.gradient(objective, variables)
        self.optimizer.apply_gradients(zip(gradients, variables, strict=True))
        return self._update_metrics(terms)

    def test_step(self, data):
        return self._update_metrics(self.loss_terms(self._images_of(data), None))

    # -- encoding and decoding -----------------------------------------------
    def encode(self, images, batch_size: int = 500, scaled: bool = True) -> np.ndarray:
        """The posterior means of ``images`` (float32 ``[N, *latent_shape]``), in batches;
        times :attr:`scale_factor` when ``scaled`` (what the latent diffusion model sees)."""
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
            shape = ", ".join(map(str, self.image_shape))
            raise ValueError(f"images must have shape [N, {shape}] (the autoencoder's "
                             f"image_shape), got {list(images.shape)}")
        encode = self._encode_function()
        means = [encode(tf.constant(images[i:i + batch_size]))
                 for i in range(0, len(images), batch_size)]
        latents = np.concatenate([np.asarray(m) for m in means]) if means else \
            np.zeros((0, *self.latent_shape), np.float32)
        return latents * float(self.scale_factor.numpy()) if scaled else latents

    def _encode_function(self):
        if getattr(self, "_encode_fn", None) is None:
            def posterior_mean(x):
                return self.posterior(x)[0]

            self._encode_fn = tf.function(posterior_mean, autograph=False,
                                          reduce_retracing=True)
        return self._encode_fn

    def decode(self, latents, scaled: bool = True, clip: bool = True):
        """``D(z)`` of latents (a tensor, in graph code too): ``z = latents / scale_factor``
        when ``scaled``; clipped to the image range [-1, 1] when ``clip``."""
        z = tf.convert_to_tensor(latents, tf.float32)
        if tuple(z.shape[1:]) != self.latent_shape:
            shape = ", ".join(map(str, self.latent_shape))
            raise ValueError(f"latents must have shape [N, {shape}] (the autoencoder's "
                             f"latent_shape), got {list(z.shape)}")
        if scaled:
            z = z / tf.cast(self.scale_factor, tf.float32)
        x = self.decoder(z, training=False)
        return tf.clip_by_value(x, -1.0, 1.0) if clip else x

    def reconstruct(self, images, batch_size: int = 500) -> np.ndarray:
        """``clip(D(mean(x)), -1, 1)`` for every image, float32 ``[N, H, W, C]``."""
        latents = self.encode(images, batch_size, scaled=False)
        return np.concatenate([np.asarray(self.decode(latents[i:i + batch_size], scaled=False))
                               for i in range(0, len(latents), batch_size)])

    def fit_scale_factor(self, images, batch_size: int = 500) -> float:
        """Set and return ``scale_factor = 1 / std(z)``, the standard deviation over every
        element of the posterior means of ``images`` (the training set), as LDM does."""
        latents = self.encode(images, batch_size, scaled=False)
        std = float(np.std(latents.astype(np.float64)))
        if not np.isfinite(std) or std <= 0:
            raise ValueError(f"the latents of the given images have standard deviation {std}; "
                             "cannot compute a scale factor (train the autoencoder first)")
        self.scale_factor.assign(1.0 / std)
        return 1.0 / std


def load_autoencoder(path: str) -> KLAutoencoder:
    """A :class:`KLAutoencoder` saved with ``model.save(path)`` (a ``.keras`` file)."""
    model = keras.saving.load_model(path, compile=False)
    if not isinstance(model, KLAutoencoder):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a KLAutoencoder")
    return model
