"""Train the healthy-appearance VAE of a model card on normal images and ship it beside the card.

The VAE (:class:`~service.explain.healthy.network.HealthyVAE`) learns, on normal images only, at
the card's input grid and in its normalised units, the evidence lower bound with a weighted KL
term (a beta-VAE, Higgins et al. 2017), per batch::

    mean((D(z) - x)^2) + kl_weight * mean_i KL(q(z | x_i) || N(0, I)) / (C H W),   z = mu + sigma * eps

(the mean squared error is over pixels, the KL term per image and pixel, so ``kl_weight`` does
not depend on the image size). AdamW with a one-cycle learning rate, gradients clipped to norm
:data:`GRADIENT_CLIP`, the posterior's log-variance clamped to
:data:`~service.explain.healthy.network.LOG_VARIANCE_RANGE`. Everything random (initialisation,
order, ``eps``) comes from ``seed``: the same settings and thread count give the same weights.

Held-out figures (images the VAE never saw): the mean squared error of h(x) on normal images and,
where lesion images with masks are given (phantoms), the mean squared error of h(x) inside the
lesions against outside them: the VAE reproduces normal tissue and not what it never saw.

Output, beside the card when ``out_dir`` is its folder: ``healthy-appearance.onnx`` (the operator
h(x) as one ONNX graph, exported first so that its sha256 goes into the next file),
``healthy-appearance.pt``, and the card's ``auxiliary.healthy_appearance`` and
``auxiliary.healthy_appearance_onnx`` entries (file and sha256 of each). The export needs the
``export`` extra (onnx, onnxscript).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from service.explain.healthy import (
    CARD_ENTRY,
    HEALTHY_FILE,
    ONNX_CARD_ENTRY,
    ONNX_FILE,
    HealthyAppearanceNet,
    HealthyVAE,
    save_healthy_model,
)
from service.explain.healthy.network import LOG_VARIANCE_RANGE
from service.inference.card import ModelCard, set_auxiliary_file
from service.tools.progress import Progress

__all__ = ["HealthyReport", "HealthySettings", "HeldOutLesions", "train_healthy_model"]

#: Largest gradient norm per step.
GRADIENT_CLIP = 5.0
#: Images per forward pass when the held-out figures are computed.
EVALUATION_BATCH = 32


@dataclass(frozen=True)
class HealthySettings:
    """How the VAE is trained; the defaults made the shipped demo model."""

    epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 2e-3
    #: beta: weight of the KL term per pixel (see the module docstring).
    kl_weight: float = 0.05
    latent: int = 128
    encoder_widths: tuple[int, ...] = (8, 16, 32, 64, 32)
    decoder_widths: tuple[int, ...] = (32, 64, 32, 16, 8)
    #: Pixels of detail below which h(x) keeps the image's own (see service.explain.healthy.network).
    detail_sigma: float = 2.0
    seed: int = 2019
    threads: int = 2

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "latent", "threads"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("learning_rate", "kl_weight"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        if not (math.isfinite(self.detail_sigma) and self.detail_sigma >= 0):
            raise ValueError(f"detail_sigma must be a number of pixels >= 0, got {self.detail_sigma!r}")


@dataclass(frozen=True)
class HeldOutLesions:
    """Lesion images the VAE never saw, with their masks on the model grid (for the figures)."""

    inputs: np.ndarray  # [N, C, H, W] normalised
    masks: np.ndarray  # bool [N, H, W]
    labels: list[str]


@dataclass(frozen=True)
class HealthyReport:
    """The held-out figures, what was written, and how long it took."""

    figures: dict[str, float]
    seconds: float
    path: Path
    onnx_path: Path
    parameters: int
    #: The model card whose ``auxiliary.healthy_appearance`` now names the file; ``None`` when the
    #: file was written outside the card's folder and the card was left alone.
    card: Path | None
    #: h(x) of the held-out normals and lesions, for the figure.
    held_out: np.ndarray
    held_out_healthy: np.ndarray
    lesions_healthy: np.ndarray | None


def train_healthy_model(
    card_path: str | Path,
    normals: np.ndarray,
    held_out: np.ndarray,
    out_dir: str | Path,
    settings: HealthySettings = HealthySettings(),
    progress: Progress = print,
    *,
    lesions: HeldOutLesions | None = None,
    source: str = "",
) -> HealthyReport:
    """Train on ``normals`` (normalised ``[N, C, H, W]`` at the card's input grid), measure on
    ``held_out`` normals (and ``lesions``), write the files into ``out_dir`` and, when that is the
    card's folder, point the card's ``auxiliary.healthy_appearance`` at them."""
    started = time.perf_counter()
    card_file = Path(card_path)
    card_file = card_file / "model.yaml" if card_file.is_dir() else card_file
    card = ModelCard.load(card_file)
    shape = (card.input.channels, card.input.rows, card.input.columns)
    for name, images in (("normal images", normals), ("held-out normal images", held_out)):
        if images.ndim != 4 or tuple(images.shape[1:]) != shape or len(images) == 0:
            raise ValueError(f"{name} must be [N, {shape[0]}, {shape[1]}, {shape[2]}], got shape {images.shape}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            vae = HealthyVAE(*shape, settings.encoder_widths, settings.decoder_widths, settings.latent)
        parameters = sum(p.numel() for p in vae.parameters())
        progress(
            f"training the healthy-appearance VAE ({parameters:,} parameters) on {len(normals)} normal images, "
            f"{len(held_out)} held out, {settings.epochs} epochs"
        )
        _fit(vae, torch.from_numpy(normals), torch.from_numpy(held_out), settings, progress, started)
        operator = HealthyAppearanceNet(vae.eval().requires_grad_(False), settings.detail_sigma).eval()
        held_out_healthy = _apply(operator, held_out)
        lesions_healthy = None if lesions is None else _apply(operator, lesions.inputs)
        figures = held_out_figures(held_out, held_out_healthy, lesions, lesions_healthy)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        onnx_path = export_onnx(operator, out / ONNX_FILE, shape)
        metadata = {
            "method": "healthy-tissue replacement (Uzunova et al. 2019): a VAE trained on normal images only",
            "card": {"name": card.name, "version": card.version},
            "source": source,
            "training": {**dataclasses.asdict(settings), "normal_images": len(normals), "held_out": len(held_out)},
            "held_out": figures,
            "rebuild": "pacs-xai demo train-healthy | pacs-xai model train-healthy --normals DIR --card CARD",
        }
        path = save_healthy_model(out / HEALTHY_FILE, operator, card.input.mean, card.input.std, metadata, onnx_path)
    finally:
        torch.set_num_threads(previous_threads)
    updated = None
    if path.parent.resolve() == card.folder.resolve():
        set_auxiliary_file(card_file, ONNX_CARD_ENTRY, onnx_path)
        set_auxiliary_file(card_file, CARD_ENTRY, path)
        updated = card_file
        progress(f"model card {card_file}: auxiliary.{CARD_ENTRY} and {ONNX_CARD_ENTRY} updated")
    else:
        progress(f"model card {card_file} left as it is: the model is not in its folder")
    return HealthyReport(
        figures,
        time.perf_counter() - started,
        path,
        onnx_path,
        parameters,
        updated,
        held_out,
        held_out_healthy,
        lesions_healthy,
    )


def vae_loss(
    vae: HealthyVAE, images: torch.Tensor, kl_weight: float, generator: torch.Generator
) -> tuple[torch.Tensor, float, float]:
    """The batch's loss (module docstring) and its two parts: mean squared error, KL per image."""
    mean, log_variance = vae.encode(images)
    log_variance = log_variance.clamp(*LOG_VARIANCE_RANGE)
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
    reconstruction = vae.decode(mean + noise * torch.exp(0.5 * log_variance))
    squared_error = F.mse_loss(reconstruction, images)
    kl = (-0.5 * (1 + log_variance - mean**2 - log_variance.exp()).sum(dim=1)).mean()
    loss = squared_error + kl_weight * kl / images[0].numel()
    return loss, float(squared_error.detach()), float(kl.detach())


def _fit(
    vae: HealthyVAE,
    normals: torch.Tensor,
    held_out: torch.Tensor,
    settings: HealthySettings,
    progress: Progress,
    started: float,
) -> None:
    optimiser = torch.optim.AdamW(vae.parameters(), lr=settings.learning_rate, weight_decay=1e-5)
    steps = settings.epochs * math.ceil(len(normals) / settings.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=settings.learning_rate, total_steps=steps)
    generator = torch.Generator().manual_seed(settings.seed)
    for epoch in range(settings.epochs):
        vae.train()
        order = torch.randperm(len(normals), generator=generator)
        squared, kl = 0.0, 0.0
        for start in range(0, len(order), settings.batch_size):
            batch = normals[order[start : start + settings.batch_size]]
            loss, batch_squared, batch_kl = vae_loss(vae, batch, settings.kl_weight, generator)
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), GRADIENT_CLIP)
            optimiser.step()
            schedule.step()
            squared += batch_squared * len(batch)
            kl += batch_kl * len(batch)
        vae.eval()
        with torch.no_grad():
            held = float(
                np.mean([F.mse_loss(vae.reconstruct(part), part).item() for part in held_out.split(EVALUATION_BATCH)])
            )
        progress(
            f"epoch {epoch + 1}/{settings.epochs}: reconstruction error {squared / len(normals):.4f}, "
            f"KL {kl / len(normals):.0f} nats, held-out reconstruction error {held:.4f} "
            f"({time.perf_counter() - started:.0f} s)"
        )


