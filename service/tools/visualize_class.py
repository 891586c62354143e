"""Class model visualisation of a model card (``pacs-xai visualize-class``): the input the model
scores highest for one class, written as a PNG and a standalone DICOM Secondary Capture.

:class:`~service.explain.methods.class_model.ClassModelVisualisation` runs on the card's torch or
TorchScript weights at the card's input size, clamped to the model inputs a real image can produce
(the card's normalisation of pixel values 0..1). The class logit of the result is compared with
that of the starting noise.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dicom_io.writers.class_model import build_class_model_capture, grayscale_tiles, save_grayscale_png
from service.explain.methods.class_model import ClassModelVisualisation, class_logits
from service.inference.backends import gradient_runtime, load_runner
from service.inference.card import ModelCard
from service.inference.deployed import class_probabilities

#: ``(step, target score)`` after every ``progress_every`` ascent steps.
StepProgress = Callable[[int, float], None]


@dataclass(frozen=True)
class ClassModelResult:
    """What was written and how the target class scores the result against the start noise."""

    png: Path
    dicom: Path
    final_logit: float
    final_probability: float  # by the card's activation, 0..1
    start_logit: float
    start_probability: float


def visualize_class(
    card: ModelCard,
    class_name: str,
    out_dir: Path,
    *,
    iterations: int,
    seed: int,
    objective: str,
    progress: StepProgress,
) -> ClassModelResult:
    """Generate the class model of ``class_name`` and write ``<out_dir>/class-<name>.png`` and ``.dcm``."""
    target = card.class_index(class_name)
    module = load_runner(card, gradient_runtime(card)).torch_module
    visualiser = ClassModelVisualisation(
        iterations=iterations,
        seed=seed,
        objective=objective,
        value_range=card.input.value_range(),
        progress_every=max(1, iterations // 10),
    )
    shape = (card.input.channels, card.input.rows, card.input.columns)
    image = visualiser.generate(module, target, shape, progress=progress)
    start = class_logits(module, visualiser.start_image(shape))
    final = class_logits(module, image)
    png, dicom = write_class_model(card, class_name, image.cpu().numpy(), visualiser.settings_text(), out_dir)
    activation = card.output.activation
    return ClassModelResult(
        png=png,
        dicom=dicom,
        final_logit=float(final[target]),
        final_probability=float(class_probabilities(activation, final)[target]),
        start_logit=float(start[target]),
        start_probability=float(class_probabilities(activation, start)[target]),
    )


def output_stem(class_name: str) -> str:
    """``class-<name>`` with characters unsafe in file names replaced by ``_``."""
    return "class-" + re.sub(r"[^A-Za-z0-9._-]+", "_", class_name)


def write_class_model(
    card: ModelCard, class_name: str, image: np.ndarray, generation: str, out_dir: Path
) -> tuple[Path, Path]:
    """Write ``<out_dir>/class-<name>.png`` and ``.dcm`` for the ``[C, H, W]`` numpy ``image``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pixels = grayscale_tiles(image)
    png = out_dir / f"{output_stem(class_name)}.png"
    dicom = png.with_suffix(".dcm")
    save_grayscale_png(pixels, png)
    capture = build_class_model_capture(
        pixels, class_name=class_name, model_name=card.name, model_version=card.version, generation=generation
    )
    capture.save_as(dicom, enforce_file_format=True)
    return png, dicom
