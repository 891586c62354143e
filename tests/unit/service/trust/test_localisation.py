"""Localisation scores against Quantus (PointingGame, RelevanceMassAccuracy) and scikit-image (Otsu,
disc dilation), the pointing game's 15-pixel tolerance, and what empty masks and flat maps give."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_dilation
from skimage.filters import threshold_otsu
from skimage.morphology import disk

from service.trust import TrustMetricError
from service.trust.localisation import (
    localisation_summary,
    otsu_iou,
    otsu_region,
    peak_in_mask,
    pointing_game,
    relevance_mass_accuracy,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:quantus", "ignore::RuntimeWarning:quantus")

SHAPE = (30, 40)


def random_case(count: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Signed smooth-ish maps and masks of random rectangles (never empty)."""
    rng = np.random.default_rng(seed)
    maps = rng.normal(size=(count, *SHAPE)) + rng.normal(size=(count, 6, 8)).repeat(5, axis=1).repeat(5, axis=2)
    masks = np.zeros((count, *SHAPE), dtype=bool)
    for mask in masks:
        top, left = rng.integers(0, 20), rng.integers(0, 28)
        mask[top : top + rng.integers(4, 11), left : left + rng.integers(4, 13)] = True
    for index in range(0, count, 3):  # a third of the maps peak inside their mask
        maps[index][masks[index]] += 10.0
    return maps, masks


