"""Parametric Map writer on real sources: valid per dciodvfy, the attribution values exactly, a
coded quantity and identity mapping, a signed window, full provenance, and a geometry of its own
(deterministic) where the source frame has none (CR, DX, a frame without plane position)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from highdicom.pm.sop import pmread

from dicom_io.codes import quantity_code
from dicom_io.uids import derived_device_uid, derived_instance_uid, derived_series_uid
from dicom_io.writers import ExplanationResult, build_parametric_map
from dicom_io.writers.pm import attribution_window
from tests.helpers import data_file
from tests.unit.dicom_io.writers.writer_cases import CLASS, METHOD, MODEL, SOURCES, VERSION
from tests.unit.dicom_io.writers.writer_cases import attribution_map as _attribution
from tests.unit.dicom_io.writers.writer_cases import dciodvfy as _dciodvfy
from tests.unit.dicom_io.writers.writer_cases import load_source as _source
from tests.unit.dicom_io.writers.writer_cases import make_result as _result

# RG1's Referring Physician's Name is a single component; highdicom warns about the source's value.
pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent:UserWarning")

PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID")


def _references_to(dataset: pydicom.Dataset, sop_instance_uid: str) -> list[tuple[str, pydicom.Dataset]]:
    """(sequence keyword, item) for every item anywhere in ``dataset`` that references the instance."""
    found: list[tuple[str, pydicom.Dataset]] = []

    def visit(ds: pydicom.Dataset) -> None:
        for element in ds:
            if element.VR == "SQ":
                for item in element.value:
                    if item.get("ReferencedSOPInstanceUID") == sop_instance_uid:
                        found.append((element.keyword, item))
                    visit(item)

    visit(dataset)
    return found


@dataclass
class Case:
    name: str
    source: pydicom.Dataset
    untouched: pydicom.Dataset
    result: ExplanationResult
    path: Path
    written: pydicom.Dataset


@pytest.fixture(scope="module", params=list(SOURCES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    name, frame_index = SOURCES[request.param]
    source = _source(name)
    untouched = copy.deepcopy(source)
    result = _result(source, frame_index)
    pm = build_parametric_map(source, result)
    path = tmp_path_factory.mktemp(request.param) / "pm.dcm"
    pydicom.dcmwrite(path, pm, enforce_file_format=True)
    return Case(request.param, source, untouched, result, path, pydicom.dcmread(path))


def test_dciodvfy_reports_no_errors(case: Case) -> None:
    report, errors = _dciodvfy(case.path)
    assert "ParametricMap" in report  # dciodvfy recognised the IOD
    assert not errors, "\n".join(errors)


def test_values_are_the_attribution_over_its_largest_magnitude_as_float32(case: Case) -> None:
    pm = case.written
    assert "FloatPixelData" in pm and "PixelData" not in pm
    assert (pm.BitsAllocated, pm.SamplesPerPixel, int(pm.NumberOfFrames)) == (32, 1, 1)
    assert (pm.Rows, pm.Columns) == (case.source.Rows, case.source.Columns)
    values = pm.pixel_array
    assert values.dtype == np.float32
    attribution = case.result.attribution.astype(np.float64)
    # In [-1, 1], reaching 1 in magnitude, so a viewer that draws the floats as 0..1 shows the map.
    assert float(np.abs(values).max()) == pytest.approx(1.0)
    np.testing.assert_allclose(values, attribution / np.abs(attribution).max(), rtol=1e-6, atol=1e-7)
    rescale = pm.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    assert (float(rescale.RescaleSlope), float(rescale.RescaleIntercept)) == (1.0, 0.0)


def test_highdicom_reads_it_back(case: Case) -> None:
    pm = pmread(case.path)
    assert isinstance(pm, hd.pm.ParametricMap)
    # highdicom 0.28.2 decodes a float frame lazily only with Pixel Representation, which the
    # Float Image Pixel module does not have; loading pixel_array first avoids that path.
    assert pm.pixel_array.shape == case.result.attribution.shape
    stored = pm.get_frame(1, apply_real_world_transform=False)
    np.testing.assert_array_equal(stored, case.written.pixel_array)
    # highdicom 0.28.2 cannot apply a Real World Value slope other than 1 to float frames
    # (AttributeError: '_CombinedPixelTransform' object has no attribute 'input_dtype'), so the
    # mapping read from the dataset is applied here: slope x stored + intercept.
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    real_world = stored * float(mapping.RealWorldValueSlope) + float(mapping.RealWorldValueIntercept)
    attribution = case.result.attribution.astype(np.float64)
    np.testing.assert_allclose(real_world, attribution, rtol=1e-6, atol=1e-7 * np.abs(attribution).max())


def test_real_world_value_mapping_gives_the_raw_attribution_with_coded_quantity(case: Case) -> None:
    mapping = case.written.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    attribution, stored = case.result.attribution, case.written.pixel_array
    assert mapping.RealWorldValueSlope == pytest.approx(float(np.abs(attribution).max()), rel=1e-12)
    assert mapping.RealWorldValueIntercept == 0.0
    assert mapping.DoubleFloatRealWorldValueFirstValueMapped == float(stored.min())
    assert mapping.DoubleFloatRealWorldValueLastValueMapped == float(stored.max())
    assert mapping.LUTLabel == METHOD
    assert METHOD in mapping.LUTExplanation and CLASS in mapping.LUTExplanation
    unit = mapping.MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("[arb'U]", "UCUM")
    quantity = mapping.QuantityDefinitionSequence[0]
    assert quantity.ConceptNameCodeSequence[0].CodeMeaning == "Quantity"
    concept = quantity.ConceptCodeSequence[0]
    assert (concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning) == (
        "130403",
        "DCM",
        "Gradient-weighted class activation",
    )


def test_window_is_symmetric_around_zero(case: Case) -> None:
    voi = case.written.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
    stored = case.written.pixel_array.astype(np.float64)  # the window is on the stored values
    expected = float(np.percentile(np.abs(stored), 99))
    assert float(voi.WindowCenter) == 0.0
    assert voi.WindowCenterWidthExplanation == "SIGNED 99TH PERCENTILE"  # one value, not one per character
    assert float(voi.WindowWidth) == pytest.approx(2 * expected, rel=1e-6)
    # The positive blob's peak saturates; a value near 0 sits mid-window.
    assert float(stored.max()) >= float(voi.WindowWidth) / 2 * 0.99


def test_same_study_new_derived_series(case: Case) -> None:
    pm, source = case.written, case.source
    assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"
    assert pm.StudyInstanceUID == source.StudyInstanceUID
    common = {"model_name": MODEL, "model_version": VERSION, "method": METHOD, "output_kind": "pm"}
    assert pm.SeriesInstanceUID == derived_series_uid(source.SeriesInstanceUID, **common)
    assert pm.SOPInstanceUID == derived_instance_uid(
        source.SOPInstanceUID, frame_index=case.result.frame_index, **common
    )
    assert pm.SeriesNumber == 9002
    assert pm.SeriesDescription.startswith(f"XAI {METHOD} {CLASS}")
    for word in (METHOD, CLASS, MODEL, VERSION, "NOT FOR DIAGNOSTIC USE"):
        assert word in pm.DerivationDescription


def test_every_reference_to_the_source_names_its_class_and_frame(case: Case) -> None:
    pm, source = case.written, case.source
    multi_frame = int(source.get("NumberOfFrames", 1)) > 1
    references = _references_to(pm, source.SOPInstanceUID)
    keywords = sorted(keyword for keyword, _ in references)
    assert keywords == ["ReferencedInstanceSequence", "SourceImageSequence", "SourceImageSequence"]
    for keyword, item in references:
        assert item.ReferencedSOPClassUID == source.SOPClassUID
        if keyword == "SourceImageSequence":
            purpose = item.PurposeOfReferenceCodeSequence[0]
            assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("121322", "DCM")
            if multi_frame:
                assert item.ReferencedFrameNumber == case.result.frame_index + 1
            else:
                assert "ReferencedFrameNumber" not in item
        else:
            assert "ReferencedFrameNumber" not in item
    derivation = pm.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert derivation.SpatialLocationsPreserved == "YES"


def test_geometry_is_the_sources_or_its_own(case: Case) -> None:
    pm, source = case.written, case.source
    shared = pm.SharedFunctionalGroupsSequence[0]
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    orientation = [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    position = [float(v) for v in pm.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient]
    if "ImagePositionPatient" in source:  # CT, MR: the source's own patient geometry
        assert pm.FrameOfReferenceUID == source.FrameOfReferenceUID
        assert orientation == pytest.approx([float(v) for v in source.ImageOrientationPatient])
        assert position == pytest.approx([float(v) for v in source.ImagePositionPatient])
        assert spacing == pytest.approx([float(v) for v in source.PixelSpacing])
        assert "ImageComments" not in pm
        return
    # No patient geometry for this frame: a Frame of Reference of its own, nominal position.
    assert pm.FrameOfReferenceUID != source.get("FrameOfReferenceUID")
    assert position == [0.0, 0.0, 0.0]
    assert "nominal" in pm.ImageComments
    assert all(value > 0 for value in spacing)
    declared = source.get("PixelSpacing") or source.get("ImagerPixelSpacing")
    if declared and all(float(v) > 0 for v in declared):
        assert spacing == pytest.approx([float(v) for v in declared])
    else:
        assert spacing == [1.0, 1.0]  # RG1 says "0\0": the documented nominal fallback
    # The plane viewers (OHIF/Cornerstone3D) give a source without one, so the map overlays it there;
    # the anatomical directions stay in Patient Orientation (test_patient_study_orientation_and_equipment).
    assert orientation == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    rebuilt = build_parametric_map(source, case.result)
    assert rebuilt.FrameOfReferenceUID == pm.FrameOfReferenceUID  # deterministic
    assert "SpacingBetweenSlices" not in shared.PixelMeasuresSequence[0]


def test_patient_study_orientation_and_equipment(case: Case) -> None:
    pm, source = case.written, case.source
    compared = 0
    for keyword in PATIENT_STUDY:
        if source.get(keyword) not in (None, ""):
            assert pm.get(keyword) == source.get(keyword), keyword
            compared += 1
    assert compared >= 2
    if source.get("PatientOrientation"):
        assert list(pm.PatientOrientation) == list(source.PatientOrientation)
    items = [item for item in pm.ContributingEquipmentSequence if item.get("ManufacturerModelName") == MODEL]
    assert len(items) == 1
    assert items[0].DeviceUID == derived_device_uid(MODEL, VERSION)
    assert list(items[0].SoftwareVersions)[0] == VERSION
    assert items[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert not [element.tag for element in pm.iterall() if element.tag.is_private]


def test_source_dataset_is_not_modified(case: Case) -> None:
    assert case.source == case.untouched


def test_uids_are_deterministic_and_distinct(case: Case) -> None:
    source, result, pm = case.source, case.result, case.written
    again = build_parametric_map(source, result)
    assert (again.SeriesInstanceUID, again.SOPInstanceUID) == (pm.SeriesInstanceUID, pm.SOPInstanceUID)
    for other in (
        build_parametric_map(source, replace(result, model_version="1.3.0")),
        build_parametric_map(source, replace(result, method="occlusion")),
    ):
        assert other.SOPInstanceUID != pm.SOPInstanceUID
        assert other.SeriesInstanceUID != pm.SeriesInstanceUID


@pytest.mark.parametrize(
    ("method", "code"),
    [
        ("gradcam", "130403"),
        ("gradcam_pp", "130403"),
        ("Grad-CAM++", "130403"),
        ("guided_gradcam", "130403"),
        ("cam", "130402"),
        ("scorecam", "130402"),
        ("score-cam", "130402"),
        ("occlusion", "130404"),
        ("rise", "130404"),
        ("lime", "130404"),
        ("integrated_gradients", "130404"),
    ],
)
def test_quantity_code_per_method(method: str, code: str) -> None:
    assert quantity_code(method).value == code
    assert quantity_code(method).scheme_designator == "DCM"


def test_occlusion_map_is_coded_as_saliency(tmp_path: Path) -> None:
    source = pydicom.dcmread(data_file("CT_small.dcm"))
    pm = build_parametric_map(source, _result(source, 0, method="occlusion"))
    concept = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0].QuantityDefinitionSequence[0]
    assert concept.ConceptCodeSequence[0].CodeMeaning == "Saliency"


def test_window_of_a_map_without_negative_values(tmp_path: Path) -> None:
    values = np.clip(_attribution(64, 64), 0, None)
    center, width = attribution_window(values)
    top = float(np.percentile(values, 99))
    assert (center, width) == pytest.approx((top / 2, top))
    assert attribution_window(np.zeros((4, 4), np.float32)) == (0.5, 1.0)  # all zero: still a valid window


def test_mismatched_map_is_refused() -> None:
    source = pydicom.dcmread(data_file("emri_small.dcm"))
    with pytest.raises(ValueError, match="frame_index 10"):
        build_parametric_map(source, _result(source, 10))
    small = np.zeros((32, 32), np.float32)
    with pytest.raises(ValueError, match=r"\(32, 32\)"):
        build_parametric_map(source, _result(source, 0, attribution=small, display=small))
