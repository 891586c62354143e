"""Settings checks (service/explain/settings.py): the value in its type, or an error naming the
setting and the value found."""

from __future__ import annotations

import math

import pytest

from service.explain.base import ExplainerError
from service.explain.settings import (
    boolean,
    choice,
    finite_float,
    float_in,
    fractions,
    non_negative_int,
    optional_interval,
    optional_layer_name,
    optional_positive_int,
    positive_float,
    positive_int,
    seed_value,
)


def test_accepted_values_come_back_in_their_type() -> None:
    assert positive_int("n", 3) == 3 and type(positive_int("n", 3)) is int
    assert optional_positive_int("n", None) is None
    assert non_negative_int("n", 0) == 0
    assert seed_value(7) == 7
    assert finite_float("x", 2) == 2.0 and type(finite_float("x", 2)) is float
    assert finite_float("x", 0, minimum=0.0) == 0.0
    assert positive_float("x", 0.5) == 0.5
    assert float_in("p", 1, 0.0, 1.0, include_low=False) == 1.0
    assert float_in("p", 0, 0.0, 100.0, include_high=False) == 0.0
    assert fractions("areas", 0.25) == (0.25,)
    assert fractions("areas", [0.1, 0.5]) == (0.1, 0.5)
    assert optional_interval("value_range", None) is None
    assert optional_interval("value_range", [-2, 2]) == (-2.0, 2.0)
    assert optional_layer_name("target_layer", None) is None
    assert optional_layer_name("target_layer", "features.block4") == "features.block4"
    assert choice("score", "logit", ("logit", "probability")) == "logit"
    assert boolean("relu", False) is False


@pytest.mark.parametrize(
    ("check", "message"),
    [
        (lambda: positive_int("steps", 0), "steps must be a positive integer, got 0"),
        (lambda: positive_int("steps", True), "steps must be a positive integer, got True"),
        (lambda: positive_int("steps", 2.5), "steps must be a positive integer, got 2.5"),
        (lambda: optional_positive_int("chunk_size", 0), "chunk_size must be a positive integer, got 0"),
        (lambda: non_negative_int("jitter", -1), "jitter must be an integer >= 0, got -1"),
        (lambda: non_negative_int("jitter", 1.5), "jitter must be an integer >= 0, got 1.5"),
        (lambda: seed_value(-3), "seed must be an integer >= 0, got -3"),
        (lambda: seed_value("7"), "seed must be an integer >= 0, got '7'"),
        (lambda: finite_float("baseline", math.nan), "baseline must be a finite number, got nan"),
        (lambda: finite_float("baseline", "0"), "baseline must be a finite number, got '0'"),
        (lambda: finite_float("baseline", False), "baseline must be a finite number, got False"),
        (lambda: finite_float("alpha", -1, minimum=0.0), "alpha must be >= 0, got -1"),
        (lambda: finite_float("epsilon", 0.0, minimum=0.0, strict=True), "epsilon must be > 0, got 0.0"),
        (lambda: positive_float("blur_sigma", 0), "blur_sigma must be a positive number, got 0"),
        (lambda: float_in("probability", 0, 0.0, 1.0, include_low=False), r"probability must be in \(0, 1\], got 0"),
        (lambda: float_in("probability", 1.5, 0.0, 1.0), r"probability must be in \[0, 1\], got 1.5"),
        (
            lambda: float_in("clip_percentile", 100, 0.0, 100.0, include_high=False),
            r"clip_percentile must be in \[0, 100\), got 100",
        ),
        (lambda: fractions("areas", ()), r"areas must be a fraction or a non-empty sequence .* got \(\)"),
        (lambda: fractions("areas", "0.1"), "areas must be a fraction or a non-empty sequence .* got '0.1'"),
        (lambda: fractions("areas", (0.1, 1.0)), r"areas must be fractions in \(0, 1\), got 1.0 in \(0.1, 1.0\)"),
        (lambda: optional_interval("value_range", 3), r"value_range must be None or a \(low, high\) pair, got 3"),
        (lambda: optional_interval("value_range", (1, 1)), r"value_range must have low < high, got \(1, 1\)"),
        (lambda: optional_interval("value_range", (0, "x")), "value_range high must be a finite number, got 'x'"),
        (
            lambda: optional_layer_name("target_layer", ""),
            "target_layer must be a non-empty layer name or None, got ''",
        ),
        (lambda: optional_layer_name("classifier", 3), "classifier must be a non-empty layer name or None, got 3"),
        (lambda: choice("score", "prob", ("logit", "probability")), "score must be one of 'logit', 'probability'"),
        (lambda: boolean("relu", 1), "relu must be True or False, got 1"),
    ],
)
def test_refused_values_are_named(check: object, message: str) -> None:
    with pytest.raises(ExplainerError, match=message):
        check()  # type: ignore[operator]
