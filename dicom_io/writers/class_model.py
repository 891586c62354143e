"""A class model visualisation (a synthetic input, no source image) as a standalone Secondary Capture.

The other writers derive from a source image and join its patient and study. A class model
has no source, so this object stands alone:

- Patient: the synthetic "PACS-XAI^CLASS-MODEL" (ID "PACS-XAI-CLASS-MODEL"), birth date and sex
  empty (Type 2); no real person is involved.
- Study: one per model name and version ("pacs-xai class models"), so the classes of one model
  sit side by side; Series: one per (model, class, settings), Series Description
  "pacs-xai class model: <class>". All UIDs are deterministic (:mod:`dicom_io.uids`), keyed by
  what makes the image (model, version, class, generation settings): regenerating with the same
  settings gives the same image and the same UIDs.
- Image: 8-bit MONOCHROME2, Modality OT, ImageType DERIVED\\SECONDARY, Conversion Type WSD,
  nothing burned in, Derivation Description naming the method, class, model and settings.
- SOP Common: Contributing Equipment for highdicom and the model (IHE AI Results: Manufacturer,
  Model Name, Software Versions, Device UID), as the other writers.

Also here: :func:`grayscale_tiles`, the contrast-stretched 8-bit picture of a ``[C, H, W]``
image (channels side by side), and :func:`save_grayscale_png`.
"""

from __future__ import annotations

import datetime
import json
import os

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian

from dicom_io.uids import derived_device_uid, generated_uid
from dicom_io.vr import LO_MAX, ST_MAX
from dicom_io.writers.descriptions import DISCLAIMER
from dicom_io.writers.equipment import algorithm_equipment, device_arguments, pacs_xai_version, set_capture_equipment
from dicom_io.writers.orientation import PLACEHOLDER_ORIENTATION

__all__ = [
    "CLASS_MODEL_METHOD",
    "PATIENT_ID",
    "PATIENT_NAME",
    "build_class_model_capture",
    "grayscale_tiles",
    "save_grayscale_png",
]

#: ``method`` of the derived UIDs and the Contributing Equipment text.
CLASS_MODEL_METHOD = "class-model"
PATIENT_NAME = "PACS-XAI^CLASS-MODEL"
PATIENT_ID = "PACS-XAI-CLASS-MODEL"
#: Percentiles mapped to black and white by :func:`grayscale_tiles` (robust to a few extreme pixels).
STRETCH_PERCENTILES = (0.5, 99.5)


def grayscale_tiles(image: np.ndarray) -> np.ndarray:
    """uint8 ``[H, C * W]``: the channels of a real ``[C, H, W]`` image side by side, contrast-stretched.

    One stretch for all channels (their :data:`STRETCH_PERCENTILES` to 0 and 255), so channels
    stay comparable; a constant image gives mid-grey.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or 0 in image.shape:
        found = image.shape if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image must be a non-empty [C, H, W] array, got {found}")
    values = image.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"image has {int(np.count_nonzero(~np.isfinite(values)))} non-finite values")
    low, high = np.percentile(values, STRETCH_PERCENTILES)
    if high <= low:
        scaled = np.full(values.shape, 0.5)
    else:
        scaled = np.clip((values - low) / (high - low), 0.0, 1.0)
    pixels = np.rint(scaled * 255).astype(np.uint8)
    return np.concatenate(list(pixels), axis=1)


def save_grayscale_png(pixels: np.ndarray, path: str | os.PathLike[str]) -> None:
    """Write a uint8 ``[rows, cols]`` array as an 8-bit grayscale PNG."""
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2:
        found = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise ValueError(f"save_grayscale_png needs a uint8 [rows, cols] array, got {found}")
    Image.fromarray(pixels, "L").save(os.fspath(path), format="PNG")


def _check_text(name: str, value: object, limit: int = LO_MAX) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    if len(value) > limit:
        raise ValueError(f"{name} {value!r} is longer than {limit} characters")
    return value


def _uids(class_name: str, model_name: str, model_version: str, generation: str) -> tuple[str, str, str]:
    """(Study, Series, SOP Instance) UIDs: study per model version, series and instance per image."""
    model = {"model_name": model_name, "model_version": model_version}
    image_key = json.dumps([CLASS_MODEL_METHOD, class_name, generation])
    return (
        generated_uid("study", key=CLASS_MODEL_METHOD, **model),
        generated_uid("series", key=image_key, **model),
        generated_uid("instance", key=image_key, **model),
    )


def build_class_model_capture(
    pixels: np.ndarray,
    *,
    class_name: str,
    model_name: str,
    model_version: str,
    generation: str,
    series_number: int = 9101,
    manufacturer: str = "pacs-xai",
    software_version: str = pacs_xai_version(),
) -> pydicom.Dataset:
    """A standalone Secondary Capture of the uint8 ``[rows, cols]`` class model picture ``pixels``.

    ``generation`` describes how the image was made (method settings, seed); it goes into the
    Derivation Description and keys the derived UIDs. Raises ValueError on bad input.
    """
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2 or 0 in pixels.shape:
        found = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise ValueError(f"pixels must be a non-empty uint8 [rows, cols] array, got {found}")
    _check_text("class_name", class_name)
    _check_text("model_name", model_name)
    _check_text("model_version", model_version)
    _check_text("generation", generation, ST_MAX)
    study_uid, series_uid, instance_uid = _uids(class_name, model_name, model_version, generation)
    equipment = algorithm_equipment(
        model_name,
        model_version,
        manufacturer=manufacturer,
        software_version=software_version,
        device_uid=derived_device_uid(model_name, model_version),
        contribution=f"XAI class model visualisation of class {class_name}",
    )
    now = datetime.datetime.now()
    sc = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.MONOCHROME2,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=instance_uid,
        instance_number=1,
        **device_arguments(manufacturer, software_version),
        patient_id=PATIENT_ID,
        patient_name=PATIENT_NAME,
        study_date=now.date(),
        study_time=now.time(),
        patient_orientation=PLACEHOLDER_ORIENTATION,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[equipment],
        series_description=f"pacs-xai class model: {class_name}"[:LO_MAX],
    )
    sc.PatientOrientation = None  # a synthetic image has no orientation (Type 2C, empty)
    sc.Laterality = None  # Type 2C: required (empty, unknown) when no unpaired Body Part Examined says otherwise
    sc.StudyID = "CLASS-MODELS"
    sc.StudyDescription = "pacs-xai class models"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "NO"
    sc.DerivationDescription = (
        f"Class model visualisation (Simonyan et al. 2014) of class '{class_name}', model {model_name} "
        f"version {model_version}: a synthetic input optimised to maximise the class score; {generation}; "
        f"pacs-xai {software_version}. No patient image involved. {DISCLAIMER}."
    )[:ST_MAX]
    set_capture_equipment(sc, manufacturer=manufacturer, software_version=software_version)
    return sc
