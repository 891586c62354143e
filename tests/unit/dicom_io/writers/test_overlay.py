"""The burned-in overlay: heat colour where the map is high, untouched anatomy where it is zero,
a colour bar with its scale, and readable text."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dicom_io.writers.overlay import INFERNO_LUT, positive_scale, render_overlay, save_png

ROWS, COLS = 200, 160
LINES = ["XAI: gradcam", "class: nodule  p=0.870", "model: demo 1.2.0"]


def _display(rows: int = ROWS, cols: int = COLS) -> np.ndarray:
    """A smooth gray ramp with some texture, values in [0, 1]."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    image = 0.2 + 0.6 * xx / cols + 0.1 * np.sin(yy / 7.0)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _blob(rows: int = ROWS, cols: int = COLS, centre: tuple[float, float] = (0.7, 0.65)) -> np.ndarray:
    """A signed map: a positive Gaussian blob low right, a negative one low left, zero elsewhere."""
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    sigma = 0.06 * min(rows, cols)
    pos = np.exp(-((yy - centre[0] * rows) ** 2 + (xx - centre[1] * cols) ** 2) / (2 * sigma**2))
    neg = np.exp(-((yy - 0.7 * rows) ** 2 + (xx - 0.2 * cols) ** 2) / (2 * sigma**2))
    attribution = 3.0 * pos - 2.0 * neg
    attribution[np.abs(attribution) < 1e-3] = 0.0
    return attribution.astype(np.float32)


def _gray_u8(display: np.ndarray) -> np.ndarray:
    return np.round(np.clip(display, 0, 1) * 255).astype(np.uint8)