def _apply(operator: HealthyAppearanceNet, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([operator(part) for part in torch.from_numpy(images).split(EVALUATION_BATCH)]).numpy()


def held_out_figures(
    held_out: np.ndarray,
    held_out_healthy: np.ndarray,
    lesions: HeldOutLesions | None,
    lesions_healthy: np.ndarray | None,
) -> dict[str, float]:
    """Mean squared errors of h(x) in normalised units squared:

    - ``normal_error``: over every pixel of the held-out normal images;
    - per lesion class (``nodule``, ``effusion``), on held-out lesion images:
      ``<class>_inside_error`` inside the lesion masks, ``<class>_outside_error`` outside them, and
      their ratio ``<class>_error_ratio`` (high: the lesion is not reproduced, the rest is).
    """
    figures: dict[str, float] = {"normal_error": float(np.mean((held_out_healthy - held_out) ** 2))}
    if lesions is None or lesions_healthy is None:
        return figures
    squared = ((lesions_healthy - lesions.inputs) ** 2).mean(axis=1)  # [N, H, W], over channels
    for name in dict.fromkeys(lesions.labels):
        chosen = [i for i, label in enumerate(lesions.labels) if label == name]
        masks = lesions.masks[chosen]
        inside = float(squared[chosen][masks].mean())
        outside = float(squared[chosen][~masks].mean())
        figures[f"{name}_inside_error"] = inside
        figures[f"{name}_outside_error"] = outside
        figures[f"{name}_error_ratio"] = inside / outside if outside > 0 else math.inf
    return figures


def export_onnx(operator: HealthyAppearanceNet, path: Path, shape: tuple[int, int, int]) -> Path:
    """``operator`` as an ONNX graph at ``path`` (batch dimension dynamic, input ``image``)."""
    example = torch.zeros(2, *shape)
    try:
        torch.onnx.export(
            operator,
            (example,),
            str(path),
            dynamo=True,
            external_data=False,
            input_names=["image"],
            output_names=["healthy"],
            dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=4096)}},
        )
    except ImportError as exc:
        raise RuntimeError(f"ONNX export needs the 'export' extra (pip install 'pacs-xai[export]'): {exc}") from exc
    return path
