"""Property-based tests (hypothesis) over the configuration space and the trainer's CLI.

For any option and any value of any type: ``TrainConfig.validate`` either accepts it
or raises ``ConfigError`` whose message names the option (never another exception),
it accepts exactly the values the option's rule allows (up to the options that
constrain each other), an accepted config survives its JSON round trip, and the
trainer rejects an out-of-range value with one line naming the option before it
writes anything.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tfngd.config import (
    OPTION_RULES,
    Choice,
    ConfigError,
    Flag,
    Path,
    Range,
    Sizes,
    TrainConfig,
)
from trainers import train as train_cli

ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.lists(st.integers(-3, 5000), max_size=10).map(tuple),
    st.sampled_from(["ddpm", "kfac", "cosine", "x0", "none", "skip"]),
)


def test_every_option_has_a_rule():
    assert set(OPTION_RULES) == {field.name for field in dataclasses.fields(TrainConfig)}
    TrainConfig().validate()
    for name, rule in OPTION_RULES.items():  # the defaults obey their own rules
        rule.check(name, getattr(TrainConfig(), name))


def _independent_accepts(rule, value) -> bool:
    """What the rule's description says, evaluated without its code."""
    if isinstance(rule, Range):
        if value is None:
            return rule.optional
        number = isinstance(value, int if rule.kind is int else (int, float))
        if isinstance(value, bool) or not number or not math.isfinite(value):
            return False
        return ((rule.low < value) if rule.low_open else (rule.low <= value)) and (
            (value < rule.high) if rule.high_open else (value <= rule.high))
    if isinstance(rule, Choice):
        return isinstance(value, str) and value in rule.choices
    if isinstance(rule, Flag):
        return value is True or value is False
    if isinstance(rule, Sizes):
        return isinstance(value, tuple) and rule.min_length <= len(value) <= rule.max_length \
            and all(_independent_accepts(rule.item, v) for v in value)
    if isinstance(rule, Path):
        return value is None or (isinstance(value, str) and value != "")
    raise AssertionError(rule)


@settings(max_examples=600, deadline=None)
@given(name=st.sampled_from(sorted(OPTION_RULES)), value=ANY_VALUE)
def test_any_value_is_accepted_or_refused_by_name(name, value):
    config = dataclasses.replace(TrainConfig(), **{name: value})
    allowed = _independent_accepts(OPTION_RULES[name], value)
    try:
        config.validate()
    except ConfigError as err:
        message = str(err)
        if not allowed:  # its own rule: checked before the options that depend on others
            assert message.startswith(f"{name}={value!r} is not valid"), message
        assert name in message, message
        return
    assert allowed, f"{name}={value!r} was accepted"
    assert TrainConfig.from_dict(config.to_dict()) == config


def _out_of_range(rule: Range):
    below = rule.low - (0 if rule.low_open else (1 if rule.kind is int else 1e-3))
    above = rule.high + (0 if rule.high_open else (1 if rule.kind is int else 1e-3))
    if rule.kind is int:
        return st.one_of(st.integers(max_value=int(below)), st.integers(min_value=int(above)))
    return st.one_of(st.floats(max_value=below), st.floats(min_value=above),
                     st.sampled_from([math.nan, math.inf, -math.inf]))


NUMERIC = sorted(name for name, rule in OPTION_RULES.items() if isinstance(rule, Range))


@st.composite
def bad_numeric_argument(draw):
    name = draw(st.sampled_from(NUMERIC))
    value = draw(_out_of_range(OPTION_RULES[name]))
    return name, value


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=bad_numeric_argument())
def test_the_trainer_refuses_out_of_range_numbers_in_one_line_and_writes_nothing(
        tmp_path, capsys, case):
    name, value = case
    run_dir = tmp_path / f"run-{name}"
    export_root = tmp_path / "saved_models"
    flag = "--" + name.replace("_", "-")
    code = train_cli.main([f"{flag}={value!r}" if isinstance(value, float) else f"{flag}={value}",
                           "--run-dir", str(run_dir), "--export-root", str(export_root)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.count("\n") == 0 and err.startswith("tfngd-train: error:"), err
    assert f"{name}=" in err and "is not valid" in err, err
    assert not run_dir.exists() and not export_root.exists()


@pytest.mark.parametrize("name", sorted(n for n, r in OPTION_RULES.items()
                                        if isinstance(r, Choice)))
def test_unknown_names_list_the_valid_choices(name):
    with pytest.raises(ConfigError) as err:
        dataclasses.replace(TrainConfig(), **{name: "no-such-choice"}).validate()
    message = str(err.value)
    assert message.startswith(f"{name}='no-such-choice' is not valid; choose one of: ")
    assert all(choice in message for choice in OPTION_RULES[name].choices)