def _chroma(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel max - min over the channels: 0 for gray, large for saturated colour."""
    rgb = rgb.astype(np.int16)
    return rgb.max(axis=-1) - rgb.min(axis=-1)


@pytest.fixture(scope="module")
def rendered() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    display, attribution = _display(), _blob()
    return display, attribution, render_overlay(display, attribution, title_lines=LINES)


def test_shape_and_type(rendered: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    _, _, rgb = rendered
    assert rgb.dtype == np.uint8
    assert rgb.ndim == 3 and rgb.shape[2] == 3
    assert rgb.shape[0] == ROWS
    assert rgb.shape[1] > COLS  # the colour bar strip is appended on the right


def test_high_attribution_is_coloured(rendered: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    display, attribution, rgb = rendered
    high = attribution >= 0.8 * attribution.max()
    image = rgb[:, :COLS]
    assert high.sum() > 20
    coloured = _chroma(image[high]) > 20
    assert coloured.mean() > 0.95
    gray = _gray_u8(display)
    assert np.any(image[high] != gray[high][:, None])


def test_zero_and_negative_attribution_leave_the_anatomy_untouched(
    rendered: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    display, attribution, rgb = rendered
    lower = np.zeros_like(attribution, dtype=bool)
    lower[ROWS // 2 :, :] = True  # the text block sits in the top-left corner
    untouched = lower & (attribution <= 0)
    assert untouched.sum() > 1000
    assert (attribution[lower] < 0).any()  # the negative blob is part of the checked area
    image = rgb[:, :COLS]
    expected = _gray_u8(display)[untouched]
    for channel in range(3):
        np.testing.assert_array_equal(image[untouched][:, channel], expected)


def test_colour_bar_runs_from_dark_to_bright(rendered: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    _, _, rgb = rendered
    strip = rgb[:, COLS:]
    column_chroma = (_chroma(strip) > 30).sum(axis=0)
    bar_column = int(np.argmax(column_chroma))
    assert column_chroma[bar_column] > 0.5 * ROWS  # a tall coloured bar
    bar = strip[:, bar_column].astype(int)
    rows = np.flatnonzero(_chroma(strip[:, bar_column]) > 30)
    top, bottom = bar[rows[0]], bar[rows[-1]]
    assert top.sum() > bottom.sum() + 300  # bright (high values) at the top
    # the brightest entry of the colour table appears near the top of the bar
    assert np.abs(bar[rows[0] : rows[0] + 5] - INFERNO_LUT[-1].astype(int)).sum(axis=1).min() < 40


def test_scale_labels_follow_the_raw_values() -> None:
    display, attribution = _display(), _blob()
    small = render_overlay(display, attribution, title_lines=LINES)
    large = render_overlay(display, attribution * 1000.0, title_lines=LINES)
    # Same picture (colours are relative to the scale) ...
    np.testing.assert_array_equal(small[:, :COLS], large[:, :COLS])
    # ... but the bar labels differ, as they are in the map's raw units.
    assert np.any(small[:, COLS:] != large[:, COLS:])
    assert positive_scale(attribution * 1000.0) == pytest.approx(1000.0 * positive_scale(attribution), rel=1e-5)


def test_text_is_drawn_in_the_top_left_corner() -> None:
    display, attribution = _display(), _blob()
    with_text = render_overlay(display, attribution, title_lines=LINES)
    without = render_overlay(display, attribution, title_lines=[], disclaimer=None)
    changed = np.any(with_text[:, :COLS] != without[:, :COLS], axis=-1)
    rows, cols = np.nonzero(changed)
    assert changed.sum() > 200
    assert rows.max() < ROWS // 2 and cols.min() < COLS // 4
    # the disclaimer is amber: strongly coloured pixels appear in the text block
    assert (_chroma(with_text[: ROWS // 2, :COLS][changed[: ROWS // 2]]) > 100).sum() > 20


def test_disclaimer_is_always_added() -> None:
    display, attribution = _display(), _blob()
    default = render_overlay(display, attribution, title_lines=[])
    explicit = render_overlay(display, attribution, title_lines=["NOT FOR DIAGNOSTIC USE"])
    bare = render_overlay(display, attribution, title_lines=[], disclaimer=None)
    np.testing.assert_array_equal(default, explicit)
    assert np.any(default != bare)


def _text_height(rows: int, cols: int) -> int:
    display, attribution = _display(rows, cols), np.zeros((rows, cols), np.float32)
    with_text = render_overlay(display, attribution, title_lines=LINES)
    without = render_overlay(display, attribution, title_lines=[], disclaimer=None)
    changed_rows = np.flatnonzero(np.any(with_text[:, :cols] != without[:, :cols], axis=(1, 2)))
    return int(changed_rows.max() - changed_rows.min() + 1)


def test_text_scales_with_the_image() -> None:
    small, large = _text_height(128, 128), _text_height(1600, 1500)
    assert 20 < small <= 64  # readable on a 128² CT without covering it
    assert large > 3 * small  # and grows on a radiograph


def test_tiny_image_keeps_text_out_of_the_colour_bar() -> None:
    display, attribution = _display(64, 64), _blob(64, 64)
    with_text = render_overlay(display, attribution, title_lines=LINES)
    without = render_overlay(display, attribution, title_lines=[], disclaimer=None)
    assert with_text.shape == without.shape
    np.testing.assert_array_equal(with_text[:, 64:], without[:, 64:])


@pytest.mark.parametrize(
    "attribution",
    [np.zeros((ROWS, COLS), np.float32), np.full((ROWS, COLS), 0.5, np.float32), -np.ones((ROWS, COLS), np.float32)],
    ids=["zero", "flat-positive", "all-negative"],
)
def test_flat_maps_do_not_crash(attribution: np.ndarray) -> None:
    display = _display()
    rgb = render_overlay(display, attribution, title_lines=LINES)
    lower = rgb[ROWS // 2 :, :COLS]
    if attribution.max() <= 0:
        np.testing.assert_array_equal(lower[..., 0], _gray_u8(display)[ROWS // 2 :])
    else:  # a uniform positive map tints everything uniformly
        assert (_chroma(lower) > 20).mean() > 0.9


@pytest.mark.parametrize(
    ("display", "attribution", "message"),
    [
        (np.full((8, 8), 0.5, np.float32), np.full((8, 8), np.nan, np.float32), "non-finite"),
        (np.full((8, 8), 2.0, np.float32), np.zeros((8, 8), np.float32), r"\[0, 1\]"),
        (np.full((8, 8), 0.5, np.float32), np.zeros((8, 9), np.float32), r"\(8, 9\)"),
        (np.full((8,), 0.5, np.float32), np.zeros((8,), np.float32), "2-D"),
    ],
)
def test_bad_inputs_are_refused(display: np.ndarray, attribution: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render_overlay(display, attribution, title_lines=LINES)


def test_save_png_round_trip(rendered: tuple[np.ndarray, np.ndarray, np.ndarray], tmp_path) -> None:
    _, _, rgb = rendered
    path = tmp_path / "overlay.png"
    save_png(rgb, path)
    with Image.open(path) as image:
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), rgb)
    with pytest.raises(ValueError, match="float64"):
        save_png(rgb.astype(np.float64), tmp_path / "bad.png")
