"""The benchmark driver: run both stages of every task, resume, and render the report.

:func:`run_benchmark` writes ``<output>/benchmark.json`` (settings, command
line, environment), then walks :func:`tfngd.bench.protocol.plan_task` for
every task: a trial whose JSON file exists is loaded, any other is trained
(:func:`tfngd.bench.trials.run_trial`) and written at once. One progress line
per trial. At the end it renders ``results.json`` and ``REPORT.md``
(:func:`tfngd.bench.report.render_report`), which ``--report-only`` does alone.
"""

from __future__ import annotations

import datetime
import json
import os
import platform

from tfngd.bench import grids, protocol, tasks
from tfngd.bench.trials import TaskContext, TrialStore, run_trial, write_json

BENCH_FILE = "benchmark.json"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def environment() -> dict:
    """Library versions, machine and load: what the wall-clock numbers depend on."""
    import importlib.metadata

    versions = {}
    for package in ("tensorflow", "keras", "numpy", "scipy", "matplotlib"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        load = None
    return {"python": platform.python_version(), "platform": platform.platform(),
            "machine": platform.machine(), "processor": platform.processor() or None,
            "cpu_count": os.cpu_count(), "versions": versions, "loadavg": load}


def read_benchmark(output: str) -> dict:
    path = os.path.join(output, BENCH_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {BENCH_FILE} in {output}: run tfngd-bench with this "
                                "--output first")
    with open(path) as f:
        return json.load(f)


def _describe(spec) -> str:
    return (f"{spec.task} {spec.optimizer} {grids.format_hyperparameters(spec.hyperparameters)} "
            f"seed={spec.seed} steps={spec.steps} ({spec.stage})")


def _fmt(value, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


class DefaultTrialRunner:
    """Runs trials for real, preparing each task's shared data once (and its data floor)."""

    def __init__(self, settings: protocol.BenchSettings, output: str):
        self.settings = settings
        self.output = output
        self.contexts: dict[str, TaskContext] = {}

    def context(self, spec) -> TaskContext:
        if spec.task not in self.contexts:
            task = tasks.get_task(spec.task)
            context = TaskContext(task, data_dir=spec.config.data_dir,
                                  num_train=spec.config.num_train)
            self.contexts[spec.task] = context
        return self.contexts[spec.task]

    def write_floor(self, spec, context: TaskContext) -> None:
        """The metrics of real data at the final and curve sample counts, and a picture."""
        path = os.path.join(self.output, "floors", f"{spec.task}.json")
        if os.path.exists(path) or not spec.num_samples:
            return
        from tfngd.bench.trials import _save_samples_png

        evaluator = context.evaluator
        floor = {"num_samples": spec.num_samples, "curve_samples": spec.curve_samples}
        floor["metrics"], floor["skipped"] = evaluator.data_floor(spec.num_samples)
        if spec.curve_samples:
            floor["curve_metrics"], _ = evaluator.data_floor(spec.curve_samples)
        count = min(spec.num_samples, len(context.splits.eval))
        _save_samples_png(os.path.join(self.output, "samples", spec.task, "data.png"),
                          context.splits.eval[:count], context.task.kind)
        write_json(path, floor)

    def __call__(self, spec) -> dict:
        context = self.context(spec)
        self.write_floor(spec, context)
        return run_trial(spec, context, self.output)


def run_benchmark(settings: protocol.BenchSettings, output: str, command: str,
                  progress=print, trial_runner=None, render: bool = True) -> dict | None:
    """Run (or resume) the benchmark described by ``settings`` into ``output``.

    ``trial_runner(spec) -> record`` trains one trial (default: :class:`DefaultTrialRunner`);
    returns the rendered results (``render``) or ``None``.
    """
    settings.validate()
    os.makedirs(output, exist_ok=True)
    previous = {}
    if os.path.isfile(os.path.join(output, BENCH_FILE)):
        previous = read_benchmark(output)
    history = list(previous.get("history", []))
    history.append({"command": command, "started_at": _now()})
    bench = {"settings": settings.to_dict(), "command": command, "environment": environment(),
             "started_at": _now(), "history": history}
    write_json(os.path.join(output, BENCH_FILE), bench)

    for name in settings.tasks:
        budget = grids.budgets(settings.optimizers, settings.grids, tasks.get_task(name).kind)
        if len(set(budget.values())) > 1:
            progress(f"warning: unequal tuning budgets on {name} (the protocol wants the same "
                     f"number of trials per optimizer): {budget}")
    store = TrialStore(output, warn=progress)
    runner = trial_runner or DefaultTrialRunner(settings, output)
    total = sum(len(specs) for name in settings.tasks for opt in settings.optimizers
                if len(specs := protocol.tuning_specs(settings, name, [opt])) > 1) \
        + len(settings.tasks) * len(settings.optimizers) * settings.seeds
    count = 0

    bench["trial_ids"] = {name: [] for name in settings.tasks}

    def remember(spec, record) -> None:
        """The run's trial files (the record's id: an equivalent trial recorded under an
        older TrainConfig keeps its own), so that --report-only finds them even after the
        code's TrainConfig defaults (part of every trial's identity) changed."""
        if record["trial_id"] not in bench["trial_ids"][spec.task]:
            bench["trial_ids"][spec.task].append(record["trial_id"])
            write_json(os.path.join(output, BENCH_FILE), bench)

    def get_record(spec):
        nonlocal count
        count += 1
        prefix = f"[{count}/{total}] {_describe(spec)}"
        record = store.load(spec)
        if record is not None:
            remember(spec, record)
            progress(f"{prefix}: done before (final val loss "
                     f"{_fmt(record['curve']['val_loss'][-1])}), skipped")
            return record
        record = runner(spec)
        store.save(record)
        remember(spec, record)
        timing = record["timing"]
        ms = timing.get("mean_step_seconds")
        status = " DIVERGED" if record.get("diverged") else ""
        progress(f"{prefix}: final val loss {_fmt(record['curve']['val_loss'][-1])}{status}, "
                 f"train {timing['train_seconds']:.1f} s "
                 f"({_fmt(None if ms is None else 1e3 * ms, '.1f')} ms/step), "
                 f"trial {timing['trial_wall_seconds']:.1f} s")
        return record

    for name in settings.tasks:
        protocol.plan_task(settings, name, get_record)
    bench["finished_at"] = _now()
    bench["environment_end"] = environment()
    write_json(os.path.join(output, BENCH_FILE), bench)
    if not render:
        return None
    from tfngd.bench.report import render_report

    return render_report(output, progress=progress)
