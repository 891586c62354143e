"""Shared cases for the dicom_io.pixels tests: the default model input, and the DICOM formulas written out."""

from __future__ import annotations

import numpy as np

from dicom_io.pixels import GridMapping, InputSpec, PreparedFrame

SPEC = InputSpec(rows=224, columns=224)
BT601 = np.array([0.299, 0.587, 0.114])


def linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1, written out, output range [0, 1]."""
    out = np.empty_like(x, dtype=np.float64)
    low = x <= center - 0.5 - (width - 1) / 2
    high = x > center - 0.5 + (width - 1) / 2
    mid = ~low & ~high
    out[low] = 0.0
    out[high] = 1.0
    out[mid] = (x[mid] - (center - 0.5)) / (width - 1) + 0.5
    return out


def percentile_stretch(x: np.ndarray, lo: float = 0.5, hi: float = 99.5) -> np.ndarray:
    a, b = np.percentile(x, [lo, hi])
    return np.clip((x - a) / (b - a), 0.0, 1.0)


def content_mask(mapping: GridMapping) -> np.ndarray:
    """Model-grid pixels whose centres lie inside the content box."""
    top, left, height, width = mapping.content_box
    rows = np.arange(mapping.model_shape[0]) + 0.5
    cols = np.arange(mapping.model_shape[1]) + 0.5
    in_rows = (rows >= top) & (rows <= top + height)
    in_cols = (cols >= left) & (cols <= left + width)
    return in_rows[:, None] & in_cols[None, :]


def check_frame(frame: PreparedFrame, spec: InputSpec, shape: tuple[int, int]) -> None:
    assert frame.model_input.dtype == np.float32
    assert frame.model_input.shape == (spec.channels, spec.rows, spec.columns)
    assert frame.display.dtype == np.float32
    assert frame.display.shape == shape
    for array in (frame.model_input, frame.display):
        assert np.isfinite(array).all()
        assert array.min() >= 0.0 and array.max() <= 1.0
    assert frame.mapping.source_shape == shape
    assert frame.mapping.model_shape == (spec.rows, spec.columns)
