"""Grids, settings, trial identity, the store, planning, resume and the report (no training:
a fake trial runner produces synthetic records)."""

import json
import os

import numpy as np
import pytest

from tfngd.bench import benchmark, grids, protocol, tasks, trials
from tfngd.bench.trials import TrialStore, write_json
from tfngd.config import OPTIMIZERS, TrainConfig, learning_rate_schedule


def test_every_optimizer_gets_an_equal_default_grid():
    for kind in ("images", "points"):
        sizes = {opt: len(grids.grid_points(opt, kind=kind)) for opt in OPTIMIZERS}
        assert set(sizes.values()) == {4}, (kind, sizes)
        assert all(p["weight_decay"] == 0.01 for p in grids.grid_points("adamw", kind=kind))
    kfac = grids.grid_points("kfac")
    assert {(p["learning_rate"], p["damping"]) for p in kfac} == {
        (0.03, 1e-3), (0.03, 1e-2), (0.1, 1e-3), (0.1, 1e-2)}
    assert [p["learning_rate"] for p in grids.grid_points("adam", kind="points")] == [
        1e-3, 2e-3, 4e-3, 8e-3]


def test_a_new_optimizer_name_gets_the_learning_rate_grid(monkeypatch):
    monkeypatch.setattr(grids, "OPTIMIZERS", (*OPTIMIZERS, "dual_ngd"))
    points = grids.grid_points("dual_ngd")
    assert [p["learning_rate"] for p in points] == list(grids.DEFAULT_NGD_GRID["learning_rate"])
    assert not grids.is_first_order("dual_ngd")
    with pytest.raises(ValueError, match="choose from"):
        grids.grid_points("lbfgs")


def test_parse_grid_spec():
    assert grids.parse_grid_spec("adam:learning_rate=1e-3,2e-3") == (
        "adam", "learning_rate", (1e-3, 2e-3))
    assert grids.parse_grid_spec("sgd=0.1") == ("sgd", "learning_rate", (0.1,))
    assert grids.parse_grid_spec("kfac:inverse_every=5,20") == ("kfac", "inverse_every", (5, 20))
    assert grids.parse_grid_spec("kfac:kfac_approximation=expand,per_example") == (
        "kfac", "kfac_approximation", ("expand", "per_example"))
    overrides = grids.grid_overrides(["kfac=0.1", "kfac:damping=1e-2"])
    assert grids.grid_points("kfac", overrides["kfac"]) == [
        {"learning_rate": 0.1, "damping": 1e-2}]
    for bad, message in (("adam", "expected"), ("rmsprop=1e-3", "choose from"),
                         ("adam:batch_size=32", "not a tunable"), ("adam=fast", "cannot read"),
                         ("adam=1e-3,1e-3", "repeated"), ("adam=", "no values"),
                         ("adam=nan", "finite"),
                         ("kfac:kfac_approximation=pooled", "choose one of: auto, expand")):
        with pytest.raises(ValueError, match=message):
            grids.parse_grid_spec(bad)


def test_parse_override():
    assert protocol.parse_override("hidden_units=32") == ("hidden_units", 32)
    assert protocol.parse_override("min_snr_gamma=none") == ("min_snr_gamma", None)
    assert protocol.parse_override("min_snr_gamma=5") == ("min_snr_gamma", 5.0)
    assert protocol.parse_override("channel_mults=1,2,2") == ("channel_mults", (1, 2, 2))
    assert protocol.parse_override("clip_x0=false") == ("clip_x0", False)
    assert protocol.parse_override("sampler=ddpm") == ("sampler", "ddpm")
    for bad, message in (("hidden_units", "KEY=VALUE"), ("widgets=3", "unknown"),
                         ("optimizer=sgd", "fixed by the protocol"),
                         ("learning_rate=0.1", "--grid"), ("hidden_units=wide", "cannot read")):
        with pytest.raises(ValueError, match=message):
            protocol.parse_override(bad)


def test_trial_schedule_is_fully_decayed_at_the_trial_horizon():
    task = tasks.get_task("checkerboard")
    base = tasks.base_config(task)
    for steps, eval_every in ((300, 150), (1500, 150), (20, 10)):
        config = tasks.trial_config(base, "adam", {"learning_rate": 2e-3}, 0, steps, eval_every)
        assert config.total_steps == steps and config.steps_per_epoch == eval_every
        assert config.warmup_steps == tasks.warmup_steps_for(steps) == int(np.ceil(0.05 * steps))
        schedule = learning_rate_schedule(config)
        assert float(schedule(config.warmup_steps)) == pytest.approx(2e-3)
        assert float(schedule(steps)) == pytest.approx(2e-3 * config.final_lr_fraction)
    with pytest.raises(ValueError, match="multiple"):
        tasks.trial_config(base, "adam", {}, 0, 100, 30)


