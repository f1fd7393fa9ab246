"""Shared command-line plumbing: TrainConfig <-> argparse, and one-line error exits."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from tfngd.config import OPTION_HELP, OPTION_RULES, Range, Sizes, TrainConfig


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: ...)`` to options whose help does not already state it."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _parse_optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "off", "") else float(text)


def _parse_optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "off", "") else int(text)


def _parse_int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


# Short spellings of some options.
FLAG_ALIASES = {"jit_compile": ("--jit",)}


def add_config_arguments(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """One ``--option`` per TrainConfig field, typed from the field's annotation."""
    hints = typing.get_type_hints(TrainConfig)
    group = parser.add_argument_group("training configuration")
    for field in dataclasses.fields(TrainConfig):
        hint = hints[field.name]
        default = getattr(defaults, field.name)
        flags = ["--" + field.name.replace("_", "-"), *FLAG_ALIASES.get(field.name, ())]
        rule = OPTION_RULES[field.name]
        allowed = f"; {rule.describe()}" if isinstance(rule, (Range, Sizes)) else ""
        help_text = f"{OPTION_HELP[field.name]}{allowed} (default: {_show(default)})"
        if hint is bool:
            kind = {"action": argparse.BooleanOptionalAction}
        elif hint == tuple[int, ...]:
            kind = {"type": _parse_int_tuple, "metavar": "N,N"}
        elif hint == (float | None):
            kind = {"type": _parse_optional_float}
        elif hint == (int | None):
            kind = {"type": _parse_optional_int}
        elif hint == (str | None):
            kind = {"type": str}
        else:
            kind = {"type": hint}
        group.add_argument(*flags, dest=field.name, default=default, help=help_text, **kind)


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "none"
    return str(value)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


def fail(program: str, message: str, code: int = 2) -> int:
    """Print ``program: error: message`` on one line to stderr and return the exit code."""
    print(f"{program}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return code
