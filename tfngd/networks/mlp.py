"""A residual MLP denoiser for low-dimensional vector data (the 2-D toys)."""

from __future__ import annotations

import keras
from keras import layers, ops

from tfngd.networks.blocks import conditioning_inputs


def build_mlp_denoiser(
    data_dim: int,
    hidden_units: int = 256,
    num_blocks: int = 3,
    num_classes: int | None = None,
    time_dtype: str = "int32",
    name: str = "mlp_denoiser",
    out_dim: int | None = None,
) -> keras.Model:
    """A residual MLP denoiser for vector data (2-D toys).

    ``h = Dense(x) + Dense(emb)``, then ``num_blocks`` residual blocks
    ``h + Dense(swish(Dense(swish(h)) + Dense(emb)))``, then a zero-initialised
    ``Dense`` to ``out_dim`` (default ``data_dim``; ``2 * data_dim`` for a learned
    variance, see :func:`tfngd.gaussian_diffusion.output_channels`). ``time_dtype``: the
    ``t`` input's dtype (:func:`~tfngd.networks.blocks.conditioning_inputs`).
    """
    if data_dim < 1 or hidden_units < 1 or num_blocks < 0:
        raise ValueError("data_dim and hidden_units must be >= 1 and num_blocks >= 0")
    out_dim = data_dim if out_dim is None else out_dim
    if isinstance(out_dim, bool) or not isinstance(out_dim, int) or out_dim < 1:
        raise ValueError(f"out_dim must be an integer >= 1 (or None for data_dim), got "
                         f"{out_dim!r}")
    x_in = keras.Input(shape=(data_dim,), name="x")
    cond_inputs, emb = conditioning_inputs(hidden_units, 64, num_classes, time_dtype)
    h = layers.Add(name="input_add")([
        layers.Dense(hidden_units, name="input_proj")(x_in),
        layers.Dense(hidden_units, name="input_time")(emb),
    ])
    for block in range(num_blocks):
        inner = layers.Dense(hidden_units, name=f"block{block}_dense1")(ops.silu(h))
        inner = layers.Add(name=f"block{block}_time")([
            inner, layers.Dense(hidden_units, name=f"block{block}_time_proj")(ops.silu(emb))
        ])
        inner = layers.Dense(hidden_units, name=f"block{block}_dense2")(ops.silu(inner))
        h = layers.Add(name=f"block{block}_residual")([h, inner])
    out = layers.Dense(out_dim, kernel_initializer="zeros", name="out")(ops.silu(h))
    out = layers.Activation("linear", dtype="float32", name="output")(out)
    return keras.Model([x_in, *cond_inputs], out, name=name)
