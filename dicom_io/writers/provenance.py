"""What every pacs-xai output object says about where it came from.

Shared by the Secondary Capture, Parametric Map, Segmentation and SR writers:

- :class:`ExplanationResult`: one explained frame (the writers' input besides the source dataset);
- the Source Image Sequence item that points back at the source SOP instance (and frame), with
  Purpose of Reference (121322, DCM, "Source image for image processing operation");
- the Derivation Description text;
- the Patient / Study attributes copied from the source (same patient, same study);
- the Contributing Equipment item that identifies the model (IHE AI Results);
- Patient Orientation and Laterality taken over from the source where it has them.
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

from dicom_io.codes import PURPOSE_PROCESSING_EQUIPMENT, PURPOSE_SOURCE_IMAGE_FOR_PROCESSING

__all__ = [
    "DISCLAIMER",
    "UNPAIRED_BODY_PARTS",
    "ExplanationResult",
    "PATIENT_STUDY_KEYWORDS",
    "algorithm_equipment",
    "check_source",
    "code_item",
    "copy_patient_study_attributes",
    "derivation_description",
    "number_of_frames",
    "pacs_xai_version",
    "patient_orientation",
    "series_description",
    "series_laterality",
    "set_laterality",
    "source_image_item",
]

#: Burned into every overlay and written into every description: the output is not a diagnosis.
DISCLAIMER = "NOT FOR DIAGNOSTIC USE"

_LO_MAX = 64  # Long String (LO) value length
_ST_MAX = 1024  # Short Text (ST) value length

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
            if len(getattr(self, name)) > _LO_MAX:
                raise ValueError(
                    f"ExplanationResult.{name} {getattr(self, name)!r} is longer than {_LO_MAX} characters "
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
    return text[:_ST_MAX]


def series_description(result: ExplanationResult, *, tag: str = "") -> str:
    """Series Description (0008,103E, LO), e.g. "XAI gradcam nodule"; cut to 64 characters."""
    words = ["XAI", result.method, result.class_name] + ([tag] if tag else [])
    return " ".join(words)[:_LO_MAX]


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
        software_versions=[result.model_version, f"pacs-xai {software_version}"[:_LO_MAX]],
        contribution_description=contribution[:_ST_MAX],
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
