"""dicom_io.pixels.shutter: the Display Shutter Module (PS3.3 C.7.6.11) as a mask of the hidden pixels,
on datasets built here (1-based row/column coordinates, pixel centres at integers)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_io.errors import DicomInputError
from dicom_io.pixels import shutter_mask
from service.synthetic.phantoms import make_phantom

ROWS, COLS = 40, 50


def _image(**shutter: object) -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3.4"
    ds.Rows, ds.Columns = ROWS, COLS
    for keyword, value in shutter.items():
        setattr(ds, keyword, value)
    return ds


def test_no_shutter_is_none() -> None:
    assert shutter_mask(_image()) is None
    assert shutter_mask(_image(ShutterShape="BITMAP")) is None  # an overlay plane: not read


def test_rectangle_hides_everything_outside_its_inclusive_edges() -> None:
    ds = _image(
        ShutterShape="RECTANGULAR",
        ShutterLeftVerticalEdge=5,
        ShutterRightVerticalEdge=44,
        ShutterUpperHorizontalEdge=3,
        ShutterLowerHorizontalEdge=30,
    )
    hidden = shutter_mask(ds)
    assert hidden.shape == (ROWS, COLS) and hidden.dtype == bool
    expected = np.ones((ROWS, COLS), dtype=bool)
    expected[3 - 1 : 30, 5 - 1 : 44] = False  # 1-based inclusive edges -> 0-based slices
    np.testing.assert_array_equal(hidden, expected)
    assert np.count_nonzero(~hidden) == (30 - 3 + 1) * (44 - 5 + 1)


def test_circle_keeps_the_pixels_within_the_radius() -> None:
    ds = _image(ShutterShape="CIRCULAR", CenterOfCircularShutter=[20, 25], RadiusOfCircularShutter=10)
    hidden = shutter_mask(ds)
    rows, cols = np.mgrid[1 : ROWS + 1, 1 : COLS + 1]
    np.testing.assert_array_equal(~hidden, (rows - 20) ** 2 + (cols - 25) ** 2 <= 100)
    assert not hidden[20 - 1, 25 - 1] and not hidden[20 - 1, 35 - 1] and hidden[20 - 1, 36 - 1]
    assert hidden[0, 0] and hidden[-1, -1]


def test_polygon_triangle_uses_row_column_vertices() -> None:
    # A right triangle with its right angle at row 5, column 5 and legs along the row and column.
    ds = _image(ShutterShape="POLYGONAL", VerticesOfThePolygonalShutter=[5, 5, 5, 35, 35, 5])
    hidden = shutter_mask(ds)
    rows, cols = np.mgrid[1 : ROWS + 1, 1 : COLS + 1]
    inside = (rows >= 5) & (cols >= 5) & ((rows - 5) + (cols - 5) <= 30)
    np.testing.assert_array_equal(~hidden, inside)
    assert not hidden[5 - 1, 35 - 1]  # a vertex: on the boundary counts as visible
    assert hidden[4 - 1, 10 - 1] and hidden[20 - 1, 30 - 1]


def test_several_shapes_hide_the_union_of_what_each_hides() -> None:
    ds = _image(
        ShutterShape=["RECTANGULAR", "CIRCULAR"],
        ShutterLeftVerticalEdge=1,
        ShutterRightVerticalEdge=25,
        ShutterUpperHorizontalEdge=1,
        ShutterLowerHorizontalEdge=40,
        CenterOfCircularShutter=[20, 25],
        RadiusOfCircularShutter=10,
    )
    hidden = shutter_mask(ds)
    rows, cols = np.mgrid[1 : ROWS + 1, 1 : COLS + 1]
    visible = (cols <= 25) & ((rows - 20) ** 2 + (cols - 25) ** 2 <= 100)
    np.testing.assert_array_equal(~hidden, visible)


def test_a_shutter_read_from_a_file_round_trip(tmp_path) -> None:
    ds = make_phantom(0, "normal", modality="DX").dataset
    ds.ShutterShape = "CIRCULAR"
    ds.CenterOfCircularShutter = [256, 240]
    ds.RadiusOfCircularShutter = 200
    ds.ShutterPresentationValue = 0
    path = tmp_path / "shuttered.dcm"
    ds.save_as(path, enforce_file_format=True)
    hidden = shutter_mask(pydicom.dcmread(path))
    assert hidden.shape == (512, 480)
    assert hidden[0, 0] and not hidden[255, 239]
    assert abs(np.count_nonzero(~hidden) - np.pi * 200**2) < 0.01 * np.pi * 200**2


@pytest.mark.parametrize(
    ("shutter", "message"),
    [
        ({"ShutterShape": "OVAL"}, "'OVAL'"),
        ({"ShutterShape": "RECTANGULAR", "ShutterLeftVerticalEdge": 1}, "ShutterRightVerticalEdge (0018,1604)"),
        ({"ShutterShape": "CIRCULAR", "CenterOfCircularShutter": [5, 5]}, "RadiusOfCircularShutter"),
        (
            {"ShutterShape": "CIRCULAR", "CenterOfCircularShutter": [5], "RadiusOfCircularShutter": 3},
            "must have 2 value(s), found 1",
        ),
        ({"ShutterShape": "POLYGONAL", "VerticesOfThePolygonalShutter": [1, 1, 5, 5]}, "at least three"),
        (
            {
                "ShutterShape": "RECTANGULAR",
                "ShutterLeftVerticalEdge": 30,
                "ShutterRightVerticalEdge": 10,
                "ShutterUpperHorizontalEdge": 1,
                "ShutterLowerHorizontalEdge": 5,
            },
            "left 30 > right 10",
        ),
    ],
)
def test_wrong_shutters_are_refused_naming_the_value(shutter: dict[str, object], message: str) -> None:
    with pytest.raises(DicomInputError) as caught:
        shutter_mask(_image(**shutter))
    assert message in str(caught.value) and "1.2.3.4" in str(caught.value)
