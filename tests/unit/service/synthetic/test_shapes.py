"""The phantoms' one ellipse formula: the pixels inside an ellipse are scikit-image's
(``skimage.draw.ellipse``), an ellipsoid in mm holds its volume and its middle slice is
scikit-image's ellipse, the value is 1 on the semi-axes' ends and 0 at the centre, and a centre or
radius short of an axis is refused."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import ellipse

from service.synthetic.shapes import squared_elliptic_radius


@pytest.mark.parametrize(("centre", "radii"), [((20.3, 31.6), (9.2, 14.7)), ((5.5, 40.25), (12.4, 6.1))])
def test_the_inside_of_an_ellipse_is_scikit_images(centre: tuple[float, float], radii: tuple[float, float]) -> None:
    shape = (48, 64)
    grid = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    inside = squared_elliptic_radius(grid, centre, radii) < 1
    expected = np.zeros(shape, dtype=bool)
    expected[ellipse(*centre, *radii, shape=shape)] = True
    assert inside.any() and np.array_equal(inside, expected)


def test_an_ellipsoid_holds_its_volume_and_its_middle_slice_is_scikit_images_ellipse() -> None:
    """On a grid of 2.5 x 2 x 2 mm: the voxels inside hold 4/3 pi abc (to 2 %); the slice through
    the centre is the ellipse skimage draws with the other two semi-axes (in voxels)."""
    radii, spacing, shape = (30.0, 21.0, 27.0), (2.5, 2.0, 2.0), (41, 40, 44)
    centre = (50.0, 40.3, 43.1)  # mm; slice 20 is at z = 50
    z, y, x = (
        axis * step for axis, step in zip(np.mgrid[0 : shape[0], 0 : shape[1], 0 : shape[2]], spacing, strict=True)
    )
    inside = squared_elliptic_radius((z, y, x), centre, radii) < 1
    assert inside.sum() * np.prod(spacing) == pytest.approx(4 / 3 * np.pi * np.prod(radii), rel=0.02)
    expected = np.zeros(shape[1:], dtype=bool)
    expected[ellipse(centre[1] / 2, centre[2] / 2, radii[1] / 2, radii[2] / 2, shape=shape[1:])] = True
    assert np.array_equal(inside[20], expected)


def test_one_on_the_semi_axes_ends_and_zero_at_the_centre() -> None:
    coordinates = (np.array([3.0, 7.0, 3.0, 3.0]), np.array([-2.0, -2.0, 3.0, -2.0]), np.array([1.0, 1.0, 1.0, -4.0]))
    values = squared_elliptic_radius(coordinates, (3.0, -2.0, 1.0), (4.0, 5.0, 5.0))
    np.testing.assert_array_equal(values, [0.0, 1.0, 1.0, 1.0])


def test_a_centre_or_radius_short_of_an_axis_is_refused() -> None:
    with pytest.raises(ValueError, match=r"2 axes, centre \(1.0,\), radii \(1.0, 1.0\)"):
        squared_elliptic_radius((np.zeros(3), np.zeros(3)), (1.0,), (1.0, 1.0))
