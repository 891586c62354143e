"""Comprehensive 3D SR (1.2.840.10008.5.1.4.1.1.88.34), TID 1500 Measurement Report of one finding.

The classifier's finding for one source frame, built with :class:`highdicom.sr.MeasurementReport`
inside :class:`highdicom.sr.Comprehensive3DSR`:

- Observation context: the model as device observer (Device UID, name, manufacturer, version).
- Procedure reported: :func:`dicom_io.codes.procedure_code` of the source modality.
- Image Library (TID 1600): the source image, with the TID 1603/1604 descriptors the source can
  fill honestly (a CR without Imager Pixel Spacing, or a frame without plane position, is listed
  with modality and size only).
- One Measurement and Qualitative Evaluation Group (TID 1501):
    - Tracking Identifier "<model> <class>" and a deterministic Tracking Unique Identifier;
    - Finding: :func:`dicom_io.codes.finding_code` of the class (SNOMED CT "Nodule", "Pleural
      effusion", "Normal", else a code of the private scheme 99PACSXAI, declared in the Coding
      Scheme Identification Sequence);
    - Algorithm Identification (TID 4019): model name and version, family (123110, DCM,
      "Artificial Intelligence"), parameter "explainer=<method>";
    - Measurement (TID 300): (122157, DCM, "Probability") of the finding, UCUM "1" (no units,
      0..1), with the same algorithm;
    - Qualitative evaluation (130401, DCM, "Visual explanation") = the quantity of the method's
      map (:func:`dicom_io.codes.quantity_code`);
    - the trust signals, where the result carries them (codes in :mod:`dicom_io.codes`, private
      scheme 99PACSXAI, values SNOMED CT Yes/No): Measurements "Attribution outside anatomy"
      (UCUM "%") and "Attribution concentration outside anatomy" (UCUM "1") with the algorithm
      "pacs-xai shortcut signal" and its thresholds as parameters, Qualitative evaluation
      "Explanation shortcut suspected" = Yes / No; Measurement "Feature Mahalanobis distance"
      (UCUM "1") with the algorithm "pacs-xai out-of-distribution signal" and its threshold,
      Qualitative evaluation "Input out of distribution" = Yes / No;
    - Source of the finding: the source image (and frame);
    - one IMAGE item (125201, DCM, "Illustration of Finding") per object in ``references`` — the
      Secondary Capture, Parametric Map and Segmentations made for the finding (a non-image
      object becomes a COMPOSITE item with the same concept name).
- Evidence: the source and every referenced object, all in the same study, in the Current
  Requested Procedure Evidence Sequence.
- Document state: COMPLETE, PRELIMINARY, UNVERIFIED — a model's output that nobody has signed.

Provenance as for every output: same study, a new series per (source series, model version,
method, "sr"), deterministic SOP Instance UID, Contributing Equipment for the model, patient and
study attributes copied from the source.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import pydicom
from highdicom._standard_utils import does_iod_have_pixel_data  # private in 0.28.2; highdicom uses it alike
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from dicom_io.codes import (
    ABSENT,
    ARTIFICIAL_INTELLIGENCE,
    ATTRIBUTION_OUTSIDE_ANATOMY,
    ATTRIBUTION_OUTSIDE_CONCENTRATION,
    EXPLANATION_SHORTCUT_SUSPECTED,
    FEATURE_DISTANCE,
    ILLUSTRATION_OF_FINDING,
    INPUT_OUT_OF_DISTRIBUTION,
    NO,
    NO_UNITS,
    PERCENT_UNIT,
    PRESENCE_OF_PROPERTY,
    PRESENT,
    PRIVATE_SCHEME,
    PRIVATE_SCHEME_NAME,
    PROBABILITY,
    PROBABILITY_UNIT,
    VISUAL_EXPLANATION,
    YES,
    finding_code,
    procedure_code,
    quantity_code,
)
from dicom_io.uids import derived_device_uid, derived_output_uids
from dicom_io.vr import LO_MAX
from dicom_io.writers.descriptions import series_description
from dicom_io.writers.equipment import algorithm_equipment, pacs_xai_version
from dicom_io.writers.geometry import source_frame_geometry
from dicom_io.writers.orientation import patient_orientation
from dicom_io.writers.references import copy_patient_study_attributes, instance_number, number_of_frames
from dicom_io.writers.result import ExplanationResult, FindingStatus, check_inputs
from dicom_io.writers.source_view import highdicom_source_view

__all__ = ["OUTPUT_KIND", "build_findings_report", "build_report"]

#: ``output_kind`` of the derived UIDs of SR outputs.
OUTPUT_KIND = "sr"
# ``output_kind`` of the derived Tracking Unique Identifier of the report's finding.
_TRACKING_KIND = "sr-finding"

_CROSS_SECTIONAL = frozenset({"CT", "MR", "PT"})
_PROJECTION = frozenset({"CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"})
_REFERENCE_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")


def _check_references(source: pydicom.Dataset, references: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """The referenced objects, checked: datasets with UIDs, in the source's study, no duplicates."""
    checked: list[pydicom.Dataset] = []
    seen = {str(source.SOPInstanceUID)}
    for index, reference in enumerate(references):
        if not isinstance(reference, pydicom.Dataset):
            raise ValueError(f"references[{index}] must be a pydicom Dataset, got {type(reference).__name__}")
        missing = [kw for kw in _REFERENCE_KEYWORDS if reference.get(kw) in (None, "")]
        if missing:
            raise ValueError(f"references[{index}] lacks {', '.join(missing)}")
        if reference.StudyInstanceUID != source.StudyInstanceUID:
            raise ValueError(
                f"references[{index}] ({reference.SOPInstanceUID}) belongs to study {reference.StudyInstanceUID}, "
                f"not the source's study {source.StudyInstanceUID}"
            )
        if str(reference.SOPInstanceUID) in seen:
            raise ValueError(f"references[{index}] ({reference.SOPInstanceUID}) is listed twice or is the source")
        seen.add(str(reference.SOPInstanceUID))
        checked.append(reference)
    return checked


