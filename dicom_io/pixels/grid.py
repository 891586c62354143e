"""The geometry between a source frame and the model grid: letterbox or stretch, and its exact inverse.

Aspect policy (:meth:`GridMapping.for_shapes`):

- ``letterbox`` (default): the aspect ratio is kept. scale = min(H / rows, W / cols); the image
  occupies a box of rows*scale x cols*scale model pixels, centred (fractional offsets allowed,
  nothing is rounded), and the rest is padded with 0 (black). Radiographs are not distorted.
- ``stretch``: the frame fills the whole grid, each axis scaled on its own.

The mapping is exact in both directions: a model-grid coordinate ``y`` corresponds to the
source coordinate ``(y - top) / (height / rows)`` (continuous coordinates in pixels, pixel
centres at +0.5), and :meth:`GridMapping.to_source_grid` uses precisely that relation, so an
attribution map drawn back on the source frame lines up with the anatomy. Resampling is Pillow's
bilinear filter, antialiased when shrinking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

__all__ = ["GridMapping"]


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
