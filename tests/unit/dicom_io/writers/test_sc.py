"""Secondary Capture writer on real sources: valid per dciodvfy, full provenance, same study,
deterministic UIDs, and a colour overlay that DCMTK renders where the map is high."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from dicom_io.uids import derived_device_uid, derived_instance_uid, derived_series_uid
from dicom_io.writers import ExplanationResult, OutOfDistributionSignal, ShortcutSignal, build_secondary_capture
from dicom_io.writers.overlay import overlay_columns, overlay_warning_lines
from tests.helpers import data_file, require_dcmtk, require_tool

# RG1's Referring Physician's Name is a single component; highdicom warns about the source's value.
pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent:UserWarning")

MODEL, VERSION, METHOD, CLASS = "demo-densenet", "1.2.0", "gradcam", "nodule"
CENTRE = (0.6, 0.65)  # of the positive blob, as fractions of rows / columns (away from the text)
PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
    "StudyDescription",
)
NOT_COPIED = (
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "RescaleSlope",
    "RescaleIntercept",
    "WindowCenter",
    "WindowWidth",
    "FrameOfReferenceUID",
    "NumberOfFrames",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
)


def _testdata(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(data_file(name))


def _synthetic_dx() -> pydicom.Dataset:
    """A DX-like projection radiograph of a left hand, with a private tag that must not travel."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Doe^Jane", "DX-0042", "19800202", "F"
    ds.PatientAge = "044Y"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20240105", "101500", "ACC-77"
    ds.ReferringPhysicianName, ds.StudyID, ds.StudyDescription = "Ref^Doc", "ST1", "HAND 2 VIEWS"
    ds.Modality, ds.Manufacturer, ds.InstanceNumber, ds.SeriesNumber = "DX", "Acme", 1, 1
    ds.BodyPartExamined, ds.ImageLaterality, ds.PatientOrientation = "HAND", "L", ["A", "F"]
    ds.ImagerPixelSpacing = [0.15, 0.15]
    ds.Rows, ds.Columns = 300, 240
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    yy, xx = np.mgrid[0:300, 0:240]
    ds.PixelData = (1000 + 2000 * np.sin(xx / 20.0) ** 2 + yy).astype(np.uint16).tobytes()
    ds.private_block(0x0011, "ACME 1.0", create=True).add_new(0x01, "LO", "vendor secret")
    return ds


def _display(source: pydicom.Dataset, frame_index: int) -> np.ndarray:
    """Min-max scaled frame in [0, 1], inverted for MONOCHROME1 (1 = bright)."""
    pixels = source.pixel_array.astype(np.float32)
    if pixels.ndim == 3:
        pixels = pixels[frame_index]
    low, high = float(pixels.min()), float(pixels.max())
    display = (pixels - low) / max(high - low, 1e-6)
    if source.PhotometricInterpretation == "MONOCHROME1":
        display = 1.0 - display
    return display.astype(np.float32)


def _attribution(rows: int, cols: int) -> np.ndarray:
    """Signed map in raw units: a positive blob at CENTRE and a weaker negative offset elsewhere."""
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    sigma = 0.07 * min(rows, cols)
    blob = np.exp(-((yy - CENTRE[0] * rows) ** 2 + (xx - CENTRE[1] * cols) ** 2) / (2 * sigma**2))
    return (0.02 * blob - 0.002).astype(np.float32)


def _result(source: pydicom.Dataset, frame_index: int) -> ExplanationResult:
    return ExplanationResult(
        method=METHOD,
        class_name=CLASS,
        probability=0.87,
        model_name=MODEL,
        model_version=VERSION,
        frame_index=frame_index,
        attribution=_attribution(int(source.Rows), int(source.Columns)),
        display=_display(source, frame_index),
    )


@dataclass
class Case:
    source: pydicom.Dataset
    result: ExplanationResult
    path: Path
    written: pydicom.Dataset
    rebuilt: pydicom.Dataset


SOURCES = {
    "ct": ("CT_small.dcm", 0),
    "mr": ("MR_small.dcm", 0),
    "cr-2k-monochrome1": ("RG1_J2KR.dcm", 0),
    "enhanced-mr-frame-3": ("emri_small.dcm", 3),
    "synthetic-dx": (None, 0),
}


