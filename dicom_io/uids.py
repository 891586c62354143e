"""Deterministic UIDs for the objects pacs-xai derives from a source image.

A derived UID is a hash of everything that makes the output what it is: the source UID, the
model (name and version), the explainer, the kind of output and, for instances, the source frame.
Reprocessing or resending the same input therefore produces the same UIDs, so a destination that
already holds the object recognises it instead of storing a duplicate, and changing any input
(a new model version, another method) gives new UIDs.

The UIDs are built by :func:`pydicom.uid.generate_uid` below an organisation root:
:data:`PACS_XAI_UID_PREFIX` when it is set (environment variable ``PACS_XAI_UID_PREFIX``,
e.g. ``"1.2.826.0.1.3680043.10.999."``; it must end with a dot), otherwise pydicom's root.
"""

from __future__ import annotations

import json
import numbers
import os
import re
from typing import Protocol

from pydicom import Dataset
from pydicom.uid import PYDICOM_ROOT_UID, UID, generate_uid

__all__ = [
    "PACS_XAI_UID_PREFIX",
    "ExplainedFrame",
    "derived_device_uid",
    "derived_frame_of_reference_uid",
    "derived_instance_uid",
    "derived_output_uids",
    "derived_series_uid",
    "generated_uid",
]

#: Root under which derived UIDs are generated; ``None`` means pydicom's root UID.
PACS_XAI_UID_PREFIX: str | None = os.environ.get("PACS_XAI_UID_PREFIX") or None

# Bumped only if the hashing scheme changes (that would change every derived UID).
_SCHEME = "pacs-xai-uid-v1"
# pydicom's own limit, so that the hash suffix keeps at least 10 digits of the 64.
_MAX_PREFIX_LENGTH = 54
_PREFIX_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.$")


def _prefix() -> str:
    """The configured UID root, checked, or pydicom's root UID."""
    prefix = PACS_XAI_UID_PREFIX or PYDICOM_ROOT_UID
    if len(prefix) > _MAX_PREFIX_LENGTH or not _PREFIX_PATTERN.match(prefix):
        raise ValueError(
            f"PACS_XAI_UID_PREFIX {prefix!r} is not a valid UID root: use digits and dots, "
            f"no leading zeros in a component, a trailing dot, at most {_MAX_PREFIX_LENGTH} characters"
        )
    return prefix


