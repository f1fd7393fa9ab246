"""The command-line entry points, end to end on tiny models, and resume after a crash."""

import contextlib
import os

import numpy as np
import pytest
import tensorflow as tf

from tfngd import checkpointing, runs
from trainers import export as export_cli
from trainers import sample as sample_cli
from trainers import train as train_cli

TINY = [
    "--optimizer", "adam", "--base-channels", "8", "--groups", "4", "--num-timesteps", "50",
    "--sample-steps", "5",
    "--num-samples", "4", "--warmup-steps", "1", "--verbose", "0", "--num-train", "256",
    "--batch-size", "16", "--sample-every-epochs", "1",
]


def read_png(path):
    return tf.io.decode_png(tf.io.read_file(str(path))).numpy()


@contextlib.contextmanager
def crash_after_first_checkpoint(monkeypatch):
    """Within the block, training raises right after writing its first checkpoint."""
    original = checkpointing.CheckpointCallback.on_epoch_end

    def crash(self, epoch, logs=None):
        original(self, epoch, logs)
        if epoch == 0:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(checkpointing.CheckpointCallback, "on_epoch_end", crash)
    try:
        yield
    finally:
        monkeypatch.setattr(checkpointing.CheckpointCallback, "on_epoch_end", original)


def test_train_sample_export_end_to_end(tmp_path, capsys):
    run_dir, export_root = tmp_path / "run", tmp_path / "saved_models"
    code = train_cli.main([*TINY, "--epochs", "2", "--steps-per-epoch", "3",
                           "--run-dir", str(run_dir), "--export-root", str(export_root)])
    assert code == 0, capsys.readouterr().err
    grid = read_png(run_dir / "samples.png")
    assert grid.ndim == 3 and grid.shape[0] >= 16 and grid.dtype == np.uint8
    assert checkpointing.latest_checkpoint(runs.checkpoint_dir(str(run_dir)))["epoch"] == 2
    assert any(name.startswith("events") for _, _, files in os.walk(run_dir / "logs")
               for name in files)
    assert (export_root / "digits" / "1" / "saved_model.pb").exists()

    out = tmp_path / "from_run.png"
    assert sample_cli.main(["--run-dir", str(run_dir), "--output", str(out),
                            "--num-samples", "9", "--steps", "3"]) == 0
    assert read_png(out).shape[0] >= 3 * 8  # a 3x3 grid of 8x8 digits
    out2 = tmp_path / "from_saved_model.png"
    assert sample_cli.main(["--saved-model", str(export_root / "digits" / "1"), "--output",
                            str(out2), "--num-samples", "4", "--steps", "3"]) == 0
    assert read_png(out2).ndim == 3

    assert export_cli.main(["--run-dir", str(run_dir), "--export-root", str(export_root)]) == 0
    assert (export_root / "digits" / "2" / "saved_model.pb").exists()

    # A finished run re-run with the same options resumes, trains nothing, and succeeds.
    assert train_cli.main([*TINY, "--epochs", "2", "--steps-per-epoch", "3", "--no-export",
                           "--run-dir", str(run_dir)]) == 0
    assert "resuming" in capsys.readouterr().out


def _all_state(run_dir):
    _, model, info = runs.load_trained_model(str(run_dir))
    state = [v.numpy() for v in model.weights] + [v.numpy() for v in model.optimizer.variables]
    return state, info


