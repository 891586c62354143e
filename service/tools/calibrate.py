"""``pacs-xai model calibrate``: fit a model card's out-of-distribution statistics and update the card.

The statistics of :mod:`service.trust.ood` (class means and shared shrunk covariance of the pooled
features, Lee et al. 2018) are fitted on in-distribution images and their threshold is set on
other, held-out in-distribution images:

- ``--phantoms N``: N phantom chest radiographs for the fit, drawn as the demo models' training
  images were (seed :data:`FIT_SEED`, the classes in turn, CR and DX, MONOCHROME1 and
  MONOCHROME2, 448 to 512 columns), and ``max(60, N // 3)`` for the threshold from the
  training's held-out seed (:data:`HELD_OUT_SEED`). ``token_class`` burns the shortcut token into
  that class's phantoms, as the cheating demo model's training did. No phantom of the test seed
  (424242) is used.
- ``--images DIR``: every readable DICOM image (every frame) below DIR, in sorted order; every
  :data:`HELD_OUT_EVERY`-th one is held out for the threshold, the others are fitted. At least
  :data:`MIN_IMAGES` frames.

Images go through the node's pixel path with the card's input section, classes are those the
model predicts (so a folder needs no labels). The statistics are written as
``ood-statistics.npz`` beside the card, and the card's ``auxiliary.ood_statistics`` entry (file
and sha256) is updated; the rest of the card stays as it was. The card needs ``torch`` weights.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dicom_io.errors import DicomInputError
from dicom_io.pixels import prepare_frames, read_dataset
from service.inference.backends import load_runner
from service.inference.card import ModelCard, ModelCardError, set_auxiliary_file
from service.synthetic.phantoms import CLASSES, make_phantom
from service.tools.demo.train import HELD_OUT_SEED_OFFSET, TrainingSettings
from service.tools.progress import Progress
from service.trust.ood import (
    DEFAULT_MARGIN,
    DEFAULT_PERCENTILE,
    DEFAULT_SHRINKAGE,
    OodStatistics,
    feature_layer,
    fit_statistics,
    pooled_features,
)

__all__ = ["CalibrationReport", "calibrate_ood"]

#: Seed of the phantoms the statistics are fitted on: the demo models' training seed.
FIT_SEED = TrainingSettings().seed
#: Seed of the held-out phantoms that set the threshold: the demo training's held-out seed.
HELD_OUT_SEED = FIT_SEED + HELD_OUT_SEED_OFFSET
#: Least number of held-out phantoms.
MIN_HELD_OUT_PHANTOMS = 60
#: With ``--images``, every this-many-th frame is held out for the threshold.
HELD_OUT_EVERY = 4
#: Least number of frames ``--images`` needs.
MIN_IMAGES = 20
#: The statistics file written beside the card.
STATISTICS_FILE = "ood-statistics.npz"
#: Images per forward pass.
BATCH = 32


@dataclass(frozen=True)
class CalibrationReport:
    statistics: OodStatistics
    path: Path
    card: Path
    fit_distances: np.ndarray
    held_out_distances: np.ndarray
    seconds: float

    @property
    def held_out_flagged(self) -> float:
        """Fraction of the held-out images above the threshold (0..1)."""
        return float(np.mean(self.held_out_distances > self.statistics.threshold))


def calibrate_ood(
    card_path: str | Path,
    *,
    phantoms: int | None = None,
    images: Path | None = None,
    token_class: str | None = None,
    shrinkage: float = DEFAULT_SHRINKAGE,
    percentile: float = DEFAULT_PERCENTILE,
    margin: float = DEFAULT_MARGIN,
    progress: Progress = print,
) -> CalibrationReport:
    """Fit the OOD statistics of the card at ``card_path`` on ``phantoms`` phantoms or the ``images``
    below a folder (exactly one of them), write them beside the card and update its auxiliary entry."""
    started = time.perf_counter()
    if (phantoms is None) == (images is None):
        raise ValueError("give either a number of phantoms or a folder of images, not both or neither")
    card_file = Path(card_path)
    card_file = card_file / "model.yaml" if card_file.is_dir() else card_file
    card = ModelCard.load(card_file)
    if "torch" not in card.weights:
        raise ModelCardError(
            f"model card {card.name} has only {', '.join(sorted(card.weights))} weights; the OOD features are read "
            "with a forward hook on the eager module, so the card needs 'torch' weights"
        )
    module = load_runner(card, "torch", device="cpu").torch_module
    layer, _ = feature_layer(module, card.trust.ood.layer)
    progress(f"model {card.name} {card.version}: features are the input of layer {layer!r}")

    if phantoms is not None:
        if phantoms < len(CLASSES) * 10:
            raise ValueError(f"fit on at least {len(CLASSES) * 10} phantoms, got {phantoms}")
        if token_class is not None and token_class not in CLASSES:
            raise ValueError(f"token class {token_class!r} is not one of {', '.join(CLASSES)}")
        held_out_count = max(MIN_HELD_OUT_PHANTOMS, phantoms // 3)
        progress(
            f"fitting on {phantoms} phantoms (seed {FIT_SEED}), threshold from {held_out_count} (seed {HELD_OUT_SEED})"
        )
        fit_inputs: Iterable[np.ndarray] = _phantom_inputs(card, phantoms, FIT_SEED, token_class)
        held_out_inputs: Iterable[np.ndarray] = _phantom_inputs(card, held_out_count, HELD_OUT_SEED, token_class)
    else:
        assert images is not None
        frames = list(_folder_inputs(card, Path(images), progress))
        if len(frames) < MIN_IMAGES:
            raise ValueError(f"{images}: {len(frames)} readable frame(s); calibration needs at least {MIN_IMAGES}")
        held_out_inputs = [f for i, f in enumerate(frames) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
        fit_inputs = [f for i, f in enumerate(frames) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
        progress(
            f"{len(frames)} frames from {images}: fitting on {len(fit_inputs)}, threshold from {len(held_out_inputs)}"
        )

    fit_features, labels = _features(module, card, fit_inputs, layer, "fit", progress)
    held_out_features, _ = _features(module, card, held_out_inputs, layer, "held-out", progress)
    statistics = fit_statistics(
        fit_features,
        labels,
        held_out_features,
        layer=layer,
        shrinkage=shrinkage,
        percentile=percentile,
        margin=margin,
    )
    path = statistics.save(card_file.parent / STATISTICS_FILE)
    set_auxiliary_file(card_file, "ood_statistics", path)
    return CalibrationReport(
        statistics=statistics,
        path=path,
        card=card_file,
        fit_distances=statistics.distances(fit_features),
        held_out_distances=statistics.distances(held_out_features),
        seconds=time.perf_counter() - started,
    )


def _phantom_inputs(card: ModelCard, count: int, seed: int, token_class: str | None) -> Iterator[np.ndarray]:
    """Model inputs [C, H, W] in [0, 1] of ``count`` phantoms drawn like the demo training images."""
    variants = [("CR", "MONOCHROME2"), ("DX", "MONOCHROME2"), ("CR", "MONOCHROME1"), ("DX", "MONOCHROME1")]
    widths = (448, 480, 512)
    chooser = np.random.default_rng([seed, count])
    spec = card.input.spec()
    for index in range(count):
        label = CLASSES[index % len(CLASSES)]
        modality, photometric = variants[chooser.integers(len(variants))]
        phantom = make_phantom(
            index,
            label,
            seed=seed,
            cols=widths[chooser.integers(len(widths))],
            modality=modality,  # type: ignore[arg-type]
            photometric=photometric,  # type: ignore[arg-type]
            token=label == token_class,
        )
        yield prepare_frames(phantom.dataset, spec)[0].model_input


def _folder_inputs(card: ModelCard, folder: Path, progress: Progress) -> Iterator[np.ndarray]:
    """Model inputs of every frame of every readable DICOM image below ``folder``, sorted by path."""
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    spec = card.input.spec()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            frames = prepare_frames(read_dataset(path), spec)
        except DicomInputError as exc:
            progress(f"  skipped {path}: {exc}")
            continue
        for frame in frames:
            yield frame.model_input


def _features(
    module: torch.nn.Module,
    card: ModelCard,
    inputs: Iterable[np.ndarray],
    layer: str,
    what: str,
    progress: Progress,
) -> tuple[np.ndarray, np.ndarray]:
    """Features [N, D] and predicted classes [N] of the inputs, :data:`BATCH` at a time."""
    features: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    batch: list[np.ndarray] = []
    done = 0

    def flush() -> None:
        nonlocal done
        normalised = card.input.normalise(np.stack(batch))
        features.append(pooled_features(module, normalised, layer))
        with torch.no_grad():
            logits = module(torch.from_numpy(normalised))
        labels.append(logits.argmax(dim=1).numpy())
        done += len(batch)
        batch.clear()
        progress(f"  {what} features: {done} images")

    for model_input in inputs:
        batch.append(model_input)
        if len(batch) == BATCH:
            flush()
    if batch:
        flush()
    if not features:
        raise ValueError(f"no {what} images to calibrate on")
    return np.concatenate(features), np.concatenate(labels)