def test_settings_validation_messages():
    def check(message, **values):
        with pytest.raises(ValueError, match=message):
            protocol.BenchSettings(**values).validate()

    check("unknown task 'moon'.*checkerboard", tasks=("moon",))
    check("unknown optimizer 'rmsprop'.*adam, adamw, sgd, kfac", optimizers=("rmsprop",))
    check("--steps must be a positive integer", steps=0)
    check("--seeds must be a positive integer", seeds=-1)
    check("--eval-every 500 is larger than --tune-steps 200", eval_every=500, steps=1500)
    check("--steps 1000 is not a multiple of --eval-every 300", tune_steps=300, steps=1000,
          eval_every=300)
    check("--grid for 'kfac'", optimizers=("adam",), grids={"kfac": {"damping": (1e-3,)}})
    check("task checkerboard: batch_size", config_overrides={"batch_size": 0})
    for chain in (1, 0, "half", True, 2.5):
        check(r"--bpd-chain-steps must be an integer >= 2 \(the chain keeps t = 0 and T - 1\) "
              "or 'full'", bpd_chain_steps=chain)
    settings = protocol.BenchSettings(tasks=("checkerboard", "digits"), steps=600, eval_every=100)
    assert settings.validate().horizons(tasks.get_task("digits")) == (500, 600, 100)
    assert protocol.BenchSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) \
        == settings


def small_settings(**changes):
    values = dict(tasks=("checkerboard",), optimizers=("adam", "kfac"), seeds=2, tune_steps=20,
                  steps=40, eval_every=10, grids={"adam": {"learning_rate": (1e-3, 2e-3)},
                                                  "kfac": {"learning_rate": (0.05, 0.1),
                                                           "damping": (1e-3,)}},
                  config_overrides={"hidden_units": 16})
    values.update(changes)
    return protocol.BenchSettings(**values).validate()


def test_trial_identity():
    settings = small_settings()
    a = protocol.tuning_specs(settings, "checkerboard")
    b = protocol.tuning_specs(small_settings(data_dir="/elsewhere"), "checkerboard")
    assert [s.trial_id for s in a] == [s.trial_id for s in b]  # the data path does not count
    assert len({s.trial_id for s in a}) == 4
    assert a[0].trial_id.startswith("adam-lr0.001-seed0-20steps-")
    c = protocol.tuning_specs(small_settings(config_overrides={"hidden_units": 32}),
                              "checkerboard")
    assert a[0].trial_id != c[0].trial_id  # a different model is a different trial
    final = protocol.final_specs(settings, "checkerboard", "adam", {"learning_rate": 1e-3})
    assert [s.seed for s in final] == [0, 1]
    assert final[0].num_samples == tasks.get_task("checkerboard").num_samples
    assert a[0].num_samples == 0 and a[0].curve_samples == 0


def test_the_bits_per_dim_chain_is_part_of_the_identity_of_the_trials_that_score_it_only():
    """A chosen chain changes the finals of image tasks (they score bits/dim) and nothing
    else: tuning trials, 2-D finals and the default keep the identity trials had before the
    option existed, and a full-chain final trains like (answers) its 100-step twin's
    tuning trial."""
    def specs(**changes):
        settings = small_settings(tasks=("checkerboard", "digits"), tune_steps=20, steps=20,
                                  seeds=1, **changes)
        point = {"learning_rate": 1e-3}
        return {name: (protocol.tuning_specs(settings, name, ["adam"])[0],
                       protocol.final_specs(settings, name, "adam", point)[0])
                for name in ("checkerboard", "digits")}

    default, full, twelve = specs(), specs(bpd_chain_steps="full"), specs(bpd_chain_steps=12)
    t = TrainConfig().num_timesteps  # the digits task's T (1000)
    assert default["digits"][1].bpd_chain_steps == trials.BPD_CHAIN_STEPS
    assert "bpd_chain_steps" not in default["digits"][1].identity  # ids recorded before stay
    assert full["digits"][1].bpd_chain_steps == t == full["digits"][1].identity["bpd_chain_steps"]
    assert twelve["digits"][1].bpd_chain_steps == 12
    assert len({run["digits"][1].trial_id for run in (default, full, twelve)}) == 3
    for run in (full, twelve):  # what does not score bits/dim is the same trial
        assert run["digits"][0].trial_id == default["digits"][0].trial_id
        assert [s.trial_id for s in run["checkerboard"]] == \
            [s.trial_id for s in default["checkerboard"]]
    assert trials.training_identity(full["digits"][1].identity) == \
        trials.training_identity(default["digits"][1].identity)
    assert trials.spec_key(full["digits"][1]) != trials.spec_key(default["digits"][1])
    # "full" is T whatever T is, and a longer chain than T is capped at it.
    short = specs(bpd_chain_steps=5000, config_overrides={"hidden_units": 16,
                                                          "num_timesteps": 200})
    assert short["digits"][1].bpd_chain_steps == 200
    assert short["digits"][1].trial_id == specs(
        bpd_chain_steps="full", config_overrides={"hidden_units": 16, "num_timesteps": 200}
    )["digits"][1].trial_id


