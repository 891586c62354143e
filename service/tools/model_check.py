"""``pacs-xai model check``: load a model card as the node does and run every configured method on a sample.

The card is loaded with every check the node makes at start-up (schema, files, sha256, output size
against the class list, the input size, the target layer, the OOD statistics); then each method
(the card's ``defaults.methods`` unless others are named) explains the sample (a DICOM file, or a
phantom chest radiograph) through the node's own pipeline with the card's outputs, once (the time
includes a method's lazy initialisation, e.g. loading the eager network). Each method runs on its own, so one
that cannot work with the card (a gradient method on ONNX-only weights) is reported and the others
still run. Warnings logged or raised meanwhile are collected.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import Dataset

from dicom_io.pixels import prepare_frames, read_dataset
from service.inference.deployed import DeployedModel, Prediction
from service.node.pipeline import DatasetResult, ExplainPipeline
from service.synthetic.phantoms import make_phantom
from service.tools.progress import Progress


@dataclass
class MethodCheck:
    """One method on the sample: its time (ms, one pass), its outputs, or why it failed."""

    method: str
    milliseconds: float = 0.0
    outputs: list[str] = field(default_factory=list)  # "kind finding" per object
    error: str | None = None


@dataclass
class CheckReport:
    """What ``model check`` found."""

    card_name: str
    card_version: str
    sample: str
    forward_runtime: str
    forward_device: str
    gradient_device: str | None
    load_seconds: float
    predictions: list[Prediction]
    classes: tuple[str, ...]
    thresholds: tuple[float, ...]
    explained: list[str]
    methods: list[MethodCheck]
    warnings: list[str]

    @property
    def failed(self) -> bool:
        return any(method.error is not None for method in self.methods)


def check_model(
    card: Path,
    *,
    sample: Path | None = None,
    methods: Sequence[str] | None = None,
    device: str = "auto",
    progress: Progress | None = None,
) -> CheckReport:
    """Load ``card`` and run each method on ``sample`` (default: a phantom DX chest radiograph).

    A wrong card raises :class:`service.inference.card.ModelCardError` naming the value; a method
    that fails is reported in its :class:`MethodCheck`.
    """
    collected: list[str] = []
    with _collect_warnings(collected):
        started = time.perf_counter()
        model = DeployedModel.from_card_path(card, device=device)  # type: ignore[arg-type]
        load_seconds = time.perf_counter() - started
        try:
            dataset = read_dataset(sample) if sample is not None else make_phantom(0, "nodule", modality="DX").dataset
            names = list(methods or model.card.defaults.methods)
            checks = [_check_method(model, name, dataset, progress) for name in names]
            predictions = _predictions(model, dataset)
            gradient_device = _gradient_device(model)
        finally:
            model.close()
    card_section = model.card
    explained = [
        card_section.output.classes[index]
        for prediction in predictions[:1]
        for index in card_section.findings_to_explain(prediction.probabilities)
    ]
    return CheckReport(
        card_name=card_section.name,
        card_version=card_section.version,
        sample=str(sample) if sample is not None else "phantom DX chest radiograph",
        forward_runtime=model.forward_runtime,
        forward_device=model.forward_runner.device,
        gradient_device=gradient_device,
        load_seconds=load_seconds,
        predictions=predictions,
        classes=card_section.output.classes,
        thresholds=tuple(card_section.output.threshold(name) for name in card_section.output.classes),
        explained=explained,
        methods=checks,
        warnings=list(dict.fromkeys(collected)),
    )


def _check_method(model: DeployedModel, method: str, dataset: Dataset, progress: Progress | None) -> MethodCheck:
    check = MethodCheck(method)
    try:
        pipeline = ExplainPipeline(model, [method], model.card.defaults.outputs, enforce_applies_to=False)
        result: DatasetResult = pipeline.process(dataset)
    except Exception as exc:  # reported per method; the others still run
        check.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        return check
    check.milliseconds = sum(ms for key, ms in result.timings_ms.items())
    check.outputs = [f"{output.kind} {output.finding or ''}".strip() for output in result.outputs]
    if progress is not None:
        progress(f"{method}: {check.milliseconds:.0f} ms, {len(check.outputs)} objects")
    return check


def _predictions(model: DeployedModel, dataset: Dataset) -> list[Prediction]:
    """The model's probabilities for each frame of the sample, prepared as the pipeline prepares it."""
    frames = prepare_frames(dataset, model.card.input.spec())
    return model.predict(model.normalise(np.stack([frame.model_input for frame in frames])))


def _gradient_device(model: DeployedModel) -> str | None:
    try:
        return model.gradient_runner.device
    except ValueError:  # ONNX-only card: no differentiable runner
        return None


@contextmanager
def _collect_warnings(collected: list[str]) -> Iterator[None]:
    """Every WARNING+ log record and Python warning inside the block, as one line each."""

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            collected.append(f"{record.name}: {record.getMessage()}")

    handler = _Handler(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        collected.extend(f"{w.category.__name__}: {w.message}" for w in caught)
    finally:
        root.removeHandler(handler)
