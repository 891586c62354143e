"""The error type of :mod:`service.trust` and the input checks its metrics share."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

#: A numpy array or a torch tensor (moved to the CPU as numpy where a metric needs it).
Array = np.ndarray | torch.Tensor
#: Maps or masks as given: a batch ``[B, H, W]`` (numpy or torch), or a sequence of 2-D arrays.
MapBatch = np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor]


class TrustMetricError(ValueError):
    """A metric cannot be computed on these inputs (shapes, values, settings); the message names them."""


def as_numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    """A numpy view or copy of ``array`` (a torch tensor is detached and moved to the CPU)."""
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def map_list(maps: MapBatch, what: str) -> list[np.ndarray]:
    """``maps`` as a list of finite float64 2-D arrays (one per sample)."""
    items = list(as_numpy(maps)) if isinstance(maps, np.ndarray | torch.Tensor) else [as_numpy(m) for m in maps]
    if isinstance(maps, np.ndarray | torch.Tensor) and as_numpy(maps).ndim != 3:
        raise TrustMetricError(f"{what} must be a batch [B, H, W], got shape {tuple(maps.shape)}")
    result = []
    for index, item in enumerate(items):
        if item.ndim != 2:
            raise TrustMetricError(f"{what}[{index}] must be 2-D [H, W], got shape {item.shape}")
        values = item.astype(np.float64)
        bad = int(np.count_nonzero(~np.isfinite(values)))
        if bad:
            raise TrustMetricError(f"{what}[{index}] has {bad} non-finite values (NaN or inf)")
        result.append(values)
    if not result:
        raise TrustMetricError(f"{what} is empty: need at least one sample")
    return result


def map_batch(maps: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    """``maps`` as a finite float64 batch ``[B, H, W]``."""
    return np.stack(map_list(maps, what))


def paired_maps_and_masks(maps: MapBatch, masks: MapBatch) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each map with its boolean ground-truth mask on the same grid; no mask may be empty.

    Localisation is undefined without a lesion: an empty mask (a normal image) is an error naming
    the samples, so the caller leaves such images out instead of a NaN or a silent 0 in a score.
    """
    map_items = map_list(maps, "maps")
    mask_items = list(as_numpy(masks)) if isinstance(masks, np.ndarray | torch.Tensor) else [as_numpy(m) for m in masks]
    if len(map_items) != len(mask_items):
        raise TrustMetricError(f"need one mask per map: {len(map_items)} maps, {len(mask_items)} masks")
    pairs, empty = [], []
    for index, (saliency, mask) in enumerate(zip(map_items, mask_items)):
        if mask.shape != saliency.shape:
            raise TrustMetricError(
                f"map {index} has shape {saliency.shape} but its mask {mask.shape}: map the heatmap onto the "
                "mask's grid first (GridMapping.to_source_grid)"
            )
        if mask.dtype != np.bool_:
            values = np.unique(mask)
            if not np.isin(values, (0, 1)).all():
                raise TrustMetricError(f"mask {index} must be boolean (or 0/1), got values {values[:5].tolist()}")
        mask = mask.astype(bool)
        if not mask.any():
            empty.append(index)
        pairs.append((saliency, mask))
    if empty:
        raise TrustMetricError(
            f"ground-truth masks {empty} are empty: localisation needs a lesion, leave images without one "
            "(normal class) out of localisation scores"
        )
    return pairs


def class_indices(targets: Sequence[int] | np.ndarray | torch.Tensor, count: int) -> np.ndarray:
    """``targets`` as ``count`` class indices >= 0 (int64)."""
    values = as_numpy(torch.as_tensor(targets) if not isinstance(targets, np.ndarray) else targets)
    values = np.asarray(values).reshape(-1)
    if values.size != count:
        raise TrustMetricError(f"need one target per sample: {count} samples, got {values.size} targets")
    if not np.issubdtype(values.dtype, np.integer) or (values < 0).any():
        raise TrustMetricError(f"targets must be class indices >= 0, got {values.tolist()}")
    return values.astype(np.int64)
