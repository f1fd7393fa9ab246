"""A K-FAC Fisher bucketed by noise level: its definition, buckets and loss shares.

Diffusion training mixes very different regression problems in one loss: at small
``t`` the denoiser nearly sees the data, at large ``t`` nearly pure noise, and a
layer's input and output-gradient statistics differ between the two. A pooled
K-FAC Fisher averages them. ``KFAC(fisher_buckets=B)`` keeps ``B`` sets of
statistics instead; this module defines them, and
:func:`tfngd.optimizers.training.gradients_and_curvature` (``example_buckets``) is the
train-step sequence that feeds them.

Definition. The examples of a batch are split into buckets ``b = 0..B-1`` by their
noise level (:func:`timestep_buckets`), the mean loss into the buckets' shares::

    L = 1/N sum_n l_n = sum_b L_b,     L_b = 1/N sum_{n in b} l_n,     g_b = grad L_b

(so ``sum_b g_b = g``), and each bucket has its own K-FAC Fisher ``F_b``: the Kronecker
factors (and GroupNorm diagonals) of bucket ``b``'s examples, means over those
examples (:meth:`KFAC.bucket_statistics`), each with its own running average. The
preconditioned direction is::

    U = sum_b (F_b + lambda I)^-1 g_b

per layer (then K-FAC's KL clip, momentum and learning rate, unchanged). It is the
natural gradient when each bucket's loss share is thought of as acting on its own copy
``theta_b`` of the parameters, each copy preconditioned by the Fisher of its own
examples, and the copies' steps are added; it equals the pooled step
``(F + lambda I)^-1 g`` when every bucket has the same Fisher (``F_b = F``), and for
``B = 1``. (The other natural candidate, the mixture Fisher ``sum_b pi_b F_b`` of the
buckets' examples, is the pooled Fisher itself.) Using the mean ``F_b`` rather than the
share's Fisher ``pi_b F_b`` (``pi_b = N_b / N``) keeps the damping's meaning and the
step size those of pooled K-FAC.

Cost per step: the probe pass is shared; the factor products are formed once per
bucket on the whole (masked) batch (``B`` times pooled K-FAC's statistics cost), the
inverse refresh decomposes ``B`` times as many factors, the preconditioning does ``B``
products per layer, and the gradient takes ``B`` backward passes (one per loss share)
instead of one. Memory: ``B`` times the factors and inverses, plus ``B`` gradient
buffers of the preconditioned variables.
"""

from __future__ import annotations

import tensorflow as tf

from tfngd.optimizers.arguments import require_counts

#: The key of a ForwardPass' ``extras`` holding the ``[N]`` terms whose mean is the loss.
OBJECTIVE_TERMS = "objective_terms"


def timestep_buckets(t, num_timesteps: int, buckets: int) -> tf.Tensor:
    """The bucket ``floor(t B / T)`` (``[N]`` int32 in ``[0, B)``) of each timestep ``t``.

    Equal-width bins of ``t``: under the uniform timestep sampler these are equally
    probable, so each bucket's statistics get ``N / B`` examples on average, and because
    the log-SNR is monotone in ``t`` they are also the equal-probability bins of the
    log-SNR, whatever the schedule (the log-SNR quantiles of a uniform ``t`` are the
    images of ``t``'s). ``B = 4`` gives the chain's quartiles, as the loss metrics do.
    """
    require_counts(fisher_buckets=buckets)
    t = tf.cast(t, tf.int64)
    return tf.cast(tf.minimum(t * int(buckets) // int(num_timesteps), int(buckets) - 1),
                   tf.int32)


def loss_shares(extras: dict, example_buckets, buckets: int) -> list:
    """The buckets' shares ``L_b = 1/N sum_{n in b} l_n`` of the mean loss (``sum_b L_b = L``).

    ``extras[OBJECTIVE_TERMS]`` are the ``[N]`` per-example terms ``l_n`` whose mean is the
    loss (a :class:`~tfngd.optimizers.training.ForwardPass`' extras), ``example_buckets``
    the bucket of each example. Returns ``B`` scalars.
    """
    if OBJECTIVE_TERMS not in extras:
        raise ValueError(f"a bucketed Fisher needs the forward pass' extras"
                         f"[{OBJECTIVE_TERMS!r}] (the per-example terms of the loss)")
    terms = tf.cast(extras[OBJECTIVE_TERMS], tf.float32)
    examples = tf.cast(tf.shape(terms)[0], tf.float32)
    shares = tf.math.unsorted_segment_sum(terms, example_buckets, buckets) / examples
    return [shares[b] for b in range(buckets)]
