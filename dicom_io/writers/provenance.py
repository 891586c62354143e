"""What every pacs-xai output object says about where it came from.

Shared by the Secondary Capture, Parametric Map, Segmentation and SR writers:

- :class:`ExplanationResult`: one explained frame (the writers' input besides the source dataset);
- the Source Image Sequence item that points back at the source SOP instance (and frame), with
  Purpose of Reference (121322, DCM, "Source image for image processing operation");
- the Derivation Description text;
- the Patient / Study attributes copied from the source (same patient, same study);
- the Contributing Equipment item that identifies the model (IHE AI Results);
- Patient Orientation and Laterality taken over from the source where it has them;
- for the multi-frame IODs (Parametric Map, Segmentation): the source frame's geometry, a
  deterministic synthetic one for frames without (projection radiographs), the single-frame
  stand-in of a source frame that highdicom is given, and the fix-up of its references.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

from dicom_io import uids as _uids
from dicom_io.codes import PURPOSE_PROCESSING_EQUIPMENT, PURPOSE_SOURCE_IMAGE_FOR_PROCESSING
from dicom_io.vr import LO_MAX, ST_MAX

__all__ = [
    "DISCLAIMER",
    "NOMINAL_PIXEL_SPACING_MM",
    "NOMINAL_SLICE_THICKNESS_MM",
    "VIEWER_DEFAULT_ORIENTATION",
    "UNPAIRED_BODY_PARTS",
    "ExplanationResult",
    "FrameGeometry",
    "PATIENT_STUDY_KEYWORDS",
    "algorithm_equipment",
    "check_source",
    "code_item",
    "copy_patient_study_attributes",
    "derivation_description",
    "drop_assumed_slice_spacing",
    "highdicom_source_view",
    "instance_number",
    "number_of_frames",
    "pacs_xai_version",
    "patient_orientation",
    "pixel_spacing",
    "retarget_source_references",
    "series_description",
    "series_laterality",
    "set_laterality",
    "source_frame_geometry",
    "source_image_item",
    "synthetic_frame_geometry",
    "synthetic_frame_of_reference_uid",
    "without_person_names",
]

#: Burned into every overlay and written into every description: the output is not a diagnosis.
DISCLAIMER = "NOT FOR DIAGNOSTIC USE"

#: Patient, Clinical Trial Subject, General Study, Patient Study and Clinical Trial Study module
#: attributes that describe the patient and the study (not the source series, equipment or
#: pixels). Copied as they are, so the output sits in the same patient and study as its source.
PATIENT_STUDY_KEYWORDS: tuple[str, ...] = (
    # Patient
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID",
    "OtherPatientIDsSequence",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "QualityControlSubject",
    "PatientSpeciesDescription",
    "PatientSpeciesCodeSequence",
    "PatientBreedDescription",
    "PatientBreedCodeSequence",
    "BreedRegistrationSequence",
    "ResponsiblePerson",
    "ResponsiblePersonRole",
    "ResponsibleOrganization",
    "PatientComments",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    # Clinical Trial Subject
    "ClinicalTrialSponsorName",
    "ClinicalTrialProtocolID",
    "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID",
    "ClinicalTrialSiteName",
    "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID",
    # General Study
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "ReferencedStudySequence",
    "ProcedureCodeSequence",
    "ReasonForPerformedProcedureCodeSequence",
    # Patient Study
    "AdmittingDiagnosesDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "Occupation",
    "AdditionalPatientHistory",
    "AdmissionID",
    "PregnancyStatus",
    # Clinical Trial Study
    "ClinicalTrialTimePointID",
    "ClinicalTrialTimePointDescription",
)

#: Body Part Examined (0018,0015) values of unpaired structures (PS3.16 Annex L; the same list
#: dicom3tools' dciodvfy applies). For these, Laterality (0020,0060) must be absent; for any other
#: value (or none) it is required, empty when unknown.
UNPAIRED_BODY_PARTS: frozenset[str] = frozenset(
    """ABDOMEN ABDOMENPELVIS AORTA BACK BLADDER BRAIN CEREBELLUM CERVIX CHEST CHESTABDOMEN
    CHESTABDPELVIS CIRCLEOFWILLIS COCCYX COLON CORONARYARTERY CSPINE CTSPINE DUODENUM ESOPHAGUS
    FACE GALLBLADDER HEAD HEADNECK HEART ILEUM ILIUM JAW JEJUNUM LARYNX LIVER LSPINE LSSPINE
    MAXILLA MEDIASTINUM MOUTH NECK NECKCHEST NECKCHESTABDOMEN NECKCHESTABDPELV NOSE PANCREAS
    PELVIS PENIS PHARYNX PROSTATE RECTUM SKULL SPINE SPLEEN SSPINE STERNUM STOMACH THYMUS
    THYROID TLSPINE TONGUE TRACHEA TSPINE URETER URETHRA UTERUS VAGINA VULVA WHOLEBODY""".split()
)

_REQUIRED_SOURCE_KEYWORDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Rows",
    "Columns",
)


@dataclass(frozen=True, eq=False)
class ExplanationResult:
    """One explained frame, everything an output writer needs besides the source dataset."""

    method: str  # explainer registry name, e.g. "gradcam", "occlusion"
    class_name: str  # predicted/explained class, e.g. "nodule"
    probability: float  # model output probability of class_name, 0..1
    model_name: str
    model_version: str
    frame_index: int  # 0-based source frame
    attribution: np.ndarray  # float32 [rows, cols] on the SOURCE pixel grid, signed, raw scale
    display: np.ndarray  # float32 [rows, cols] in [0, 1]: the windowed grayscale source frame (1 = bright)

    def __post_init__(self) -> None:
        for name in ("method", "class_name", "model_name", "model_version"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"ExplanationResult.{name} must be a non-empty string, got {value!r}")
        for name in ("model_name", "model_version"):
            if len(getattr(self, name)) > LO_MAX:
                raise ValueError(
                    f"ExplanationResult.{name} {getattr(self, name)!r} is longer than {LO_MAX} characters "
                    "(DICOM LO, it becomes Manufacturer's Model Name / Software Versions)"
                )
        _check_probability(self.probability)
        index = self.frame_index
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"ExplanationResult.frame_index must be an integer >= 0, got {index!r}")
        object.__setattr__(self, "frame_index", int(index))  # numpy integers become plain int
        _check_map("attribution", self.attribution)
        _check_map("display", self.display)
        if self.attribution.shape != self.display.shape:
            raise ValueError(
                f"attribution shape {self.attribution.shape} differs from display shape {self.display.shape}; "
                "both must be on the source pixel grid"
            )


def _check_probability(probability: float) -> None:
    """Probability must be a real number in [0, 1]."""
    try:
        value = float(probability)
    except (TypeError, ValueError):
        raise ValueError(f"ExplanationResult.probability must be a number, got {probability!r}") from None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"ExplanationResult.probability must be in [0, 1], got {probability!r}")


def _check_map(name: str, array: np.ndarray) -> None:
    """A 2-D, non-empty, finite real array."""
    if not isinstance(array, np.ndarray):
        raise ValueError(f"ExplanationResult.{name} must be a numpy array, got {type(array).__name__}")
    if array.ndim != 2 or 0 in array.shape:
        raise ValueError(
            f"ExplanationResult.{name} must be a non-empty 2-D [rows, cols] array, got shape {array.shape}"
        )
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"ExplanationResult.{name} must hold real numbers, got dtype {array.dtype}")
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise ValueError(f"ExplanationResult.{name} has {bad} non-finite (NaN/inf) values")


def pacs_xai_version() -> str:
    """Installed version of the pacs-xai distribution, "0.1.0" when it runs from a source tree."""
    try:
        return metadata.version("pacs-xai")
    except metadata.PackageNotFoundError:
        return "0.1.0"


def number_of_frames(source: Dataset) -> int:
    """Number of Frames (0028,0008), 1 when absent (single-frame IODs)."""
    value = source.get("NumberOfFrames")
    try:
        return max(int(value), 1) if value not in (None, "") else 1
    except (TypeError, ValueError):
        raise ValueError(f"source Number of Frames {value!r} is not an integer") from None


def check_source(source: Dataset, result: ExplanationResult) -> None:
    """Refuse a source that an output cannot reference or whose grid differs from the maps."""
    missing = [kw for kw in _REQUIRED_SOURCE_KEYWORDS if source.get(kw) in (None, "")]
    if missing:
        raise ValueError(f"source dataset lacks {', '.join(missing)}; cannot derive an object from it")
    frames = number_of_frames(source)
    if result.frame_index >= frames:
        raise ValueError(f"frame_index {result.frame_index} is out of range for a source with {frames} frame(s)")
    grid = (int(source.Rows), int(source.Columns))
    if result.attribution.shape != grid:
        raise ValueError(
            f"attribution shape {result.attribution.shape} does not match the source grid "
            f"Rows x Columns = {grid}; map it back to the source pixel grid first"
        )


def code_item(code: Code) -> Dataset:
    """A Code Sequence Macro item (CodeValue, CodingSchemeDesignator, CodeMeaning)."""
    return hd.sr.CodedConcept.from_code(code)


def source_image_item(source: Dataset, frame_index: int) -> Dataset:
    """Source Image Sequence (0008,2112) item: the source instance, its frame, and why it is referenced.

    Referenced Frame Number (0008,1160, 1-based) is written for multi-frame sources only.
    """
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if number_of_frames(source) > 1:
        item.ReferencedFrameNumber = int(frame_index) + 1
    item.PurposeOfReferenceCodeSequence = [code_item(PURPOSE_SOURCE_IMAGE_FOR_PROCESSING)]
    return item


def derivation_description(result: ExplanationResult, *, output: str, software_version: str) -> str:
    """Derivation Description (0008,2111, ST): method, class, model name and version, in words."""
    text = (
        f"{output} of the {result.method} attribution map for class '{result.class_name}' "
        f"(probability {float(result.probability):.3f}), model {result.model_name} version "
        f"{result.model_version}, source frame {result.frame_index + 1}, pacs-xai {software_version}. "
        f"{DISCLAIMER}."
    )
    return text[:ST_MAX]


def series_description(result: ExplanationResult, *, tag: str = "") -> str:
    """Series Description (0008,103E, LO), e.g. "XAI gradcam nodule"; cut to 64 characters."""
    words = ["XAI", result.method, result.class_name] + ([tag] if tag else [])
    return " ".join(words)[:LO_MAX]


def _is_empty(dataset: Dataset, keyword: str) -> bool:
    return keyword not in dataset or dataset[keyword].value in (None, "", [])


def copy_patient_study_attributes(
    source: Dataset, target: Dataset, keywords: Iterable[str] = PATIENT_STUDY_KEYWORDS
) -> None:
    """Copy patient and study attributes present in ``source`` that ``target`` lacks or has empty.

    Only the listed public keywords are copied: never private tags, series, equipment or pixel
    attributes. Sequences are deep-copied so later edits of one object do not reach the other.
    """
    for keyword in keywords:
        if keyword in source and _is_empty(target, keyword) and not _is_empty(source, keyword):
            target[keyword] = copy.deepcopy(source[keyword])


def algorithm_equipment(
    result: ExplanationResult,
    *,
    manufacturer: str,
    software_version: str,
    device_uid: str,
    contribution: str,
) -> hd.ContributingEquipment:
    """Contributing Equipment Sequence (0018,A001) item for the model, as IHE AI Results asks.

    Manufacturer's Model Name = model name; Software Versions = model version and the pacs-xai
    version; Device UID identifies the trained model. Purpose of reference: see
    :data:`dicom_io.codes.PURPOSE_PROCESSING_EQUIPMENT`.
    """
    item = hd.ContributingEquipment(
        manufacturer=manufacturer,
        purpose_of_reference=PURPOSE_PROCESSING_EQUIPMENT,
        manufacturer_model_name=result.model_name,
        software_versions=[result.model_version, f"pacs-xai {software_version}"[:LO_MAX]],
        contribution_description=contribution[:ST_MAX],
    )
    item.DeviceUID = device_uid
    return item


def _orientation_letters(vector: Iterable[float]) -> str:
    """Patient Orientation letters (PS3.3 C.7.6.1.1.1) for one direction cosine vector.

    The patient axes are +x = L, +y = P, +z = H; letters are ordered by the size of the component,
    so an oblique direction gives e.g. "LP" (mostly left, somewhat posterior).
    """
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    components = [float(v) for v in vector]
    order = sorted(range(3), key=lambda axis: -abs(components[axis]))
    return "".join(letters[axis][0 if components[axis] > 0 else 1] for axis in order if abs(components[axis]) > 1e-4)


def _image_orientation(source: Dataset, frame_index: int) -> list[float] | None:
    """Image Orientation (Patient) of a frame: top level, else per-frame, else shared functional groups."""
    if source.get("ImageOrientationPatient"):
        return [float(v) for v in source.ImageOrientationPatient]
    groups: list[Dataset] = []
    per_frame = source.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame_index < len(per_frame):
        groups.append(per_frame[frame_index])
    shared = source.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for group in groups:
        plane = group.get("PlaneOrientationSequence")
        if plane and plane[0].get("ImageOrientationPatient"):
            return [float(v) for v in plane[0].ImageOrientationPatient]
    return None


def patient_orientation(source: Dataset, frame_index: int = 0) -> tuple[str, str] | None:
    """Patient Orientation (0020,0020) of the source frame: (row direction, column direction).

    Taken from the source's own Patient Orientation (projection images) or computed from its
    Image Orientation (Patient) (cross-sectional images); ``None`` when the source has neither.
    """
    value = source.get("PatientOrientation")
    if value is not None and not isinstance(value, str) and len(value) == 2 and all(value):
        return str(value[0]), str(value[1])
    iop = _image_orientation(source, frame_index)
    if iop is None or len(iop) != 6:
        return None
    row, column = _orientation_letters(iop[:3]), _orientation_letters(iop[3:])
    return (row, column) if row and column else None


def _frame_laterality(source: Dataset, frame_index: int) -> str | None:
    """Frame Laterality (0020,9072) from the Frame Anatomy functional group, if any."""
    for keyword, index in (("PerFrameFunctionalGroupsSequence", frame_index), ("SharedFunctionalGroupsSequence", 0)):
        groups = source.get(keyword)
        if groups and index < len(groups):
            anatomy = groups[index].get("FrameAnatomySequence")
            if anatomy and anatomy[0].get("FrameLaterality"):
                return str(anatomy[0].FrameLaterality)
    return None


def series_laterality(source: Dataset, frame_index: int = 0) -> str | None:
    """Laterality (0020,0060) for the output series: "R" or "L" when the source says so, else ``None``.

    Looks at the source's series Laterality, then Image Laterality (0020,0062), then Frame
    Laterality; "B" (both) and "U" (unpaired) have no series-level equivalent.
    """
    for value in (source.get("Laterality"), source.get("ImageLaterality"), _frame_laterality(source, frame_index)):
        if value in ("R", "L"):
            return str(value)
    return None


def set_laterality(target: Dataset, source: Dataset, frame_index: int = 0) -> None:
    """Body Part Examined and Laterality (General Series, Type 3 and 2C) of ``target`` from ``source``.

    Laterality is required when the examined part is paired: absent for an unpaired Body Part
    Examined (:data:`UNPAIRED_BODY_PARTS`), else "R"/"L" from the source, else empty (unknown).
    """
    body_part = str(source.get("BodyPartExamined") or "").strip().upper()
    if body_part:
        target.BodyPartExamined = body_part
    elif "BodyPartExamined" in target:
        del target.BodyPartExamined
    if body_part in UNPAIRED_BODY_PARTS:
        if "Laterality" in target:
            del target.Laterality
        return
    target.Laterality = series_laterality(source, frame_index)


# --------------------------------------------------------------------------------------------
# Geometry and source views for the multi-frame IODs (Parametric Map, Segmentation)
# --------------------------------------------------------------------------------------------

#: Secondary Capture Image Storage: the SOP class of the single-frame stand-in that highdicom is
#: given instead of the source (see :func:`highdicom_source_view`).
_STAND_IN_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"

#: Pixel spacing written when the source states none (or zeros): 1 mm, nominal. The objects still
#: map pixel-for-pixel onto the referenced source frame, which is what viewers use for a projection
#: radiograph.
NOMINAL_PIXEL_SPACING_MM = 1.0

#: Slice Thickness written into a Segmentation's synthetic geometry: 1 mm, nominal (a projection has
#: no slice). A Segmentation with a Frame of Reference needs one (dciodvfy: Type 1C in Pixel
#: Measures), and highdicom 0.28.2's ``segread`` refuses Pixel Measures without it.
NOMINAL_SLICE_THICKNESS_MM = 1.0

#: Image Orientation (Patient) that viewers give an image which has none (a projection radiograph):
#: rows along +x, columns along +y. Cornerstone3D, hence OHIF 3.x, uses it (with Image Position
#: (0, 0, 0)) for the source, and overlays a Parametric Map or Segmentation only when the overlay's
#: orientation equals the source's ("... oblique to the acquisition plane of the source data are
#: not yet supported" otherwise). A synthetic geometry therefore uses the same plane.
VIEWER_DEFAULT_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)

#: Attributes of the source that the stand-in never carries: pixels, frames and functional groups
#: (it has exactly one frame) and every geometry attribute (set from a :class:`FrameGeometry`).
_VIEW_DROPPED_KEYWORDS = frozenset(
    {
        "PixelData",
        "FloatPixelData",
        "DoubleFloatPixelData",
        "NumberOfFrames",
        "SharedFunctionalGroupsSequence",
        "PerFrameFunctionalGroupsSequence",
        "DimensionIndexSequence",
        "DimensionOrganizationSequence",
        "FrameOfReferenceUID",
        "PositionReferenceIndicator",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "SliceThickness",
        "SpacingBetweenSlices",
        "ImageOrientationSlide",
        "TotalPixelMatrixOriginSequence",
        "ImageCenterPointCoordinatesSequence",
    }
)

#: Type 2 patient/study attributes highdicom reads with attribute access from its source image.
_VIEW_TYPE2_KEYWORDS = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


@dataclass(frozen=True)
class FrameGeometry:
    """Where one frame lies in a patient coordinate system (the Plane Position/Orientation and
    Pixel Measures of a multi-frame IOD).

    ``synthetic`` marks a geometry made up for a source frame that has none (a projection
    radiograph): its own Frame of Reference UID, origin at (0, 0, 0), the orientation viewers
    assume for such a source. See :func:`synthetic_frame_geometry`.
    """

    frame_of_reference_uid: str
    image_position: tuple[float, float, float]
    image_orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]
    slice_thickness: float | None
    synthetic: bool = False


def _positive_pair(value: object) -> tuple[float, float] | None:
    """(row, column) spacing from a 2-valued DS attribute when both values are > 0, else None."""
    try:
        pair = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    if len(pair) != 2 or not all(math.isfinite(v) and v > 0 for v in pair):
        return None
    return pair  # type: ignore[return-value]


def _frame_groups(source: Dataset, frame_index: int) -> list[Dataset]:
    """Functional group items that apply to a frame: its per-frame item first, then the shared one."""
    groups: list[Dataset] = []
    per_frame = source.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame_index < len(per_frame):
        groups.append(per_frame[frame_index])
    shared = source.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    return groups


def _group_value(source: Dataset, frame_index: int, sequence: str, keyword: str) -> object | None:
    """``keyword`` at the top level of ``source``, else in the frame's functional ``sequence``."""
    if source.get(keyword) not in (None, ""):
        return source.get(keyword)
    for group in _frame_groups(source, frame_index):
        items = group.get(sequence)
        if items and items[0].get(keyword) not in (None, ""):
            return items[0].get(keyword)
    return None


