"""From a DICOM image to model input, and from a model-grid map back to the source pixel grid.

The chain, per frame (PS3.3 C.11 "Look Up Tables and Presentation States", PS3.4 N.2.1.1):

1. **Decode** the stored values (pydicom 3 decoders, one frame at a time). Colour data comes
   back as RGB: pydicom converts YBR_FULL / YBR_FULL_422, the JPEG 2000 plugins undo
   YBR_RCT / YBR_ICT.
2. **Modality LUT** (grayscale only): Rescale Slope/Intercept or the Modality LUT Sequence,
   giving modality values (for CT: Hounsfield units). In enhanced multi-frame objects the
   Pixel Value Transformation Sequence of the shared or per-frame functional groups is used.
3. **VOI** (grayscale only), first one present wins:
   a. VOI LUT Sequence (0028,3010), first LUT; its output is scaled to [0, 1] by the range of
      the LUT's own entries;
   b. the first Window Center/Width pair (0028,1050/1051) with VOI LUT Function LINEAR,
      LINEAR_EXACT or SIGMOID (PS3.3 C.11.2.1.2/C.11.2.1.3), scaled to [0, 1];
      enhanced objects: the Frame VOI LUT Sequence of the functional groups;
   c. otherwise a percentile stretch of the modality values (``InputSpec.percentiles``,
      default 0.5 % to 99.5 %). A flat frame gives zeros.
   With ``InputSpec.windowing == "percentile"`` step c is always used.
4. **MONOCHROME1** is inverted after the VOI so that 1 always means bright as displayed.
5. **Colour** (RGB, YBR_*, PALETTE COLOR through its palette): no modality LUT or VOI applies
   (DICOM defines none for colour); values are scaled to [0, 1] by their bit depth. With one
   model channel they become ITU-R BT.601 luminance (0.299 R + 0.587 G + 0.114 B); with three
   channels RGB is kept. Grayscale sources are replicated when the model wants three channels.
6. **Geometry** (:class:`GridMapping`): the [0, 1] frame is resampled (Pillow, bilinear, with
   antialiasing when shrinking) onto the model grid [H, W].

Aspect policy:

- ``letterbox`` (default): the aspect ratio is kept. scale = min(H / rows, W / cols); the image
  occupies a box of rows*scale x cols*scale model pixels, centred (fractional offsets allowed,
  nothing is rounded), and the rest is padded with 0 (black). Radiographs are not distorted.
- ``stretch``: the frame fills the whole grid, each axis scaled on its own.

The mapping is exact in both directions: a model-grid coordinate ``y`` corresponds to the
source coordinate ``(y - top) / (height / rows)`` (continuous pixel coordinates, pixel centres
at +0.5), and :meth:`GridMapping.to_source_grid` uses precisely that relation, so an
attribution map drawn back on the source frame lines up with the anatomy.

Normalisation with the model card's mean/std is *not* done here: ``model_input`` is in [0, 1].
This module never imports torch.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    apply_windowing,
    convert_color_space,
    get_decoder,
)
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID

from dicom_io.errors import DicomInputError, UnsupportedImageError

__all__ = [
    "GridMapping",
    "InputSpec",
    "PreparedFrame",
    "prepare_frames",
    "read_dataset",
    "window_to_unit",
]

logger = logging.getLogger(__name__)

_GRAYSCALE = frozenset({"MONOCHROME1", "MONOCHROME2"})
_PALETTE = "PALETTE COLOR"
# Three-sample interpretations whose decoders hand back RGB (or YBR_FULL[_422] that we convert).
_COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420", "YBR_PARTIAL_422"})
_SUPPORTED_TEXT = "MONOCHROME1, MONOCHROME2, PALETTE COLOR, RGB, YBR_FULL, YBR_FULL_422, YBR_RCT, YBR_ICT"
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_BT601 = np.array([0.299, 0.587, 0.114], dtype=np.float64)
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


# --------------------------------------------------------------------------------------------
# What the model expects
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """What the model expects, from the model card.

    rows, columns: model grid size H x W in pixels.
    channels: 1 (grayscale; colour sources become BT.601 luminance) or 3 (RGB kept, grayscale
        replicated).
    aspect: ``letterbox`` keeps the aspect ratio, scales the longer side to fit, centres and pads
        with 0; ``stretch`` fills the grid.
    windowing: ``dicom`` uses the VOI LUT Sequence, else the first Window Center/Width, else the
        percentile fallback; ``percentile`` always stretches between the two percentiles.
    percentiles: (low, high) in percent, 0 <= low < high <= 100, of the modality values.
    """

    rows: int
    columns: int
    channels: int = 1
    aspect: Literal["letterbox", "stretch"] = "letterbox"
    windowing: Literal["dicom", "percentile"] = "dicom"
    percentiles: tuple[float, float] = (0.5, 99.5)

    def __post_init__(self) -> None:
        for name in ("rows", "columns"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(
                    f"InputSpec.{name} must be a positive integer (model input size in pixels), "
                    f"got {value!r}; fix the input size in the model card"
                )
            object.__setattr__(self, name, int(value))
        if isinstance(self.channels, bool) or self.channels not in (1, 3):
            raise ValueError(
                f"InputSpec.channels must be 1 or 3, got {self.channels!r}; fix the input channels in the model card"
            )
        object.__setattr__(self, "channels", int(self.channels))
        if self.aspect not in ("letterbox", "stretch"):
            raise ValueError(f"InputSpec.aspect must be 'letterbox' or 'stretch', got {self.aspect!r}")
        if self.windowing not in ("dicom", "percentile"):
            raise ValueError(f"InputSpec.windowing must be 'dicom' or 'percentile', got {self.windowing!r}")
        try:
            low, high = (float(v) for v in self.percentiles)
        except (TypeError, ValueError):
            raise ValueError(
                f"InputSpec.percentiles must be two numbers (low, high), got {self.percentiles!r}"
            ) from None
        if not (0.0 <= low < high <= 100.0):
            raise ValueError(f"InputSpec.percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles!r}")
        object.__setattr__(self, "percentiles", (low, high))


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridMapping:
    """Exact geometry between a source frame [rows, cols] and the model grid [H, W].

    content_box is (top, left, height, width) of the source image inside the model grid, in
    model-grid pixels (continuous coordinates: pixel i covers [i, i + 1)). A source coordinate
    ``v`` (rows) maps to the model coordinate ``top + v * height / rows``; columns likewise.
    """

    source_shape: tuple[int, int]
    model_shape: tuple[int, int]
    content_box: tuple[float, float, float, float]

    @classmethod
    def for_shapes(
        cls,
        source_shape: tuple[int, int],
        model_shape: tuple[int, int],
        aspect: Literal["letterbox", "stretch"] = "letterbox",
    ) -> GridMapping:
        """The mapping for ``aspect`` ('letterbox': keep aspect, centre, pad; 'stretch': fill)."""
        rows, cols = (int(v) for v in source_shape)
        height, width = (int(v) for v in model_shape)
        if min(rows, cols, height, width) <= 0:
            raise ValueError(f"grid sizes must be positive, got source {source_shape} and model {model_shape}")
        if aspect == "stretch":
            box = (0.0, 0.0, float(height), float(width))
        elif aspect == "letterbox":
            if height / rows <= width / cols:  # rows limit: content spans the full height
                content_h, content_w = float(height), min(float(width), cols * height / rows)
            else:
                content_h, content_w = min(float(height), rows * width / cols), float(width)
            box = (
                max(0.0, (height - content_h) / 2.0),
                max(0.0, (width - content_w) / 2.0),
                content_h,
                content_w,
            )
        else:
            raise ValueError(f"aspect must be 'letterbox' or 'stretch', got {aspect!r}")
        return cls((rows, cols), (height, width), box)

    def to_model_grid(self, image: np.ndarray) -> np.ndarray:
        """Resample a float [rows, cols] frame onto the model grid: float32 [H, W], pad value 0."""
        src = _as_float_image(image, self.source_shape, "source")
        rows, cols = self.source_shape
        height, width = self.model_shape
        top, left, content_h, content_w = self.content_box
        sy, sx = content_h / rows, content_w / cols
        out = np.zeros((height, width), dtype=np.float32)

        # Model pixels whose centres lie inside the content box.
        i0, i1 = _covered_pixels(top, content_h, height)
        j0, j1 = _covered_pixels(left, content_w, width)
        # Edge-replicate the source so that the box may reach a little beyond it (a model pixel
        # centred inside the content can have its edge outside) and the filter has support.
        pad = int(math.ceil(1.5 / min(sy, sx, 1.0))) + 2
        padded = np.pad(src, pad, mode="edge")
        box = (
            (j0 - left) / sx + pad,
            (i0 - top) / sy + pad,
            (j1 - left) / sx + pad,
            (i1 - top) / sy + pad,
        )
        box = _clamp_box(box, padded.shape)
        resized = Image.fromarray(padded).resize((j1 - j0, i1 - i0), Image.Resampling.BILINEAR, box=box)
        out[i0:i1, j0:j1] = np.asarray(resized, dtype=np.float32)
        return out

    def to_source_grid(self, image: np.ndarray) -> np.ndarray:
        """Resample a float [H, W] model-grid map back to the source grid: float32 [rows, cols].

        Crops the content box and resamples it (bilinear, antialiased when shrinking) onto the
        source pixels: the exact inverse of the geometry of :meth:`to_model_grid`. Values in the
        padding are discarded; at the content border the outermost content pixels are
        extended instead of blending with the padding.
        """
        grid = _as_float_image(image, self.model_shape, "model")
        rows, cols = self.source_shape
        height, width = self.model_shape
        top, left, content_h, content_w = self.content_box
        # Only content pixels take part: the covered block is edge-replicated outwards, so the
        # border of the source is not darkened by the zero padding around the content.
        i0, i1 = _covered_pixels(top, content_h, height)
        j0, j1 = _covered_pixels(left, content_w, width)
        pad = int(math.ceil(1.5 * max(content_h / rows, content_w / cols, 1.0))) + 2
        padded = np.pad(grid[i0:i1, j0:j1], pad, mode="edge")
        box = (
            left - j0 + pad,
            top - i0 + pad,
            left + content_w - j0 + pad,
            top + content_h - i0 + pad,
        )
        box = _clamp_box(box, padded.shape)
        resized = Image.fromarray(padded).resize((cols, rows), Image.Resampling.BILINEAR, box=box)
        return np.asarray(resized, dtype=np.float32).copy()


def _covered_pixels(offset: float, extent: float, size: int) -> tuple[int, int]:
    """Half-open range of grid pixels whose centres fall within [offset, offset + extent]."""
    eps = 1e-6
    first = max(0, math.ceil(offset - 0.5 - eps))
    stop = min(size, math.floor(offset + extent - 0.5 + eps) + 1)
    if stop <= first:  # content thinner than one pixel: keep the pixel at its centre
        first = min(size - 1, max(0, math.floor(offset + extent / 2.0)))
        stop = first + 1
    return first, stop


def _clamp_box(box: tuple[float, float, float, float], shape: tuple[int, ...]) -> tuple[float, float, float, float]:
    """Keep a Pillow (left, upper, right, lower) box inside an image of ``shape`` [rows, cols]."""
    rows, cols = shape[0], shape[1]
    left = min(max(box[0], 0.0), cols)
    upper = min(max(box[1], 0.0), rows)
    right = min(max(box[2], left), cols)
    lower = min(max(box[3], upper), rows)
    return (left, upper, right, lower)


def _as_float_image(image: np.ndarray, shape: tuple[int, int], what: str) -> np.ndarray:
    array = np.asarray(image)
    if array.shape != tuple(shape):
        raise ValueError(f"expected a {what}-grid image of shape {tuple(shape)}, got shape {array.shape}")
    return np.ascontiguousarray(array, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Prepared frames
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedFrame:
    """One source frame ready for the model.

    frame_index: 0-based frame number in the source (multi-frame images have several).
    model_input: float32 [C, H, W] in [0, 1], 1 = bright as displayed (MONOCHROME1 already
        inverted), before the model card's mean/std normalisation.
    display: float32 [rows, cols] in [0, 1], the windowed grayscale frame on the source grid
        (what an overlay is drawn on).
    mapping: geometry between the source grid and the model grid.
    """

    frame_index: int
    model_input: np.ndarray
    display: np.ndarray
    mapping: GridMapping


def read_dataset(path: str | os.PathLike) -> pydicom.Dataset:
    """Read a DICOM Part 10 file that must hold an image.

    Raises DicomInputError when the file is missing, not DICOM (no 'DICM' prefix after the
    128-byte preamble), unreadable, truncated, or has no Pixel Data. A file that only lacks the
    preamble but starts with its File Meta Information (group 0002) is accepted.
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise DicomInputError(f"{name}: no such file; check the path")
    try:
        try:
            ds = pydicom.dcmread(name)
        except InvalidDicomError:
            ds = _read_without_preamble(name)
    except DicomInputError:
        raise
    except Exception as exc:  # pydicom raises many kinds on damaged files
        raise DicomInputError(
            f"{name}: the file is truncated or unreadable as DICOM ({type(exc).__name__}: {exc}); "
            "resend the original file"
        ) from exc

    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        raise DicomInputError(
            f"{name}: no Pixel Data (7FE0,0010) in this {_sop_class_name(ds)} object "
            f"(file size {os.path.getsize(name)} bytes): it is not an image, or the file is "
            "truncated; only image objects can be classified"
        )
    _check_native_length(ds, name)
    return ds


