"""Experiment configuration: one validated dataclass and the factories built from it.

``TrainConfig`` holds every hyperparameter of a run (data, network,
diffusion, optimisation, sampling). :meth:`TrainConfig.validate` checks each
value before any work starts and raises :class:`ConfigError` naming the
option and its allowed range or choices. The factories (:func:`build_model`,
:func:`build_optimizer`) turn a validated config into Keras objects; the
trainers, the sampler CLI and the benchmarks all build through them, so a
checkpoint's ``config.json`` always rebuilds the same model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os

import keras

from tfngd import data as data_lib
from tfngd import distribute, nonfinite, samplers, schedules, sde, timestep_sampling
from tfngd import gaussian_diffusion as gd
from tfngd.model import FISHER_WEIGHTINGS, DiffusionModel
from tfngd.ndm import REVERSE_PARAMETERISATIONS, NeuralDiffusionModel
from tfngd.networks import build_mlp_denoiser, build_unet
from tfngd.optimizers.curvature_blocks import APPROXIMATIONS, INVERSE_METHODS

OPTIMIZERS = ("adam", "adamw", "sgd", "kfac", "ekfac", "dual", "dual_empirical", "stein",
              "kwng")
# The sample-space natural-gradient optimizers (tfngd.optimizers.SampleSpaceNGD) and the
# metric of each (docs/ngd-variants.md).
SAMPLE_SPACE_METRICS = {"dual": "gauss_newton", "dual_empirical": "empirical",
                        "stein": "stein", "kwng": "wasserstein_kernel"}
# The optimizers build_optimizer makes as tfngd.optimizers.KFAC (ekfac: with eigenvalue
# correction); the K-FAC-only options need one of them.
KFAC_OPTIMIZERS = ("kfac", "ekfac")
# K-FAC curvature a run may choose (KFAC(fisher=...)); "exact" is left out: one backward
# pass per output dimension (784 on MNIST) is for tests of small networks.
CONFIG_FISHER_TYPES = ("mc", "empirical")
# Peak learning rate of each optimizer when --learning-rate is not given: Adam's and K-FAC's
# were compared on the main job (docs/kfac.md, section 7); SGD's is a starting point only.
DEFAULT_LEARNING_RATES = {"adam": 2e-3, "adamw": 2e-3, "sgd": 5e-2, "kfac": 0.1,
                          "ekfac": 0.1, **{name: 0.1 for name in SAMPLE_SPACE_METRICS}}
# What is trained: a discrete-time DDPM (tfngd.model), a continuous-time score model on an SDE
# (tfngd.sde), or a Neural Diffusion Model with a learned forward transform (tfngd.ndm).
MODELS = ("ddpm", "score_sde", "ndm")
# Keras dtype policies a run may use (mixed_bfloat16: bfloat16 compute, float32 variables;
# the networks' outputs and K-FAC's curvature stay float32).
PRECISIONS = ("float32", "mixed_bfloat16")
# Options that say how a run is executed, not what it computes: a run may resume under
# other values (another number of GPUs).
RUNTIME_OPTIONS = ("strategy", "nonfinite_policy")
# The samplers of each kind of model; the first is what sampler="auto" picks.
MODEL_SAMPLERS = {"ddpm": ("ddim", "ddpm", "dpmpp_2m"), "score_sde": sde.SDE_SAMPLERS,
                  "ndm": ("ddpm",)}
SAMPLER_CHOICES = ("auto", *dict.fromkeys(s for kinds in MODEL_SAMPLERS.values() for s in kinds))


class ConfigError(ValueError):
    """An invalid hyperparameter; the message names the option and what is allowed."""


@dataclasses.dataclass
class TrainConfig:
    """Every hyperparameter of a training run. Defaults: the built-in digits job."""

    # data
    dataset: str = "digits"
    data_dir: str | None = None
    num_train: int | None = None
    # network (U-Net for images, MLP for vectors)
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (4,)
    num_heads: int = 1
    dropout: float = 0.0
    groups: int = 8
    hidden_units: int = 256
    num_blocks: int = 3
    conditional: bool = False
    class_dropout: float = 0.1
    # diffusion
    model: str = "ddpm"
    sde: str = "vp"
    schedule: str = "cosine"
    num_timesteps: int = 1000
    prediction_type: str = "eps"
    variance_type: str = "fixed_small"
    zero_terminal_snr: bool = False
    min_snr_gamma: float | None = None
    vlb_weight: float = 0.001
    timestep_sampler: str = "uniform"
    # optimisation
    optimizer: str = "kfac"
    learning_rate: float | None = None
    warmup_steps: int = 200
    final_lr_fraction: float = 0.05
    weight_decay: float = 0.0
    momentum: float | None = None
    damping: float = 1e-3
    statistics_every: int = 10
    statistics_examples: int | None = 16
    inverse_every: int = 100
    inverse_method: str = "cholesky"
    kl_clip: float | None = 1e-3
    kl_clip_final: float | None = None
    kfac_approximation: str = "auto"
    cg_iterations: int = 10
    kernel_points: int = 64
    fisher_buckets: int = 1
    fisher_weighting: str = "loss"
    fisher_type: str = "mc"
    global_clipnorm: float | None = 1.0
    batch_size: int = 64
    epochs: int = 30
    steps_per_epoch: int = 100
    ema_decay: float = 0.995
    nonfinite_policy: str = "skip"
    jit_compile: bool = False
    precision: str = "float32"
    strategy: str = "none"
    seed: int = 0
    # sampling
    sampler: str = "auto"
    sample_steps: int = 50
    eta: float = 0.0
    clip_x0: bool = True
    num_samples: int | None = None

    # -- validation ------------------------------------------------------------
    def validate(self) -> TrainConfig:
        """Raise :class:`ConfigError` for the first invalid value; return self.

        Every option is checked against its rule in :data:`OPTION_RULES` (type, range
        or choices), then the options that constrain each other.
        """
        for field in dataclasses.fields(self):
            OPTION_RULES[field.name].check(field.name, getattr(self, field.name))
        for channels in (self.base_channels, *(self.base_channels * m for m in self.channel_mults)):
            if channels % self.groups:
                raise ConfigError(
                    f"groups={self.groups} must divide the channels of every U-Net level "
                    f"(base_channels * channel_mults), but not {channels}"
                )
        if self.zero_terminal_snr and self.prediction_type == "eps":
            raise ConfigError("zero_terminal_snr needs prediction_type 'v' or 'x0', not 'eps'")
        if self.warmup_steps >= self.total_steps:
            raise ConfigError(
                f"warmup_steps={self.warmup_steps} must be smaller than the total number of "
                f"steps (epochs * steps_per_epoch = {self.total_steps})"
            )
        if self.sample_steps > self.num_timesteps:
            raise ConfigError(f"sample_steps={self.sample_steps} is not valid; it must be an "
                              f"integer in [1, {self.num_timesteps}] (num_timesteps)")
        self._validate_model_kind()
        self._validate_kfac_options()
        return self

    def _validate_kfac_options(self) -> None:
        """K-FAC's own options: ``fisher_buckets`` / ``fisher_weighting`` (the diffusion-aware
        Fisher), ``kl_clip_final`` and ``fisher_type``."""
        if self.fisher_buckets > 1:
            if self.optimizer != "kfac":
                raise ConfigError(f"fisher_buckets={self.fisher_buckets} needs optimizer "
                                  f"'kfac' (not {self.optimizer!r}): it buckets K-FAC's Fisher")
            if self.model != "ddpm":
                raise ConfigError(f"fisher_buckets={self.fisher_buckets} needs model 'ddpm': "
                                  f"model={self.model!r} does not bucket its examples")
            if self.strategy != "none":
                raise ConfigError(f"fisher_buckets={self.fisher_buckets} runs on one device "
                                  f"only: strategy must be 'none', not {self.strategy!r}")
            if self.kfac_approximation_used not in ("expand", "reduce"):
                raise ConfigError(f"fisher_buckets={self.fisher_buckets} needs "
                                  "kfac_approximation 'expand' or 'reduce', not "
                                  f"{self.kfac_approximation_used!r}")
        if self.kl_clip_final is not None and (self.optimizer not in KFAC_OPTIMIZERS
                                               or self.kl_clip is None):
            raise ConfigError(f"kl_clip_final={self.kl_clip_final} ramps K-FAC's KL clip: it "
                              "needs optimizer 'kfac' or 'ekfac' and a kl_clip to start from "
                              f"(got {self.optimizer!r}, kl_clip={self.kl_clip})")
        if self.fisher_type != "mc" and self.optimizer not in KFAC_OPTIMIZERS:
            raise ConfigError(f"fisher_type={self.fisher_type!r} is K-FAC's curvature: it needs "
                              f"optimizer 'kfac' or 'ekfac', not {self.optimizer!r}")
        if self.fisher_weighting != "loss":
            if self.fisher_type == "empirical":
                raise ConfigError(f"fisher_weighting={self.fisher_weighting!r} reweights the "
                                  "probes of an mc Fisher; fisher_type='empirical' has none "
                                  "(its statistics are the loss's own gradients)")
            if self.optimizer not in KFAC_OPTIMIZERS or self.model != "ddpm":
                raise ConfigError(f"fisher_weighting={self.fisher_weighting!r} changes the "
                                  "K-FAC Fisher of a DDPM: it needs optimizer 'kfac' or "
                                  f"'ekfac' and model 'ddpm' (got {self.optimizer!r}, "
                                  f"{self.model!r})")

    def _validate_model_kind(self) -> None:
        """The options that depend on ``model`` (what each kind of model supports)."""
        if self.sampler != "auto" and self.sampler not in MODEL_SAMPLERS[self.model]:
            raise ConfigError(f"sampler={self.sampler!r} does not sample a model={self.model!r}; "
                              f"choose one of: {', '.join(('auto', *MODEL_SAMPLERS[self.model]))}")
        if self.sampling_method in samplers.SAMPLERS:  # the samplers' own rules, e.g. eta
            try:
                samplers.make_sampler(self.sampling_method, eta=self.eta)
            except ValueError as err:
                raise ConfigError(f"sampler={self.sampling_method!r}: {err}") from None
        if self.model == "score_sde":
            if self.timestep_sampler != "uniform":
                raise ConfigError("model='score_sde' draws continuous times t ~ U(eps, 1): "
                                  "timestep_sampler must be 'uniform'")
        if self.model == "ndm":
            if self.prediction_type not in REVERSE_PARAMETERISATIONS:
                raise ConfigError(
                    "model='ndm' predicts the data: prediction_type must be one of "
                    f"{', '.join(REVERSE_PARAMETERISATIONS)}, not {self.prediction_type!r}")
            if self.conditional:
                raise ConfigError("model='ndm' is unconditional: conditional must be False")
        if self.model != "ddpm" and self.min_snr_gamma is not None:
            raise ConfigError(f"model={self.model!r} has no Min-SNR weighting: "
                              "min_snr_gamma must be none")
        if self.model == "score_sde" and self.variance_type != "fixed_small":
            raise ConfigError("model='score_sde' has no reverse-step variance: variance_type "
                              "must be 'fixed_small'")

    @property
    def sampling_method(self) -> str:
        """``sampler``, with ``"auto"`` resolved to the model kind's first sampler, except
        that a DDPM on 2-D toy data samples ancestrally: deterministic DDIM from
        ``t = T - 1`` amplifies the eps error by ``1 / sqrt(abar)`` (~300 on the cosine
        schedule) and, without x0 clipping (vector data are never clipped), throws
        samples far outside the data (measured: |x| up to 23 for data in [-4, 4])."""
        if self.sampler != "auto":
            return self.sampler
        if self.model == "ddpm" and self.dataset in data_lib.TOY_DATASETS:
            return "ddpm"
        return MODEL_SAMPLERS[self.model][0]

    @property
    def kfac_approximation_used(self) -> str:
        """``kfac_approximation``, with ``"auto"`` resolved: ``"per_example"`` for an NDM
        (its transform is evaluated several times per example and the bound depends on
        differences of those evaluations, which expand and reduce get wrong by orders of
        magnitude: docs/kfac.md section 2), ``"expand"`` otherwise (every layer is called
        once; expand is the measured default of the main job)."""
        if self.kfac_approximation != "auto":
            return self.kfac_approximation
        return "per_example" if self.model == "ndm" else "expand"

    def sample_kwargs(self) -> dict:
        """Keyword arguments of the model's ``sample`` for this run's sampler settings
        (``num_steps`` included; ``num_samples`` and ``seed`` excluded)."""
        if self.model == "score_sde":
            return {"sampler": self.sampling_method, "num_steps": self.sample_steps}
        if self.model == "ndm":
            return {"num_steps": self.sample_steps, "clip_x0": self.clip_x0}
        return {"sampler": self.sampling_method, "num_steps": self.sample_steps,
                "eta": self.eta, "clip_x0": self.clip_x0}

    def samples_for(self, data_shape) -> int:
        """Samples in the final picture: a grid of 64 images, or a 2048-point scatter plot."""
        if self.num_samples is not None:
            return self.num_samples
        return 64 if len(data_shape) == 3 else 2048

    @property
    def peak_learning_rate(self) -> float:
        """``learning_rate``, or the optimizer's default (:data:`DEFAULT_LEARNING_RATES`)."""
        if self.learning_rate is not None:
            return float(self.learning_rate)
        return DEFAULT_LEARNING_RATES[self.optimizer]

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    # -- serialisation -----------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config options: {', '.join(unknown)}")
        values = dict(values)
        for key in ("channel_mults", "attention_resolutions"):
            if key in values and values[key] is not None:
                values[key] = tuple(values[key])
        return cls(**values)

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> TrainConfig:
        try:
            with open(path) as f:
                values = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read the run config {path}: {err}") from err
        return cls.from_dict(values)


