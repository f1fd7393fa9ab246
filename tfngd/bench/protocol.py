"""The two-stage protocol: what runs, and which configuration goes on.

Stage 1 (tuning): every point of each optimizer's grid
(:mod:`tfngd.bench.grids`, the same number of points for every optimizer),
trained once on the task's short horizon with seed ``tune_seed`` (0). The
best configuration of each optimizer is the one with the lowest final
validation loss on the fixed bank (non-finite losses never win; ties go to the
first grid point). A one-point grid leaves nothing to choose: its stage-1 run
is skipped.

Stage 2 (full runs): each optimizer's best configuration on the full horizon
for seeds ``0 .. seeds - 1``, with the final sample metrics and the sample
curve, run seed-major (seed 0 of every optimizer, then seed 1, ...) so that a
change in the machine's load hits every optimizer alike.

:class:`BenchSettings` holds the command line; :func:`tuning_specs` and
:func:`final_specs` turn it into :class:`~tfngd.bench.trials.TrialSpec`
objects, and :func:`plan_task` walks both stages over a store of finished
trials (used for running and for ``--report-only`` alike).
"""

from __future__ import annotations

import dataclasses
import typing

from tfngd.bench import analysis, grids, tasks
from tfngd.bench.trials import BPD_CHAIN_STEPS, TrialSpec
from tfngd.config import ConfigError, TrainConfig