def _require_text(name: str, value: str) -> None:
    """Refuse empty or non-string inputs: an empty part would make distinct outputs collide."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")


def _hash_uid(kind: str, **parts: str | int) -> UID:
    """A UID from a JSON encoding of the parts (unambiguous, unlike a plain concatenation)."""
    payload = json.dumps([_SCHEME, kind, parts], sort_keys=True, separators=(",", ":"))
    return generate_uid(prefix=_prefix(), entropy_srcs=[payload])


def derived_instance_uid(
    source_sop_instance_uid: str,
    *,
    model_name: str,
    model_version: str,
    method: str,
    output_kind: str,
    frame_index: int = 0,
    finding: str | None = None,
) -> str:
    """SOP Instance UID (0008,0018) of the object derived from one frame of a source instance.

    ``frame_index`` is the 0-based source frame; it only matters for multi-frame sources.
    ``finding`` is the explained class where one frame has several explained findings, each with
    its own objects (left out of the hash when ``None``, so single-finding UIDs stay as they were).
    """
    for name, value in (
        ("source_sop_instance_uid", source_sop_instance_uid),
        ("model_name", model_name),
        ("model_version", model_version),
        ("method", method),
        ("output_kind", output_kind),
    ):
        _require_text(name, value)
    if isinstance(frame_index, bool) or not isinstance(frame_index, numbers.Integral) or frame_index < 0:
        raise ValueError(f"frame_index must be an integer >= 0, got {frame_index!r}")
    return str(
        _hash_uid(
            "instance",
            source=source_sop_instance_uid,
            model_name=model_name,
            model_version=model_version,
            method=method,
            output_kind=output_kind,
            frame_index=int(frame_index),
            **_finding_part(finding),
        )
    )


def _finding_part(finding: str | None) -> dict[str, str]:
    """The finding as a hash part, or nothing (the UIDs made before multi-label findings)."""
    if finding is None:
        return {}
    _require_text("finding", finding)
    return {"finding": finding}


def derived_series_uid(
    source_series_instance_uid: str,
    *,
    model_name: str,
    model_version: str,
    method: str,
    output_kind: str,
    finding: str | None = None,
) -> str:
    """Series Instance UID (0020,000E) of the new series for one (source series, model, method, kind)
    and, where a frame has several explained findings each with its own objects, the ``finding``."""
    for name, value in (
        ("source_series_instance_uid", source_series_instance_uid),
        ("model_name", model_name),
        ("model_version", model_version),
        ("method", method),
        ("output_kind", output_kind),
    ):
        _require_text(name, value)
    return str(
        _hash_uid(
            "series",
            source=source_series_instance_uid,
            model_name=model_name,
            model_version=model_version,
            method=method,
            output_kind=output_kind,
            **_finding_part(finding),
        )
    )


class ExplainedFrame(Protocol):
    """What keys the UIDs of an output besides its source (a ``dicom_io.writers.ExplanationResult`` has it)."""

    @property
    def method(self) -> str: ...

    @property
    def model_name(self) -> str: ...

    @property
    def model_version(self) -> str: ...

    @property
    def frame_index(self) -> int: ...


def derived_output_uids(
    source: Dataset,
    explained: ExplainedFrame,
    output_kind: str,
    *,
    instance_kind: str | None = None,
    finding: str | None = None,
) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of the ``output_kind`` object made from one explained source frame.

    The series is one per (source series, model name and version, method, ``output_kind``); the
    instance one per (source instance, frame, model, method, ``instance_kind``), where
    ``instance_kind`` defaults to ``output_kind`` and tells apart objects of one series that differ
    in more than the frame (e.g. binary Segmentations of different mass shares). ``finding`` (the
    class) joins both where each of several findings of a frame gets its own object.
    """
    model = {
        "model_name": explained.model_name,
        "model_version": explained.model_version,
        "method": explained.method,
        "finding": finding,
    }
    series_uid = derived_series_uid(str(source.SeriesInstanceUID), output_kind=output_kind, **model)
    instance_uid = derived_instance_uid(
        str(source.SOPInstanceUID),
        frame_index=explained.frame_index,
        output_kind=instance_kind or output_kind,
        **model,
    )
    return series_uid, instance_uid


def derived_frame_of_reference_uid(source_sop_instance_uid: str, frame_index: int = 0) -> str:
    """Frame of Reference UID (0020,0052) of its own for one source frame that has none, deterministic.

    A hash of the source SOP Instance UID and frame, under the pacs-xai UID root, so that every
    output made from that frame (any model, any method) shares it and re-processing repeats it.
    Its payload is a plain "|"-joined text, not the JSON of the other derived UIDs: changing it
    would change every synthetic Frame of Reference UID already sent.
    """
    payload = f"{_SCHEME}|frame-of-reference|{source_sop_instance_uid}|{int(frame_index)}"
    return str(generate_uid(prefix=PACS_XAI_UID_PREFIX or PYDICOM_ROOT_UID, entropy_srcs=[payload]))


#: The levels of :func:`generated_uid`.
GENERATED_LEVELS = ("study", "series", "instance")


def generated_uid(level: str, *, model_name: str, model_version: str, key: str) -> str:
    """Study, Series or SOP Instance UID of an object a model makes without a source image (a class
    model visualisation): deterministic in (model, ``key``), so regenerating replaces, never duplicates.
    ``key`` names what was generated, e.g. the class and the settings."""
    if level not in GENERATED_LEVELS:
        raise ValueError(f"level must be one of {', '.join(GENERATED_LEVELS)}, got {level!r}")
    for name, value in (("model_name", model_name), ("model_version", model_version), ("key", key)):
        _require_text(name, value)
    return str(_hash_uid(f"generated-{level}", model_name=model_name, model_version=model_version, key=key))


def derived_device_uid(model_name: str, model_version: str) -> str:
    """Device UID (0018,1002) identifying one trained model (name + version) as equipment.

    IHE AI Results asks for a Device UID that changes whenever the model changes (e.g. retraining);
    a hash of name and version does exactly that.
    """
    _require_text("model_name", model_name)
    _require_text("model_version", model_version)
    return str(_hash_uid("device", model_name=model_name, model_version=model_version))
