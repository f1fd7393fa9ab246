"""One benchmark trial, its clock, and the store of finished trials.

A trial is ``(task, optimizer, hyperparameters, seed, horizon)``: a fresh model
(:func:`tfngd.config.build_model`, initial weights from the seed) compiled with
:func:`tfngd.config.build_optimizer` and trained with ``model.fit`` for
``horizon / eval_every`` epochs of ``eval_every`` steps, with the fixed
evaluation bank as ``validation_data``. Recorded:

* the validation curve: the bank loss overall and per quartile of ``t``
  (``val_loss``, ``val_loss_q1`` .. ``val_loss_q4``, EMA weights) at step 0
  (``model.evaluate`` before training) and after every ``eval_every`` steps;
* the **training clock**: each step is timed from ``on_train_batch_begin`` to
  ``on_train_batch_end`` (which waits for the step by reading
  ``optimizer.iterations``). It covers fetching the batch, the train step
  (forward, backward, curvature statistics, inverse refreshes, update, EMA)
  and Keras' per-step bookkeeping; it excludes validation, sampling, metrics
  and epoch-end callbacks. The first step traces and compiles the train
  function, so its measured time is recorded separately
  (``first_step_seconds``) and the clock charges it the trial's median step
  time instead: ``seconds(s) = median + sum_{k=2..s} dt_k``. The same rule holds
  for every optimizer. ``mean_step_seconds`` (the amortised step time) is the
  mean of ``dt_2 .. dt_n``;
* at the end, EMA samples (``num_samples``) with the task's sampler, their
  metrics (:mod:`tfngd.bench.sample_quality`) and a PNG (scatter plot or
  image grid); for stage-2 trials also ``curve_samples`` samples and their
  metrics at every evaluation point (the sample curve);
* for stage-2 trials of image tasks, the held-out likelihood in bits/dim
  (:func:`held_out_bits_per_dim`: the DDPM variational bound of the EMA
  weights on a respaced chain of :attr:`TrialSpec.bpd_chain_steps` steps, by default
  :data:`BPD_CHAIN_STEPS`; the full chain when that is ``T``);
* TensorBoard scalars (:class:`tfngd.callbacks.DiffusionTensorBoard`).

Every random draw is fixed by the trial seed (initial weights, batch order,
timesteps, noise, sampling); the data splits and the evaluation bank are the
same for every trial of a task (:data:`DATA_SEED`, :data:`BANK_SEED`).

:class:`TrialStore` writes each finished trial to its own JSON file at once;
a trial whose file exists is not run again (a corrupt file is rerun with a
warning), so a killed benchmark resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import sys
import time

import numpy as np

from tfngd.config import TrainConfig

# Part of every trial's identity: bump it when something that changes a trial's results
# but is not in its TrainConfig changes (the clock, the metrics, the evaluation bank).
HARNESS_VERSION = 1
DATA_SEED = 0  # toy data generation; image splits are fixed anyway
BANK_SEED = 1  # the (x0, t, noise) evaluation bank
BANK_BATCH = 1000
PNG_IMAGES = 64  # images in a trial's sample grid
# Held-out bits/dim of image trials: the variational bound on a respaced chain of this many
# steps by default (linspace spacing, keeping t = 0 and T - 1; tfngd-bench --bpd-chain-steps
# chooses another, "full" the whole chain), predicted x0 clipped to [-1, 1], the noise of
# each batch from the seed pair (BPD_SEED, batch index).
BPD_CHAIN_STEPS = 100
BPD_SEED = 2
REQUIRED_KEYS = ("trial_id", "task", "optimizer", "hyperparameters", "seed", "steps", "curve",
                 "timing")


@dataclasses.dataclass
class TrialSpec:
    """Everything that defines one trial (its identity is :attr:`trial_id`)."""

    task: str
    optimizer: str
    hyperparameters: dict
    seed: int
    steps: int
    eval_every: int
    stage: str
    num_samples: int
    curve_samples: int
    config: TrainConfig
    bpd_chain_steps: int = BPD_CHAIN_STEPS  # of the held-out bits/dim (stage 2, images)

    @property
    def identity(self) -> dict:
        """What the result depends on (the data directory's location does not count).

        ``bpd_chain_steps`` is part of it only when it is not :data:`BPD_CHAIN_STEPS`, so
        the trials recorded before it could be chosen keep their identity."""
        config = self.config.to_dict()
        config.pop("data_dir", None)
        identity = {"harness_version": HARNESS_VERSION, "config": config,
                    "eval_every": self.eval_every, "num_samples": self.num_samples,
                    "curve_samples": self.curve_samples, "data_seed": DATA_SEED,
                    "bank_seed": BANK_SEED}
        if self.bpd_chain_steps != BPD_CHAIN_STEPS:
            identity["bpd_chain_steps"] = self.bpd_chain_steps
        return identity

    @property
    def trial_id(self) -> str:
        digest = hashlib.sha1(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()
        params = "-".join(f"{_short(k)}{v:g}" if isinstance(v, float) else f"{_short(k)}{v}"
                          for k, v in self.hyperparameters.items())
        return f"{self.optimizer}-{params}-seed{self.seed}-{self.steps}steps-{digest[:8]}"


# TrainConfig options added after trials were first recorded, at the value that reproduces
# what the harness did before they existed (see comparable_identity).
LATER_OPTIONS = {"kfac_approximation": "expand", "model": "ddpm", "sde": "vp",
                 "vlb_weight": 0.001, "precision": "float32", "strategy": "none",
                 "nonfinite_policy": "skip", "cg_iterations": 10, "kernel_points": 64,
                 "fisher_buckets": 1, "fisher_weighting": "loss",
                 "fisher_type": "mc", "kl_clip": 1e-3, "kl_clip_final": None}


def comparable_identity(identity: dict) -> str | None:
    """``identity`` as it compares across versions of TrainConfig: the
    :data:`LATER_OPTIONS` at their neutral value left out and ``sampler`` and
    ``kfac_approximation`` replaced by what was actually used (``"auto"`` resolved), as
    canonical JSON; None if the config cannot be read. Two trials with equal comparable
    identities do the same work, so a finished trial stays valid when an option is added
    (a rerun skips it)."""
    try:
        config = dict(identity["config"])
        resolved = TrainConfig.from_dict({k: v for k, v in config.items() if k != "data_dir"})
        config["sampler"] = resolved.sampling_method
        config["kfac_approximation"] = resolved.kfac_approximation_used
    except (KeyError, TypeError, ValueError):
        return None
    for name, neutral in LATER_OPTIONS.items():
        if config.get(name, neutral) == neutral:  # absent: recorded before the option existed
            config.pop(name, None)
    return json.dumps({**identity, "config": config}, sort_keys=True)


def training_identity(identity: dict) -> dict:
    """``identity`` with the sample counts at zero and no bits/dim chain: what the training
    alone depends on.

    Sampling cannot change a trial's training: every random draw of a training step is
    stateless, seeded by ``(seed, step)`` (:mod:`tfngd.model`), and the samplers take their
    own seed. So a full run with samples holds everything a tuning trial of the same
    configuration, seed and horizon would record (its curve, timing and final loss), and
    answers it."""
    trained = {**identity, "num_samples": 0, "curve_samples": 0}
    trained.pop("bpd_chain_steps", None)
    return trained


def trial_key(optimizer: str, hyperparameters: dict, seed: int, steps: int,
              identity: dict) -> tuple:
    """What a trial is within one benchmark, whatever the TrainConfig defaults of the day:
    used to find a run's trials again after the code's defaults changed."""
    return (optimizer, json.dumps(hyperparameters, sort_keys=True), int(seed), int(steps),
            identity["eval_every"], identity["num_samples"], identity["curve_samples"],
            identity.get("bpd_chain_steps", BPD_CHAIN_STEPS))


def spec_key(spec: TrialSpec) -> tuple:
    return trial_key(spec.optimizer, spec.hyperparameters, spec.seed, spec.steps, spec.identity)


def record_key(record: dict) -> tuple:
    return trial_key(record["optimizer"], record["hyperparameters"], record["seed"],
                     record["steps"], record["identity"])


def _short(name: str) -> str:
    return {"learning_rate": "lr", "weight_decay": "wd", "damping": "damp",
            "kfac_approximation": "approx"}.get(name, name)


def clean_json(value):
    """NaN and infinities become ``None`` (strict JSON); numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def write_json(path: str, data) -> None:
    """Atomic write (temporary file + rename), so a killed process leaves no half file; the
    temporary name is the process's own, so benchmarks run side by side into one directory
    (one optimizer per core) do not rename each other's files."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(clean_json(data), f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


class TrialStore:
    """One JSON file per finished trial under ``<root>/trials/<task>/<trial_id>.json``."""

    def __init__(self, root: str, warn=None):
        self.root = os.fspath(root)
        self.warn = warn or (lambda message: print(message, file=sys.stderr))

    def path(self, spec: TrialSpec) -> str:
        return os.path.join(self.root, "trials", spec.task, f"{spec.trial_id}.json")

    def load(self, spec: TrialSpec) -> dict | None:
        """The finished trial, or ``None`` (missing; corrupt files are reported and ignored)."""
        path = self.path(spec)
        if not os.path.exists(path):
            return self._equivalent(spec)
        try:
            with open(path) as f:
                record = json.load(f)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            missing = [key for key in REQUIRED_KEYS if key not in record]
            if missing:
                raise ValueError(f"missing {', '.join(missing)}")
            if record["trial_id"] != spec.trial_id:
                raise ValueError(f"holds trial {record['trial_id']}")
        except (OSError, ValueError) as err:  # json.JSONDecodeError is a ValueError
            self.warn(f"warning: {path} is corrupt ({' '.join(str(err).split())}); "
                      "the trial is run again")
            return None
        return record

    def _equivalent(self, spec: TrialSpec) -> dict | None:
        """A finished trial that did the same work, or None: one recorded under an older
        TrainConfig (:func:`comparable_identity`), and for a trial that draws no samples (a
        tuning trial) also one that trained identically but drew samples too
        (:func:`training_identity`)."""
        wanted = comparable_identity(spec.identity)
        draws_samples = bool(spec.num_samples or spec.curve_samples)
        for record in self.records_of(spec.task).values():
            identity = record.get("identity")
            if not identity or record.get("optimizer") != spec.optimizer:
                continue
            if not draws_samples:  # a sample-free identity is its own training identity
                identity = training_identity(identity)
            if comparable_identity(identity) == wanted:
                return record
        return None

    def records_of(self, task: str, trial_ids=None) -> dict:
        """``{record_key: record}`` of the task's trial files (those in ``trial_ids`` when
        given; with duplicates, the newest)."""
        directory = os.path.join(self.root, "trials", task)
        if trial_ids is None:
            names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
            trial_ids = [name[:-5] for name in names if name.endswith(".json")]
        found = {}
        for trial_id in trial_ids:
            try:
                with open(os.path.join(directory, f"{trial_id}.json")) as f:
                    record = json.load(f)
                key = record_key(record)
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if key not in found or record.get("finished_at", "") > found[key].get(
                    "finished_at", ""):
                found[key] = record
        return found

    def save(self, record: dict) -> str:
        path = os.path.join(self.root, "trials", record["task"], f"{record['trial_id']}.json")
        write_json(path, record)
        return path


# -- running a trial -------------------------------------------------------------------------


def _to_float(value) -> float:
    import tensorflow as tf

    return float(tf.convert_to_tensor(value).numpy())


def _iterations(model) -> int:
    import tensorflow as tf

    return int(tf.convert_to_tensor(model.optimizer.iterations).numpy())


def _make_recorder():
    import keras

    class TrialRecorder(keras.callbacks.Callback):
        """Per-step training time, the validation logs of every epoch, and sample curves."""

        def __init__(self, sample_fn=None):
            super().__init__()
            self.sample_fn = sample_fn
            self.step_seconds: list[float] = []
            self.evaluations: list[dict] = []
            self.sample_points: list[dict] = []
            self.eval_seconds = 0.0
            self._start = None
            self._epoch_end = None

        def on_train_batch_begin(self, batch, logs=None):
            self._start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            _iterations(self.model)  # waits for the step
            self.step_seconds.append(time.perf_counter() - self._start)
            self._epoch_end = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            if self._epoch_end is not None:  # validation ran between the last step and now
                self.eval_seconds += time.perf_counter() - self._epoch_end
            step = _iterations(self.model)
            row = {"step": step, "train_loss": _to_float(logs["loss"]) if "loss" in logs
                   else None}
            for key, value in logs.items():
                if key.startswith("val_"):
                    row[key] = _to_float(value)
            self.evaluations.append(row)
            if self.sample_fn is not None:
                self.sample_points.append({"step": step, **self.sample_fn()})

    return TrialRecorder


class TaskContext:
    """What every trial of one task shares: data splits, evaluation bank, sample evaluator."""

    def __init__(self, task, data_dir: str | None = None, num_train: int | None = None):
        from tfngd import data as data_lib

        self.task = task
        self.splits = data_lib.load_dataset(task.dataset, data_dir=data_dir, num_train=num_train,
                                            seed=DATA_SEED)
        self.bank = None
        self._evaluator = None

    def evaluation_bank(self, num_timesteps: int):
        from tfngd import data as data_lib

        return data_lib.evaluation_bank(self.splits.eval, num_timesteps, seed=BANK_SEED,
                                        batch_size=BANK_BATCH)

    @property
    def evaluator(self):
        if self._evaluator is None:
            from tfngd.bench.sample_quality import SampleEvaluator

            self._evaluator = SampleEvaluator(self.task.kind, self.splits.eval,
                                              dataset=self.task.dataset, train=self.splits.train)
        return self._evaluator


def _loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _inverse_schedule(optimizer) -> dict | None:
    names = ("inverse_every", "inverse_warmup_steps", "statistics_every")
    if all(hasattr(optimizer, name) for name in names):
        return {name: int(getattr(optimizer, name)) for name in names}
    return None


def _optimizer_diagnostics(optimizer) -> dict:
    diagnostics = getattr(optimizer, "diagnostics", None)
    if not callable(diagnostics):
        return {}
    return {name: _to_float(value) for name, value in diagnostics().items()
            if name.count("/") == 1}  # global scalars only, not the per-block ones


def _save_samples_png(path: str, samples: np.ndarray, kind: str) -> str:
    from tfngd import images

    picture = images.scatter_image(samples) if kind == "points" else \
        images.samples_to_image(samples[:PNG_IMAGES])
    return images.save_png(path, picture)


def held_out_bits_per_dim(model, images: np.ndarray, chain_steps: int = BPD_CHAIN_STEPS,
                          seed: int = BPD_SEED, batch_size: int = BANK_BATCH) -> dict:
    """The DDPM variational bound of ``model``'s EMA weights on ``images``, in bits/dim.

    :func:`tfngd.likelihood.make_variational_bound` on the ``chain_steps``-step respaced
    chain (the full chain when ``T <= chain_steps``; :func:`tfngd.schedules.respaced_timesteps`,
    ``"linspace"``: it keeps ``t = 0`` for the discretised decoder and ``t = T - 1`` for the
    prior term), with the predicted
    ``x0`` clipped to ``[-1, 1]``. The respaced chain is a diffusion with the same
    marginals, so this is a valid bound on ``-log2 p(x0) / D``, looser than the full
    chain's; it compares models of one task, not with published full-chain numbers. The
    noise is fixed (``seed``), so every trial is scored on the same draws.

    Returns ``{"bits_per_dim", "ci95_low", "ci95_high"}`` (mean and Student-t interval
    over examples), ``num_examples``, ``chain_steps``, ``num_timesteps`` (``T``: the chain
    is the full one when they are equal), ``seconds``.
    """
    from tfngd import likelihood, metrics, schedules

    started = time.perf_counter()
    num_timesteps = model.diffusion.num_timesteps
    timesteps = schedules.respaced_timesteps(num_timesteps, min(chain_steps, num_timesteps),
                                             "linspace").numpy()
    bound = likelihood.make_variational_bound(model.unconditional_network_fn(), model.diffusion,
                                              timesteps, clip_x0=True, discrete=True)
    values = [outputs["bits_per_dim"].numpy() for _, _, outputs
              in likelihood.bound_in_batches(bound, images, batch_size, seed)]
    values = np.concatenate(values).astype(np.float64)
    mean, low, high = metrics.mean_confidence_interval(values, 0.95)
    return {"bits_per_dim": mean, "ci95_low": low, "ci95_high": high,
            "num_examples": int(len(values)), "chain_steps": int(len(timesteps)),
            "num_timesteps": int(num_timesteps), "seconds": time.perf_counter() - started}


def run_trial(spec: TrialSpec, context: TaskContext, output_dir: str) -> dict:
    """Train, evaluate and sample one trial; returns its record (not yet saved)."""
    import keras

    from tfngd import callbacks as callbacks_lib
    from tfngd import data as data_lib
    from tfngd import nonfinite
    from tfngd.config import build_model, build_optimizer

    started = time.perf_counter()
    load_start = _loadavg()
    config = spec.config
    splits = context.splits
    kind = context.task.kind
    keras.backend.clear_session()
    model = build_model(config, splits.data_shape, splits.num_classes)
    model.compile(optimizer=build_optimizer(config), jit_compile=config.jit_compile)
    bank = context.evaluation_bank(config.num_timesteps)
    train_ds = data_lib.training_batches(splits.train, config.batch_size, config.seed)
    sample_kwargs = config.sample_kwargs()
    sample_seconds = 0.0

    def draw(count: int) -> np.ndarray:
        nonlocal sample_seconds
        start = time.perf_counter()
        samples = model.sample(count, seed=config.seed, **sample_kwargs).numpy()
        sample_seconds += time.perf_counter() - start
        return samples

    def sample_point() -> dict:
        values, _ = context.evaluator(draw(spec.curve_samples))
        return values

    recorder = _make_recorder()(sample_point if spec.curve_samples else None)
    log_dir = os.path.join(output_dir, "tensorboard", spec.task, spec.trial_id)
    fit_callbacks = [
        recorder,  # first: its batch timer closes before the other callbacks' batch hooks run
        # A diverged trial ends at its first non-finite step (which is not applied).
        nonfinite.NonFiniteGuard("stop", terminate=True),
        callbacks_lib.DiffusionTensorBoard(log_dir, sample_every_epochs=0,
                                           batch_size=config.batch_size),
    ]

    eval_start = time.perf_counter()
    initial = model.evaluate(bank, verbose=0, return_dict=True)
    initial_eval_seconds = time.perf_counter() - eval_start
    initial_samples = sample_point() if spec.curve_samples else None
    model.fit(train_ds, epochs=config.epochs, steps_per_epoch=config.steps_per_epoch,
              validation_data=bank, callbacks=fit_callbacks, shuffle=False, verbose=0)

    # The clock: the first step (tracing, compilation) is charged the median step time.
    measured = np.asarray(recorder.step_seconds, dtype=np.float64)
    rest = measured[1:]
    first_charge = float(np.median(rest)) if rest.size else float(measured[0])
    elapsed = np.concatenate([[0.0], first_charge + np.concatenate([[0.0], np.cumsum(rest)])])
    steps_done = len(measured)

    def seconds_at(step: int) -> float:
        return float(elapsed[min(step, steps_done)])

    curve = {"step": [0], "seconds": [0.0], "train_loss": [None],
             "val_loss": [_to_float(initial["loss"])]}
    for q in range(1, 5):
        curve[f"val_loss_q{q}"] = [_to_float(initial[f"loss_q{q}"])]
    for row in recorder.evaluations:
        curve["step"].append(row["step"])
        curve["seconds"].append(seconds_at(row["step"]))
        curve["train_loss"].append(row["train_loss"])
        curve["val_loss"].append(row.get("val_loss"))
        for q in range(1, 5):
            curve[f"val_loss_q{q}"].append(row.get(f"val_loss_q{q}"))
    final_loss = curve["val_loss"][-1]
    diverged = steps_done < spec.steps or final_loss is None or not math.isfinite(final_loss)

    sample_curve = None
    if spec.curve_samples:
        points = [{"step": 0, **initial_samples}] + recorder.sample_points
        sample_curve = {"step": [p["step"] for p in points],
                        "seconds": [seconds_at(p["step"]) for p in points]}
        for name in sorted({k for p in points for k in p} - {"step"}):
            sample_curve[name] = [p.get(name) for p in points]

    samples_entry = None
    if spec.num_samples:
        samples = draw(spec.num_samples)
        values, skipped = context.evaluator(samples)
        png = os.path.join("samples", spec.task, f"{spec.trial_id}.png")
        _save_samples_png(os.path.join(output_dir, png), samples, kind)
        samples_entry = {"num_samples": spec.num_samples, "metrics": values, "skipped": skipped,
                         "png": png}

    likelihood_entry = None
    if spec.num_samples and kind == "images" and context.task.bpd_examples != 0:
        held_out = splits.eval[:context.task.bpd_examples]  # None: the whole split
        likelihood_entry = held_out_bits_per_dim(model, held_out, spec.bpd_chain_steps)

    record = {
        "trial_id": spec.trial_id,
        "task": spec.task,
        "optimizer": spec.optimizer,
        "hyperparameters": spec.hyperparameters,
        "seed": spec.seed,
        "steps": spec.steps,
        "eval_every": spec.eval_every,
        "stage": spec.stage,
        "config": config.to_dict(),
        "identity": spec.identity,
        "steps_done": steps_done,
        "diverged": diverged,
        "curve": curve,
        "sample_curve": sample_curve,
        "samples": samples_entry,
        "likelihood": likelihood_entry,
        "timing": {
            "convention": "training steps only; first step charged the median step time",
            "first_step_seconds": float(measured[0]) if steps_done else None,
            "first_step_charge": first_charge,
            "train_seconds": float(elapsed[-1]),
            "mean_step_seconds": float(rest.mean()) if rest.size else None,
            "median_step_seconds": float(np.median(rest)) if rest.size else None,
            "step_seconds": [round(float(s), 6) for s in measured],
            "eval_seconds": initial_eval_seconds + recorder.eval_seconds,
            "sample_seconds": sample_seconds,
            "trial_wall_seconds": time.perf_counter() - started,
            "loadavg_start": load_start,
            "loadavg_end": _loadavg(),
        },
        "inverse_schedule": _inverse_schedule(model.optimizer),
        "optimizer_diagnostics": _optimizer_diagnostics(model.optimizer),
        "params": int(model.denoiser.count_params()),
        "tensorboard": os.path.relpath(log_dir, output_dir),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
    }
    return clean_json(record)
