"""Order of convergence of DDIM and DPM-Solver++ (2M) on the exact ODE of Gaussian data.

    python -m benchmarks.dpm_solver_order

Data ``x0 ~ N(mu, s^2)`` per dimension (``mu = 0.3``, ``s = 0.5``) denoised by the exact
``E[x0 | x_t]``, for which the probability-flow ODE has a closed-form solution (see
tests/test_dpm_solver.py, which asserts these rates). Two errors per run, max over 16x3
values of one float64 batch:

* ``integration``: against ``x0_hat`` of the exact ODE state at the last kept step, the
  error of the ODE integration alone (both samplers end with the same first-order step
  to ``abar = 1``, ``x = x0_hat``);
* ``total``: against the ODE's end point at ``abar = 1``.

Chains: ``uniform_log_snr`` (T = 1280 steps equally spaced in ``lambda`` from 6 to -5,
trailing respacing with exact strides) and ``cosine`` (the project's T = 1000 chain, eps
prediction). Writes benchmarks/results/dpm_solver_order.json.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import tensorflow as tf

from tfngd import gaussian_diffusion as gd
from tfngd import samplers

MU, S = 0.3, 0.5
SHAPE = [16, 3]
CHAINS = {"uniform_log_snr": (10, 20, 40, 80, 160), "cosine": (10, 20, 50, 100, 200, 1000)}


def make_chain(name: str) -> gd.GaussianDiffusion:
    if name == "cosine":
        return gd.GaussianDiffusion("cosine", 1000, "eps")
    diffusion = gd.GaussianDiffusion("linear", 1280, "x0")
    lam = np.linspace(6.0, -5.0, 1280)
    diffusion.alphas_cumprod = 1.0 / (1.0 + np.exp(-2.0 * lam))
    return diffusion


def _v(abar):
    return abar * S**2 + 1.0 - abar


def posterior_mean(x, abar):
    return MU + np.sqrt(abar) * S**2 / _v(abar) * (x - np.sqrt(abar) * MU)


def oracle(diffusion):
    def fn(x, t):
        abar = tf.gather(tf.constant(diffusion.alphas_cumprod, tf.float64), t)[:, None]
        a, b2 = tf.sqrt(abar), 1.0 - abar
        x0 = MU + a * S**2 / (abar * S**2 + b2) * (x - a * MU)
        return gd.prediction_target(x0, (x - a * x0) / tf.sqrt(b2), abar,
                                    diffusion.prediction_type)

    return fn


def errors(chain: str, sampler: str) -> list[dict]:
    diffusion = make_chain(chain)
    abar = diffusion.alphas_cumprod

    @tf.function(input_signature=[tf.TensorSpec([], tf.int32)])
    def run(num_steps):
        return samplers.sample(oracle(diffusion), diffusion, SHAPE, 0, num_steps,
                               samplers.make_sampler(sampler), dtype=tf.float64)

    x_start = tf.random.stateless_normal(SHAPE, seed=samplers.step_seed(0, 0),
                                         dtype=tf.float64).numpy()
    scale = np.sqrt(1.0 / _v(abar[-1]))
    rows = []
    for k in CHAINS[chain]:
        out = run(tf.constant(k)).numpy()
        t_last = int(round(diffusion.num_timesteps / k)) - 1
        state = np.sqrt(abar[t_last]) * MU + np.sqrt(_v(abar[t_last])) * scale * (
            x_start - np.sqrt(abar[-1]) * MU)
        end = MU + S * scale * (x_start - np.sqrt(abar[-1]) * MU)
        rows.append({"num_steps": k,
                     "integration": float(np.abs(out - posterior_mean(state, abar[t_last])).max()),
                     "total": float(np.abs(out - end).max())})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="benchmarks/results/dpm_solver_order.json")
    args = parser.parse_args(argv)
    result = {"command": "python -m benchmarks.dpm_solver_order", "mu": MU, "s": S,
              "chains": {}}
    for chain in CHAINS:
        result["chains"][chain] = {name: errors(chain, name) for name in ("ddim", "dpmpp_2m")}
        for name, rows in result["chains"][chain].items():
            values = [r["integration"] for r in rows]
            ratios = [a / b for a, b in zip(values[:-1], values[1:], strict=True)]
            print(chain, name, " ".join(f"K={r['num_steps']}: {r['integration']:.2e} "
                                        f"({r['total']:.2e})" for r in rows),
                  "ratios", " ".join(f"{q:.2f}" for q in ratios))
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
