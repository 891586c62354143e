"""Are perturbed images still images the model knows? The out-of-distribution distance of
images whose regions were filled by a constant, a blur, or the healthy appearance h(x).

Uzunova, Ehrhardt, Kepp & Handels (SPIE Medical Imaging 2019) argue that a perturbation method
tests the classifier on images it never saw when it fills removed regions with a constant or a
blur (a black hole, a smear in a noisy radiograph), so its scores say how the model behaves out
of its distribution rather than why it decided; their VAE's healthy replacement is meant to keep
the perturbed image plausible. This module measures that premise on a model:

- regions: per image, ``fraction`` of the pixels in a few smooth random blobs (uniform noise on a
  :data:`BLOB_GRID` x :data:`BLOB_GRID` grid upsampled bilinearly to the image, its highest
  ``round(fraction * H * W)`` pixels), from ``seed``, the same regions for every fill;
- perturbed image: ``x`` with its region taken from the fill's replacement image ``R``
  (``x * (1 - M) + R * M``);
- the verdict of :class:`~service.trust.ood.OodDetector` (Mahalanobis distance of the pooled
  features, Lee et al. 2018) on each perturbed image: the share above the card's threshold
  (``flag_rate``, 0..1) and the median distance (``distance_p50``, dimensionless).

Plain tensors and a torch module in, numbers out: no DICOM.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from service.trust.ood import OodDetector

__all__ = ["BLOB_GRID", "FILL_FRACTIONS", "PerturbedOod", "blob_regions", "fill_regions", "perturbed_ood"]

#: Area fractions of the perturbed regions measured by default.
FILL_FRACTIONS = (0.1, 0.25, 0.5)
#: Cells per side of the random grid the blobs are drawn from.
BLOB_GRID = 7


@dataclass(frozen=True)
class PerturbedOod:
    """The OOD verdicts on the images perturbed with one fill at one area fraction."""

    fill: str
    fraction: float
    flag_rate: float  # share of perturbed images above the threshold, 0..1
    distance_p50: float  # median Mahalanobis distance
    images: int


def blob_regions(count: int, height: int, width: int, fraction: float, seed: int) -> torch.Tensor:
    """Boolean ``[count, 1, height, width]``: per image exactly ``round(fraction * H * W)`` pixels
    (at least one), the highest of a smooth random field, so they form a few contiguous blobs."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 1, BLOB_GRID, BLOB_GRID, generator=generator, dtype=torch.float64)
    field = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False).flatten(1)
    keep = max(1, round(fraction * height * width))
    regions = torch.zeros_like(field, dtype=torch.bool)
    regions.scatter_(1, field.topk(keep, dim=1).indices, True)
    return regions.view(count, 1, height, width)


def fill_regions(inputs: torch.Tensor, regions: torch.Tensor, replacement: torch.Tensor) -> torch.Tensor:
    """``inputs`` ``[N, C, H, W]`` with the ``regions`` (bool ``[N, 1, H, W]``) taken from ``replacement``."""
    if replacement.shape != inputs.shape:
        raise ValueError(
            f"replacement must have the inputs' shape {tuple(inputs.shape)}, got {tuple(replacement.shape)}"
        )
    return torch.where(regions, replacement, inputs)


def perturbed_ood(
    detector: OodDetector,
    module: nn.Module,
    inputs: torch.Tensor,
    replacements: Mapping[str, torch.Tensor],
    fractions: Sequence[float] = FILL_FRACTIONS,
    seed: int = 0,
) -> list[PerturbedOod]:
    """For each fill (name -> replacement image ``[N, C, H, W]``) and area fraction, the OOD verdicts on
    ``inputs`` with random blob regions of that fraction filled from it; the unperturbed images as
    fill ``"none"`` (fraction 0) first, the reference."""
    count, _, height, width = inputs.shape
    results = [_verdicts(detector, module, inputs, "none", 0.0)]
    for fraction in fractions:
        regions = blob_regions(count, height, width, fraction, seed)
        for name, replacement in replacements.items():
            perturbed = fill_regions(inputs, regions, replacement.to(inputs.dtype))
            results.append(_verdicts(detector, module, perturbed, name, fraction))
    return results


def _verdicts(
    detector: OodDetector, module: nn.Module, images: torch.Tensor, fill: str, fraction: float
) -> PerturbedOod:
    scores = detector.score(module, images)
    distances = np.array([score.distance for score in scores])
    flagged = np.array([score.out_of_distribution for score in scores])
    return PerturbedOod(fill, fraction, float(flagged.mean()), float(np.median(distances)), len(scores))
