"""What highdicom is given instead of the source dataset: a copy without person names, or a
single-frame Secondary Capture stand-in of one source frame with exactly the geometry wanted.

Both keep Patient's and Referring Physician's Name (PN) out of highdicom's warnings, which would
quote them; the writers copy the names into the output afterwards.
"""

from __future__ import annotations

import copy

from pydicom import Dataset

from dicom_io.writers.geometry import FrameGeometry

__all__ = ["highdicom_source_view", "without_person_names"]

#: Secondary Capture Image Storage: the SOP class of the single-frame stand-in that highdicom is
#: given instead of the source (see :func:`highdicom_source_view`).
_STAND_IN_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"

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
