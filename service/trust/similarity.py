"""How alike two saliency maps are: SSIM, Spearman rank correlation and Pearson correlation, per sample.

These are the similarity measures of the sanity checks (Adebayo et al., "Sanity Checks for Saliency
Maps", NeurIPS 2018; Arun et al., Radiology: AI 2021):

- :func:`ssim`: the structural similarity (Wang et al. 2004) of the min-max-normalised absolute maps
  (each map scaled to [0, 1] on its own), by :func:`skimage.metrics.structural_similarity` with its
  defaults (7 x 7 uniform window, K1 = 0.01, K2 = 0.03) and ``data_range = 1``; computed on the 2-D
  maps, not on flattened vectors (Quantus' ``ssim`` receives MPRT's maps flattened to 1-D).
- :func:`spearman`: Spearman's rank correlation of the absolute maps (ties get average ranks).
- :func:`pearson`: Pearson's correlation of the signed maps.

A constant map (all-zero included) has no structure or ranking: against a non-constant map every
measure here gives 0, against another constant map 1, so no NaN reaches a score (scipy and Quantus
give NaN there). Maps are
``[B, H, W]`` (numpy or torch), compared sample by sample; results are float64 ``[B]``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import rankdata
from skimage.metrics import structural_similarity

from service.trust.checks import Array, TrustMetricError, map_batch

__all__ = ["normalise_min_max", "pearson", "spearman", "ssim"]


def normalise_min_max(maps: Array) -> np.ndarray:
    """Each map ``[B, H, W]`` scaled to [0, 1] by its own minimum and maximum; a constant map gives zeros."""
    values = map_batch(maps, "maps")
    low = values.min(axis=(1, 2), keepdims=True)
    span = values.max(axis=(1, 2), keepdims=True) - low
    return np.divide(values - low, span, out=np.zeros_like(values), where=span > 0)


def ssim(first: Array, second: Array, *, absolute: bool = True) -> np.ndarray:
    """SSIM ``[B]`` (-1..1, 1 = identical) of the min-max-normalised (absolute, unless ``absolute=False``) maps."""
    a, b = _pair(first, second)
    if absolute:
        a, b = np.abs(a), np.abs(b)
    a, b = normalise_min_max(a), normalise_min_max(b)
    if min(a.shape[1:]) < 7:
        raise TrustMetricError(f"SSIM needs maps of at least 7 x 7 pixels (its window), got {a.shape[1:]}")
    return np.array([_constant_aware(x, y, _ssim_unit_range) for x, y in zip(a, b)])


def spearman(first: Array, second: Array, *, absolute: bool = True) -> np.ndarray:
    """Spearman rank correlation ``[B]`` (-1..1) of the absolute (unless ``absolute=False``) maps."""
    a, b = _pair(first, second)
    if absolute:
        a, b = np.abs(a), np.abs(b)
    ranks_a = rankdata(a.reshape(len(a), -1), axis=1)
    ranks_b = rankdata(b.reshape(len(b), -1), axis=1)
    return _rowwise_correlation(ranks_a, ranks_b)


def pearson(first: Array, second: Array) -> np.ndarray:
    """Pearson correlation ``[B]`` (-1..1) of the signed maps."""
    a, b = _pair(first, second)
    return _rowwise_correlation(a.reshape(len(a), -1), b.reshape(len(b), -1))


def _pair(first: Array, second: Array) -> tuple[np.ndarray, np.ndarray]:
    a, b = map_batch(first, "first maps"), map_batch(second, "second maps")
    if a.shape != b.shape:
        raise TrustMetricError(f"maps to compare must have the same shape, got {a.shape} and {b.shape}")
    return a, b


def _ssim_unit_range(a: np.ndarray, b: np.ndarray) -> float:
    return float(structural_similarity(a, b, data_range=1.0))


def _constant_aware(a: np.ndarray, b: np.ndarray, measure: Callable[[np.ndarray, np.ndarray], float]) -> float:
    constant_a, constant_b = np.ptp(a) == 0, np.ptp(b) == 0
    if constant_a or constant_b:
        return 1.0 if constant_a and constant_b else 0.0
    return float(measure(a, b))


def _rowwise_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    norm_a, norm_b = np.sqrt((a * a).sum(axis=1)), np.sqrt((b * b).sum(axis=1))
    result = np.empty(len(a))
    for row, (x, y, nx, ny) in enumerate(zip(a, b, norm_a, norm_b)):
        if nx == 0 or ny == 0:
            result[row] = 1.0 if nx == 0 and ny == 0 else 0.0
        else:
            result[row] = float(np.clip((x @ y) / (nx * ny), -1.0, 1.0))
    return result
