"""``tfngd-bench``: the optimizer benchmark of ``docs/benchmark-protocol.md``.

One concept per module (import them directly; this package imports nothing eagerly):

* :mod:`~tfngd.bench.tasks`: the benchmark tasks (data set, model, batch size,
  loss weighting, EMA, sampler: the same for every optimizer) and their default
  step budgets; :func:`~tfngd.bench.tasks.trial_config` builds the
  :class:`~tfngd.config.TrainConfig` of one trial.
* :mod:`~tfngd.bench.grids`: the tuning grids (the same number of trials for
  every optimizer), the fixed per-optimizer settings and the ``--grid`` syntax.
* :mod:`~tfngd.bench.trials`: one trial (task, optimizer, hyperparameters,
  seed, horizon) trained with ``model.fit``, its step clock, validation curve
  and sample metrics; :class:`~tfngd.bench.trials.TrialStore` keeps one JSON
  file per finished trial so that a killed benchmark resumes.
* :mod:`~tfngd.bench.sample_quality`: sample metrics against held-out data
  (sliced Wasserstein, energy distance, RBF-MMD for 2-D; Frechet distance and
  KID in a classifier's feature space for images).
* :mod:`~tfngd.bench.protocol`: the two stages (tune on a short horizon with
  seed 0, then the best configuration per optimizer on the full horizon for
  several seeds), planning and best-configuration selection.
* :mod:`~tfngd.bench.analysis`: the maths of the comparison (target, steps and
  seconds to target, values at matched steps and seconds, t intervals, the
  goal check of the natural-gradient optimizers).
* :mod:`~tfngd.bench.report`: ``results.json``, ``REPORT.md`` and its plots.
* :mod:`~tfngd.bench.benchmark`: the driver that runs the stages, prints one
  progress line per trial and renders the report.
"""

__all__ = ["analysis", "benchmark", "grids", "protocol", "report", "sample_quality", "tasks",
           "trials"]
