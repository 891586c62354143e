"""SSIM, Spearman and Pearson between maps against scikit-image, SciPy and NumPy; constant maps give no NaN."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity

from service.trust import TrustMetricError
from service.trust.similarity import normalise_min_max, pearson, spearman, ssim


def random_maps(count: int = 4, seed: int = 0, shape: tuple[int, int] = (24, 20)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = rng.normal(size=(count, shape[0] // 4, shape[1] // 4)).repeat(4, axis=1).repeat(4, axis=2)
    return smooth + 0.3 * rng.normal(size=(count, *shape))


def test_ssim_is_skimage_on_each_min_max_normalised_absolute_map() -> None:
    a, b = random_maps(seed=1), random_maps(seed=2)
    expected = []
    for x, y in zip(np.abs(a), np.abs(b)):
        x, y = (x - x.min()) / (x.max() - x.min()), (y - y.min()) / (y.max() - y.min())
        expected.append(structural_similarity(x, y, data_range=1.0))
    np.testing.assert_allclose(ssim(a, b), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ssim(torch.from_numpy(a).float(), b), expected, rtol=0, atol=1e-5)


def test_ssim_compares_absolute_maps_unless_told_to_keep_the_sign() -> None:
    a = random_maps(seed=3)
    np.testing.assert_allclose(ssim(a, -a), 1.0, atol=1e-12)
    assert ssim(a, -a, absolute=False).max() < 0.0


def test_spearman_is_scipys_rank_correlation_of_the_absolute_maps() -> None:
    a, b = random_maps(seed=4), random_maps(seed=5)
    b[:, :4] = np.round(b[:, :4])  # ties
    expected = [spearmanr(np.abs(x).ravel(), np.abs(y).ravel()).statistic for x, y in zip(a, b)]
    np.testing.assert_allclose(spearman(a, b), expected, rtol=0, atol=1e-12)
    signed = [spearmanr(x.ravel(), y.ravel()).statistic for x, y in zip(a, b)]
    np.testing.assert_allclose(spearman(a, b, absolute=False), signed, rtol=0, atol=1e-12)


def test_pearson_is_numpys_correlation_of_the_signed_maps() -> None:
    a, b = random_maps(seed=6), random_maps(seed=7)
    expected = [np.corrcoef(x.ravel(), y.ravel())[0, 1] for x, y in zip(a, b)]
    np.testing.assert_allclose(pearson(a, b), expected, rtol=0, atol=1e-12)


def test_identical_and_rescaled_maps_are_fully_similar() -> None:
    a = random_maps(seed=8)
    rescaled = 3.0 * a
    np.testing.assert_allclose(ssim(a, rescaled), 1.0, atol=1e-12)
    np.testing.assert_allclose(spearman(a, rescaled), 1.0, atol=1e-12)
    np.testing.assert_allclose(pearson(a, rescaled + 5.0), 1.0, atol=1e-12)


def test_constant_maps_give_zero_against_structure_and_one_against_each_other() -> None:
    a = random_maps(count=2, seed=9)
    zero = np.zeros_like(a)
    for measure in (ssim, spearman, pearson):
        assert measure(a, zero).tolist() == [0.0, 0.0], measure.__name__
        assert measure(zero, np.full_like(a, 2.0)).tolist() == [1.0, 1.0], measure.__name__
    assert normalise_min_max(np.full((1, 8, 8), 7.0)).max() == 0.0


def test_errors_name_what_was_found() -> None:
    a = random_maps(count=2)
    with pytest.raises(TrustMetricError, match=r"same shape, got \(2, 24, 20\) and \(3, 24, 20\)"):
        ssim(a, random_maps(count=3))
    bad = a.copy()
    bad[1, 0, 0] = np.nan
    with pytest.raises(TrustMetricError, match=r"first maps\[1\] has 1 non-finite"):
        spearman(bad, a)
    with pytest.raises(TrustMetricError, match=r"must be a batch \[B, H, W\], got shape \(24, 20\)"):
        pearson(a[0], a[0])
    with pytest.raises(TrustMetricError, match="at least 7 x 7"):
        ssim(np.ones((1, 5, 9)), np.ones((1, 5, 9)))
