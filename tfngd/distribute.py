"""Data parallelism with ``tf.distribute`` for the project's own train steps.

Under ``tf.distribute.MirroredStrategy`` (the GPUs of one machine) or
``MultiWorkerMirroredStrategy`` (several machines), Keras' ``fit`` runs each
model's ``train_step`` once per replica, on that replica's slice of the global
batch. The train steps of :class:`tfngd.model.DiffusionModel`,
:class:`tfngd.ndm.NeuralDiffusionModel`, :class:`tfngd.sde.ScoreSDEModel` and
:class:`tfngd.optimizers.NaturalGradientModel` use this module so that a run on
``R`` replicas does what one device does with the same global batches:

* **Random draws** (timesteps, noise, label dropout, K-FAC's probes) are made
  for the whole global batch from the step's stateless seed, and each replica
  keeps its rows (:func:`rows_of_global_batch`): the draws of a row do not
  depend on the number of replicas.
* **Gradients** are averaged over the replicas before anything reads them
  (:func:`apply_gradients_if_finite`, which also skips a step whose loss or
  gradient is not finite): the gradient-norm metric and Keras' clipping
  (``global_clipnorm``, ``clipnorm``, ``clipvalue``) see the global gradient.
  (Keras 3 itself clips each replica's partial gradient before its all-reduce,
  which is not what one device does.)
* **K-FAC's curvature statistics** are computed on each replica's examples
  and averaged over the replicas (:func:`all_reduce_mean`) before they are
  folded into the factors; the factors, inverses and the update are computed
  once and written to every replica (:func:`run_once`), so every replica
  holds the same state and applies the same update.
* **State that is not the optimizer's** (EMA weights, the timestep sampler's
  loss history) is updated once from the global values (:func:`run_once`,
  :func:`all_gather_rows`).

Every helper is the identity on one device (no strategy, or one replica).
The replicas' batches must have equal sizes (:func:`check_global_batch`).
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from tfngd import nonfinite

STRATEGIES = ("none", "mirrored", "multi_worker")


def make_strategy(name: str) -> tf.distribute.Strategy:
    """The strategy a run's ``strategy`` option names.

    ``"none"``: the default (one device); ``"mirrored"``:
    ``MirroredStrategy`` over every GPU of this machine, or, without GPUs, every
    logical CPU device (:func:`split_cpu`); ``"multi_worker"``:
    ``MultiWorkerMirroredStrategy`` over the cluster that ``TF_CONFIG`` describes
    (every worker runs the same command with its own ``TF_CONFIG``).
    """
    if name == "none":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if tf.config.list_logical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        return tf.distribute.MirroredStrategy(
            [device.name for device in tf.config.list_logical_devices("CPU")])
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"strategy={name!r} is not valid; choose one of: {', '.join(STRATEGIES)}")


def split_cpu(devices: int) -> None:
    """Split the CPU into ``devices`` logical devices (data parallelism without GPUs: tests
    and overhead measurements). Must run before TensorFlow initialises its devices."""
    if devices < 1:
        raise ValueError(f"cpu devices must be >= 1, got {devices}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * devices)
    except RuntimeError as err:
        raise RuntimeError("split_cpu must run before TensorFlow initialises its devices "
                           "(before any op or model is created)") from err


def is_chief(strategy: tf.distribute.Strategy | None = None) -> bool:
    """Whether this process writes checkpoints, logs and exports: always, except for
    the non-chief workers of a multi-worker cluster (worker 0 is the chief when the
    cluster names none)."""
    strategy = strategy or tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return not has_chief and resolver.task_type == "worker" and resolver.task_id == 0


def distribute_batches(strategy: tf.distribute.Strategy, dataset: tf.data.Dataset):
    """A dataset of global batches, split so that replica ``r`` gets rows
    ``[r b, (r + 1) b)`` of every global batch (``b`` = global batch / replicas), as
    :func:`rows_of_global_batch` assumes.

    On one machine Keras' ``fit`` splits the global batches itself, in that order; this
    returns ``dataset`` unchanged. Across workers, ``fit``'s automatic sharding would
    give each worker whole, different batches of a dataset that is not read from
    files: there every worker builds the same global batches
    (``distribute_datasets_from_function``) and keeps the rows of its own replicas.
    """
    if not multi_worker(strategy):
        return dataset

    def worker_batches(context):
        local = context.num_replicas_in_sync // context.num_input_pipelines
        rows = context.get_per_replica_batch_size(  # checks the even split
            _static_batch(dataset) or context.num_replicas_in_sync)
        first = context.input_pipeline_id * local * rows

        def this_workers_replicas(*batch):
            own = tf.nest.map_structure(
                lambda t: tf.reshape(t[first:first + local * rows],
                                     tf.concat([[local, rows], tf.shape(t)[1:]], 0)), batch)
            return tf.data.Dataset.from_tensor_slices(own if len(own) > 1 else own[0])

        return dataset.flat_map(this_workers_replicas)

    return strategy.distribute_datasets_from_function(worker_batches)


def _static_batch(dataset: tf.data.Dataset) -> int | None:
    """The static leading dimension of the dataset's elements (None if unknown)."""
    return tf.nest.flatten(dataset.element_spec)[0].shape[0]


