"""Is K-FAC's Fisher sane for a Neural Diffusion Model? Curvature along the gradient, per layer.

    python -m benchmarks.kfac_curvature_check

For one batch of an NDM (:class:`tfngd.ndm.NeuralDiffusionModel`, cosine
schedule, ``T`` steps), and each Kronecker approximation of
:class:`tfngd.optimizers.KFAC` (``expand``, ``reduce``, ``per_example``), reports
per layer of both networks the ratio of K-FAC's curvature along the gradient to
the exact Gauss-Newton's
(:func:`tfngd.optimizers.diagnostics.curvature_along_gradient`; 1 is exact, the
step along the gradient scales as its inverse). Two models: residual MLPs on
the 2-D checkerboard (x0 parameterisation, exact probes) and 8-channel U-Nets on
the 8x8 digits (v parameterisation, 32 Monte-Carlo probes). The networks'
weights are randomised (their output layers are zero-initialised, which leaves
every other layer without a gradient at initialisation). A third case,
``digits_ddpm``, is the main job's DDPM (:func:`tfngd.config.build_model` with
the default :class:`~tfngd.config.TrainConfig`: base-32 U-Net with attention,
eps prediction, every layer called once), for comparison. Writes
``benchmarks/results/kfac_curvature_check.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import warnings

import keras
import numpy as np
import tensorflow as tf

from tfngd import data as data_lib
from tfngd.config import TrainConfig, build_model
from tfngd.gaussian_diffusion import GaussianDiffusion
from tfngd.ndm import NeuralDiffusionModel
from tfngd.networks import build_mlp_denoiser, build_unet
from tfngd.optimizers import KFAC, diagnostics

APPROXIMATIONS = ("expand", "reduce", "per_example")


def randomised(network, seed: int):
    """Random weights everywhere, variance-preserving for the kernels."""
    rng = np.random.default_rng(seed)
    for weight in network.weights:
        if len(weight.shape) > 1:
            fan_in = float(np.prod(weight.shape[:-1]))
            weight.assign(rng.normal(scale=1 / math.sqrt(fan_in), size=weight.shape)
                          .astype("float32"))
        else:
            weight.assign(rng.normal(scale=0.1, size=weight.shape).astype("float32"))
    return network


def case(name: str, num_timesteps: int):
    """``(networks builder, data, prediction type, KFAC probe options)`` of a named case."""
    if name == "checkerboard_mlp":
        data = data_lib.make_toy_data("checkerboard", 64, seed=0)
        return (lambda label: build_mlp_denoiser(2, 64, 2, name=label)), data, "x0", \
            {"fisher": "exact"}
    splits = data_lib.load_dataset("digits")
    return (lambda label: build_unet(splits.data_shape, base_channels=8, channel_mults=(1, 2),
                                     num_res_blocks=1, attention_resolutions=(), groups=4,
                                     name=label)), \
        splits.train[:32], "v", {"fisher": "mc", "mc_samples": 32}


def ddpm_ratios(num_timesteps: int, approximation: str, seed: int = 0) -> dict:
    """The main job's DiffusionModel on digits (randomised weights, 32 MC probes)."""
    splits = data_lib.load_dataset("digits")
    model = build_model(TrainConfig(num_timesteps=num_timesteps, seed=seed), splits.data_shape)
    randomised(model.denoiser, seed + 1)
    optimizer = KFAC(approximation=approximation, fisher="mc", mc_samples=32)
    model.compile(optimizer=optimizer)
    variables = model.denoiser.trainable_variables
    optimizer.build(variables)
    rng = np.random.default_rng(seed)
    x = tf.constant(splits.train[:32], tf.float32)
    t = tf.constant(rng.integers(0, num_timesteps, len(x)), tf.int32)
    noise = tf.constant(rng.normal(size=x.shape), tf.float32)
    checks = diagnostics.curvature_along_gradient(
        optimizer, variables,
        lambda: model.denoising_loss(model.denoiser, x, t, noise, None, tf.ones([len(x)]),
                                     training=True))
    return {"denoiser/" + c.name: c.ratio for c in checks}


def ratios(name: str, num_timesteps: int, approximation: str, seed: int = 0) -> dict:
    if name == "digits_ddpm":
        return ddpm_ratios(num_timesteps, approximation, seed)
    network, data, prediction_type, probes = case(name, num_timesteps)
    keras.utils.set_random_seed(seed)
    transform = randomised(network("transform"), seed + 1)
    reverse = randomised(network("reverse"), seed + 2)
    model = NeuralDiffusionModel(transform, reverse,
                                 GaussianDiffusion("cosine", num_timesteps,
                                                   prediction_type=prediction_type),
                                 ema_decay=0.0)
    optimizer = KFAC(approximation=approximation, **probes)
    with warnings.catch_warnings():  # NDM warns about expand and reduce: that is the point
        warnings.simplefilter("ignore")
        model.compile(optimizer=optimizer)
    rng = np.random.default_rng(seed)
    x = tf.constant(data, tf.float32)
    t = tf.constant(rng.integers(1, num_timesteps, len(data)), tf.int32)
    noise = tf.constant(rng.normal(size=x.shape), tf.float32)
    decoder_noise = tf.constant(rng.normal(size=x.shape), tf.float32)
    checks = diagnostics.curvature_along_gradient(
        optimizer, transform.trainable_variables + reverse.trainable_variables,
        lambda: model.training_objective(x, t, noise, decoder_noise, None))
    transform_variables = {id(v) for v in transform.trainable_variables}
    return {("transform/" if id(c.block.variables[0]) in transform_variables else "reverse/")
            + c.name: c.ratio for c in checks}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+",
                        default=["checkerboard_mlp", "digits_unet", "digits_ddpm"],
                        choices=("checkerboard_mlp", "digits_unet", "digits_ddpm"))
    parser.add_argument("--num-timesteps", type=int, nargs="+", default=[20, 1000])
    parser.add_argument("--output",
                        default=os.path.join("benchmarks", "results", "kfac_curvature_check.json"))
    args = parser.parse_args()
    report = {"benchmark": "kfac_curvature_check",
              "command": "python -m benchmarks.kfac_curvature_check " + shlex.join(sys.argv[1:]),
              "ratio": "K-FAC's d^T F d over the exact Gauss-Newton d^T GGN d along one batch's "
                       "gradient d, per layer (1: exact)",
              "cases": []}
    for name in args.cases:
        # The DDPM case is the main job's chain only.
        for num_timesteps in args.num_timesteps if name != "digits_ddpm" else [1000]:
            entry = {"case": name, "num_timesteps": num_timesteps, "ratios": {}}
            for approximation in APPROXIMATIONS:
                entry["ratios"][approximation] = ratios(name, num_timesteps, approximation)
            networks = {key.split("/")[0] for key in entry["ratios"]["expand"]}
            for network in sorted(networks, reverse=True):
                summary = []
                for approximation in APPROXIMATIONS:
                    values = [v for k, v in entry["ratios"][approximation].items()
                              if k.startswith(network + "/")]
                    summary.append(f"{approximation} {min(values):.3g}..{max(values):.3g}")
                print(f"{name} T={num_timesteps} {network}: " + "; ".join(summary), flush=True)
            report["cases"].append(entry)
    with open(args.output, "w") as handle:
        json.dump(report, handle, indent=1)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
