"""One source image in, its explained DICOM objects out: prepare -> infer -> explain -> encode.

The same :class:`ExplainPipeline` serves the offline ``pacs-xai explain`` command and the node.
It is built once (explainers configured, writers chosen) and then processes datasets; it keeps no
state between datasets. Frames of a multi-frame image go through the model and the explainers in
batches of ``max_batch``.

Each frame explains the findings its model card's ``explain.findings`` picks (the predicted class
for a single-label card). The explainers get one sample per (frame, finding), the frame repeated
with the finding's class as target, in batches of ``max_batch``: one batched pass for every finding.
Each finding gets its own Secondary Capture and Parametric Map; a Segmentation has one segment per
finding of its frame; the SR of a multi-label card lists every class with its probability and
presence (:func:`dicom_io.writers.build_findings_report`).

Every result carries whether it can be believed (:mod:`service.trust`), timed as the "trust"
stage: the out-of-distribution signal once per frame batch (Mahalanobis distance of the pooled
features, when the model card has ``auxiliary.ood_statistics``; loaded and checked against the
model when the pipeline is built), and the shortcut signal per explanation, on the source grid
(the share of positive attribution in the region outside the anatomy, found once per frame from
the windowed frame and the Display Shutter). Both travel in :class:`ExplanationResult` to the
writers and in :class:`DatasetResult` to the metrics; a flagged result is logged once, with UIDs
only.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType

import numpy as np
import torch
from pydicom.dataset import Dataset

from dicom_io.pixels import PreparedFrame, prepare_frames, shutter_mask
from dicom_io.writers import (
    OUTPUT_KINDS,
    ExplanationResult,
    FindingStatus,
    OutOfDistributionSignal,
    ReportFrame,
    ShortcutSignal,
    build_findings_report,
    build_parametric_map,
    build_report,
    build_secondary_capture,
    build_segmentation,
)
from service.explain import Explainer, explainer_class, get_explainer
from service.inference.card import ModelCard
from service.inference.deployed import DeployedModel, Prediction
from service.synthetic.phantoms import make_phantom
from service.trust.ood import OodDetector, OodStatistics
from service.trust.shortcut import (
    OutsideAnatomy,
    ShortcutThresholds,
    is_shortcut_suspected,
    outside_anatomy,
    shortcut_figures,
)

log = logging.getLogger(__name__)

#: Image-like output kinds -> writer(source, result) -> derived dataset. The SR ("sr") is written
#: after them, because it references the other objects of the same result.
Writer = Callable[[Dataset, ExplanationResult], Dataset]
#: Writers of one object per explained finding.
PER_FINDING_WRITERS: Mapping[str, Writer] = MappingProxyType(
    {"sc": build_secondary_capture, "pm": build_parametric_map}
)
#: Writers of one object per frame, with a segment per explained finding.
SEGMENTATION_WRITERS: Mapping[str, Callable[[Dataset, Sequence[ExplanationResult]], Dataset]] = MappingProxyType(
    {
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
    #: The finding (class) the object explains where a frame has several (a multi-label card); None
    #: for a single-label card's objects and for the objects of a whole frame (SEG, SR).
    finding: str | None = None


@dataclass(frozen=True)
class TrustVerdict:
    """The trust signals of one explained frame (one method): what the writers were given."""

    method: str
    frame_index: int
    shortcut: ShortcutSignal
    ood: OutOfDistributionSignal | None  # None where the model card has no OOD statistics
    finding: str = ""  # the explained class

    @property
    def flagged(self) -> bool:
        return self.shortcut.suspected or (self.ood is not None and self.ood.out_of_distribution)


@dataclass
class DatasetResult:
    """Everything the pipeline did with one source dataset."""

    sop_instance_uid: str
    modality: str
    skipped_reason: str | None = None
    predictions: list[Prediction] = field(default_factory=list)
    #: The out-of-distribution signal per frame, in the order of ``predictions`` (None without statistics).
    ood: list[OutOfDistributionSignal | None] = field(default_factory=list)
    #: The trust signals per explained frame and method.
    verdicts: list[TrustVerdict] = field(default_factory=list)
    outputs: list[OutputObject] = field(default_factory=list)
    #: Milliseconds per stage: "prepare", "infer", "trust", "explain:<method>", "encode:<method>".
    timings_ms: dict[str, float] = field(default_factory=dict)
    #: The model card's classes, the order of each prediction's probabilities.
    classes: tuple[str, ...] = ()


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
        if model.card.input.kind == "volume":
            raise PipelineConfigError(
                f"model {model.card.name} takes whole series (input.kind: volume); explain it with the volume "
                "pipeline (service.node.volume: a routing rule naming the card, or pacs-xai explain), not by frame"
            )
        self.model = model
        self.outputs = tuple(outputs)
        self.max_batch = max_batch
        self.enforce_applies_to = enforce_applies_to
        params = method_params or {}
        self.explainers: dict[str, Explainer] = {
            method: get_explainer(method, **{**card_settings(model.card, method), **params.get(method, {})})
            for method in methods
        }
        shortcut = model.card.trust.shortcut
        self.shortcut_thresholds = ShortcutThresholds(share=shortcut.share, concentration=shortcut.concentration)
        self.edge_band = shortcut.edge_band
        self.ood_detector = ood_detector(model)
        #: Several findings per frame (a multi-label card): each gets its own SC and PM.
        self.per_finding = model.card.explain.per_finding()

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
        (1024², :mod:`service.synthetic.phantoms`); the card's ``applies_to`` rules are not applied to it,
        and its trust signals are computed but not logged (the demo model never saw a phantom of that
        size: its input is out of distribution).
        """

        started = time.perf_counter()
        phantom = make_phantom(0, "nodule", rows=WARM_UP_SIZE, cols=WARM_UP_SIZE).dataset
        warm_up = DatasetResult(sop_instance_uid=str(phantom.SOPInstanceUID), modality="CR")
        self._explain_dataset(phantom, warm_up, log_flags=False)
        return time.perf_counter() - started

    def _explain_dataset(self, ds: Dataset, result: DatasetResult, *, log_flags: bool = True) -> DatasetResult:
        result.classes = self.model.card.output.classes
        with _timed(result.timings_ms, "prepare"):
            frames = prepare_frames(ds, self.model.card.input.spec())
            shutter = shutter_mask(ds)
        for start in range(0, len(frames), self.max_batch):
            self._process_frames(ds, frames[start : start + self.max_batch], shutter, result, log_flags)
        return result

    def _process_frames(
        self,
        ds: Dataset,
        frames: list[PreparedFrame],
        shutter: np.ndarray | None,
        result: DatasetResult,
        log_flags: bool,
    ) -> None:
        batch = self.model.normalise(np.stack([frame.model_input for frame in frames]))
        with _timed(result.timings_ms, "infer"):
            predictions = self.model.predict(batch)
        result.predictions.extend(predictions)
        with _timed(result.timings_ms, "trust"):
            ood = self._ood_signals(batch)
            regions = [outside_anatomy(frame.display, shutter, edge_band=self.edge_band) for frame in frames]
        result.ood.extend(ood)
        card = self.model.card
        # The findings each frame explains (the predicted class for a single-label card); every
        # (frame, finding) is one sample of the explainers' batch: the image repeated, its own target.
        findings = [card.findings_to_explain(prediction.probabilities) for prediction in predictions]
        samples = [(position, target) for position, targets in enumerate(findings) for target in targets]
        for method, explainer in self.explainers.items():
            with _timed(result.timings_ms, f"explain:{method}"):
                maps = self._explain_samples(explainer, batch, samples)
            explained: list[list[ExplanationResult]] = [[] for _ in frames]
            verdicts: list[list[TrustVerdict]] = [[] for _ in frames]
            for (position, target), attribution in zip(samples, maps):
                frame, prediction = frames[position], predictions[position]
                with _timed(result.timings_ms, "trust"):
                    on_source = frame.mapping.to_source_grid(attribution)
                    verdict = TrustVerdict(
                        method,
                        frame.frame_index,
                        self._shortcut_signal(on_source, regions[position]),
                        ood[position],
                        card.output.classes[target],
                    )
                result.verdicts.append(verdict)
                verdicts[position].append(verdict)
                explained[position].append(
                    ExplanationResult(
                        method=method,
                        class_name=card.output.classes[target],
                        probability=prediction.probabilities[target],
                        model_name=card.name,
                        model_version=card.version,
                        frame_index=frame.frame_index,
                        attribution=on_source,
                        display=frame.display,
                        shortcut=verdict.shortcut,
                        ood=verdict.ood,
                        per_finding=self.per_finding,
                    )
                )
            for frame, prediction, frame_results, frame_verdicts in zip(frames, predictions, explained, verdicts):
                with _timed(result.timings_ms, f"encode:{method}"):
                    written = self._write_frame(ds, method, frame.frame_index, prediction, frame_results)
                result.outputs.extend(written)
                for verdict in frame_verdicts:
                    if verdict.flagged and log_flags:
                        _log_flagged(result.sop_instance_uid, verdict, written)

    def _explain_samples(self, explainer: Explainer, batch: np.ndarray, samples: list[tuple[int, int]]) -> np.ndarray:
        """Maps ``[S, H, W]`` for the (frame position, class index) samples, in batches of ``max_batch``."""
        model = self.model.model_for(
            needs_gradients=explainer.needs_gradients, prefers_module=explainer.module_preference()
        )
        maps = []
        for start in range(0, len(samples), self.max_batch):
            chunk = samples[start : start + self.max_batch]
            inputs = torch.from_numpy(batch[[position for position, _ in chunk]])
            maps.append(explainer.explain(model, inputs, [target for _, target in chunk]).cpu().numpy())
        if not maps:
            return np.zeros((0, *batch.shape[2:]), dtype=np.float32)
        return np.concatenate(maps)

    def _write_frame(
        self,
        ds: Dataset,
        method: str,
        frame_index: int,
        prediction: Prediction,
        results: list[ExplanationResult],
    ) -> list[OutputObject]:
        """The output objects of one frame and method: per finding its SC and PM; one SEG per kind
        with a segment per finding; the SR (every finding of a multi-label card, with its probability)."""
        written = [
            OutputObject(
                kind,
                method,
                frame_index,
                PER_FINDING_WRITERS[kind](ds, explained),
                explained.class_name if self.per_finding else None,
            )
            for explained in results
            for kind in self.outputs
            if kind in PER_FINDING_WRITERS
        ]
        shared = [
            OutputObject(kind, method, frame_index, SEGMENTATION_WRITERS[kind](ds, results))
            for kind in self.outputs
            if kind in SEGMENTATION_WRITERS and results
        ]
        if REPORT_KIND not in self.outputs:
            return [*written, *shared]
        if self.per_finding:
            report = self._findings_report(ds, method, frame_index, prediction, results, written, shared)
        else:
            (explained,) = results
            report = build_report(ds, explained, references=[o.dataset for o in (*written, *shared)])
        return [*written, *shared, OutputObject(REPORT_KIND, method, frame_index, report)]

    def _findings_report(
        self,
        ds: Dataset,
        method: str,
        frame_index: int,
        prediction: Prediction,
        results: list[ExplanationResult],
        written: list[OutputObject],
        shared: list[OutputObject],
    ) -> Dataset:
        """The SR of a multi-label frame: every class with its probability and presence, the explained
        ones with their own SC / PM and the frame's SEGs."""
        card = self.model.card
        explained = {result.class_name for result in results}
        statuses = [
            FindingStatus(name, probability, card.output.threshold(name), name in explained)
            for name, probability in zip(card.output.classes, prediction.probabilities)
        ]
        return build_findings_report(
            ds,
            ReportFrame(method, card.name, card.version, frame_index),
            statuses,
            [(result, [o.dataset for o in written if o.finding == result.class_name]) for result in results],
            shared_references=[o.dataset for o in shared],
        )

    def _ood_signals(self, batch: np.ndarray) -> list[OutOfDistributionSignal | None]:
        """The OOD signal of each image of a normalised batch; Nones without statistics."""
        if self.ood_detector is None:
            return [None] * len(batch)
        module = self.model.gradient_runner.torch_module
        return [
            OutOfDistributionSignal(score.distance, score.threshold, score.out_of_distribution)
            for score in self.ood_detector.score(module, batch)
        ]

    def _shortcut_signal(self, attribution: np.ndarray, region: OutsideAnatomy) -> ShortcutSignal:
        """Share and concentration of the positive attribution outside the anatomy, and the flag."""
        figures = shortcut_figures(attribution, region)
        return ShortcutSignal(
            share=figures.share,
            concentration=figures.concentration,
            suspected=is_shortcut_suspected(figures, self.shortcut_thresholds),
            share_threshold=self.shortcut_thresholds.share,
            concentration_threshold=self.shortcut_thresholds.concentration,
        )


