"""The randomisation sanity check of one configured method on one model, run once and remembered
(``pacs-xai config check`` warns when a configured method fails it).

The check is the scorecard's (:func:`service.trust.randomisation.cascading_randomisation` on the
first :data:`SANITY_IMAGES` held-out lesion phantoms, Arun's baseline and verdict). Its result is
cached as JSON under ``$PACS_XAI_CACHE/randomisation/`` (default ``~/.cache/pacs-xai``), keyed by
the sha256 of the model card file (which holds every weight file's sha256), the method and its
settings: a new model version or new settings run it again, nothing else does.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicom_io.pixels import prepare_frames
from service.explain import get_explainer
from service.inference.backends import gradient_runtime, load_runner
from service.inference.card import ModelCard, sha256_of
from service.tools.evaluate.labelled import phantom_set
from service.trust.randomisation import cascading_randomisation

#: Held-out lesion phantoms the check runs on (the scorecard's default).
SANITY_IMAGES = 12


@dataclass(frozen=True)
class SanityVerdict:
    """The check's figures: SSIM after the head and last block are randomised, and the baseline."""

    method: str
    model: str
    passes: bool
    ssim_after_head_and_last_block: float
    baseline_ssim: float
    images: int


def cache_dir() -> Path:
    """Where verdicts are remembered: ``$PACS_XAI_CACHE/randomisation`` (default ``~/.cache/pacs-xai``)."""
    return Path(os.environ.get("PACS_XAI_CACHE", Path.home() / ".cache" / "pacs-xai")) / "randomisation"


def randomisation_verdict(card_path: Path, method: str, settings: Mapping[str, Any]) -> SanityVerdict:
    """The cached verdict of ``method`` (with ``settings``) on the card at ``card_path``; computed the first time."""
    card = ModelCard.load(card_path)
    card_file = card_path / "model.yaml" if card_path.is_dir() else card_path
    key = json.dumps(
        {"card": sha256_of(card_file), "method": method, "settings": settings}, sort_keys=True, default=str
    )
    cached = cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"
    if cached.is_file():
        try:
            return SanityVerdict(**json.loads(cached.read_text(encoding="utf-8")))
        except (TypeError, ValueError):
            pass  # a damaged or older cache entry: run the check again
    verdict = _run(card, method, settings)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(asdict(verdict)), encoding="utf-8")
    return verdict


def _run(card: ModelCard, method: str, settings: Mapping[str, Any]) -> SanityVerdict:
    if card.input.kind != "image":
        raise ValueError(
            f"it runs on phantom radiographs and model {card.name} takes input.kind: {card.input.kind} "
            "(the volume explainers are checked against MONAI's in the test suite)"
        )
    module = load_runner(card, gradient_runtime(card)).torch_module
    lesions = [image for image in phantom_set(SANITY_IMAGES * 3 // 2 + 1).lesions if image.label in card.output.classes]
    lesions = lesions[:SANITY_IMAGES]
    if len(lesions) < 2:
        raise ValueError(f"model {card.name} has none of the phantom lesion classes; run pacs-xai evaluate --images")
    frames = [prepare_frames(image.dataset, card.input.spec())[0].model_input for image in lesions]
    batch = torch.from_numpy(card.input.normalise(np.stack(frames)))
    targets = [card.class_index(image.label) for image in lesions]
    cascade = cascading_randomisation(module, get_explainer(method, **settings), batch, targets)
    return SanityVerdict(method, card.name, cascade.passes, cascade.verdict_ssim, cascade.baseline_ssim, len(lesions))
