"""``tfngd-bench`` end to end on a tiny MLP, resume without retraining, ``--report-only``,
and the one-line errors for bad input."""

import json
import os

import numpy as np
import pytest

from trainers import bench

TINY = [
    "--tasks", "checkerboard", "--optimizers", "adam", "kfac", "--seeds", "1",
    "--steps", "20", "--eval-every", "10",
    "--grid", "adam=2e-3", "--grid", "kfac:learning_rate=0.1", "--grid", "kfac:damping=1e-3",
    "--set", "hidden_units=16", "--set", "num_blocks=1", "--set", "num_timesteps=100",
    "--set", "sample_steps=5", "--num-samples", "64", "--curve-samples", "64",
    "--set", "sampler=auto",  # resolved per task (ancestral for 2-D), never passed on as "auto"
]


def trial_files(output):
    root = output / "trials" / "checkerboard"
    return sorted(root.glob("*.json")) if root.exists() else []


def test_end_to_end_resume_and_report_only(tmp_path, capsys):
    output = tmp_path / "bench"
    args = [*TINY, "--output", str(output)]
    assert bench.main(args) == 0, capsys.readouterr().err
    lines = capsys.readouterr().out.splitlines()
    progress = [line for line in lines if line.startswith("[")]
    assert len(progress) == 2 and all("final val loss" in line for line in progress)
    assert progress[0].startswith("[1/2] checkerboard adam lr=0.002 seed=0 steps=20 (final)")

    files = trial_files(output)
    assert len(files) == 2
    records = {(r["optimizer"], r["seed"]): r for r in (json.loads(f.read_text()) for f in files)}
    kfac = records[("kfac", 0)]
    assert kfac["curve"]["step"] == [0, 10, 20]
    seconds = kfac["curve"]["seconds"]
    assert seconds[0] == 0 and seconds[1] < seconds[2]
    timing = kfac["timing"]
    assert len(timing["step_seconds"]) == 20 and timing["first_step_seconds"] > 0
    # The clock charges the first step the median step time, not its tracing time.
    rest = np.asarray(timing["step_seconds"][1:])
    assert timing["train_seconds"] == pytest.approx(np.median(rest) + rest.sum(), abs=1e-4)
    assert all(np.isfinite(kfac["curve"][f"val_loss_q{q}"][-1]) for q in range(1, 5))
    assert kfac["inverse_schedule"]["inverse_every"] == kfac["config"]["inverse_every"]
    assert kfac["optimizer_diagnostics"]["kfac/inverse_refreshes"] >= 1
    assert records[("adam", 0)]["inverse_schedule"] is None
    samples = kfac["samples"]
    assert set(samples["metrics"]) == {"sliced_wasserstein", "energy_distance", "rbf_mmd"}
    assert (output / samples["png"]).exists()
    assert kfac["sample_curve"]["step"] == [0, 10, 20]
    events = [name for _, _, names in os.walk(output / kfac["tensorboard"]) for name in names]
    assert any(name.startswith("events") for name in events)

    results = json.loads((output / "results.json").read_text())
    assert results["benchmark"]["environment"]["cpu_count"] == os.cpu_count()
    assert results["benchmark"]["command"].startswith("tfngd-bench --tasks checkerboard")
    entry = results["tasks"]["checkerboard"]
    assert set(entry["analysis"]["per_optimizer"]) == {"adam", "kfac"}
    assert entry["analysis"]["target"]["optimizer"] == "adam"
    report = (output / "REPORT.md").read_text()
    assert "## checkerboard" in report and "stage 1 skipped" in report
    plots = {k: v for k, v in entry["plots"].items()}
    for key in ("loss_vs_steps", "loss_vs_seconds", "quartiles", "samples",
                "sample_metric_vs_seconds"):
        assert plots[key] and (output / plots[key]).stat().st_size > 1000, key
        assert f"]({plots[key]})" in report

    # Rerunning the same command trains nothing: every trial is skipped, no file changes.
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    assert bench.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum("skipped" in line for line in lines) == 2
    assert {f: f.stat().st_mtime_ns for f in trial_files(output)} == mtimes

    # --report-only renders again from the JSON files.
    os.remove(output / "REPORT.md")
    os.remove(output / plots["loss_vs_steps"])
    assert bench.main(["--report-only", "--output", str(output)]) == 0
    assert (output / "REPORT.md").read_text().startswith("# Optimizer benchmark report")
    assert (output / plots["loss_vs_steps"]).exists()
    assert {f: f.stat().st_mtime_ns for f in trial_files(output)} == mtimes


@pytest.mark.parametrize("args, message", [
    (["--tasks", "moon"], "unknown task 'moon'; choose from: checkerboard, 8gaussians, "
                          "swissroll, digits, mnist"),
    (["--optimizers", "adam", "rmsprop"], "unknown optimizer 'rmsprop'; choose from: adam, "
                                          "adamw, sgd, kfac"),
    (["--steps", "0"], "--steps must be positive, got 0"),
    (["--seeds", "three"], "--seeds must be an integer"),
    (["--steps", "100", "--eval-every", "500"], "--eval-every 500 is larger than"),
    (["--steps", "1000", "--tune-steps", "300", "--eval-every", "300"], "not a multiple"),
    (["--grid", "adam:momentum=fast"], "cannot read 'fast'"),
    (["--grid", "adam:batch_size=3"], "not a tunable"),
    (["--set", "optimizer=sgd"], "fixed by the protocol"),
    (["--set", "hidden_units=0"], "hidden_units=0 is not valid"),
    (["--bpd-chain-steps", "1"], "--bpd-chain-steps must be >= 2, got 1"),
    (["--bpd-chain-steps", "all"], "--bpd-chain-steps must be an integer, got 'all'"),
    (["--tasks", "mnist", "--data-dir", "/nonexistent/mnist"], "--data-dir /nonexistent/mnist "
                                                              "does not exist"),
])
def test_bad_input_fails_with_one_line_before_any_work(tmp_path, capsys, args, message):
    output = tmp_path / "out"
    assert bench.main([*args, "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tfngd-bench: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not output.exists()


def test_report_only_without_a_benchmark(tmp_path, capsys):
    assert bench.main(["--report-only", "--output", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "no benchmark.json" in err and err.count("\n") == 1
