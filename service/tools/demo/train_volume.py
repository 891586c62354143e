"""``pacs-xai demo train-volume``: train the demo volume classifier on phantom chest CTs and ship it.

Training draws fresh phantoms (:mod:`service.synthetic.volumes`) every epoch, so the model cannot
learn the anatomy of a few hundred patients by heart (with a fixed set of 240 it does, and stays
at chance on held-out volumes); they are drawn directly on the card's 2.5 x 4 x 4 mm, 48³ grid
(the same anatomy in mm) to keep that cheap. The held-out phantoms are made at their native CT
grid (2.5 mm slices, 2 mm pixels), quantised as a 12-bit CT stores them, and go through the
node's own volume path (:func:`dicom_io.pixels.volume.prepare_values`: resampled to the card's
grid and windowed to [-1000, 400] HU), so the accuracy in the card is that of the path the node
runs. Seeded: the same command gives the same model. Output: ``volume.pth`` (state dict of
:class:`~service.models.volume_demo.network.VolumeDemoNet`) and ``model.yaml`` (its card, with
the sha256 and the held-out accuracy).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dicom_io.pixels.volume import prepare_values
from service.models.volume_demo.network import TARGET_LAYER, VolumeDemoNet
from service.synthetic.volumes import HU_OFFSET, VOLUME_CLASSES, make_ct_phantom
from service.tools.demo.trainer import TrainingReport, fit, save_weights, write_card
from service.tools.progress import Progress

MODEL_NAME = "pacs-xai-demo-chest-ct"
MODEL_VERSION = "1.0.0"
#: The model grid: (slices, rows, columns) voxels at (slice, row, column) spacing in mm.
SHAPE: tuple[int, int, int] = (48, 48, 48)
SPACING: tuple[float, float, float] = (2.5, 4.0, 4.0)
#: Hounsfield units that become 0 and 1 (a lung-and-mediastinum window).
WINDOW: tuple[float, float] = (-1000.0, 400.0)
MEAN, STD = 0.4, 0.3
HELD_OUT_SEED_OFFSET = 1000


@dataclass(frozen=True)
class VolumeTrainingSettings:
    """What ``pacs-xai demo train-volume`` does; the defaults reproduce the shipped model."""

    #: Fresh training phantoms per class and epoch.
    train_per_class: int = 200
    held_out_per_class: int = 30
    epochs: int = 6
    batch_size: int = 8
    learning_rate: float = 2e-3
    seed: int = 11
    threads: int = 2


def volume_model_input(hu: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """One phantom's normalised model input ``[1, 48, 48, 48]``: stored as a 12-bit CT would
    (rounded, clipped), resampled and windowed by the node's volume path, then (x - mean) / std."""
    stored = np.clip(np.rint(hu), -HU_OFFSET, 4095 - HU_OFFSET)
    unit, _grid = prepare_values(stored, spacing, SHAPE, SPACING, WINDOW)
    return ((unit - MEAN) / STD).astype(np.float32)[None]


def phantom_volumes(
    per_class: int, seed: int, progress: Progress | None = None, *, on_model_grid: bool = False, first: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised model inputs ``[N, 1, 48, 48, 48]`` and labels ``[N]``, classes alternating,
    phantoms ``first, first + 1, ...``; made at the native CT grid, or directly on the model's."""
    count = per_class * len(VOLUME_CLASSES)
    inputs = np.empty((count, 1, *SHAPE), dtype=np.float32)
    labels = np.empty(count, dtype=np.int64)
    grid = {"shape": SHAPE, "spacing": SPACING} if on_model_grid else {}
    for index in range(count):
        label = index % len(VOLUME_CLASSES)
        phantom = make_ct_phantom(first + index, VOLUME_CLASSES[label], seed=seed, **grid)
        inputs[index] = volume_model_input(phantom.hu, phantom.spacing)
        labels[index] = label
        if progress and not on_model_grid and (index + 1) % 40 == 0:
            progress(f"  phantom volumes {index + 1}/{count}")
    return inputs, labels


def train_volume(
    out_dir: str | Path, settings: VolumeTrainingSettings = VolumeTrainingSettings(), progress: Progress = print
) -> TrainingReport:
    """Train, evaluate on held-out phantom volumes, write the weights and the card."""
    started = time.perf_counter()
    per_epoch = settings.train_per_class * len(VOLUME_CLASSES)
    progress(f"{per_epoch} fresh training volumes per epoch (seed {settings.seed})")
    progress(f"generating {settings.held_out_per_class * len(VOLUME_CLASSES)} held-out volumes")
    held_out = phantom_volumes(settings.held_out_per_class, settings.seed + HELD_OUT_SEED_OFFSET, progress)
    model, accuracy, per_class = fit(
        partial(VolumeDemoNet, num_classes=len(VOLUME_CLASSES)),
        lambda epoch: phantom_volumes(
            settings.train_per_class, settings.seed, on_model_grid=True, first=epoch * per_epoch
        ),
        per_epoch,
        held_out,
        VOLUME_CLASSES,
        settings,
        # No warm-up: the max-pooled head learns from the first steps (a one-cycle warm-up left it at chance).
        schedule=lambda optimiser, steps: torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps),
        evaluation_batch=8,
        started=started,
        progress=progress,
    )
    files = export_volume_model(model, Path(out_dir), accuracy)
    return TrainingReport(accuracy, per_class, time.perf_counter() - started, files)


def export_volume_model(model: nn.Module, out_dir: Path, accuracy: float) -> dict[str, Path]:
    """Write ``volume.pth`` and ``model.yaml`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / "volume.pth"
    weights = save_weights(model, state_path)
    card = {
        "name": MODEL_NAME,
        "version": MODEL_VERSION,
        "description": (
            "Demo volume classifier trained on pacs-xai phantom chest CT volumes (synthetic, NOT a medical device). "
            f"Held-out accuracy {accuracy:.1%}. Rebuild with: pacs-xai demo train-volume"
        ),
        "weights": {
            "torch": weights,
        },
        "input": {
            "kind": "volume",
            "channels": 1,
            "slices": SHAPE[0],
            "rows": SHAPE[1],
            "columns": SHAPE[2],
            "spacing": list(SPACING),
            "window": list(WINDOW),
            "mean": [MEAN],
            "std": [STD],
        },
        "output": {"activation": "softmax", "classes": list(VOLUME_CLASSES)},
        "target_layer": TARGET_LAYER,
        "applies_to": {"modalities": ["CT"], "body_parts": ["CHEST"]},
        "defaults": {"methods": ["gradcam"], "outputs": ["pm", "seg_fractional"]},
    }
    return {"torch": state_path, "card": write_card(out_dir, card)}
