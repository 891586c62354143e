"""service.trust.shortcut: the region outside the anatomy, the share and concentration of positive
attribution in it, the flag and the thresholds from honest data. Phantoms give the ground truth:
the lesion mask is anatomy, the PORTABLE token and the lead "R" marker are not."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_io.pixels import prepare_frames
from service.inference.card import ModelCard
from service.models import demo_card_path
from service.synthetic.phantoms import make_phantom
from service.trust.shortcut import (
    EDGE_BAND_FRACTION,
    OutsideAnatomy,
    ShortcutFigures,
    ShortcutThresholds,
    is_shortcut_suspected,
    outside_anatomy,
    shortcut_figures,
    thresholds_from_honest,
)
from tests.helpers import HELD_OUT_SEED

SPEC = ModelCard.load(demo_card_path()).input.spec()


def _display(**phantom_args: object) -> tuple[np.ndarray, object]:
    phantom = make_phantom(**{"index": 3, "label": "nodule", "seed": HELD_OUT_SEED, **phantom_args})
    return prepare_frames(phantom.dataset, SPEC)[0].display, phantom


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_burned_in_token_and_marker_are_outside_the_anatomy_the_lesion_is_not(photometric: str) -> None:
    display, phantom = _display(token=True, photometric=photometric)
    region = outside_anatomy(display)
    assert region.burned_in[phantom.token_mask].all(), "every pixel of the PORTABLE token is burned-in text"
    rows, cols = display.shape
    marker = display[: rows // 6, : cols // 6] > 0.9  # the lead "R" sits in the top-left corner
    assert marker.sum() > 50 and region.burned_in[: rows // 6, : cols // 6][marker].all()
    assert not region.region[phantom.lesion_mask].any(), "the nodule lies inside the anatomy"
    # Burned-in text is small: the token and the marker with a little dilation, nothing in the chest.
    assert region.burned_in.mean() < 0.03
    assert not region.burned_in[rows // 4 : 3 * rows // 4, cols // 4 : 3 * cols // 4].any()


def test_the_lungs_are_inside_the_body_the_air_corners_are_not() -> None:
    display, phantom = _display(label="effusion")
    region = outside_anatomy(display)
    rows, cols = display.shape
    assert region.outside_body[rows - 3, 2] and region.outside_body[rows - 3, cols - 3], "air in the bottom corners"
    dark_inside = (display < 0.1) & ~region.edge_band
    dark_inside[: rows // 10] = False
    # The dark lung fields (darker than 0.1 like the air) are body, away from the air corners.
    lungs = dark_inside[rows // 5 : 4 * rows // 5, cols // 8 : 7 * cols // 8]
    assert lungs.mean() > 0.2
    assert not region.outside_body[rows // 5 : 4 * rows // 5, cols // 8 : 7 * cols // 8][lungs].any()
    assert not region.outside_body[phantom.lesion_mask].any()


def test_edge_band_is_the_outer_fraction_of_each_side_and_parts_are_kept_apart() -> None:
    display, _ = _display(cols=480)
    region = outside_anatomy(display)
    rows, cols = display.shape
    down, across = round(EDGE_BAND_FRACTION * rows), round(EDGE_BAND_FRACTION * cols)
    inner = np.zeros((rows, cols), dtype=bool)
    inner[down : rows - down, across : cols - across] = True
    np.testing.assert_array_equal(region.edge_band, ~inner)
    np.testing.assert_array_equal(
        region.region, region.outside_body | region.edge_band | region.burned_in | region.shutter
    )
    assert not region.shutter.any()
    wider = outside_anatomy(display, edge_band=0.2)
    assert wider.edge_band.mean() > region.edge_band.mean() and wider.area_fraction > region.area_fraction


def test_the_shutter_is_part_of_the_region() -> None:
    display, _ = _display()
    shutter = np.zeros(display.shape, dtype=bool)
    shutter[:, 300:] = True
    region = outside_anatomy(display, shutter)
    np.testing.assert_array_equal(region.shutter, shutter)
    assert region.region[:, 300:].all()
    with pytest.raises(ValueError, match=r"bool array of the display's shape \(512, 480\), got float64"):
        outside_anatomy(display, shutter.astype(float))


def test_a_flat_frame_has_no_body_to_find() -> None:
    region = outside_anatomy(np.full((200, 300), 0.4, dtype=np.float32))
    assert not region.outside_body.any() and not region.burned_in.any()
    assert region.area_fraction == pytest.approx(region.edge_band.mean())


def test_large_frames_give_masks_on_their_own_grid() -> None:
    display, _ = _display(rows=1200, cols=1100, token=True)
    region = outside_anatomy(display)
    assert region.region.shape == (1200, 1100) and region.burned_in.any()


def _region(rows: int = 100, cols: int = 100) -> np.ndarray:
    mask = np.zeros((rows, cols), dtype=bool)
    mask[:20] = True  # 20 % of the frame
    return mask


def test_share_and_concentration_follow_their_definitions() -> None:
    region = _region()
    attribution = np.zeros((100, 100), dtype=np.float32)
    attribution[:20] = 3.0  # inside R: 20 rows x 100 x 3 = 6000
    attribution[50:60] = 1.0  # outside R: 1000
    attribution[70:80] = -50.0  # negative attribution does not count
    figures = shortcut_figures(attribution, region)
    assert figures.share == pytest.approx(6000 / 7000)
    assert figures.area_fraction == pytest.approx(0.2)
    assert figures.concentration == pytest.approx((6000 / 7000) / 0.2)
    assert figures.share_percent == pytest.approx(100 * 6000 / 7000)


def test_uniform_attribution_has_concentration_one() -> None:
    figures = shortcut_figures(np.full((100, 100), 0.7), _region())
    assert figures.share == pytest.approx(0.2) and figures.concentration == pytest.approx(1.0)


def test_no_positive_attribution_gives_zero() -> None:
    figures = shortcut_figures(-np.ones((100, 100)), _region())
    assert (figures.share, figures.concentration) == (0.0, 0.0)
    empty = shortcut_figures(np.ones((100, 100)), np.zeros((100, 100), dtype=bool))
    assert (empty.share, empty.area_fraction, empty.concentration) == (0.0, 0.0, 0.0)


def test_figures_accept_the_region_object() -> None:
    display, _ = _display()
    region = outside_anatomy(display)
    attribution = region.region.astype(np.float32)
    assert isinstance(region, OutsideAnatomy)
    assert shortcut_figures(attribution, region).share == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("attribution", "region", "message"),
    [
        (np.ones(10), _region(), "2-D array"),
        (np.ones((100, 100)), _region(50, 50), r"region must be a bool array of the attribution's shape \(100, 100\)"),
        (np.ones((100, 100)), _region().astype(int), "got int"),
        (np.full((100, 100), np.nan), _region(), "10000 non-finite"),
    ],
)
def test_wrong_inputs_are_refused(attribution: np.ndarray, region: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        shortcut_figures(attribution, region)


def test_flag_needs_both_thresholds() -> None:
    thresholds = ShortcutThresholds(share=0.55, concentration=1.8)
    assert is_shortcut_suspected(ShortcutFigures(0.8, 0.3, 0.8 / 0.3), thresholds)
    assert not is_shortcut_suspected(ShortcutFigures(0.8, 0.5, 1.6), thresholds), "high share over a large region"
    assert not is_shortcut_suspected(ShortcutFigures(0.5, 0.1, 5.0), thresholds), "concentrated but a minor share"
    assert is_shortcut_suspected(ShortcutFigures(0.55, 0.3, 1.8), thresholds), "the thresholds themselves flag"


@pytest.mark.parametrize(("share", "concentration"), [(1.2, 1.0), (-0.1, 1.0), (0.5, -1.0), (float("nan"), 1.0)])
def test_thresholds_are_checked(share: float, concentration: float) -> None:
    with pytest.raises(ValueError, match="shortcut"):
        ShortcutThresholds(share=share, concentration=concentration)


def test_thresholds_from_honest_are_percentiles_of_each_figure() -> None:
    shares = np.linspace(0.1, 0.5, 101)
    figures = [ShortcutFigures(s, 0.25, s / 0.25) for s in shares]
    thresholds = thresholds_from_honest(figures)
    assert thresholds.share == pytest.approx(np.percentile(shares, 99))
    assert thresholds.concentration == pytest.approx(np.percentile(shares / 0.25, 99))
    flagged = sum(is_shortcut_suspected(f, thresholds) for f in figures)
    assert flagged == 2  # the values at and above the 99th percentile of 101 evenly spaced ones
    assert thresholds_from_honest(figures, percentile=50).share == pytest.approx(0.3)
    with pytest.raises(ValueError, match="got none"):
        thresholds_from_honest([])
    with pytest.raises(ValueError, match="percentile must be in"):
        thresholds_from_honest(figures, percentile=0)
