"""The healthy-appearance network: a small convolutional VAE and the operator h(x) built on it.

Uzunova, Ehrhardt, Kepp & Handels, "Interpretable explanations of black box classifiers applied on
medical images by meaningful perturbations using variational autoencoders", SPIE Medical Imaging
2019 (the review's reference [34]): a variational autoencoder (Kingma & Welling, 2014) trained on
normal images only cannot reproduce what it never saw, so its reconstruction of an image shows
that image as healthy tissue; a perturbation that replaces a region by the reconstruction removes
a lesion without putting anything implausible in its place.

:class:`HealthyVAE` (``[B, C, H, W]`` in the model card's normalised units, H and W multiples of
32): five 4x4 convolutions of stride 2 with leaky ReLUs down to ``H/32 x W/32``, one linear layer
to the posterior's mean and log-variance (``latent`` numbers each), one linear layer and five 4x4
transposed convolutions of stride 2 back to ``[B, C, H, W]``.

:class:`HealthyAppearanceNet` is the operator the explainers use, in the same units and grid as
its input::

    h(x) = G_s * D(mu(x)) + (x - G_s * x)

``D(mu(x))`` is the reconstruction from the posterior mean (deterministic); ``G_s *`` is a
Gaussian blur of ``s = detail_sigma`` pixels (edges replicated). The reconstruction supplies the
healthy anatomy at scales above ``s``; the image keeps its own detail below ``s`` (detector noise,
sharp edges), which a VAE's blurry reconstruction lacks and which a classifier notices: on the
demo model, the plain reconstruction is flagged out of distribution and read as "effusion" (a
blur of 0.5 pixels does the same to a normal phantom). ``detail_sigma = 0`` gives the plain
reconstruction, Uzunova et al.'s operator. A lesion's fine detail (a nodule's rim) stays; its
body comes back as normal tissue.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: Each encoder convolution halves the image: five of them.
DOWNSAMPLING = 32
#: The posterior's log-variance is clamped to this range during training (numerical safety).
LOG_VARIANCE_RANGE = (-12.0, 6.0)


class HealthyVAE(nn.Module):
    """Convolutional VAE: ``encode`` -> (mean, log-variance) ``[B, latent]``; ``decode`` -> image."""

    def __init__(
        self,
        in_channels: int = 1,
        rows: int = 224,
        columns: int = 224,
        encoder_widths: Sequence[int] = (8, 16, 32, 64, 32),
        decoder_widths: Sequence[int] = (32, 64, 32, 16, 8),
        latent: int = 128,
    ) -> None:
        super().__init__()
        if rows % DOWNSAMPLING or columns % DOWNSAMPLING:
            raise ValueError(
                f"the healthy-appearance VAE takes images whose sides are multiples of {DOWNSAMPLING}, "
                f"got {rows} x {columns}"
            )
        if len(encoder_widths) != 5 or len(decoder_widths) != 5:
            raise ValueError(
                f"need 5 encoder and 5 decoder widths, got {list(encoder_widths)} and {list(decoder_widths)}"
            )
        self.in_channels, self.rows, self.columns, self.latent = in_channels, rows, columns, latent
        self.encoder_widths, self.decoder_widths = tuple(encoder_widths), tuple(decoder_widths)
        self.grid = (rows // DOWNSAMPLING, columns // DOWNSAMPLING)
        layers: list[nn.Module] = []
        channels = in_channels
        for width in encoder_widths:
            layers += [nn.Conv2d(channels, width, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            channels = width
        self.encoder = nn.Sequential(*layers)
        cells = self.grid[0] * self.grid[1]
        self.posterior = nn.Linear(channels * cells, 2 * latent)
        self.expand = nn.Linear(latent, decoder_widths[0] * cells)
        layers = []
        for width_in, width_out in zip(decoder_widths[:-1], decoder_widths[1:]):
            layers += [nn.ConvTranspose2d(width_in, width_out, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        layers.append(nn.ConvTranspose2d(decoder_widths[-1], in_channels, kernel_size=4, stride=2, padding=1))
        self.decoder = nn.Sequential(*layers)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's mean and log-variance, each ``[B, latent]``."""
        mean, log_variance = self.posterior(self.encoder(images).flatten(1)).chunk(2, dim=1)
        return mean, log_variance

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` from latent codes ``[B, latent]``."""
        return self.decoder(self.expand(codes).view(-1, self.decoder_widths[0], *self.grid))

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """``D(mu(x))``: the reconstruction from the posterior mean, no sampling."""
        return self.decode(self.encode(images)[0])


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """The normalised 1-D Gaussian of ``sigma`` pixels, radius ``ceil(3 sigma)`` (float32)."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    return (kernel / kernel.sum()).to(torch.float32)


class HealthyAppearanceNet(nn.Module):
    """``h(x) = G_s * D(mu(x)) + (x - G_s * x)``, ``s = detail_sigma`` (see the module docstring).

    The operator the explainers run and the graph exported to ONNX: one module, so both runtimes
    compute the same thing.
    """

    def __init__(self, vae: HealthyVAE, detail_sigma: float) -> None:
        super().__init__()
        if not (math.isfinite(detail_sigma) and detail_sigma >= 0):
            raise ValueError(f"detail_sigma must be a finite number of pixels >= 0, got {detail_sigma!r}")
        self.vae = vae
        self.detail_sigma = float(detail_sigma)
        kernel = gaussian_kernel(detail_sigma) if detail_sigma > 0 else torch.ones(1)
        self.register_buffer("kernel", kernel, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        reconstruction = self.vae.reconstruct(images)
        if self.detail_sigma == 0:
            return reconstruction
        return self._blur(reconstruction) + images - self._blur(images)

    def _blur(self, images: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian blur per channel, edges replicated."""
        radius = (self.kernel.numel() - 1) // 2
        batch, channels, rows, columns = images.shape
        flat = images.reshape(batch * channels, 1, rows, columns)
        flat = F.pad(flat, (radius, radius, radius, radius), mode="replicate")
        flat = F.conv2d(flat, self.kernel.view(1, 1, 1, -1))
        flat = F.conv2d(flat, self.kernel.view(1, 1, -1, 1))
        return flat.view(batch, channels, rows, columns)
