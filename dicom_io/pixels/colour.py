"""Colour frames (RGB, YBR_*, PALETTE COLOR) as RGB in [0, 1], and their BT.601 luminance.

DICOM defines no Modality LUT or VOI for colour data, so decoded values are scaled to [0, 1] by
their bit depth; PALETTE COLOR indices go through the Palette Color Lookup Tables first.
Luminance is ITU-R BT.601: 0.299 R + 0.587 G + 0.114 B.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, convert_color_space

from dicom_io.errors import DicomInputError, UnsupportedImageError
from dicom_io.pixels.decode import PALETTE

__all__ = ["bt601_luminance", "colour_to_unit_rgb"]

_BT601 = np.array([0.299, 0.587, 0.114], dtype=np.float64)


def bt601_luminance(rgb: np.ndarray) -> np.ndarray:
    """float32 [rows, cols] luminance of an RGB [rows, cols, 3] frame (ITU-R BT.601 weights)."""
    return (rgb.astype(np.float64) @ _BT601).astype(np.float32)


def colour_to_unit_rgb(
    ds: Dataset,
    array: np.ndarray,
    meta: dict[str, Any],
    photometric: str,
    shape: tuple[int, int],
    index: int,
    where: str,
) -> np.ndarray:
    """A decoded colour frame (RGB, YBR or palette indices) as float32 RGB [rows, cols, 3] in [0, 1]."""
    if photometric == PALETTE:
        if array.shape != shape:
            raise DicomInputError(
                f"{where}: frame {index} decoded to shape {array.shape}, expected {shape} "
                "(PALETTE COLOR stores one index per pixel)"
            )
        try:
            rgb = apply_color_lut(array, ds)
        except Exception as exc:
            raise DicomInputError(
                f"{where}: the PALETTE COLOR lookup tables cannot be applied "
                f"({type(exc).__name__}: {exc}); the Palette Color LUT module is damaged"
            ) from exc
        depth = 8 if rgb.dtype == np.uint8 else 16
    else:
        if array.shape != (*shape, 3):
            raise DicomInputError(
                f"{where}: frame {index} decoded to shape {array.shape}, expected {(*shape, 3)} "
                f"for Photometric Interpretation {photometric}"
            )
        decoded = str(meta.get("photometric_interpretation", photometric)).upper()
        rgb = array
        if decoded in ("YBR_FULL", "YBR_FULL_422") and array.dtype == np.uint8:
            rgb = convert_color_space(array, decoded, "RGB")
        elif decoded != "RGB":
            raise UnsupportedImageError(
                f"{where}: colour data with Photometric Interpretation '{photometric}' decoded "
                f"as '{decoded}', which cannot be converted to RGB; have the sender convert the "
                "image to RGB"
            )
        depth = int(meta.get("bits_stored") or ds.get("BitsStored") or 8)
    if not np.issubdtype(rgb.dtype, np.integer):
        return np.clip(rgb, 0.0, 1.0).astype(np.float32)
    return (rgb.astype(np.float32) / float(2**depth - 1)).clip(0.0, 1.0)