def pixel_spacing(source: Dataset, frame_index: int = 0) -> tuple[float, float] | None:
    """Spacing (row, column) in mm of the source frame, ``None`` when the source does not state one.

    Pixel Spacing (top level or Pixel Measures functional group) when both values are > 0; else
    Imager Pixel Spacing (the detector plane, for CR/DX without a calibrated Pixel Spacing). A
    value of zero (e.g. "0\\\\0" in older CR files) counts as not stated.
    """
    for value in (
        _group_value(source, frame_index, "PixelMeasuresSequence", "PixelSpacing"),
        source.get("ImagerPixelSpacing"),
    ):
        pair = _positive_pair(value) if value is not None else None
        if pair is not None:
            return pair
    return None


def source_frame_geometry(source: Dataset, frame_index: int = 0) -> FrameGeometry | None:
    """The source frame's own patient geometry, ``None`` unless it is complete.

    Complete means a Frame of Reference UID, Image Position and Image Orientation (Patient) for
    the frame (top level for single-frame images, functional groups for multi-frame ones) and a
    Pixel Spacing > 0. Projection radiographs (no Frame of Reference) and multi-frame images
    without plane positions (e.g. pydicom's emri_small.dcm) have none.
    """
    frame_of_reference = source.get("FrameOfReferenceUID")
    position = _group_value(source, frame_index, "PlanePositionSequence", "ImagePositionPatient")
    orientation = _group_value(source, frame_index, "PlaneOrientationSequence", "ImageOrientationPatient")
    spacing = _positive_pair(_group_value(source, frame_index, "PixelMeasuresSequence", "PixelSpacing"))
    if not frame_of_reference or position is None or orientation is None or spacing is None:
        return None
    try:
        ipp = tuple(float(v) for v in position)  # type: ignore[union-attr]
        iop = tuple(float(v) for v in orientation)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    if len(ipp) != 3 or len(iop) != 6:
        return None
    thickness = _group_value(source, frame_index, "PixelMeasuresSequence", "SliceThickness")
    try:
        slice_thickness = float(thickness) if thickness not in (None, "") else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        slice_thickness = None
    return FrameGeometry(str(frame_of_reference), ipp, iop, spacing, slice_thickness)  # type: ignore[arg-type]


