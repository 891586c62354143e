"""The labelled set ``pacs-xai evaluate`` scores explanations on: images, their class, where the
finding is.

Two sources:

- :func:`phantom_set`: the built-in phantoms (nodule, effusion, normal in turn; held-out seed),
  with their ground-truth lesion masks;
- :func:`folder_set`: a hospital's folder of DICOM images with ground-truth DICOM Segmentation
  objects referencing them (:mod:`dicom_io.annotations`). A segment belongs to the model class
  whose name equals its Segment Label or its finding's meaning (case and blanks ignored, e.g.
  "Pleural effusion" is class ``effusion`` only when so named; ``label_map`` names the rest). An
  image without a matching segment counts as ``normal`` when the model has that class and the
  image is not referenced by any SEG of another finding, else it is left out with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from dicom_io.annotations import is_segmentation, read_annotations
from dicom_io.errors import DicomInputError
from dicom_io.pixels import read_dataset
from service.node.offline import iter_files
from service.synthetic.phantoms import CLASSES, make_phantom

#: Seed of the held-out phantoms (no model was trained on it).
HELD_OUT_SEED = 424242
#: The class of images without a finding.
NORMAL = "normal"


@dataclass(frozen=True)
class LabelledImage:
    """One image of the set: its dataset, its class name, and its finding's mask (None for normal)."""

    name: str  # a file name or "phantom-007-nodule": never patient data
    dataset: Dataset
    label: str
    mask: np.ndarray | None  # bool [rows, cols] on the source grid
    #: Where a shortcut token was burned in (phantoms only), for the shortcut figures' tests.
    token_mask: np.ndarray | None = None


@dataclass(frozen=True)
class LabelledSet:
    """The images and what was left out, with the reason (file name: reason)."""

    description: str
    images: tuple[LabelledImage, ...]
    skipped: tuple[str, ...] = ()

    @property
    def lesions(self) -> tuple[LabelledImage, ...]:
        """The images with a finding mask: the ones localisation and faithfulness are scored on."""
        return tuple(image for image in self.images if image.mask is not None)


def phantom_set(count: int, *, seed: int = HELD_OUT_SEED, token_classes: Iterable[str] = ()) -> LabelledSet:
    """``count`` held-out phantoms, nodule, effusion and normal in turn (512 x 480, CR, MONOCHROME2
    and MONOCHROME1 alternating); ``token_classes`` carry the shortcut token."""
    if count < 1:
        raise ValueError(f"the phantom set needs at least 1 image, got {count}")
    tokens = set(token_classes)
    order = [label for label in ("nodule", "effusion", NORMAL) if label in CLASSES]
    images = []
    for index in range(count):
        label = order[index % len(order)]
        phantom = make_phantom(
            index,
            label,
            seed=seed,
            photometric=("MONOCHROME2", "MONOCHROME1")[index % 2],
            token=label in tokens,
        )
        mask = phantom.lesion_mask if phantom.lesion_mask.any() else None
        images.append(LabelledImage(f"phantom-{index:03d}-{label}", phantom.dataset, label, mask, phantom.token_mask))
    described = f"{count} held-out phantoms (seed {seed})" + (f", token on {sorted(tokens)}" if tokens else "")
    return LabelledSet(described, tuple(images))


def folder_set(folder: Path, classes: Iterable[str], *, label_map: Mapping[str, str] | None = None) -> LabelledSet:
    """Images and ground-truth SEGs under ``folder``, labelled with the model's ``classes``."""
    known = {_key(name): name for name in classes}
    aliases = {_key(k): v for k, v in (label_map or {}).items()}
    images: dict[str, tuple[str, Dataset]] = {}
    masks: dict[str, dict[str, np.ndarray]] = {}
    other_findings: set[str] = set()  # images annotated with a finding that is no model class
    skipped: list[str] = []
    for path in iter_files([folder]):
        try:
            ds = read_dataset(path)
            if is_segmentation(ds):
                for region in read_annotations(ds):
                    label = _class_of(region.label, region.finding, known, aliases)
                    if label is None:
                        skipped.append(f"{path.name}: segment {region.label!r} ({region.finding}) is no model class")
                        other_findings.add(region.sop_instance_uid)
                        continue
                    found = masks.setdefault(region.sop_instance_uid, {})
                    found[label] = found[label] | region.mask if label in found else region.mask
            elif "PixelData" in ds:
                images[str(ds.SOPInstanceUID)] = (path.name, ds)
        except (DicomInputError, OSError, ValueError) as exc:
            skipped.append(f"{path.name}: {exc}")
    labelled = []
    for uid, (name, ds) in sorted(images.items(), key=lambda item: item[1][0]):
        findings = masks.get(uid, {})
        if len(findings) > 1:
            skipped.append(f"{name}: several findings ({', '.join(sorted(findings))}); one label per image is scored")
        elif findings:
            ((label, mask),) = findings.items()
            if mask.shape != (int(ds.Rows), int(ds.Columns)):
                skipped.append(
                    f"{name}: its SEG is {mask.shape[0]} x {mask.shape[1]}, the image {ds.Rows} x {ds.Columns}"
                )
                continue
            labelled.append(LabelledImage(name, ds, label, mask))
        elif uid in other_findings:
            skipped.append(f"{name}: annotated with a finding that is no model class, so not scored as {NORMAL}")
        elif NORMAL in known.values():
            labelled.append(LabelledImage(name, ds, NORMAL, None))
        else:
            skipped.append(f"{name}: no ground-truth SEG and the model has no class {NORMAL!r}")
    missing = sorted(set(masks) - set(images))
    skipped.extend(f"SEG references image {uid}, which is not in the folder" for uid in missing)
    return LabelledSet(f"{len(labelled)} images with ground-truth SEGs from {folder}", tuple(labelled), tuple(skipped))


def _key(text: str) -> str:
    return " ".join(text.lower().split())


def _class_of(label: str, finding: str, known: Mapping[str, str], aliases: Mapping[str, str]) -> str | None:
    for text in (label, finding):
        key = _key(text)
        if key in aliases:
            return aliases[key]
        if key in known:
            return known[key]
    return None