def _library_view(source: pydicom.Dataset, frame_index: int) -> pydicom.Dataset:
    """What the Image Library entry of the source may say about it.

    highdicom writes the cross-sectional (TID 1604) or projection (TID 1603) descriptors by the
    view's Modality and reads them with attribute access. The view carries them only when the
    source states them (a complete frame geometry with Slice Thickness; Patient Orientation and
    Imager Pixel Spacing > 0); otherwise its Modality is "OT", so only modality (coded from the
    SOP Class UID, not from this attribute), rows and columns are written — nothing made up.
    """
    view = pydicom.Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "Rows", "Columns"):
        setattr(view, keyword, source.get(keyword))
    modality = str(source.get("Modality") or "").upper()
    view.Modality = "OT"
    geometry = source_frame_geometry(source, frame_index)
    if geometry is not None:
        view.FrameOfReferenceUID = geometry.frame_of_reference_uid
    if modality in _CROSS_SECTIONAL and geometry is not None and geometry.slice_thickness is not None:
        view.Modality = modality
        view.PixelSpacing = list(geometry.pixel_spacing)
        view.ImageOrientationPatient = list(geometry.image_orientation)
        view.ImagePositionPatient = list(geometry.image_position)
        view.SliceThickness = geometry.slice_thickness
    elif modality in _PROJECTION:
        orientation = patient_orientation(source, frame_index)
        spacing = source.get("ImagerPixelSpacing")
        try:
            positive = spacing is not None and len(spacing) == 2 and all(float(v) > 0 for v in spacing)
        except (TypeError, ValueError):
            positive = False
        if orientation is not None and positive:
            view.Modality = modality
            view.PatientOrientation = list(orientation)
            view.ImagerPixelSpacing = [float(v) for v in spacing]
    return view


def _evidence_view(source: pydicom.Dataset) -> pydicom.Dataset:
    """The source as highdicom's first evidence item (patient, study, equipment; type 2 defaults)."""
    view = highdicom_source_view(source, None)
    view.SOPClassUID = source.SOPClassUID
    return view


def _illustrations(references: Sequence[pydicom.Dataset]) -> list[hd.sr.ContentItem]:
    """The "Illustration of Finding" items for the objects made for the finding."""
    items: list[hd.sr.ContentItem] = []
    for reference in references:
        arguments = {
            "name": ILLUSTRATION_OF_FINDING,
            "referenced_sop_class_uid": str(reference.SOPClassUID),
            "referenced_sop_instance_uid": str(reference.SOPInstanceUID),
            "relationship_type": hd.sr.RelationshipTypeValues.CONTAINS,
        }
        if does_iod_have_pixel_data(str(reference.SOPClassUID)):
            items.append(hd.sr.ImageContentItem(**arguments))
        else:
            items.append(hd.sr.CompositeContentItem(**arguments))
    return items


