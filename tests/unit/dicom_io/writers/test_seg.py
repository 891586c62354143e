"""Segmentation writer on real sources: valid per dciodvfy, readable by highdicom, a fractional
heatmap equal to the normalised positive map, a binary top region that holds the stated share of
the attribution mass, coded segment and algorithm, provenance, and the projection-radiograph
fixes (Patient Orientation from the source, no zero Pixel Spacing, the PM's nominal geometry)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_io.uids import derived_device_uid, derived_instance_uid, derived_series_uid
from dicom_io.writers import ExplanationResult, build_parametric_map, build_segmentation, top_region_mask
from tests.helpers import data_file
from tests.unit.dicom_io.writers.writer_cases import CLASS, METHOD, MODEL, SOURCES, VERSION
from tests.unit.dicom_io.writers.writer_cases import attribution_map as _attribution
from tests.unit.dicom_io.writers.writer_cases import dciodvfy as _dciodvfy
from tests.unit.dicom_io.writers.writer_cases import load_source as _source
from tests.unit.dicom_io.writers.writer_cases import make_result as _result

# RG1's Referring Physician's Name is a single component; highdicom warns about the source's value.
pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent:UserWarning")

SHARE = 0.5
KINDS = ("fractional", "binary")


def _assert_covers_share(mask: np.ndarray, attribution: np.ndarray, share: float) -> None:
    """Sum over the mask >= share x positive mass, and dropping its smallest pixel falls below."""
    values = attribution.astype(np.float64)
    total = float(np.clip(values, 0, None).sum())
    inside = values[mask]
    assert inside.size > 0 and float(inside.min()) > 0  # only positive pixels
    covered = float(inside.sum())
    assert covered >= share * total * (1 - 1e-9)
    assert covered - float(inside.min()) < share * total
    # The region is the top of the map: nothing outside is larger than the smallest inside.
    assert float(values[~mask].max()) <= float(inside.min())


@dataclass
class Case:
    name: str
    source: pydicom.Dataset
    untouched: pydicom.Dataset
    result: ExplanationResult
    paths: dict[str, Path]
    written: dict[str, pydicom.Dataset]
    read: dict[str, hd.seg.Segmentation]


@pytest.fixture(scope="module", params=list(SOURCES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    name, frame_index = SOURCES[request.param]
    source = _source(name)
    untouched = copy.deepcopy(source)
    result = _result(source, frame_index)
    folder = tmp_path_factory.mktemp(request.param)
    paths, written, read = {}, {}, {}
    for kind in KINDS:
        seg = build_segmentation(source, result, kind=kind, mass_share=SHARE)
        paths[kind] = folder / f"seg-{kind}.dcm"
        pydicom.dcmwrite(paths[kind], seg, enforce_file_format=True)
        written[kind] = pydicom.dcmread(paths[kind])
        read[kind] = hd.seg.segread(paths[kind])
    return Case(request.param, source, untouched, result, paths, written, read)


@pytest.mark.parametrize("kind", KINDS)
def test_dciodvfy_reports_no_errors(case: Case, kind: str) -> None:
    report, errors = _dciodvfy(case.paths[kind])
    assert "Segmentation" in report  # dciodvfy recognised the IOD
    assert not errors, "\n".join(errors)


def test_fractional_values_are_the_normalised_positive_map(case: Case) -> None:
    seg = case.read["fractional"]
    assert seg.SegmentationType == "FRACTIONAL"
    assert (seg.SegmentationFractionalType, seg.MaximumFractionalValue) == ("PROBABILITY", 255)
    values = seg.pixel_array.astype(np.float64) / 255.0
    attribution = case.result.attribution.astype(np.float64)
    expected = np.clip(attribution, 0, None) / attribution.max()
    assert values.shape == attribution.shape
    assert np.abs(values - expected).max() <= 0.5 / 255 + 1e-9
    assert values[attribution <= 0].max() == 0.0
    assert values.max() == 1.0


def test_binary_region_holds_the_stated_share(case: Case) -> None:
    seg = case.read["binary"]
    assert seg.SegmentationType == "BINARY"
    mask = seg.pixel_array.astype(bool)
    assert mask.shape == case.result.attribution.shape
    _assert_covers_share(mask, case.result.attribution, SHARE)
    assert np.array_equal(mask, top_region_mask(case.result.attribution, SHARE))


def test_highdicom_maps_the_segment_onto_the_source_frame(case: Case) -> None:
    source, result = case.source, case.result
    for kind in KINDS:
        seg = case.read[kind]
        if int(source.get("NumberOfFrames", 1)) > 1:
            pixels = seg.get_pixels_by_source_frame(
                source_sop_instance_uid=source.SOPInstanceUID,
                source_frame_numbers=[result.frame_index + 1],
            )
        else:
            pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[source.SOPInstanceUID])
        assert pixels.shape == (1, int(source.Rows), int(source.Columns), 1)
        stored = seg.pixel_array.astype(np.float64)
        expected = stored / 255.0 if kind == "fractional" else stored  # fractional: rescaled to [0, 1]
        assert np.allclose(pixels[0, :, :, 0], expected, atol=1e-6)
        assert pixels.max() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_segment_is_coded_as_a_visual_explanation(case: Case, kind: str) -> None:
    description = case.read[kind].get_segment_description(1)
    category, kind_code = description.segmented_property_category, description.segmented_property_type
    assert (category.value, category.scheme_designator, category.meaning) == ("130401", "DCM", "Visual explanation")
    assert (kind_code.value, kind_code.scheme_designator, kind_code.meaning) == (
        "130403",
        "DCM",
        "Gradient-weighted class activation",
    )
    assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    label = description.segment_label
    assert METHOD in label and CLASS in label
    assert ("top 50%" in label) == (kind == "binary")
    algorithm = case.written[kind].SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (MODEL, VERSION)
    family = algorithm.AlgorithmFamilyCodeSequence[0]
    assert (family.CodeValue, family.CodingSchemeDesignator, family.CodeMeaning) == (
        "123110",
        "DCM",
        "Artificial Intelligence",
    )
    assert f"explainer={METHOD}" in algorithm.AlgorithmParameters
    assert ("mass_share=0.5" in algorithm.AlgorithmParameters) == (kind == "binary")


@pytest.mark.parametrize("kind", KINDS)
def test_same_study_new_derived_series(case: Case, kind: str) -> None:
    seg, source = case.written[kind], case.source
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    common = {"model_name": MODEL, "model_version": VERSION, "method": METHOD}
    series_kind = f"seg-{kind}"
    assert seg.SeriesInstanceUID == derived_series_uid(source.SeriesInstanceUID, output_kind=series_kind, **common)
    instance_kind = series_kind if kind == "fractional" else f"{series_kind}-mass-0.5"
    assert seg.SOPInstanceUID == derived_instance_uid(
        source.SOPInstanceUID, frame_index=case.result.frame_index, output_kind=instance_kind, **common
    )
    assert seg.SeriesNumber == {"fractional": 9003, "binary": 9004}[kind]
    for word in (METHOD, CLASS, MODEL, VERSION, "NOT FOR DIAGNOSTIC USE"):
        assert word in seg.DerivationDescription
    items = [item for item in seg.ContributingEquipmentSequence if item.get("ManufacturerModelName") == MODEL]
    assert len(items) == 1 and items[0].DeviceUID == derived_device_uid(MODEL, VERSION)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyDate", "AccessionNumber"):
        assert seg.get(keyword) == source.get(keyword)


@pytest.mark.parametrize("kind", KINDS)
def test_references_to_the_source_carry_class_frame_and_purpose(case: Case, kind: str) -> None:
    seg, source = case.written[kind], case.source
    frame = case.result.frame_index + 1 if int(source.get("NumberOfFrames", 1)) > 1 else None
    derivation = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    for item in (seg.SourceImageSequence[0], derivation):
        assert item.ReferencedSOPClassUID == source.SOPClassUID
        assert item.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert item.get("ReferencedFrameNumber") == frame
        purpose = item.PurposeOfReferenceCodeSequence[0]
        assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("121322", "DCM")
    common = seg.ReferencedSeriesSequence[0]
    assert common.SeriesInstanceUID == source.SeriesInstanceUID
    assert common.ReferencedInstanceSequence[0].ReferencedSOPClassUID == source.SOPClassUID
    assert "ReferencedFrameNumber" not in common.ReferencedInstanceSequence[0]


@pytest.mark.parametrize("kind", KINDS)
def test_geometry_orientation_and_spacing(case: Case, kind: str) -> None:
    seg, source = case.written[kind], case.source
    shared = seg.SharedFunctionalGroupsSequence[0]
    spacings = [float(v) for element in seg.iterall() if element.keyword == "PixelSpacing" for v in element.value]
    assert all(value > 0 for value in spacings)  # never the "0\0" of RG1
    assert "Laterality" not in seg
    if source.get("BodyPartExamined"):
        assert seg.BodyPartExamined == source.BodyPartExamined
    if "ImagePositionPatient" in source:  # CT, MR: the source's patient geometry
        assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
        measures = shared.PixelMeasuresSequence[0]
        assert [float(v) for v in measures.PixelSpacing] == pytest.approx([float(v) for v in source.PixelSpacing])
        assert float(measures.SliceThickness) == float(source.SliceThickness)
        assert "SpacingBetweenSlices" not in measures  # one frame: no spacing between slices
        position = seg.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient
        assert [float(v) for v in position] == pytest.approx([float(v) for v in source.ImagePositionPatient])
        assert list(seg.PatientOrientation)  # computed from the source's Image Orientation
    else:  # projection radiograph / frame without plane position: the nominal geometry the PM gets too
        assert seg.FrameOfReferenceUID == build_parametric_map(source, case.result).FrameOfReferenceUID
        assert seg.FrameOfReferenceUID != source.get("FrameOfReferenceUID")
        assert "nominal" in seg.ImageComments
        # What OHIF needs to draw it: Pixel Measures, and the plane it gives the source (no IOP there).
        measures = shared.PixelMeasuresSequence[0]
        assert float(measures.SliceThickness) > 0  # required with a Frame of Reference; highdicom reads it
        assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        position = seg.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient
        assert [float(v) for v in position] == [0.0, 0.0, 0.0]
        declared = source.get("PixelSpacing") or source.get("ImagerPixelSpacing")
        if declared and all(float(v) > 0 for v in declared):
            assert [float(v) for v in measures.PixelSpacing] == pytest.approx([float(v) for v in declared])
        assert "PatientOrientation" in seg
        if source.get("PatientOrientation"):
            assert list(seg.PatientOrientation) == list(source.PatientOrientation)
        else:
            assert not seg.PatientOrientation  # Type 2: empty when the source does not tell


def test_source_dataset_is_not_modified(case: Case) -> None:
    assert case.source == case.untouched


def test_uids_are_deterministic_and_distinct(case: Case) -> None:
    source, result = case.source, case.result
    binary = case.written["binary"]
    again = build_segmentation(source, result, kind="binary", mass_share=SHARE)
    assert (again.SeriesInstanceUID, again.SOPInstanceUID) == (binary.SeriesInstanceUID, binary.SOPInstanceUID)
    other_share = build_segmentation(source, result, kind="binary", mass_share=0.8)
    assert other_share.SeriesInstanceUID == binary.SeriesInstanceUID
    assert other_share.SOPInstanceUID != binary.SOPInstanceUID
    assert case.written["fractional"].SeriesInstanceUID != binary.SeriesInstanceUID
    other_method = build_segmentation(source, replace(result, method="occlusion"), kind="binary")
    assert other_method.SOPInstanceUID != binary.SOPInstanceUID
    assert other_method.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "130404"


@pytest.mark.parametrize("share", [0.05, 0.25, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_region_mask_holds_the_share_of_random_maps(share: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    attribution = (rng.standard_normal((97, 131)) * rng.uniform(0.001, 100)).astype(np.float32)
    mask = top_region_mask(attribution, share)
    assert mask.dtype == bool and mask.shape == attribution.shape
    _assert_covers_share(mask, attribution, share)


def test_top_region_mask_edge_cases() -> None:
    signed = np.array([[3.0, -5.0, 1.0], [0.0, 2.0, -1.0]], np.float32)
    assert top_region_mask(signed, 1.0).tolist() == (signed > 0).tolist()  # all the positive mass
    assert top_region_mask(signed, 0.5).tolist() == [[True, False, False], [False, False, False]]  # 3 of 6
    assert top_region_mask(signed, 0.51).tolist() == [[True, False, False], [False, True, False]]
    assert not top_region_mask(-np.abs(signed), 0.5).any()  # no positive mass: empty
    assert not top_region_mask(np.zeros((3, 3), np.float32), 0.5).any()
    ties = np.ones((2, 2), np.float32)
    assert int(top_region_mask(ties, 0.5).sum()) == 2
    for bad in (0.0, -0.1, 1.01, float("nan"), "half"):
        with pytest.raises(ValueError, match="mass_share"):
            top_region_mask(signed, bad)  # type: ignore[arg-type]


def test_map_without_positive_values_gives_empty_segments(tmp_path: Path) -> None:
    source = pydicom.dcmread(data_file("CT_small.dcm"))
    negative = -np.abs(_attribution(int(source.Rows), int(source.Columns))) - 0.001
    result = _result(source, 0, attribution=negative)
    for kind in KINDS:
        path = tmp_path / f"{kind}.dcm"
        pydicom.dcmwrite(path, build_segmentation(source, result, kind=kind), enforce_file_format=True)
        _, errors = _dciodvfy(path)
        assert not errors, "\n".join(errors)
        assert not hd.seg.segread(path).pixel_array.any()


def test_bad_arguments_are_refused() -> None:
    source = pydicom.dcmread(data_file("MR_small.dcm"))
    result = _result(source, 0)
    with pytest.raises(ValueError, match="kind"):
        build_segmentation(source, result, kind="labelmap")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mass_share"):
        build_segmentation(source, result, kind="binary", mass_share=0)
    small = np.zeros((8, 8), np.float32)
    with pytest.raises(ValueError, match=r"\(8, 8\)"):
        build_segmentation(source, replace(result, attribution=small, display=small), kind="fractional")


# --- several findings of one frame (a multi-label model): one segment each ------------------------------


@pytest.mark.parametrize("name", ["CT_small.dcm", None])
@pytest.mark.parametrize("kind", KINDS)
def test_one_segment_per_finding_valid_and_each_its_own_map(name: str | None, kind: str, tmp_path: Path) -> None:
    source = _source(name)
    rows, cols = int(source.Rows), int(source.Columns)
    first = _result(source, 0, per_finding=True)
    # the second finding's map: the first one mirrored, so the two segments differ
    second = _result(source, 0, class_name="effusion", probability=0.61, per_finding=True)
    second = replace(second, attribution=np.ascontiguousarray(first.attribution[:, ::-1]))
    seg = build_segmentation(source, [first, second], kind=kind)
    path = tmp_path / "seg.dcm"
    pydicom.dcmwrite(path, seg, enforce_file_format=True)
    report, errors = _dciodvfy(path)
    assert "Segmentation" in report and not errors, "\n".join(errors)
    read = hd.seg.segread(path)
    labels = [read.get_segment_description(n).SegmentLabel for n in (1, 2)]
    assert [label.startswith(f"{METHOD} {name}") for label, name in zip(labels, (CLASS, "effusion"))] == [True, True]
    for number, finding in ((1, first), (2, second)):
        plane = read.get_pixels_by_source_instance(
            [source.SOPInstanceUID], segment_numbers=[number], combine_segments=False
        )[0, ..., 0].astype(np.float64)
        if kind == "fractional":
            expected = np.clip(finding.attribution, 0, None) / finding.attribution.max()
            assert plane.shape == (rows, cols)
            np.testing.assert_allclose(plane, expected, atol=1 / 255 + 1e-6)
        else:
            _assert_covers_share(plane.astype(bool), finding.attribution, SHARE)
    assert seg.SeriesDescription.startswith(f"XAI {METHOD} findings")
    assert "'nodule' (probability 0.870), 'effusion' (probability 0.610)" in seg.DerivationDescription
    # the frame's SEG, not one finding's: its UIDs are those of (source, frame, method, kind)
    kind_name = "seg-fractional" if kind == "fractional" else f"seg-binary-mass-{SHARE:.6g}"
    model = {"model_name": MODEL, "model_version": VERSION, "method": METHOD}
    assert seg.SOPInstanceUID == derived_instance_uid(source.SOPInstanceUID, output_kind=kind_name, **model)


def test_findings_of_different_frames_or_listed_twice_are_refused() -> None:
    source = _source(None)
    first = _result(source, 0, per_finding=True)
    with pytest.raises(ValueError, match="a finding is listed twice"):
        build_segmentation(source, [first, first], kind="fractional")
    with pytest.raises(ValueError, match="share method, model and frame"):
        build_segmentation(source, [first, replace(first, class_name="effusion", method="occlusion")], kind="binary")
    with pytest.raises(ValueError, match="at least one"):
        build_segmentation(source, [], kind="binary")
