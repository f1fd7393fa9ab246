"""``KFAC``: Kronecker-factored natural gradient as a ``keras.optimizers.Optimizer``."""

from __future__ import annotations

import contextlib
import math

import keras
import tensorflow as tf
from keras.optimizers.schedules import LearningRateSchedule

from tfngd import distribute
from tfngd.nonfinite import all_finite
from tfngd.optimizers.arguments import (
    require_choice,
    require_counts,
    require_fraction,
    require_positive,
)
from tfngd.optimizers.capture import capture_layer_calls, find_registrable_layers
from tfngd.optimizers.curvature_blocks import block_type_for, validate_modes

FISHER_TYPES = ("mc", "empirical", "exact")
LIKELIHOODS = ("gaussian", "categorical")
_TINY = 1e-30
# Adam constants of the first-order fallback (Kingma & Ba 2015 defaults).
_FALLBACK_BETA_1, _FALLBACK_BETA_2, _FALLBACK_EPSILON = 0.9, 0.999, 1e-7


class _Registration:
    """What ``register`` was given, and the blocks built from it.

    A plain object, so that Keras' weight saving (which walks the optimizer's
    attributes for ``KerasSaveable`` children) never reaches the model.
    """

    def __init__(self, model_or_layers, skip_unsupported: bool):
        self.model_or_layers = model_or_layers
        self.skip_unsupported = skip_unsupported
        self.layers: list | None = None
        self.blocks: list = []
        self.block_of_layer: dict = {}
        self.block_variable_keys: set = set()  # optimizer._var_key of every block variable
        self.fallback_keys: list = []
        # Per noise-level bucket, its blocks (bucket 0: ``blocks``; fisher_buckets > 1).
        self.bucket_blocks: list[list] = []

    def resolve_layers(self) -> list:
        if self.layers is None:
            self.layers = find_registrable_layers(self.model_or_layers, self.skip_unsupported)
        return self.layers

    def trainable_variables(self) -> list:
        if isinstance(self.model_or_layers, keras.layers.Layer):
            return list(self.model_or_layers.trainable_variables)
        raise ValueError("the optimizer was registered with a list of layers: build it with "
                         "optimizer.build(model.trainable_variables) before the first step")


def _schedule_from_config(value):
    """A hyperparameter as ``get_config`` wrote it: a serialised schedule (a dict) becomes
    the ``LearningRateSchedule`` again; anything else is returned as it is."""
    return keras.saving.deserialize_keras_object(value) if isinstance(value, dict) else value


def _schedule_to_config(value):
    """The inverse of :func:`_schedule_from_config`, for ``get_config``."""
    return (keras.saving.serialize_keras_object(value)
            if isinstance(value, LearningRateSchedule) else value)


def _run_if(predicate, function) -> None:
    """``tf.cond(predicate, function, no-op)`` for side-effect-only ``function``."""

    def run():
        function()
        return tf.constant(True)

    tf.cond(predicate, run, lambda: tf.constant(False))


def portable_uniform(shape, seed) -> tf.Tensor:
    """Stateless uniform draws in (0, 1), bitwise identical with and without XLA.

    ``tf.random.stateless_normal``/``stateless_uniform`` floats differ between
    XLA and the regular kernels (the raw Philox bits agree, their float
    conversion does not), so the probes are built from the bits.
    """
    bits = tf.random.stateless_uniform(shape, seed=seed, minval=None, maxval=None,
                                       dtype=tf.uint32, alg="philox")
    return (tf.cast(tf.bitwise.right_shift(bits, 8), tf.float32) + 0.5) * (1.0 / 2**24)


def portable_normal(shape, seed) -> tf.Tensor:
    """Standard normal draws (Box-Muller on :func:`portable_uniform`)."""
    u = portable_uniform(tf.concat([[2], shape], axis=0), seed)
    return tf.sqrt(-2.0 * tf.math.log(u[0])) * tf.cos(2.0 * math.pi * u[1])


def gumbel_noise(shape, seed) -> tf.Tensor:
    """Standard Gumbel draws ``-log(-log u)`` on :func:`portable_uniform`."""
    return -tf.math.log(-tf.math.log(portable_uniform(shape, seed)))


def default_per_example_scale(outputs, likelihood: str) -> tf.Tensor:
    """``s_n`` of the Keras convention of a mean over output elements: ``1 / D`` for
    gaussian (``D`` elements per example), ``1 / P`` for categorical (``P`` positions per
    example, 1 for ``[N, K]`` logits)."""
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    dims = list(outputs.shape[1:] if likelihood == "gaussian" else outputs.shape[1:-1])
    if any(d is None for d in dims):
        raise ValueError("outputs have dynamic dimensions: pass per_example_scale")
    return tf.constant(1.0 / math.prod(int(d) for d in dims), tf.float32)


