"""Segmentation (1.2.840.10008.5.1.4.1.1.66.4) of where an attribution map points.

One segment on the source frame's pixel grid, in one of two kinds:

- ``"fractional"``: the positive part of the map divided by its maximum, stored as FRACTIONAL
  with Maximum Fractional Value 255 — a heatmap that SEG viewers blend over the image. Fractional
  Type is PROBABILITY (the SEG vocabulary has nothing closer; OCCUPANCY would claim partial
  volume), but the values are *relative attribution*, not calibrated probabilities: the segment
  description says so.
- ``"binary"``: the top region, the highest-attribution pixels that together hold ``mass_share``
  of the positive attribution mass (:func:`top_region_mask`).

Coded description of the segment (no code in CID 7150/7151 describes "where a classifier's
explanation points", and anatomy or tissue codes would claim something the map does not say):

- Segmented Property Category: (130401, DCM, "Visual explanation") — the concept that groups
  CID 217 "Visual Explanation";
- Segmented Property Type: :func:`dicom_io.codes.quantity_code` of the method — (130402, DCM,
  "Class activation"), (130403, DCM, "Gradient-weighted class activation") or (130404, DCM,
  "Saliency");
- Segment Label "<method> <class>" (binary: "... top 50%"), Segment Algorithm Type AUTOMATIC,
  Algorithm Identification: name = model name, version = model version, family (123110, DCM,
  "Artificial Intelligence"), parameters explainer/class/kind (and mass share).

Geometry: a source frame with a patient geometry (CT, MR) gives the SEG its Frame of Reference,
plane position/orientation and pixel measures. A projection radiograph (CR/DX) or a frame without
plane position has none; the SEG then gets the synthetic geometry the Parametric Map of the same
frame gets (:func:`dicom_io.writers.geometry.synthetic_frame_geometry`: the same Frame of
Reference UID, origin (0, 0, 0), the orientation 1\\0\\0\\0\\1\\0 viewers give such a source, the
source's Pixel Spacing or Imager Pixel Spacing, else a nominal 1 mm), with a nominal Slice
Thickness of 1 mm (:data:`~dicom_io.writers.geometry.NOMINAL_SLICE_THICKNESS_MM`); Image
Comments says so. The frame-level Derivation Image reference still maps the SEG 1:1 onto the
source frame. Why not a SEG without Frame of Reference (the IOD allows one): OHIF 3.x cannot open
it — its SEG viewport reads Pixel Measures from the Shared Functional Groups ("Cannot destructure
property 'SpacingBetweenSlices' of 'PixelMeasures' as it is undefined") and its SEG loader compares
the SEG's Plane Orientation with the source's ("Cannot read properties of undefined (reading
'ImageOrientationPatient')") — and Pixel Measures without a Slice Thickness make highdicom
0.28.2's ``segread`` fail ("Sequence does not have the required attributes for a Pixel Measures
Sequence"), while with a Frame of Reference dciodvfy requires the thickness (Type 1C). Also:

- Patient Orientation comes from the source (its own, or computed from its Image Orientation;
  empty, Type 2, when unknown); with default arguments highdicom 0.28.2 leaves it out.
- No zero spacing is ever written (highdicom would copy a source Pixel Spacing of "0\\0").
- General Series Laterality is never written (dciodvfy rejects it on a SEG whatever the body
  part); Body Part Examined is copied.

highdicom is given a single-frame stand-in of the source frame whose references are pointed back
at the real source afterwards (see :func:`dicom_io.writers.source_view.highdicom_source_view`).

Provenance as for every output: same study; a new series per (source series, model version,
method, kind) — kinds "seg-fractional" and "seg-binary"; deterministic SOP Instance UID (the
binary one also depends on the mass share); Source Image Sequence with purpose 121322;
Derivation Description; Contributing Equipment for the model; patient/study attributes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian

from dicom_io.codes import ARTIFICIAL_INTELLIGENCE, VISUAL_EXPLANATION, quantity_code
from dicom_io.uids import derived_device_uid, derived_output_uids
from dicom_io.vr import LO_MAX, ST_MAX
from dicom_io.writers.descriptions import derivation_description, series_description
from dicom_io.writers.equipment import algorithm_equipment, enhanced_device_arguments, pacs_xai_version
from dicom_io.writers.geometry import (
    NOMINAL_SLICE_THICKNESS_MM,
    drop_assumed_slice_spacing,
    source_frame_geometry,
    synthetic_frame_geometry,
    synthetic_geometry_note,
)
from dicom_io.writers.orientation import set_patient_orientation
from dicom_io.writers.references import copy_patient_study_attributes, instance_number, retarget_source_references
from dicom_io.writers.result import ExplanationResult, check_inputs
from dicom_io.writers.source_view import highdicom_source_view

__all__ = [
    "DEFAULT_SERIES_NUMBERS",
    "OUTPUT_KINDS",
    "SegmentationKind",
    "build_segmentation",
    "fractional_map",
    "top_region_mask",
]

SegmentationKind = Literal["fractional", "binary"]

#: ``output_kind`` of the derived series UIDs, per segmentation kind.
OUTPUT_KINDS: dict[str, str] = {"fractional": "seg-fractional", "binary": "seg-binary"}

#: Series Number used when none is given, per kind (the SC is 9001, the Parametric Map 9002).
DEFAULT_SERIES_NUMBERS: dict[str, int] = {"fractional": 9003, "binary": 9004}

#: Maximum Fractional Value of the fractional kind: 8-bit steps of 1/255.
MAX_FRACTIONAL_VALUE = 255

# CIELab display colours: a warm orange for the heatmap, red for the top region.
_DISPLAY_COLOURS = {"fractional": (70.0, 40.0, 70.0), "binary": (53.0, 80.0, 67.0)}


def _check_mass_share(mass_share: float) -> float:
    try:
        share = float(mass_share)
    except (TypeError, ValueError):
        raise ValueError(f"mass_share must be a number in (0, 1], got {mass_share!r}") from None
    if not 0.0 < share <= 1.0:
        raise ValueError(f"mass_share must be in (0, 1], got {mass_share!r}")
    return share


def top_region_mask(attribution: np.ndarray, mass_share: float) -> np.ndarray:
    """The highest-attribution pixels that hold ``mass_share`` of the positive attribution mass.

    Positive values are sorted in descending order (ties in row-major order) and taken until
    their cumulative sum reaches ``mass_share`` x the total positive mass: the smallest such set,
    so the sum over the mask is >= share x total, and without its smallest pixel it is below.
    Negative and zero values never enter. A map without positive values gives an empty mask.
    ``mass_share`` must be in (0, 1]. Returns a boolean array of the map's shape (a 2-D image or
    a 3-D volume ``[slices, rows, columns]``, whose top region spans its slices).
    """
    values = np.asarray(attribution)
    if values.ndim not in (2, 3):
        raise ValueError(f"attribution must be a 2-D (or 3-D volume) array, got shape {values.shape}")
    share = _check_mass_share(mass_share)
    positive = np.clip(values.astype(np.float64, copy=False), 0.0, None).ravel()
    mask = np.zeros(positive.size, dtype=bool)
    if positive.size == 0:
        return mask.reshape(values.shape)
    order = np.argsort(-positive, kind="stable")
    cumulative = np.cumsum(positive[order])
    total = float(cumulative[-1])
    if not total > 0.0:
        return mask.reshape(values.shape)
    count = int(np.searchsorted(cumulative, share * total, side="left")) + 1
    count = min(count, int(np.count_nonzero(positive)))
    mask[order[:count]] = True
    return mask.reshape(values.shape)


def fractional_map(attribution: np.ndarray) -> np.ndarray:
    """The positive part of ``attribution`` divided by its maximum: float32 in [0, 1] (zeros if none)."""
    values = np.asarray(attribution, dtype=np.float64)
    positive = np.clip(values, 0.0, None)
    top = float(positive.max()) if positive.size else 0.0
    if not top > 0.0:
        return np.zeros(values.shape, dtype=np.float32)
    return np.clip(positive / top, 0.0, 1.0).astype(np.float32)


def _set_body_part(seg: pydicom.Dataset, source: pydicom.Dataset) -> None:
    """Body Part Examined from the source; no series Laterality (dciodvfy forbids it on a SEG)."""
    body_part = str(source.get("BodyPartExamined") or "").strip().upper()
    if body_part:
        seg.BodyPartExamined = body_part
    if "Laterality" in seg:
        del seg.Laterality


def _class_names(findings: Sequence[ExplanationResult]) -> str:
    return ", ".join(finding.class_name for finding in findings)


def _share_text(share: float) -> str:
    return f"{share * 100:.4g}%"


def _segment(result: ExplanationResult, kind: str, share: float, number: int = 1) -> hd.seg.SegmentDescription:
    """Segment ``number``: coded as a visual explanation of the method's quantity, made by the model."""
    parameters = {"explainer": result.method, "class": result.class_name, "kind": kind}
    label = f"{result.method} {result.class_name}"
    if kind == "binary":
        parameters["mass_share"] = f"{share:.6g}"
        label += f" top {_share_text(share)}"
        text = (
            f"Highest-attribution pixels holding {_share_text(share)} of the positive {result.method} "
            f"attribution mass for class '{result.class_name}'."
        )
    else:
        text = (
            f"Positive {result.method} attribution for class '{result.class_name}' divided by its maximum: "
            "relative attribution in [0, 1], not a calibrated probability."
        )
    algorithm = hd.AlgorithmIdentificationSequence(
        name=result.model_name,
        family=ARTIFICIAL_INTELLIGENCE,
        version=result.model_version,
        parameters=parameters,
    )
    segment = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label[:LO_MAX],
        segmented_property_category=VISUAL_EXPLANATION,
        segmented_property_type=quantity_code(result.method),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        display_color=hd.color.CIELabColor(*_DISPLAY_COLOURS[kind]),
    )
    segment.SegmentDescription = f"{text} Model {result.model_name} {result.model_version}."[:ST_MAX]
    return segment


