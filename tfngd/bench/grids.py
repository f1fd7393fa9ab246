"""Tuning grids: an equal tuning budget for every optimizer.

Stage 1 of the protocol runs every point of an optimizer's grid once, on the
short horizon with seed 0. Every default grid has **four** points, so every
optimizer gets the same number of tuning runs. Two tables, by task kind:

==========  ===================================  ==================================
optimizer   image tasks (U-Net), ``GRIDS``       2-D tasks (MLP), ``POINT_GRIDS``
==========  ===================================  ==================================
adam/adamw  lr 5e-4, 1e-3, 2e-3, 4e-3            lr 1e-3, 2e-3, 4e-3, 8e-3
sgd         lr 0.01, 0.03, 0.1, 0.3              lr 0.03, 0.1, 0.3, 1.0
kfac/ekfac  lr {0.03, 0.1} x damping {1e-3, 1e-2}  lr {0.1, 0.3} x damping {1e-3, 1e-2}
dual, ...   the same as kfac                      lr {0.3, 1.0} x damping {0.1, 0.3}
==========  ===================================  ==================================

(``dual, ...``: the sample-space optimizers ``dual``, ``dual_empirical``, ``stein`` and
``kwng``, whose damping is added to a metric of the mean loss on K-FAC's scale. Their 2-D
grid sits higher than K-FAC's: each batch's metric has rank at most ``N D``, and a
200-step checkerboard scan (BENCHMARKS.md) found damping 1e-3 / 1e-2 far worse and the
best points at lr 1, damping 0.3.)

(SGD: Nesterov momentum 0.9, the config's default; the 2-D grids sit higher
because a first tuning pass with the image grids chose the largest value of
every grid on all of them.) Any other optimizer of
:data:`tfngd.config.OPTIMIZERS` (a natural-gradient variant added later) gets
:data:`DEFAULT_NGD_GRID`, a four-point learning-rate grid; add an entry to the
tables to give it its own.

:data:`FIXED_HYPERPARAMETERS` are per-optimizer settings that are not tuned
(AdamW's decoupled weight decay). The grid of an optimizer is the Cartesian
product of its per-parameter value lists, in the order the parameters are
listed. ``--grid OPT:PARAM=v1,v2`` replaces one list (:func:`parse_grid_spec`).
"""

from __future__ import annotations

import itertools
import math
import typing

from tfngd.config import OPTIMIZERS, SAMPLE_SPACE_METRICS, TrainConfig

FIRST_ORDER = ("adam", "adamw", "sgd")

# Optimizer hyperparameters a grid may vary (TrainConfig fields).
TUNABLE = ("learning_rate", "damping", "momentum", "weight_decay", "statistics_every",
           "inverse_every", "global_clipnorm", "final_lr_fraction", "kfac_approximation",
           "cg_iterations", "kernel_points", "fisher_buckets", "fisher_weighting",
           "fisher_type", "kl_clip", "kl_clip_final")

GRIDS: dict[str, dict[str, tuple]] = {
    "adam": {"learning_rate": (5e-4, 1e-3, 2e-3, 4e-3)},
    "adamw": {"learning_rate": (5e-4, 1e-3, 2e-3, 4e-3)},
    "sgd": {"learning_rate": (0.01, 0.03, 0.1, 0.3)},
    "kfac": {"learning_rate": (0.03, 0.1), "damping": (1e-3, 1e-2)},
    "ekfac": {"learning_rate": (0.03, 0.1), "damping": (1e-3, 1e-2)},
}
GRIDS.update({name: dict(GRIDS["kfac"]) for name in SAMPLE_SPACE_METRICS})
POINT_GRIDS: dict[str, dict[str, tuple]] = {
    "adam": {"learning_rate": (1e-3, 2e-3, 4e-3, 8e-3)},
    "adamw": {"learning_rate": (1e-3, 2e-3, 4e-3, 8e-3)},
    "sgd": {"learning_rate": (0.03, 0.1, 0.3, 1.0)},
    "kfac": {"learning_rate": (0.1, 0.3), "damping": (1e-3, 1e-2)},
    "ekfac": {"learning_rate": (0.1, 0.3), "damping": (1e-3, 1e-2)},
}
POINT_GRIDS.update({name: {"learning_rate": (0.3, 1.0), "damping": (0.1, 0.3)}
                    for name in SAMPLE_SPACE_METRICS})
GRID_TABLES = {"images": GRIDS, "points": POINT_GRIDS}
DEFAULT_NGD_GRID: dict[str, tuple] = {"learning_rate": (0.01, 0.03, 0.1, 0.3)}
FIXED_HYPERPARAMETERS: dict[str, dict] = {"adamw": {"weight_decay": 0.01}}


def is_first_order(optimizer: str) -> bool:
    return optimizer in FIRST_ORDER


