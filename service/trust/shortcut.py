"""The shortcut signal: how much of an explanation's positive attribution lies outside the anatomy.

A model that reads a burned-in label, a lead marker or the collimation edge instead of the chest
("Clever Hans", Lapuschkin et al. 2019; DeGrave et al. 2021 for chest radiographs) shows it in
its explanations: the evidence sits where there is no patient. On the SOURCE pixel grid of one
frame (``display``: the windowed grayscale frame in [0, 1], 1 = bright), the region R outside the
anatomy is the union of four parts, each kept on its own (:class:`OutsideAnatomy`) so that a
test or a picture can show them:

- **outside the body**: the complement of the body. The body is the largest connected component
  of the display above Otsu's threshold (Otsu 1979) after Gaussian smoothing (sigma 1 % of the
  shorter side), with its holes filled (the lungs are dark but inside the body);
- **edge band**: the outer :data:`EDGE_BAND_FRACTION` (8 %) of the rows at the top and bottom and
  of the columns at the left and right;
- **burned-in text and markers**: small bright structures near the edge: connected components of
  the white top-hat (display minus its grey opening with a square of 4 % of the shorter side)
  above :data:`TEXT_CONTRAST`, each at most :data:`TEXT_MAX_AREA_FRACTION` of the frame, with
  their centroid in the outer :data:`TEXT_NEAR_EDGE_FRACTION` of the rows or columns, dilated
  by 1 % of the shorter side;
- **shutter**: the pixels a Display Shutter hides, when the object has one (given by the caller,
  :func:`dicom_io.pixels.shutter_mask`).

Body and text are found on a working grid of at most :data:`WORK_SIZE` pixels a side (block
means), then drawn back on the source grid (nearest neighbour).

Figures of one explanation (:func:`shortcut_figures`), with ``a`` the attribution on the source
grid and ``a+ = max(a, 0)``:

- share ``s = sum(a+ over R) / sum(a+)`` (fraction 0..1; 0 when no pixel has positive attribution);
- area fraction ``|R| / (rows * cols)`` (fraction 0..1);
- concentration ``s / area fraction`` (ratio; 1 = as much evidence in R as its area; 0 when R is
  empty).

A result is flagged "explanation shortcut suspected" when the share AND the concentration reach
their thresholds (:class:`ShortcutThresholds`, from the model card's ``trust.shortcut`` section;
:func:`thresholds_from_honest` derives them from the figures of honest data, e.g. the 99th
percentile). This module knows numpy arrays only: no DICOM, no torch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

__all__ = [
    "EDGE_BAND_FRACTION",
    "OutsideAnatomy",
    "ShortcutFigures",
    "ShortcutThresholds",
    "is_shortcut_suspected",
    "outside_anatomy",
    "shortcut_figures",
    "thresholds_from_honest",
]

#: Width of the edge band, as a fraction of the rows (top, bottom) and of the columns (left, right).
EDGE_BAND_FRACTION = 0.08
#: Longest side of the working grid on which body and burned-in text are found, in pixels.
WORK_SIZE = 512
#: Gaussian sigma of the smoothing before Otsu's threshold, as a fraction of the shorter side.
SMOOTHING_FRACTION = 0.01
#: Side of the square of the grey opening behind the top-hat, as a fraction of the shorter side:
#: strokes thinner than this (letters, marker outlines) stand out, broad bright anatomy does not.
TEXT_OPENING_FRACTION = 0.04
#: Least top-hat value (display units, 0..1) of a burned-in pixel: brighter than its surroundings by this.
TEXT_CONTRAST = 0.3
#: Largest area of one burned-in component, as a fraction of the frame.
TEXT_MAX_AREA_FRACTION = 0.005
#: A burned-in component's centroid lies within this fraction of the rows or columns from a border.
TEXT_NEAR_EDGE_FRACTION = 0.2
#: Dilation of the burned-in components, as a fraction of the shorter side (joins letters, covers halos).
TEXT_DILATION_FRACTION = 0.01


@dataclass(frozen=True, eq=False)
class OutsideAnatomy:
    """The region R outside the anatomy of one frame and its parts: bool ``[rows, cols]`` each."""

    outside_body: np.ndarray
    edge_band: np.ndarray
    burned_in: np.ndarray
    shutter: np.ndarray  # all False when the object has no Display Shutter

    @functools.cached_property
    def region(self) -> np.ndarray:
        """R: the union of the four parts (computed once)."""
        return self.outside_body | self.edge_band | self.burned_in | self.shutter

    @property
    def area_fraction(self) -> float:
        """|R| / (rows * cols), 0..1."""
        return float(np.count_nonzero(self.region)) / self.region.size


@dataclass(frozen=True)
class ShortcutFigures:
    """The shortcut figures of one explanation (see the module docstring for the definitions)."""

    share: float  # fraction 0..1 of the positive attribution inside R
    area_fraction: float  # fraction 0..1 of the frame that R covers
    concentration: float  # share / area_fraction

    @property
    def share_percent(self) -> float:
        return 100.0 * self.share


@dataclass(frozen=True)
class ShortcutThresholds:
    """A result is flagged when ``share >= share`` and ``concentration >= concentration``."""

    share: float  # fraction 0..1
    concentration: float  # ratio >= 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.share) and 0.0 <= self.share <= 1.0):
            raise ValueError(f"shortcut share threshold must be a fraction in [0, 1], got {self.share!r}")
        if not (math.isfinite(self.concentration) and self.concentration >= 0.0):
            raise ValueError(f"shortcut concentration threshold must be >= 0, got {self.concentration!r}")


def outside_anatomy(
    display: np.ndarray, shutter: np.ndarray | None = None, *, edge_band: float = EDGE_BAND_FRACTION
) -> OutsideAnatomy:
    """The region R of a frame from its windowed ``display`` (float [rows, cols] in [0, 1]) and,
    when the object has a Display Shutter, its ``shutter`` mask (bool, True = hidden)."""
    display = _checked_display(display)
    rows, cols = display.shape
    if shutter is None:
        shutter = np.zeros((rows, cols), dtype=bool)
    elif not isinstance(shutter, np.ndarray) or shutter.shape != (rows, cols) or shutter.dtype != bool:
        found = f"{shutter.dtype} {shutter.shape}" if isinstance(shutter, np.ndarray) else type(shutter).__name__
        raise ValueError(f"shutter must be a bool array of the display's shape {(rows, cols)}, got {found}")
    if not 0.0 <= edge_band < 0.5:
        raise ValueError(f"edge_band must be a fraction in [0, 0.5), got {edge_band!r}")

    factor = max(1, math.ceil(max(rows, cols) / WORK_SIZE))
    work = _block_mean(display, factor)
    work_shutter = _block_mean(shutter.astype(np.float32), factor) > 0.5
    short_side = min(work.shape)
    outside = _outside_body(work, work_shutter, short_side)
    text = _burned_in(work, short_side)
    return OutsideAnatomy(
        outside_body=_to_source(outside, factor, (rows, cols)),
        edge_band=_edge_band((rows, cols), edge_band),
        burned_in=_to_source(text, factor, (rows, cols)),
        shutter=shutter.copy(),
    )


def shortcut_figures(attribution: np.ndarray, region: np.ndarray | OutsideAnatomy) -> ShortcutFigures:
    """Share, area fraction and concentration of ``attribution`` (float [rows, cols], signed, on the
    source grid) in ``region`` (R, bool of the same shape, or an :class:`OutsideAnatomy`)."""
    mask = region.region if isinstance(region, OutsideAnatomy) else region
    if not isinstance(attribution, np.ndarray) or attribution.ndim != 2:
        found = attribution.shape if isinstance(attribution, np.ndarray) else type(attribution).__name__
        raise ValueError(f"attribution must be a 2-D array on the source grid, got {found}")
    if not isinstance(mask, np.ndarray) or mask.dtype != bool or mask.shape != attribution.shape:
        found = f"{mask.dtype} {mask.shape}" if isinstance(mask, np.ndarray) else type(mask).__name__
        raise ValueError(f"region must be a bool array of the attribution's shape {attribution.shape}, got {found}")
    bad = int(np.count_nonzero(~np.isfinite(attribution)))
    if bad:
        raise ValueError(f"attribution has {bad} non-finite (NaN/inf) values")
    positive = np.clip(attribution.astype(np.float64), 0.0, None)
    total = float(positive.sum())
    share = float(positive[mask].sum()) / total if total > 0.0 else 0.0
    area = float(np.count_nonzero(mask)) / mask.size
    concentration = share / area if area > 0.0 else 0.0
    return ShortcutFigures(share=min(1.0, share), area_fraction=area, concentration=concentration)


def is_shortcut_suspected(figures: ShortcutFigures, thresholds: ShortcutThresholds) -> bool:
    """True when both the share and the concentration reach their thresholds."""
    return figures.share >= thresholds.share and figures.concentration >= thresholds.concentration


def thresholds_from_honest(figures: Sequence[ShortcutFigures], percentile: float = 99.0) -> ShortcutThresholds:
    """Thresholds from the figures of explanations of honest, in-distribution data: the
    ``percentile`` (default 99th, linear interpolation) of the shares and of the concentrations,
    so that about ``100 - percentile`` % of such results pass each one."""
    if not figures:
        raise ValueError("thresholds_from_honest needs the figures of at least one honest result, got none")
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
    shares = np.array([f.share for f in figures], dtype=np.float64)
    concentrations = np.array([f.concentration for f in figures], dtype=np.float64)
    return ShortcutThresholds(
        share=float(np.percentile(shares, percentile)),
        concentration=float(np.percentile(concentrations, percentile)),
    )


# --- the parts of R --------------------------------------------------------------------------


def _checked_display(display: np.ndarray) -> np.ndarray:
    if not isinstance(display, np.ndarray) or display.ndim != 2 or 0 in display.shape:
        found = display.shape if isinstance(display, np.ndarray) else type(display).__name__
        raise ValueError(f"display must be a non-empty 2-D [rows, cols] array, got {found}")
    if not np.all(np.isfinite(display)):
        raise ValueError(f"display has {int(np.count_nonzero(~np.isfinite(display)))} non-finite values")
    return display.astype(np.float32, copy=False)


def _block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Mean of ``factor`` x ``factor`` blocks (the last blocks edge-padded)."""
    if factor == 1:
        return image.astype(np.float32, copy=False)
    rows, cols = image.shape
    padded = np.pad(image, ((0, -rows % factor), (0, -cols % factor)), mode="edge")
    blocks = padded.reshape(padded.shape[0] // factor, factor, padded.shape[1] // factor, factor)
    return blocks.mean(axis=(1, 3), dtype=np.float32)


def _to_source(mask: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """A working-grid mask drawn back on the source grid (nearest neighbour)."""
    if factor == 1:
        return mask
    return np.repeat(np.repeat(mask, factor, axis=0)[: shape[0]], factor, axis=1)[:, : shape[1]]


def _edge_band(shape: tuple[int, int], fraction: float) -> np.ndarray:
    rows, cols = shape
    band = np.zeros(shape, dtype=bool)
    across, down = round(fraction * cols), round(fraction * rows)
    if down:
        band[:down] = band[-down:] = True
    if across:
        band[:, :across] = band[:, -across:] = True
    return band


def _outside_body(work: np.ndarray, shutter: np.ndarray, short_side: int) -> np.ndarray:
    """Complement of the body: largest component above Otsu's threshold, holes filled."""
    smoothed = ndimage.gaussian_filter(work, sigma=max(1.0, SMOOTHING_FRACTION * short_side))
    visible = smoothed[~shutter]
    if visible.size == 0 or float(visible.max() - visible.min()) < 1e-6:
        return np.zeros(work.shape, dtype=bool)  # flat frame: nothing to tell body from background
    upper = threshold_otsu(visible)
    darker = visible[visible <= upper]
    lower = threshold_otsu(darker) if float(darker.max() - darker.min()) >= 1e-6 else upper
    foreground = (smoothed > lower) & ~shutter
    labels, count = ndimage.label(foreground, structure=np.ones((3, 3)))
    if count == 0:
        return np.ones(work.shape, dtype=bool)
    sizes = ndimage.sum_labels(foreground, labels, index=np.arange(1, count + 1))
    body = ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))
    return ~body


