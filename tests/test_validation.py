"""The shared integer check: what passes, and the message of what does not."""

import numpy as np
import pytest

from tfngd.data import DataError
from tfngd.validation import check_integer, is_integer


def test_integers_pass_and_come_back_as_python_ints():
    assert check_integer("n", 3, 1) == 3 and type(check_integer("n", np.int64(3), 1)) is int
    assert check_integer("n", 5, 1, 5) == 5 and check_integer("n", -7) == -7
    assert is_integer(np.int32(2)) and not is_integer(True) and not is_integer(2.0)


@pytest.mark.parametrize("value, minimum, maximum, message", [
    (0, 1, None, "n must be an integer >= 1, got 0"),
    (6, 1, 5, "n must be an integer in [1, 5], got 6"),
    (9, None, 8, "n must be an integer <= 8, got 9"),
    (2.0, 1, None, "n must be an integer >= 1, got 2.0"),
    (True, 0, None, "n must be an integer >= 0, got True"),  # a bool is not a count
    ("3", None, None, "n must be an integer, got '3'"),
])
def test_what_fails_is_named_with_its_bounds(value, minimum, maximum, message):
    with pytest.raises(ValueError) as info:
        check_integer("n", value, minimum, maximum)
    assert str(info.value) == message


def test_the_caller_chooses_the_error_type_and_explains_the_bound():
    with pytest.raises(DataError, match=r"batch_size must be an integer in \[1, 4\] \(the "
                       r"number of examples\), got 5"):
        check_integer("batch_size", 5, 1, 4, error=DataError, detail=" (the number of examples)")
