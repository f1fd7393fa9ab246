"""Latent diffusion (Rombach et al. 2022): a DDPM in the latent space of a KL autoencoder.

Two stages:

1. a :class:`~tfngd.autoencoder.KLAutoencoder` ``(E, D)`` is trained on the images
   and frozen; its ``scale_factor = 1 / std(z)`` is fitted on the training set;
2. a :class:`LatentDiffusionModel` (a :class:`~tfngd.model.DiffusionModel` with the
   usual U-Net denoiser) is trained on the scaled latents ``z0 = scale_factor *
   mean(E(x))`` of the training set, encoded once (:func:`encode_dataset`). Its
   forward process, objective and samplers are exactly those of pixel space, with
   ``x_0`` replaced by ``z_0``.

Sampling draws ``z_0`` with :func:`tfngd.samplers.sample` and decodes
``x = clip(D(z_0 / scale_factor), -1, 1)`` (:meth:`LatentDiffusionModel.sample` with
``decode=True``; in a SavedModel: :func:`tfngd.export.export_sampler` with
``decoder=model.image_decoder()``).

Latents are unbounded: the ``[-1, 1]`` clipping of the predicted ``x_0`` that
image models use (:attr:`DiffusionModel.is_image_model`) would cut the latent
distribution's tails, so a :class:`LatentDiffusionModel` reports
``is_image_model = False``: no ``x_0`` clipping in the samplers or the export,
and the continuous (Gaussian density) decoder term in a learned-variance
objective. The images come from the decoder, which is clipped instead.

Spacing: sampling defaults to the ``"leading"`` respacing (timesteps ``0, T/n, ...,
T - T/n``), not the pixel models' ``"trailing"`` (which starts at ``t = T - 1``). With
eps prediction the predicted ``z_0 = (z_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)``
multiplies the eps error by ``1 / sqrt(abar_t)``: ``2.0e4`` at ``t = T - 1`` of the
cosine schedule (``abar = 2.4e-9``), 34 at ``t = 980``. Image models clip that ``x_0``
to [-1, 1]; unbounded latents cannot be clipped, and the trailing chain's first step
throws them far out (measured on MNIST: sampled latents of standard deviation ~1000
against 1 for the data, decoding to noise; leading: 0.98).

Why: for MNIST's ``28x28x1 -> 7x7x4`` autoencoder the U-Net runs on 4x fewer
numbers and 16x fewer positions, so a training and a sampling step cost a
fraction of pixel space's; the autoencoder's reconstruction error is the floor of
the sample quality (``benchmarks/latent_mnist.py``, ``docs/latent.md``).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tfngd.autoencoder import KLAutoencoder
from tfngd.gaussian_diffusion import GaussianDiffusion
from tfngd.model import DiffusionModel


def check_decoder(decoder: keras.Model, latent_shape, name: str = "decoder") -> tuple:
    """The decoder's output shape ``(H, W, C)``; ``ValueError`` naming ``name`` when its
    input shape is not ``latent_shape`` or it does not output images."""
    inputs = getattr(decoder, "inputs", None)
    outputs = getattr(decoder, "outputs", None)
    if not inputs or not outputs or len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(f"{name} must be a Keras model with one input and one output "
                         f"(latents -> images), got {type(decoder).__name__}")
    got = tuple(inputs[0].shape[1:])
    if got != tuple(int(s) for s in latent_shape):
        raise ValueError(f"{name} takes inputs of shape {list(got)}, but the latents have "
                         f"shape {[int(s) for s in latent_shape]}")
    image_shape = tuple(outputs[0].shape[1:])
    if len(image_shape) != 3 or any(s is None for s in image_shape):
        raise ValueError(f"{name} must output images [N, H, W, C] of a fixed size, got "
                         f"shape {list(outputs[0].shape)}")
    return tuple(int(s) for s in image_shape)


class LatentDiffusionModel(DiffusionModel):
    """A :class:`DiffusionModel` on the scaled latents of a frozen :class:`KLAutoencoder`.

    Args:
      denoiser: the denoiser of the latents (e.g. ``build_unet(autoencoder.latent_shape)``);
        its ``x`` input must have the autoencoder's ``latent_shape``.
      diffusion: the :class:`GaussianDiffusion`.
      autoencoder: the trained autoencoder (frozen here: only the denoiser is trained;
        its weights, including ``scale_factor``, are part of this model's weights and
        checkpoints).
      **kwargs: the other arguments of :class:`DiffusionModel`.

    Train it with ``fit`` on :func:`encode_dataset` of the images. ``is_image_model`` is
    False: latents are unbounded, never clipped.
    """

    #: Latent sampling starts on the ``"leading"`` respacing, not at ``t = T - 1`` (see the
    #: module docstring); :meth:`sample`, the export and inpainting default to it.
    default_spacing = "leading"

    def __init__(self, denoiser: keras.Model, diffusion: GaussianDiffusion,
                 autoencoder: KLAutoencoder, **kwargs):
        if not isinstance(autoencoder, KLAutoencoder):
            raise ValueError(f"autoencoder must be a KLAutoencoder, got "
                             f"{type(autoencoder).__name__}")
        data_shape = tuple(denoiser.inputs[0].shape[1:])
        if data_shape != autoencoder.latent_shape:
            raise ValueError(f"the denoiser takes x of shape {list(data_shape)}, but the "
                             f"autoencoder's latents have shape {list(autoencoder.latent_shape)}"
                             "; build it on autoencoder.latent_shape")
        super().__init__(denoiser, diffusion, **kwargs)
        autoencoder.trainable = False
        self.autoencoder = autoencoder

    @property
    def is_image_model(self) -> bool:
        """False: the latents are unbounded (no x0 clipping); see the module docstring."""
        return False

    @property
    def image_shape(self) -> tuple:
        return self.autoencoder.image_shape

    def image_decoder(self) -> keras.Model:
        """A Keras model ``scaled latents -> images``: ``D(z / scale_factor)`` (unclipped; the
        export's uint8 conversion clips), with the current ``scale_factor`` baked in."""
        z = keras.Input(shape=self.data_shape, name="latents")
        unscaled = keras.layers.Rescaling(1.0 / float(self.autoencoder.scale_factor.numpy()),
                                          name="unscale")(z)
        return keras.Model(z, self.autoencoder.decoder(unscaled), name="latent_decoder")

    def decode(self, latents):
        """``clip(D(latents / scale_factor), -1, 1)``."""
        return self.autoencoder.decode(latents, scaled=True, clip=True)

    def sample(self, num_samples: int, seed: int = 0, num_steps: int | None = None,
               sampler: str = "ddim", eta: float = 0.0, spacing: str | None = None,
               clip_x0: bool = False, label=None, guidance_scale=None,
               use_ema: bool = True, decode: bool = False) -> tf.Tensor:
        """Scaled latents ``[n, *latent_shape]`` from :meth:`DiffusionModel.sample` (never
        clipped; ``"leading"`` spacing by default, see the module docstring); with
        ``decode``, the images ``[n, H, W, C]`` in [-1, 1] they decode to."""
        latents = super().sample(num_samples, seed=seed, num_steps=num_steps, sampler=sampler,
                                 eta=eta, spacing=spacing, clip_x0=clip_x0, label=label,
                                 guidance_scale=guidance_scale, use_ema=use_ema)
        return self.decode(latents) if decode else latents


def encode_dataset(autoencoder: KLAutoencoder, images, batch_size: int = 500) -> np.ndarray:
    """The scaled latents ``scale_factor * mean(E(x))`` of ``images``: the latent model's data."""
    return autoencoder.encode(images, batch_size=batch_size, scaled=True)
