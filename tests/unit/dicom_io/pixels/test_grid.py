"""dicom_io.pixels.grid: letterbox and stretch onto the model grid and back, against analytic positions."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_io.pixels import GridMapping, prepare_frames, read_dataset
from tests.helpers import data_file
from tests.unit.dicom_io.pixels.pixel_cases import SPEC, content_mask


def smooth_field(shape: tuple[int, int], periods: float = 2.0) -> np.ndarray:
    rows, cols = shape
    y = (np.arange(rows) + 0.5) / rows
    x = (np.arange(cols) + 0.5) / cols
    return (
        0.5
        + 0.25 * np.sin(2 * np.pi * periods * y)[:, None] * np.cos(2 * np.pi * periods * 0.7 * x)[None, :]
        + 0.2 * x[None, :]
    ).astype(np.float32)


def test_letterbox_geometry_is_centred_and_padded_with_zero():
    mapping = GridMapping.for_shapes((300, 500), (224, 224), "letterbox")
    top, left, height, width = mapping.content_box
    assert width == 224.0 and left == 0.0
    assert height == pytest.approx(300 * 224 / 500)
    assert top == pytest.approx((224 - height) / 2)
    out = mapping.to_model_grid(np.ones((300, 500), dtype=np.float32))
    assert out.dtype == np.float32 and out.shape == (224, 224)
    mask = content_mask(mapping)
    assert np.all(out[~mask] == 0.0)
    np.testing.assert_allclose(out[mask], 1.0, atol=1e-6)
    filled = np.flatnonzero(out[:, 112] > 0)
    assert filled[0] == 224 - 1 - filled[-1]  # centred: same padding above and below
    assert filled[0] > 40


def test_stretch_geometry_fills_the_grid():
    mapping = GridMapping.for_shapes((300, 500), (224, 224), "stretch")
    assert mapping.content_box == (0.0, 0.0, 224.0, 224.0)
    np.testing.assert_allclose(mapping.to_model_grid(np.ones((300, 500))), 1.0, atol=1e-6)


@pytest.mark.parametrize("aspect", ["letterbox", "stretch"])
@pytest.mark.parametrize("source", [(300, 500), (1955, 1841), (40, 90)])
def test_round_trip_source_model_source(aspect, source):
    mapping = GridMapping.for_shapes(source, (224, 224), aspect)
    field = smooth_field(source)
    back = mapping.to_source_grid(mapping.to_model_grid(field))
    assert back.dtype == np.float32 and back.shape == source
    assert np.corrcoef(field.ravel(), back.ravel())[0, 1] > 0.999
    assert np.abs(field - back).mean() < 0.005
    # the border rows and columns come back too (not blended with the letterbox padding)
    for edge in (back[0], back[-1], back[:, 0], back[:, -1]):
        assert edge.min() > 0.2
    assert np.abs(field - back).max() < 0.05


@pytest.mark.parametrize("source", [(300, 500), (40, 90), (1955, 1841)])
def test_round_trip_model_source_model(source):
    mapping = GridMapping.for_shapes(source, (224, 224), "letterbox")
    smooth = smooth_field((224, 224), periods=1.5)
    again = mapping.to_model_grid(mapping.to_source_grid(smooth))
    mask = content_mask(mapping)
    # away from the content edge (where the map is cut off), the map comes back
    inner = mask & np.roll(mask, 2, 0) & np.roll(mask, -2, 0) & np.roll(mask, 2, 1) & np.roll(mask, -2, 1)
    assert np.corrcoef(smooth[inner], again[inner])[0, 1] > 0.99
    assert np.abs(smooth[inner] - again[inner]).mean() < 0.01
    assert np.all(again[~mask] == 0.0)


@pytest.mark.parametrize("source", [(300, 500), (40, 90), (1955, 1841)])
@pytest.mark.parametrize("point", [(100, 120), (70, 30), (150, 200)])
def test_model_point_lands_on_the_analytic_source_position(source, point):
    mapping = GridMapping.for_shapes(source, (224, 224), "letterbox")
    top, left, height, width = mapping.content_box
    y, x = point
    if not content_mask(mapping)[y, x]:
        pytest.skip("point in the padding for this source shape")
    delta = np.zeros((224, 224), dtype=np.float32)
    delta[y, x] = 1.0
    on_source = mapping.to_source_grid(delta)
    peak = np.unravel_index(np.argmax(on_source), on_source.shape)
    # centre of model pixel (y + 0.5) -> continuous source coordinate -> pixel index
    expected_y = (y + 0.5 - top) * source[0] / height - 0.5
    expected_x = (x + 0.5 - left) * source[1] / width - 0.5
    assert abs(peak[0] - expected_y) <= 1.0 and abs(peak[1] - expected_x) <= 1.0
    assert on_source.max() > 0


def test_source_point_lands_on_the_analytic_model_position():
    source = (60, 90)
    mapping = GridMapping.for_shapes(source, (224, 224), "letterbox")
    top, left, height, width = mapping.content_box
    image = np.zeros(source, dtype=np.float32)
    image[20, 70] = 1.0
    on_model = mapping.to_model_grid(image)
    peak = np.unravel_index(np.argmax(on_model), on_model.shape)
    expected_y = top + (20 + 0.5) * height / source[0] - 0.5
    expected_x = left + (70 + 0.5) * width / source[1] - 0.5
    assert abs(peak[0] - expected_y) <= 1.0 and abs(peak[1] - expected_x) <= 1.0


def test_mapping_rejects_wrong_shapes():
    mapping = GridMapping.for_shapes((30, 40), (16, 16))
    with pytest.raises(ValueError, match=r"\(30, 40\)"):
        mapping.to_model_grid(np.zeros((40, 30)))
    with pytest.raises(ValueError, match=r"\(16, 16\)"):
        mapping.to_source_grid(np.zeros((30, 40)))


def test_prepared_model_input_follows_the_mapping():
    ds = read_dataset(data_file("US1_UNCR.dcm"))  # 480 x 640: letterboxed top and bottom
    frame = prepare_frames(ds, SPEC)[0]
    np.testing.assert_allclose(frame.model_input[0], frame.mapping.to_model_grid(frame.display), atol=1e-6)
    assert frame.mapping.content_box[0] == pytest.approx(28.0)
    assert np.all(frame.model_input[:, :27, :] == 0) and np.all(frame.model_input[:, 197:, :] == 0)