@pytest.fixture(scope="module", params=list(SOURCES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    """Each source built once per module (the 2k CR takes a moment), written as a Part 10 file."""
    name, frame_index = SOURCES[request.param]
    source = _testdata(name) if name else _synthetic_dx()
    result = _result(source, frame_index)
    sc = build_secondary_capture(source, result)
    path = tmp_path_factory.mktemp(request.param) / "sc.dcm"
    pydicom.dcmwrite(path, sc, enforce_file_format=True)
    rebuilt = build_secondary_capture(source, result)
    return Case(source, result, path, pydicom.dcmread(path), rebuilt)


def test_dciodvfy_reports_no_errors(case: Case) -> None:
    run = subprocess.run([require_tool("dciodvfy"), str(case.path)], capture_output=True, text=True, timeout=120)
    report = run.stdout + run.stderr
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert "SCImage" in report  # dciodvfy recognised the IOD
    assert not errors, "\n".join(errors)


def test_same_study_new_derived_series(case: Case) -> None:
    sc, source = case.written, case.source
    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID
    common = {"model_name": MODEL, "model_version": VERSION, "method": METHOD, "output_kind": "sc"}
    assert sc.SeriesInstanceUID == derived_series_uid(source.SeriesInstanceUID, **common)
    assert sc.SOPInstanceUID == derived_instance_uid(
        source.SOPInstanceUID, frame_index=case.result.frame_index, **common
    )
    assert sc.file_meta.MediaStorageSOPInstanceUID == sc.SOPInstanceUID
    assert sc.SeriesDescription == f"XAI {METHOD} {CLASS}"
    assert sc.SeriesNumber == 9001


def test_rgb_overlay_at_source_resolution(case: Case) -> None:
    sc, source = case.written, case.source
    assert (sc.SamplesPerPixel, sc.PhotometricInterpretation, sc.BitsAllocated) == (3, "RGB", 8)
    assert sc.Rows == source.Rows
    assert sc.Columns == overlay_columns(int(source.Rows), int(source.Columns))
    assert sc.Columns > source.Columns
    assert sc.pixel_array.shape == (source.Rows, sc.Columns, 3)


def test_derived_image_attributes(case: Case) -> None:
    sc = case.written
    assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert sc.BurnedInAnnotation == "YES"
    assert sc.ConversionType == "WSD"
    for word in (METHOD, CLASS, MODEL, VERSION):
        assert word in sc.DerivationDescription
    assert "DerivationCodeSequence" not in sc  # CID 7203 has no attribution-overlay code


def test_source_image_reference(case: Case) -> None:
    sc, source = case.written, case.source
    assert len(sc.SourceImageSequence) == 1
    item = sc.SourceImageSequence[0]
    assert item.ReferencedSOPClassUID == source.SOPClassUID
    assert item.ReferencedSOPInstanceUID == source.SOPInstanceUID
    if int(source.get("NumberOfFrames", 1)) > 1:
        assert item.ReferencedFrameNumber == case.result.frame_index + 1
    else:
        assert "ReferencedFrameNumber" not in item
    purpose = item.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("121322", "DCM")
    assert purpose.CodeMeaning == "Source image for image processing operation"


def test_patient_and_study_copied(case: Case) -> None:
    sc, source = case.written, case.source
    compared = 0
    for keyword in PATIENT_STUDY:
        if source.get(keyword) not in (None, ""):
            assert sc.get(keyword) == source.get(keyword), keyword
            compared += 1
        else:
            assert sc.get(keyword) in (None, ""), keyword
    assert compared >= 2


def test_algorithm_in_contributing_equipment(case: Case) -> None:
    items = [item for item in case.written.ContributingEquipmentSequence if item.get("ManufacturerModelName") == MODEL]
    assert len(items) == 1
    item = items[0]
    assert item.Manufacturer == "pacs-xai"
    versions = list(item.SoftwareVersions)
    assert versions[0] == VERSION and versions[1].startswith("pacs-xai ")
    assert item.DeviceUID == derived_device_uid(MODEL, VERSION)
    purpose = item.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
        "109102",
        "DCM",
        "Processing Equipment",
    )


def test_nothing_private_or_pixel_related_copied(case: Case) -> None:
    sc = case.written
    assert not [elem.tag for elem in sc.iterall() if elem.tag.is_private]
    assert [keyword for keyword in NOT_COPIED if keyword in sc] == []


def test_uids_are_deterministic(case: Case) -> None:
    sc, source, result = case.written, case.source, case.result
    assert (case.rebuilt.SeriesInstanceUID, case.rebuilt.SOPInstanceUID) == (sc.SeriesInstanceUID, sc.SOPInstanceUID)
    other_version = build_secondary_capture(source, replace(result, model_version="1.3.0"))
    other_method = build_secondary_capture(source, replace(result, method="occlusion"))
    for other in (other_version, other_method):
        assert other.SOPInstanceUID != sc.SOPInstanceUID
        assert other.SeriesInstanceUID != sc.SeriesInstanceUID
        assert other.StudyInstanceUID == sc.StudyInstanceUID


def test_orientation_and_laterality(case: Case) -> None:
    sc, source = case.written, case.source
    body_part = source.get("BodyPartExamined")
    if source.get("PatientOrientation"):
        assert list(sc.PatientOrientation) == list(source.PatientOrientation)
    elif source.get("ImageOrientationPatient") == [1, 0, 0, 0, 1, 0]:
        assert list(sc.PatientOrientation) == ["L", "P"]  # axial: rows go left, columns posterior
    else:
        assert "PatientOrientation" in sc and not sc.PatientOrientation
    if source.get("ImageLaterality") in ("L", "R"):
        assert sc.Laterality == source.ImageLaterality
    elif body_part in ("CHEST", "HEAD"):
        assert "Laterality" not in sc  # unpaired: must be absent
    else:
        assert "Laterality" in sc and not sc.Laterality


def test_dcmj2pnm_shows_colour_where_the_map_is_high(case: Case, tmp_path: Path) -> None:
    png = tmp_path / "sc.png"
    subprocess.run(
        [require_dcmtk("dcmj2pnm"), "+on", str(case.path), str(png)], check=True, capture_output=True, timeout=120
    )
    with Image.open(png) as image:
        rgb = np.asarray(image.convert("RGB")).astype(np.int16)
    rows, cols = case.result.attribution.shape
    assert rgb.shape[:2] == (rows, case.written.Columns)
    chroma = rgb[:, :cols].max(axis=-1) - rgb[:, :cols].min(axis=-1)
    attribution = case.result.attribution
    high = attribution >= 0.8 * attribution.max()
    low = attribution <= 0
    low[: rows // 2] = False  # leave the text block in the top-left corner out
    assert high.sum() > 10 and low.sum() > 100
    assert np.median(chroma[high]) > 40
    assert np.median(chroma[low]) == 0


def test_multi_frame_frames_get_distinct_instances() -> None:
    source = _testdata("emri_small.dcm")
    third, fourth = (build_secondary_capture(source, _result(source, index)) for index in (2, 3))
    assert third.SOPInstanceUID != fourth.SOPInstanceUID
    assert third.SeriesInstanceUID == fourth.SeriesInstanceUID
    assert (third.InstanceNumber, fourth.InstanceNumber) == (3, 4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"frame_index": 10}, "frame_index 10"),
        ({"attribution": np.zeros((64, 63), np.float32), "display": np.zeros((64, 63), np.float32)}, r"\(64, 63\)"),
    ],
)
def test_mismatched_result_is_refused(change: dict[str, object], message: str) -> None:
    source = _testdata("emri_small.dcm")
    with pytest.raises(ValueError, match=message):
        build_secondary_capture(source, replace(_result(source, 0), **change))


