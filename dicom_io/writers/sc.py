"""Secondary Capture Image (1.2.840.10008.5.1.4.1.1.7) with the attribution overlay burned in.

The one output every workstation can show: an RGB picture of the source frame with the heatmap,
a colour bar and the text (method, class, probability, model, a warning line per trust signal
that flags the result, "NOT FOR DIAGNOSTIC USE"). Built
with :class:`highdicom.sc.SCImage` from the source dataset (patient and study copied), then
completed with what a derived image must say about its origin:

- Series: a new one per (source series, model version, method) with a deterministic UID;
  Series Description "XAI <method> <class>"; Body Part Examined and Laterality from the source
  (Laterality absent for an unpaired body part, empty when unknown).
- Image: ImageType DERIVED\\SECONDARY, BurnedInAnnotation YES, Patient Orientation from the
  source (empty when unknown), Source Image Sequence -> source instance (+ frame) with purpose
  (121322, DCM), Derivation Description. No Derivation Code Sequence: CID 7203 has no code for
  an attribution overlay (see :mod:`dicom_io.codes`).
- SC Equipment: Conversion Type WSD (workstation).
- SOP Common: Contributing Equipment for the source's acquisition device, highdicom, and the
  model (IHE AI Results: Manufacturer, Model Name, Software Versions, Device UID).

Nothing else of the source is copied: no private tags, no pixel, geometry or equipment attributes.
"""

from __future__ import annotations

import highdicom as hd
import pydicom
from pydicom.uid import ExplicitVRLittleEndian

from dicom_io.uids import derived_device_uid, derived_output_uids
from dicom_io.writers.descriptions import derivation_description, series_description
from dicom_io.writers.equipment import algorithm_equipment, device_arguments, pacs_xai_version, set_capture_equipment
from dicom_io.writers.orientation import PLACEHOLDER_ORIENTATION, set_laterality, set_patient_orientation
from dicom_io.writers.overlay import overlay_title_lines, overlay_warning_lines, render_overlay
from dicom_io.writers.references import copy_patient_study_attributes, instance_number, source_image_item
from dicom_io.writers.result import ExplanationResult, check_inputs
from dicom_io.writers.source_view import without_person_names

__all__ = ["OUTPUT_KIND", "build_secondary_capture"]

#: ``output_kind`` of the derived UIDs of Secondary Capture outputs.
OUTPUT_KIND = "sc"


def _set_derivation(sc: pydicom.Dataset, source: pydicom.Dataset, result: ExplanationResult, version: str) -> None:
    """Image Type, burned-in annotation, source reference and derivation description."""
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.SourceImageSequence = [source_image_item(source, result.frame_index)]
    sc.DerivationDescription = derivation_description(result, output="Colour overlay", software_version=version)


def build_secondary_capture(
    source: pydicom.Dataset,
    result: ExplanationResult,
    *,
    series_number: int = 9001,
    manufacturer: str = "pacs-xai",
    software_version: str = pacs_xai_version(),
    device_uid: str | None = None,
    colour_scale_top: float | None = None,
) -> pydicom.Dataset:
    """The Secondary Capture of ``result`` for ``source`` (same study, new derived series).

    ``colour_scale_top`` (raw map units) fixes the top of the colour scale, e.g. one scale for
    every slice of a volume; by default it comes from this frame's map (see :func:`render_overlay`).

    ``device_uid`` is the model's Device UID in the Contributing Equipment item; by default it is
    derived from the model name and version (:func:`dicom_io.uids.derived_device_uid`). Raises
    ValueError when the source lacks the UIDs or grid the output needs, or the maps do not match it.
    """
    check_inputs(source, result)
    series_uid, instance_uid = derived_output_uids(source, result, OUTPUT_KIND, finding=result.uid_finding)
    device = device_uid or derived_device_uid(result.model_name, result.model_version)
    equipment = algorithm_equipment(
        result.model_name,
        result.model_version,
        manufacturer=manufacturer,
        software_version=software_version,
        device_uid=device,
        contribution=f"XAI {result.method} attribution of class {result.class_name}",
    )
    rgb = render_overlay(
        result.display,
        result.attribution,
        title_lines=overlay_title_lines(result),
        warning_lines=overlay_warning_lines(result),
        vmax=colour_scale_top,
    )

    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=without_person_names(source),
        pixel_array=rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=instance_uid,
        instance_number=instance_number(source, result.frame_index),
        **device_arguments(manufacturer, software_version),
        patient_orientation=PLACEHOLDER_ORIENTATION,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[equipment],
        series_description=series_description(result),
    )
    copy_patient_study_attributes(source, sc)
    set_patient_orientation(sc, source, result.frame_index)
    set_laterality(sc, source, result.frame_index)
    _set_derivation(sc, source, result, software_version)
    set_capture_equipment(sc, manufacturer=manufacturer, software_version=software_version)
    return sc
