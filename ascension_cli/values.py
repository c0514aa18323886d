"""What a value read from a file (a checkpoint, a catalogue, a shard set's dataset.json) may be,
in one place: a whole number in a range, a real number in a range. JSON and torch's loader give
back whatever was written, so ``True`` is not 1 here and NaN is no number."""

from __future__ import annotations

import math
from typing import Any


def whole(value: Any, low: int = 0, high: float = math.inf) -> bool:
    """Whether ``value`` is an int (not a bool) from ``low`` to ``high``."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def number(value: Any, low: float = -math.inf, high: float = math.inf) -> bool:
    """Whether ``value`` is an int or float (not a bool, not NaN) from ``low`` to ``high``."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and low <= value <= high)
