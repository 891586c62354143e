"""Parametric Map (1.2.840.10008.5.1.4.1.1.30): the attribution values themselves.

The signed attribution map of one source frame, at the source's pixel grid, as 32-bit floats
(Float Pixel Data), nothing clipped. Built with :class:`highdicom.pm.ParametricMap`, then
completed like the Secondary Capture:

- Stored values: the attribution over its largest magnitude, so in [-1, 1]
  (:func:`stored_attribution`). OHIF 3 draws a Parametric Map's floats as if they were 0 to 1,
  whatever its windows and mappings say, and a trained model's raw Grad-CAM values are often
  near 0.001: stored raw, the map was there and showed nothing.
- Real World Value Mapping: slope = that largest magnitude, intercept 0, over the stored range,
  so the mapped values are the explainer's raw attribution (highdicom's ``get_frame`` applies
  it); LUT label = method, explanation "<method> attribution for class <class>", units UCUM
  "arbitrary unit" (:data:`dicom_io.codes.ATTRIBUTION_UNIT`), quantity =
  :func:`dicom_io.codes.quantity_code` of the method (DCM 130402 / 130403 / 130404).
- Window (Frame VOI LUT on the stored values, function LINEAR_EXACT):
  symmetric around 0 at ± the 99th percentile of |value| for a signed map, [0, 99th percentile]
  for a map without negative values (:func:`attribution_window`).
- Geometry: the source frame's own Frame of Reference, position, orientation and spacing when
  it has them (CT, MR, enhanced images with plane positions). The Parametric Map IOD requires a
  Frame of Reference and plane position/orientation, which a projection radiograph (CR/DX) or a
  multi-frame image without plane positions does not have; for those the map gets a geometry of
  its own (:func:`dicom_io.writers.geometry.synthetic_frame_geometry`): a deterministic Frame of
  Reference UID per source frame, origin (0, 0, 0), the orientation 1\\0\\0\\0\\1\\0 that viewers
  give a source without one (OHIF 3.x overlays a map only in the plane it gives the source; the
  anatomical directions stay in Patient Orientation), Pixel Spacing from Pixel Spacing / Imager
  Pixel Spacing (> 0) or a nominal 1 mm. Image Comments says so. The map still lies
  pixel-for-pixel on the referenced source frame (Derivation Image Sequence, Spatial Locations
  Preserved YES), which is how a viewer overlays it.
  highdicom 0.28.2 itself fails on a source without Frame of Reference ("Unexpected mismatch
  between dimension index values ...") and refuses one frame of a multi-frame source without
  plane positions; it is therefore given a single-frame stand-in of the source frame
  (:func:`dicom_io.writers.source_view.highdicom_source_view`) whose references are pointed back
  at the real source (SOP class, frame number) afterwards.
- Provenance as for every output: same study, a new series per (source series, model version,
  method, "pm"), deterministic SOP Instance UID, Source Image Sequence with purpose 121322,
  Derivation Description, Contributing Equipment for the model, patient/study attributes,
  Body Part Examined / Laterality and Patient Orientation from the source.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian

from dicom_io.codes import ATTRIBUTION_UNIT, quantity_code
from dicom_io.uids import derived_device_uid, derived_output_uids
from dicom_io.vr import LO_MAX, SH_MAX
from dicom_io.writers.descriptions import derivation_description, series_description
from dicom_io.writers.equipment import algorithm_equipment, enhanced_device_arguments, pacs_xai_version
from dicom_io.writers.geometry import (
    drop_assumed_slice_spacing,
    source_frame_geometry,
    synthetic_frame_geometry,
    synthetic_geometry_note,
)
from dicom_io.writers.orientation import set_laterality, set_patient_orientation
from dicom_io.writers.references import copy_patient_study_attributes, instance_number, retarget_source_references
from dicom_io.writers.result import ExplanationResult, check_inputs
from dicom_io.writers.source_view import highdicom_source_view

__all__ = ["OUTPUT_KIND", "attribution_voi_lut", "attribution_window", "build_parametric_map", "stored_attribution"]

#: ``output_kind`` of the derived UIDs of Parametric Map outputs.
OUTPUT_KIND = "pm"


def attribution_window(values: np.ndarray, percentile: float = 99.0) -> tuple[float, float]:
    """(Window Center, Window Width) that shows an attribution map sensibly.

    Signed map (any value < 0): symmetric around 0, from -p to +p where p is the ``percentile``
    of |value|, so positive and negative evidence get the same contrast and 0 is mid-grey. Map
    without negative values: 0 to p. p falls back to max |value| (a sparse map), then to 1 (an
    all-zero map), so the width is always > 0.
    """
    finite = np.asarray(values, dtype=np.float64)
    magnitude = np.abs(finite)
    top = float(np.percentile(magnitude, percentile)) if magnitude.size else 0.0
    if not top > 0:
        top = float(magnitude.max()) if magnitude.size else 0.0
    if not top > 0:
        top = 1.0
    if magnitude.size and float(finite.min()) < 0:
        return 0.0, 2.0 * top
    return top / 2.0, top


def attribution_voi_lut(values: np.ndarray) -> hd.VOILUTTransformation:
    """The map's display window (:func:`attribution_window`) as a VOI LUT Transformation."""
    center, width = attribution_window(values)
    # One-item lists: highdicom 0.28.2 stores a plain string explanation as list(text), one value
    # per character ("9\\9\\T\\H...").
    return hd.VOILUTTransformation(
        window_center=[center],
        window_width=[width],
        window_explanation=["SIGNED 99TH PERCENTILE" if center == 0.0 else "99TH PERCENTILE"],
        # Exact linear mapping of the float values: raw attributions are often far below 1, where
        # plain LINEAR (with its 0.5 offsets for integers) is not permitted.
        voi_lut_function=hd.VOILUTFunctionValues.LINEAR_EXACT,
    )