def synthetic_frame_of_reference_uid(source: Dataset, frame_index: int = 0) -> str:
    """A Frame of Reference UID of its own for one source frame that has none, deterministic.

    A hash of the source SOP Instance UID and frame, under the pacs-xai UID root, so that every
    output made from that frame (any model, any method) shares it and re-processing repeats it.
    """
    payload = f"pacs-xai-uid-v1|frame-of-reference|{source.SOPInstanceUID}|{int(frame_index)}"
    return str(generate_uid(prefix=_uids.PACS_XAI_UID_PREFIX or PYDICOM_ROOT_UID, entropy_srcs=[payload]))


def synthetic_frame_geometry(
    source: Dataset, frame_index: int = 0, *, slice_thickness: float | None = None
) -> FrameGeometry:
    """A patient geometry for a source frame that has none (projection radiographs, bare frames).

    - Frame of Reference: :func:`synthetic_frame_of_reference_uid` (never the source's own, since
      nothing here is positioned in it); Position Reference Indicator stays empty.
    - Image Position (Patient): (0, 0, 0), nominal.
    - Image Orientation (Patient): :data:`VIEWER_DEFAULT_ORIENTATION` (1\\\\0\\\\0\\\\0\\\\1\\\\0), the plane viewers
      put a source without one in, so that the output lies on the source there. Not the directions
      of the source's Patient Orientation (e.g. "L\\\\F" would give 1\\\\0\\\\0\\\\0\\\\0\\\\-1): OHIF 3.x
      refuses to overlay a map whose plane differs from the one it gives the source. The
      anatomical directions stay in the output's Patient Orientation, copied from the source.
    - Pixel Spacing: :func:`pixel_spacing` of the source, else :data:`NOMINAL_PIXEL_SPACING_MM`.
    - Slice Thickness: ``slice_thickness`` (default none: a projection has no slice; a
      Segmentation passes :data:`NOMINAL_SLICE_THICKNESS_MM`).
    """
    spacing = pixel_spacing(source, frame_index) or (NOMINAL_PIXEL_SPACING_MM, NOMINAL_PIXEL_SPACING_MM)
    return FrameGeometry(
        frame_of_reference_uid=synthetic_frame_of_reference_uid(source, frame_index),
        image_position=(0.0, 0.0, 0.0),
        image_orientation=VIEWER_DEFAULT_ORIENTATION,
        pixel_spacing=spacing,
        slice_thickness=slice_thickness,
        synthetic=True,
    )


