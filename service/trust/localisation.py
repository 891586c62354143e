"""Does the heatmap point at the lesion? Maps scored against boolean ground-truth masks.

Each map and its mask lie on the same grid: the source pixel grid of the image, onto which the
caller maps the heatmap back (``GridMapping.to_source_grid``) before scoring. Maps may be signed and
on any scale; masks are boolean (True = lesion). Results are per sample (``[B]``; take the mean over
images for the rate), so maps of images of different sizes can be scored in one call as sequences.

- :func:`peak_in_mask` (hit rate; Saporta et al., "Benchmarking saliency methods for chest X-ray
  interpretation", Nat. Mach. Intell. 2022, CheXlocalize): a hit when the map's maximum (``argmax``,
  the first maximal pixel in row-major order) lies inside the mask.
- :func:`otsu_iou` (mIoU; CheXlocalize): the map min-max normalised to [0, 1], thresholded with Otsu's
  method (:func:`skimage.filters.threshold_otsu`; the region is ``normalised > threshold``), then
  intersection over union with the mask (0..1).
- :func:`relevance_mass_accuracy` (Arras et al., "CLEVR-XAI", Inf. Fusion 2022): positive attribution
  inside the mask over all positive attribution, ``sum(max(a, 0)[mask]) / sum(max(a, 0))`` (0..1).
  Quantus' ``RelevanceMassAccuracy`` sums the values as given, negative ones included, in both the
  numerator and the denominator (``sum(a[mask]) / sum(a)``; with ``abs=True`` it sums ``|a|``). On
  a non-negative map (ReLU'd CAMs, absolute gradients) both agree; on a signed map this module
  equals Quantus applied to ``max(a, 0)``, while Quantus on the signed map may leave [0, 1].
- :func:`pointing_game` (Zhang et al., "Top-down neural attention by excitation backprop", IJCV
  2018): a hit when the map's maximum lies within ``tolerance_px`` pixels (Euclidean, source grid;
  default 15) of the mask, i.e. inside the mask dilated by a disc of that radius
  (``x² + y² <= r²``). With ``tolerance_px=0`` it is :func:`peak_in_mask`.

Edge cases, defined so that no NaN reaches a scorecard:

- An empty mask (an image without a lesion) is an error naming the samples: localisation is
  undefined there; leave such images out. (Quantus' ``PointingGame`` writes NaN into a boolean
  array, so it counts an empty mask as a hit; its ``RelevanceMassAccuracy`` gives NaN.)
- A constant map (all-zero included) has no peak and points nowhere: a miss for
  :func:`peak_in_mask` and :func:`pointing_game` (Quantus counts every pixel of a constant map as
  its maximum: a hit whenever the mask is not empty), an empty Otsu region and IoU 0 for
  :func:`otsu_iou`. A map without positive attribution has relevance mass accuracy 0 (Quantus:
  0 / 0 = NaN for an all-zero map).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import distance_transform_edt
from skimage.filters import threshold_otsu

from service.trust.checks import MapBatch, TrustMetricError, paired_maps_and_masks

__all__ = [
    "POINTING_GAME_TOLERANCE_PX",
    "LocalisationSummary",
    "localisation_summary",
    "otsu_iou",
    "otsu_region",
    "peak_in_mask",
    "pointing_game",
    "relevance_mass_accuracy",
]

#: The pointing game's tolerance (Zhang et al. 2018), pixels of the grid the map and mask lie on.
POINTING_GAME_TOLERANCE_PX = 15.0


def peak_in_mask(maps: MapBatch, masks: MapBatch) -> np.ndarray:
    """Per sample, whether the map's maximum lies inside the mask (bool ``[B]``; the hit rate is the mean)."""
    return pointing_game(maps, masks, tolerance_px=0.0)


def pointing_game(maps: MapBatch, masks: MapBatch, *, tolerance_px: float = POINTING_GAME_TOLERANCE_PX) -> np.ndarray:
    """Per sample, whether the map's maximum lies within ``tolerance_px`` pixels of the mask (bool ``[B]``)."""
    if not np.isfinite(tolerance_px) or tolerance_px < 0:
        raise TrustMetricError(f"tolerance_px must be a finite number of pixels >= 0, got {tolerance_px!r}")
    hits = []
    for saliency, mask in paired_maps_and_masks(maps, masks):
        if np.ptp(saliency) == 0:
            hits.append(False)
            continue
        peak = np.unravel_index(np.argmax(saliency), saliency.shape)
        if tolerance_px == 0:
            hits.append(bool(mask[peak]))
        else:
            distance_to_mask = distance_transform_edt(~mask)  # 0 inside the mask
            hits.append(bool(distance_to_mask[peak] <= tolerance_px))
    return np.array(hits, dtype=bool)


def otsu_region(saliency: np.ndarray) -> tuple[np.ndarray, float]:
    """The map's Otsu region (bool, ``normalised > threshold``) and the threshold on the min-max-normalised map.

    A constant map gives an empty region and threshold 1.0 (nothing stands out).
    """
    values = np.asarray(saliency, dtype=np.float64)
    span = np.ptp(values)
    if span == 0:
        return np.zeros(values.shape, dtype=bool), 1.0
    normalised = (values - values.min()) / span
    threshold = float(threshold_otsu(normalised))
    return normalised > threshold, threshold


def otsu_iou(maps: MapBatch, masks: MapBatch) -> np.ndarray:
    """Per sample, IoU (0..1) of the map's Otsu region with the mask (float64 ``[B]``; mIoU is the mean)."""
    ious = []
    for saliency, mask in paired_maps_and_masks(maps, masks):
        region, _ = otsu_region(saliency)
        ious.append(np.count_nonzero(region & mask) / np.count_nonzero(region | mask))
    return np.array(ious, dtype=np.float64)


def relevance_mass_accuracy(maps: MapBatch, masks: MapBatch) -> np.ndarray:
    """Per sample, the share (0..1) of positive attribution inside the mask (float64 ``[B]``)."""
    shares = []
    for saliency, mask in paired_maps_and_masks(maps, masks):
        positive = np.clip(saliency, 0.0, None)
        total = positive.sum()
        shares.append(float(positive[mask].sum() / total) if total > 0 else 0.0)
    return np.array(shares, dtype=np.float64)


@dataclass(frozen=True)
class LocalisationSummary:
    """Means over the images of each localisation score (fractions 0..1) and how many images."""

    images: int
    hit_rate: float
    mean_iou: float
    relevance_mass_accuracy: float
    pointing_game: float
    tolerance_px: float


def localisation_summary(
    maps: MapBatch, masks: MapBatch, *, tolerance_px: float = POINTING_GAME_TOLERANCE_PX
) -> LocalisationSummary:
    """All four scores, averaged over the images (every mask must hold a lesion)."""
    hits = peak_in_mask(maps, masks)
    return LocalisationSummary(
        images=len(hits),
        hit_rate=float(hits.mean()),
        mean_iou=float(otsu_iou(maps, masks).mean()),
        relevance_mass_accuracy=float(relevance_mass_accuracy(maps, masks).mean()),
        pointing_game=float(pointing_game(maps, masks, tolerance_px=tolerance_px).mean()),
        tolerance_px=float(tolerance_px),
    )
