"""Outputs of a volume explanation, in the source series' own Frame of Reference.

A volume model explains a whole CT or MR series at once; its attribution map, drawn back onto the
source voxels (:class:`dicom_io.pixels.volume.VolumeGrid`), becomes:

- one multi-frame **Parametric Map** (:func:`build_volume_parametric_map`): one frame per source
  slice, float values as the explainer gave them, each frame with its Plane Position (Patient)
  and a Derivation Image reference to its source instance, every source instance in the Source
  Image Sequence (purpose 121322); the source's Frame of Reference, orientation and pixel
  measures (Spacing Between Slices = the series' step);
- one multi-frame **Segmentation** (:func:`build_volume_segmentation`): the same frames, the
  positive attribution divided by its maximum over the whole volume (``fractional``) or the
  top region holding ``mass_share`` of the volume's positive mass (``binary``), segment coded
  as for single images (:mod:`dicom_io.writers.seg`);
- a **Secondary Capture** per source slice (:func:`build_volume_secondary_captures`), the
  overlay burned in with one colour scale for the whole volume, so a slice looks as hot as its
  attribution is; or only the ``key_slices`` slices with the most positive attribution.

UIDs are deterministic, as for every output: the series one per (source series, model, method,
kind), the instance keyed on the first source instance and the kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian

from dicom_io.uids import derived_device_uid, derived_output_uids
from dicom_io.vr import LO_MAX
from dicom_io.writers.descriptions import derivation_description, series_description
from dicom_io.writers.equipment import algorithm_equipment, enhanced_device_arguments, pacs_xai_version
from dicom_io.writers.orientation import set_laterality, set_patient_orientation
from dicom_io.writers.pm import _value_mapping, attribution_voi_lut, stored_attribution
from dicom_io.writers.references import copy_patient_study_attributes
from dicom_io.writers.result import ExplanationResult
from dicom_io.writers.sc import build_secondary_capture
from dicom_io.writers.seg import MAX_FRACTIONAL_VALUE, _segment, _set_body_part, fractional_map, top_region_mask

__all__ = [
    "VOLUME_OUTPUT_KINDS",
    "VolumeExplanation",
    "build_volume_parametric_map",
    "build_volume_secondary_captures",
    "build_volume_segmentation",
]

#: ``output_kind`` of the derived UIDs, per output.
VOLUME_OUTPUT_KINDS = {"pm": "pm-volume", "seg_fractional": "seg-fractional-volume", "seg_binary": "seg-binary-volume"}


@dataclass(frozen=True, eq=False)
class VolumeExplanation:
    """One explained volume: what the volume writers need besides the source slices.

    ``attribution`` and ``display`` are ``[slices, rows, columns]`` on the source voxels, slice
    ``k`` belonging to the ``k``-th source dataset given to the writers (the volume's sorted order).
    """

    method: str
    class_name: str
    probability: float
    model_name: str
    model_version: str
    attribution: np.ndarray  # float32, signed, raw scale
    display: np.ndarray  # float32 in [0, 1], the windowed source slices (1 = bright)

    def slice_result(self, index: int, attribution: np.ndarray | None = None) -> ExplanationResult:
        """Slice ``index`` as a single-image result (validated there): for the SC writer and the
        shared descriptions. ``attribution`` replaces the slice's map (e.g. clipped for display)."""
        return ExplanationResult(
            method=self.method,
            class_name=self.class_name,
            probability=self.probability,
            model_name=self.model_name,
            model_version=self.model_version,
            frame_index=0,
            attribution=self.attribution[index] if attribution is None else attribution,
            display=self.display[index],
        )


def _check(sources: Sequence[pydicom.Dataset], explanation: VolumeExplanation) -> None:
    if not sources:
        raise ValueError("no source slices")
    series = {str(ds.SeriesInstanceUID) for ds in sources}
    if len(series) != 1:
        raise ValueError(f"the source slices belong to {len(series)} series; a volume output needs one")
    shape = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
    for name in ("attribution", "display"):
        array = getattr(explanation, name)
        if array.shape != shape:
            raise ValueError(
                f"{name} has shape {array.shape}, the source slices are {shape} (slices, rows, columns); "
                "draw the map back onto the source voxels first"
            )
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name} has non-finite values")


def build_volume_parametric_map(
    sources: Sequence[pydicom.Dataset],
    explanation: VolumeExplanation,
    *,
    series_number: int = 9012,
    manufacturer: str = "pacs-xai",
    software_version: str = pacs_xai_version(),
    device_serial_number: str | None = None,
) -> pydicom.Dataset:
    """The multi-frame Parametric Map of a volume explanation, one frame per source slice."""
    _check(sources, explanation)
    first = explanation.slice_result(0)
    values, scale = stored_attribution(explanation.attribution)
    series_uid, instance_uid = derived_output_uids(sources[0], first, VOLUME_OUTPUT_KINDS["pm"])
    pm = hd.pm.ParametricMap(
        source_images=list(sources),
        pixel_array=values,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=instance_uid,
        instance_number=1,
        **enhanced_device_arguments(manufacturer, software_version, device_serial_number),
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[_value_mapping(values, scale, first)],
        voi_lut_transformations=[attribution_voi_lut(values)],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        content_label="XAI_ATTRIBUTION",
        content_description=f"{explanation.method} attribution, class {explanation.class_name}"[:LO_MAX],
        contributing_equipment=[_equipment(explanation, manufacturer, software_version, "attribution values")],
    )
    _complete(pm, sources, first, software_version, output="Parametric map (raw values) of the volume", tag="map")
    set_laterality(pm, sources[0], 0)
    return pm


