"""Building blocks of the denoisers, as serialisable Keras layers.

Each block is made of plain ``Dense``, ``Conv2D`` and ``GroupNormalization``
sub-layers (attention projections are ``Dense`` layers applied over tokens),
so that the curvature blocks of the natural-gradient optimizers can find and
register every weight by layer type.
"""

from __future__ import annotations

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="tfngd")
class SinusoidalTimeEmbedding(keras.layers.Layer):
    """Transformer-style embedding of timesteps (Vaswani et al. 2017; Ho et al. 2020).

    ``emb[t, i] = sin(t * w_i)`` for the first half and ``cos(t * w_i)`` for
    the second, with ``w_i = max_period ** (-i / (dim / 2))``.
    """

    def __init__(self, dim: int, max_period: float = 10000.0, **kwargs):
        super().__init__(**kwargs)
        if dim < 2 or dim % 2:
            raise ValueError(f"time embedding dim must be an even number >= 2, got {dim}")
        self.dim = int(dim)
        self.max_period = float(max_period)

    def call(self, t):
        half = self.dim // 2
        freqs = ops.exp(-math.log(self.max_period) * ops.arange(half, dtype="float32") / half)
        args = ops.cast(ops.reshape(t, (-1, 1)), "float32") * freqs[None, :]
        return ops.concatenate([ops.sin(args), ops.cos(args)], axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.dim)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "max_period": self.max_period}


@keras.saving.register_keras_serializable(package="tfngd")
class ResidualBlock(keras.layers.Layer):
    """``x + conv(drop(swish(GN(conv(swish(GN(x))) + Dense(swish(emb))))))`` (Ho et al. 2020).

    The last convolution is zero-initialised so that every block starts as
    the identity map (improved-diffusion's ``zero_module``). Called on ``[x, emb]``
    (a denoiser's conditioning embedding) or on ``x`` alone (no embedding term and
    no ``time_proj`` layer: the autoencoder of :mod:`tfngd.autoencoder`).
    """

    def __init__(self, channels: int, groups: int = 8, dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.channels = int(channels)
        self.groups = int(groups)
        self.dropout_rate = float(dropout)

    @staticmethod
    def _split(value):
        """``(x, emb)`` of the inputs (tensors or shapes); ``emb`` is None for ``x`` alone."""
        if isinstance(value, (list, tuple)) and len(value) == 2 \
                and not isinstance(value[0], (int, type(None))):
            return value[0], value[1]
        return value, None

    def build(self, input_shape):
        x_shape, emb_shape = self._split(input_shape)
        in_channels = x_shape[-1]
        for channels in (in_channels, self.channels):
            if channels % self.groups:
                raise ValueError(
                    f"{self.name}: {channels} channels cannot be split into {self.groups} groups"
                )
        self.norm1 = keras.layers.GroupNormalization(self.groups, epsilon=1e-5, name="norm1")
        self.conv1 = keras.layers.Conv2D(self.channels, 3, padding="same", name="conv1")
        self.time_proj = (None if emb_shape is None
                          else keras.layers.Dense(self.channels, name="time_proj"))
        self.norm2 = keras.layers.GroupNormalization(self.groups, epsilon=1e-5, name="norm2")
        self.dropout = keras.layers.Dropout(self.dropout_rate)
        self.conv2 = keras.layers.Conv2D(
            self.channels, 3, padding="same", kernel_initializer="zeros", name="conv2"
        )
        self.norm1.build(x_shape)
        self.conv1.build(x_shape)
        if self.time_proj is not None:
            self.time_proj.build(emb_shape)
        hidden_shape = (*x_shape[:-1], self.channels)
        self.norm2.build(hidden_shape)
        self.conv2.build(hidden_shape)
        if in_channels != self.channels:
            self.skip = keras.layers.Conv2D(self.channels, 1, name="skip")
            self.skip.build(x_shape)
        else:
            self.skip = None

    def call(self, inputs, training=False):
        x, emb = self._split(inputs)
        h = self.conv1(ops.silu(self.norm1(x)))
        if emb is not None:
            h = h + self.time_proj(ops.silu(emb))[:, None, None, :]
        h = self.conv2(self.dropout(ops.silu(self.norm2(h)), training=training))
        skip = x if self.skip is None else self.skip(x)
        return skip + h

    def compute_output_shape(self, input_shape):
        return (*self._split(input_shape)[0][:-1], self.channels)

    def get_config(self):
        return {**super().get_config(), "channels": self.channels, "groups": self.groups,
                "dropout": self.dropout_rate}


@keras.saving.register_keras_serializable(package="tfngd")
class AttentionBlock(keras.layers.Layer):
    """Multi-head self-attention over the spatial positions, with a residual connection.

    ``x + Dense_out(softmax(Q K^T / sqrt(d)) V)`` with ``Q, K, V = Dense(GN(x))``
    applied to each of the ``H * W`` tokens; the output projection is
    zero-initialised.
    """

    def __init__(self, num_heads: int = 1, groups: int = 8, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)
        self.groups = int(groups)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels % self.num_heads:
            raise ValueError(
                f"{self.name}: {channels} channels cannot be split into {self.num_heads} heads"
            )
        token_shape = (input_shape[0], None, channels)
        self.norm = keras.layers.GroupNormalization(self.groups, epsilon=1e-5, name="norm")
        self.norm.build(input_shape)
        self.query = keras.layers.Dense(channels, name="query")
        self.key = keras.layers.Dense(channels, name="key")
        self.value = keras.layers.Dense(channels, name="value")
        self.out = keras.layers.Dense(channels, kernel_initializer="zeros", name="out")
        for projection in (self.query, self.key, self.value, self.out):
            projection.build(token_shape)

    def call(self, x):
        shape = ops.shape(x)
        channels = x.shape[-1]
        head_dim = channels // self.num_heads
        tokens = ops.reshape(self.norm(x), (shape[0], -1, channels))

        def split_heads(t):
            t = ops.reshape(t, (shape[0], -1, self.num_heads, head_dim))
            return ops.transpose(t, (0, 2, 1, 3))

        q = split_heads(self.query(tokens))
        k = split_heads(self.key(tokens))
        v = split_heads(self.value(tokens))
        scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) / math.sqrt(head_dim)
        attended = ops.matmul(ops.softmax(scores, axis=-1), v)
        attended = ops.reshape(ops.transpose(attended, (0, 2, 1, 3)), (shape[0], -1, channels))
        return x + ops.reshape(self.out(attended), shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads, "groups": self.groups}