def _read_without_preamble(name: str) -> Dataset:
    """A file that lacks the 128-byte preamble and 'DICM' but starts with its File Meta group.

    Some writers omit the preamble; such a file is accepted when group 0002 with a Transfer
    Syntax UID is there. Anything else is not a DICOM Part 10 file.
    """
    with open(name, "rb") as handle:
        start = handle.read(2)
    ds = None
    if start == b"\x02\x00":  # (0002,xxxx) little endian: File Meta Information first
        try:
            ds = pydicom.dcmread(name, force=True)
        except Exception:
            ds = None
    if ds is None or _transfer_syntax(ds) is None:
        raise DicomInputError(
            f"{name}: not a DICOM file (no 'DICM' prefix after the 128-byte preamble and no "
            "File Meta Information); send a DICOM Part 10 file"
        )
    return ds


def _check_native_length(ds: Dataset, where: str) -> None:
    """Native (uncompressed) Pixel Data shorter than Rows x Columns x ... means truncation."""
    tsuid = _transfer_syntax(ds)
    if "PixelData" not in ds or tsuid is None or tsuid.is_encapsulated:
        return
    try:
        expected = int(get_expected_length(ds, "bytes"))
        found = len(ds.PixelData)
    except Exception:  # incomplete or malformed Image Pixel module: reported when prepared
        return
    if found < expected:
        raise DicomInputError(
            f"{where}: the file is truncated: Pixel Data holds {found} bytes, the image needs "
            f"{expected} (Rows x Columns x Samples x Bits Allocated x Frames); resend the original file"
        )


