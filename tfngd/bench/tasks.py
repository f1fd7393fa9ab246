"""Benchmark tasks: what is trained, identically for every optimizer.

A :class:`Task` fixes everything the protocol keeps equal across optimizers:
the data set, the denoiser, the batch size, the diffusion (schedule, loss
weighting, timestep sampler), the EMA and the sampler. Only the optimizer and
its hyperparameters change between trials (:mod:`tfngd.bench.grids`).

A task also carries default step budgets: the tuning horizon (stage 1), the
full horizon (stage 2) and the evaluation interval; and the number of samples
drawn for the final sample metrics (``num_samples``) and at each evaluation
point of a stage-2 run (``curve_samples``, which gives sample quality at a
matched wall clock).

Learning-rate schedule of a trial (:func:`trial_config`): linear warm-up over
``WARMUP_FRACTION`` of the trial's own horizon, then cosine decay to
``final_lr_fraction`` of the peak exactly at the last step
(``epochs * steps_per_epoch`` = the horizon, ``steps_per_epoch`` = the
evaluation interval), so every run, short or long, ends fully decayed.
"""

from __future__ import annotations

import dataclasses
import math

from tfngd.config import TrainConfig

WARMUP_FRACTION = 0.05
# Fields that define the protocol itself; --set cannot change them (the optimizer and
# its hyperparameters go through the grids, the horizon through --steps/--tune-steps).
PROTOCOL_FIELDS = ("dataset", "optimizer", "seed", "epochs", "steps_per_epoch", "warmup_steps",
                   "jit_compile", "data_dir")

_TOY_CONFIG = {
    "hidden_units": 128,
    "num_blocks": 3,
    "batch_size": 256,
    "ema_decay": 0.995,
    # Ancestral sampling: deterministic DDIM (eta = 0) without x0 clipping blew up on the
    # 2-D MLP (1500 Adam steps: sliced W2 8.9 with 50 DDIM steps, 0.41 with 50 DDPM steps,
    # 0.147 with 200 DDPM steps; real data 0.150).
    "sampler": "ddpm",
    "sample_steps": 100,
    # K-FAC amortisation of the published 2-D run (BENCHMARKS.md): statistics every step on the
    # whole batch, eigh inverses every 10 steps. The MLP's factors are at most 129 x 129, so
    # the per-step curvature work is cheap; the image tasks use the TrainConfig defaults.
    "statistics_every": 1,
    "statistics_examples": None,
    "inverse_every": 10,
    "inverse_method": "eigh",
}


@dataclasses.dataclass(frozen=True)
class Task:
    """One benchmark task (see the module docstring).

    Attributes:
      name: the task name used on the command line.
      dataset: the :mod:`tfngd.data` data set.
      kind: ``"points"`` (2-D data, MLP denoiser) or ``"images"`` (U-Net).
      config: :class:`TrainConfig` overrides shared by every optimizer.
      tune_steps / steps / eval_every: default tuning horizon, full horizon and
        validation interval, in optimizer steps.
      num_samples: EMA samples for the final sample metrics (and the picture).
      curve_samples: samples drawn at each evaluation point of a stage-2 run (0: none).
      bpd_examples: held-out images scored in bits/dim at the end of a stage-2 trial
        (``None``: the whole held-out split; 0: none, e.g. 2-D data, whose density bound
        is not a bits/dim).
      needs_data_dir: the data set is read from ``--data-dir`` (MNIST IDX files).
      description: one line for the report.
    """

    name: str
    dataset: str
    kind: str
    config: dict
    tune_steps: int
    steps: int
    eval_every: int
    num_samples: int
    curve_samples: int
    bpd_examples: int | None = 0
    needs_data_dir: bool = False
    description: str = ""

    @property
    def primary_metric(self) -> str:
        """The sample metric of the goal check: sliced Wasserstein (2-D) or Frechet distance."""
        return "sliced_wasserstein" if self.kind == "points" else "frechet_distance"


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("checkerboard", "checkerboard", "points", dict(_TOY_CONFIG), tune_steps=200,
             steps=1000, eval_every=100, num_samples=1024, curve_samples=1024,
             description="2-D checkerboard (FFJORD), MLP denoiser 3x128, batch 256"),
        Task("8gaussians", "8gaussians", "points", dict(_TOY_CONFIG), tune_steps=200,
             steps=1000, eval_every=100, num_samples=1024, curve_samples=1024,
             description="2-D mixture of 8 Gaussians, MLP denoiser 3x128, batch 256"),
        Task("swissroll", "swissroll", "points", dict(_TOY_CONFIG), tune_steps=200,
             steps=1000, eval_every=100, num_samples=1024, curve_samples=1024,
             description="2-D swiss roll, MLP denoiser 3x128, batch 256"),
        Task("digits", "digits", "images", {"batch_size": 64}, tune_steps=500, steps=3000,
             eval_every=250, num_samples=500, curve_samples=256, bpd_examples=None,
             description="8x8 digits (scikit-learn), default U-Net (32, mults 1,2, attention "
                         "at 4x4), batch 64"),
        Task("mnist", "mnist", "images",
             {"batch_size": 64, "channel_mults": (1, 2, 2), "attention_resolutions": (7,)},
             tune_steps=1000, steps=5000, eval_every=1000, num_samples=1000, curve_samples=200,
             bpd_examples=500, needs_data_dir=True,
             description="28x28 MNIST, U-Net (32, mults 1,2,2, attention at 7x7), batch 64"),
    )
}
TASK_NAMES = tuple(TASKS)


def get_task(name: str) -> Task:
    """The task called ``name``; ``ValueError`` listing the valid names otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from: {', '.join(TASK_NAMES)}")
    return TASKS[name]


def warmup_steps_for(horizon: int) -> int:
    """``ceil(WARMUP_FRACTION * horizon)``, kept below the horizon (0 for a 1-step run)."""
    return min(max(1, math.ceil(WARMUP_FRACTION * horizon)), horizon - 1)


def base_config(task: Task, overrides: dict | None = None, data_dir: str | None = None,
                jit_compile: bool = False) -> TrainConfig:
    """The task's shared configuration (``--set`` overrides applied), before any optimizer."""
    values = {"dataset": task.dataset, **task.config, **(overrides or {})}
    values["data_dir"] = data_dir if task.needs_data_dir else None
    values["jit_compile"] = bool(jit_compile)
    return TrainConfig(**values)


def trial_config(base: TrainConfig, optimizer: str, hyperparameters: dict, seed: int,
                 steps: int, eval_every: int) -> TrainConfig:
    """The validated :class:`TrainConfig` of one trial.

    ``hyperparameters`` (fixed settings and grid values of the optimizer) override
    ``base``; the schedule spans exactly ``steps`` (``epochs = steps / eval_every``,
    ``steps_per_epoch = eval_every``) with a warm-up of :func:`warmup_steps_for`.
    """
    if steps % eval_every:
        raise ValueError(f"the horizon ({steps} steps) must be a multiple of the evaluation "
                         f"interval ({eval_every})")
    config = dataclasses.replace(
        base, optimizer=optimizer, seed=int(seed), epochs=steps // eval_every,
        steps_per_epoch=eval_every, warmup_steps=warmup_steps_for(steps), **hyperparameters)
    return config.validate()