# -- option rules ----------------------------------------------------------------
def _format_bound(value) -> str:
    return f"{value:g}" if isinstance(value, float) and abs(value) >= 1e5 else str(value)


class Rule:
    """What values an option takes: :meth:`accepts` and a :meth:`describe` of it for
    messages and ``--help``; :meth:`check` raises the option's :class:`ConfigError`."""

    def describe(self) -> str:
        raise NotImplementedError

    def accepts(self, value) -> bool:
        raise NotImplementedError

    def requirement(self) -> str:
        return f"it must be {self.describe()}"

    def check(self, option: str, value) -> None:
        if not self.accepts(value):
            raise ConfigError(f"{option}={value!r} is not valid; {self.requirement()}")


@dataclasses.dataclass(frozen=True)
class Range(Rule):
    """A numeric option: ``kind`` (``int`` or ``float``; bools are not numbers here) in
    ``[low, high]`` (``low_open``/``high_open``: that end excluded); ``optional``: None
    is allowed too (it means "off" or "the default", see the option's help)."""

    kind: type
    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    optional: bool = False

    def describe(self) -> str:
        lo, hi = "(" if self.low_open else "[", ")" if self.high_open else "]"
        what = "an integer" if self.kind is int else "a finite number"
        return (f"{what} in {lo}{_format_bound(self.low)}, {_format_bound(self.high)}{hi}"
                + (" or none" if self.optional else ""))

    def accepts(self, value) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind is int and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below


