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


def float_in(
    name: str, value: object, low: float, high: float, *, include_low: bool = True, include_high: bool = True
) -> float:
    """``value`` as a finite ``float`` in the interval from ``low`` to ``high`` (ends included or not)."""
    number = finite_float(name, value)
    above = number >= low if include_low else number > low
    below = number <= high if include_high else number < high
    if not (above and below):
        interval = f"{'[' if include_low else '('}{low:g}, {high:g}{']' if include_high else ')'}"
        raise ExplainerError(f"{name} must be in {interval}, got {value!r}")
    return number


def fractions(name: str, value: object) -> tuple[float, ...]:
    """One fraction or a non-empty sequence of them, each strictly between 0 and 1."""
    items = (value,) if isinstance(value, numbers.Real) and not isinstance(value, bool) else value
    if isinstance(items, str) or not isinstance(items, Sequence) or len(items) == 0:
        raise ExplainerError(f"{name} must be a fraction or a non-empty sequence of fractions in (0, 1), got {value!r}")
    result = []
    for item in items:
        number = finite_float(name, item)
        if not 0 < number < 1:
            raise ExplainerError(f"{name} must be fractions in (0, 1), got {item!r} in {value!r}")
        result.append(number)
    return tuple(result)


def optional_interval(name: str, value: object) -> tuple[float, float] | None:
    """``None``, or a ``(low, high)`` pair of finite numbers with ``low < high``."""
    if value is None:
        return None
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise ExplainerError(f"{name} must be None or a (low, high) pair, got {value!r}")
    low, high = finite_float(f"{name} low", value[0]), finite_float(f"{name} high", value[1])
    if not low < high:
        raise ExplainerError(f"{name} must have low < high, got {value!r}")
    return low, high


def non_negative_int(name: str, value: object) -> int:
    """``value`` as an ``int`` >= 0 (e.g. a count where 0 switches something off)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ExplainerError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def seed_value(value: object) -> int:
    """The ``seed`` setting: an ``int`` >= 0."""
    return non_negative_int("seed", value)


def choice(name: str, value: object, options: Sequence[str]) -> str:
    """``value`` when it is one of ``options``; the error lists them."""
    if not isinstance(value, str) or value not in options:
        raise ExplainerError(f"{name} must be one of {', '.join(repr(o) for o in options)}, got {value!r}")
    return value


def optional_layer_name(name: str, value: object) -> str | None:
    """``None`` (the method picks the layer), or a non-empty dotted module name."""
    if value is not None and (not isinstance(value, str) or not value):
        raise ExplainerError(f"{name} must be a non-empty layer name or None, got {value!r}")
    return value


def boolean(name: str, value: object) -> bool:
    """``value`` when it is ``True`` or ``False`` (not 0 or 1)."""
    if not isinstance(value, bool):
        raise ExplainerError(f"{name} must be True or False, got {value!r}")
    return value