# -- a fake trial runner: synthetic curves, instant ----------------------------------------------


def fake_record(spec):
    """Loss decays to a floor that depends on the optimizer, its learning rate and the seed."""
    lr = spec.hyperparameters["learning_rate"]
    floor = {"adam": 0.5, "kfac": 0.4}[spec.optimizer] + (0.0 if lr in (2e-3, 0.1) else 0.05)
    floor += 0.01 * spec.seed
    steps = list(range(0, spec.steps + 1, spec.eval_every))
    ms = {"adam": 10.0, "kfac": 15.0}[spec.optimizer]
    losses = [floor + (1.0 - floor) * np.exp(-s / (5.0 if spec.optimizer == "kfac" else 15.0))
              for s in steps]
    curve = {"step": steps, "seconds": [s * ms / 1e3 for s in steps], "val_loss": losses,
             "train_loss": [None] + losses[1:]}
    for q in range(1, 5):
        curve[f"val_loss_q{q}"] = [v * q / 2.5 for v in losses]
    record = {"trial_id": spec.trial_id, "task": spec.task, "optimizer": spec.optimizer,
              "hyperparameters": spec.hyperparameters, "seed": spec.seed, "steps": spec.steps,
              "stage": spec.stage, "curve": curve, "diverged": False,
              "timing": {"train_seconds": curve["seconds"][-1], "first_step_seconds": 2.0,
                         "mean_step_seconds": ms / 1e3,
                         "step_seconds": [2.0] + [ms / 1e3] * (spec.steps - 1),
                         "trial_wall_seconds": 1.0},
              "inverse_schedule": None, "sample_curve": None, "samples": None,
              "identity": spec.identity}
    if spec.num_samples:
        record["samples"] = {"metrics": {"sliced_wasserstein": floor}, "skipped": None,
                             "png": None}
        record["sample_curve"] = {"step": steps, "seconds": curve["seconds"],
                                  "sliced_wasserstein": losses}
    return record


class CountingRunner:
    def __init__(self):
        self.calls = []

    def __call__(self, spec):
        self.calls.append(spec.trial_id)
        return fake_record(spec)