@dataclasses.dataclass(frozen=True)
class Choice(Rule):
    """A named option: one of ``choices``."""

    choices: tuple

    def describe(self) -> str:
        return "one of: " + ", ".join(self.choices)

    def accepts(self, value) -> bool:
        return isinstance(value, str) and value in self.choices

    def requirement(self) -> str:
        return f"choose {self.describe()}"


@dataclasses.dataclass(frozen=True)
class Flag(Rule):
    """A yes/no option (``True`` or ``False``)."""

    def describe(self) -> str:
        return "true or false"

    def accepts(self, value) -> bool:
        return isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Sizes(Rule):
    """A list of integers, each in ``item`` (``min_length`` to ``max_length`` entries)."""

    item: Range
    min_length: int = 0
    max_length: int = 8

    def describe(self) -> str:
        count = (f"{self.min_length} to {self.max_length}" if self.min_length
                 else f"at most {self.max_length}")
        return f"a list of {count} integers, each in [{self.item.low}, {self.item.high}]"

    def accepts(self, value) -> bool:
        return isinstance(value, (tuple, list)) and (
            self.min_length <= len(value) <= self.max_length) and all(
            self.item.accepts(v) for v in value)


@dataclasses.dataclass(frozen=True)
class Path(Rule):
    """A file system path, or None."""

    def describe(self) -> str:
        return "a path or none"

    def accepts(self, value) -> bool:
        return value is None or (isinstance(value, str) and value != "")


