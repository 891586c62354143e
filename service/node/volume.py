"""A whole CT or MR series in, its explained DICOM objects out, for a volume model (``input.kind: volume``).

assemble -> prepare -> infer -> explain -> draw back -> encode, once per series:

1. **assemble** (:func:`dicom_io.pixels.volume.assemble_volume`): the instances sorted along the
   slice normal, geometry checked; a series with a gap, mixed orientations, inconsistent sizes or
   too few slices is skipped whole, with the reason (:attr:`SeriesResult.skipped_reason`, a short
   :attr:`SeriesResult.skip_code` for metrics, a log line with UIDs only); never half-processed;
2. **prepare**: resampled to the card's voxel spacing and grid, windowed, normalised;
3. **infer**: one forward pass, the predicted class;
4. **explain**: every configured method on the ``[1, 1, D, H, W]`` volume (methods that cannot
   take volumes are refused when the pipeline is built, naming them);
5. **draw back** (:class:`dicom_io.pixels.volume.VolumeGrid`): the map onto the source voxels;
6. **encode** (:mod:`dicom_io.writers.volume`): multi-frame Parametric Map and Segmentation in the
   source's Frame of Reference, one Secondary Capture per slice or per key slice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from pydicom.dataset import Dataset

from dicom_io.pixels.volume import VolumeError, assemble_volume, prepare_volume
from dicom_io.writers.volume import (
    VolumeExplanation,
    build_volume_parametric_map,
    build_volume_secondary_captures,
    build_volume_segmentation,
)
from service.explain import Explainer, explainer_class, get_explainer
from service.explain.registry import available_explainers
from service.inference.deployed import DeployedModel, Prediction
from service.node.pipeline import OutputObject, PipelineConfigError, card_settings
from service.synthetic.volumes import ct_series, make_ct_phantom

log = logging.getLogger(__name__)

#: Output kinds of a volume explanation (``sc``: one per slice, or per key slice with ``key_slices``).
VOLUME_OUTPUTS = ("pm", "seg_fractional", "seg_binary", "sc")
#: Every :attr:`SeriesResult.skip_code` (the ``reason`` label of ``pacsxai_volume_series_skipped_total``):
#: the codes of :class:`dicom_io.pixels.volume.VolumeError`, ``not_applicable`` (the card's
#: ``applies_to``) and ``incomplete`` (the node got the series in several batches); anything else
#: is counted as ``other``.
VOLUME_SKIP_REASONS = (
    "gap",
    "duplicate_position",
    "mixed_orientation",
    "tilted",
    "inconsistent_size",
    "inconsistent_spacing",
    "too_few_slices",
    "missing_geometry",
    "not_grayscale",
    "mixed_series",
    "not_applicable",
    "incomplete",
    "other",
)
#: Slices, rows and columns of the synthetic CT series :meth:`VolumePipeline.warm_up` explains.
WARM_UP_SHAPE = (16, 32, 32)


@dataclass
class SeriesResult:
    """Everything the volume pipeline did with one series."""

    series_instance_uid: str
    modality: str
    instances: int
    #: Why the series was not explained (None: it was); ``skip_code`` is its short form for metrics.
    skipped_reason: str | None = None
    skip_code: str | None = None
    prediction: Prediction | None = None
    #: ``frame_index`` is the slice index (in the sorted volume) for SC outputs, 0 for the others.
    outputs: list[OutputObject] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)


def volume_methods() -> tuple[str, ...]:
    """The registry names of the methods that take volumes."""
    return tuple(name for name in available_explainers() if explainer_class(name).supports_volumes)


class VolumePipeline:
    """Configured once with a volume model, its explainers and output kinds; then ``process`` series."""

    def __init__(
        self,
        model: DeployedModel,
        methods: Sequence[str],
        outputs: Sequence[str] = ("pm", "seg_fractional"),
        *,
        method_params: Mapping[str, Mapping[str, object]] | None = None,
        key_slices: int | None = None,
        enforce_applies_to: bool = True,
    ) -> None:
        card = model.card
        if card.input.kind != "volume":
            raise PipelineConfigError(
                f"model {card.name} takes input.kind: {card.input.kind}; the volume pipeline needs a volume model"
            )
        if not methods:
            raise PipelineConfigError("no explainer method given; name at least one (e.g. gradcam)")
        image_only = [method for method in methods if not explainer_class(method).supports_volumes]
        if image_only:
            raise PipelineConfigError(
                f"{', '.join(image_only)} cannot explain volumes (model {card.name} takes input.kind: volume); "
                f"methods that can: {', '.join(volume_methods())}"
            )
        unknown = [kind for kind in outputs if kind not in VOLUME_OUTPUTS]
        if unknown:
            raise PipelineConfigError(f"unknown volume output kind(s) {unknown}; available: {list(VOLUME_OUTPUTS)}")
        if key_slices is not None and key_slices < 1:
            raise PipelineConfigError(f"key_slices must be at least 1, got {key_slices}")
        params = method_params or {}
        self.model = model
        self.outputs = tuple(outputs)
        self.key_slices = key_slices
        self.enforce_applies_to = enforce_applies_to
        self.explainers: dict[str, Explainer] = {
            method: get_explainer(method, **{**card_settings(card, method), **params.get(method, {})})
            for method in methods
        }

    def warm_up(self) -> float:
        """Explain one small synthetic CT series with every configured method and output kind, keep
        nothing, and return the seconds it took (the first series otherwise pays for the lazy
        initialisation, as for :meth:`service.node.pipeline.ExplainPipeline.warm_up`)."""
        started = time.perf_counter()
        slices = max(WARM_UP_SHAPE[0], self.model.card.input.min_slices)
        phantom = make_ct_phantom(0, "nodule", shape=(slices, *WARM_UP_SHAPE[1:]), spacing=(5.0, 8.0, 8.0))
        series = ct_series(phantom)
        self._explain(series, SeriesResult(str(series[0].SeriesInstanceUID), "CT", len(series)))
        return time.perf_counter() - started

    def process(self, datasets: Sequence[Dataset]) -> SeriesResult:
        """Explain one series (its instances in any order), or say why it was skipped."""
        card = self.model.card
        first = datasets[0] if datasets else Dataset()
        result = SeriesResult(
            series_instance_uid=str(first.get("SeriesInstanceUID", "")),
            modality=str(first.get("Modality", "")),
            instances=len(datasets),
        )
        if self.enforce_applies_to and datasets:
            reason = card.applies_to_dataset(
                result.modality, str(first.get("SOPClassUID", "")), str(first.get("BodyPartExamined", ""))
            )
            if reason:
                return self._skip(result, "not_applicable", f"model {card.name} does not apply: {reason}")
        return self._explain(datasets, result)

    def _explain(self, datasets: Sequence[Dataset], result: SeriesResult) -> SeriesResult:
        card = self.model.card
        started = time.perf_counter()
        try:
            volume = assemble_volume(datasets, min_slices=card.input.min_slices)
        except VolumeError as exc:
            return self._skip(result, exc.reason, str(exc))
        spacing, window = card.input.spacing, card.input.window
        assert spacing is not None and window is not None
        shape = card.input.shape()[1:]
        unit, grid = prepare_volume(volume, shape, spacing, window)
        batch = self.model.normalise(unit[None, None])
        result.timings_ms["prepare"] = (time.perf_counter() - started) * 1000.0
        started = time.perf_counter()
        prediction = self.model.predict(batch)[0]
        result.prediction = prediction
        result.timings_ms["infer"] = (time.perf_counter() - started) * 1000.0
        display = np.clip((volume.values - window[0]) / (window[1] - window[0]), 0.0, 1.0).astype(np.float32)
        sources = list(volume.sources)
        for method, explainer in self.explainers.items():
            started = time.perf_counter()
            model = self.model.model_for(
                needs_gradients=explainer.needs_gradients, prefers_module=explainer.module_preference()
            )
            maps = explainer.explain(model, torch.from_numpy(batch), [prediction.class_index])
            attribution = grid.to_source(maps[0].cpu().numpy())
            result.timings_ms[f"explain:{method}"] = (time.perf_counter() - started) * 1000.0
            started = time.perf_counter()
            explanation = VolumeExplanation(
                method=method,
                class_name=prediction.class_name,
                probability=prediction.probability,
                model_name=card.name,
                model_version=card.version,
                attribution=attribution,
                display=display,
            )
            result.outputs.extend(self._encode(sources, explanation))
            result.timings_ms[f"encode:{method}"] = (time.perf_counter() - started) * 1000.0
        return result

    def _encode(self, sources: list[Dataset], explanation: VolumeExplanation) -> list[OutputObject]:
        objects = []
        method = explanation.method
        for kind in self.outputs:
            if kind == "pm":
                objects.append(OutputObject(kind, method, 0, build_volume_parametric_map(sources, explanation)))
            elif kind in ("seg_fractional", "seg_binary"):
                seg = build_volume_segmentation(sources, explanation, kind=kind.removeprefix("seg_"))  # type: ignore[arg-type]
                objects.append(OutputObject(kind, method, 0, seg))
            else:
                for index, sc in build_volume_secondary_captures(sources, explanation, key_slices=self.key_slices):
                    objects.append(OutputObject(kind, method, index, sc))
        return objects

    @staticmethod
    def _skip(result: SeriesResult, code: str, reason: str) -> SeriesResult:
        result.skipped_reason, result.skip_code = reason, code
        log.warning("series %s skipped (%s): %s", result.series_instance_uid, code, reason)
        return result
