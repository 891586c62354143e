"""Normal images for the healthy-appearance model, as the model sees them (the card's pixel path
and normalisation, float32 ``[N, C, H, W]``):

- :func:`phantom_normals`: ``normal`` phantom chest radiographs drawn like the demo model's
  training images (CR and DX, MONOCHROME1 and MONOCHROME2, 448 to 512 columns), and
  :func:`phantom_lesions`: nodule and effusion phantoms with their lesion masks on the model grid,
  for the held-out figures;
- :func:`folder_normals`: every frame of every readable DICOM image below a folder (a site's
  normal studies; DICOM Segmentation objects are skipped), in sorted order.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from dicom_io.annotations import is_segmentation
from dicom_io.errors import DicomInputError
from dicom_io.pixels import prepare_frames, read_dataset
from service.inference.card import ModelCard
from service.node.offline import iter_files
from service.synthetic.phantoms import make_phantom
from service.tools.progress import Progress

VARIANTS = (("CR", "MONOCHROME2"), ("DX", "MONOCHROME2"), ("CR", "MONOCHROME1"), ("DX", "MONOCHROME1"))
WIDTHS = (448, 480, 512)


def phantom_normals(card: ModelCard, count: int, seed: int, progress: Progress | None = None) -> np.ndarray:
    """``count`` normal phantoms (indices 0..count-1 of ``seed``), normalised ``[N, C, H, W]``."""
    chooser = np.random.default_rng([seed, count])
    inputs = []
    for index in range(count):
        modality, photometric = VARIANTS[chooser.integers(len(VARIANTS))]
        phantom = make_phantom(
            index,
            "normal",
            seed=seed,
            cols=WIDTHS[chooser.integers(len(WIDTHS))],
            modality=modality,  # type: ignore[arg-type]
            photometric=photometric,  # type: ignore[arg-type]
        )
        inputs.append(prepare_frames(phantom.dataset, card.input.spec())[0].model_input)
        if progress and (index + 1) % 300 == 0:
            progress(f"  normal phantoms {index + 1}/{count}")
    return card.input.normalise(np.stack(inputs))


def phantom_lesions(card: ModelCard, count: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``count`` lesion phantoms of ``seed`` (nodule and effusion in turn): normalised inputs
    ``[N, C, H, W]``, lesion masks on the model grid (bool ``[N, H, W]``) and their classes."""
    inputs, masks, labels = [], [], []
    for index in range(count):
        label = ("nodule", "effusion")[index % 2]
        phantom = make_phantom(index, label, seed=seed, cols=WIDTHS[index % len(WIDTHS)])
        frame = prepare_frames(phantom.dataset, card.input.spec())[0]
        inputs.append(frame.model_input)
        masks.append(frame.mapping.to_model_grid(phantom.lesion_mask.astype(np.float32)) > 0.5)
        labels.append(label)
    return card.input.normalise(np.stack(inputs)), np.stack(masks), labels


def folder_normals(card: ModelCard, folder: Path, progress: Progress) -> np.ndarray:
    """Every frame of every readable DICOM image below ``folder``, normalised ``[N, C, H, W]``."""
    if not folder.is_dir():
        raise ValueError(f"--normals must be a folder of DICOM images, got {folder}")
    frames = list(_folder_frames(card, folder, progress))
    if not frames:
        raise ValueError(f"{folder}: no readable DICOM image below it")
    return card.input.normalise(np.stack(frames))


def _folder_frames(card: ModelCard, folder: Path, progress: Progress) -> Iterator[np.ndarray]:
    spec = card.input.spec()
    for path in iter_files([folder]):
        try:
            dataset = read_dataset(path)
            if is_segmentation(dataset):
                continue
            frames = prepare_frames(dataset, spec)
        except DicomInputError as exc:
            progress(f"  skipped {path}: {exc}")
            continue
        for frame in frames:
            yield frame.model_input