_UNIT = Range(float, 0.0, 1.0)
_FRACTION_OPEN = Range(float, 0.0, 1.0, high_open=True)
_PERIOD = Range(int, 1, 1_000_000)
# The rule of every TrainConfig option (tests/test_config.py checks that none is missing).
# Size limits keep a typo from allocating a model or a request that cannot fit.
OPTION_RULES = {
    "dataset": Choice(data_lib.DATASETS),
    "data_dir": Path(),
    "num_train": Range(int, 1, 100_000_000, optional=True),
    "base_channels": Range(int, 1, 1024),
    "channel_mults": Sizes(Range(int, 1, 64), min_length=1),
    "num_res_blocks": Range(int, 1, 16),
    "attention_resolutions": Sizes(Range(int, 1, 4096)),
    "num_heads": Range(int, 1, 64),
    "dropout": _FRACTION_OPEN,
    "groups": Range(int, 1, 1024),
    "hidden_units": Range(int, 1, 65_536),
    "num_blocks": Range(int, 0, 64),
    "conditional": Flag(),
    "class_dropout": _UNIT,
    "model": Choice(MODELS),
    "sde": Choice(sde.SDE_NAMES),
    "schedule": Choice(schedules.SCHEDULES),
    "num_timesteps": Range(int, 2, 100_000),
    "prediction_type": Choice(gd.PREDICTION_TYPES),
    "variance_type": Choice(gd.VARIANCE_TYPES),
    "zero_terminal_snr": Flag(),
    "min_snr_gamma": Range(float, 0.0, 1e6, low_open=True, optional=True),
    "vlb_weight": Range(float, 0.0, 1e6),
    "timestep_sampler": Choice(timestep_sampling.TIMESTEP_SAMPLERS),
    "optimizer": Choice(OPTIMIZERS),
    "learning_rate": Range(float, 0.0, 10.0, low_open=True, optional=True),
    "warmup_steps": Range(int, 0, 1_000_000_000),
    "final_lr_fraction": _UNIT,
    "weight_decay": _UNIT,
    "momentum": Range(float, 0.0, 1.0, high_open=True, optional=True),
    "damping": Range(float, 0.0, 1e6, low_open=True),
    "statistics_every": _PERIOD,
    "statistics_examples": Range(int, 1, 65_536, optional=True),
    "inverse_every": _PERIOD,
    "inverse_method": Choice(INVERSE_METHODS),
    "kl_clip": Range(float, 0.0, 1e6, low_open=True, optional=True),
    "kl_clip_final": Range(float, 0.0, 1e6, low_open=True, optional=True),
    "kfac_approximation": Choice(("auto", *APPROXIMATIONS)),
    "cg_iterations": Range(int, 1, 10_000),
    "kernel_points": Range(int, 1, 65_536),
    "fisher_buckets": Range(int, 1, 1000),
    "fisher_weighting": Choice(FISHER_WEIGHTINGS),
    "fisher_type": Choice(CONFIG_FISHER_TYPES),
    "global_clipnorm": Range(float, 0.0, 1e6, low_open=True, optional=True),
    "batch_size": Range(int, 1, 65_536),
    "epochs": Range(int, 1, 1_000_000),
    "steps_per_epoch": Range(int, 1, 10_000_000),
    "ema_decay": _FRACTION_OPEN,
    "nonfinite_policy": Choice(nonfinite.POLICIES),
    "jit_compile": Flag(),
    "precision": Choice(PRECISIONS),
    "strategy": Choice(distribute.STRATEGIES),
    "seed": Range(int, 0, 2**31 - 1),
    "sampler": Choice(SAMPLER_CHOICES),
    "sample_steps": Range(int, 1, 100_000),
    "eta": Range(float, 0.0, 1e3),
    "clip_x0": Flag(),
    "num_samples": Range(int, 1, 65_536, optional=True),
}


