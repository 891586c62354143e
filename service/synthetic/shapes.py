"""Ellipses and ellipsoids on a grid: the anatomy of the radiograph and CT phantoms.

One formula for both: the squared normalised radius, the sum over the axes of
``((coordinate - centre) / radius) ** 2`` in the given order, in the coordinates' dtype (float32
for the phantoms). Below 1 inside the shape, 1 on its edge; its square root grows linearly from the
centre (0) outwards, which gives round lesions their density profile.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def squared_elliptic_radius(
    coordinates: Sequence[np.ndarray], centre: Sequence[float], radii: Sequence[float]
) -> np.ndarray:
    """``sum(((c - m) / r) ** 2)`` over the axes, summed in their order: < 1 inside the ellipse
    (2 axes) or ellipsoid (3) with that centre and those semi-axes, in the coordinates' units
    (pixels or mm)."""
    if not len(coordinates) == len(centre) == len(radii) or len(coordinates) == 0:
        raise ValueError(
            f"one centre and one radius per axis: {len(coordinates)} axes, centre {tuple(centre)}, radii {tuple(radii)}"
        )
    total = ((coordinates[0] - centre[0]) / radii[0]) ** 2
    for axis, middle, radius in zip(coordinates[1:], centre[1:], radii[1:], strict=True):
        total = total + ((axis - middle) / radius) ** 2
    return total