#: Algorithm names of the trust signals' measurements (TID 4019).
SHORTCUT_ALGORITHM = "pacs-xai shortcut signal"
OOD_ALGORITHM = "pacs-xai out-of-distribution signal"


def _trust_items(
    result: ExplanationResult, software_version: str
) -> tuple[list[hd.sr.Measurement], list[hd.sr.QualitativeEvaluation]]:
    """The measurements and yes/no evaluations of the result's trust signals (none where absent)."""
    measurements: list[hd.sr.Measurement] = []
    evaluations: list[hd.sr.QualitativeEvaluation] = []
    shortcut = result.shortcut
    if shortcut is not None:
        algorithm = hd.sr.AlgorithmIdentification(
            name=SHORTCUT_ALGORITHM,
            version=software_version,
            parameters=[
                f"share>={100.0 * shortcut.share_threshold:.4g}%",
                f"concentration>={shortcut.concentration_threshold:.4g}",
            ],
        )
        measurements.append(
            hd.sr.Measurement(
                name=ATTRIBUTION_OUTSIDE_ANATOMY,
                value=round(shortcut.share_percent, 2),
                unit=PERCENT_UNIT,
                algorithm_id=algorithm,
            )
        )
        measurements.append(
            hd.sr.Measurement(
                name=ATTRIBUTION_OUTSIDE_CONCENTRATION,
                value=round(float(shortcut.concentration), 4),
                unit=NO_UNITS,
                algorithm_id=algorithm,
            )
        )
        evaluations.append(
            hd.sr.QualitativeEvaluation(EXPLANATION_SHORTCUT_SUSPECTED, YES if shortcut.suspected else NO)
        )
    ood = result.ood
    if ood is not None:
        algorithm = hd.sr.AlgorithmIdentification(
            name=OOD_ALGORITHM, version=software_version, parameters=[f"threshold={ood.threshold:.4g}"]
        )
        measurements.append(
            hd.sr.Measurement(
                name=FEATURE_DISTANCE, value=round(float(ood.distance), 4), unit=NO_UNITS, algorithm_id=algorithm
            )
        )
        evaluations.append(
            hd.sr.QualitativeEvaluation(INPUT_OUT_OF_DISTRIBUTION, YES if ood.out_of_distribution else NO)
        )
    return measurements, evaluations


def _finding_group(
    source: pydicom.Dataset,
    result: ExplanationResult,
    references: Sequence[pydicom.Dataset],
    tracking_uid: str,
    software_version: str,
    status: FindingStatus | None = None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501: finding, probability, algorithm, explanation kind, trust signals, source and
    illustrations; with a ``status`` (multi-label), its threshold and Presence = Present / Absent."""
    parameters = [f"explainer={result.method}"]
    presence = []
    if status is not None:
        parameters.append(f"threshold={float(status.threshold):.4g}")
        presence = [hd.sr.QualitativeEvaluation(PRESENCE_OF_PROPERTY, PRESENT if status.present else ABSENT)]
    algorithm = hd.sr.AlgorithmIdentification(
        name=result.model_name,
        version=result.model_version,
        parameters=parameters,
        family=ARTIFICIAL_INTELLIGENCE,
    )
    frames = [result.frame_index + 1] if number_of_frames(source) > 1 else None
    trust_measurements, trust_evaluations = _trust_items(result, software_version)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid, identifier=f"{result.model_name} {result.class_name}"[:LO_MAX]
        ),
        finding_type=finding_code(result.class_name),
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(
                name=PROBABILITY,
                value=float(result.probability),
                unit=PROBABILITY_UNIT,
                algorithm_id=algorithm,
            ),
            *trust_measurements,
        ],
        qualitative_evaluations=[
            *presence,
            hd.sr.QualitativeEvaluation(VISUAL_EXPLANATION, quantity_code(result.method)),
            *trust_evaluations,
        ],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=str(source.SOPClassUID),
                referenced_sop_instance_uid=str(source.SOPInstanceUID),
                referenced_frame_numbers=frames,
            )
        ],
    )
    group[0].ContentSequence.extend(_illustrations(references))
    return group


def _unexplained_group(
    source: pydicom.Dataset, frame: ReportFrame, status: FindingStatus, tracking_uid: str
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 for a finding the frame's outputs do not explain: finding, probability, threshold,
    Presence = Present / Absent, source; no explanation, no illustrations."""
    algorithm = hd.sr.AlgorithmIdentification(
        name=frame.model_name,
        version=frame.model_version,
        parameters=[f"threshold={float(status.threshold):.4g}"],
        family=ARTIFICIAL_INTELLIGENCE,
    )
    frames = [frame.frame_index + 1] if number_of_frames(source) > 1 else None
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid, identifier=f"{frame.model_name} {status.class_name}"[:LO_MAX]
        ),
        finding_type=finding_code(status.class_name),
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(
                name=PROBABILITY, value=float(status.probability), unit=PROBABILITY_UNIT, algorithm_id=algorithm
            )
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(PRESENCE_OF_PROPERTY, PRESENT if status.present else ABSENT)
        ],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=str(source.SOPClassUID),
                referenced_sop_instance_uid=str(source.SOPInstanceUID),
                referenced_frame_numbers=frames,
            )
        ],
    )


