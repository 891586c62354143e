"""The Display Shutter Module (PS3.3 C.7.6.11) as a mask of the pixels it hides.

A display shutter says which part of the image a viewer must not show (it is painted with the
Shutter Presentation Value): collimator blades drawn by the modality, for example. pacs-xai uses
it as a region outside the anatomy (:mod:`service.trust.shortcut`). Shutter Shape (0018,1600)
names one to three shapes; the visible area is the intersection of theirs, so the hidden area
is the union of the areas outside each shape. Coordinates are 1-based, rows and columns of the
source pixel grid, pixel ``(r, c)`` (1-based) has its centre at ``(r, c)``:

- ``RECTANGULAR``: visible are the columns Shutter Left Vertical Edge (0018,1602) .. Shutter
  Right Vertical Edge (0018,1604) and the rows Shutter Upper Horizontal Edge (0018,1606) ..
  Shutter Lower Horizontal Edge (0018,1608), both ends included;
- ``CIRCULAR``: visible are the pixels whose centre lies within Radius of Circular Shutter
  (0018,1612) pixels of Center of Circular Shutter (0018,1610) (row\\column);
- ``POLYGONAL``: visible are the pixels whose centre lies inside the polygon Vertices of the
  Polygonal Shutter (0018,1620) (row\\column pairs, at least three vertices; even-odd rule, a
  centre on an edge counts as inside).

``BITMAP`` (the Bitmap Display Shutter Module, an overlay plane) is not read: it adds nothing to
the mask. A shutter in a separate Presentation State is not looked up either; only the image's
own module counts.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicom_io.errors import DicomInputError
from dicom_io.pixels.decode import describe_dataset, image_shape

__all__ = ["SHUTTER_SHAPES", "shutter_mask"]

#: The shapes read here; BITMAP is accepted and ignored.
SHUTTER_SHAPES = ("RECTANGULAR", "CIRCULAR", "POLYGONAL")
_IGNORED_SHAPES = ("BITMAP",)


def shutter_mask(ds: Dataset) -> np.ndarray | None:
    """bool ``[rows, cols]``, True where the Display Shutter hides the pixel; ``None`` when the
    dataset has no Shutter Shape (or only a BITMAP shutter). Raises :class:`DicomInputError`
    naming the attribute and the value found when a shape lacks its attributes or they are wrong."""
    shapes = ds.get("ShutterShape")
    if shapes in (None, ""):
        return None
    where = describe_dataset(ds)
    names = [
        str(shape).strip().upper() for shape in (shapes if isinstance(shapes, (list, tuple, MultiValue)) else [shapes])
    ]
    names = [name for name in names if name]
    unknown = [name for name in names if name not in SHUTTER_SHAPES + _IGNORED_SHAPES]
    if unknown:
        raise DicomInputError(
            f"{where}: Shutter Shape (0018,1600) {unknown} is not one of {', '.join(SHUTTER_SHAPES + _IGNORED_SHAPES)}"
        )
    shapes_read = [name for name in names if name in SHUTTER_SHAPES]
    if not shapes_read:
        return None
    rows, cols = image_shape(ds, where)
    row = np.arange(1, rows + 1, dtype=np.float64)[:, None]
    col = np.arange(1, cols + 1, dtype=np.float64)[None, :]
    visible = np.ones((rows, cols), dtype=bool)
    for name in shapes_read:
        if name == "RECTANGULAR":
            visible &= _rectangle(ds, where, row, col)
        elif name == "CIRCULAR":
            visible &= _circle(ds, where, row, col)
        else:
            visible &= _polygon(ds, where, row, col)
    return ~visible


def _numbers(ds: Dataset, keyword: str, tag: str, where: str, count: int | None = None) -> list[float]:
    """The attribute's values as numbers; ``count`` of them when given (else an even number >= 6)."""
    value = ds.get(keyword)
    if value in (None, ""):
        raise DicomInputError(f"{where}: the Display Shutter needs {keyword} {tag}, which is missing")
    values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        raise DicomInputError(f"{where}: {keyword} {tag} must hold numbers, found {value!r}") from None
    if not all(np.isfinite(numbers)):
        raise DicomInputError(f"{where}: {keyword} {tag} must hold finite numbers, found {value!r}")
    if count is not None and len(numbers) != count:
        raise DicomInputError(f"{where}: {keyword} {tag} must have {count} value(s), found {len(numbers)}: {value!r}")
    if count is None and (len(numbers) < 6 or len(numbers) % 2):
        raise DicomInputError(
            f"{where}: {keyword} {tag} must hold at least three row\\column pairs, found {len(numbers)} value(s)"
        )
    return numbers


def _rectangle(ds: Dataset, where: str, row: np.ndarray, col: np.ndarray) -> np.ndarray:
    (left,) = _numbers(ds, "ShutterLeftVerticalEdge", "(0018,1602)", where, 1)
    (right,) = _numbers(ds, "ShutterRightVerticalEdge", "(0018,1604)", where, 1)
    (upper,) = _numbers(ds, "ShutterUpperHorizontalEdge", "(0018,1606)", where, 1)
    (lower,) = _numbers(ds, "ShutterLowerHorizontalEdge", "(0018,1608)", where, 1)
    if left > right or upper > lower:
        raise DicomInputError(
            f"{where}: rectangular shutter edges are crossed: left {left:g} > right {right:g} or "
            f"upper {upper:g} > lower {lower:g}"
        )
    return (col >= left) & (col <= right) & (row >= upper) & (row <= lower)


def _circle(ds: Dataset, where: str, row: np.ndarray, col: np.ndarray) -> np.ndarray:
    centre_row, centre_col = _numbers(ds, "CenterOfCircularShutter", "(0018,1610)", where, 2)
    (radius,) = _numbers(ds, "RadiusOfCircularShutter", "(0018,1612)", where, 1)
    if radius < 0:
        raise DicomInputError(f"{where}: Radius of Circular Shutter (0018,1612) must be >= 0, found {radius:g}")
    return (row - centre_row) ** 2 + (col - centre_col) ** 2 <= radius**2


def _polygon(ds: Dataset, where: str, row: np.ndarray, col: np.ndarray) -> np.ndarray:
    """Even-odd rule on the pixel centres; centres on an edge count as inside."""
    numbers = _numbers(ds, "VerticesOfThePolygonalShutter", "(0018,1620)", where)
    vertices = np.asarray(numbers, dtype=np.float64).reshape(-1, 2)
    rows, cols = row.shape[0], col.shape[1]
    inside = np.zeros((rows, cols), dtype=bool)
    on_edge = np.zeros((rows, cols), dtype=bool)
    for (r0, c0), (r1, c1) in zip(vertices, np.roll(vertices, -1, axis=0)):
        # A ray from each centre towards +column crosses the edge when the edge spans the row.
        if r0 != r1:
            spans = (row > min(r0, r1)) & (row <= max(r0, r1))
            crossing_col = c0 + (row - r0) * (c1 - c0) / (r1 - r0)
            inside ^= spans & (col < crossing_col)
        # Centres on the segment itself.
        cross = (r1 - r0) * (col - c0) - (c1 - c0) * (row - r0)
        within = (col >= min(c0, c1)) & (col <= max(c0, c1)) & (row >= min(r0, r1)) & (row <= max(r0, r1))
        on_edge |= (np.abs(cross) <= 1e-9 * max(1.0, abs(r1 - r0) + abs(c1 - c0))) & within
    return inside | on_edge