def check_optimizer(name: str) -> str:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from: {', '.join(OPTIMIZERS)}")
    return name


def grid_for(optimizer: str, overrides: dict | None = None,
             kind: str = "images") -> dict[str, tuple]:
    """The value lists of ``optimizer``'s grid for tasks of ``kind`` (``"images"`` or
    ``"points"``); ``overrides`` (``{param: values}``) replace or add lists."""
    check_optimizer(optimizer)
    grid = dict(GRID_TABLES[kind].get(optimizer, DEFAULT_NGD_GRID))
    for name, values in (overrides or {}).items():
        grid[name] = tuple(values)
    return grid


def expand(grid: dict[str, tuple]) -> list[dict]:
    """The Cartesian product of the value lists, as one dict per grid point."""
    names = list(grid)
    return [dict(zip(names, point, strict=True))
            for point in itertools.product(*(grid[name] for name in names))]


def grid_points(optimizer: str, overrides: dict | None = None,
                kind: str = "images") -> list[dict]:
    """Every tuning configuration of ``optimizer``: fixed settings plus one grid point."""
    fixed = FIXED_HYPERPARAMETERS.get(optimizer, {})
    return [{**fixed, **point} for point in expand(grid_for(optimizer, overrides, kind))]


def _field_parser(name: str):
    hint = typing.get_type_hints(TrainConfig)[name]
    if hint is int:
        return int
    if hint is str:
        return _choice_parser(name)
    if hint == (float | None):
        return lambda text: None if text.lower() in ("none", "off") else float(text)
    return float


class _InvalidChoice(ValueError):
    """A string value outside its option's choices (the message names them)."""


def _choice_parser(name: str):
    """A string option, checked against its valid choices (TrainConfig's own check)."""
    def parse(text: str) -> str:
        try:
            TrainConfig(**{name: text}).validate()
        except ValueError as err:
            raise _InvalidChoice(str(err)) from err
        return text

    return parse


def parse_value(name: str, text: str):
    """One grid value of hyperparameter ``name`` (typed like its TrainConfig field)."""
    try:
        value = _field_parser(name)(text.strip())
    except ValueError as err:
        message = str(err) if isinstance(err, _InvalidChoice) else (
            f"cannot read {text.strip()!r} as a number")
        raise ValueError(f"{name}: {message}") from err
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name}: {text.strip()!r} is not a finite number")
    return value


def parse_grid_spec(spec: str) -> tuple[str, str, tuple]:
    """``"OPT:PARAM=v1,v2,..."`` -> ``(optimizer, param, values)``.

    ``OPT=v1,v2`` is short for ``OPT:learning_rate=v1,v2``. Raises ``ValueError``
    naming the problem (unknown optimizer or parameter, unreadable or repeated value).
    """
    if "=" not in spec:
        raise ValueError(f"--grid {spec!r}: expected OPT:PARAM=v1,v2 (e.g. adam:learning_rate="
                         "1e-3,2e-3)")
    head, _, body = spec.partition("=")
    optimizer, _, param = head.partition(":")
    optimizer, param = optimizer.strip(), (param.strip() or "learning_rate")
    check_optimizer(optimizer)
    if param not in TUNABLE:
        raise ValueError(f"--grid {spec!r}: {param!r} is not a tunable optimizer "
                         f"hyperparameter; choose from: {', '.join(TUNABLE)}")
    parts = [part for part in body.split(",") if part.strip()]
    if not parts:
        raise ValueError(f"--grid {spec!r}: no values")
    values = tuple(parse_value(param, part) for part in parts)
    if len(set(values)) != len(values):
        raise ValueError(f"--grid {spec!r}: repeated values")
    return optimizer, param, values


def grid_overrides(specs: list[str]) -> dict[str, dict[str, tuple]]:
    """``{optimizer: {param: values}}`` from several ``--grid`` specs (later ones win)."""
    overrides: dict[str, dict[str, tuple]] = {}
    for spec in specs or []:
        optimizer, param, values = parse_grid_spec(spec)
        overrides.setdefault(optimizer, {})[param] = values
    return overrides


def budgets(optimizers, overrides: dict | None = None, kind: str = "images") -> dict[str, int]:
    """Tuning trials per optimizer (the protocol wants them all equal)."""
    overrides = overrides or {}
    return {opt: len(grid_points(opt, overrides.get(opt), kind)) for opt in optimizers}


def format_hyperparameters(hyperparameters: dict) -> str:
    """``learning_rate=0.001 damping=0.01`` (short names: lr, wd)."""
    short = {"learning_rate": "lr", "weight_decay": "wd"}
    return " ".join(f"{short.get(k, k)}={v:g}" if isinstance(v, float) else
                    f"{short.get(k, k)}={v}" for k, v in hyperparameters.items())
