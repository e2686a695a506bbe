"""Small helpers shared by the entry points."""

import operator
from typing import Any

import numpy as np


def as_count(value: Any) -> Any:
    """`value` as a Python `int` if it is an integer of any kind (`np.int64(100)`, a
    concrete JAX integer scalar, ...), else unchanged for the checks to reject.
    `bool`s are not counts."""
    if isinstance(value, (bool, np.bool_)):
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value
