"""NAME:LABEL variants of pacs-xai evaluate and the replacement comparison's entries and settings."""

from __future__ import annotations

import pytest

from service.explain import get_explainer
from service.explain.base import ExplainerError
from service.inference.card import ModelCard
from service.models import demo_card_path
from service.node.pipeline import card_settings
from service.tools.evaluate.variants import (
    REPLACEMENT_COMPARISON,
    replacement_comparison,
    split_variant,
    variant_settings,
)


def test_split_variant() -> None:
    assert split_variant("occlusion:healthy") == ("occlusion", "healthy")
    assert split_variant("gradcam") == ("gradcam", None)
    with pytest.raises(ValueError, match=r"NAME:LABEL .* got 'rise:a.b'"):
        split_variant("rise:a.b")
    with pytest.raises(ExplainerError, match="no_such_method"):
        split_variant("no_such_method:x")


def test_a_variant_takes_its_methods_settings_then_its_own() -> None:
    params = {"rise": {"masks": 50, "seed": 1}, "rise:healthy": {"masks": 20}}
    assert variant_settings("rise:healthy", params) == {"masks": 20, "seed": 1}
    assert variant_settings("rise", params) == {"masks": 50, "seed": 1}


def test_the_comparison_measures_each_fill_and_the_runs_own_settings_win() -> None:
    entries, params = replacement_comparison({"occlusion:healthy": {"window": 32}, "rise": {"masks": 10}})
    assert entries == tuple(entry for entry, _ in REPLACEMENT_COMPARISON)
    assert params["occlusion:healthy"] == {"perturbation": "healthy", "window": 32}
    assert params["rise"] == {"masks": 10}
    card = ModelCard.load(demo_card_path())
    fills = {}
    for entry in entries:
        method, _ = split_variant(entry)
        explainer = get_explainer(method, **{**card_settings(card, method), **variant_settings(entry, params)})
        fills[entry] = explainer.perturbation
    assert fills["meaningful_perturbation:blur"] == "blur"
    assert fills["meaningful_perturbation:constant"] == "baseline"
    assert fills["healthy_perturbation"] == "healthy"
    for method in ("occlusion", "rise", "hipe"):
        assert (fills[method], fills[f"{method}:healthy"]) == ("baseline", "healthy")