#: Person Name (PN) attributes highdicom checks; for a name of one component its warning quotes the name.
_NAMES_HIGHDICOM_CHECKS = ("PatientName", "ReferringPhysicianName")


def without_person_names(source: Dataset) -> Dataset:
    """A copy of ``source`` for highdicom, with Patient's and Referring Physician's Name empty.

    highdicom warns about a name of one component (no ``^``) and quotes the name in the warning,
    which would put patient data on stderr and in the logs. The writers copy both names into the
    output afterwards, exactly as the source has them (:func:`copy_patient_study_attributes`).
    The copy shares the other elements; the caller's dataset is never changed.
    """
    view = Dataset({element.tag: element for element in source.elements()})
    for keyword in _NAMES_HIGHDICOM_CHECKS:
        if keyword in view:
            # A new element replaces the shared one (setting .value would change the source's).
            view.add_new(keyword, "PN", None)
    return view


def highdicom_source_view(source: Dataset, geometry: FrameGeometry | None) -> Dataset:
    """A single-frame stand-in for one source frame, to hand to highdicom's PM/SEG constructors.

    highdicom 0.28.2 derives an output's geometry and references from its source images and
    cannot take one frame of a multi-frame source without plane positions, nor build a Parametric
    Map for a source without a Frame of Reference. The stand-in is a Secondary Capture
    (single-frame, Frame of Reference optional) carrying the source's UIDs, patient, study and
    equipment attributes, Rows/Columns, and exactly the geometry given: ``geometry`` (Frame of
    Reference, position, orientation, spacing) or none at all (no Pixel Spacing either).
    Pixels, frames, functional groups and private attributes are never copied.

    highdicom copies the stand-in's SOP Class UID into its references; call
    :func:`retarget_source_references` on the output to point them at the real source again.
    """
    view = Dataset()
    for element in source:
        if element.tag.is_private or element.keyword in _VIEW_DROPPED_KEYWORDS or not element.keyword:
            continue
        # Copies: setting a value on the view must never reach the caller's dataset.
        view.add(copy.deepcopy(element) if element.VR == "SQ" else copy.copy(element))
    for keyword in _VIEW_TYPE2_KEYWORDS:
        if keyword not in view:
            setattr(view, keyword, None)
    for keyword in _NAMES_HIGHDICOM_CHECKS:  # see without_person_names
        if keyword in view:
            setattr(view, keyword, None)
    view.SOPClassUID = _STAND_IN_SOP_CLASS
    if geometry is not None:
        view.FrameOfReferenceUID = geometry.frame_of_reference_uid
        view.PositionReferenceIndicator = None
        view.ImagePositionPatient = list(geometry.image_position)
        view.ImageOrientationPatient = list(geometry.image_orientation)
        view.PixelSpacing = list(geometry.pixel_spacing)
        view.SliceThickness = geometry.slice_thickness
    return view


