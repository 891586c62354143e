"""The writers print no names: highdicom's person-name warning would put them on stderr and in logs."""

from __future__ import annotations

import warnings

import pytest

from dicom_io.writers import build_parametric_map, build_report, build_secondary_capture, build_segmentation
from tests.unit.dicom_io.writers.writer_cases import load_source, make_result

PATIENT, REFERRER = "SMITHSONIAN", "WARDLEWORTH"  # one component each: highdicom's warning case


@pytest.mark.parametrize(
    "build",
    [
        build_secondary_capture,
        build_parametric_map,
        lambda source, result: build_segmentation(source, result, kind="fractional"),
        build_report,
    ],
    ids=["sc", "pm", "seg", "sr"],
)
def test_single_component_names_are_copied_not_printed(build) -> None:
    source = load_source(None)
    source.PatientName, source.ReferringPhysicianName = PATIENT, REFERRER
    with warnings.catch_warnings(record=True) as caught:  # the filters in force, the registry reset
        written = build(source, make_result(source, 0))
    assert str(written.PatientName) == PATIENT and str(written.ReferringPhysicianName) == REFERRER  # as the source
    assert str(source.PatientName) == PATIENT  # the source is left as it was
    messages = [str(warning.message) for warning in caught]
    assert not [m for m in messages if PATIENT in m or REFERRER in m], messages