def test_source_without_uids_is_refused() -> None:
    source = _synthetic_dx()
    result = _result(source, 0)
    del source.SOPInstanceUID
    with pytest.raises(ValueError, match="SOPInstanceUID"):
        build_secondary_capture(source, result)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"probability": 1.5}, "1.5"),
        ({"method": ""}, "method"),
        ({"attribution": np.full((4, 4), np.nan, np.float32)}, "non-finite"),
        ({"attribution": np.zeros((4, 5), np.float32)}, r"\(4, 5\)"),
        ({"frame_index": -1}, "-1"),
    ],
)
def test_explanation_result_checks_its_values(change: dict[str, object], message: str) -> None:
    base = {
        "method": METHOD,
        "class_name": CLASS,
        "probability": 0.5,
        "model_name": MODEL,
        "model_version": VERSION,
        "frame_index": 0,
        "attribution": np.zeros((4, 4), np.float32),
        "display": np.zeros((4, 4), np.float32),
    }
    with pytest.raises(ValueError, match=message):
        ExplanationResult(**{**base, **change})


# --- trust signals: one warning line per flag, nothing extra otherwise ---------------------------

SUSPECTED = ShortcutSignal(
    share=0.8237, concentration=2.9, suspected=True, share_threshold=0.55, concentration_threshold=1.8
)
NOT_SUSPECTED = ShortcutSignal(
    share=0.31, concentration=0.95, suspected=False, share_threshold=0.55, concentration_threshold=1.8
)
OUT = OutOfDistributionSignal(distance=46.4, threshold=11.5, out_of_distribution=True)
IN = OutOfDistributionSignal(distance=4.2, threshold=11.5, out_of_distribution=False)