def prepare_frames(ds: pydicom.Dataset, spec: InputSpec) -> list[PreparedFrame]:
    """Every frame of a single- or multi-frame image as model input plus display frame.

    Raises DicomInputError (bad or undecodable data) or UnsupportedImageError (a form of image
    pacs-xai does not handle, such as an unknown Photometric Interpretation).
    """
    where = _describe(ds)
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        raise DicomInputError(
            f"{where}: no Pixel Data (7FE0,0010) in this {_sop_class_name(ds)} object; "
            "only image objects can be classified"
        )
    photometric = _photometric(ds, where)
    rows, cols = _geometry(ds, where)
    expected_frames = _number_of_frames(ds, where)
    mapping = GridMapping.for_shapes((rows, cols), (spec.rows, spec.columns), spec.aspect)

    frames: list[PreparedFrame] = []
    for index, (array, meta) in enumerate(_decoded_frames(ds, expected_frames, where)):
        if photometric in _GRAYSCALE:
            if array.shape != (rows, cols):
                raise DicomInputError(
                    f"{where}: frame {index} decoded to shape {array.shape}, expected "
                    f"({rows}, {cols}) from Rows/Columns; the header does not match the pixel data"
                )
            unit = window_to_unit(ds, array, spec, frame_index=index)
            display = unit
            planes = [mapping.to_model_grid(unit)] * spec.channels
        else:
            rgb = _colour_to_unit_rgb(ds, array, meta, photometric, (rows, cols), index, where)
            display = (rgb.astype(np.float64) @ _BT601).astype(np.float32)
            if spec.channels == 1:
                planes = [mapping.to_model_grid(display)]
            else:
                planes = [mapping.to_model_grid(rgb[..., c]) for c in range(3)]
        model_input = np.clip(np.stack(planes, axis=0), 0.0, 1.0).astype(np.float32, copy=False)
        display = np.clip(display, 0.0, 1.0).astype(np.float32, copy=False)
        frames.append(PreparedFrame(index, model_input, display, mapping))

    if len(frames) != expected_frames:
        raise DicomInputError(
            f"{where}: Number of Frames (0028,0008) says {expected_frames} but "
            f"{len(frames)} frame(s) were decoded; the file is damaged: resend the original"
        )
    return frames


