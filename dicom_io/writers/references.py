"""How an output refers back to its source: the Source Image Sequence item, the patient and study
attributes copied from the source (same patient, same study), the references fixed after highdicom,
and the Instance Number.

The Source Image Sequence (0008,2112) item names the source SOP instance (and its 1-based frame
for a multi-frame source) with Purpose of Reference (121322, DCM, "Source image for image
processing operation").

An output is valid even when its source is not: a source that says Patient Identity Removed
(0012,0062) YES but names no De-identification Method (0012,0063, Type 1C) gets, in the output
only, a method that says so (:data:`METHOD_NOT_STATED`) and a warning in the log; a Patient
Identity Removed that is neither YES nor NO is written in upper case when that makes it one of
them, and left out (it is Type 3) otherwise.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.coding import Code

from dicom_io.codes import PURPOSE_SOURCE_IMAGE_FOR_PROCESSING

LOGGER = logging.getLogger(__name__)

#: De-identification Method (0012,0063, LO) written when the source says its identity was removed
#: but not how: the output states exactly that, nothing more.
METHOD_NOT_STATED = "Not stated by the source; its Patient Identity Removed is YES"

__all__ = [
    "METHOD_NOT_STATED",
    "PATIENT_STUDY_KEYWORDS",
    "code_item",
    "copy_patient_study_attributes",
    "instance_number",
    "number_of_frames",
    "retarget_source_references",
    "source_image_item",
]

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


def number_of_frames(source: Dataset) -> int:
    """Number of Frames (0028,0008), 1 when absent (single-frame IODs)."""
    value = source.get("NumberOfFrames")
    try:
        return max(int(value), 1) if value not in (None, "") else 1
    except (TypeError, ValueError):
        raise ValueError(f"source Number of Frames {value!r} is not an integer") from None


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


def _is_empty(dataset: Dataset, keyword: str) -> bool:
    """Whether ``keyword`` is absent from ``dataset`` or has an empty value."""
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
    repair_deidentification(target, str(source.get("SOPInstanceUID", "")))


def repair_deidentification(target: Dataset, source_uid: str) -> None:
    """Make the Patient module's de-identification attributes valid in ``target`` (an output), saying so.

    Patient Identity Removed must be YES or NO; with YES, De-identification Method or its code
    sequence is required (PS3.3 C.7.1.1, Type 1C). A source that breaks this would pass its error
    on to every output; see the module docstring for what is written instead. Logs the source's
    SOP Instance UID only.
    """
    if "PatientIdentityRemoved" not in target:
        return
    value = str(target.PatientIdentityRemoved or "").strip()
    if value not in ("YES", "NO"):
        if value.upper() in ("YES", "NO"):
            target.PatientIdentityRemoved = value.upper()
            LOGGER.warning("source %s: Patient Identity Removed written in upper case in the output", source_uid)
        else:
            del target.PatientIdentityRemoved
            LOGGER.warning(
                "source %s: Patient Identity Removed is neither YES nor NO: left out of the output", source_uid
            )
            return
    if target.PatientIdentityRemoved != "YES":
        return
    if _is_empty(target, "DeidentificationMethod") and _is_empty(target, "DeidentificationMethodCodeSequence"):
        target.DeidentificationMethod = METHOD_NOT_STATED
        LOGGER.warning(
            "source %s says Patient Identity Removed YES without a De-identification Method: the output "
            "says %r (PS3.3 C.7.1.1 requires a method)",
            source_uid,
            METHOD_NOT_STATED,
        )


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