def replicas() -> int:
    """Replicas in sync under the current strategy (1 without one)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def _replica_context():
    """The replica context when several replicas run in sync; None otherwise (one
    device, or cross-replica code)."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def replicated() -> bool:
    """Whether this code runs in one of several replicas (replica context)."""
    return _replica_context() is not None


def check_global_batch(batch_size: int, option: str = "batch_size") -> None:
    """Raise ``ValueError`` unless ``batch_size`` splits evenly over the replicas."""
    count = replicas()
    if batch_size % count:
        raise ValueError(f"{option}={batch_size} must be a multiple of the {count} replicas "
                         "(every replica trains on an equal slice of the global batch)")


def rows_of_global_batch(draw: Callable, local_batch):
    """``draw(rows)`` for this replica's rows of the global batch.

    ``draw(n)`` makes the draws of ``n`` rows (a tensor or a nest of tensors,
    rows first) from a seed that is the same on every replica. On one device it
    is ``draw(local_batch)``; on ``R`` replicas, ``draw(R * local_batch)`` sliced
    to rows ``[r * local_batch, (r + 1) * local_batch)`` of replica ``r``, the rows
    Keras' distributed dataset gives that replica.
    """
    context = _replica_context()
    if context is None:
        return draw(local_batch)
    drawn = draw(local_batch * context.num_replicas_in_sync)
    start = tf.cast(context.replica_id_in_sync_group, tf.int32) * tf.cast(local_batch,
                                                                          tf.int32)
    return tf.nest.map_structure(lambda values: values[start:start + local_batch], drawn)


def all_reduce_mean(values):
    """The mean over the replicas of a nest of tensors (``None`` leaves kept)."""
    context = _replica_context()
    if context is None:
        return values
    flat = tf.nest.flatten(values)
    present = [value for value in flat if value is not None]
    reduced = iter(context.all_reduce(tf.distribute.ReduceOp.MEAN, present) if present else [])
    return tf.nest.pack_sequence_as(values, [None if value is None else next(reduced)
                                             for value in flat])


def all_gather_rows(values):
    """A nest of ``[n, ...]`` tensors concatenated over the replicas, in replica order
    (the rows of the global batch)."""
    context = _replica_context()
    if context is None:
        return values
    return tf.nest.map_structure(lambda value: context.all_gather(value, axis=0), values)


def run_once(function: Callable, *args):
    """``function(*args)`` run once for all replicas, its variable writes reaching every
    replica.

    On one device it is a plain call. On several replicas it runs in a
    ``merge_call`` (cross-replica context, where assigning a mirrored variable
    writes every copy) with ``args`` taken from the first replica: they must be
    the same on every replica (all-reduced or all-gathered values). Returns
    ``function``'s result.
    """
    context = _replica_context()
    if context is None:
        return function(*args)

    def merged(strategy, *per_replica):
        def first(value):
            if value is None:
                return None
            return strategy.experimental_local_results(value)[0]

        return function(*tf.nest.map_structure(first, per_replica))

    return context.merge_call(merged, args=args)


def multi_worker(strategy: tf.distribute.Strategy | None = None) -> bool:
    """Whether ``strategy`` (default: the current one) spans several worker processes."""
    extended = (strategy or tf.distribute.get_strategy()).extended
    return bool(getattr(extended, "_in_multi_worker_mode", lambda: False)())


def step_logs(metrics, extra: dict | None = None) -> dict:
    """``{name: result}`` of a train or test step's metrics (and the values of
    ``extra``, as float32), shaped for Keras' ``fit``.

    Keras 3 reduces a multi-worker step's outputs with ``strategy.reduce("MEAN", v,
    axis=0)``, which fails on the scalar results of every metric ("Invalid reduction
    dimension 0 for input with 0 dimensions", tensorflow/tensorflow#72388): under a
    multi-worker strategy the results are returned with a leading axis of 1, which
    that reduction removes. Elsewhere they are returned as they are.
    """
    logs = {metric.name: metric.result() for metric in metrics}
    for name, value in (extra or {}).items():  # plain values (a counter variable)
        logs[name] = tf.cast(tf.convert_to_tensor(value), tf.float32)
    if not multi_worker():
        return logs
    return {name: tf.reshape(value, [1]) if value.shape.rank == 0 else value
            for name, value in logs.items()}


