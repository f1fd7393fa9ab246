"""``model="score_sde"`` and ``model="ndm"`` through the config and every CLI, and the
probability-flow ODE likelihood against the variational bound on a trained 2-D model."""

import json

import numpy as np
import pytest
import tensorflow as tf
from test_trainers import _all_state, crash_after_first_checkpoint, read_png

from tfngd import runs
from tfngd.config import ConfigError, TrainConfig, build_model
from tfngd.data import load_dataset
from tfngd.ndm import NeuralDiffusionModel
from tfngd.sde import VPSDE, ScoreSDEModel
from trainers import evaluate as evaluate_cli
from trainers import export as export_cli
from trainers import sample as sample_cli
from trainers import train as train_cli

TINY_2D = [
    "--dataset", "checkerboard", "--hidden-units", "32", "--num-blocks", "1",
    "--num-timesteps", "20", "--batch-size", "32", "--sample-steps", "5", "--num-samples", "16",
    "--warmup-steps", "1", "--verbose", "0", "--num-train", "512", "--sample-every-epochs", "1",
]
KINDS = {
    "score_sde": ["--model", "score_sde", "--sde", "subvp"],
    "ndm": ["--model", "ndm", "--prediction-type", "x0"],
}


# -- configuration ---------------------------------------------------------------------------
def test_each_model_kind_builds_its_model_and_resolves_its_sampler():
    shape = (2,)
    ddpm = TrainConfig(dataset="checkerboard").validate()
    assert ddpm.sampling_method == "ddpm"  # deterministic DDIM diverges on unclipped 2-D data
    assert TrainConfig(dataset="digits").validate().sampling_method == "ddim"
    assert build_model(ddpm, shape).denoiser.inputs[1].dtype == "int32"

    score = TrainConfig(dataset="checkerboard", model="score_sde").validate()
    assert score.sampling_method == "pc"
    model = build_model(score, shape)
    assert isinstance(model, ScoreSDEModel) and type(model.sde) is VPSDE
    assert model.denoiser.inputs[1].dtype == "float32"  # smooth in t for the ODE
    assert score.sample_kwargs() == {"sampler": "pc", "num_steps": 50}

    ndm = TrainConfig(dataset="checkerboard", model="ndm", prediction_type="v").validate()
    assert ndm.sampling_method == "ddpm"
    model = build_model(ndm, shape)
    assert isinstance(model, NeuralDiffusionModel) and not model.identity_transform
    assert {model.transform_network.name, model.reverse_network.name} == {
        "transform_network", "reverse_network"}
    assert "sampler" not in ndm.sample_kwargs()
    learned = TrainConfig(dataset="checkerboard", model="ndm", prediction_type="x0",
                          variance_type="learned_range").validate()
    model = build_model(learned, shape)
    assert model.transform_network.outputs[0].shape[-1] == 2  # F_phi maps data to data
    assert model.reverse_network.outputs[0].shape[-1] == 4  # prediction, variance values


@pytest.mark.parametrize(("options", "words"), [
    ({"model": "gan"}, ["model='gan'", "ddpm, score_sde, ndm"]),
    ({"model": "ndm"}, ["prediction_type", "x0, v", "'eps'"]),
    ({"model": "ndm", "prediction_type": "x0", "sampler": "ddim"},
     ["sampler='ddim'", "model='ndm'", "auto, ddpm"]),
    ({"model": "score_sde", "sampler": "ddpm"}, ["sampler='ddpm'", "auto, pc, ode"]),
    ({"model": "score_sde", "sde": "ve"}, ["sde='ve'", "vp, subvp, ddpm"]),
    ({"model": "score_sde", "timestep_sampler": "loss_second_moment"}, ["uniform"]),
    ({"model": "score_sde", "min_snr_gamma": 5.0}, ["min_snr_gamma"]),
    ({"model": "score_sde", "variance_type": "learned_range"}, ["variance_type"]),
    ({"model": "ddpm", "sampler": "ode"}, ["sampler='ode'", "ddim, ddpm"]),
])
def test_options_a_model_kind_does_not_take_are_refused_by_name(options, words):
    with pytest.raises(ConfigError) as err:
        TrainConfig(dataset="checkerboard", **options).validate()
    for word in words:
        assert word in str(err.value)


