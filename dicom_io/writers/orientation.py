"""Anatomical direction and side of an output, taken over from its source: Patient Orientation
(0020,0020), Body Part Examined (0018,0015) and Laterality (0020,0060)."""

from __future__ import annotations

from collections.abc import Iterable

from pydicom import Dataset

from dicom_io.writers.geometry import frame_functional_groups

__all__ = [
    "PLACEHOLDER_ORIENTATION",
    "UNPAIRED_BODY_PARTS",
    "patient_orientation",
    "series_laterality",
    "set_laterality",
    "set_patient_orientation",
]

#: Patient Orientation handed to highdicom, which needs *some* orientation to build a PATIENT
#: Secondary Capture; replaced right after construction by the source's (which may be
#: multi-letter, e.g. oblique "LP", see :func:`set_patient_orientation`) or by an empty value
#: (Type 2C) when there is none.
PLACEHOLDER_ORIENTATION = ("L", "P")

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
    for group in frame_functional_groups(source, frame_index):
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


def set_patient_orientation(target: Dataset, source: Dataset, frame_index: int = 0) -> None:
    """Patient Orientation (0020,0020) of ``target``: the source frame's (:func:`patient_orientation`),
    empty when unknown (Type 2 / 2C)."""
    orientation = patient_orientation(source, frame_index)
    target.PatientOrientation = list(orientation) if orientation else None


def _frame_laterality(source: Dataset, frame_index: int) -> str | None:
    """Frame Laterality (0020,9072) from the Frame Anatomy functional group, if any."""
    for group in frame_functional_groups(source, frame_index):
        anatomy = group.get("FrameAnatomySequence")
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