def _findings_of(result: ExplanationResult | Sequence[ExplanationResult]) -> list[ExplanationResult]:
    """The results a SEG shows, one segment each: all of one frame, method and model, distinct classes."""
    results = [result] if isinstance(result, ExplanationResult) else list(result)
    if not results:
        raise ValueError("no explained finding to segment: give at least one ExplanationResult")
    first = results[0]
    for other in results[1:]:
        if not isinstance(other, ExplanationResult):
            raise ValueError(f"result must be ExplanationResults, got {type(other).__name__}")
        same = (other.method, other.model_name, other.model_version, other.frame_index)
        if same != (first.method, first.model_name, first.model_version, first.frame_index):
            raise ValueError(
                f"the findings of one Segmentation share method, model and frame: {same} differs from "
                f"{(first.method, first.model_name, first.model_version, first.frame_index)}"
            )
    names = [r.class_name for r in results]
    if len(set(names)) != len(names):
        raise ValueError(f"a finding is listed twice: {names}")
    return results


def build_segmentation(
    source: pydicom.Dataset,
    result: ExplanationResult | Sequence[ExplanationResult],
    *,
    kind: SegmentationKind,
    mass_share: float = 0.5,
    series_number: int | None = None,
    manufacturer: str = "pacs-xai",
    software_version: str = pacs_xai_version(),
    device_uid: str | None = None,
    device_serial_number: str | None = None,
) -> pydicom.Dataset:
    """The Segmentation of ``result`` for ``source``: a ``"fractional"`` heatmap or a ``"binary"`` top region.

    ``result`` may be several explained findings of one frame (a multi-label model): one segment
    per finding, in the order given; the UIDs are then those of the frame (not of one finding) and
    the Series Description says "findings".

    ``mass_share`` (binary only, in (0, 1]) is the share of the positive attribution mass the top
    region holds. ``series_number`` defaults to :data:`DEFAULT_SERIES_NUMBERS` of the kind;
    ``device_uid`` is the model's Device UID in the Contributing Equipment item (default: derived
    from model name and version); ``device_serial_number`` identifies this pacs-xai installation
    (default: the software version). Raises ValueError for an unknown kind, a share outside
    (0, 1], a source without the UIDs or grid the output needs, or a map that does not match it.
    """
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"kind must be 'fractional' or 'binary', got {kind!r}")
    share = _check_mass_share(mass_share)
    findings = _findings_of(result)
    for finding in findings:
        check_inputs(source, finding)
    several = len(findings) > 1 or findings[0].per_finding
    result = findings[0]
    frame_index = result.frame_index
    series_kind = OUTPUT_KINDS[kind]
    # A binary SEG's instance also depends on the mass share.
    instance_kind = series_kind if kind == "fractional" else f"{series_kind}-mass-{share:.6g}"
    series_uid, instance_uid = derived_output_uids(source, result, series_kind, instance_kind=instance_kind)
    device = device_uid or derived_device_uid(result.model_name, result.model_version)
    equipment = algorithm_equipment(
        result.model_name,
        result.model_version,
        manufacturer=manufacturer,
        software_version=software_version,
        device_uid=device,
        contribution=f"XAI {result.method} {kind} segmentation of class {_class_names(findings)}",
    )
    if kind == "fractional":
        planes = [fractional_map(finding.attribution) for finding in findings]
        segmentation_type = hd.seg.SegmentationTypeValues.FRACTIONAL
    else:
        planes = [top_region_mask(finding.attribution, share).astype(np.uint8) for finding in findings]
        segmentation_type = hd.seg.SegmentationTypeValues.BINARY
    # highdicom: [rows, cols] for one segment, [frames, rows, cols, segments] for several.
    pixels = planes[0] if len(planes) == 1 else np.stack(planes, axis=-1)[np.newaxis]
    geometry = source_frame_geometry(source, frame_index) or synthetic_frame_geometry(
        source, frame_index, slice_thickness=NOMINAL_SLICE_THICKNESS_MM
    )
    tag = "heatmap" if kind == "fractional" else f"top {_share_text(share)}"

    seg = hd.seg.Segmentation(
        source_images=[highdicom_source_view(source, geometry)],
        pixel_array=pixels,
        segmentation_type=segmentation_type,
        segment_descriptions=[_segment(finding, kind, share, number) for number, finding in enumerate(findings, 1)],
        series_instance_uid=series_uid,
        series_number=series_number if series_number is not None else DEFAULT_SERIES_NUMBERS[kind],
        sop_instance_uid=instance_uid,
        instance_number=instance_number(source, frame_index),
        **enhanced_device_arguments(manufacturer, software_version, device_serial_number),
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=MAX_FRACTIONAL_VALUE,
        content_label="XAI_HEATMAP" if kind == "fractional" else "XAI_TOP_REGION",
        content_description=f"{result.method} {_class_names(findings)} {tag}"[:LO_MAX],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=False,
        contributing_equipment=[equipment],
    )
    copy_patient_study_attributes(source, seg)
    retarget_source_references(seg, source, frame_index)
    drop_assumed_slice_spacing(seg)
    set_patient_orientation(seg, source, frame_index)
    _set_body_part(seg, source)
    seg.SeriesDescription = series_description(result, tag=tag, findings=several)
    output = "Fractional segmentation (heatmap)" if kind == "fractional" else f"Top-{_share_text(share)} region"
    seg.DerivationDescription = derivation_description(
        result, output=output, software_version=software_version, findings=findings if several else None
    )
    if geometry.synthetic:
        seg.ImageComments = synthetic_geometry_note(
            geometry, "this segmentation's Frame of Reference, position, orientation and slice thickness"
        )
    return seg
