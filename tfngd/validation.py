"""Argument checks shared by the package's modules.

Each check raises an error (``ValueError`` unless the caller names a subclass, e.g.
:class:`tfngd.data.DataError`) whose message names the argument, what it must be and what
it got, before any work is done::

    check_integer("num_steps", 0, 1, 1000)
    # ValueError: num_steps must be an integer in [1, 1000], got 0
"""

from __future__ import annotations

import numpy as np


def is_integer(value) -> bool:
    """A Python or numpy integer; ``bool`` is not (``True`` is not a count)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_integer(name: str, value, minimum: int | None = None, maximum: int | None = None,
                  error: type[ValueError] = ValueError, detail: str = "") -> int:
    """``int(value)`` if ``value`` is an integer in ``[minimum, maximum]`` (either bound may
    be None), else ``error("{name} must be an integer >= minimum{detail}, got ...")`` (or
    ``in [minimum, maximum]``, ``<= maximum``). ``detail`` explains a bound, e.g.
    ``" (the number of examples)"``."""
    if minimum is not None and maximum is not None:
        bounds = f" in [{minimum}, {maximum}]"
    elif minimum is not None:
        bounds = f" >= {minimum}"
    elif maximum is not None:
        bounds = f" <= {maximum}"
    else:
        bounds = ""
    if (not is_integer(value) or (minimum is not None and value < minimum)
            or (maximum is not None and value > maximum)):
        raise error(f"{name} must be an integer{bounds}{detail}, got {value!r}")
    return int(value)