def _observer(result: ExplanationResult | ReportFrame, manufacturer: str, device_uid: str) -> hd.sr.ObservationContext:
    """The model as the device observer (TID 1004)."""
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=device_uid,
                name=result.model_name,
                manufacturer_name=manufacturer,
                model_name=f"{result.model_name} {result.model_version}"[:LO_MAX],
            ),
        )
    )


def _declare_private_scheme(sr: pydicom.Dataset, *results: ExplanationResult, classes: Sequence[str] = ()) -> None:
    """Coding Scheme Identification Sequence item for 99PACSXAI when a finding or a trust signal uses it."""
    uses_trust_codes = any(result.shortcut is not None or result.ood is not None for result in results)
    names = [*classes, *(result.class_name for result in results)]
    if all(finding_code(name).scheme_designator != PRIVATE_SCHEME for name in names) and not uses_trust_codes:
        return
    item = pydicom.Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = PRIVATE_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = "pacs-xai"
    sr.CodingSchemeIdentificationSequence = [item]


def build_report(
    source: pydicom.Dataset,
    result: ExplanationResult,
    *,
    references: Sequence[pydicom.Dataset] = (),
    series_number: int = 9005,
    manufacturer: str = "pacs-xai",
    software_version: str = pacs_xai_version(),
    device_uid: str | None = None,
) -> pydicom.Dataset:
    """The TID 1500 report of ``result``'s finding on ``source``, referencing the objects made for it.

    ``references`` are the Secondary Capture / Parametric Map / Segmentation datasets made from
    the same result (same study; each referenced once). ``device_uid`` is the model's Device UID
    (observer context and Contributing Equipment; default: derived from model name and version).
    Raises ValueError for a source without the UIDs or grid the output needs, a map that does not
    match it, or a reference without UIDs, from another study, or listed twice.
    """
    check_inputs(source, result)
    referenced = _check_references(source, references)
    series_uid, instance_uid = derived_output_uids(source, result, OUTPUT_KIND)
    # The finding's Tracking Unique Identifier: derived like the report's instance, of its own kind.
    _, tracking_uid = derived_output_uids(source, result, OUTPUT_KIND, instance_kind=_TRACKING_KIND)
    device = device_uid or derived_device_uid(result.model_name, result.model_version)
    equipment = algorithm_equipment(
        result.model_name,
        result.model_version,
        manufacturer=manufacturer,
        software_version=software_version,
        device_uid=device,
        contribution=f"XAI finding '{result.class_name}' and its {result.method} explanation",
    )
    sr = _measurement_report(
        source,
        result,
        [_finding_group(source, result, referenced, tracking_uid, software_version)],
        referenced,
        uids=(series_uid, instance_uid),
        series_number=series_number,
        description=series_description(result, tag="report"),
        manufacturer=manufacturer,
        software_version=software_version,
        device_uid=device,
        equipment=equipment,
    )
    _declare_private_scheme(sr, result)
    return sr


@dataclass(frozen=True)
class ReportFrame:
    """What keys a findings report besides its source: the method, the model and the frame (0-based)."""

    method: str
    model_name: str
    model_version: str
    frame_index: int


