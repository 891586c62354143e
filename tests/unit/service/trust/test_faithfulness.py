"""Deletion and insertion against Quantus' PixelFlipping and by construction; ROAD against
pytorch-grad-cam's ROAD (imputation, MoRF, LeRF, combined); runners, chunks and batches agree."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

from service.trust import TrustMetricError
from service.trust.faithfulness import (
    ROAD_PERCENTAGES,
    deletion,
    deletion_curve,
    gaussian_blur,
    insertion,
    insertion_curve,
    noisy_linear_imputation,
    road,
)
from tests.helpers import grad_cam_module
from tests.unit.service.explain.explainer_models import ModuleRunner
from tests.unit.service.trust.conftest import SIZE, RegionModel, blob_images, region_images, small_net

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning:quantus",
    "ignore::DeprecationWarning:pytorch_grad_cam",
    # pytorch-grad-cam's imputer calls numpy functions on torch tensors (NumPy 2's __array_wrap__ protocol)
    "ignore:__array_wrap__ must accept context:DeprecationWarning",
)

TARGETS = [0, 1, 2, 1]


def probabilities(model: nn.Module, inputs: torch.Tensor, targets: list[int]) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(model(inputs).double(), dim=1)[torch.arange(len(targets)), targets].numpy()


def gradient_maps(model: nn.Module, inputs: torch.Tensor, targets: list[int]) -> np.ndarray:
    """|d target logit / d input|: maps with the structure ROAD and deletion are meant for."""
    leaf = inputs.clone().requires_grad_(True)
    model(leaf).gather(1, torch.tensor(targets)[:, None]).sum().backward()
    return leaf.grad.abs()[:, 0].numpy()


def region_map(first: bool) -> np.ndarray:
    """A tie-free map that ranks the region first (``first``) or last."""
    saliency = np.random.default_rng(6).random((SIZE, SIZE))
    saliency[12:16, 12:16] += 10.0 if first else -10.0
    return saliency


# --- deletion and insertion -------------------------------------------------------------------------


@pytest.mark.parametrize(("step", "baseline"), [(16, 0.0), (64, -0.5)])
def test_deletion_curve_equals_quantus_pixel_flipping(quantus: ModuleType, step: int, baseline: float) -> None:
    model, x = small_net(), blob_images()
    maps = np.random.default_rng(1).normal(size=(4, SIZE, SIZE))
    metric = quantus.PixelFlipping(features_in_step=step, perturb_baseline=baseline, disable_warnings=True)
    reference = np.array(metric(model=model, x_batch=x.numpy(), y_batch=np.array(TARGETS), a_batch=maps, device="cpu"))
    curve = deletion_curve(model, x, maps, TARGETS, pixels_per_step=step, baseline=baseline)
    assert curve.probabilities.shape == (4, 1 + -(-SIZE * SIZE // step))
    assert np.ptp(reference) > 0.05, "the curve must move for the comparison to mean something"
    np.testing.assert_allclose(curve.probabilities[:, 1:], reference, rtol=0, atol=1e-5)


def test_deletion_curve_runs_from_the_image_to_the_baseline() -> None:
    model, x = small_net(), blob_images()
    maps = np.random.default_rng(2).normal(size=(4, SIZE, SIZE))
    curve = deletion_curve(model, x, maps, TARGETS, baseline=0.25)
    assert curve.fractions[0] == 0.0 and curve.fractions[-1] == 1.0
    assert np.all(np.diff(curve.fractions) > 0)
    np.testing.assert_allclose(curve.probabilities[:, 0], probabilities(model, x, TARGETS), atol=1e-6)
    np.testing.assert_allclose(
        curve.probabilities[:, -1], probabilities(model, torch.full_like(x, 0.25), TARGETS), atol=1e-6
    )
    np.testing.assert_allclose(curve.auc, np.trapezoid(curve.probabilities, curve.fractions, axis=1))
    blurred = deletion_curve(model, x, maps, TARGETS, baseline="blur")
    np.testing.assert_allclose(blurred.probabilities[:, -1], probabilities(model, gaussian_blur(x), TARGETS), atol=1e-6)


def test_insertion_curve_runs_from_the_blurred_image_to_the_image() -> None:
    model, x = small_net(), blob_images()
    maps = np.random.default_rng(3).normal(size=(4, SIZE, SIZE))
    curve = insertion_curve(model, x, maps, TARGETS, pixels_per_step=64)
    assert len(curve.fractions) == 17
    np.testing.assert_allclose(curve.probabilities[:, 0], probabilities(model, gaussian_blur(x), TARGETS), atol=1e-6)
    np.testing.assert_allclose(curve.probabilities[:, -1], probabilities(model, x, TARGETS), atol=1e-6)


def test_gaussian_blur_equals_scipy_with_mirrored_borders() -> None:
    x = blob_images(count=2)
    x = torch.cat([x, -x], dim=1)  # two channels, blurred separately
    for sigma in (5.0, 2.5):
        radius = int(np.ceil(sigma))
        expected = np.stack(
            [[gaussian_filter(c, sigma, mode="mirror", truncate=radius / sigma) for c in image] for image in x.numpy()]
        )
        np.testing.assert_allclose(gaussian_blur(x, sigma).numpy(), expected, rtol=0, atol=1e-5)


def test_a_faithful_map_beats_a_random_order_and_an_inverted_map_loses() -> None:
    model, x = RegionModel(), region_images()
    faithful = np.stack([region_map(first=True)] * 2)
    inverted = np.stack([region_map(first=False)] * 2)
    assert (deletion(model, x, faithful, [0, 0]).ratio < 0.5).all()
    assert (deletion(model, x, inverted, [0, 0]).ratio > 1.1).all()
    assert (insertion(model, x, faithful, [0, 0]).ratio > 1.1).all()
    assert (insertion(model, x, inverted, [0, 0]).ratio < 0.8).all()


def test_random_order_is_seeded_and_shared_by_the_samples() -> None:
    model, x = small_net(), blob_images()
    maps = np.random.default_rng(4).normal(size=(4, SIZE, SIZE))
    first, again = deletion(model, x, maps, TARGETS, seed=3), deletion(model, x, maps, TARGETS, seed=3)
    np.testing.assert_array_equal(first.random_curve.probabilities, again.random_curve.probabilities)
    other = deletion(model, x, maps, TARGETS, seed=4)
    assert not np.allclose(first.random_auc, other.random_auc)
    np.testing.assert_array_equal(first.auc, other.auc)
    for sample in range(4):  # a batch equals its single runs
        single = deletion(
            model, x[sample : sample + 1], maps[sample : sample + 1], TARGETS[sample : sample + 1], seed=3
        )
        np.testing.assert_allclose(single.curve.probabilities[0], first.curve.probabilities[sample], atol=1e-6)
        np.testing.assert_allclose(single.random_auc[0], first.random_auc[sample], atol=1e-6)


def test_a_runner_in_chunks_gives_the_modules_curve() -> None:
    model, x = small_net(), blob_images()
    maps = torch.from_numpy(np.random.default_rng(5).normal(size=(4, SIZE, SIZE)))
    runner = ModuleRunner(model)
    through_runner = insertion_curve(runner, x, maps, TARGETS, pixels_per_step=128, chunk_size=7)
    assert max(runner.calls) == 7 and sum(runner.calls) == 4 * 9
    through_module = insertion_curve(model, x, maps, TARGETS, pixels_per_step=128)
    np.testing.assert_allclose(through_runner.probabilities, through_module.probabilities, atol=1e-6)


def test_faithfulness_errors_name_what_was_found() -> None:
    model, x = small_net(), blob_images()
    maps = np.zeros((4, SIZE, SIZE))
    with pytest.raises(TrustMetricError, match=r"maps must be \[B, H, W\] = \(4, 32, 32\).*got \(4, 32, 31\)"):
        deletion_curve(model, x, maps[..., :-1], TARGETS)
    with pytest.raises(TrustMetricError, match=r"pixels_per_step must be an integer in 1..1024, got 0"):
        deletion_curve(model, x, maps, TARGETS, pixels_per_step=0)
    with pytest.raises(TrustMetricError, match="baseline must be a finite number .* or 'blur', got 'black'"):
        deletion_curve(model, x, maps, TARGETS, baseline="black")  # type: ignore[arg-type]
    with pytest.raises(TrustMetricError, match=r"targets \[5\] out of range for a model with 3 classes"):
        insertion_curve(model, x, maps, [0, 1, 5, 1])
    with pytest.raises(TrustMetricError, match=r"percentages must be integers in 1..99, got \[10, 100\]"):
        road(model, x, maps, TARGETS, percentages=[10, 100])


# --- ROAD ------------------------------------------------------------------------------------------------


def test_noisy_linear_imputation_equals_pytorch_grad_cams_without_noise() -> None:
    grad_cam_module()
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    rng = np.random.default_rng(7)
    image = rng.normal(size=(3, 20, 24)).astype(np.float32)
    for kept_share in (0.1, 0.5, 0.9):
        keep = rng.random((20, 24)) < kept_share
        reference = NoisyLinearImputer(noise=0.0)(torch.from_numpy(image), torch.from_numpy(keep.astype(np.float32)))
        ours = noisy_linear_imputation(image, keep, noise_std=0.0)
        np.testing.assert_allclose(ours, reference.numpy(), rtol=0, atol=1e-5)


def test_imputed_pixels_are_their_neighbours_weighted_mean_plus_noise() -> None:
    rng = np.random.default_rng(8)
    image = rng.normal(size=(1, 16, 16))
    keep = rng.random((16, 16)) < 0.6
    filled = noisy_linear_imputation(image, keep, noise_std=0.0)
    np.testing.assert_array_equal(filled[:, keep], image[:, keep])
    weights = np.pad(np.array([[1, 2, 1], [2, 0, 2], [1, 2, 1]]) / 12, 1)  # zero weight beyond the image
    padded = np.pad(filled[0], 2)
    inside = np.pad(np.ones((16, 16)), 2)
    for row, col in zip(*np.nonzero(~keep)):
        window = (slice(row, row + 5), slice(col, col + 5))
        w = weights * inside[window]
        assert filled[0, row, col] == pytest.approx((w * padded[window]).sum() / w.sum(), abs=1e-9)
    noisy = noisy_linear_imputation(image, keep, noise_std=0.01, rng=np.random.default_rng(0))
    assert np.std(noisy - filled) * np.sqrt(keep.size / (~keep).sum()) == pytest.approx(0.01, rel=0.2)


def test_road_matches_pytorch_grad_cam_within_0_02() -> None:
    grad_cam_module()
    from pytorch_grad_cam.metrics.road import ROADCombined, ROADLeastRelevantFirstAverage, ROADMostRelevantFirstAverage
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    for model, x, maps, targets in (
        (RegionModel(), region_images(), np.stack([region_map(True), region_map(False)]), [0, 0]),
        (small_net(), blob_images(), gradient_maps(small_net(), blob_images(), TARGETS), TARGETS),
    ):
        ours = road(model, x, maps, targets)
        torch.manual_seed(0)  # pytorch-grad-cam draws its noise from torch's global generator
        outputs = [ClassifierOutputSoftmaxTarget(t) for t in targets]
        cams = maps.astype(np.float32)
        reference = {
            "morf": ROADMostRelevantFirstAverage(list(ROAD_PERCENTAGES))(x, cams, outputs, model),
            "lerf": ROADLeastRelevantFirstAverage(list(ROAD_PERCENTAGES))(x, cams, outputs, model),
            "combined": ROADCombined(list(ROAD_PERCENTAGES))(x, cams, outputs, model),
        }
        for name, values in reference.items():
            np.testing.assert_allclose(getattr(ours, name), values, rtol=0, atol=0.02, err_msg=name)
        np.testing.assert_allclose(ours.original, probabilities(model, x, targets), atol=1e-6)
        if isinstance(model, RegionModel):  # the comparison means something: the region-first map is faithful
            assert ours.combined[0] > 0.2 > -0.2 > ours.combined[1]


def test_road_removes_exact_shares_of_a_map_with_a_tied_floor() -> None:
    """A ReLU'd map is mostly zeros: pytorch-grad-cam's percentile threshold would remove every pixel."""
    model, x = RegionModel(), region_images()
    floor = np.zeros((2, SIZE, SIZE))
    floor[:, 12:16, 12:16] = 1.0  # 1.6 % of the pixels above a tied floor of zeros
    scores = road(model, x, floor, [0, 0], percentages=(10, 50, 90))
    assert np.isfinite(scores.morf_probabilities).all() and np.isfinite(scores.lerf_probabilities).all()
    assert (scores.combined > 0.2).all()


def test_road_is_seeded_and_batch_first() -> None:
    model, x = small_net(), blob_images(count=2)
    maps = gradient_maps(model, x, TARGETS[:2])
    first = road(model, x, maps, TARGETS[:2], percentages=(30, 70), seed=1)
    again = road(model, x, maps, TARGETS[:2], percentages=(30, 70), seed=1)
    np.testing.assert_array_equal(first.morf_probabilities, again.morf_probabilities)
    single = road(model, x[1:], maps[1:], TARGETS[1:2], percentages=(30, 70), seed=1)
    np.testing.assert_allclose(single.lerf_probabilities[0], first.lerf_probabilities[1], atol=1e-6)
    np.testing.assert_allclose(single.combined[0], first.combined[1], atol=1e-6)