def stored_attribution(attribution: np.ndarray) -> tuple[np.ndarray, float]:
    """The map as stored, float32 in [-1, 1]: ``attribution`` over its largest magnitude; and that
    magnitude (1 for a map of zeros), the Real World Value slope that gives the attribution back."""
    scale = float(np.abs(attribution).max()) if attribution.size else 0.0
    if not np.isfinite(scale) or scale == 0.0:
        scale = 1.0
    return np.ascontiguousarray(attribution / scale, dtype=np.float32), scale


def _value_mapping(stored: np.ndarray, scale: float, result: ExplanationResult) -> hd.pm.RealWorldValueMapping:
    """The mapping of the stored floats (over their range) to attribution values: ``scale`` times
    the stored value, with quantity and units."""
    return hd.pm.RealWorldValueMapping(
        lut_label=result.method[:SH_MAX],
        lut_explanation=f"{result.method} attribution for class {result.class_name}"[:LO_MAX],
        unit=ATTRIBUTION_UNIT,
        value_range=(float(stored.min()), float(stored.max())),
        slope=scale,
        intercept=0.0,
        quantity_definition=quantity_code(result.method),
    )


def build_parametric_map(
    source: pydicom.Dataset,
    result: ExplanationResult,
    *,
    series_number: int = 9002,
    manufacturer: str = "pacs-xai",
    software_version: str = pacs_xai_version(),
    device_uid: str | None = None,
    device_serial_number: str | None = None,
) -> pydicom.Dataset:
    """The Parametric Map of ``result.attribution`` for ``source`` (same study, new derived series).

    ``device_uid`` is the model's Device UID in the Contributing Equipment item (default: derived
    from model name and version); ``device_serial_number`` identifies this pacs-xai installation
    (Enhanced General Equipment, Type 1; default: the software version). Raises ValueError when
    the source lacks the UIDs or grid the output needs, or the map does not match it.
    """
    check_inputs(source, result)
    frame_index = result.frame_index
    values, scale = stored_attribution(result.attribution)
    series_uid, instance_uid = derived_output_uids(source, result, OUTPUT_KIND, finding=result.uid_finding)
    device = device_uid or derived_device_uid(result.model_name, result.model_version)
    equipment = algorithm_equipment(
        result.model_name,
        result.model_version,
        manufacturer=manufacturer,
        software_version=software_version,
        device_uid=device,
        contribution=f"XAI {result.method} attribution values of class {result.class_name}",
    )
    geometry = source_frame_geometry(source, frame_index) or synthetic_frame_geometry(source, frame_index)

    pm = hd.pm.ParametricMap(
        source_images=[highdicom_source_view(source, geometry)],
        pixel_array=values,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=instance_uid,
        instance_number=instance_number(source, frame_index),
        **enhanced_device_arguments(manufacturer, software_version, device_serial_number),
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[_value_mapping(values, scale, result)],
        voi_lut_transformations=[attribution_voi_lut(values)],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        content_label="XAI_ATTRIBUTION",
        content_description=f"{result.method} attribution, class {result.class_name}"[:LO_MAX],
        contributing_equipment=[equipment],
    )
    copy_patient_study_attributes(source, pm)
    retarget_source_references(pm, source, frame_index)
    drop_assumed_slice_spacing(pm)
    set_patient_orientation(pm, source, frame_index)
    set_laterality(pm, source, frame_index)
    pm.SeriesDescription = series_description(result, tag="map")
    pm.DerivationDescription = derivation_description(
        result, output="Parametric map (raw values)", software_version=software_version
    )
    if geometry.synthetic:
        pm.ImageComments = synthetic_geometry_note(geometry, "this map's Frame of Reference, position and orientation")
    return pm
