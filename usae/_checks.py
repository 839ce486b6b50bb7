"""The shared argument validators: each raises ``ValueError`` naming the value and what would be valid."""

from __future__ import annotations

from typing import Any

__all__ = ["is_int", "int_at_least", "nonneg_int", "nonneg_number", "positive_int", "positive_number"]


def is_int(value: Any) -> bool:
    """A Python int, but not a bool (configs must stay plain JSON data, so numpy integers are refused)."""
    return isinstance(value, int) and not isinstance(value, bool)


def int_at_least(name: str, value: Any, low: int) -> int:
    """``value`` as an int when it is an integer >= ``low``."""
    if not is_int(value) or value < low:
        expected = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(f"{name} = {value!r} is not valid; expected {expected}")
    return int(value)


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int when it is an integer > 0."""
    return int_at_least(name, value, 1)


def nonneg_int(name: str, value: Any) -> int:
    """``value`` as an int when it is an integer >= 0."""
    return int_at_least(name, value, 0)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_number(name: str, value: Any) -> float:
    """``value`` as a float when it is a number > 0 (not NaN)."""
    if not _is_number(value) or not value > 0:
        raise ValueError(f"{name} = {value!r} is not valid; expected a number > 0")
    return float(value)


def nonneg_number(name: str, value: Any) -> float:
    """``value`` as a float when it is a number >= 0 (not NaN)."""
    if not _is_number(value) or not value >= 0:
        raise ValueError(f"{name} = {value!r} is not valid; expected a number >= 0")
    return float(value)