def test_warning_lines_name_each_flag_and_nothing_else() -> None:
    source = _synthetic_dx()
    plain = _result(source, 0)
    assert overlay_warning_lines(plain) == []
    assert overlay_warning_lines(replace(plain, shortcut=NOT_SUSPECTED, ood=IN)) == []
    assert overlay_warning_lines(replace(plain, shortcut=SUSPECTED)) == ["attribution outside anatomy: 82 %"]
    assert overlay_warning_lines(replace(plain, ood=OUT)) == ["input unlike the model's training data"]
    assert overlay_warning_lines(replace(plain, shortcut=SUSPECTED, ood=OUT)) == [
        "attribution outside anatomy: 82 %",
        "input unlike the model's training data",
    ]


def _warning_pixels(rgb: np.ndarray, cols: int) -> np.ndarray:
    """Pixels in the warning colour (red-orange text fill) in the top third of the image area
    (the heat blob is lower down, the colour bar right of it)."""
    top = rgb[: rgb.shape[0] // 3, :cols]
    red, green, blue = (top[..., c].astype(int) for c in range(3))
    return (red > 230) & (green > 80) & (green < 140) & (blue > 30) & (blue < 90)


def test_flags_are_burned_in_as_warning_lines_and_unflagged_signals_change_nothing(tmp_path: Path) -> None:
    source = _testdata("RG1_J2KR.dcm")
    plain = _result(source, 0)
    baseline = build_secondary_capture(source, plain).pixel_array
    unflagged = build_secondary_capture(source, replace(plain, shortcut=NOT_SUSPECTED, ood=IN)).pixel_array
    np.testing.assert_array_equal(unflagged, baseline)

    flagged_sc = build_secondary_capture(source, replace(plain, shortcut=SUSPECTED, ood=OUT))
    flagged = flagged_sc.pixel_array
    rows = int(source.Rows)
    changed = np.any(flagged != baseline, axis=2)
    ys, xs = np.nonzero(changed)
    assert ys.max() < rows // 3 and xs.max() < int(source.Columns), "only the text block in the top-left corner"
    cols = int(source.Columns)
    assert not _warning_pixels(baseline, cols).any() and _warning_pixels(flagged, cols).sum() > 200
    one_flag = build_secondary_capture(source, replace(plain, ood=OUT)).pixel_array
    assert 0 < _warning_pixels(one_flag, cols).sum() < _warning_pixels(flagged, cols).sum(), "one line per flag"
    path = tmp_path / "flagged.dcm"
    pydicom.dcmwrite(path, flagged_sc, enforce_file_format=True)
    run = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120)
    assert not [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.parametrize(
    ("signal", "message"),
    [
        (
            lambda: ShortcutSignal(1.2, 2.0, True, 0.55, 1.8),
            r"ShortcutSignal.share must be a finite number in \[0, 1\]",
        ),
        (lambda: ShortcutSignal(0.5, -1.0, True, 0.55, 1.8), "ShortcutSignal.concentration"),
        (lambda: ShortcutSignal(0.5, 1.0, "yes", 0.55, 1.8), "ShortcutSignal.suspected must be a bool, got 'yes'"),
        (lambda: OutOfDistributionSignal(float("nan"), 10.0, False), "OutOfDistributionSignal.distance"),
        (lambda: OutOfDistributionSignal(3.0, 10.0, 1), "out_of_distribution must be a bool, got 1"),
    ],
)
def test_signals_check_their_values(signal, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        signal()


def test_explanation_result_takes_only_signal_objects() -> None:
    source = _synthetic_dx()
    with pytest.raises(ValueError, match=r"ExplanationResult.shortcut must be a ShortcutSignal or None, got 0.8"):
        replace(_result(source, 0), shortcut=0.8)
    with pytest.raises(ValueError, match="ExplanationResult.ood must be an OutOfDistributionSignal"):
        replace(_result(source, 0), ood=SUSPECTED)
