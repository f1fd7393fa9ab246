"""Train the same model on one device and on 2 logical CPU devices; report the differences.

Run by ``tests/test_distribute.py`` in a fresh process (logical devices must be
configured before TensorFlow initialises its devices)::

    python tests/distributed_equivalence.py OUTPUT.json [CASE ...]

For each case, the model is trained for a few steps under
``tf.distribute.OneDeviceStrategy`` and under ``MirroredStrategy`` over two
logical CPUs, on the same global batches, and every model weight (EMA copies
and timestep-sampler state included) and optimizer variable is compared
(``kfac_unet_xla``: the two replicas with and without XLA).
Writes ``{case: {"worst": max relative difference, "worst_variable": name,
"iterations": [single, mirrored], "excluded": [...]}}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(_cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)

from tfngd import data as data_lib  # noqa: E402
from tfngd.config import TrainConfig, build_model, build_optimizer  # noqa: E402

STEPS = 4
# Common settings: gradient clipping tight enough to act at every step (it must act on the
# global gradient), the loss-second-moment sampler (its history is global state), EMA.
COMMON = dict(hidden_units=16, num_blocks=1, base_channels=8, groups=4, channel_mults=(1,),
              attention_resolutions=(), batch_size=16, epochs=1, steps_per_epoch=STEPS,
              warmup_steps=1, statistics_every=1, statistics_examples=None, inverse_every=2,
              timestep_sampler="loss_second_moment", global_clipnorm=0.05, num_timesteps=50,
              seed=3)
CASES = {
    "kfac_mlp": dict(dataset="checkerboard", optimizer="kfac"),
    "adam_mlp": dict(dataset="checkerboard", optimizer="adam"),
    "ekfac_mlp": dict(dataset="checkerboard", optimizer="ekfac"),
    # The main job's statistics schedule (every 10 steps, and every step of the inverse
    # warm-up: the statistics run inside a tf.cond), factors from 8 examples per replica.
    "kfac_unet": dict(dataset="digits", optimizer="kfac", attention_resolutions=(4,),
                      timestep_sampler="uniform", statistics_every=10),
    # XLA on 2 replicas (each compiles its own forward pass, backward pass and K-FAC
    # statistics) against the same 2 replicas without XLA. (Against one device with XLA
    # the noise would differ: one device compiles the whole step, draws included, and
    # XLA's stateless_normal gives other floats than TensorFlow's kernel.)
    "kfac_unet_xla": dict(dataset="digits", optimizer="kfac", attention_resolutions=(4,),
                          timestep_sampler="uniform", jit_compile=True),
    "kfac_ndm": dict(dataset="checkerboard", optimizer="kfac", model="ndm",
                     prediction_type="x0", num_timesteps=20, sample_steps=20),
    # A NaN in the last row of step 2's batch (second replica's half): both runs skip that
    # step whole (tfngd.nonfinite); Adam through the written-back state, K-FAC by itself.
    "adam_mlp_nan": dict(dataset="checkerboard", optimizer="adam", nan_step=2),
    # K-FAC with the NaN in its last step: each replica guards the statistics of its own
    # examples (no collective can run where they are folded in), so the first replica keeps
    # that step's statistics, which one device drops; the update is skipped on both.
    "kfac_mlp_nan": dict(dataset="checkerboard", optimizer="kfac", nan_step=STEPS - 1),
}
# The gradient of an attention layer's key bias is exactly zero (it adds the same q . b_k
# to every logit of a query, and softmax ignores that): only rounding noise moves it.
# Eigenvectors (eigen damping, EKFAC) are defined up to sign, and up to a rotation within a
# repeated eigenvalue (the near-zero eigenvalues of a rank-deficient factor): two equally
# right runs store different ones. What they act through is compared instead: the factors,
# eigenvalues, EKFAC scalings and, after the updates they preconditioned, the weights.
EXCLUDED = ("attn/key/bias", "attn_key_bias", "_eigenvectors")


def poisoned(batches, step: int):
    """``batches`` with a NaN in the last row of batch ``step``."""

    def poison(index, batch):
        last = tf.shape(batch)[0] - 1
        bad = tf.tensor_scatter_nd_update(batch, [[last, 0]], [float("nan")])
        return tf.where(index == step, bad, batch)

    return batches.enumerate().map(poison)


def train(config: TrainConfig, splits, strategy, nan_step=None):
    with strategy.scope():
        model = build_model(config, splits.data_shape)
        model.compile(optimizer=build_optimizer(config), jit_compile=config.jit_compile)
    batches = data_lib.training_batches(splits.train, config.batch_size, seed=0).take(STEPS)
    if nan_step is not None:
        batches = poisoned(batches, nan_step)
    model.fit(batches, epochs=1, steps_per_epoch=STEPS, verbose=0)
    return model


def state(model) -> list:
    """``(name, array)`` of every model weight and optimizer variable, in order."""
    return ([(v.path, np.asarray(v.numpy())) for v in model.weights]
            + [(v.name, np.asarray(v.numpy())) for v in model.optimizer.variables])


def compare(name: str, mirrored_strategy) -> dict:
    options = {**COMMON, **CASES[name]}
    nan_step = options.pop("nan_step", None)
    config = TrainConfig(**options).validate()
    splits = data_lib.load_dataset(config.dataset, seed=0)
    mirrored = train(config, splits, mirrored_strategy, nan_step)
    if config.jit_compile:
        single = train(dataclasses.replace(config, jit_compile=False), splits,
                       mirrored_strategy)
    else:
        single = train(config, splits, tf.distribute.OneDeviceStrategy("/cpu:0"), nan_step)
    worst, worst_variable, excluded, differing = 0.0, None, [], []
    for (key, a), (_, b) in zip(state(single), state(mirrored), strict=True):
        if any(pattern in key for pattern in EXCLUDED):
            excluded.append(key)
            continue
        if a.size == 0 or not np.issubdtype(a.dtype, np.floating):
            if not np.array_equal(a, b):
                worst, worst_variable = float("inf"), key
            continue
        if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
            worst, worst_variable = float("inf"), key  # NaN compares as no difference
            continue
        scale = float(np.max(np.abs(a)))
        difference = float(np.max(np.abs(a - b))) / scale if scale > 0 else float(
            np.max(np.abs(b)))
        if difference > 1e-3:
            differing.append(key)
        if difference > worst:
            worst, worst_variable = difference, key
    return {"worst": worst, "worst_variable": worst_variable, "excluded": excluded,
            "differing": differing,
            "iterations": [int(single.optimizer.iterations.numpy()),
                           int(mirrored.optimizer.iterations.numpy())],
            "nonfinite_steps": [int(single.nonfinite_steps.numpy()),
                                int(mirrored.nonfinite_steps.numpy())]}


def main():
    output, cases = sys.argv[1], sys.argv[2:] or list(CASES)
    # One MirroredStrategy for every case: a second one in the same process reuses the
    # collective instance keys of the first and its all-reduces mismatch.
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    results = {name: compare(name, strategy) for name in cases}
    with open(output, "w") as handle:
        json.dump(results, handle, indent=1)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