# -- factories -------------------------------------------------------------------
def build_diffusion(config: TrainConfig) -> gd.GaussianDiffusion:
    return gd.GaussianDiffusion(
        schedule=config.schedule,
        num_timesteps=config.num_timesteps,
        prediction_type=config.prediction_type,
        variance_type=config.variance_type,
        zero_terminal_snr=config.zero_terminal_snr,
        min_snr_gamma=config.min_snr_gamma,
    )


def build_denoiser(config: TrainConfig, data_shape: tuple, num_classes: int | None,
                   name: str | None = None, predicts_variance: bool = True):
    """The U-Net for image data (rank-3 examples), the MLP for vectors.

    A ``score_sde`` model's network takes a float32 time (smooth in ``t``: the
    probability-flow ODE's right-hand side is then not piecewise constant).
    """
    classes = num_classes if config.conditional else None
    time_dtype = "float32" if config.model == "score_sde" else "int32"
    named = {} if name is None else {"name": name}
    # learned_range: the network also outputs the variance values (2x the data channels).
    # (predicts_variance=False: a network that never predicts one, an NDM's transform.)
    out_channels = gd.output_channels(
        config.variance_type if predicts_variance else "fixed_small",
        data_shape[-1] if data_shape else 1)
    if config.conditional and num_classes is None:
        raise ConfigError(f"conditional=True, but data set {config.dataset!r} has no labels")
    if len(data_shape) == 3:
        return build_unet(
            data_shape,
            base_channels=config.base_channels,
            channel_mults=config.channel_mults,
            num_res_blocks=config.num_res_blocks,
            attention_resolutions=config.attention_resolutions,
            num_heads=config.num_heads,
            dropout=config.dropout,
            groups=config.groups,
            num_classes=classes,
            time_dtype=time_dtype,
            output_channels=out_channels,
            **named,
        )
    if len(data_shape) == 1:
        return build_mlp_denoiser(
            data_shape[0], config.hidden_units, config.num_blocks, num_classes=classes,
            time_dtype=time_dtype, out_dim=out_channels, **named,
        )
    raise ConfigError(f"unsupported example shape {data_shape}: expected (H, W, C) or (D,)")