def build_volume_segmentation(
    sources: Sequence[pydicom.Dataset],
    explanation: VolumeExplanation,
    *,
    kind: Literal["fractional", "binary"] = "fractional",
    mass_share: float = 0.5,
    series_number: int | None = None,
    manufacturer: str = "pacs-xai",
    software_version: str = pacs_xai_version(),
    device_serial_number: str | None = None,
) -> pydicom.Dataset:
    """The multi-frame Segmentation of a volume explanation, one frame per source slice: the
    positive attribution over the volume's maximum (``fractional``) or the volume's top region."""
    _check(sources, explanation)
    if kind not in ("fractional", "binary"):
        raise ValueError(f"kind must be 'fractional' or 'binary', got {kind!r}")
    first = explanation.slice_result(0)
    output_kind = VOLUME_OUTPUT_KINDS[f"seg_{kind}"]
    series_uid, instance_uid = derived_output_uids(sources[0], first, output_kind, instance_kind=output_kind)
    if kind == "fractional":
        pixels = fractional_map(explanation.attribution)
        segmentation_type = hd.seg.SegmentationTypeValues.FRACTIONAL
        tag = "heatmap"
    else:
        pixels = top_region_mask(explanation.attribution, mass_share).astype(np.uint8)
        segmentation_type = hd.seg.SegmentationTypeValues.BINARY
        tag = f"top {mass_share * 100:.4g}%"
    seg = hd.seg.Segmentation(
        source_images=list(sources),
        pixel_array=pixels,
        segmentation_type=segmentation_type,
        segment_descriptions=[_segment(first, kind, mass_share)],
        series_instance_uid=series_uid,
        series_number=series_number if series_number is not None else (9013 if kind == "fractional" else 9014),
        sop_instance_uid=instance_uid,
        instance_number=1,
        **enhanced_device_arguments(manufacturer, software_version, device_serial_number),
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=MAX_FRACTIONAL_VALUE,
        content_label="XAI_HEATMAP" if kind == "fractional" else "XAI_TOP_REGION",
        content_description=f"{explanation.method} {explanation.class_name} {tag}"[:LO_MAX],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=False,
        contributing_equipment=[_equipment(explanation, manufacturer, software_version, f"{kind} segmentation")],
    )
    _set_body_part(seg, sources[0])
    output = "Fractional segmentation (heatmap)" if kind == "fractional" else f"Top region ({tag})"
    _complete(seg, sources, first, software_version, output=f"{output} of the volume", tag=tag)
    return seg


def build_volume_secondary_captures(
    sources: Sequence[pydicom.Dataset],
    explanation: VolumeExplanation,
    *,
    key_slices: int | None = None,
    clip_percentile: float = 99.5,
    **options: object,
) -> list[tuple[int, pydicom.Dataset]]:
    """``(slice index, Secondary Capture)`` per source slice, or for the ``key_slices`` slices with
    the most positive attribution (in slice order). One colour scale for the whole volume: its
    top is the ``clip_percentile`` of the volume's positive values, so a slice looks as hot as
    its attribution is."""
    _check(sources, explanation)
    positive = np.clip(explanation.attribution, 0.0, None)
    top = float(np.percentile(positive[positive > 0], clip_percentile)) if np.any(positive > 0) else 0.0
    slices = range(len(sources))
    if key_slices is not None:
        if key_slices < 1:
            raise ValueError(f"key_slices must be at least 1, got {key_slices}")
        mass = positive.reshape(len(sources), -1).sum(axis=1)
        slices = sorted(np.argsort(-mass, kind="stable")[:key_slices].tolist())
    outputs = []
    for index in slices:
        result = explanation.slice_result(index)
        sc = build_secondary_capture(sources[index], result, colour_scale_top=top, **options)  # type: ignore[arg-type]
        outputs.append((int(index), sc))
    return outputs


def _equipment(explanation: VolumeExplanation, manufacturer: str, software_version: str, what: str) -> pydicom.Dataset:
    return algorithm_equipment(
        explanation.model_name,
        explanation.model_version,
        manufacturer=manufacturer,
        software_version=software_version,
        device_uid=derived_device_uid(explanation.model_name, explanation.model_version),
        contribution=f"XAI {explanation.method} {what} of class {explanation.class_name} (volume)",
    )


def _complete(
    obj: pydicom.Dataset,
    sources: Sequence[pydicom.Dataset],
    first: ExplanationResult,
    software_version: str,
    *,
    output: str,
    tag: str,
) -> None:
    """Patient/study attributes, orientation and descriptions, as on single-image outputs."""
    copy_patient_study_attributes(sources[0], obj)
    set_patient_orientation(obj, sources[0], 0)
    obj.SeriesDescription = series_description(first, tag=f"3D {tag}")
    text = derivation_description(first, output=output, software_version=software_version)
    obj.DerivationDescription = text.replace("source frame 1", f"{len(sources)} source slices")
