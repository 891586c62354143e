"""Checks of explainer settings, shared by every method.

Each returns the value in its type, or raises an :class:`ExplainerError` that names the setting
and the value found; booleans are refused where a number is expected.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

from service.explain.base import ExplainerError


def positive_int(name: str, value: object) -> int:
    """``value`` as an ``int`` > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ExplainerError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def optional_positive_int(name: str, value: object) -> int | None:
    """``None`` (the method picks, e.g. by device), or ``value`` as an ``int`` > 0."""
    return None if value is None else positive_int(name, value)


def finite_float(name: str, value: object, *, minimum: float | None = None, strict: bool = False) -> float:
    """``value`` as a finite ``float`` (``>= minimum``, or ``> minimum`` when ``strict``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ExplainerError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ExplainerError(f"{name} must be {'>' if strict else '>='} {minimum:g}, got {value!r}")
    return float(value)


def positive_float(name: str, value: object) -> float:
    """``value`` as a finite ``float`` > 0."""
    number = finite_float(name, value)
    if number <= 0:
        raise ExplainerError(f"{name} must be a positive number, got {value!r}")
    return number


def seed_value(value: object) -> int:
    """A seed: an ``int`` >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ExplainerError(f"seed must be an integer >= 0, got {value!r}")
    return int(value)


def choice(name: str, value: object, options: Sequence[str]) -> str:
    """``value`` when it is one of ``options``; the error lists them."""
    if not isinstance(value, str) or value not in options:
        raise ExplainerError(f"{name} must be one of {', '.join(repr(o) for o in options)}, got {value!r}")
    return value


def boolean(name: str, value: object) -> bool:
    """``value`` when it is ``True`` or ``False`` (not 0 or 1)."""
    if not isinstance(value, bool):
        raise ExplainerError(f"{name} must be True or False, got {value!r}")
    return value
