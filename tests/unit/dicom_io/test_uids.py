"""Derived UIDs: deterministic, distinct for distinct inputs, valid DICOM UIDs."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.uid import PYDICOM_ROOT_UID, UID

from dicom_io import uids
from dicom_io.uids import generated_uid

INSTANCE_ARGS = {
    "model_name": "demo-densenet",
    "model_version": "1.2.0",
    "method": "gradcam",
    "output_kind": "sc",
    "frame_index": 0,
}
SOURCE_INSTANCE = "1.2.840.113619.2.1.2411.1031152382.365.1.736169244"
SOURCE_SERIES = "1.2.840.113619.2.1.2411.1031152382.365.736169244"


def _series_args() -> dict[str, str]:
    return {key: value for key, value in INSTANCE_ARGS.items() if key != "frame_index"}


def _assert_valid(uid: str) -> None:
    assert UID(uid).is_valid, uid
    assert len(uid) <= 64
    assert re.fullmatch(r"[0-9.]+", uid)


def test_same_inputs_give_the_same_uids() -> None:
    first = uids.derived_instance_uid(SOURCE_INSTANCE, **INSTANCE_ARGS)
    second = uids.derived_instance_uid(SOURCE_INSTANCE, **INSTANCE_ARGS)
    assert first == second
    assert uids.derived_series_uid(SOURCE_SERIES, **_series_args()) == uids.derived_series_uid(
        SOURCE_SERIES, **_series_args()
    )
    assert uids.derived_device_uid("m", "1") == uids.derived_device_uid("m", "1")


@pytest.mark.parametrize(
    ("field", "other"),
    [
        ("model_name", "other-net"),
        ("model_version", "1.2.1"),
        ("method", "occlusion"),
        ("output_kind", "pm"),
        ("frame_index", 3),
    ],
)
def test_instance_uid_changes_with_every_input(field: str, other: object) -> None:
    base = uids.derived_instance_uid(SOURCE_INSTANCE, **INSTANCE_ARGS)
    changed = uids.derived_instance_uid(SOURCE_INSTANCE, **{**INSTANCE_ARGS, field: other})
    assert changed != base
    _assert_valid(changed)


def test_instance_uid_changes_with_the_source() -> None:
    base = uids.derived_instance_uid(SOURCE_INSTANCE, **INSTANCE_ARGS)
    assert uids.derived_instance_uid(SOURCE_INSTANCE + "1", **INSTANCE_ARGS) != base


@pytest.mark.parametrize(
    ("field", "other"),
    [("model_name", "other-net"), ("model_version", "2"), ("method", "rise"), ("output_kind", "seg_binary")],
)
def test_series_uid_changes_with_every_input(field: str, other: str) -> None:
    base = uids.derived_series_uid(SOURCE_SERIES, **_series_args())
    changed = uids.derived_series_uid(SOURCE_SERIES, **{**_series_args(), field: other})
    assert changed != base
    assert uids.derived_series_uid(SOURCE_SERIES + ".9", **_series_args()) != base


def test_series_instance_and_device_uids_never_coincide() -> None:
    # Same source UID string used as series and instance source: still different objects.
    instance = uids.derived_instance_uid(SOURCE_INSTANCE, **INSTANCE_ARGS)
    series = uids.derived_series_uid(SOURCE_INSTANCE, **_series_args())
    assert instance != series


def test_parts_are_not_simply_concatenated() -> None:
    a = uids.derived_series_uid(SOURCE_SERIES, model_name="ab", model_version="c", method="m", output_kind="sc")
    b = uids.derived_series_uid(SOURCE_SERIES, model_name="a", model_version="bc", method="m", output_kind="sc")
    assert a != b
    assert uids.derived_device_uid("ab", "c") != uids.derived_device_uid("a", "bc")


@pytest.mark.parametrize("kind", ["sc", "pm", "seg_fractional", "seg_binary", "sr"])
def test_uids_are_valid_and_use_the_default_root(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uids, "PACS_XAI_UID_PREFIX", None)
    instance = uids.derived_instance_uid(SOURCE_INSTANCE, **{**INSTANCE_ARGS, "output_kind": kind})
    series = uids.derived_series_uid(SOURCE_SERIES, **{**_series_args(), "output_kind": kind})
    for uid in (instance, series, uids.derived_device_uid("demo-densenet", "1.2.0")):
        _assert_valid(uid)
        assert uid.startswith(PYDICOM_ROOT_UID)


def test_configured_prefix_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    default = uids.derived_instance_uid(SOURCE_INSTANCE, **INSTANCE_ARGS)
    monkeypatch.setattr(uids, "PACS_XAI_UID_PREFIX", "1.2.826.0.1.3680043.10.999.")
    uid = uids.derived_instance_uid(SOURCE_INSTANCE, **INSTANCE_ARGS)
    assert uid.startswith("1.2.826.0.1.3680043.10.999.")
    assert uid != default
    _assert_valid(uid)


@pytest.mark.parametrize("prefix", ["1.2.3", "1.02.3.", "abc.", "1." * 30])
def test_invalid_prefix_is_refused_with_its_value(prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uids, "PACS_XAI_UID_PREFIX", prefix)
    with pytest.raises(ValueError, match=re.escape(repr(prefix))):
        uids.derived_series_uid(SOURCE_SERIES, **_series_args())


@pytest.mark.parametrize(
    ("override", "message"),
    [({"model_version": ""}, "model_version"), ({"frame_index": -1}, "frame_index"), ({"method": None}, "method")],
)
def test_bad_inputs_are_refused(override: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        uids.derived_instance_uid(SOURCE_INSTANCE, **{**INSTANCE_ARGS, **override})
    with pytest.raises(ValueError, match="source_sop_instance_uid"):
        uids.derived_instance_uid("", **INSTANCE_ARGS)


def test_numpy_frame_index_equals_int_frame_index() -> None:
    as_int = uids.derived_instance_uid(SOURCE_INSTANCE, **{**INSTANCE_ARGS, "frame_index": 3})
    as_numpy = uids.derived_instance_uid(SOURCE_INSTANCE, **{**INSTANCE_ARGS, "frame_index": np.int64(3)})
    assert as_int == as_numpy


def test_generated_uids_are_deterministic_distinct_per_level_and_key() -> None:
    model = {"model_name": "demo", "model_version": "1"}
    uids = {level: generated_uid(level, key="nodule", **model) for level in ("study", "series", "instance")}
    assert len(set(uids.values())) == 3
    assert all(UID(uid).is_valid for uid in uids.values())
    assert generated_uid("series", key="nodule", **model) == uids["series"]
    assert generated_uid("series", key="effusion", **model) != uids["series"]
    assert generated_uid("series", key="nodule", model_name="demo", model_version="2") != uids["series"]
    with pytest.raises(ValueError, match="'frame'"):
        generated_uid("frame", key="nodule", **model)
    with pytest.raises(ValueError, match="key"):
        generated_uid("study", key="", **model)


def test_output_uids_are_the_series_and_instance_uids_of_the_explained_frame() -> None:
    source = Dataset()
    source.SeriesInstanceUID, source.SOPInstanceUID = SOURCE_SERIES, SOURCE_INSTANCE
    model = {"model_name": "demo-densenet", "model_version": "1.2.0", "method": "gradcam"}
    explained = SimpleNamespace(frame_index=2, **model)
    series, instance = uids.derived_output_uids(source, explained, "seg-binary")
    assert series == uids.derived_series_uid(SOURCE_SERIES, output_kind="seg-binary", **model)
    assert instance == uids.derived_instance_uid(SOURCE_INSTANCE, frame_index=2, output_kind="seg-binary", **model)
    same_series, other = uids.derived_output_uids(source, explained, "seg-binary", instance_kind="seg-binary-x")
    assert same_series == series
    assert other == uids.derived_instance_uid(SOURCE_INSTANCE, frame_index=2, output_kind="seg-binary-x", **model)


def test_frame_of_reference_uid_is_one_per_source_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uids, "PACS_XAI_UID_PREFIX", None)
    first = uids.derived_frame_of_reference_uid(SOURCE_INSTANCE, 0)
    assert first == uids.derived_frame_of_reference_uid(SOURCE_INSTANCE)
    assert first != uids.derived_frame_of_reference_uid(SOURCE_INSTANCE, 1)
    assert first != uids.derived_frame_of_reference_uid(SOURCE_SERIES, 0)
    _assert_valid(first)
    assert first.startswith(PYDICOM_ROOT_UID)
    monkeypatch.setattr(uids, "PACS_XAI_UID_PREFIX", "1.2.826.0.1.3680043.10.999.")
    assert uids.derived_frame_of_reference_uid(SOURCE_INSTANCE, 0).startswith("1.2.826.0.1.3680043.10.999.")


def test_a_finding_gives_each_explained_class_its_own_uids_and_none_keeps_the_old_ones() -> None:
    parts = {"model_name": "m", "model_version": "1", "method": "gradcam", "output_kind": "sc"}
    before = uids.derived_instance_uid("1.2.3", **parts)
    assert uids.derived_instance_uid("1.2.3", finding=None, **parts) == before
    nodule = uids.derived_instance_uid("1.2.3", finding="nodule", **parts)
    effusion = uids.derived_instance_uid("1.2.3", finding="effusion", **parts)
    assert len({before, nodule, effusion}) == 3
    assert uids.derived_instance_uid("1.2.3", finding="nodule", **parts) == nodule  # deterministic
    series = {uids.derived_series_uid("1.2.9", finding=f, **parts) for f in (None, "nodule", "effusion")}
    assert len(series) == 3
    with pytest.raises(ValueError, match="finding"):
        uids.derived_instance_uid("1.2.3", finding="", **parts)
