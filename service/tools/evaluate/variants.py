"""One method under several settings, side by side in one scorecard: ``NAME:LABEL`` variants.

A method entry of ``pacs-xai evaluate`` is a registry name (``occlusion``) or a variant of it
(``occlusion:healthy``); a variant's own settings are given under its whole name
(``--param occlusion:healthy.perturbation=healthy``) on top of the method's (``--param
occlusion.window=16`` applies to every variant of occlusion). :data:`REPLACEMENT_COMPARISON` is
the set ``--compare-replacement`` measures: what fills a removed region (Uzunova et al. 2019) in
meaningful perturbation (blur, constant, healthy) and in occlusion, RISE and HiPe (constant,
healthy), each with the method's other settings as the card and the run give them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from service.explain import explainer_class

SEPARATOR = ":"
#: A variant's label: letters, digits, ``_`` and ``-`` (no ``.``, which separates the setting).
LABEL = re.compile(r"^[A-Za-z0-9_-]+$")

#: (variant, its settings): the replacement comparison. The constant is every method's default
#: ``baseline`` 0.0 (the card's mean, mid-grey) and the blur its default ``blur_sigma``.
REPLACEMENT_COMPARISON: tuple[tuple[str, dict[str, Any]], ...] = (
    ("meaningful_perturbation:blur", {"perturbation": "blur"}),
    ("meaningful_perturbation:constant", {"perturbation": "baseline"}),
    ("healthy_perturbation", {}),
    ("occlusion", {}),
    ("occlusion:healthy", {"perturbation": "healthy"}),
    ("rise", {}),
    ("rise:healthy", {"perturbation": "healthy"}),
    ("hipe", {}),
    ("hipe:healthy", {"perturbation": "healthy"}),
)


def split_variant(entry: str) -> tuple[str, str | None]:
    """``"occlusion:healthy"`` -> ``("occlusion", "healthy")``, ``"gradcam"`` -> ``("gradcam", None)``;
    an unknown method or a bad label is an error naming the entry."""
    method, separator, label = entry.partition(SEPARATOR)
    if separator and not LABEL.match(label):
        raise ValueError(f"a method variant must look like NAME:LABEL (letters, digits, _ or -), got {entry!r}")
    explainer_class(method)
    return method, label if separator else None


def variant_settings(entry: str, params: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The run's settings of ``entry``: its method's, then the variant's own on top."""
    method, label = split_variant(entry)
    settings = dict(params.get(method, {}))
    if label is not None:
        settings.update(params.get(entry, {}))
    return settings


def replacement_comparison(
    params: Mapping[str, Mapping[str, Any]],
) -> tuple[tuple[str, ...], dict[str, dict[str, Any]]]:
    """The comparison's entries, and ``params`` with each variant's settings added under its name
    (the run's own ``--param`` for an entry wins over the comparison's)."""
    merged = {entry: dict(settings) for entry, settings in params.items()}
    for entry, settings in REPLACEMENT_COMPARISON:
        merged[entry] = {**settings, **merged.get(entry, {})}
    return tuple(entry for entry, _ in REPLACEMENT_COMPARISON), merged