def _burned_in(work: np.ndarray, short_side: int) -> np.ndarray:
    """Small bright top-hat components near the edge, dilated."""
    side = max(3, round(TEXT_OPENING_FRACTION * short_side))
    tophat = work - ndimage.grey_opening(work, size=(side, side))
    candidates = tophat > TEXT_CONTRAST
    labels, count = ndimage.label(candidates, structure=np.ones((3, 3)))
    if count == 0:
        return np.zeros(work.shape, dtype=bool)
    index = np.arange(1, count + 1)
    areas = ndimage.sum_labels(candidates, labels, index=index)
    centroids = np.asarray(ndimage.center_of_mass(candidates, labels, index), dtype=np.float64).reshape(-1, 2)
    rows, cols = work.shape
    near_rows = np.minimum(centroids[:, 0] + 0.5, rows - 0.5 - centroids[:, 0]) <= TEXT_NEAR_EDGE_FRACTION * rows
    near_cols = np.minimum(centroids[:, 1] + 0.5, cols - 0.5 - centroids[:, 1]) <= TEXT_NEAR_EDGE_FRACTION * cols
    small = areas <= TEXT_MAX_AREA_FRACTION * work.size
    keep = np.zeros(count + 1, dtype=bool)
    keep[1:] = small & (near_rows | near_cols)
    text = keep[labels]
    radius = max(1, round(TEXT_DILATION_FRACTION * short_side))
    disk = np.hypot(*np.mgrid[-radius : radius + 1, -radius : radius + 1]) <= radius
    return ndimage.binary_dilation(text, structure=disk) if text.any() else text