def build_findings_report(
    source: pydicom.Dataset,
    frame: ReportFrame,
    findings: Sequence[FindingStatus],
    explained: Sequence[tuple[ExplanationResult, Sequence[pydicom.Dataset]]],
    *,
    shared_references: Sequence[pydicom.Dataset] = (),
    series_number: int = 9005,
    manufacturer: str = "pacs-xai",
    software_version: str = pacs_xai_version(),
    device_uid: str | None = None,
) -> pydicom.Dataset:
    """The TID 1500 report of a multi-label model on one source frame: one group per class of the
    model, in the order of ``findings``, each with its probability, threshold and Presence (Present
    at or above the threshold, else Absent). A finding in ``explained`` (its result and the objects
    made for it: Secondary Capture, Parametric Map) also carries its explanation, trust signals and
    illustrations, with the ``shared_references`` (the frame's Segmentations, one segment per
    finding). One report per (source frame, model, method): the same UIDs whichever findings are
    present. Raises ValueError for a finding explained but not listed, results of another frame
    or method, and for the reasons :func:`build_report` gives.
    """
    statuses = {status.class_name: status for status in findings}
    if len(statuses) != len(findings) or not findings:
        raise ValueError(f"findings must list each class once, got {[s.class_name for s in findings]}")
    by_class: dict[str, tuple[ExplanationResult, list[pydicom.Dataset]]] = {}
    for result, references in explained:
        check_inputs(source, result)
        if result.class_name not in statuses:
            raise ValueError(f"explained finding {result.class_name!r} is not among the findings {list(statuses)}")
        if (result.method, result.model_name, result.model_version, result.frame_index) != (
            frame.method,
            frame.model_name,
            frame.model_version,
            frame.frame_index,
        ):
            raise ValueError(
                f"explained finding {result.class_name!r} is of another method, model or frame than {frame}"
            )
        by_class[result.class_name] = (result, list(references))
    every_reference = _check_references(
        source, [*[ref for _, refs in by_class.values() for ref in refs], *shared_references]
    )
    series_uid, instance_uid = derived_output_uids(source, frame, OUTPUT_KIND)
    groups = []
    for status in findings:
        _, tracking_uid = derived_output_uids(
            source, frame, OUTPUT_KIND, instance_kind=_TRACKING_KIND, finding=status.class_name
        )
        if status.class_name in by_class:
            result, references = by_class[status.class_name]
            groups.append(
                _finding_group(
                    source, result, [*references, *shared_references], tracking_uid, software_version, status
                )
            )
        else:
            groups.append(_unexplained_group(source, frame, status, tracking_uid))
    device = device_uid or derived_device_uid(frame.model_name, frame.model_version)
    present = [status.class_name for status in findings if status.present]
    equipment = algorithm_equipment(
        frame.model_name,
        frame.model_version,
        manufacturer=manufacturer,
        software_version=software_version,
        device_uid=device,
        contribution=f"XAI findings ({', '.join(present) or 'none present'}) and their {frame.method} explanations"[
            :LO_MAX
        ],
    )
    sr = _measurement_report(
        source,
        frame,
        groups,
        every_reference,
        uids=(series_uid, instance_uid),
        series_number=series_number,
        description=f"XAI {frame.method} findings report"[:LO_MAX],
        manufacturer=manufacturer,
        software_version=software_version,
        device_uid=device,
        equipment=equipment,
    )
    _declare_private_scheme(sr, *(result for result, _ in by_class.values()), classes=list(statuses))
    return sr


def _measurement_report(
    source: pydicom.Dataset,
    keyed: ExplanationResult | ReportFrame,
    groups: Sequence[hd.sr.MeasurementsAndQualitativeEvaluations],
    references: Sequence[pydicom.Dataset],
    *,
    uids: tuple[str, str],
    series_number: int,
    description: str,
    manufacturer: str,
    software_version: str,
    device_uid: str,
    equipment: pydicom.Dataset,
) -> pydicom.Dataset:
    """The Comprehensive 3D SR that both reports are: TID 1500 with the model as device observer,
    the measurement ``groups`` on the frame of ``keyed``, the source and ``references`` as evidence,
    in the series and instance ``uids``; complete, not final, not verified (an algorithm wrote it),
    with the source's patient and study and pacs-xai as manufacturer model."""
    report = hd.sr.MeasurementReport(
        observation_context=_observer(keyed, manufacturer, device_uid),
        procedure_reported=procedure_code(source.get("Modality")),
        imaging_measurements=list(groups),
        referenced_images=[_library_view(source, keyed.frame_index)],
    )
    series_uid, instance_uid = uids
    sr = hd.sr.Comprehensive3DSR(
        evidence=[_evidence_view(source), *references],
        content=report[0],
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=instance_uid,
        instance_number=instance_number(source, keyed.frame_index),
        manufacturer=manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[equipment],
        series_description=description,
    )
    copy_patient_study_attributes(source, sr)
    sr.ManufacturerModelName = "pacs-xai"
    sr.SoftwareVersions = software_version
    return sr
