"""Held-out bits/dim in the benchmark: the variational bound on the documented chain, with
the documented noise, batch by batch; and an image task end to end (a tiny U-Net on the
8x8 digits), whose stage-2 record carries sample metrics and bits/dim."""

import json

import numpy as np
import pytest
import tensorflow as tf

from tfngd import likelihood
from tfngd.bench import analysis, trials
from tfngd.config import TrainConfig, build_model
from trainers import bench

TINY_UNET = {"base_channels": 8, "groups": 4, "channel_mults": (1,), "attention_resolutions": (),
             "num_timesteps": 40}


def tiny_model():
    config = TrainConfig(dataset="digits", seed=3, **TINY_UNET)
    return build_model(config, (8, 8, 1))


def test_held_out_bits_per_dim_is_the_bound_of_each_batch_on_a_linspace_chain():
    model = tiny_model()
    images = np.random.default_rng(0).uniform(-1, 1, (7, 8, 8, 1)).astype(np.float32)
    images = np.round((images + 1) * 127.5) / 127.5 - 1  # on the 256-level grid
    result = trials.held_out_bits_per_dim(model, images, chain_steps=5, seed=11, batch_size=3)

    kept = np.round(np.linspace(0, 39, 5)).astype(np.int32)  # linspace keeps t = 0 and T - 1
    def ema_network(x, t):  # the unconditional model's EMA weights, called directly
        return model.ema_denoiser([x, t], training=False)

    bound = likelihood.make_variational_bound(ema_network, model.diffusion, kept, clip_x0=True,
                                              discrete=True)
    expected = np.concatenate([
        bound(tf.constant(images[start:start + 3]), tf.constant([11, index], tf.int64))
        ["bits_per_dim"].numpy() for index, start in enumerate(range(0, 7, 3))])
    assert expected.shape == (7,) and np.all(expected > 0)  # a bound on a probability mass
    assert result["bits_per_dim"] == pytest.approx(float(expected.mean()), rel=1e-6)
    summary = analysis.summarize(expected.tolist())
    assert result["ci95_low"] == pytest.approx(summary["low"], rel=1e-6)
    assert result["ci95_high"] == pytest.approx(summary["high"], rel=1e-6)
    assert result["num_examples"] == 7 and result["chain_steps"] == 5
    assert result["num_timesteps"] == 40
    # Other noise gives another Monte-Carlo value of the same bound.
    other = trials.held_out_bits_per_dim(model, images, chain_steps=5, seed=12, batch_size=3)
    assert other["bits_per_dim"] != result["bits_per_dim"]


def tiny_digits_bench(output, *extra) -> list[str]:
    """tfngd-bench arguments: one 4-step Adam final of the tiny U-Net on the digits."""
    args = ["--tasks", "digits", "--optimizers", "adam", "--seeds", "1", "--steps", "4",
            "--eval-every", "2", "--grid", "adam=1e-3", "--num-samples", "32",
            "--curve-samples", "0", "--set", "sample_steps=3", "--output", str(output), *extra]
    for name, value in TINY_UNET.items():
        value = ",".join(map(str, value)) if isinstance(value, tuple) else value
        args += ["--set", f"{name}={value}"]
    return args


def test_an_image_task_end_to_end_records_sample_metrics_and_bits_per_dim(tmp_path, capsys):
    output = tmp_path / "bench"
    assert bench.main(tiny_digits_bench(output)) == 0, capsys.readouterr().err
    (path,) = (output / "trials" / "digits").glob("*.json")
    record = json.loads(path.read_text())
    assert set(record["samples"]["metrics"]) >= {"frechet_distance", "kid"}
    held_out = record["likelihood"]
    assert held_out["num_examples"] == 297  # the whole held-out split of the digits
    # The chain has BPD_CHAIN_STEPS steps, or all of them when T is shorter (40 here).
    assert held_out["chain_steps"] == min(trials.BPD_CHAIN_STEPS, 40) == 40
    assert held_out["num_timesteps"] == 40
    # An untrained-for-long network is far from the data, but the bound is a finite
    # positive number of bits (8 bits/dim would be a uniform model of 256 levels).
    assert 0 < held_out["bits_per_dim"] < 50
    assert held_out["ci95_low"] < held_out["bits_per_dim"] < held_out["ci95_high"]
    report = (output / "REPORT.md").read_text()
    assert "Held-out likelihood (bits/dim" in report
    assert f"{held_out['bits_per_dim']:.4g}" in report
    assert "on the full 40-step chain (x0 clipped)" in report and "respaced" not in report
    # The task's line names the model changes every optimizer trained with.
    assert ("Changed for every optimizer (`--set`): attention_resolutions=, base_channels=8, "
            "channel_mults=1, groups=4, num_timesteps=40, sample_steps=3.") in report


def test_bpd_chain_steps_scores_the_finals_on_the_chain_asked_for(tmp_path, capsys):
    """--bpd-chain-steps 5: the record holds the bound on a 5-step chain (not the default
    chain, which is the full 40 steps here), the choice is in the trial's identity and the
    benchmark's settings, and the report names the chain."""
    output = tmp_path / "bench"
    assert bench.main(tiny_digits_bench(output, "--bpd-chain-steps", "5")) == 0, \
        capsys.readouterr().err
    (path,) = (output / "trials" / "digits").glob("*.json")
    record = json.loads(path.read_text())
    assert record["likelihood"]["chain_steps"] == 5 and record["identity"]["bpd_chain_steps"] == 5
    assert record["likelihood"]["num_timesteps"] == 40
    report = (output / "REPORT.md").read_text()
    assert f"{record['likelihood']['bits_per_dim']:.4g}" in report
    assert "on a 5-step respaced chain" in report
    assert json.loads((output / "benchmark.json").read_text())["settings"]["bpd_chain_steps"] == 5
    # --report-only reads the chain back from benchmark.json and finds the same trial.
    assert bench.main(["--report-only", "--output", str(output)]) == 0
    assert "on a 5-step respaced chain" in (output / "REPORT.md").read_text()
