"""The U-Net denoiser (Ho et al. 2020; Nichol & Dhariwal 2021), as a functional Keras model.

Inputs: ``x`` of shape ``[B, H, W, C]``, timesteps ``t`` (int32, or float32) of shape
``[B]`` and, for a class-conditional model, integer labels of shape ``[B]``
in ``[0, num_classes]`` where ``num_classes`` is the null label used for
classifier-free guidance. Output: a tensor shaped like ``x`` (float32), or with
``output_channels`` channels (e.g. ``2C`` for a learned variance).
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

from tfngd.networks.blocks import AttentionBlock, ResidualBlock, conditioning_inputs


def build_unet(
    image_shape: Sequence[int],
    base_channels: int = 32,
    channel_mults: Sequence[int] = (1, 2),
    num_res_blocks: int = 1,
    attention_resolutions: Sequence[int] = (4,),
    num_heads: int = 1,
    dropout: float = 0.0,
    groups: int = 8,
    num_classes: int | None = None,
    time_dtype: str = "int32",
    name: str = "unet",
    output_channels: int | None = None,
) -> keras.Model:
    """Build a U-Net denoiser.

    Args:
      image_shape: ``(H, W, C)``; H and W must be divisible by
        ``2 ** (len(channel_mults) - 1)``.
      base_channels: channels at the first level.
      channel_mults: channel multiplier per resolution level.
      num_res_blocks: residual blocks per level on the way down (one more on the way up).
      attention_resolutions: spatial sizes (H) at which self-attention is applied.
      num_heads: attention heads.
      dropout: dropout rate inside residual blocks.
      groups: GroupNormalization groups.
      num_classes: number of classes for a conditional model (label ``num_classes``
        is the null label), or None.
      time_dtype: the ``t`` input's dtype, ``"int32"`` (timestep index) or
        ``"float32"`` (continuous time on the same scale).
      name: the model's name.
      output_channels: channels of the (zero-initialised) output convolution; default
        the image's ``C``. A learned-variance model needs ``2C``
        (:func:`tfngd.gaussian_diffusion.output_channels`).
    """
    height, width, channels = (int(s) for s in image_shape)
    factor = 2 ** (len(channel_mults) - 1)
    if height % factor or width % factor:
        raise ValueError(
            f"image size {height}x{width} must be divisible by {factor} for "
            f"{len(channel_mults)} resolution levels (channel_mults={tuple(channel_mults)})"
        )
    if base_channels < 1 or num_res_blocks < 1 or not channel_mults:
        raise ValueError(
            "base_channels and num_res_blocks must be >= 1 and channel_mults non-empty"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    output_channels = channels if output_channels is None else output_channels
    if (isinstance(output_channels, bool) or not isinstance(output_channels, int)
            or output_channels < 1):
        raise ValueError(f"output_channels must be an integer >= 1 (or None for the image's "
                         f"{channels} channels), got {output_channels!r}")

    x_in = keras.Input(shape=(height, width, channels), name="x")
    emb_dim = 4 * base_channels
    cond_inputs, emb = conditioning_inputs(emb_dim, base_channels, num_classes, time_dtype)

    h = layers.Conv2D(base_channels, 3, padding="same", name="stem")(x_in)
    skips = [h]
    resolution = height
    for level, mult in enumerate(channel_mults):
        for block in range(num_res_blocks):
            h = ResidualBlock(base_channels * mult, groups, dropout,
                              name=f"down{level}_res{block}")([h, emb])
            if resolution in attention_resolutions:
                h = AttentionBlock(num_heads, groups, name=f"down{level}_attn{block}")(h)
            skips.append(h)
        if level != len(channel_mults) - 1:
            h = layers.Conv2D(h.shape[-1], 3, strides=2, padding="same",
                              name=f"down{level}_downsample")(h)
            skips.append(h)
            resolution //= 2

    mid_channels = h.shape[-1]
    h = ResidualBlock(mid_channels, groups, dropout, name="mid_res0")([h, emb])
    h = AttentionBlock(num_heads, groups, name="mid_attn")(h)
    h = ResidualBlock(mid_channels, groups, dropout, name="mid_res1")([h, emb])

    for level, mult in reversed(list(enumerate(channel_mults))):
        for block in range(num_res_blocks + 1):
            h = layers.Concatenate(name=f"up{level}_concat{block}")([h, skips.pop()])
            h = ResidualBlock(base_channels * mult, groups, dropout,
                              name=f"up{level}_res{block}")([h, emb])
            if resolution in attention_resolutions:
                h = AttentionBlock(num_heads, groups, name=f"up{level}_attn{block}")(h)
        if level != 0:
            h = layers.UpSampling2D(2, interpolation="nearest", name=f"up{level}_upsample")(h)
            h = layers.Conv2D(h.shape[-1], 3, padding="same", name=f"up{level}_upconv")(h)
            resolution *= 2

    h = layers.GroupNormalization(groups, epsilon=1e-5, name="out_norm")(h)
    h = layers.Activation("silu", name="out_act")(h)
    out = layers.Conv2D(output_channels, 3, padding="same", kernel_initializer="zeros",
                        name="out_conv")(h)
    out = layers.Activation("linear", dtype="float32", name="output")(out)
    return keras.Model([x_in, *cond_inputs], out, name=name)
