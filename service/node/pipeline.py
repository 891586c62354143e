"""One source image in, its explained DICOM objects out: prepare -> infer -> explain -> encode.

The same :class:`ExplainPipeline` serves the offline ``pacs-xai explain`` command and the node.
It is built once (explainers configured, writers chosen) and then processes datasets; it keeps no
state between datasets. Frames of a multi-frame image go through the model and the explainers in
batches of ``max_batch``.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType

import numpy as np
import torch
from pydicom.dataset import Dataset

from dicom_io.pixels import PreparedFrame, prepare_frames
from dicom_io.writers import (
    OUTPUT_KINDS,
    ExplanationResult,
    build_parametric_map,
    build_report,
    build_secondary_capture,
    build_segmentation,
)
from service.explain import Explainer, explainer_class, get_explainer
from service.inference.card import ModelCard
from service.inference.deployed import DeployedModel, Prediction
from service.synthetic.phantoms import make_phantom

#: Image-like output kinds -> writer(source, result) -> derived dataset. The SR ("sr") is written
#: after them, because it references the other objects of the same result.
Writer = Callable[[Dataset, ExplanationResult], Dataset]
WRITERS: Mapping[str, Writer] = MappingProxyType(
    {
        "sc": build_secondary_capture,
        "pm": build_parametric_map,
        "seg_fractional": partial(build_segmentation, kind="fractional"),
        "seg_binary": partial(build_segmentation, kind="binary"),
    }
)
REPORT_KIND = "sr"
#: Rows and columns of the synthetic image :meth:`ExplainPipeline.warm_up` explains.
WARM_UP_SIZE = 1024


class PipelineConfigError(ValueError):
    """The pipeline was asked for a method or output kind it does not have."""


@dataclass(frozen=True)
class OutputObject:
    """One derived DICOM object produced for a source frame."""

    kind: str
    method: str
    frame_index: int
    dataset: Dataset


@dataclass
class DatasetResult:
    """Everything the pipeline did with one source dataset."""

    sop_instance_uid: str
    modality: str
    skipped_reason: str | None = None
    predictions: list[Prediction] = field(default_factory=list)
    outputs: list[OutputObject] = field(default_factory=list)
    #: Milliseconds per stage: "prepare", "infer", "explain:<method>", "encode:<method>".
    timings_ms: dict[str, float] = field(default_factory=dict)


class ExplainPipeline:
    """Configured once with a model, the explainers and the output kinds; then ``process`` datasets."""

    def __init__(
        self,
        model: DeployedModel,
        methods: Sequence[str],
        outputs: Sequence[str] = ("sc",),
        *,
        method_params: Mapping[str, Mapping[str, object]] | None = None,
        max_batch: int = 16,
        enforce_applies_to: bool = True,
    ) -> None:
        unknown = [kind for kind in outputs if kind not in OUTPUT_KINDS]
        if unknown:
            raise PipelineConfigError(f"unknown output kind(s) {unknown}; available: {list(OUTPUT_KINDS)}")
        if not methods:
            raise PipelineConfigError("no explainer method given; name at least one (e.g. gradcam)")
        if max_batch < 1:
            raise PipelineConfigError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.outputs = tuple(outputs)
        self.max_batch = max_batch
        self.enforce_applies_to = enforce_applies_to
        params = method_params or {}
        self.explainers: dict[str, Explainer] = {
            method: get_explainer(method, **{**card_settings(model.card, method), **params.get(method, {})})
            for method in methods
        }

    def process(self, ds: Dataset) -> DatasetResult:
        """Explain every frame of ``ds``; raises :class:`dicom_io.errors.DicomInputError` on bad input."""
        result = DatasetResult(sop_instance_uid=str(ds.get("SOPInstanceUID", "")), modality=str(ds.get("Modality", "")))
        if self.enforce_applies_to:
            result.skipped_reason = self.model.card.applies_to_dataset(
                result.modality, str(ds.get("SOPClassUID", "")), str(ds.get("BodyPartExamined", ""))
            )
            if result.skipped_reason:
                return result
        return self._explain_dataset(ds, result)

    def warm_up(self) -> float:
        """Explain one synthetic radiograph with every configured method and output kind, keep
        nothing, and return the seconds it took.

        The first study otherwise pays for lazy initialisation (imports, loading the gradient
        runner, the first autograd pass, the overlay's colour table): on the demo card 1.16 s for
        the first 2k² CR against about 0.3 s for the next ones. The image is a phantom chest CR
        (1024², :mod:`service.synthetic.phantoms`); the card's ``applies_to`` rules are not applied to it.
        """

        started = time.perf_counter()
        phantom = make_phantom(0, "nodule", rows=WARM_UP_SIZE, cols=WARM_UP_SIZE).dataset
        self._explain_dataset(phantom, DatasetResult(sop_instance_uid=str(phantom.SOPInstanceUID), modality="CR"))
        return time.perf_counter() - started

    def _explain_dataset(self, ds: Dataset, result: DatasetResult) -> DatasetResult:
        with _timed(result.timings_ms, "prepare"):
            frames = prepare_frames(ds, self.model.card.input.spec())
        for start in range(0, len(frames), self.max_batch):
            self._process_frames(ds, frames[start : start + self.max_batch], result)
        return result

    def _process_frames(self, ds: Dataset, frames: list[PreparedFrame], result: DatasetResult) -> None:
        batch = self.model.normalise(np.stack([frame.model_input for frame in frames]))
        with _timed(result.timings_ms, "infer"):
            predictions = self.model.predict(batch)
        result.predictions.extend(predictions)
        targets = [prediction.class_index for prediction in predictions]
        card = self.model.card
        for method, explainer in self.explainers.items():
            with _timed(result.timings_ms, f"explain:{method}"):
                model = self.model.model_for(needs_gradients=explainer.needs_gradients)
                maps = explainer.explain(model, torch.from_numpy(batch), targets)
            with _timed(result.timings_ms, f"encode:{method}"):
                for frame, prediction, attribution in zip(frames, predictions, maps.cpu().numpy()):
                    explained = ExplanationResult(
                        method=method,
                        class_name=prediction.class_name,
                        probability=prediction.probability,
                        model_name=card.name,
                        model_version=card.version,
                        frame_index=frame.frame_index,
                        attribution=frame.mapping.to_source_grid(attribution),
                        display=frame.display,
                    )
                    written = [
                        OutputObject(kind, method, frame.frame_index, WRITERS[kind](ds, explained))
                        for kind in self.outputs
                        if kind in WRITERS
                    ]
                    if REPORT_KIND in self.outputs:
                        report = build_report(ds, explained, references=[o.dataset for o in written])
                        written.append(OutputObject(REPORT_KIND, method, frame.frame_index, report))
                    result.outputs.extend(written)


def card_settings(card: ModelCard, method: str) -> dict[str, object]:
    """Settings the model card provides to ``method``, which a configuration's own settings override:
    the CAM target layer, and each file the method reads from the card's ``auxiliary`` section
    (``Explainer.card_files``, e.g. realtime_saliency's ``masker``) where the card has one."""
    cls = explainer_class(method)
    settings: dict[str, object] = {}
    if "target_layer" in inspect.signature(cls).parameters and card.target_layer:
        settings["target_layer"] = card.target_layer
    for setting, kind in cls.card_files.items():
        if kind in card.auxiliary:
            settings[setting] = card.auxiliary_path(kind)
    return settings


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Add the wall time of the block, in ms, to ``timings[stage]``."""
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + (time.perf_counter() - started) * 1000.0