def ood_detector(model: DeployedModel) -> OodDetector | None:
    """The OOD detector of the model card's ``auxiliary.ood_statistics``, checked against the model
    (feature layer and length, one forward pass of a zero image); ``None``, with a warning, for a
    card without statistics. A wrong statistics file raises :class:`service.trust.ood.OodError`."""
    card = model.card
    if "ood_statistics" not in card.auxiliary:
        log.warning(
            "model card %s has no auxiliary.ood_statistics: results carry no out-of-distribution signal "
            "(fit it with: pacs-xai model calibrate)",
            card.name,
        )
        return None
    statistics = OodStatistics.load(card.auxiliary_path("ood_statistics"))
    module = model.gradient_runner.torch_module
    detector = OodDetector.for_module(statistics, module, card.trust.ood.layer, card.trust.ood.distance)
    probe = np.zeros((1, card.input.channels, card.input.rows, card.input.columns), dtype=np.float32)
    detector.check_dimension(module, probe)
    return detector


def _log_flagged(source_uid: str, verdict: TrustVerdict, written: Sequence[OutputObject]) -> None:
    """One line per flagged result: what was flagged, with figures and UIDs, never patient data."""
    reasons = []
    if verdict.shortcut.suspected:
        reasons.append(
            f"explanation shortcut suspected ({verdict.shortcut.share_percent:.0f} % of the positive attribution "
            f"outside the anatomy, concentration {verdict.shortcut.concentration:.2f})"
        )
    if verdict.ood is not None and verdict.ood.out_of_distribution:
        reasons.append(
            f"input out of distribution (feature distance {verdict.ood.distance:.1f} > {verdict.ood.threshold:.1f})"
        )
    outputs = ", ".join(str(output.dataset.SOPInstanceUID) for output in written) or "none"
    log.warning(
        "result flagged: %s; source SOP Instance %s frame %d, method %s, outputs %s",
        "; ".join(reasons),
        source_uid,
        verdict.frame_index + 1,
        verdict.method,
        outputs,
    )


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