def drop_assumed_slice_spacing(obj: Dataset) -> None:
    """Remove the Spacing Between Slices that highdicom assumes (1 mm) for a single-frame output.

    An output of one source frame has one plane: there is no spacing between slices to state
    (the source's own value, if any, describes the source's stack, not this object).
    """
    for group in obj.get("SharedFunctionalGroupsSequence") or []:
        for measures in group.get("PixelMeasuresSequence") or []:
            if "SpacingBetweenSlices" in measures:
                del measures.SpacingBetweenSlices


def _retarget_items(dataset: Dataset, source: Dataset, frame_number: int | None) -> None:
    """Recursive part of :func:`retarget_source_references`."""
    for element in dataset:
        if element.VR != "SQ":
            continue
        for index, item in enumerate(element.value):
            if item.get("ReferencedSOPInstanceUID") == source.SOPInstanceUID:
                if element.keyword == "SourceImageSequence" and frame_number is not None:
                    # highdicom shares one item between the Source Image and the Common Instance
                    # Reference sequences; only the former may carry a frame number.
                    item = copy.deepcopy(item)
                    item.ReferencedFrameNumber = frame_number
                    element.value[index] = item
                item.ReferencedSOPClassUID = source.SOPClassUID
            _retarget_items(item, source, frame_number)


def retarget_source_references(obj: Dataset, source: Dataset, frame_index: int) -> None:
    """Point every reference to the source instance at its real SOP class (and frame).

    Undoes the stand-in of :func:`highdicom_source_view` in ``obj``: every item that references
    the source SOP Instance UID gets the source's SOP Class UID; Source Image Sequence items
    (top level and in the Derivation Image functional group) of a multi-frame source also get
    the 1-based Referenced Frame Number. The top-level Source Image Sequence becomes exactly
    :func:`source_image_item` (with the purpose of reference, 121322).
    """
    frame_number = int(frame_index) + 1 if number_of_frames(source) > 1 else None
    obj.SourceImageSequence = [source_image_item(source, frame_index)]
    _retarget_items(obj, source, frame_number)


def instance_number(source: Dataset, frame_index: int) -> int:
    """Instance Number of an output: the source's for a single-frame source, else the 1-based frame."""
    if number_of_frames(source) > 1:
        return int(frame_index) + 1
    try:
        return int(source.get("InstanceNumber") or 1)
    except (TypeError, ValueError):
        return 1
