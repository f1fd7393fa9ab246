"""Graph-mode sampler (one tf.while_loop) against a Python loop of model calls.

    python -m benchmarks.sampler_speed --steps 100 --num-samples 16

Both run the same DDIM update on the same (untrained) default digits U-Net;
the Python loops call the Keras model once per step, as a naive sampler would,
through ``predict()``, an eager ``model(x)`` call, or ``predict_on_batch()``.
The graph sampler is also timed with XLA (``jit_compile=True``). Times are
the best of ``--repeats`` runs after a first (tracing) call. Writes JSON to
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import tensorflow as tf

from tfngd import gaussian_diffusion as gd
from tfngd import samplers, schedules
from tfngd.config import TrainConfig, build_model

CALLS = {
    "predict": lambda denoiser, inputs: denoiser.predict(inputs, verbose=0),
    "eager_call": lambda denoiser, inputs: denoiser(inputs, training=False).numpy(),
    "predict_on_batch": lambda denoiser, inputs: denoiser.predict_on_batch(inputs),
}


def python_loop_sample(model, num_samples, seed, num_steps, call="predict"):
    """A naive sampler: a Python loop that calls the Keras model once per step."""
    diffusion = model.diffusion
    timesteps = schedules.respaced_timesteps(diffusion.num_timesteps, num_steps).numpy()
    abar = diffusion.alphas_cumprod
    step = samplers.DDIMSampler(0.0)
    x = tf.random.stateless_normal([num_samples, *model.data_shape], seed=[seed, 0])
    for i in range(len(timesteps) - 1, -1, -1):
        t = tf.fill([num_samples], tf.constant(timesteps[i], tf.int32))
        out = CALLS[call](model.ema_denoiser, [x, t])
        abar_t = tf.constant(abar[timesteps[i]], tf.float64)
        abar_prev = tf.constant(abar[timesteps[i - 1]] if i > 0 else 1.0, tf.float64)
        abar32 = tf.cast(abar_t, tf.float32)
        x0, eps = gd.prediction_to_x0_eps(tf.constant(out), x, abar32, diffusion.prediction_type)
        x0 = tf.clip_by_value(x0, -1.0, 1.0)
        eps = gd.eps_from_x0(x, x0, abar32)
        x = step.step(x, x0, eps, abar_t, abar_prev, tf.zeros_like(x))
    return x


def best_of(fn, repeats):
    fn()  # warm-up: tracing
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default="benchmarks/results/sampler_speed.json")
    args = parser.parse_args()
    config = TrainConfig().validate()
    model = build_model(config, (8, 8, 1))
    # The output layer is zero-initialised; give it weights so both samplers do real work
    # and their results can be compared.
    out_kernel = model.ema_denoiser.get_layer("out_conv").kernel
    out_kernel.assign(np.random.default_rng(0).normal(0, 0.05, out_kernel.shape))
    graph = best_of(lambda: model.sample(args.num_samples, 0, args.steps), args.repeats)
    xla_fn = tf.function(
        lambda seed, k: samplers.sample(
            samplers.denoiser_fn(model.ema_denoiser), model.diffusion,
            [args.num_samples, *model.data_shape], seed, k, clip_x0=True),
        jit_compile=True)
    graph_xla = best_of(lambda: xla_fn(tf.constant(0, tf.int64), tf.constant(args.steps)),
                        args.repeats)
    graph_x = model.sample(args.num_samples, 0, args.steps).numpy()
    result = {"steps": args.steps, "num_samples": args.num_samples,
              "graph_seconds": graph, "graph_xla_seconds": graph_xla, "python_loops": {}}
    for call in CALLS:
        loop = best_of(lambda c=call: python_loop_sample(model, args.num_samples, 0, args.steps,
                                                         c), args.repeats)
        loop_x = python_loop_sample(model, args.num_samples, 0, args.steps, call).numpy()
        result["python_loops"][call] = {
            "seconds": loop, "graph_speedup": loop / graph, "graph_xla_speedup": loop / graph_xla,
            "max_abs_difference": float(np.abs(graph_x - loop_x).max()),
        }
    print(json.dumps(result))
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