def quantus_scores(quantus: ModuleType, metric: object, maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Quantus' per-sample scores on precomputed maps ``[B, 1, H, W]`` (no model needed)."""
    batch, labels = maps[:, None], np.zeros(len(maps), int)
    scores = metric(model=None, x_batch=np.zeros_like(batch), y_batch=labels, a_batch=batch, s_batch=masks[:, None])
    return np.asarray(scores, dtype=np.float64)


def test_hit_rate_equals_quantus_pointing_game_without_tolerance(quantus: ModuleType) -> None:
    maps, masks = random_case()
    ours = peak_in_mask(maps, masks)
    reference = quantus_scores(quantus, quantus.PointingGame(disable_warnings=True), maps, masks)
    assert 0 < ours.sum() < len(ours), "the case must hold hits and misses"
    np.testing.assert_array_equal(ours, reference.astype(bool))


def test_relevance_mass_accuracy_equals_quantus_on_non_negative_maps(quantus: ModuleType) -> None:
    maps, masks = random_case(seed=1)
    for non_negative in (np.abs(maps), np.clip(maps, 0, None)):
        reference = quantus_scores(quantus, quantus.RelevanceMassAccuracy(disable_warnings=True), non_negative, masks)
        np.testing.assert_allclose(relevance_mass_accuracy(non_negative, masks), reference, rtol=0, atol=1e-12)


def test_relevance_mass_accuracy_counts_positive_attribution_where_quantus_sums_signed_values(
    quantus: ModuleType,
) -> None:
    maps, masks = random_case(seed=2)
    metric = quantus.RelevanceMassAccuracy(disable_warnings=True)
    ours = relevance_mass_accuracy(maps, masks)
    np.testing.assert_allclose(ours, quantus_scores(quantus, metric, np.clip(maps, 0, None), masks), rtol=0, atol=1e-12)
    signed = quantus_scores(quantus, metric, maps, masks)
    assert ((ours >= 0) & (ours <= 1)).all()
    assert ((signed < 0) | (signed > 1)).any(), "Quantus' signed ratio leaves [0, 1] on these maps"


def test_empty_masks_are_refused_where_quantus_counts_a_hit(quantus: ModuleType) -> None:
    maps, masks = random_case(count=4, seed=3)
    masks[2] = False
    pointing = quantus_scores(quantus, quantus.PointingGame(disable_warnings=True), maps, masks)
    mass = quantus_scores(quantus, quantus.RelevanceMassAccuracy(disable_warnings=True), np.abs(maps), masks)
    assert pointing[2] == 1.0, "Quantus' PointingGame writes NaN into a bool array: a hit"
    assert np.isnan(mass[2])
    for score in (peak_in_mask, otsu_iou, relevance_mass_accuracy, pointing_game, localisation_summary):
        with pytest.raises(TrustMetricError, match=r"ground-truth masks \[2\] are empty"):
            score(maps, masks)


def test_a_flat_map_points_nowhere(quantus: ModuleType) -> None:
    maps, masks = random_case(count=3, seed=4)
    maps[1] = 0.0
    assert quantus_scores(quantus, quantus.PointingGame(disable_warnings=True), maps, masks)[1] == 1.0
    assert np.isnan(quantus_scores(quantus, quantus.RelevanceMassAccuracy(disable_warnings=True), maps, masks)[1])
    assert not peak_in_mask(maps, masks)[1]
    assert not pointing_game(maps, masks)[1]
    assert otsu_iou(maps, masks)[1] == 0.0
    assert relevance_mass_accuracy(maps, masks)[1] == 0.0
    assert relevance_mass_accuracy(-np.abs(maps), masks).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(("offset", "hit"), [(14, True), (15, True), (16, False)])
def test_pointing_game_tolerance_is_15_pixels(offset: int, hit: bool) -> None:
    mask = np.zeros((100, 100), dtype=bool)
    mask[40:60, 40:60] = True
    for row, col in ((50, 59 + offset), (50, 40 - offset), (59 + offset, 45), (40 - offset, 52)):
        saliency = np.zeros((100, 100))
        saliency[row, col] = 1.0
        assert pointing_game([saliency], [mask]).tolist() == [hit], (row, col)
        assert not peak_in_mask([saliency], [mask])[0]


def test_pointing_game_tolerance_is_euclidean_a_disc() -> None:
    mask = np.zeros((60, 60), dtype=bool)
    mask[:20, :20] = True
    corner = (19, 19)
    for step, hit in ((10, True), (11, False)):  # 10 * sqrt(2) = 14.1 px, 11 * sqrt(2) = 15.6 px
        saliency = np.zeros((60, 60))
        saliency[corner[0] + step, corner[1] + step] = 1.0
        assert pointing_game([saliency], [mask])[0] == hit, step


def test_pointing_game_equals_the_peak_inside_the_mask_dilated_by_a_disc_of_15() -> None:
    maps, masks = random_case(count=24, seed=5)
    dilated = [binary_dilation(mask, structure=disk(15)) for mask in masks]
    expected = [d[np.unravel_index(np.argmax(m), m.shape)] for m, d in zip(maps, dilated)]
    ours = pointing_game(maps, masks)
    np.testing.assert_array_equal(ours, expected)
    assert ours.sum() > peak_in_mask(maps, masks).sum(), "the tolerance must change some verdicts"
    np.testing.assert_array_equal(pointing_game(maps, masks, tolerance_px=0), peak_in_mask(maps, masks))


def test_iou_after_otsu_is_one_for_a_map_equal_to_the_mask() -> None:
    _, masks = random_case(count=4, seed=6)
    np.testing.assert_array_equal(otsu_iou(masks.astype(np.float32), masks), 1.0)
    np.testing.assert_array_equal(otsu_iou(3.0 * masks - 1.0, masks), 1.0)
    np.testing.assert_array_equal(otsu_iou(1.0 - masks, masks), 0.0)


def test_otsu_region_is_skimages_threshold_on_the_min_max_normalised_map() -> None:
    maps, masks = random_case(count=6, seed=7)
    expected_ious = []
    for saliency, mask in zip(maps, masks):
        normalised = (saliency - saliency.min()) / (saliency.max() - saliency.min())
        threshold = threshold_otsu(normalised)
        region, ours = otsu_region(saliency)
        assert ours == pytest.approx(threshold, abs=1e-12)
        np.testing.assert_array_equal(region, normalised > threshold)
        expected_ious.append((region & mask).sum() / (region | mask).sum())
        scaled_region, _ = otsu_region(5.0 * saliency + 2.0)
        np.testing.assert_array_equal(scaled_region, region)
    np.testing.assert_allclose(otsu_iou(maps, masks), expected_ious, rtol=0, atol=1e-12)


def test_iou_of_a_two_level_map_is_mask_over_region() -> None:
    mask = np.zeros(SHAPE, dtype=bool)
    mask[10:20, 10:20] = True
    saliency = np.zeros(SHAPE)
    saliency[5:25, 10:20] = 1.0  # twice the mask, covering it
    assert otsu_iou([saliency], [mask])[0] == pytest.approx(0.5)


def test_maps_of_different_source_grids_score_in_one_call() -> None:
    maps, masks = random_case(count=2, seed=8)
    wide_map, wide_mask = np.pad(maps[1], ((0, 0), (0, 8))), np.pad(masks[1], ((0, 0), (0, 8)))
    summary = localisation_summary([torch.from_numpy(maps[0]), wide_map], [masks[0], wide_mask])
    assert summary.images == 2
    one_by_one = [([maps[0]], [masks[0]]), ([wide_map], [wide_mask])]
    for field, score in (
        ("hit_rate", peak_in_mask),
        ("mean_iou", otsu_iou),
        ("relevance_mass_accuracy", relevance_mass_accuracy),
        ("pointing_game", pointing_game),
    ):
        expected = np.mean([score(m, k)[0] for m, k in one_by_one])
        assert getattr(summary, field) == pytest.approx(expected, abs=1e-12), field


def test_errors_name_what_was_found() -> None:
    maps, masks = random_case(count=2)
    with pytest.raises(TrustMetricError, match=r"map 1 has shape \(30, 40\) but its mask \(30, 39\).*GridMapping"):
        peak_in_mask(maps, [masks[0], masks[1][:, :-1]])
    with pytest.raises(TrustMetricError, match="one mask per map: 2 maps, 1 masks"):
        otsu_iou(maps, masks[:1])
    with pytest.raises(TrustMetricError, match=r"mask 0 must be boolean \(or 0/1\), got values \[0, 2\]"):
        relevance_mass_accuracy(maps, 2 * masks.astype(int))
    with pytest.raises(TrustMetricError, match="tolerance_px must be a finite number of pixels >= 0, got -1"):
        pointing_game(maps, masks, tolerance_px=-1)
