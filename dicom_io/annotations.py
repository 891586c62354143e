"""Ground-truth annotations as DICOM Segmentation objects: how hospitals keep them.

A hospital's annotated set is a folder of images and Segmentation objects (SOP class
1.2.840.10008.5.1.4.1.1.66.4) whose frames reference their source image (Derivation Image /
Source Image Sequence per frame). :func:`read_annotations` turns one such SEG into a boolean mask
per (source SOP Instance UID, segment) on the source image's pixel grid, labelled by the
segment's Segment Label and the meaning of its Segmented Property Type (e.g. "Nodule").
Fractional segments count where the value is at least half of the Maximum Fractional Value.

:func:`write_annotation` writes such a SEG for an image and a mask: the phantoms' ground truth in
the form a hospital would have it (``pacs-xai demo phantoms --annotations``), so ``pacs-xai
evaluate --images`` reads the same kind of folder either way.

Single-frame source images only (radiographs; a CT or MR series is one image per slice); a SEG
that references a frame of a multi-frame image is refused with the reason.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from dicom_io.errors import DicomInputError
from dicom_io.writers.orientation import set_patient_orientation

__all__ = ["SEGMENTATION_STORAGE", "AnnotatedRegion", "is_segmentation", "read_annotations", "write_annotation"]

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
#: Segmented Property Category of a lesion annotation (SCT 49755003).
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = Code("49755003", "SCT", "Morphologically Abnormal Structure")


@dataclass(frozen=True)
class AnnotatedRegion:
    """One segment of a ground-truth SEG on one source image."""

    sop_instance_uid: str  # of the source image
    label: str  # Segment Label (0062,0005), e.g. "nodule" or "Lesion 1"
    finding: str  # the meaning of its Segmented Property Type, e.g. "Nodule"
    mask: np.ndarray  # bool [rows, cols] on the source image's pixel grid


def is_segmentation(ds: Dataset) -> bool:
    """True for a Segmentation object (by SOP Class UID)."""
    return str(ds.get("SOPClassUID", "")) == SEGMENTATION_STORAGE


def read_annotations(ds: Dataset) -> list[AnnotatedRegion]:
    """Every (source image, segment) mask of a Segmentation object that is not empty."""
    where = f"Segmentation {ds.get('SOPInstanceUID', '(no SOP Instance UID)')}"
    if not is_segmentation(ds):
        raise DicomInputError(f"{where}: SOP class {ds.get('SOPClassUID', '(none)')} is not Segmentation")
    try:
        seg = hd.seg.Segmentation.from_dataset(_with_slice_thickness(ds))
        sources = [uid for _, _, uid in seg.get_source_image_uids()]
        frames_per_source = [
            item.get("ReferencedFrameNumber")
            for group in ds.get("PerFrameFunctionalGroupsSequence", [])
            for derivation in group.get("DerivationImageSequence", [])
            for item in derivation.get("SourceImageSequence", [])
        ]
    except (AttributeError, KeyError, ValueError) as exc:
        raise DicomInputError(f"{where}: cannot be read as a Segmentation: {exc}") from exc
    if any(frame is not None for frame in frames_per_source):
        raise DicomInputError(f"{where}: references frames of a multi-frame image; only single-frame images")
    labels = {int(item.SegmentNumber): (str(item.SegmentLabel), _property_meaning(item)) for item in ds.SegmentSequence}
    regions: list[AnnotatedRegion] = []
    for uid in sources:
        try:
            pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[uid], segment_numbers=sorted(labels))
        except (KeyError, ValueError, RuntimeError) as exc:
            raise DicomInputError(f"{where}: no frames for source image {uid}: {exc}") from exc
        for index, number in enumerate(sorted(labels)):
            # Binary segments are 0/1; fractional ones come rescaled to 0..1 (highdicom's default).
            mask = np.asarray(pixels[0, ..., index]) >= 0.5
            if mask.any():
                regions.append(AnnotatedRegion(uid, *labels[number], mask))
    return regions


def write_annotation(source: Dataset, mask: np.ndarray, label: str, finding: Code) -> Dataset:
    """A BINARY Segmentation of ``mask`` (bool, the source's grid) on a single-frame ``source``,
    one MANUAL segment labelled ``label`` with Segmented Property Type ``finding``."""
    if mask.shape != (int(source.Rows), int(source.Columns)) or mask.dtype != bool:
        raise ValueError(
            f"mask must be bool {int(source.Rows)} x {int(source.Columns)} like the source, "
            f"got {mask.dtype} {mask.shape}"
        )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=label,
        segmented_property_category=MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
        segmented_property_type=finding,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=[source],
        pixel_array=mask[None].astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=generate_uid(),
        series_number=900,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="pacs-xai",
        manufacturer_model_name="ground truth",
        software_versions="1",
        device_serial_number="0",
        series_description=f"Ground truth: {label}",
    )
    set_patient_orientation(seg, source)  # Type 2C in General Image; highdicom leaves it out
    return seg


def _with_slice_thickness(ds: Dataset) -> Dataset:
    """``ds``, or a copy whose Pixel Measures get a nominal Slice Thickness of 1 mm where they have
    none: highdicom 0.28 refuses to read Pixel Measures without it (a projection radiograph's SEG,
    its own output included), and the masks read here never use the thickness."""
    groups = ds.get("SharedFunctionalGroupsSequence", [])
    measures = groups[0].get("PixelMeasuresSequence", []) if groups else []
    if not measures or "SliceThickness" in measures[0]:
        return ds
    repaired = copy.deepcopy(ds)
    repaired.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness = 1.0
    return repaired


def _property_meaning(item: Dataset) -> str:
    types = item.get("SegmentedPropertyTypeCodeSequence", [])
    return str(types[0].CodeMeaning) if types else ""