def test_resume_after_a_crash_matches_the_uninterrupted_run(tmp_path, monkeypatch):
    tf.config.experimental.enable_op_determinism()
    args = [*TINY, "--epochs", "3", "--steps-per-epoch", "2", "--no-export",
            "--sample-every-epochs", "0", "--timestep-sampler", "loss_second_moment"]
    assert train_cli.main([*args, "--run-dir", str(tmp_path / "straight")]) == 0

    with crash_after_first_checkpoint(monkeypatch), pytest.raises(RuntimeError,
                                                                  match="simulated crash"):
        train_cli.main([*args, "--run-dir", str(tmp_path / "crashed")])
    assert train_cli.main([*args, "--run-dir", str(tmp_path / "crashed")]) == 0

    straight, straight_info = _all_state(tmp_path / "straight")
    resumed, resumed_info = _all_state(tmp_path / "crashed")
    assert straight_info["step"] == resumed_info["step"] == 6
    assert len(straight) == len(resumed)
    for a, b in zip(straight, resumed, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--epochs", "0"], ["epochs=0", "[1, 1000000]"]),
        (["--dataset", "imagenet"], ["dataset='imagenet'", "digits", "mnist"]),
        (["--batch-size", "300", "--num-train", "100"], ["batch_size=300", "100 training"]),
        (["--learning-rate", "nan"], ["learning_rate"]),
        (["--dataset", "mnist", "--data-dir", "/nonexistent"], ["/nonexistent"]),
    ],
)
def test_bad_input_fails_before_any_work_with_one_line(tmp_path, capsys, argv, words):
    run_dir = tmp_path / "run"
    assert train_cli.main([*argv, "--run-dir", str(run_dir), "--no-export"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("tfngd-train: error:")
    for word in words:
        assert word in err
    assert not run_dir.exists()


def test_a_run_directory_refuses_a_different_config(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train_cli.main([*TINY, "--epochs", "1", "--steps-per-epoch", "2", "--no-export",
                           "--sample-every-epochs", "0", "--run-dir", str(run_dir)]) == 0
    assert train_cli.main([*TINY, "--epochs", "1", "--steps-per-epoch", "2", "--no-export",
                           "--learning-rate", "0.1", "--run-dir", str(run_dir)]) == 2
    assert "changed: learning_rate" in capsys.readouterr().err


def test_sample_cli_reports_missing_inputs(tmp_path, capsys):
    assert sample_cli.main(["--run-dir", str(tmp_path)]) == 2
    assert "not a training run directory" in capsys.readouterr().err
    assert sample_cli.main(["--saved-model", str(tmp_path)]) == 2
    assert "saved_model.pb" in capsys.readouterr().err


def test_train_cli_with_kfac_trains_exports_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    """``tfngd-train --optimizer kfac`` end to end (2-D data, MLP denoiser): the curvature
    state is checkpointed, and a run that crashed after its first epoch resumes to the same
    weights, EMA weights and optimizer state (factors, inverses, momentum) as a straight run."""
    tf.config.experimental.enable_op_determinism()
    args = ["--dataset", "checkerboard", "--num-train", "512", "--batch-size", "64",
            "--hidden-units", "32", "--num-blocks", "1", "--num-timesteps", "50",
            "--optimizer", "kfac", "--learning-rate", "0.05", "--damping", "0.01",
            "--statistics-every", "2", "--inverse-every", "3", "--epochs", "3",
            "--steps-per-epoch", "4", "--warmup-steps", "1", "--sample-steps", "5",
            "--num-samples", "64", "--sample-every-epochs", "0", "--verbose", "0"]
    export_root = tmp_path / "saved_models"
    assert train_cli.main([*args, "--run-dir", str(tmp_path / "straight"),
                           "--export-root", str(export_root)]) == 0, capsys.readouterr().err
    assert (export_root / "checkerboard" / "1" / "saved_model.pb").exists()
    assert read_png(tmp_path / "straight" / "samples.png").ndim == 3

    with crash_after_first_checkpoint(monkeypatch), pytest.raises(RuntimeError,
                                                                  match="simulated crash"):
        train_cli.main([*args, "--no-export", "--run-dir", str(tmp_path / "crashed")])
    assert train_cli.main([*args, "--no-export", "--run-dir", str(tmp_path / "crashed")]) == 0

    _, model, info = runs.load_trained_model(str(tmp_path / "straight"))
    kfac = model.optimizer
    assert type(kfac).__name__ == "KFAC" and info["step"] == 12
    assert int(kfac.skipped_updates.numpy()) == 0
    assert all(np.any(block.running_statistics[0].numpy() != 0) for block in kfac.blocks)
    straight, _ = _all_state(tmp_path / "straight")
    resumed, _ = _all_state(tmp_path / "crashed")
    assert len(straight) == len(resumed)
    for a, b in zip(straight, resumed, strict=True):
        np.testing.assert_array_equal(a, b)