# -- the CLIs, end to end ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_train_resume_sample_evaluate_and_refused_export(kind, tmp_path, monkeypatch, capsys):
    """Train with K-FAC, crash after the first checkpoint and resume: the state equals an
    uninterrupted run's. Then sample and evaluate from the run; exporting is refused."""
    tf.config.experimental.enable_op_determinism()
    args = [*TINY_2D, *KINDS[kind], "--optimizer", "kfac", "--epochs", "2",
            "--steps-per-epoch", "3", "--statistics-every", "2", "--inverse-every", "2"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    code = train_cli.main([*args, "--run-dir", str(straight), "--export-root",
                           str(tmp_path / "exports")])
    assert code == 0, capsys.readouterr().err
    assert "saved_model: not exported" in capsys.readouterr().out
    assert not (tmp_path / "exports").exists()
    with crash_after_first_checkpoint(monkeypatch), pytest.raises(RuntimeError,
                                                                  match="simulated crash"):
        train_cli.main([*args, "--no-export", "--sample-every-epochs", "0",
                        "--run-dir", str(crashed)])
    assert train_cli.main([*args, "--no-export", "--sample-every-epochs", "0",
                           "--run-dir", str(crashed)]) == 0
    (a, a_info), (b, b_info) = _all_state(straight), _all_state(crashed)
    assert a_info["step"] == b_info["step"] == 6 and len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)

    png = tmp_path / "samples.png"
    assert sample_cli.main(["--run-dir", str(straight), "--output", str(png),
                            "--num-samples", "8", "--steps", "3"]) == 0
    assert read_png(png).ndim == 3
    assert sample_cli.main(["--run-dir", str(straight), "--sampler", "ddim"]) == 2
    assert "sampler='ddim'" in capsys.readouterr().err

    out = tmp_path / "eval.json"
    assert evaluate_cli.main(["--run-dir", str(straight), "--num-examples", "8", "--verbose",
                              "0", "--rtol", "1e-3", "--atol", "1e-3", "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["method"] == {"score_sde": "ode", "ndm": "ndm_bound"}[kind]
    assert results["num_examples"] == 8 and np.isfinite(results["bits_per_dim"]["mean"])
    assert len(results["per_example_bits_per_dim"]) == 8
    assert "bits/dim" in capsys.readouterr().out
    assert evaluate_cli.main(["--run-dir", str(straight), "--steps", "4"]) == 2
    assert "--steps" in capsys.readouterr().err

    assert export_cli.main(["--run-dir", str(straight), "--export-root",
                            str(tmp_path / "exports")]) == 2
    assert f"model='{kind}'" in capsys.readouterr().err


# -- the bound and the ODE likelihood of one trained 2-D model ----------------------------------
def test_the_bound_is_not_below_the_ode_likelihood_on_a_trained_2d_model(tmp_path, capsys):
    """The variational bound of the discrete chain and the probability-flow ODE likelihood
    (exact divergence, on the chain's DiscreteDDPMSDE view) of the same trained network,
    per example on the same 256 held-out points: the bound may not be below the ODE
    estimate by more than three standard errors of the paired difference (both are
    Monte-Carlo estimates: one noise draw per KL term for the bound, none for the ODE)."""
    run_dir = tmp_path / "run"
    assert train_cli.main([
        "--dataset", "checkerboard", "--optimizer", "adam", "--hidden-units", "64",
        "--num-blocks", "2", "--num-timesteps", "40", "--sample-steps", "10", "--batch-size",
        "128", "--epochs", "4",
        "--steps-per-epoch", "100", "--warmup-steps", "20", "--sample-every-epochs", "0",
        "--verbose", "0", "--no-export", "--run-dir", str(run_dir)]) == 0
    common = ["--run-dir", str(run_dir), "--num-examples", "256", "--batch-size", "256",
              "--verbose", "0"]
    assert evaluate_cli.main([*common, "--output", str(tmp_path / "bound.json")]) == 0
    assert evaluate_cli.main([*common, "--ode", "--rtol", "1e-4", "--atol", "1e-4",
                              "--output", str(tmp_path / "ode.json")]) == 0
    bound = json.loads((tmp_path / "bound.json").read_text())
    ode = json.loads((tmp_path / "ode.json").read_text())
    assert ode["method"] == "ode" and ode["sde"] == "DiscreteDDPMSDE"
    difference = (np.array(bound["per_example_bits_per_dim"])
                  - np.array(ode["per_example_bits_per_dim"]))
    standard_error = difference.std(ddof=1) / np.sqrt(len(difference))
    assert difference.mean() >= -3 * standard_error, (difference.mean(), standard_error)
    # The ODE likelihood is that of a model that learned the checkerboard: better than the
    # best Gaussian fit to the held-out points (its entropy, ~2.23 nats/dim; the data's own
    # entropy is log(32) / 2 = 1.73). (The 40-step bound itself is loose: ~4.3 nats/dim.)
    held_out = load_dataset("checkerboard", seed=0).eval[:256].astype(np.float64)
    gaussian_entropy = (0.5 * np.log(2 * np.pi * np.e)  # per dimension
                        + 0.25 * np.log(np.linalg.det(np.cov(held_out.T))))
    assert ode["nats_per_dim"]["mean"] < gaussian_entropy, gaussian_entropy

    _, model, _ = runs.load_trained_model(str(run_dir))
    assert model.optimizer.iterations.numpy() == 400