def test_benchmark_runs_resumes_and_reruns_corrupt_trials(tmp_path):
    settings = small_settings()
    lines = []
    runner = CountingRunner()
    results = benchmark.run_benchmark(settings, str(tmp_path), "tfngd-bench --test",
                                      progress=lines.append, trial_runner=runner)
    assert len(runner.calls) == 4 + 2 * 2  # 4 tuning trials, 2 optimizers x 2 seeds
    assert len(lines) == 9 and lines[0].startswith("[1/8] checkerboard adam lr=0.001 seed=0")
    assert lines[-1].startswith("report:")
    # The best tuning configuration goes on: lr 2e-3 (Adam) and 0.1 (K-FAC).
    entry = results["tasks"]["checkerboard"]
    assert entry["selection"]["adam"]["hyperparameters"] == {"learning_rate": 2e-3}
    assert entry["selection"]["kfac"]["hyperparameters"] == {"learning_rate": 0.1,
                                                             "damping": 1e-3}
    assert entry["selection"]["adam"]["at_edge"] == ["learning_rate"]
    # Stage 2 runs seed-major.
    finals = [line for line in lines if "(final)" in line]
    assert [(" adam " in line, "seed=0" in line) for line in finals] == [
        (True, True), (False, True), (True, False), (False, False)]
    analysis = entry["analysis"]
    assert analysis["target"]["optimizer"] == "adam"
    assert analysis["target"]["value"] == pytest.approx(
        np.mean([fake_record(s)["curve"]["val_loss"][-1] for s in protocol.final_specs(
            settings, "checkerboard", "adam", {"learning_rate": 2e-3})]))
    assert set(analysis["goal"]) == {"kfac"}
    report = (tmp_path / "REPORT.md").read_text()
    assert "tfngd-bench --test" in report and "## checkerboard" in report
    assert "| kfac |" in report and "Goal check" in report
    for name in ("loss_vs_steps", "loss_vs_seconds", "quartiles", "sample_metric_vs_seconds"):
        assert (tmp_path / "plots" / f"checkerboard_{name}.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["tasks"]["checkerboard"]["trials"]) == 8

    # A rerun trains nothing.
    rerun = CountingRunner()
    lines.clear()
    benchmark.run_benchmark(settings, str(tmp_path), "tfngd-bench --test", progress=lines.append,
                            trial_runner=rerun)
    assert rerun.calls == [] and sum("skipped" in line for line in lines) == 8

    # A corrupt (e.g. half-written) trial file is run again, with a warning.
    store = TrialStore(str(tmp_path))
    victim = protocol.tuning_specs(settings, "checkerboard")[1]
    with open(store.path(victim), "w") as f:
        f.write('{"trial_id": ')
    lines.clear()
    benchmark.run_benchmark(settings, str(tmp_path), "tfngd-bench --test", progress=lines.append,
                            trial_runner=rerun, render=False)
    assert rerun.calls == [victim.trial_id]
    assert any(line.startswith("warning:") and "corrupt" in line for line in lines)
    assert store.load(victim)["trial_id"] == victim.trial_id


def test_report_of_a_partial_benchmark(tmp_path):
    settings = small_settings()
    runner = CountingRunner()
    benchmark.run_benchmark(settings, str(tmp_path), "cmd", progress=lambda _: None,
                            trial_runner=runner, render=False)
    # Remove the K-FAC tuning trial files: K-FAC has no selection and no stage 2.
    for spec in protocol.tuning_specs(settings, "checkerboard", ["kfac"]):
        os.remove(TrialStore(str(tmp_path)).path(spec))
    from tfngd.bench.report import render_report

    results = render_report(str(tmp_path))
    entry = results["tasks"]["checkerboard"]
    assert entry["selection"]["kfac"] == {"complete": False}
    assert set(entry["analysis"]["per_optimizer"]) == {"adam"}
    assert "not run" in (tmp_path / "REPORT.md").read_text()


def test_single_point_grids_skip_stage_one(tmp_path):
    settings = small_settings(grids={"adam": {"learning_rate": (2e-3,)},
                                     "kfac": {"learning_rate": (0.1,), "damping": (1e-3,)}},
                              seeds=1)
    runner = CountingRunner()
    lines = []
    benchmark.run_benchmark(settings, str(tmp_path), "cmd", progress=lines.append,
                            trial_runner=runner)
    assert len(runner.calls) == 2 and lines[0].startswith("[1/2]")
    assert "stage 1 skipped" in (tmp_path / "REPORT.md").read_text()


def test_unequal_budgets_warn(tmp_path):
    settings = small_settings(grids={"adam": {"learning_rate": (2e-3,)}}, seeds=1)
    lines = []
    benchmark.run_benchmark(settings, str(tmp_path), "cmd", progress=lines.append,
                            trial_runner=CountingRunner(), render=False)
    assert lines[0].startswith("warning: unequal tuning budgets")


@pytest.mark.parametrize("name", tasks.TASK_NAMES)
def test_every_task_samples_with_a_sampler_its_model_takes(name):
    """A task's trials sample with ``config.sample_kwargs()``: ``sampler="auto"`` must be
    resolved (the DDPM samplers know no "auto"), ancestral for the 2-D toys."""
    from tfngd import samplers

    config = tasks.base_config(tasks.get_task(name), data_dir="unused").validate()
    kwargs = config.sample_kwargs()
    assert kwargs["sampler"] in samplers.SAMPLERS
    assert kwargs["num_steps"] == config.sample_steps
    if tasks.get_task(name).kind == "points":
        assert kwargs["sampler"] == "ddpm"


def test_trials_recorded_before_an_option_existed_are_reused_real_changes_are_not(tmp_path):
    """Rewrite every trial file as an older TrainConfig would have written it (no `model`,
    `sde`, `vlb_weight`, `kfac_approximation`; the sampler named explicitly, as it resolves):
    a rerun trains nothing and reports the old ids. A real change (other EMA decay) reruns."""
    from tfngd.bench.trials import LATER_OPTIONS

    settings = small_settings()
    benchmark.run_benchmark(settings, str(tmp_path), "tfngd-bench --test", progress=print,
                            trial_runner=CountingRunner(), render=False)
    for path in (tmp_path / "trials" / "checkerboard").glob("*.json"):
        record = json.loads(path.read_text())
        config = record["identity"]["config"]
        config["sampler"] = "ddpm"  # what "auto" (or the task's own choice) resolves to
        for name in LATER_OPTIONS:
            config.pop(name)
        record["trial_id"] = "old-" + record["trial_id"]
        path.unlink()
        (path.parent / f"{record['trial_id']}.json").write_text(json.dumps(record))
    lines, rerun = [], CountingRunner()
    benchmark.run_benchmark(settings, str(tmp_path), "tfngd-bench --test",
                            progress=lines.append, trial_runner=rerun, render=False)
    assert rerun.calls == [] and sum("skipped" in line for line in lines) == 8
    bench = json.loads((tmp_path / "benchmark.json").read_text())
    assert all(i.startswith("old-") for i in bench["trial_ids"]["checkerboard"])

    changed = small_settings(config_overrides={"hidden_units": 16, "ema_decay": 0.9})
    benchmark.run_benchmark(changed, str(tmp_path), "tfngd-bench --test", progress=print,
                            trial_runner=rerun, render=False)
    assert len(rerun.calls) == 8


def test_a_full_run_answers_the_tuning_trial_that_trained_the_same_but_not_conversely(
        tmp_path):
    """Tuning on the full horizon: the stage-2 trial of seed 0 trained exactly like the
    tuning trial of the same point (samples do not touch training), so a benchmark that
    finds it does not train that point again; a tuning trial never stands in for a full run
    (it has no samples), and one on another horizon answers nothing."""
    full_horizon = dict(tune_steps=40, steps=40, seeds=2)
    finals_only = small_settings(**full_horizon, grids={
        "adam": {"learning_rate": (2e-3,)}, "kfac": {"learning_rate": (0.1,),
                                                      "damping": (1e-3,)}})
    benchmark.run_benchmark(finals_only, str(tmp_path), "cmd", progress=lambda _: None,
                            trial_runner=CountingRunner(), render=False)

    settings = small_settings(**full_horizon)
    runner = CountingRunner()
    lines = []
    results = benchmark.run_benchmark(settings, str(tmp_path), "cmd", progress=lines.append,
                                      trial_runner=runner)
    tuning = {(spec.optimizer, spec.hyperparameters["learning_rate"]): spec
              for spec in protocol.tuning_specs(settings, "checkerboard")}
    assert sorted(runner.calls) == sorted([tuning["adam", 1e-3].trial_id,
                                           tuning["kfac", 0.05].trial_id])
    rows = {(row["optimizer"], row["hyperparameters"]["learning_rate"]): row
            for row in results["tasks"]["checkerboard"]["tuning"]}
    assert rows["adam", 2e-3]["from_full_run"] and not rows["adam", 1e-3]["from_full_run"]
    assert rows["adam", 2e-3]["trial_id"] != tuning["adam", 2e-3].trial_id
    assert "(its full run's training)" in (tmp_path / "REPORT.md").read_text()

    fresh = CountingRunner()
    benchmark.run_benchmark(settings, str(tmp_path / "fresh"), "cmd", progress=lambda _: None,
                            trial_runner=fresh, render=False)
    assert len(fresh.calls) == 4 + 2 * 2  # stage 2 runs although its tuning twins exist

    short = CountingRunner()
    benchmark.run_benchmark(small_settings(seeds=2), str(tmp_path), "cmd",
                            progress=lambda _: None, trial_runner=short, render=False)
    # The 20-step tuning trials run; the 40-step finals are those of the first benchmark.
    assert len(short.calls) == 4 and all("-20steps-" in call for call in short.calls)


def _rewrite(path, writer, times):
    for i in range(times):
        write_json(path, {"writer": writer, "i": i, "payload": list(range(200))})


def test_benchmarks_side_by_side_do_not_corrupt_a_shared_json_file(tmp_path):
    """Two processes (one optimizer per core, into one output directory) rewrite the same
    benchmark.json: every write is atomic, none fails, and the file always parses."""
    import multiprocessing

    path = str(tmp_path / "benchmark.json")
    context = multiprocessing.get_context("fork")  # the children only write JSON
    workers = [context.Process(target=_rewrite, args=(path, writer, 200)) for writer in (0, 1)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [worker.exitcode for worker in workers] == [0, 0]
    record = json.loads(open(path).read())
    assert record["i"] == 199 and record["payload"] == list(range(200))
    assert os.listdir(tmp_path) == ["benchmark.json"]