def time_embedding_mlp(t, base_dim: int, emb_dim: int):
    """Sinusoidal embedding followed by ``Dense -> swish -> Dense``."""
    emb = SinusoidalTimeEmbedding(base_dim, name="time_sinusoid")(t)
    emb = keras.layers.Dense(emb_dim, activation="silu", name="time_dense1")(emb)
    return keras.layers.Dense(emb_dim, name="time_dense2")(emb)


TIME_DTYPES = ("int32", "float32")


def conditioning_inputs(emb_dim: int, base_dim: int, num_classes: int | None,
                        time_dtype: str = "int32"):
    """The ``t`` (and label) inputs and the embedding they produce.

    ``time_dtype`` ``"int32"`` takes the discrete timestep index; ``"float32"``
    takes a real-valued time on the same scale (continuous-time training,
    :mod:`tfngd.sde`), so that the network, and the probability-flow ODE's
    right-hand side, is smooth in ``t`` instead of piecewise constant.
    """
    if time_dtype not in TIME_DTYPES:
        raise ValueError(f"time_dtype must be one of {', '.join(TIME_DTYPES)}, "
                         f"got {time_dtype!r}")
    t = keras.Input(shape=(), dtype=time_dtype, name="t")
    emb = time_embedding_mlp(t, base_dim, emb_dim)
    if num_classes is None:
        return [t], emb
    label = keras.Input(shape=(), dtype="int32", name="label")
    label_emb = keras.layers.Embedding(num_classes + 1, emb_dim, name="label_embedding")(label)
    return [t, label], keras.layers.Add(name="conditioning")([emb, label_emb])
