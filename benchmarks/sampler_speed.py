"""Graph-mode sampler (one tf.while_loop) against a Python loop of model calls.

    python -m benchmarks.sampler_speed --steps 100 --num-samples 16

Both run the same DDIM update on the same (untrained) default digits U-Net;
the Python loop calls ``denoiser.predict_on_batch``-style eager model calls
once per step, as a naive sampler would. Times exclude the first (tracing)
call. Writes JSON to benchmarks/results/.
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


def python_loop_sample(model, num_samples, seed, num_steps):
    """A naive sampler: a Python loop that calls the Keras model once per step."""
    diffusion = model.diffusion
    timesteps = schedules.respaced_timesteps(diffusion.num_timesteps, num_steps).numpy()
    abar = diffusion.alphas_cumprod
    step = samplers.DDIMSampler(0.0)
    x = tf.random.stateless_normal([num_samples, *model.data_shape], seed=[seed, 0])
    for i in range(len(timesteps) - 1, -1, -1):
        t = np.full([num_samples], timesteps[i], np.int32)
        out = model.ema_denoiser.predict_on_batch([x, t])
        abar_t = abar[timesteps[i]]
        abar_prev = abar[timesteps[i - 1]] if i > 0 else 1.0
        x0, eps = gd.prediction_to_x0_eps(tf.constant(out), x, abar_t, diffusion.prediction_type)
        x0 = tf.clip_by_value(x0, -1.0, 1.0)
        eps = gd.eps_from_x0(x, x0, abar_t)
        x = step.step(x, x0, eps, tf.constant(abar_t, tf.float64),
                      tf.constant(abar_prev, tf.float64), tf.zeros_like(x))
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
    graph = best_of(lambda: model.sample(args.num_samples, 0, args.steps), args.repeats)
    loop = best_of(lambda: python_loop_sample(model, args.num_samples, 0, args.steps),
                   args.repeats)
    graph_x = model.sample(args.num_samples, 0, args.steps).numpy()
    loop_x = python_loop_sample(model, args.num_samples, 0, args.steps).numpy()
    result = {
        "steps": args.steps, "num_samples": args.num_samples,
        "graph_seconds": graph, "python_loop_seconds": loop, "speedup": loop / graph,
        "max_abs_difference": float(np.abs(graph_x - loop_x).max()),
    }
    print(json.dumps(result))
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
