"""A K-FAC Fisher bucketed by noise level: the train-step sequence that feeds it.

Diffusion training mixes very different regression problems in one loss: at small
``t`` the denoiser nearly sees the data, at large ``t`` nearly pure noise, and a
layer's input and output-gradient statistics differ between the two. A pooled
K-FAC Fisher averages them. ``KFAC(fisher_buckets=B)`` keeps ``B`` sets of
statistics instead, and this module is the train step that feeds them.

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

from collections.abc import Callable

import tensorflow as tf

from tfngd.optimizers.training import ForwardPass, kfac_of

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
    if int(buckets) != buckets or buckets < 1:
        raise ValueError(f"fisher_buckets must be an integer >= 1, got {buckets!r}")
    t = tf.cast(t, tf.int64)
    return tf.cast(tf.minimum(t * int(buckets) // int(num_timesteps), int(buckets) - 1),
                   tf.int32)


def bucketed_gradients_and_curvature(optimizer, variables, forward: Callable[[], ForwardPass],
                                     example_buckets):
    """:func:`tfngd.optimizers.training.gradients_and_curvature` for a bucketed Fisher.

    ``forward()`` must return a :class:`ForwardPass` whose ``extras[OBJECTIVE_TERMS]``
    are the ``[N]`` per-example terms whose mean is ``loss``; ``example_buckets`` the
    bucket of each example. Computes every bucket's gradient ``g_b`` (one backward pass
    per bucket), feeds the bucketed curvature statistics and records the ``g_b`` with
    the optimizer (:meth:`KFAC.record_bucket_gradients`), and returns ``(g, forward
    pass)`` with ``g = sum_b g_b``, which the caller applies as usual.
    """
    kfac = kfac_of(optimizer)
    if kfac is None or kfac.fisher_buckets < 2:
        raise ValueError("bucketed_gradients_and_curvature needs a KFAC optimizer with "
                         "fisher_buckets > 1")
    kfac.bucketed_train_step = True
    buckets = kfac.fisher_buckets
    with tf.GradientTape(persistent=True) as tape:
        with kfac.capture() as captured:
            result = forward()
        if OBJECTIVE_TERMS not in result.extras:
            raise ValueError(f"a bucketed Fisher needs the forward pass' extras"
                             f"[{OBJECTIVE_TERMS!r}] (the per-example terms of the loss)")
        terms = tf.cast(result.extras[OBJECTIVE_TERMS], tf.float32)
        examples = tf.cast(tf.shape(terms)[0], tf.float32)
        shares = tf.math.unsorted_segment_sum(terms, example_buckets, buckets) / examples
        scaled_shares = [optimizer.scale_loss(shares[b]) for b in range(buckets)]
    bucket_gradients = [tape.gradient(share, variables) for share in scaled_shares]
    # A variable the loss does not reach has no gradient in any bucket (None, as usual).
    gradients = [None if bucket_gradients[0][i] is None
                 else tf.add_n([grads[i] for grads in bucket_gradients])
                 for i in range(len(variables))]
    kfac.update_curvature(tape, captured, result.outputs, result.likelihood,
                          per_example_scale=result.per_example_scale, loss=result.loss,
                          example_buckets=example_buckets)
    kfac.record_bucket_gradients(bucket_gradients, variables)
    del tape
    return gradients, result
