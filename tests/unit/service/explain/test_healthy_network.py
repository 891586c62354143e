"""service.explain.healthy.network: the VAE's shapes and the operator h(x) = G_s * D(mu(x)) + (x - G_s * x),
its blur checked against SciPy's Gaussian filter (an independent implementation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from service.explain.healthy.network import HealthyAppearanceNet, HealthyVAE, gaussian_kernel


def small_vae(rows: int = 64, columns: int = 96) -> HealthyVAE:
    torch.manual_seed(0)
    return HealthyVAE(1, rows, columns, (4, 4, 4, 4, 4), (4, 4, 4, 4, 4), latent=8).eval()


def test_shapes_and_a_deterministic_reconstruction() -> None:
    vae = small_vae()
    images = torch.randn(3, 1, 64, 96)
    mean, log_variance = vae.encode(images)
    assert mean.shape == log_variance.shape == (3, 8)
    with torch.no_grad():
        assert vae.decode(mean).shape == images.shape
        torch.testing.assert_close(vae.reconstruct(images), vae.reconstruct(images), rtol=0, atol=0)


def test_sides_must_be_multiples_of_32() -> None:
    with pytest.raises(ValueError, match="multiples of 32, got 64 x 100"):
        HealthyVAE(1, 64, 100)
    with pytest.raises(ValueError, match="5 encoder and 5 decoder widths"):
        HealthyVAE(1, 64, 64, (4, 4), (4, 4, 4, 4, 4))


def test_detail_sigma_zero_is_the_plain_reconstruction() -> None:
    vae = small_vae()
    images = torch.randn(2, 1, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(HealthyAppearanceNet(vae, 0.0)(images), vae.reconstruct(images), rtol=0, atol=0)


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_operator_is_low_pass_reconstruction_plus_the_images_own_detail(sigma: float) -> None:
    """h(x) - x = G_s * (D(mu(x)) - x), G_s SciPy's Gaussian filter (edges replicated: mode 'nearest',
    truncated at 3 sigma as the operator's kernel)."""
    vae = small_vae()
    images = torch.randn(2, 1, 64, 96)
    with torch.no_grad():
        healthy = HealthyAppearanceNet(vae, sigma)(images).numpy()
        reconstruction = vae.reconstruct(images).numpy()
    difference = (reconstruction - images.numpy()).astype(np.float64)
    blurred = [gaussian_filter(difference[i, 0], sigma, mode="nearest", truncate=3) for i in range(2)]
    expected = images.numpy() + np.stack(blurred)[:, None]
    np.testing.assert_allclose(healthy, expected, atol=1e-5)


def test_kernel_is_normalised_and_symmetric() -> None:
    kernel = gaussian_kernel(2.0)
    assert kernel.numel() == 13 and float(kernel.sum()) == pytest.approx(1.0)
    torch.testing.assert_close(kernel, kernel.flip(0))


def test_bad_detail_sigma_is_refused() -> None:
    with pytest.raises(ValueError, match="detail_sigma must be a finite number of pixels >= 0, got -1"):
        HealthyAppearanceNet(small_vae(), -1.0)