def split_jit_compile(jit_compile) -> tuple:
    """``(jit_compile for Keras' compile, jit_compile of each replica's step)``.

    On one device Keras compiles the whole train step as asked. On several replicas
    XLA cannot compile the multi-replica step (on logical CPU devices TensorFlow 2.21
    refuses it: "Trying to access resource ... located in device CPU:1 from device
    CPU:0", and the once-only updates of :func:`run_once` are ``merge_call``s, which
    XLA cannot hold), so Keras gets ``False`` and, for ``jit_compile=True``, each
    replica compiles its own forward pass, backward pass and K-FAC statistics
    (everything on its device) with XLA
    (:func:`tfngd.optimizers.training.gradients_and_curvature`); the all-reduces and
    the update run uncompiled. ``"auto"`` means no XLA on several replicas.
    """
    if replicas() == 1:
        return jit_compile, False
    return False, jit_compile is True


def clip_like(optimizer, gradients: list) -> list:
    """``gradients`` clipped as the Keras ``optimizer`` is configured to clip
    (``clipnorm`` per variable, ``clipvalue`` element-wise, ``global_clipnorm``)."""
    if optimizer.clipnorm is not None:
        gradients = [None if g is None else tf.clip_by_norm(g, optimizer.clipnorm)
                     for g in gradients]
    if optimizer.clipvalue is not None:
        gradients = [None if g is None else tf.clip_by_value(g, -optimizer.clipvalue,
                                                              optimizer.clipvalue)
                     for g in gradients]
    if optimizer.global_clipnorm is not None:
        present = [g for g in gradients if g is not None]
        clipped = iter(tf.clip_by_global_norm(present, optimizer.global_clipnorm)[0])
        gradients = [None if g is None else next(clipped) for g in gradients]
    return gradients


def apply_gradients_if_finite(optimizer, gradients: list, variables: list, loss):
    """``optimizer.apply`` of the replicas' mean gradient, unless the mean ``loss`` or
    the mean gradient is not finite; returns ``(mean gradient, finite)``.

    ``gradients`` are this replica's gradients of its own mean ``loss``. A step that
    is not finite is skipped (:mod:`tfngd.nonfinite`): ``optimizer.iterations``
    advances and nothing else of the optimizer or of ``variables`` changes.

    * One device: ``tf.cond(finite, apply, advance the step counter)``.
    * ``R`` replicas: the gradients are averaged, clipped like the optimizer clips
      (on the global gradient), and handed to the optimizer divided by ``R``:
      Keras' optimizers sum the replicas' gradients (and re-clipping an already
      clipped, ``R`` times smaller gradient changes nothing), so the update uses
      exactly the clipped mean. A Keras optimizer cannot apply inside a
      ``tf.cond`` there (its all-reduce is a ``merge_call``, which control flow
      cannot hold: "merge_call called while defining a new graph"), so the state it
      writes is read before the update and written back when the step is not finite.
    * An optimizer with ``skips_nonfinite_updates`` (K-FAC, which also checks its
      curvature statistics) applies every step and leaves a non-finite one alone
      itself; the returned ``finite`` still tells the caller what to skip (EMA,
      metrics).
    """
    if not optimizer.built:
        optimizer.build(variables)
    mean, mean_loss = all_reduce_mean((gradients, loss))
    finite = nonfinite.all_finite([mean_loss, *mean])
    guards_itself = getattr(optimizer, "skips_nonfinite_updates", False)
    context = _replica_context()
    if context is None:
        def apply():
            optimizer.apply(gradients, variables)
            return tf.constant(True)

        def skip():
            optimizer.iterations.assign_add(1)
            return tf.constant(False)

        if guards_itself:
            apply()
        else:
            tf.cond(finite, apply, skip)
        return gradients, finite
    inner = getattr(optimizer, "inner_optimizer", None)
    if inner is not None:
        raise NotImplementedError("loss scaling (mixed_float16) is not supported on several "
                                  "replicas; use the mixed_bfloat16 policy, which needs none")
    share = 1.0 / context.num_replicas_in_sync
    scaled = [None if g is None else g * share for g in clip_like(optimizer, mean)]
    if guards_itself:
        optimizer.apply(scaled, variables)
        return mean, finite
    state = [v for v in [*variables, *optimizer.variables] if v is not optimizer.iterations]
    before = [tf.convert_to_tensor(v) for v in state]  # read before the update writes
    with tf.control_dependencies(before):
        optimizer.apply(scaled, variables)

    def restore(finite, *values):
        def write_back():
            for variable, value in zip(state, values, strict=True):
                variable.assign(value)
            return tf.constant(True)

        return tf.cond(finite, lambda: tf.constant(False), write_back)

    run_once(restore, finite, *before)
    return mean, finite
