"""Grayscale stored values to [0, 1] as displayed: Modality LUT, then VOI, then MONOCHROME1 inversion.

PS3.3 C.11 "Look Up Tables and Presentation States", PS3.4 N.2.1.1, per frame:

1. **Modality LUT**: Rescale Slope/Intercept or the Modality LUT Sequence, giving modality
   values (for CT: Hounsfield units). In enhanced multi-frame objects the Pixel Value
   Transformation Sequence of the shared or per-frame functional groups is used.
2. **VOI**, first one present wins:
   a. VOI LUT Sequence (0028,3010), first LUT; its output is scaled to [0, 1] by the range of
      the LUT's own entries;
   b. the first Window Center/Width pair (0028,1050/1051) with VOI LUT Function LINEAR,
      LINEAR_EXACT or SIGMOID (PS3.3 C.11.2.1.2/C.11.2.1.3), scaled to [0, 1];
      enhanced objects: the Frame VOI LUT Sequence of the functional groups;
   c. otherwise a percentile stretch of the modality values (``InputSpec.percentiles``,
      default 0.5 % to 99.5 %). A flat frame gives zeros.
   With ``InputSpec.windowing == "percentile"`` step c is always used.
3. **MONOCHROME1** is inverted after the VOI so that 1 always means bright as displayed.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

from dicom_io.errors import DicomInputError, UnsupportedImageError
from dicom_io.pixels.decode import GRAYSCALE, describe_dataset
from dicom_io.pixels.spec import InputSpec

__all__ = ["modality_values", "window_to_unit"]

logger = logging.getLogger(__name__)

_VOI_FUNCTIONS = frozenset({"LINEAR", "LINEAR_EXACT", "SIGMOID"})

# Elements of the Image Pixel, Modality LUT and VOI LUT modules that the per-frame view carries.
_VIEW_KEYWORDS = (
    "PhotometricInterpretation",
    "SamplesPerPixel",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "VOILUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
)
_MODALITY_KEYWORDS = ("RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence")
_VOI_KEYWORDS = ("VOILUTSequence", "WindowCenter", "WindowWidth", "VOILUTFunction")


def window_to_unit(ds: pydicom.Dataset, frame: np.ndarray, spec: InputSpec, *, frame_index: int = 0) -> np.ndarray:
    """One grayscale frame of stored values -> modality LUT -> VOI -> float32 [0, 1].

    ``frame`` holds the stored pixel values of one frame as decoded (before any LUT).
    MONOCHROME1 is inverted so 1 = bright as displayed. ``frame_index`` selects the per-frame
    functional group of an enhanced multi-frame object (Pixel Value Transformation, Frame VOI
    LUT); it does not matter for classic images.
    """
    where = describe_dataset(ds)
    view = _frame_view(ds, frame_index)
    photometric = str(view.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in GRAYSCALE:
        raise UnsupportedImageError(
            f"{where}: window_to_unit handles MONOCHROME1/MONOCHROME2 only, the Photometric "
            f"Interpretation is '{photometric}'; colour images go through prepare_frames"
        )
    values = _modality_values(view, frame, where)

    unit: np.ndarray | None = None
    if spec.windowing == "dicom":
        unit = _voi_lut_to_unit(values, view, where)
        if unit is None:
            unit = _window_to_unit(values, view, where)
    if unit is None:
        unit = _percentile_to_unit(values, spec.percentiles)
        if unit is None:  # a flat frame has no contrast to stretch: zeros, whatever the polarity
            return np.zeros(values.shape, dtype=np.float32)

    unit = np.nan_to_num(np.clip(unit, 0.0, 1.0), nan=0.0)
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit
    return unit.astype(np.float32)


def modality_values(ds: pydicom.Dataset, frame: np.ndarray, *, frame_index: int = 0) -> np.ndarray:
    """One grayscale frame of stored values -> modality values (float64; for CT: Hounsfield units).

    Rescale Slope/Intercept or the Modality LUT Sequence, from the functional groups of frame
    ``frame_index`` in an enhanced multi-frame object; no VOI (volumes are windowed in the
    model's own units).
    """
    return _modality_values(_frame_view(ds, frame_index), frame, describe_dataset(ds))


def _modality_values(view: Dataset, frame: np.ndarray, where: str) -> np.ndarray:
    try:
        values = apply_modality_lut(np.asarray(frame), view)
    except Exception as exc:
        raise DicomInputError(
            f"{where}: the Modality LUT / Rescale Slope and Intercept cannot be applied "
            f"({type(exc).__name__}: {exc}); correct the Modality LUT module of the file"
        ) from exc
    return np.asarray(values, dtype=np.float64)


def _voi_lut_to_unit(values: np.ndarray, view: Dataset, where: str) -> np.ndarray | None:
    """Apply the first VOI LUT Sequence item, scaled by the range of its entries; None if absent."""
    sequence = view.get("VOILUTSequence")
    if not sequence:
        return None
    item = sequence[0]
    descriptor = item.get("LUTDescriptor")
    if descriptor is None or item.get("LUTData") is None:
        logger.warning("%s: VOI LUT Sequence without LUT Descriptor/Data; trying the window", where)
        return None
    try:
        entries = int(descriptor[0]) or 2**16
        first = int(descriptor[1])
        table = np.asarray(apply_voi(np.arange(first, first + entries, dtype=np.int64), view), dtype=np.float64)
        indices = np.clip(np.rint(values), first, first + entries - 1).astype(np.int64)
        mapped = table[indices - first]
    except Exception as exc:
        logger.warning("%s: VOI LUT Sequence unusable (%s); trying the window", where, exc)
        return None
    low, high = float(table.min()), float(table.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.float64)
    return (mapped - low) / (high - low)


def _first_value(value: Any) -> float | None:
    """The first value of a possibly multi-valued number as a finite float, None if there is none."""
    if value is None:
        return None
    if isinstance(value, (MultiValue, list, tuple)):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _window_to_unit(values: np.ndarray, view: Dataset, where: str) -> np.ndarray | None:
    """First Window Center/Width with the VOI LUT Function, scaled to [0, 1]; None if absent."""
    center = _first_value(view.get("WindowCenter"))
    width = _first_value(view.get("WindowWidth"))
    if center is None or width is None:
        return None
    function = str(view.get("VOILUTFunction", "") or "LINEAR").strip().upper()
    if function not in _VOI_FUNCTIONS:
        logger.warning("%s: unknown VOI LUT Function %r, using LINEAR", where, function)
        function = "LINEAR"
    # A bare VOI LUT module: unsigned 16-bit output range, no rescale, so pydicom's output spans
    # [0, 65535] exactly and dividing gives the DICOM window on [0, 1].
    window = Dataset()
    window.PhotometricInterpretation = "MONOCHROME2"
    window.BitsStored = 16
    window.PixelRepresentation = 0
    window.WindowCenter = center
    window.WindowWidth = width
    window.VOILUTFunction = function
    try:
        windowed = apply_windowing(values, window)
    except ValueError as exc:
        logger.warning(
            "%s: Window Center %s / Width %s unusable (%s); using the percentile stretch",
            where,
            center,
            width,
            exc,
        )
        return None
    return np.asarray(windowed, dtype=np.float64) / 65535.0


def _percentile_to_unit(values: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray | None:
    """Stretch between two percentiles of the finite values; None for a flat frame.

    When both percentiles coincide but the frame is not flat, the full min..max range is used.
    """
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    low, high = np.percentile(finite, percentiles)
    if not high > low:
        low, high = float(finite.min()), float(finite.max())
        if not high > low:
            return None
    return (values - low) / (high - low)


def _frame_view(ds: Dataset, frame_index: int) -> Dataset:
    """The Image Pixel / Modality LUT / VOI LUT elements that apply to one frame.

    Top-level elements, overridden by the Shared and then the Per-frame Functional Groups
    (Pixel Value Transformation Sequence, Frame VOI LUT Sequence) of enhanced objects.
    """
    view = Dataset()
    if hasattr(ds, "file_meta"):
        view.file_meta = ds.file_meta  # LUT Data in OW needs the byte order
    view.set_original_encoding(*ds.original_encoding)
    for keyword in _VIEW_KEYWORDS:
        if keyword in ds:
            view[keyword] = ds[keyword]

    groups: list[Dataset] = []
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and 0 <= frame_index < len(per_frame):
        groups.append(per_frame[frame_index])
    for group in groups:
        _override(view, group, "PixelValueTransformationSequence", _MODALITY_KEYWORDS)
        _override(view, group, "FrameVOILUTSequence", _VOI_KEYWORDS)
    return view


def _override(view: Dataset, group: Dataset, sequence_keyword: str, keywords: tuple[str, ...]) -> None:
    """Replace the module ``keywords`` of ``view`` by those of the first item of ``group``'s ``sequence_keyword``."""
    sequence = group.get(sequence_keyword)
    if not sequence:
        return
    item = sequence[0]
    if not any(keyword in item for keyword in keywords):
        return
    for keyword in keywords:  # a functional group replaces the whole module, not single values
        if keyword in view:
            del view[keyword]
    for keyword in keywords:
        if keyword in item:
            view[keyword] = item[keyword]
