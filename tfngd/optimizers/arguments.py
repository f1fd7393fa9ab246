"""Checks of optimizer arguments, shared by the optimizers of this package: each raises
``ValueError`` naming the argument, what it must be and what it got."""

from __future__ import annotations

from tfngd.validation import check_integer


def require_choice(arg: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{arg} must be one of {tuple(choices)}, got {value!r}")


def require_positive(arg: str, value) -> None:
    if not value > 0:
        raise ValueError(f"{arg} must be > 0, got {value}")


def require_fraction(arg: str, value) -> None:
    """``value`` in ``[0, 1)`` (a decay or momentum coefficient)."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{arg} must be in [0, 1), got {value}")


def require_counts(**counts) -> None:
    """Every value an integer >= 1 (not a bool)."""
    for arg, value in counts.items():
        check_integer(arg, value, 1)