@keras.saving.register_keras_serializable(package="tfngd")
class KFAC(keras.optimizers.Optimizer):
    """K-FAC natural-gradient descent (Martens & Grosse 2015; Grosse & Martens 2016).

    Each registered layer's gradient ``dW`` is preconditioned by its damped
    Fisher block, ``U = (F_layer + lambda I)^-1 dW``, with ``F_layer ~= R (A kron G)``
    for Dense/Conv2D layers (``A``, ``G``: running second moments of the layer
    inputs and of the per-example output gradients; ``R`` positions sharing
    the weights) and a diagonal scale-and-shift Fisher for GroupNormalization
    (:mod:`tfngd.optimizers.curvature_blocks` has the formulas). The step is::

        nu = min(1, sqrt(kappa_k / (eta^2 * sum_l <U_l, dW_l>)))   # norm constraint
        m  <- momentum * m + nu * U                                  # precondition, then momentum
        W  <- W - eta * m

    Variables with no curvature block (``Embedding``, unsupported layers) get
    a first-order **Adam** update (betas 0.9/0.999, epsilon 1e-7) with
    ``fallback_learning_rate``; they are not part of the KL clip.

    The curvature comes from the train step (``NaturalGradientModel`` does it
    for ``model.fit``)::

        optimizer.register(model)                      # once, before training
        with tf.GradientTape(persistent=True) as tape:
            with optimizer.capture() as captured:
                outputs = model(x, training=True)
            loss = ...
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.update_curvature(tape, captured, outputs, likelihood="gaussian")
        optimizer.apply(grads, model.trainable_variables)

    The Fisher of the mean loss ``L = 1/N sum_n l_n`` is estimated with
    per-example output-gradient probes ``v`` back-propagated to each layer's
    pre-activation (one vector-Jacobian product per probe):

    * ``"mc"``: Gaussian ``l_n = s_n ||y_n - f_n||^2``: ``v = sqrt(2 s_n / M) z``,
      ``z ~ N(0, I)``; categorical (softmax cross-entropy on logits):
      ``v = sqrt(s_n / M) (softmax(f_n) - onehot(y~))``, ``y~ ~ softmax(f_n)``;
      ``M = mc_samples`` probes.
    * ``"exact"``: one probe per output dimension (the columns of a square root
      of the output Hessian: ``sqrt(2 s_n) e_d``, resp. ``sqrt(s_n p_k) (e_k - p)``),
      so ``G`` is exact given the Kronecker factorisation (costs ``D`` backward
      passes: small outputs and tests).
    * ``"empirical"``: the real per-example loss gradients, ``N dL/ds``
      (needs ``loss=`` in ``update_curvature``; a biased curvature estimate).

    Random draws are stateless, seeded by ``(seed, iterations)``: a resumed run
    draws what the uninterrupted run would have.

    Every piece of state (factors, inverses or eigendecompositions, momentum,
    fallback Adam moments, damping, counters) is an optimizer variable created
    in ``build``, so ``model.save_weights``/``load_weights`` checkpoint it (build
    the optimizer of the fresh model before ``load_weights``). Non-finite
    statistics or gradients, or a failed decomposition, skip the whole step:
    weights, momentum and curvature keep their values and ``skipped_updates``
    is incremented (``skips_nonfinite_updates``: the train steps rely on it,
    :func:`tfngd.distribute.apply_gradients_if_finite`).

    Args:
      learning_rate: float or ``LearningRateSchedule``; ``eta``. Defaults to 0.1.
      damping: Tikhonov ``lambda`` added to the Fisher. Defaults to 1e-3. Stored
        in a variable (``optimizer.damping``) that may be reassigned.
      damping_mode: ``"pi"`` (pi-split Tikhonov on each factor, the damped
        factor inverses are cached at each refresh) or ``"eigen"`` (exact
        damping of ``R (A kron G) + lambda I`` in the factors' eigenbasis,
        eigendecompositions cached). Defaults to ``"pi"``.
      inverse_method: ``"eigh"`` (eigendecomposition, both damping modes;
        eigenvalue diagnostics) or ``"cholesky"`` (pi mode only: Cholesky
        inverses of the damped factors, much faster under XLA, whose ``eigh`` is a
        slow Jacobi iteration; see docs/kfac.md). Defaults to ``"eigh"``.
      approximation: how weight sharing over ``R`` positions (convolutions, Dense
        over tokens) is factored: ``"expand"`` (every position an example,
        ``F ~= R (A kron G)``) or ``"reduce"`` (K-FAC-reduce, Eschenhagen et al.
        2023: inputs averaged and output gradients summed over positions before
        the products; ``R`` times cheaper factors). Same for ``R = 1``.
        ``"per_example"``: factors from each example's whole gradient matrix (every
        call, stacked copy and position summed first; for layers evaluated several
        times whose outputs are differenced before the loss, as in Neural Diffusion
        Models, where expand and reduce are off by orders of magnitude). See
        :mod:`tfngd.optimizers.curvature_blocks`. Defaults to ``"expand"``.
      eigenvalue_correction: EKFAC (George et al. 2018): keep K-FAC's eigenbasis
        ``Q_A kron Q_G`` but replace its eigenvalues ``R lambda_A lambda_G`` by the
        Fisher's diagonal in that basis, ``s = E_n[(Q_A^T M_n Q_G)^2]`` from the
        per-example gradient matrices ``M_n``, averaged over the statistics steps
        since the last basis refresh; the update is ``Q_A ((Q_A^T dW Q_G) / (s +
        lambda)) Q_G^T``. Needs ``damping_mode="eigen"`` and ``inverse_method="eigh"``.
        Defaults to False.
      fisher: ``"mc"``, ``"exact"`` or ``"empirical"`` (see above). Defaults to ``"mc"``.
      mc_samples: probes per example for ``fisher="mc"``. Defaults to 1.
      statistics_examples: fold only the first ``M`` examples of each batch into
        the factors (None: all). The factors are means over examples, so a
        subset is an unbiased estimate; the cost of the factor products (for a
        convolution, ``N R (k^2 C_in)^2``: most of the statistics time of a U-Net)
        drops by ``M / N``, the probe backward pass does not. Batches must be
        shuffled (the first ``M`` then are a random subset). Defaults to None.
      statistics_decay: EMA decay of the factors, with bias correction
        ``1 / (1 - decay^k)`` (decay 0 uses the last batch only). Defaults to 0.95.
      statistics_every: update the factors every ``k`` steps (and at every step of
        the inverse warm-up). Defaults to 1.
      inverse_every: refresh the decompositions every ``T`` steps. Defaults to 10.
      inverse_warmup_steps: refresh at every step during the first steps: early
        on the factors move fast (zero-initialised layers leave ``G = 0`` upstream
        at step 0) and inverses that are ``T`` steps stale make training diverge
        (seen on our U-Net with ``T = 10``). Defaults to 20, about the time
        constant ``1 / (1 - statistics_decay)`` of the factor EMA.
      kl_clip: ``kappa`` of the norm constraint: a float, a ``LearningRateSchedule`` of the
        step (``kappa_k``, e.g. a geometric ramp that loosens the trust region as
        training settles), or None to disable it. Defaults to 1e-3.
      momentum: heavy-ball coefficient applied after preconditioning and
        clipping (0 disables momentum and its variables). Defaults to 0.5: with
        kfac-pytorch's 0.9 our diffusion MLP diverged within 100 steps at every
        damping/learning rate tried (docs/kfac.md).
      fallback_learning_rate: float or schedule: learning rate of the Adam
        fallback for variables without a block. Defaults to 1e-3.
      fisher_buckets: ``B``, the number of noise-level buckets of a bucketed Fisher
        (1: the pooled Fisher of every example, as always). With ``B > 1`` every block
        keeps ``B`` sets of statistics, bucket ``b``'s from the examples the train step
        assigned to it (:mod:`tfngd.optimizers.bucketed_fisher`: ``DiffusionModel``
        buckets by timestep), and the update is ``U = sum_b (F_b + lambda I)^-1 g_b``
        with ``g_b`` the gradient of bucket ``b``'s share of the mean loss
        (:meth:`record_bucket_gradients`). Needs a train step that provides the buckets
        (``DiffusionModel``; not ``NaturalGradientModel``, NDM or score-SDE models), one
        replica, ``approximation`` ``"expand"``/``"reduce"``, no EKFAC and no
        ``clipvalue``. Defaults to 1.
      seed: base seed of the stateless probe draws. Defaults to 0.
      skip_unsupported_layers: layers of a supported type in an unsupported
        configuration (grouped/channels-first Conv2D, ...) raise at build by
        default; True gives them the fallback instead. Defaults to False.
      weight_decay, clipnorm, clipvalue, global_clipnorm, use_ema, ema_momentum,
      ema_overwrite_frequency, loss_scale_factor, name: as for every Keras
        optimizer (clipping acts on the raw gradients before
        preconditioning; weight decay is decoupled, ``W -= eta * wd * W``).
        ``gradient_accumulation_steps`` is not supported.

    Data parallel (``tf.distribute.MirroredStrategy``, ``MultiWorkerMirroredStrategy``):
    each replica folds the statistics of its own examples into its own copy of the
    running statistics (:meth:`add_statistics_variable`); the inverse refresh reads
    their mean over the replicas, and the inverses and the update are computed once and
    written to every replica, so all replicas hold the same state and apply the same
    update (:mod:`tfngd.distribute`; ``statistics_examples`` counts per replica).
    """

    # The update is all or nothing on non-finite gradients and statistics (see above).
    skips_nonfinite_updates = True

    def __init__(
        self,
        learning_rate=0.1,
        damping: float = 1e-3,
        damping_mode: str = "pi",
        inverse_method: str = "eigh",
        approximation: str = "expand",
        eigenvalue_correction: bool = False,
        fisher: str = "mc",
        mc_samples: int = 1,
        statistics_examples: int | None = None,
        statistics_decay: float = 0.95,
        statistics_every: int = 1,
        inverse_every: int = 10,
        inverse_warmup_steps: int = 20,
        kl_clip: float | LearningRateSchedule | None = 1e-3,
        momentum: float = 0.5,
        fallback_learning_rate=1e-3,
        fisher_buckets: int = 1,
        seed: int = 0,
        skip_unsupported_layers: bool = False,
        weight_decay=None,
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        loss_scale_factor=None,
        gradient_accumulation_steps=None,
        name=None,
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate,
            name=name,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            **kwargs,
        )
        if gradient_accumulation_steps:
            raise NotImplementedError("KFAC does not support gradient_accumulation_steps")
        validate_modes(damping_mode, inverse_method, approximation, eigenvalue_correction)
        require_choice("fisher", fisher, FISHER_TYPES)
        require_positive("damping", damping)
        require_fraction("statistics_decay", statistics_decay)
        require_fraction("momentum", momentum)
        kl_clip = _schedule_from_config(kl_clip)
        if not (kl_clip is None or isinstance(kl_clip, LearningRateSchedule) or kl_clip > 0):
            raise ValueError(f"kl_clip must be > 0, a LearningRateSchedule or None, "
                             f"got {kl_clip}")
        require_counts(mc_samples=mc_samples, statistics_every=statistics_every,
                       inverse_every=inverse_every)
        if statistics_examples is not None and (int(statistics_examples) != statistics_examples
                                                or statistics_examples < 1):
            raise ValueError(f"statistics_examples must be None or an integer >= 1, "
                             f"got {statistics_examples}")
        if int(inverse_warmup_steps) != inverse_warmup_steps or inverse_warmup_steps < 0:
            raise ValueError(f"inverse_warmup_steps must be an integer >= 0, "
                             f"got {inverse_warmup_steps}")
        require_counts(fisher_buckets=fisher_buckets)
        if fisher_buckets > 1 and (approximation == "per_example" or eigenvalue_correction):
            raise ValueError("fisher_buckets > 1 (a bucketed Fisher) supports approximation "
                             "'expand' or 'reduce' without eigenvalue_correction (EKFAC), got "
                             f"approximation={approximation!r}, "
                             f"eigenvalue_correction={eigenvalue_correction}")
        if fisher_buckets > 1 and clipvalue is not None:
            raise ValueError("fisher_buckets > 1 cannot split an element-wise clipped gradient "
                             "(clipvalue) into buckets: use clipnorm or global_clipnorm")
        self.fisher_buckets = int(fisher_buckets)
        #: Set by a train step that assigns every example to a bucket (``DiffusionModel``,
        #: :func:`tfngd.optimizers.training.gradients_and_curvature` with ``example_buckets``).
        self.bucketed_train_step = False
        self.initial_damping = float(damping)
        self.damping_mode = damping_mode
        self.inverse_method = inverse_method
        self.approximation = approximation
        self.eigenvalue_correction = bool(eigenvalue_correction)
        self.fisher = fisher
        self.mc_samples = int(mc_samples)
        self.statistics_examples = None if statistics_examples is None else int(statistics_examples)
        self.statistics_decay = float(statistics_decay)
        self.statistics_every = int(statistics_every)
        self.inverse_every = int(inverse_every)
        self.inverse_warmup_steps = int(inverse_warmup_steps)
        self.kl_clip = (kl_clip if kl_clip is None or isinstance(kl_clip, LearningRateSchedule)
                        else float(kl_clip))
        self.momentum = float(momentum)
        self.fallback_learning_rate = _schedule_from_config(fallback_learning_rate)
        self.seed = int(seed)
        self.skip_unsupported_layers = bool(skip_unsupported_layers)
        self._registration = None

    # -- registration ----------------------------------------------------------
    def register(self, model_or_layers, skip_unsupported: bool | None = None) -> KFAC:
        """Choose the layers that get a curvature block (call once, before training).

        ``model_or_layers`` is a Keras model or layer (searched recursively
        with :func:`find_registrable_layers` when the optimizer is built, so
        the model need not be built yet), or a list of layers. Returns self.
        """
        if self.built:
            raise ValueError("register() must be called before the optimizer is built")
        if skip_unsupported is None:
            skip_unsupported = self.skip_unsupported_layers
        self._registration = _Registration(model_or_layers, skip_unsupported)
        return self

    @property
    def is_registered(self) -> bool:
        return self._registration is not None

    @property
    def blocks(self) -> list:
        """The curvature blocks, in model order (after ``build``)."""
        return [] if self._registration is None else list(self._registration.blocks)

    def _require_registration(self) -> _Registration:
        if self._registration is None:
            raise ValueError(
                "KFAC needs to know the model's layers: call optimizer.register(model) before "
                "training, and feed it curvature with capture()/update_curvature() (or use "
                "tfngd.optimizers.NaturalGradientModel, which does both)."
            )
        return self._registration

    # -- state -------------------------------------------------------------------
    def build(self, var_list):
        if self.built:
            return
        registration = self._require_registration()
        var_keys = {self._var_key(v) for v in var_list}
        for layer in registration.resolve_layers():
            block = block_type_for(layer)(layer, self.damping_mode, self.inverse_method,
                                          self.approximation, self.eigenvalue_correction)
            if not all(self._var_key(v) in var_keys for v in block.variables):
                continue  # not (entirely) trained by this optimizer: first-order fallback
            registration.blocks.append(block)
            registration.block_of_layer[id(layer)] = block
            registration.block_variable_keys.update(self._var_key(v) for v in block.variables)
        registration.bucket_blocks = [registration.blocks]
        if self.fisher_buckets > 1:
            self._check_bucketed_fisher_supported()
            for bucket in range(1, self.fisher_buckets):
                copies = []
                for block in registration.blocks:
                    copy = type(block)(block.layer, self.damping_mode, self.inverse_method,
                                       self.approximation, self.eigenvalue_correction)
                    copy.bucket = bucket
                    copies.append(copy)
                registration.bucket_blocks.append(copies)
        super().build(var_list)

        def scalar(name, initializer="zeros", dtype="float32"):
            return self.add_variable((), initializer=initializer, dtype=dtype, name=name)

        self.damping = scalar("damping", keras.initializers.Constant(self.initial_damping))
        self._statistics_weight = self.add_statistics_variable((), name="statistics_weight")
        # Per bucket, the EMA weight ``1 - decay^k`` of its ``k`` statistics steps so far.
        self._statistics_weights = [self._statistics_weight] + [
            self.add_statistics_variable((), name=f"statistics_weight_bucket{b}")
            for b in range(1, self.fisher_buckets)]
        # > 0 when non-finite statistics were seen since the last update (on any replica).
        self._nonfinite_statistics = self.add_statistics_variable((),
                                                                  name="nonfinite_statistics")
        self._skipped_updates = scalar("skipped_updates", dtype="int64")
        self._inverse_refreshes = scalar("inverse_refreshes", dtype="int64")
        self._update_scale = scalar("update_scale", "ones")
        for blocks in registration.bucket_blocks:
            for block in blocks:
                block.create_state(self)
        block_variables = [v for block in registration.blocks for v in block.variables]
        self._momentums = (self.add_optimizer_variables(block_variables, "kfac_momentum")
                           if self.momentum > 0 else [None] * len(block_variables))
        # Scratch buffers: this step's per-bucket gradients g_b of the block variables,
        # written by record_bucket_gradients before apply (fisher_buckets > 1).
        self._bucket_gradients = [
            self.add_optimizer_variables(block_variables, f"kfac_bucket{b}_gradient")
            for b in range(self.fisher_buckets)] if self.fisher_buckets > 1 else []
        fallback = [v for v in var_list
                    if self._var_key(v) not in registration.block_variable_keys]
        registration.fallback_keys = [self._var_key(v) for v in fallback]
        self._fallback_moments = self.add_optimizer_variables(
            fallback, ["fallback_momentum", "fallback_velocity"])

    def _check_bucketed_fisher_supported(self) -> None:
        """``fisher_buckets > 1`` needs a train step that buckets the examples, on one
        replica: raise (at build, before any step) where it would silently not."""
        if tf.distribute.has_strategy() and \
                tf.distribute.get_strategy().num_replicas_in_sync > 1:
            raise NotImplementedError(
                f"fisher_buckets={self.fisher_buckets} is not supported under a tf.distribute "
                "strategy with several replicas; use fisher_buckets=1 or one device")
        if not self.bucketed_train_step:
            raise ValueError(
                f"fisher_buckets={self.fisher_buckets} needs a train step that assigns each "
                "example to a noise-level bucket and feeds per-bucket gradients: "
                "tfngd.model.DiffusionModel does (by timestep); NaturalGradientModel, "
                "NeuralDiffusionModel and score-SDE models do not (use fisher_buckets=1), "
                "and a custom loop must use "
                "tfngd.optimizers.training.gradients_and_curvature(..., example_buckets=...)")

    def add_statistics_variable(self, shape, initializer="zeros", dtype="float32",
                                name=None):
        """An optimizer variable for running curvature statistics: replica-local
        (``synchronization="on_read"``, ``aggregation="mean"``). Each replica of a
        ``tf.distribute`` strategy writes its own copy without communication, and a read
        outside the replicas (the inverse refresh and update, checkpoints) returns the
        mean over the copies, which for these linear running averages is the average
        over every replica's examples. On one device it is an ordinary variable."""
        with keras.name_scope(self.name, caller=self):
            variable = keras.Variable(initializer=keras.initializers.get(initializer),
                                      shape=shape, dtype=dtype, trainable=False,
                                      aggregation="mean", synchronization="on_read",
                                      name=name)
        self._track_variable(variable)
        return variable

    @property
    def skipped_updates(self):
        """Number of steps skipped because of non-finite values (an int64 variable)."""
        return self._skipped_updates

    # -- curvature ---------------------------------------------------------------
    @contextlib.contextmanager
    def capture(self):
        """Record the registered layers' inputs and pre-activations of one forward pass."""
        layers = self._require_registration().resolve_layers()
        with capture_layer_calls(layers) as calls:
            yield calls

    def _step_seed(self, probe: int):
        step = tf.cast(self.iterations, tf.int64)
        return tf.stack([tf.constant(self.seed * 1000003 + 7919 * probe + 1, tf.int64), step])

    def output_probes(self, outputs, likelihood: str, per_example_scale=None) -> list:
        """Output-gradient probes ``v`` whose sum of ``v v^T`` estimates the output Hessian.

        ``per_example_scale`` is ``s_n`` (shape ``[N]`` or scalar) in
        ``l_n = s_n ||y_n - f_n||^2`` (gaussian) or ``l_n = s_n sum_positions CE``
        (categorical), where the objective is ``mean_n l_n``. The default is the
        Keras convention of a mean over output elements: ``1 / D`` for gaussian
        (``D`` = elements per example) and ``1 / P`` for categorical (``P`` =
        positions per example, 1 for ``[N, K]`` logits).
        """
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        outputs32 = tf.cast(outputs, tf.float32)
        shape = tf.shape(outputs32)
        rank = outputs.shape.rank
        example_dims = [int(d) if d is not None else None for d in outputs.shape[1:]]
        scale = (default_per_example_scale(outputs, likelihood) if per_example_scale is None
                 else tf.cast(per_example_scale, tf.float32))
        if scale.shape.rank == 1:
            scale = tf.reshape(scale, [-1] + [1] * (rank - 1))

        probes = []
        if likelihood == "gaussian":
            if self.fisher == "exact":
                dims = math.prod(example_dims)
                for d in range(dims):
                    unit = tf.reshape(tf.one_hot(d, dims), [1, *example_dims])
                    probes.append(tf.sqrt(2.0 * scale) * tf.ones_like(outputs32) * unit)
            else:
                for probe in range(self.mc_samples):
                    # Drawn for the global batch, this replica's rows (tfngd.distribute).
                    z = distribute.rows_of_global_batch(
                        lambda rows, probe=probe: portable_normal(
                            tf.concat([[rows], shape[1:]], 0), self._step_seed(probe)),
                        shape[0])
                    probes.append(tf.sqrt(2.0 * scale / self.mc_samples) * z)
        else:
            classes = example_dims[-1]
            probabilities = tf.nn.softmax(outputs32, axis=-1)
            if self.fisher == "exact":
                for k in range(classes):
                    p_k = probabilities[..., k:k + 1]
                    probes.append(tf.sqrt(scale * p_k) * (tf.one_hot(k, classes) - probabilities))
            else:
                flat_logits = tf.reshape(outputs32, (-1, classes))
                for probe in range(self.mc_samples):
                    # Gumbel noise for the global batch's positions, this replica's rows.
                    gumbel = distribute.rows_of_global_batch(
                        lambda rows, probe=probe: gumbel_noise(
                            tf.stack([rows, classes]), self._step_seed(probe)),
                        tf.shape(flat_logits)[0])
                    sampled = tf.argmax(flat_logits + gumbel, axis=-1)
                    onehot = tf.reshape(tf.one_hot(sampled, classes), shape)
                    probes.append(tf.sqrt(scale / self.mc_samples) * (probabilities - onehot))
        return [tf.cast(v, outputs.dtype) for v in probes]

    @tf.autograph.experimental.do_not_convert
    def update_curvature(self, tape, captured, outputs, likelihood: str = "gaussian",
                         per_example_scale=None, loss=None, example_buckets=None) -> None:
        """Fold this step's curvature statistics into the running factors.

        Args:
          tape: the persistent ``tf.GradientTape`` that recorded the forward pass.
          captured: what ``with optimizer.capture() as captured`` yielded.
          outputs: the model output the likelihood is defined on (a tensor;
            logits for ``"categorical"``).
          likelihood: ``"gaussian"`` (squared error) or ``"categorical"``
            (softmax cross-entropy from logits); unused for ``fisher="empirical"``.
          per_example_scale: ``s_n``, see :meth:`output_probes`.
          loss: the mean-over-examples objective; required for ``fisher="empirical"``.
          example_buckets: ``fisher_buckets > 1`` only (and then required): the bucket
            ``b_n`` in ``[0, B)`` of each example (``[N]`` integers). Bucket ``b``'s
            statistics are the means over its examples (:meth:`bucket_statistics`); a
            bucket with no example in the batch keeps its running statistics.

        Runs every ``statistics_every`` steps and during the inverse warm-up (a
        no-op otherwise). Non-finite
        statistics are not accumulated and make the next ``apply`` skip its update.
        """
        registration = self._require_registration()

        def collect():
            # On several replicas each one folds the statistics of its own examples into
            # its own copy of the running statistics (replica-local variables, no
            # communication here); reading them in the update averages the copies.
            if self.fisher_buckets == 1:
                per_bucket = [self.batch_statistics(tape, captured, outputs, likelihood,
                                                    per_example_scale, loss)]
                present = [tf.constant(True)]
            else:
                per_bucket, present = self.bucket_statistics(
                    tape, captured, outputs, example_buckets, likelihood, per_example_scale,
                    loss)
            finite = all_finite([s for statistics in per_bucket for stats in statistics
                                 if stats for s in stats])

            def accumulate():
                decay = tf.constant(self.statistics_decay, tf.float32)
                for bucket, statistics in enumerate(per_bucket):
                    blocks, weight = registration.bucket_blocks[bucket], \
                        self._statistics_weights[bucket]

                    def fold(blocks=blocks, statistics=statistics, weight=weight):
                        for block, stats in zip(blocks, statistics, strict=True):
                            if stats is not None:
                                block.accumulate_statistics(stats, decay)
                        weight.assign(decay * weight + (1.0 - decay))

                    if self.fisher_buckets == 1:
                        fold()
                    else:
                        _run_if(present[bucket], fold)

            _run_if(finite, accumulate)
            self._nonfinite_statistics.assign(
                tf.maximum(self._nonfinite_statistics, 1.0 - tf.cast(finite, tf.float32)))

        if not self.built:
            self.build(registration.trainable_variables())
        self._check_curvature_inputs(captured, outputs, loss)
        if self.fisher_buckets > 1 and example_buckets is None:
            raise ValueError(f"fisher_buckets={self.fisher_buckets}: update_curvature needs "
                             "example_buckets (the bucket of every example)")
        if self.statistics_every == 1:
            collect()
        else:
            _run_if(self._statistics_due(), collect)

    def _check_curvature_inputs(self, captured, outputs, loss) -> None:
        registration = self._require_registration()
        if not any(id(c.layer) in registration.block_of_layer for c in captured):
            raise ValueError("no registered layer was called inside optimizer.capture()")
        if not tf.is_tensor(outputs):
            raise TypeError("update_curvature needs the model output as a single tensor, got "
                            f"{type(outputs).__name__}")
        if self.fisher == "empirical" and loss is None:
            raise ValueError("fisher='empirical' needs the loss: update_curvature(..., loss=loss)")

    @tf.autograph.experimental.do_not_convert
    def batch_statistics(self, tape, captured, outputs, likelihood: str = "gaussian",
                         per_example_scale=None, loss=None) -> list:
        """This batch's statistics of every block (None: the block's layer was not called),
        from the probes' output gradients; the running state is not touched. Arguments as
        for :meth:`update_curvature` (the optimizer must be built)."""
        calls, probe_grads, examples = self._probe_gradients(tape, captured, outputs,
                                                             likelihood, per_example_scale, loss)
        return self._block_statistics(calls, probe_grads, examples, tf.shape(outputs)[0])

    @tf.autograph.experimental.do_not_convert
    def bucket_statistics(self, tape, captured, outputs, example_buckets,
                          likelihood: str = "gaussian", per_example_scale=None,
                          loss=None) -> tuple[list, list]:
        """Per noise-level bucket ``b``, this batch's statistics of every block from the
        examples with ``example_buckets == b`` alone (the same probes as
        :meth:`batch_statistics`, one probe pass for all buckets; each statistic is the
        mean over the bucket's examples, see ``example_weights`` of
        :meth:`CurvatureBlock.batch_statistics`), and whether the bucket has an example
        (in the ``statistics_examples`` subset). Returns ``(statistics, present)``."""
        calls, probe_grads, examples = self._probe_gradients(tape, captured, outputs,
                                                             likelihood, per_example_scale, loss)
        batch = tf.shape(outputs)[0]
        buckets = self._example_subset(tf.cast(example_buckets, tf.int32), batch)
        statistics, present = [], []
        for bucket in range(self.fisher_buckets):
            weights = tf.cast(tf.equal(buckets, bucket), tf.float32)
            count = tf.reduce_sum(weights)
            present.append(count > 0)
            # An empty bucket gets uniform weights (finite placeholders, never folded in).
            weights = tf.where(count > 0, weights, tf.ones_like(weights))
            statistics.append(self._block_statistics(calls, probe_grads, examples, batch,
                                                     weights, bucket))
        return statistics, present

    def _probe_gradients(self, tape, captured, outputs, likelihood, per_example_scale, loss):
        """``(calls, probe_grads, examples)``: the registered layers' calls, per probe the
        output gradients at their pre-activations, and the examples the statistics use."""
        registration = self._require_registration()
        self._check_curvature_inputs(captured, outputs, loss)
        calls = [c for c in captured if id(c.layer) in registration.block_of_layer]
        pre_activations = [c.outputs for c in calls]
        if self.fisher == "empirical":
            batch = tf.cast(tf.shape(outputs)[0], tf.float32)
            grads = tape.gradient(loss, pre_activations,
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
            probe_grads = [[g * tf.cast(batch, g.dtype) for g in grads]]
        else:
            probe_grads = [
                tape.gradient(outputs, pre_activations, output_gradients=v,
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
                for v in self.output_probes(outputs, likelihood, per_example_scale)
            ]
        examples = tf.shape(outputs)[0]
        if self.statistics_examples is not None:
            examples = tf.minimum(examples, self.statistics_examples)
        return calls, probe_grads, examples

    def _block_statistics(self, calls, probe_grads, examples, batch, example_weights=None,
                          bucket: int = 0) -> list:
        """Every block's statistics (of ``bucket``'s blocks) from the calls and probes."""
        def subset(tensor):
            return self._example_subset(tensor, batch)

        statistics = []
        for block in self._require_registration().bucket_blocks[bucket]:
            indices = [i for i, c in enumerate(calls) if c.layer is block.layer]
            kwargs = {} if example_weights is None else {"example_weights": example_weights}
            statistics.append(block.batch_statistics(
                [subset(calls[i].inputs) for i in indices],
                [[subset(grads[i]) for grads in probe_grads] for i in indices],
                examples, **kwargs,
            ) if indices else None)
        return statistics

    def work_due(self, step: int) -> tuple[bool, bool]:
        """``(statistics, inverse refresh)`` due at the step with ``iterations == step``
        (Python mirror of the in-graph schedule, for timing diagnostics; the refresh
        that follows a failed or missing first refresh is not predicted)."""
        warmup = step < self.inverse_warmup_steps
        return (step % self.statistics_every == 0 or warmup,
                step % self.inverse_every == 0 or warmup)

    def _example_subset(self, tensor, examples):
        """The first ``statistics_examples`` of the ``examples`` examples of a layer call's
        ``tensor`` (batch axis first), or all of them. A call on ``k`` stacked copies of
        the batch (``k * examples`` rows, copy-major) keeps those examples in every copy."""
        if self.statistics_examples is None:
            return tensor
        keep = tf.minimum(examples, self.statistics_examples)
        copies = tf.reshape(tensor, tf.concat([[-1, examples], tf.shape(tensor)[1:]], 0))
        return tf.reshape(copies[:, :keep], tf.concat([[-1], tf.shape(tensor)[1:]], 0))

    def _statistics_due(self) -> tf.Tensor:
        """Every ``statistics_every`` steps, and at every step of the inverse warm-up
        (whose per-step refreshes would otherwise re-invert unchanged factors)."""
        return tf.logical_or(tf.equal(self.iterations % self.statistics_every, 0),
                             self.iterations < self.inverse_warmup_steps)

    # -- update ------------------------------------------------------------------
    def _at_this_step(self, value) -> tf.Tensor:
        """A float, a ``LearningRateSchedule`` (evaluated at ``iterations``) or a callable
        hyperparameter, as a float32 tensor."""
        if isinstance(value, LearningRateSchedule):
            value = value(self.iterations)
        elif callable(value):
            value = value()
        return tf.cast(value, tf.float32)

    def _fallback_lr(self):
        return self._at_this_step(self.fallback_learning_rate)

    def _apply_weight_decay(self, variables):
        """Deferred into the guarded update (so a skipped step leaves the weights alone)."""

    def _decay_weights(self, variables, learning_rate):
        if self.weight_decay is None:
            return
        for variable in variables:
            if self._use_weight_decay(variable):
                rate = tf.cast(learning_rate * self.weight_decay, variable.dtype)
                self.assign_sub(variable, variable * rate)

    def update_step(self, gradient, variable, learning_rate):
        raise NotImplementedError("KFAC updates all variables jointly in _backend_update_step")

    @tf.autograph.experimental.do_not_convert
    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        """Refresh the inverses when due, then precondition, clip, momentum and update.

        All or nothing: non-finite statistics or gradients, or a failed
        decomposition, skip the whole step (and count it). On several replicas the
        gradients are summed over them (as every Keras optimizer does) and the update
        is computed once and written to every replica (:func:`tfngd.distribute.run_once`).
        """
        if distribute.replicated():
            reduced = self._all_reduce_sum_gradients(
                list(zip(grads, trainable_variables, strict=True)))
            distribute.run_once(
                lambda grads, rate: self._update_all(grads, trainable_variables, rate),
                [g for g, _ in reduced], learning_rate)
            return
        self._update_all(grads, trainable_variables, learning_rate)

    def _update_all(self, grads, trainable_variables, learning_rate):
        learning_rate = tf.cast(learning_rate, tf.float32)
        grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        block_grads, fallback = self._route_gradients(grads, trainable_variables)
        finite = tf.logical_and(tf.equal(self._nonfinite_statistics, 0.0), all_finite(grads))
        corrections = [tf.where(weight > 0, 1.0 / tf.maximum(weight, _TINY), 0.0)
                       for weight in self._statistics_weights]
        damping = tf.cast(self.damping, tf.float32)
        inverses_ok = self._refresh_inverses_if_due(finite, damping, corrections)

        def update():
            self._decay_weights(trainable_variables, learning_rate)
            if self.fisher_buckets == 1:
                updates = [None if gs is None else block.precondition(gs, damping, corrections[0])
                           for block, gs in zip(self.blocks, block_grads, strict=True)]
            else:
                updates = self._bucketed_updates(block_grads, damping, corrections)
            scale = self._kl_clip_scale(updates, block_grads, learning_rate)
            self._update_scale.assign(scale)
            self._apply_with_momentum(updates, scale, learning_rate)
            self._fallback_adam(fallback)
            return tf.constant(True)

        def skip():
            self._skipped_updates.assign_add(1)
            return tf.constant(False)

        tf.cond(tf.logical_and(finite, inverses_ok), update, skip)
        self._nonfinite_statistics.assign(0.0)
        return tf.constant(True)

    def record_bucket_gradients(self, bucket_gradients, variables) -> None:
        """Store this step's per-bucket gradients for the next ``apply`` (``fisher_buckets >
        1``): ``bucket_gradients[b]`` is the gradient, aligned with ``variables``, of
        bucket ``b``'s share ``L_b = 1/N sum_{n in b} l_n`` of the mean loss (so ``sum_b
        L_b = L``). ``apply`` gets the total gradient as usual; the block variables'
        shares are kept in scratch optimizer variables (written every step before they
        are read, so a resumed run does not depend on their checkpointed value)."""
        if self.fisher_buckets == 1:
            raise ValueError("record_bucket_gradients needs fisher_buckets > 1")
        if len(bucket_gradients) != self.fisher_buckets:
            raise ValueError(f"expected gradients of {self.fisher_buckets} buckets, got "
                             f"{len(bucket_gradients)}")
        registration = self._require_registration()
        position = {self._var_key(v): i for i, v in enumerate(variables)}
        block_variables = [v for block in registration.blocks for v in block.variables]
        for bucket, gradients in enumerate(bucket_gradients):
            for slot, variable in zip(self._bucket_gradients[bucket], block_variables,
                                      strict=True):
                index = position.get(self._var_key(variable))
                gradient = None if index is None else gradients[index]
                slot.assign(tf.zeros(slot.shape, slot.dtype) if gradient is None
                            else tf.cast(tf.convert_to_tensor(gradient), slot.dtype))

    def _bucketed_updates(self, block_grads, damping, corrections) -> list:
        """``U = sum_b (F_b + lambda I)^-1 g_b`` per block, with the recorded bucket
        gradients ``g_b`` rescaled, per variable, to the norm of the gradient ``apply``
        got: clipping (clipnorm, global_clipnorm) and loss-scale unscaling multiply each
        variable's gradient by one scalar, which this carries over to its buckets (without
        either, the factor is 1: the train step hands ``apply`` ``g = sum_b g_b``)."""
        slots = [iter(buffers) for buffers in self._bucket_gradients]
        updates = []
        for bucket_zero_block, gs in zip(self.blocks, block_grads, strict=True):
            shares = [[tf.convert_to_tensor(next(slots[b])) for _ in bucket_zero_block.variables]
                      for b in range(self.fisher_buckets)]
            if gs is None:
                updates.append(None)
                continue
            for index, g in enumerate(gs):
                total = tf.add_n([share[index] for share in shares])
                factor = tf.math.divide_no_nan(tf.norm(tf.cast(g, tf.float32)), tf.norm(total))
                for share in shares:
                    share[index] = share[index] * factor
            block_index = len(updates)
            parts = [self._require_registration().bucket_blocks[b][block_index].precondition(
                shares[b], damping, corrections[b]) for b in range(self.fisher_buckets)]
            updates.append([tf.add_n(list(values)) for values in zip(*parts, strict=True)])
        return updates

    def _route_gradients(self, grads, trainable_variables):
        """Per block, its variables' gradients (None: the block got none); and the
        ``(gradient, variable, fallback index)`` triples of the first-order variables."""
        registration = self._require_registration()
        grad_of = {self._var_key(v): g for g, v in zip(grads, trainable_variables, strict=True)}
        variable_of = {self._var_key(v): v for v in trainable_variables}
        block_grads = []
        for block in registration.blocks:
            gs = [grad_of.get(self._var_key(v)) for v in block.variables]
            block_grads.append(None if all(g is None for g in gs) else
                               [tf.zeros(v.shape, tf.float32) if g is None else g
                                for g, v in zip(gs, block.variables, strict=True)])
        fallback = [(grad_of[key], variable_of[key], i)
                    for i, key in enumerate(registration.fallback_keys) if key in grad_of]
        return block_grads, fallback

    def _refresh_inverses_if_due(self, finite, damping, corrections):
        """Every step during the warm-up (and until a first refresh succeeded), then every
        ``inverse_every`` steps; returns whether the refresh (if any) succeeded.
        ``corrections``: the EMA bias correction of each bucket's statistics."""
        bucket_blocks = self._require_registration().bucket_blocks

        def refresh():
            oks = [block.update_inverse(damping, correction)
                   for blocks, correction in zip(bucket_blocks, corrections, strict=True)
                   for block in blocks]
            return tf.reduce_all(tf.stack(oks)) if oks else tf.constant(True)

        due = tf.logical_and(finite, tf.reduce_any(tf.stack([
            tf.equal(self.iterations % self.inverse_every, 0),
            self.iterations < self.inverse_warmup_steps,
            tf.equal(self._inverse_refreshes, 0),
        ])))
        ok = tf.cond(due, refresh, lambda: tf.constant(True))
        self._inverse_refreshes.assign_add(tf.cast(tf.logical_and(due, ok), tf.int64))
        return ok

    def _kl_clip_scale(self, updates, block_grads, learning_rate):
        """``nu = min(1, sqrt(kappa_k / (eta^2 sum_l <U_l, dW_l>)))`` (1 without kl_clip)."""
        products = [tf.reduce_sum(u * tf.cast(g, tf.float32))
                    for us, gs in zip(updates, block_grads, strict=True) if us is not None
                    for u, g in zip(us, gs, strict=True)]
        if self.kl_clip is None or not products:
            return tf.constant(1.0)
        quadratic = tf.maximum(tf.add_n(products), _TINY)
        kappa = self._at_this_step(self.kl_clip)
        return tf.minimum(1.0, tf.sqrt(kappa / (learning_rate**2 * quadratic)))

    def _apply_with_momentum(self, updates, scale, learning_rate):
        """``m <- momentum * m + nu * U``; ``W <- W - eta * m`` (``m = nu U`` without momentum)."""
        slot = 0
        for block, block_updates in zip(self.blocks, updates, strict=True):
            for variable, update in zip(block.variables,
                                        block_updates or [None] * len(block.variables),
                                        strict=True):
                momentum = self._momentums[slot]
                slot += 1
                if update is None:
                    continue
                step = scale * update
                if momentum is not None:
                    self.assign(momentum, self.momentum * momentum + step)
                    step = tf.convert_to_tensor(momentum)
                self.assign_sub(variable, learning_rate * tf.cast(step, tf.float32))

    def _fallback_adam(self, fallback) -> None:
        """Adam (bias-corrected) on the variables without a curvature block."""
        if not fallback:
            return
        momenta, velocities = self._fallback_moments
        rate = self._fallback_lr()
        step = tf.cast(self.iterations + 1, tf.float32)
        alpha = rate * tf.sqrt(1.0 - _FALLBACK_BETA_2 ** step) / (1.0 - _FALLBACK_BETA_1 ** step)
        for gradient, variable, index in fallback:
            m, v = momenta[index], velocities[index]
            gradient = tf.cast(gradient, m.dtype)
            self.assign_add(m, (gradient - m) * (1.0 - _FALLBACK_BETA_1))
            self.assign_add(v, (tf.square(gradient) - v) * (1.0 - _FALLBACK_BETA_2))
            self.assign_sub(variable, tf.cast(alpha, m.dtype) * m
                            / (tf.sqrt(v) + _FALLBACK_EPSILON))

    # -- diagnostics ---------------------------------------------------------------
    def diagnostics(self) -> dict[str, tf.Tensor]:
        """Scalars for TensorBoard: damping, the KL-clip scale ``nu`` of the last update
        (and, when the clip is a schedule, its ``kappa_k`` for the next step), skipped
        updates, inverse refreshes and, per block, the factor eigenvalue extremes (Fisher
        diagonal extremes for GroupNorm) of the last refresh.
        """
        if not self.built:
            return {}
        result = {
            "kfac/damping": tf.convert_to_tensor(self.damping),
            "kfac/update_scale": tf.convert_to_tensor(self._update_scale),
            "kfac/skipped_updates": tf.convert_to_tensor(self._skipped_updates),
            "kfac/inverse_refreshes": tf.convert_to_tensor(self._inverse_refreshes),
        }
        if isinstance(self.kl_clip, LearningRateSchedule):
            result["kfac/kl_clip"] = self._at_this_step(self.kl_clip)
        for bucket, blocks in enumerate(self._require_registration().bucket_blocks):
            prefix = "kfac" if bucket == 0 else f"kfac/bucket{bucket}"
            for block in blocks:
                for key, value in block.diagnostics().items():
                    result[f"{prefix}/{block.name}/{key}"] = tf.convert_to_tensor(value)
        return result

    def state_sizes(self) -> dict[str, int]:
        """Number of float32 values of optimizer state, by kind (after ``build``).

        ``factors``: running ``A``/``G`` factors and GroupNorm Fisher diagonals;
        ``inverses``: the cached damped inverses or eigendecompositions;
        ``momentum``: the heavy-ball buffers of the preconditioned variables;
        ``fallback``: the Adam moments of variables without a block;
        ``bucket_gradients`` (``fisher_buckets > 1`` only): the per-bucket gradient
        buffers. Factors and inverses count every bucket's. Scalars (counters, damping,
        spectra) are left out.
        """
        if not self.built:
            raise ValueError("the optimizer is not built yet")

        def count(variables):
            return int(sum(math.prod(v.shape) for v in variables
                           if v is not None and len(v.shape) > 0))

        blocks = [block for bucket in self._require_registration().bucket_blocks
                  for block in bucket]
        factors = [v for block in blocks for v in block.running_statistics]
        factor_keys = {self._var_key(v) for v in factors}
        caches = [v for block in blocks for v in block.cached_state()
                  if self._var_key(v) not in factor_keys]
        sizes = {
            "factors": count(factors),
            "inverses": count(caches),
            "momentum": count(self._momentums),
            "fallback": count([v for moments in self._fallback_moments for v in moments]),
        }
        if self.fisher_buckets > 1:
            sizes["bucket_gradients"] = count([v for vs in self._bucket_gradients for v in vs])
        return sizes

    # -- serialisation -----------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config.update({
            "damping": self.initial_damping,
            "damping_mode": self.damping_mode,
            "inverse_method": self.inverse_method,
            "approximation": self.approximation,
            "eigenvalue_correction": self.eigenvalue_correction,
            "fisher": self.fisher,
            "mc_samples": self.mc_samples,
            "statistics_examples": self.statistics_examples,
            "statistics_decay": self.statistics_decay,
            "statistics_every": self.statistics_every,
            "inverse_every": self.inverse_every,
            "inverse_warmup_steps": self.inverse_warmup_steps,
            "kl_clip": _schedule_to_config(self.kl_clip),
            "momentum": self.momentum,
            "fallback_learning_rate": _schedule_to_config(self.fallback_learning_rate),
            "fisher_buckets": self.fisher_buckets,
            "seed": self.seed,
            "skip_unsupported_layers": self.skip_unsupported_layers,
        })
        return config
