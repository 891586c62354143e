"""SR (TID 1500) writer on real sources: valid per dciodvfy, readable by highdicom, the coded
finding with its probability, the model as algorithm and observer, and references to the source
and to the Secondary Capture, Parametric Map and Segmentations made for the finding."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from highdicom.sr.utils import find_content_items
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicom_io.uids import derived_device_uid, derived_instance_uid, derived_series_uid
from dicom_io.writers import (
    ExplanationResult,
    FindingStatus,
    OutOfDistributionSignal,
    ReportFrame,
    ShortcutSignal,
    build_findings_report,
    build_parametric_map,
    build_report,
    build_secondary_capture,
    build_segmentation,
)
from tests.helpers import data_file
from tests.unit.dicom_io.writers.writer_cases import CLASS, METHOD, MODEL, SOURCES, VERSION, make_result
from tests.unit.dicom_io.writers.writer_cases import dciodvfy as _dciodvfy
from tests.unit.dicom_io.writers.writer_cases import load_source as _source

# RG1's Referring Physician's Name is a single component; highdicom warns about the source's value.
pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent:UserWarning")

PROBABILITY = 0.8125


def _result(source: pydicom.Dataset, frame_index: int, **changes: object):
    return make_result(source, frame_index, probability=PROBABILITY, display_value=0.5, **changes)


def _group(sr: hd.sr.Comprehensive3DSR) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    report = hd.sr.MeasurementReport.from_sequence([sr])
    groups = report.get_image_measurement_groups()
    assert len(groups) == 1
    return groups[0]


@dataclass
class Case:
    name: str
    source: pydicom.Dataset
    untouched: pydicom.Dataset
    result: ExplanationResult
    references: list[pydicom.Dataset]
    path: Path
    written: pydicom.Dataset
    read: hd.sr.Comprehensive3DSR


@pytest.fixture(scope="module", params=list(SOURCES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    name, frame_index = SOURCES[request.param]
    source = _source(name)
    untouched = copy.deepcopy(source)
    result = _result(source, frame_index)
    references = [
        build_secondary_capture(source, result),
        build_parametric_map(source, result),
        build_segmentation(source, result, kind="fractional"),
        build_segmentation(source, result, kind="binary"),
    ]
    sr = build_report(source, result, references=references)
    path = tmp_path_factory.mktemp(request.param) / "sr.dcm"
    pydicom.dcmwrite(path, sr, enforce_file_format=True)
    return Case(request.param, source, untouched, result, references, path, pydicom.dcmread(path), hd.sr.srread(path))


def test_dciodvfy_reports_no_errors(case: Case) -> None:
    report, errors = _dciodvfy(case.path)
    assert "Comprehensive3DSR" in report  # dciodvfy recognised the IOD
    assert not errors, "\n".join(errors)


def test_document_is_a_tid_1500_measurement_report(case: Case) -> None:
    sr = case.written
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"  # Imaging Measurement Report
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == ("COMPLETE", "UNVERIFIED", "PRELIMINARY")
    procedure = find_content_items(case.read, name=codes.DCM.ProcedureReported)[0].ConceptCodeSequence[0]
    modality = case.source.Modality
    expected = {"CT": "25045-6", "MR": "25056-3", "CR": "43468-8", "DX": "43468-8"}[modality]
    assert procedure.CodeValue == expected


def test_finding_is_coded(case: Case) -> None:
    finding = _group(case.read).finding_type
    assert (finding.value, finding.scheme_designator, finding.meaning) == ("27925004", "SCT", "Nodule")
    assert "CodingSchemeIdentificationSequence" not in case.written  # no private scheme needed


def test_probability_is_a_measurement(case: Case) -> None:
    measurements = _group(case.read).get_measurements()
    assert len(measurements) == 1
    probability = measurements[0]
    assert (probability.name.value, probability.name.scheme_designator) == ("122157", "DCM")
    assert probability.value == pytest.approx(PROBABILITY)
    assert (probability.unit.value, probability.unit.scheme_designator) == ("1", "UCUM")


def test_algorithm_and_explanation(case: Case) -> None:
    group = _group(case.read)
    names = {item.TextValue for item in find_content_items(group[0], name=codes.DCM.AlgorithmName, recursive=True)}
    versions = {
        item.TextValue for item in find_content_items(group[0], name=codes.DCM.AlgorithmVersion, recursive=True)
    }
    parameters = {
        item.TextValue for item in find_content_items(group[0], name=codes.DCM.AlgorithmParameters, recursive=True)
    }
    assert (names, versions) == ({MODEL}, {VERSION})
    assert f"explainer={METHOD}" in parameters
    evaluations = {(e.name.value, e.value.value) for e in group.get_qualitative_evaluations()}
    assert ("130401", "130403") in evaluations  # Visual explanation = Gradient-weighted class activation
    assert group.tracking_identifier == f"{MODEL} {CLASS}"
    observer = find_content_items(case.read, name=codes.DCM.DeviceObserverUID)[0]
    assert observer.UID == derived_device_uid(MODEL, VERSION)


def test_references_the_source_and_every_object_made_for_it(case: Case) -> None:
    source, sr = case.source, case.read
    group = _group(sr)
    frames = [case.result.frame_index + 1] if int(source.get("NumberOfFrames", 1)) > 1 else None
    [origin] = group.source_images
    assert origin.referenced_sop_instance_uid == source.SOPInstanceUID
    assert origin.referenced_sop_class_uid == source.SOPClassUID
    assert (list(origin.referenced_frame_numbers) if origin.referenced_frame_numbers else None) == frames
    illustrations = find_content_items(group[0], name=codes.DCM.IllustrationOfFinding)
    referenced = {
        (item.ReferencedSOPSequence[0].ReferencedSOPClassUID, item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in illustrations
    }
    expected = {(ref.SOPClassUID, ref.SOPInstanceUID) for ref in case.references}
    assert referenced == expected and len(expected) == 4
    evidence = {(sop_class, uid) for _study, _series, uid, sop_class in sr.get_evidence()}
    assert evidence == expected | {(source.SOPClassUID, source.SOPInstanceUID)}
    library = find_content_items(sr, name=codes.DCM.ImageLibrary)[0]
    library_images = find_content_items(library, value_type=hd.sr.ValueTypeValues.IMAGE, recursive=True)
    assert [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in library_images] == [
        source.SOPInstanceUID
    ]


def test_image_library_states_only_what_the_source_states(case: Case) -> None:
    library = find_content_items(case.read, name=codes.DCM.ImageLibrary)[0]
    rows = find_content_items(library, name=codes.DCM.PixelDataRows, recursive=True)
    assert rows[0].MeasuredValueSequence[0].NumericValue == case.source.Rows
    spacing = find_content_items(library, name=codes.DCM.HorizontalPixelSpacing, recursive=True)
    declared = case.source.get("PixelSpacing") or case.source.get("ImagerPixelSpacing")
    if spacing:
        value = float(spacing[0].MeasuredValueSequence[0].NumericValue)
        assert value > 0 and value == pytest.approx(float(declared[1]))
    if case.source.Modality == "CR":  # RG1: Pixel Spacing "0\0", no Imager Pixel Spacing
        assert not spacing


def test_same_study_new_derived_series(case: Case) -> None:
    sr, source = case.written, case.source
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    common = {"model_name": MODEL, "model_version": VERSION, "method": METHOD, "output_kind": "sr"}
    assert sr.SeriesInstanceUID == derived_series_uid(source.SeriesInstanceUID, **common)
    assert sr.SOPInstanceUID == derived_instance_uid(
        source.SOPInstanceUID, frame_index=case.result.frame_index, **common
    )
    assert sr.SeriesNumber == 9005
    assert sr.SeriesDescription == f"XAI {METHOD} {CLASS} report"
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyDate", "AccessionNumber", "StudyID"):
        assert sr.get(keyword) == source.get(keyword)
    items = [item for item in sr.ContributingEquipmentSequence if item.get("ManufacturerModelName") == MODEL]
    assert len(items) == 1 and items[0].DeviceUID == derived_device_uid(MODEL, VERSION)
    again = build_report(source, case.result, references=case.references)
    assert (again.SeriesInstanceUID, again.SOPInstanceUID) == (sr.SeriesInstanceUID, sr.SOPInstanceUID)
    assert not [element.tag for element in sr.iterall() if element.tag.is_private]


def test_source_dataset_is_not_modified(case: Case) -> None:
    assert case.source == case.untouched


def test_class_without_a_standard_code_uses_the_private_scheme(tmp_path: Path) -> None:
    source = pydicom.dcmread(data_file("MR_small.dcm"))
    result = _result(source, 0, class_name="tumour grade II")
    sr = build_report(source, result)
    path = tmp_path / "sr.dcm"
    pydicom.dcmwrite(path, sr, enforce_file_format=True)
    _, errors = _dciodvfy(path)
    assert not errors, "\n".join(errors)
    finding = _group(hd.sr.srread(path)).finding_type
    assert (finding.value, finding.scheme_designator, finding.meaning) == (
        "tumour-grade-ii",
        "99PACSXAI",
        "tumour grade II",
    )
    declared = pydicom.dcmread(path).CodingSchemeIdentificationSequence[0]
    assert declared.CodingSchemeDesignator == "99PACSXAI"


@pytest.mark.parametrize(
    ("class_name", "code"),
    [("effusion", ("60046008", "SCT")), ("Pleural effusion", ("60046008", "SCT")), ("normal", ("17621005", "SCT"))],
)
def test_standard_codes_for_the_demo_classes(class_name: str, code: tuple[str, str]) -> None:
    source = pydicom.dcmread(data_file("CT_small.dcm"))
    finding = _group(build_report(source, _result(source, 0, class_name=class_name))).finding_type
    assert (finding.value, finding.scheme_designator) == code


def test_bad_references_are_refused() -> None:
    source = pydicom.dcmread(data_file("CT_small.dcm"))
    result = _result(source, 0)
    pm = build_parametric_map(source, result)
    other_study = copy.deepcopy(pm)
    other_study.StudyInstanceUID = generate_uid()
    with pytest.raises(ValueError, match="study"):
        build_report(source, result, references=[other_study])
    with pytest.raises(ValueError, match="twice"):
        build_report(source, result, references=[pm, pm])
    with pytest.raises(ValueError, match="source"):
        build_report(source, result, references=[source])
    no_uid = copy.deepcopy(pm)
    del no_uid.SOPInstanceUID
    with pytest.raises(ValueError, match="SOPInstanceUID"):
        build_report(source, result, references=[no_uid])


# --- trust signals: the share as a measurement, yes/no evaluations, the distance ----------------

SHORTCUT = ShortcutSignal(
    share=0.8237, concentration=2.91, suspected=True, share_threshold=0.55, concentration_threshold=1.8
)
OOD = OutOfDistributionSignal(distance=46.37, threshold=11.48, out_of_distribution=True)


def _written(source: pydicom.Dataset, result: ExplanationResult, path: Path) -> hd.sr.Comprehensive3DSR:
    references = [build_secondary_capture(source, result), build_parametric_map(source, result)]
    pydicom.dcmwrite(path, build_report(source, result, references=references), enforce_file_format=True)
    _, errors = _dciodvfy(path)
    assert not errors, "\n".join(errors)
    return hd.sr.srread(path)


@pytest.mark.parametrize("name", ["RG1_J2KR.dcm", "CT_small.dcm", None])
def test_flagged_signals_are_measurements_and_yes_evaluations(name: str | None, tmp_path: Path) -> None:
    source = _source(name)
    read = _written(source, _result(source, 0, shortcut=SHORTCUT, ood=OOD), tmp_path / "sr.dcm")
    group = _group(read)
    measured = {(m.name.value, m.name.scheme_designator): m for m in group.get_measurements()}
    share = measured[("TRUST-OUTSIDE", "99PACSXAI")]
    assert share.name.meaning == "Attribution outside anatomy"
    assert share.value == pytest.approx(82.37) and (share.unit.value, share.unit.scheme_designator) == ("%", "UCUM")
    concentration = measured[("TRUST-CONC", "99PACSXAI")]
    assert concentration.value == pytest.approx(2.91) and concentration.unit.value == "1"
    distance = measured[("TRUST-OOD-DIST", "99PACSXAI")]
    assert distance.value == pytest.approx(46.37) and distance.unit.value == "1"
    assert ("122157", "DCM") in measured, "the probability is still there"
    evaluations = {(e.name.value, e.name.scheme_designator): e.value for e in group.get_qualitative_evaluations()}
    yes = ("373066001", "SCT", "Yes")
    shortcut_value = evaluations[("TRUST-SHORTCUT", "99PACSXAI")]
    ood_value = evaluations[("TRUST-OOD", "99PACSXAI")]
    assert (shortcut_value.value, shortcut_value.scheme_designator, shortcut_value.meaning) == yes
    assert (ood_value.value, ood_value.scheme_designator, ood_value.meaning) == yes
    parameters = {
        item.TextValue for item in find_content_items(group[0], name=codes.DCM.AlgorithmParameters, recursive=True)
    }
    assert {"share>=55%", "concentration>=1.8", "threshold=11.48"} <= parameters
    names = {item.TextValue for item in find_content_items(group[0], name=codes.DCM.AlgorithmName, recursive=True)}
    assert {"pacs-xai shortcut signal", "pacs-xai out-of-distribution signal", MODEL} <= names
    declared = pydicom.dcmread(tmp_path / "sr.dcm").CodingSchemeIdentificationSequence
    assert [item.CodingSchemeDesignator for item in declared] == ["99PACSXAI"]


def test_signals_that_do_not_flag_say_no(tmp_path: Path) -> None:
    source = _source(None)
    calm = ShortcutSignal(
        share=0.3, concentration=0.9, suspected=False, share_threshold=0.55, concentration_threshold=1.8
    )
    inside = OutOfDistributionSignal(distance=4.0, threshold=11.48, out_of_distribution=False)
    group = _group(_written(source, _result(source, 0, shortcut=calm, ood=inside), tmp_path / "sr.dcm"))
    evaluations = {e.name.value: e.value.value for e in group.get_qualitative_evaluations()}
    assert evaluations["TRUST-SHORTCUT"] == "373067005" and evaluations["TRUST-OOD"] == "373067005"  # SCT "No"
    assert {m.name.value for m in group.get_measurements()} == {
        "122157",
        "TRUST-OUTSIDE",
        "TRUST-CONC",
        "TRUST-OOD-DIST",
    }


def test_without_signals_the_report_is_as_before(tmp_path: Path) -> None:
    source = _source(None)
    group = _group(_written(source, _result(source, 0), tmp_path / "sr.dcm"))
    assert [m.name.value for m in group.get_measurements()] == ["122157"]
    names = [e.name.value for e in group.get_qualitative_evaluations()]
    assert "130401" in names and not [name for name in names if name.startswith("TRUST-")]
    assert "CodingSchemeIdentificationSequence" not in pydicom.dcmread(tmp_path / "sr.dcm")
    only_ood = _group(_written(source, _result(source, 0, ood=OOD), tmp_path / "ood.dcm"))
    names = [e.name.value for e in only_ood.get_qualitative_evaluations()]
    assert "TRUST-OOD" in names and "TRUST-SHORTCUT" not in names
    assert [m.name.value for m in only_ood.get_measurements()] == ["122157", "TRUST-OOD-DIST"]


# --- a multi-label model: every finding with its probability, present or absent -----------------------


@pytest.mark.parametrize("name", ["CT_small.dcm", "RG1_J2KR.dcm", None])
def test_findings_report_lists_every_finding_with_presence_and_each_explained_ones_objects(
    name: str | None, tmp_path: Path
) -> None:
    source = _source(name)
    statuses = [
        FindingStatus("nodule", 0.81, 0.5, explained=True),
        FindingStatus("Pleural_Thickening", 0.64, 0.6, explained=True),
        FindingStatus("effusion", 0.2, 0.3),
        FindingStatus("normal", 0.05, 0.5),
    ]
    results = [
        make_result(source, 0, class_name=status.class_name, probability=status.probability, per_finding=True)
        for status in statuses[:2]
    ]
    own = {r.class_name: [build_secondary_capture(source, r), build_parametric_map(source, r)] for r in results}
    segmentation = build_segmentation(source, results, kind="fractional")
    sr = build_findings_report(
        source,
        ReportFrame(METHOD, MODEL, VERSION, 0),
        statuses,
        [(r, own[r.class_name]) for r in results],
        shared_references=[segmentation],
    )
    path = tmp_path / "sr.dcm"
    pydicom.dcmwrite(path, sr, enforce_file_format=True)
    report, errors = _dciodvfy(path)
    assert "Comprehensive3DSR" in report and not errors, "\n".join(errors)
    read = hd.sr.srread(path)
    groups = hd.sr.MeasurementReport.from_sequence([read]).get_image_measurement_groups()
    assert [g.tracking_identifier for g in groups] == [f"{MODEL} {s.class_name}" for s in statuses]
    for group, status in zip(groups, statuses):
        (probability,) = [m for m in group.get_measurements() if m.name.value == "122157"]
        assert probability.value == pytest.approx(status.probability)
        evaluations = {e.name.value: e.value for e in group.get_qualitative_evaluations()}
        presence = evaluations["121052"]  # Presence of property
        assert (presence.value, presence.meaning) == (
            ("52101004", "Present") if status.probability >= status.threshold else ("272519000", "Absent")
        )
        parameters = {
            item.TextValue for item in find_content_items(group[0], name=codes.DCM.AlgorithmParameters, recursive=True)
        }
        assert f"threshold={status.threshold:.4g}" in parameters
        illustrated = {
            item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for item in find_content_items(group[0], name=codes.DCM.IllustrationOfFinding)
        }
        if status.explained:
            expected = {d.SOPInstanceUID for d in own[status.class_name]} | {segmentation.SOPInstanceUID}
            assert illustrated == expected and "130401" in evaluations  # its own SC/PM and the shared SEG
        else:
            assert not illustrated and "130401" not in evaluations
    # each finding's SC and PM are objects of their own: distinct UIDs and series naming the finding
    uids = {d.SOPInstanceUID for objects in own.values() for d in objects}
    assert len(uids) == 4
    assert {d.SeriesDescription for d in own["nodule"]} == {f"XAI {METHOD} nodule", f"XAI {METHOD} nodule map"}
    assert own["nodule"][0].SeriesInstanceUID != own["Pleural_Thickening"][0].SeriesInstanceUID
    assert read.SeriesDescription == f"XAI {METHOD} findings report"
    assert read.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99PACSXAI"  # Pleural_Thickening


def test_findings_report_refuses_a_finding_it_does_not_list() -> None:
    source = _source(None)
    result = _result(source, 0, class_name="mass", per_finding=True)
    with pytest.raises(ValueError, match="'mass' is not among the findings"):
        build_findings_report(
            source, ReportFrame(METHOD, MODEL, VERSION, 0), [FindingStatus("nodule", 0.5, 0.5)], [(result, [])]
        )
