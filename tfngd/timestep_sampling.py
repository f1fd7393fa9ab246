"""Samplers of training timesteps: uniform and loss-aware importance sampling.

Importance sampling follows improved-diffusion's "loss-second-moment"
resampler (Nichol & Dhariwal 2021, section 3.3): keep the last ``history``
losses of every timestep; until every timestep has a full history, sample
uniformly; then sample ``t`` with probability

    p_t  proportional to  sqrt(E[L_t^2]),   mixed with ``uniform_prob`` of uniform,

and weight each example by ``1 / (T p_t)`` so the objective stays an unbiased
estimate of the uniform-t objective.

The samplers are Keras layers only so that their state (the loss history)
is tracked, saved in checkpoints and restored with the model's weights.
They are never called as layers.
"""

from __future__ import annotations

import keras
import tensorflow as tf

TIMESTEP_SAMPLERS = ("uniform", "loss_second_moment")


class UniformTimestepSampler(keras.layers.Layer):
    """``t ~ U{0, ..., T - 1}`` with weight 1."""

    def __init__(self, num_timesteps: int, **kwargs):
        super().__init__(**kwargs)
        self.num_timesteps = int(num_timesteps)
        # Never called, so nothing would build it: built from the start (a model under a
        # tf.distribute strategy is built symbolically by fit unless every layer is built).
        self.built = True

    def probabilities(self) -> tf.Tensor:
        return tf.fill([self.num_timesteps], 1.0 / self.num_timesteps)

    def sample(self, batch_size, seed):
        """Returns ``(t, weights)``: int32 timesteps and float32 unbiasing weights."""
        t = tf.random.stateless_uniform(
            [batch_size], seed=seed, minval=0, maxval=self.num_timesteps, dtype=tf.int32
        )
        return t, tf.ones([batch_size], tf.float32)

    def update(self, t, losses):
        """Record per-example losses (a no-op for the uniform sampler)."""
        del t, losses
        return tf.no_op()

    def get_config(self):
        return {**super().get_config(), "num_timesteps": self.num_timesteps}


class LossSecondMomentTimestepSampler(UniformTimestepSampler):
    """Importance sampling ``p_t ~ sqrt(E[L_t^2])`` over the last ``history`` losses.

    Args:
      num_timesteps: T.
      history: losses kept per timestep (10 in improved-diffusion).
      uniform_prob: probability mass mixed in uniformly (0.001).
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001,
                 **kwargs):
        super().__init__(num_timesteps, **kwargs)
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob must be in [0, 1], got {uniform_prob}")
        self.history = int(history)
        self.uniform_prob = float(uniform_prob)
        self.loss_history = self.add_weight(
            shape=(self.num_timesteps, self.history), initializer="zeros",
            trainable=False, name="loss_history",
        )
        self.loss_counts = self.add_weight(
            shape=(self.num_timesteps,), initializer="zeros", dtype="int32",
            trainable=False, name="loss_counts",
        )

    def warmed_up(self) -> tf.Tensor:
        return tf.reduce_all(self.loss_counts >= self.history)

    def probabilities(self) -> tf.Tensor:
        def importance():
            second_moment = tf.reduce_mean(tf.square(self.loss_history), axis=-1)
            p = tf.sqrt(second_moment)
            p = p / tf.reduce_sum(p)
            return p * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

        uniform = super().probabilities
        return tf.cond(self.warmed_up(), importance, uniform)

    def sample(self, batch_size, seed):
        """``t ~ p`` by inverse CDF (``searchsorted`` of a uniform in the cumulative sum;
        XLA compiles it, unlike ``stateless_categorical``), and weights ``1 / (T p_t)``."""
        p = self.probabilities()
        cumulative = tf.math.cumsum(p)
        u = tf.random.stateless_uniform([batch_size], seed=seed) * cumulative[-1]
        t = tf.searchsorted(cumulative, u, side="right", out_type=tf.int32)
        t = tf.minimum(t, self.num_timesteps - 1)  # u == cumulative[-1] in float rounding
        weights = 1.0 / (self.num_timesteps * tf.gather(p, t))
        return t, weights

    def update(self, t, losses):
        """Push each example's loss into its timestep's history (oldest dropped).

        Duplicated timesteps in one batch are pushed one after another, as in
        the reference implementation's Python loop.
        """
        losses = tf.cast(losses, self.loss_history.dtype)

        def push(i, history, counts):
            ti = t[i]
            row = tf.concat([history[ti, 1:], losses[i : i + 1]], axis=0)
            history = tf.tensor_scatter_nd_update(history, [[ti]], row[tf.newaxis])
            counts = tf.tensor_scatter_nd_add(counts, [[ti]], [1])
            return i + 1, history, counts

        _, history, counts = tf.while_loop(
            lambda i, *_: i < tf.shape(t)[0],
            push,
            (tf.constant(0), tf.convert_to_tensor(self.loss_history),
             tf.convert_to_tensor(self.loss_counts)),
        )
        self.loss_history.assign(history)
        self.loss_counts.assign(tf.minimum(counts, self.history))
        return tf.no_op()

    def get_config(self):
        return {**super().get_config(), "history": self.history, "uniform_prob": self.uniform_prob}


def make_timestep_sampler(name: str, num_timesteps: int) -> UniformTimestepSampler:
    if name == "uniform":
        return UniformTimestepSampler(num_timesteps, name="timestep_sampler")
    if name == "loss_second_moment":
        return LossSecondMomentTimestepSampler(num_timesteps, name="timestep_sampler")
    raise ValueError(
        f"Unknown timestep sampler {name!r}; valid: {', '.join(TIMESTEP_SAMPLERS)}"
    )