def window_to_unit(ds: pydicom.Dataset, frame: np.ndarray, spec: InputSpec, *, frame_index: int = 0) -> np.ndarray:
    """One grayscale frame of stored values -> modality LUT -> VOI -> float32 [0, 1].

    ``frame`` holds the stored pixel values of one frame as decoded (before any LUT).
    MONOCHROME1 is inverted so 1 = bright as displayed. ``frame_index`` selects the per-frame
    functional group of an enhanced multi-frame object (Pixel Value Transformation, Frame VOI
    LUT); it does not matter for classic images.
    """
    where = _describe(ds)
    view = _frame_view(ds, frame_index)
    photometric = str(view.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in _GRAYSCALE:
        raise UnsupportedImageError(
            f"{where}: window_to_unit handles MONOCHROME1/MONOCHROME2 only, the Photometric "
            f"Interpretation is '{photometric}'; colour images go through prepare_frames"
        )
    stored = np.asarray(frame)
    try:
        values = apply_modality_lut(stored, view)
    except Exception as exc:
        raise DicomInputError(
            f"{where}: the Modality LUT / Rescale Slope and Intercept cannot be applied "
            f"({type(exc).__name__}: {exc}); correct the Modality LUT module of the file"
        ) from exc
    values = np.asarray(values, dtype=np.float64)

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


# --------------------------------------------------------------------------------------------
# VOI helpers
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Decoding and colour
# --------------------------------------------------------------------------------------------


def _decoded_frames(ds: Dataset, count: int, where: str) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """Decode one frame at a time, turning every decoder failure into a DicomInputError."""
    tsuid = _transfer_syntax(ds)
    if tsuid is None:
        raise DicomInputError(
            f"{where}: no Transfer Syntax UID (0002,0010) in the file meta information, so the "
            "pixel data cannot be decoded; send a DICOM Part 10 file"
        )
    ts_text = f"transfer syntax {tsuid} ({tsuid.name})" if tsuid.name != str(tsuid) else f"transfer syntax {tsuid}"
    try:
        decoder = get_decoder(tsuid)
    except Exception:
        raise UnsupportedImageError(
            f"{where}: no pixel data decoder exists for {ts_text}; have the sender transcode "
            "the image (for example to Explicit VR Little Endian 1.2.840.10008.1.2.1)"
        ) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
        raise DicomInputError(
            f"{where}: cannot decode {ts_text}: no decoding plugin is installed. Install one of: "
            f"{missing} (e.g. pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg "
            "python-gdcm), or have the sender transcode to Explicit VR Little Endian"
        )
    # One frame per call (Decoder.iter_array mishandles some sign corrections in pydicom 3.0).
    for index in range(count):
        try:
            array, meta = decoder.as_array(ds, index=index, as_rgb=True)
        except Exception as exc:
            raise DicomInputError(
                f"{where}: cannot decode frame {index} of {ts_text} ({type(exc).__name__}: {exc}); "
                "the compressed data may be corrupt, or a decoder for it is missing "
                "(pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg python-gdcm); "
                "resend the original or an uncompressed copy"
            ) from exc
        yield array, meta


def _colour_to_unit_rgb(
    ds: Dataset,
    array: np.ndarray,
    meta: dict[str, Any],
    photometric: str,
    shape: tuple[int, int],
    index: int,
    where: str,
) -> np.ndarray:
    """A decoded colour frame (RGB, YBR or palette indices) as float32 RGB [rows, cols, 3] in [0, 1]."""
    if photometric == _PALETTE:
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


# --------------------------------------------------------------------------------------------
# Header checks
# --------------------------------------------------------------------------------------------


def _photometric(ds: Dataset, where: str) -> str:
    """Checked Photometric Interpretation (0028,0004) and its Samples per Pixel (0028,0002)."""
    value = ds.get("PhotometricInterpretation")
    if not value:
        raise DicomInputError(
            f"{where}: no Photometric Interpretation (0028,0004); the Image Pixel module is "
            "incomplete: fix the file at its source"
        )
    photometric = str(value).strip().upper()
    if photometric not in _GRAYSCALE and photometric != _PALETTE and photometric not in _COLOUR:
        raise UnsupportedImageError(
            f"{where}: Photometric Interpretation (0028,0004) '{photometric}' is not supported "
            f"(supported: {_SUPPORTED_TEXT}); convert the image before sending it"
        )
    samples = ds.get("SamplesPerPixel")
    needed = 3 if photometric in _COLOUR else 1
    if samples != needed:
        raise DicomInputError(
            f"{where}: Samples per Pixel (0028,0002) is {samples!r} but Photometric "
            f"Interpretation '{photometric}' needs {needed}; the header is inconsistent: fix "
            "the file at its source"
        )
    return photometric


def _geometry(ds: Dataset, where: str) -> tuple[int, int]:
    rows, cols = ds.get("Rows"), ds.get("Columns")
    try:
        valid = int(rows) > 0 and int(cols) > 0
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise DicomInputError(
            f"{where}: Rows (0028,0010) / Columns (0028,0011) are {rows!r} / {cols!r}; an image "
            "needs both, positive: fix the file at its source"
        )
    return int(rows), int(cols)


def _number_of_frames(ds: Dataset, where: str) -> int:
    """Number of Frames (0028,0008); absent, empty or 0 means one frame (as pydicom reads it)."""
    value = ds.get("NumberOfFrames")
    if value is None or value == "":
        return 1
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise DicomInputError(
            f"{where}: Number of Frames (0028,0008) is {str(value)!r}, not a whole number; fix the file at its source"
        ) from None
    if count < 0:
        raise DicomInputError(f"{where}: Number of Frames (0028,0008) is {count}; fix the file at its source")
    return max(count, 1)


def _transfer_syntax(ds: Dataset) -> UID | None:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return UID(str(uid)) if uid else None


def _sop_class_name(ds: Dataset) -> str:
    uid = ds.get("SOPClassUID")
    if not uid:
        return "DICOM"
    name = UID(str(uid)).name
    return f"{name} ({uid})" if name != str(uid) else str(uid)


def _describe(ds: Dataset) -> str:
    """How messages name a dataset: its file name, else its SOP Instance UID (never patient data)."""
    filename = getattr(ds, "filename", None)
    if isinstance(filename, str) and filename:
        return filename
    uid = ds.get("SOPInstanceUID")
    return f"SOP Instance {uid}" if uid else "dataset"
