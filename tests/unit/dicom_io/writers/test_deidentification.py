"""A de-identified source that breaks the Patient module (Patient Identity Removed YES, no
De-identification Method) still gives valid outputs: the method says it was not stated, the log
says so once per output, and dciodvfy finds no error in any output kind."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_io.writers import build_parametric_map, build_report, build_secondary_capture, build_segmentation
from dicom_io.writers.references import METHOD_NOT_STATED, repair_deidentification
from tests.unit.dicom_io.writers.writer_cases import dciodvfy, load_source, make_result

WRITERS: dict[str, Callable[..., Dataset]] = {
    "sc": build_secondary_capture,
    "pm": build_parametric_map,
    "seg_binary": partial(build_segmentation, kind="binary"),
    "seg_fractional": partial(build_segmentation, kind="fractional"),
}


def deidentified_source() -> Dataset:
    source = load_source(None)  # a phantom DX
    source.PatientIdentityRemoved = "YES"
    for keyword in ("DeidentificationMethod", "DeidentificationMethodCodeSequence"):
        if keyword in source:
            delattr(source, keyword)
    return source


@pytest.mark.parametrize("kind", [*WRITERS, "sr"])
def test_outputs_of_a_source_without_its_deidentification_method_pass_dciodvfy(
    kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = deidentified_source()
    result = make_result(source, 0)
    with caplog.at_level(logging.WARNING, logger="dicom_io.writers.references"):
        if kind == "sr":
            output = build_report(source, result, references=[build_secondary_capture(source, result)])
        else:
            output = WRITERS[kind](source, result)
    path = tmp_path / f"{kind}.dcm"
    output.save_as(path, enforce_file_format=True)

    report, errors = dciodvfy(path)

    assert errors == [], report
    written = pydicom.dcmread(path)
    assert written.PatientIdentityRemoved == "YES"
    assert written.DeidentificationMethod == METHOD_NOT_STATED
    assert "DeidentificationMethod" not in source, "the source itself is never changed"
    warnings = [r.getMessage() for r in caplog.records if "without a De-identification Method" in r.getMessage()]
    assert warnings and str(source.SOPInstanceUID) in warnings[0]
    assert str(source.PatientName) not in " ".join(warnings)


def test_a_stated_method_is_copied_as_it_is(tmp_path: Path) -> None:
    source = deidentified_source()
    source.DeidentificationMethod = "DICOM PS3.15 E.1 Basic Profile"
    output = build_secondary_capture(source, make_result(source, 0))
    assert output.DeidentificationMethod == "DICOM PS3.15 E.1 Basic Profile"


def test_a_method_code_sequence_alone_satisfies_the_condition() -> None:
    target = Dataset()
    target.PatientIdentityRemoved = "YES"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = (
        "113100",
        "DCM",
        "Basic Application Confidentiality Profile",
    )
    target.DeidentificationMethodCodeSequence = [code]
    repair_deidentification(target, "1.2.3")
    assert "DeidentificationMethod" not in target


@pytest.mark.parametrize(("value", "expected"), [("yes", "YES"), (" no", "NO"), ("MAYBE", None), ("Y", None)])
def test_patient_identity_removed_outside_yes_no_is_normalised_or_left_out(
    value: str, expected: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    target = Dataset()
    target.PatientIdentityRemoved = value
    with caplog.at_level(logging.WARNING, logger="dicom_io.writers.references"):
        repair_deidentification(target, "1.2.3.4")
    assert target.get("PatientIdentityRemoved") == expected
    assert (target.get("DeidentificationMethod") == METHOD_NOT_STATED) == (expected == "YES")
    ours = [r.getMessage() for r in caplog.records if r.name == "dicom_io.writers.references"]
    assert any("1.2.3.4" in message for message in ours)
    assert all(value.strip() not in message for message in ours if len(value.strip()) > 2)
