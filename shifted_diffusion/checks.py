"""Range checks of settings, run before any work: one sentence naming the setting, the accepted range and
the value that came."""

from __future__ import annotations

import math
from typing import Any, Optional


def _describe(low, high, low_open, high_open, integer) -> str:
    kind = "an integer" if integer else "a finite number"
    if low is not None and high is not None:
        return f"{kind} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{kind} {'<' if high_open else '<='} {high}"
    return kind


def check_range(name: str, value: Any, low: Optional[float] = None, high: Optional[float] = None, *,
                low_open: bool = False, high_open: bool = False, integer: bool = False,
                optional: bool = False) -> None:
    """Raise ValueError unless ``value`` is a finite number (an int when ``integer``) in the range;
    ``optional`` accepts None. ``name`` is what the user wrote: a flag (``--batch_size``) or a field."""
    if value is None and optional:
        return
    expected = _describe(low, high, low_open, high_open, integer) + (" (or unset)" if optional else "")
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and integer:
        ok = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if ok:
        ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


def check_choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {sorted(choices, key=str)}, got {value!r}")