@dataclasses.dataclass
class BenchSettings:
    """A benchmark invocation. ``None`` horizons and sample counts mean the task's defaults."""

    tasks: tuple[str, ...] = ("checkerboard", "8gaussians", "swissroll")
    optimizers: tuple[str, ...] = ("adam", "adamw", "sgd", "kfac")
    seeds: int = 3
    tune_steps: int | None = None
    steps: int | None = None
    eval_every: int | None = None
    grids: dict = dataclasses.field(default_factory=dict)  # {optimizer: {param: values}}
    config_overrides: dict = dataclasses.field(default_factory=dict)
    num_samples: int | None = None
    curve_samples: int | None = None
    tune_seed: int = 0
    data_dir: str | None = None
    jit: bool = False
    # Steps of the chain of the held-out bits/dim (stage 2, image tasks): None means
    # trials.BPD_CHAIN_STEPS, "full" the task's whole chain (T); capped at T.
    bpd_chain_steps: int | str | None = None

    def horizons(self, task: tasks.Task) -> tuple[int, int, int]:
        """``(tune_steps, steps, eval_every)`` of ``task`` under these settings."""
        return (self.tune_steps or task.tune_steps, self.steps or task.steps,
                self.eval_every or task.eval_every)

    def validate(self) -> BenchSettings:
        """Raise ``ValueError`` (one line, naming the option) for the first invalid setting."""
        if not self.tasks:
            raise ValueError("--tasks: give at least one task")
        for name in self.tasks:
            tasks.get_task(name)
        if not self.optimizers:
            raise ValueError("--optimizers: give at least one optimizer")
        for name in self.optimizers:
            grids.check_optimizer(name)
        for option, value in (("--seeds", self.seeds), ("--tune-steps", self.tune_steps),
                              ("--steps", self.steps), ("--eval-every", self.eval_every),
                              ("--num-samples", self.num_samples)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{option} must be a positive integer, got {value!r}")
        if self.bpd_chain_steps is not None and self.bpd_chain_steps != "full" and (
                isinstance(self.bpd_chain_steps, bool) or not isinstance(self.bpd_chain_steps, int)
                or self.bpd_chain_steps < 2):
            raise ValueError("--bpd-chain-steps must be an integer >= 2 (the chain keeps t = 0 "
                             f"and T - 1) or 'full', got {self.bpd_chain_steps!r}")
        if self.curve_samples is not None and self.curve_samples < 0:
            raise ValueError(f"--curve-samples must be >= 0, got {self.curve_samples}")
        for optimizer in self.grids:
            if optimizer not in self.optimizers:
                raise ValueError(f"--grid for {optimizer!r}, which is not among --optimizers "
                                 f"({', '.join(self.optimizers)})")
        for key in self.config_overrides:
            check_override_key(key)
        for name in self.tasks:
            task = tasks.get_task(name)
            tune_steps, steps, eval_every = self.horizons(task)
            for option, horizon in (("--tune-steps", tune_steps), ("--steps", steps)):
                if eval_every > horizon:
                    raise ValueError(f"--eval-every {eval_every} is larger than {option} "
                                     f"{horizon} (task {name})")
                if horizon % eval_every:
                    raise ValueError(f"{option} {horizon} is not a multiple of --eval-every "
                                     f"{eval_every} (task {name})")
            try:  # every trial's configuration must validate before any work starts
                for spec in tuning_specs(self, name):
                    spec.config.validate()
            except ConfigError as err:
                raise ValueError(f"task {name}: {err}") from err
        return self

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["grids"] = {opt: {k: list(v) for k, v in params.items()}
                           for opt, params in self.grids.items()}
        return values

    @classmethod
    def from_dict(cls, values: dict) -> BenchSettings:
        values = dict(values)
        values["tasks"] = tuple(values.get("tasks", ()))
        values["optimizers"] = tuple(values.get("optimizers", ()))
        values["grids"] = {opt: {k: tuple(v) for k, v in params.items()}
                           for opt, params in (values.get("grids") or {}).items()}
        overrides = dict(values.get("config_overrides") or {})
        for key in ("channel_mults", "attention_resolutions"):
            if key in overrides and overrides[key] is not None:
                overrides[key] = tuple(overrides[key])
        values["config_overrides"] = overrides
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def check_override_key(key: str) -> str:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if key not in fields:
        raise ValueError(f"--set {key}: unknown TrainConfig option")
    if key in tasks.PROTOCOL_FIELDS:
        raise ValueError(f"--set {key}: fixed by the protocol (use --tasks, --steps, "
                         "--tune-steps, --eval-every, --data-dir, --jit)")
    if key in grids.TUNABLE:
        raise ValueError(f"--set {key}: an optimizer hyperparameter; tune it with --grid "
                         f"OPT:{key}=v1,v2")
    return key


def parse_override(text: str) -> tuple[str, object]:
    """``"KEY=VALUE"`` -> ``(key, typed value)`` for ``--set`` (TrainConfig field types)."""
    if "=" not in text:
        raise ValueError(f"--set {text!r}: expected KEY=VALUE (e.g. hidden_units=32)")
    key, _, raw = (part.strip() for part in text.partition("="))
    check_override_key(key)
    hint = typing.get_type_hints(TrainConfig)[key]
    try:
        if hint is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return key, raw.lower() in ("true", "1", "yes")
        if hint == tuple[int, ...]:
            return key, tuple(int(p) for p in raw.split(",") if p.strip())
        if raw.lower() in ("none", "off") and type(None) in typing.get_args(hint):
            return key, None
        base = next((t for t in (int, float, str) if hint is t or t in typing.get_args(hint)),
                    str)
        return key, base(raw)
    except ValueError as err:
        raise ValueError(f"--set {text!r}: cannot read {raw!r} for {key}") from err


# -- planning ----------------------------------------------------------------------------------


def _spec(settings: BenchSettings, task: tasks.Task, optimizer: str, hyperparameters: dict,
          seed: int, steps: int, eval_every: int, stage: str) -> TrialSpec:
    base = tasks.base_config(task, settings.config_overrides, settings.data_dir, settings.jit)
    config = tasks.trial_config(base, optimizer, hyperparameters, seed, steps, eval_every)
    final = stage == "final"
    num_samples = (settings.num_samples or task.num_samples) if final else 0
    curve_samples = task.curve_samples if settings.curve_samples is None \
        else settings.curve_samples
    return TrialSpec(task=task.name, optimizer=optimizer, hyperparameters=dict(hyperparameters),
                     seed=seed, steps=steps, eval_every=eval_every, stage=stage,
                     num_samples=num_samples, curve_samples=curve_samples if final else 0,
                     config=config, bpd_chain_steps=_bpd_chain_steps(settings, task, config,
                                                                     final))


def _bpd_chain_steps(settings: BenchSettings, task: tasks.Task, config: TrainConfig,
                     final: bool) -> int:
    """The chain of a trial's held-out bits/dim: the chosen one, capped at ``T``, where the
    trial scores bits/dim (stage 2 of an image task), the default elsewhere (so the choice
    leaves the identity of every other trial alone)."""
    if not (final and task.kind == "images" and task.bpd_examples != 0):
        return BPD_CHAIN_STEPS
    wanted = settings.bpd_chain_steps
    if wanted is None:
        wanted = BPD_CHAIN_STEPS
    return config.num_timesteps if wanted == "full" else min(wanted, config.num_timesteps)


def tuning_specs(settings: BenchSettings, task_name: str,
                 optimizers=None) -> list[TrialSpec]:
    """Stage 1: one trial per grid point of every optimizer (seed ``tune_seed``)."""
    task = tasks.get_task(task_name)
    tune_steps, _, eval_every = settings.horizons(task)
    return [_spec(settings, task, opt, point, settings.tune_seed, tune_steps, eval_every, "tune")
            for opt in (optimizers or settings.optimizers)
            for point in grids.grid_points(opt, settings.grids.get(opt), task.kind)]


def final_specs(settings: BenchSettings, task_name: str, optimizer: str,
                hyperparameters: dict) -> list[TrialSpec]:
    """Stage 2: the chosen configuration on the full horizon, seeds ``0 .. seeds - 1``."""
    task = tasks.get_task(task_name)
    _, steps, eval_every = settings.horizons(task)
    return [_spec(settings, task, optimizer, hyperparameters, seed, steps, eval_every, "final")
            for seed in range(settings.seeds)]


def choose(records: list[dict | None]) -> int | None:
    """Index of the best tuning record (lowest final validation loss; see the module doc)."""
    losses = []
    for record in records:
        loss = None
        if record is not None and not record.get("diverged"):
            loss = analysis.final_value(record)
        losses.append(loss)
    return analysis.select_best(losses)


def plan_task(settings: BenchSettings, task_name: str, get_record) -> dict:
    """Walk both stages of one task, getting each trial's record with ``get_record(spec)``.

    ``get_record`` runs (or loads) the trial and returns its record, or ``None`` when
    the record is not available (``--report-only`` on an unfinished benchmark): a
    missing tuning record leaves that optimizer's stage 2 out.
    Returns ``{"tuning": {opt: [(spec, record)]}, "selection": {opt: {...}},
    "finals": {opt: [(spec, record)]}}``.
    """
    result = {"tuning": {}, "selection": {}, "finals": {}}
    for optimizer in settings.optimizers:
        specs = tuning_specs(settings, task_name, [optimizer])
        if len(specs) == 1:  # nothing to choose: stage 1 is skipped
            result["tuning"][optimizer] = [(specs[0], None)]
            result["selection"][optimizer] = {
                "complete": True, "index": 0, "hyperparameters": specs[0].hyperparameters,
                "tune_loss": None, "at_edge": [], "single_point": True}
            continue
        records = [get_record(spec) for spec in specs]
        result["tuning"][optimizer] = list(zip(specs, records, strict=True))
        if any(r is None for r in records):
            result["selection"][optimizer] = {"complete": False}
            continue
        best = choose(records)
        if best is None:
            result["selection"][optimizer] = {"complete": True, "index": None}
            continue
        chosen = specs[best].hyperparameters
        grid = grids.grid_for(optimizer, settings.grids.get(optimizer),
                              tasks.get_task(task_name).kind)
        result["selection"][optimizer] = {
            "complete": True, "index": best, "hyperparameters": chosen,
            "tune_loss": analysis.final_value(records[best]),
            "at_edge": analysis.best_at_edge(grid, chosen)}
    # Seed-major order (seed 0 of every optimizer, then seed 1, ...): a change in the
    # machine's load during the benchmark then hits every optimizer alike.
    chosen = {opt: final_specs(settings, task_name, opt, sel["hyperparameters"])
              for opt, sel in result["selection"].items() if sel.get("hyperparameters")}
    for optimizer in chosen:
        result["finals"][optimizer] = []
    for seed in range(settings.seeds):
        for optimizer, specs in chosen.items():
            result["finals"][optimizer].append((specs[seed], get_record(specs[seed])))
    return result