def build_model(config: TrainConfig, data_shape: tuple,
                num_classes: int | None = None) -> keras.Model:
    """The (uncompiled) model that ``config`` describes: a :class:`DiffusionModel`
    (``model="ddpm"``), a :class:`~tfngd.sde.ScoreSDEModel` (``"score_sde"``, on the
    SDE named by ``config.sde``) or a :class:`~tfngd.ndm.NeuralDiffusionModel`
    (``"ndm"``: transform and reverse network of the same architecture).

    The initial weights are a function of ``config.seed`` (Keras' global
    seed is set from it before the layers are built).
    """
    with dtype_policy(config.precision):
        return _build_model(config, tuple(data_shape), num_classes)


@contextlib.contextmanager
def dtype_policy(name: str):
    """Keras' global dtype policy set to ``name`` while building a model, then restored."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _build_model(config: TrainConfig, data_shape: tuple, num_classes: int | None):
    keras.utils.set_random_seed(config.seed)
    if config.model == "score_sde":
        diffusion = build_diffusion(config)
        return sde.ScoreSDEModel(
            build_denoiser(config, data_shape, num_classes),
            sde.make_sde(config.sde, diffusion=diffusion),
            prediction_type=config.prediction_type,
            ema_decay=config.ema_decay,
            num_classes=num_classes if config.conditional else None,
            class_dropout=config.class_dropout,
            seed=config.seed,
        )
    if config.model == "ndm":
        return NeuralDiffusionModel(
            build_denoiser(config, data_shape, None, name="transform_network",
                           predicts_variance=False),
            build_denoiser(config, data_shape, None, name="reverse_network"),
            build_diffusion(config),
            timestep_sampler=config.timestep_sampler,
            ema_decay=config.ema_decay,
            seed=config.seed,
        )
    return DiffusionModel(
        build_denoiser(config, tuple(data_shape), num_classes),
        build_diffusion(config),
        timestep_sampler=config.timestep_sampler,
        ema_decay=config.ema_decay,
        num_classes=num_classes if config.conditional else None,
        class_dropout=config.class_dropout,
        vlb_weight=config.vlb_weight,
        fisher_weighting=config.fisher_weighting,
        seed=config.seed,
    )


def learning_rate_schedule(config: TrainConfig) -> keras.optimizers.schedules.LearningRateSchedule:
    """Linear warm-up from 0 to the peak learning rate, then cosine decay to
    ``final_lr_fraction`` times the peak at the last step (Loshchilov & Hutter 2017)."""
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        decay_steps=config.total_steps - config.warmup_steps,
        alpha=config.final_lr_fraction,
        warmup_target=config.peak_learning_rate,
        warmup_steps=config.warmup_steps,
    )


def kl_clip_schedule(config: TrainConfig):
    """K-FAC's ``kl_clip``: the constant ``config.kl_clip`` or, with ``kl_clip_final``, the
    geometric ramp ``kappa_k = kappa_0 (kappa_final / kappa_0)^(k / total_steps)``, which
    holds the trust region tight while the first steps are large and loosens it as the
    learning rate decays (docs/kfac.md, "The update": the KL clip)."""
    if config.kl_clip_final is None:
        return config.kl_clip
    return keras.optimizers.schedules.ExponentialDecay(
        config.kl_clip, decay_steps=config.total_steps,
        decay_rate=config.kl_clip_final / config.kl_clip)


def build_optimizer(config: TrainConfig) -> keras.optimizers.Optimizer:
    """The Keras optimizer named by ``config.optimizer`` with the warm-up + cosine schedule."""
    lr = learning_rate_schedule(config)
    common = {"learning_rate": lr, "global_clipnorm": config.global_clipnorm}
    if config.optimizer == "adam":
        return keras.optimizers.Adam(**common)
    if config.optimizer == "adamw":
        return keras.optimizers.AdamW(weight_decay=config.weight_decay, **common)
    if config.optimizer == "sgd":
        momentum = 0.9 if config.momentum is None else config.momentum
        return keras.optimizers.SGD(momentum=momentum, nesterov=True, **common)
    if config.optimizer in KFAC_OPTIMIZERS:
        from tfngd.optimizers import KFAC

        # EKFAC: the eigenbasis with corrected eigenvalues (eigen damping, eigh inverses).
        ekfac = config.optimizer == "ekfac"
        modes = ({"damping_mode": "eigen", "inverse_method": "eigh",
                  "eigenvalue_correction": True} if ekfac
                 else {"inverse_method": config.inverse_method})
        return KFAC(damping=config.damping, statistics_every=config.statistics_every,
                    statistics_examples=config.statistics_examples,
                    inverse_every=config.inverse_every,
                    approximation=config.kfac_approximation_used,
                    fisher_buckets=config.fisher_buckets, fisher=config.fisher_type,
                    kl_clip=kl_clip_schedule(config),
                    momentum=0.5 if config.momentum is None else config.momentum,
                    seed=config.seed, **modes, **common)
    if config.optimizer in SAMPLE_SPACE_METRICS:
        from tfngd.optimizers import SampleSpaceNGD

        return SampleSpaceNGD(metric=SAMPLE_SPACE_METRICS[config.optimizer],
                              damping=config.damping,
                              momentum=0.0 if config.momentum is None else config.momentum,
                              cg_iterations=config.cg_iterations,
                              kernel_points=config.kernel_points, **common)
    raise ConfigError(f"optimizer={config.optimizer!r} is not valid; choose one of: "
                      f"{', '.join(OPTIMIZERS)}")


OPTION_HELP = {
    "dataset": f"data set: {', '.join(data_lib.DATASETS)}",
    "data_dir": "directory with MNIST IDX files (offline) or a tensorflow-datasets data_dir",
    "num_train": "use only the first N training examples",
    "base_channels": "U-Net channels at the first resolution level",
    "channel_mults": "U-Net channel multiplier per level, comma separated",
    "num_res_blocks": "U-Net residual blocks per level",
    "attention_resolutions": "spatial sizes with self-attention, comma separated (empty: none)",
    "num_heads": "attention heads",
    "dropout": "dropout rate in residual blocks",
    "groups": "GroupNormalization groups (must divide every level's channels)",
    "hidden_units": "MLP denoiser width (vector data)",
    "num_blocks": "MLP denoiser residual blocks (vector data)",
    "conditional": "train a class-conditional model (classifier-free guidance)",
    "class_dropout": "probability of the null label in conditional training",
    "schedule": f"noise schedule: {', '.join(schedules.SCHEDULES)}",
    "num_timesteps": "length T of the diffusion chain",
    "prediction_type": f"network output: {', '.join(gd.PREDICTION_TYPES)}",
    "variance_type": f"reverse-process variance: {', '.join(gd.VARIANCE_TYPES)}",
    "zero_terminal_snr": "rescale the schedule to zero terminal SNR (needs v or x0 prediction)",
    "min_snr_gamma": "Min-SNR-gamma loss weighting (e.g. 5); 'none' disables",
    "vlb_weight": "weight lambda of the variational-bound term in the hybrid loss "
    "L_simple + lambda L_vlb (Nichol & Dhariwal: 0.001); learned_range only, ignored otherwise",
    "timestep_sampler": "training timestep sampler: "
    + ", ".join(timestep_sampling.TIMESTEP_SAMPLERS),
    "optimizer": f"optimizer: {', '.join(OPTIMIZERS)} (ekfac: K-FAC with eigenvalue "
    "correction, George et al. 2018; it ignores inverse_method. dual, dual_empirical, stein, "
    "kwng: natural gradient solved in the sample space with the Gauss-Newton, empirical "
    "Fisher, Stein-particle or kernelised Wasserstein metric, docs/ngd-variants.md)",
    "learning_rate": "peak learning rate (after warm-up; cosine decay afterwards); 'none': the "
    "optimizer's default, "
    + ", ".join(f"{name} {rate:g}" for name, rate in DEFAULT_LEARNING_RATES.items()),
    "warmup_steps": "linear learning-rate warm-up steps",
    "final_lr_fraction": "learning rate at the last step, as a fraction of the peak",
    "weight_decay": "decoupled weight decay (adamw)",
    "momentum": "momentum; default 0.9 for sgd (Nesterov), 0.5 for kfac (heavy ball on the "
    "preconditioned update; 0.9 diverged on diffusion, see docs/kfac.md), 0 for the "
    "sample-space optimizers (SPRING momentum)",
    "damping": "Tikhonov damping lambda of the natural-gradient metric (kfac, ekfac, dual, "
    "dual_empirical, stein, kwng)",
    "statistics_every": "K-FAC curvature statistics period in steps (kfac)",
    "statistics_examples": "K-FAC: curvature statistics from the first N examples of each batch "
    "(kfac; 'none': all)",
    "inverse_every": "K-FAC inverse refresh period in steps (kfac)",
    "inverse_method": "K-FAC factor inverses: eigh, or cholesky (much faster under XLA) (kfac)",
    "kl_clip": "K-FAC trust region kappa: the update is scaled by nu = min(1, sqrt(kappa / "
    "(eta^2 g^T F^-1 g))), so the quadratic KL of a step is at most kappa; 'none' disables "
    "(kfac, ekfac)",
    "kl_clip_final": "K-FAC: kappa at the last step; the clip ramps geometrically from kl_clip "
    "to it over training ('none': a constant kl_clip) (kfac, ekfac)",
    "kfac_approximation": "K-FAC factors of shared weights (convolutions, Dense over tokens, "
    "layers called several times): auto (per_example for ndm, else expand), expand (every "
    "position an example), reduce (positions pooled first: cheaper) or per_example (from each "
    "example's gradient matrix: right for differenced calls, as in ndm) (kfac)",
    "fisher_buckets": "K-FAC statistics kept separately for this many equal-width timestep "
    "bins; the update sums each bin's preconditioned gradient (1: one pooled Fisher) (kfac, "
    "ddpm, one device)",
    "fisher_weighting": "loss weights in the K-FAC Fisher: loss (the Fisher of the weighted "
    "loss, importance x Min-SNR weights) or unweighted (every timestep's curvature counted "
    "equally; the gradient stays weighted) (kfac, ddpm)",
    "fisher_type": "K-FAC's curvature: mc (the Fisher, one Monte Carlo output sample per "
    "example) or empirical (outer products of the real per-example loss gradients: biased, "
    "no probe backward pass) (kfac, ekfac)",
    "cg_iterations": "conjugate-gradient steps per update of the sample-space solve (dual, "
    "dual_empirical, stein, kwng)",
    "kernel_points": "Nystrom points of the kernelised Wasserstein metric (kwng)",
    "global_clipnorm": "clip the global gradient norm to this value; 'none' disables (the "
    "sample-space optimizers clip their direction)",
    "batch_size": "training batch size",
    "epochs": "training epochs",
    "steps_per_epoch": "optimizer steps per epoch (checkpoint and log interval)",
    "ema_decay": "decay of the EMA weights used for sampling and evaluation",
    "nonfinite_policy": "a step whose loss or gradients are NaN or inf is never applied; "
    "then: skip (count it, warn, go on) or stop (end the run with an error; the last "
    "checkpoint is intact)",
    "jit_compile": "compile the train step with XLA (on several replicas: each replica's "
    "forward and backward pass; alias --jit)",
    "precision": "Keras dtype policy: " + ", ".join(PRECISIONS) + " (bfloat16 compute, "
    "float32 variables, outputs and K-FAC curvature)",
    "strategy": "tf.distribute strategy: none (one device), mirrored (every GPU of this "
    "machine; with --cpu-devices N, N logical CPUs), multi_worker (the machines of TF_CONFIG)",
    "seed": "seed of initialisation, data order, timesteps and noise",
    "model": "what is trained: " + ", ".join(MODELS) + " (discrete-time DDPM; continuous-time "
    "score model on an SDE; Neural Diffusion Model with a learned forward transform, needs "
    "prediction_type x0 or v)",
    "sde": f"the SDE of a score_sde model: {', '.join(sde.SDE_NAMES)}",
    "sampler": "sampler for the sample grid and the export: auto (the model's first; ddpm "
    "for a DDPM on 2-D toy data), "
    + "; ".join(f"{kind}: {', '.join(names)}" for kind, names in MODEL_SAMPLERS.items()),
    "sample_steps": "sampling steps (respaced chain)",
    "eta": "DDIM eta (0: deterministic; must be 0 for dpmpp_2m)",
    "clip_x0": "clip the predicted x0 to [-1, 1] while sampling",
    "num_samples": "samples in the final grid (default: 64 images, or 2048 points for 2-D data)",
}
