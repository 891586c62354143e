"""``pacs-xai evaluate``: every model x method scored on a labelled set, with the node's own parts.

For each model card: the images go through the node's pixel path (:func:`dicom_io.pixels.prepare_frames`
with the card's input spec, first frame), the deployed model predicts, and for each method the
explainer the node would build (the card's settings, then the run's) explains the ground-truth
class of every image. Then, from :mod:`service.trust`:

- localisation on the source grid, on every image with a finding (the map taken back through the
  exact inverse of the model-grid mapping);
- deletion (pixels replaced by black, the model input of pixel value 0) and insertion (into a
  blurred image), with their random-order ratios, on every image with a finding, and ROAD
  on the first ``road_images`` of them, through the node's forward path (the inference pool: ONNX
  Runtime where the card ships it);
- the cascading randomisation and the random-logit check on the first ``randomisation_images``
  images with a finding, on the card's torch module (re-initialised copies);
- seed repeatability of stochastic methods and the ONNX-vs-torch agreement of forward-only
  methods on the first ``repeatability_images``;
- cost: milliseconds per image and the model rows run with and without gradients;
- the out-of-distribution signal on what the method showed the model: a uniform sample
  (reservoir, :data:`INPUT_SAMPLE` rows) of the inputs it ran through the model while explaining,
  scored by the card's OOD statistics (their share above the threshold and median distance);
- per model, the same signal on images with random regions filled by a constant, a blur and the
  healthy appearance h(x) (:mod:`service.trust.perturbed`, Uzunova et al. 2019's argument);
- shortcut exposure: the share of positive attribution outside the anatomy on every image (the
  node's own signal, :mod:`service.trust.shortcut`), how many results the card's thresholds would
  flag, and the thresholds this set suggests (its 99th percentiles, when the set is honest).

A method entry may be a variant, ``NAME:LABEL`` with settings of its own
(:mod:`service.tools.evaluate.variants`), so that one method under several settings is scored side
by side. Nothing here computes a metric itself: it chooses the images, runs the parts and collects
the figures into :class:`~service.tools.evaluate.scorecard.Scorecard`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicom_io.pixels import PreparedFrame, prepare_frames, shutter_mask
from service.explain import Explainer, get_explainer
from service.explain.base import ModelLike
from service.explain.healthy import CARD_ENTRY as HEALTHY_CARD_ENTRY
from service.explain.healthy import HealthyAppearance
from service.explain.methods.perturbation import gaussian_blur
from service.inference.card import ModelCard
from service.inference.deployed import DeployedModel
from service.inference.runner import Runner
from service.node.pipeline import card_settings, ood_detector
from service.tools.bench.measure import RowCounter, input_layer
from service.tools.evaluate.labelled import LabelledImage, LabelledSet
from service.tools.evaluate.scorecard import PER_CLASS_COLUMNS, Examples, Figure, Row, Scorecard
from service.tools.evaluate.variants import split_variant, variant_settings
from service.tools.progress import Progress
from service.trust import faithfulness, localisation, randomisation, repeatability
from service.trust.ood import OodDetector
from service.trust.perturbed import perturbed_ood
from service.trust.shortcut import (
    OutsideAnatomy,
    ShortcutFigures,
    ShortcutThresholds,
    is_shortcut_suspected,
    outside_anatomy,
    shortcut_figures,
    thresholds_from_honest,
)

#: How the fraction of pixels steps in the deletion and insertion curves (1/25 of the image a step).
CURVE_STEPS = 25
#: Settings a run uses unless it is given others (``--param``), so that the issue's budget holds
#: (60 phantoms x five methods in 10 minutes on 2 cores): RISE with 1,000 masks instead of the
#: node's 4,000 (6.8 s an image on this CPU). The scorecard row shows the settings it measured.
EVALUATION_DEFAULTS: dict[str, dict[str, Any]] = {"rise": {"masks": 1000}}
#: Most model inputs a method ran that are kept (a uniform sample) for their out-of-distribution figures.
INPUT_SAMPLE = 256
#: Lesion images per class whose maps the scorecard's pictures show.
EXAMPLES_PER_CLASS = 2
#: The fills of the perturbed-image OOD table: the perturbation methods' default constant (0.0, the
#: card's mean) and blur (10 px).
TABLE_BASELINE, TABLE_BLUR_SIGMA = 0.0, 10.0


@dataclass(frozen=True)
class EvaluationSettings:
    """What one ``pacs-xai evaluate`` run does besides its models, methods and images."""

    methods: tuple[str, ...]
    #: Per method, settings on top of the card's (as ``explain.method_params`` in the node config).
    method_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    randomisation_images: int = 8
    road_images: int = 8
    repeatability_images: int = 4
    batch_size: int = 8
    seed: int = 0


@dataclass
class _Prepared:
    """The set as this model sees it."""

    images: list[LabelledImage]
    frames: list[PreparedFrame]
    inputs: torch.Tensor  # [N, C, H, W] normalised
    targets: list[int]  # the ground-truth class per image
    regions: list[OutsideAnatomy]  # outside the anatomy, per image, on the source grid


def shortcut_calibration(rows: Sequence[Row]) -> dict[str, Any]:
    """The shortcut thresholds the rows' (honest) results suggest: the 99th percentiles of share and
    concentration over every method's results, as :func:`service.trust.shortcut.thresholds_from_honest`."""
    figures = [
        ShortcutFigures(share, 0.0, concentration) for row in rows for share, concentration in row.shortcut_figures
    ]
    suggested = thresholds_from_honest(figures)
    return {
        "results": len(figures),
        "suggested": {"share": round(suggested.share, 3), "concentration": round(suggested.concentration, 3)},
        "note": "99th percentiles over every method's results; valid only when the set is honest (no shortcut)",
    }


def evaluate(
    cards: Sequence[Path],
    labelled: LabelledSet,
    settings: EvaluationSettings,
    progress: Progress,
    *,
    device: str = "auto",
) -> Scorecard:
    """Score every card x method on ``labelled``."""
    started = time.perf_counter()
    scorecard = Scorecard(
        labelled.description, len(labelled.images), len(labelled.lesions), skipped=list(labelled.skipped)
    )
    for card_path in cards:
        model = DeployedModel.from_card_path(card_path, device=device)  # type: ignore[arg-type]
        scorecard.device = model.forward_runner.device
        try:
            prepared = _prepare(model, labelled, scorecard.skipped, progress)
            detector = ood_detector(model)
            examples = _example_images(prepared)
            rows = [
                _evaluate_method(model, prepared, method, settings, progress, detector, examples)
                for method in settings.methods
            ]
            scorecard.rows.extend(rows)
            scorecard.shortcut_calibration[model.card.name] = shortcut_calibration(rows)
            scorecard.examples[model.card.name] = Examples(
                {prepared.images[i].name: prepared.inputs[i, 0].numpy() for i in examples},
                {prepared.images[i].name: _model_grid_mask(prepared, i) for i in examples},
            )
            if detector is not None:
                progress(f"{model.card.name}: out-of-distribution signal on images with filled regions")
                scorecard.perturbed_ood[model.card.name] = _perturbed_ood_table(model, prepared, detector, settings)
        finally:
            model.close()
    scorecard.seconds = time.perf_counter() - started
    return scorecard


def _prepare(model: DeployedModel, labelled: LabelledSet, skipped: list[str], progress: Progress) -> _Prepared:
    card = model.card
    images, frames, targets, regions = [], [], [], []
    edge_band = card.trust.shortcut.edge_band
    for image in labelled.images:
        if image.label not in card.output.classes:
            skipped.append(f"{image.name}: class {image.label!r} is not one of model {card.name}'s classes")
            continue
        images.append(image)
        frame = prepare_frames(image.dataset, card.input.spec())[0]
        frames.append(frame)
        targets.append(card.class_index(image.label))
        regions.append(outside_anatomy(frame.display, shutter_mask(image.dataset), edge_band=edge_band))
    if not images:
        raise ValueError(f"no image of the set has a class of model {card.name} ({', '.join(card.output.classes)})")
    inputs = torch.from_numpy(model.normalise(np.stack([frame.model_input for frame in frames])))
    progress(f"{card.name} {card.version}: {len(images)} images prepared on {model.forward_runner.device}")
    return _Prepared(images, frames, inputs, targets, regions)


def _evaluate_method(
    model: DeployedModel,
    prepared: _Prepared,
    entry: str,
    settings: EvaluationSettings,
    progress: Progress,
    detector: OodDetector | None = None,
    examples: Sequence[int] = (),
) -> Row:
    card = model.card
    method, variant = split_variant(entry)
    method_settings = {
        **card_settings(card, method),
        **EVALUATION_DEFAULTS.get(method, {}),
        **variant_settings(entry, settings.method_params),
    }
    explainer = get_explainer(method, **method_settings)
    explained_model = model.model_for(needs_gradients=explainer.needs_gradients)
    row = Row(
        card.name, card.version, method, {key: _plain(value) for key, value in method_settings.items()}, variant=variant
    )
    label = f"{card.name} {entry}"

    sample = InputSample(INPUT_SAMPLE, settings.seed)
    maps, seconds, rows_run = _explain_all(
        explainer, explained_model, prepared, settings.batch_size, progress, label, sample
    )
    count = len(prepared.images)
    row.figures["ms_per_image"] = Figure(1000 * seconds / count, count)
    row.figures["forward_passes_per_image"] = Figure(rows_run[0] / count, count)
    row.figures["backward_passes_per_image"] = Figure(rows_run[1] / count, count)
    row.example_maps = {prepared.images[i].name: maps[i] for i in examples}
    if detector is not None and sample.rows:
        scores = detector.score(model.gradient_runner.torch_module, np.stack(sample.rows))
        row.figures["perturbed_ood_flag_rate"] = Figure(
            float(np.mean([s.out_of_distribution for s in scores])), len(scores)
        )
        row.figures["perturbed_ood_distance_p50"] = Figure(float(np.median([s.distance for s in scores])), len(scores))

    _shortcut_exposure(row, card, prepared, maps)
    lesions = [i for i, image in enumerate(prepared.images) if image.mask is not None]
    if lesions:
        on_source = [prepared.frames[i].mapping.to_source_grid(maps[i]) for i in lesions]
        masks = [prepared.images[i].mask for i in lesions]
        _localisation(row.figures, on_source, masks)
        for class_name in dict.fromkeys(prepared.images[i].label for i in lesions):
            chosen = [k for k, i in enumerate(lesions) if prepared.images[i].label == class_name]
            _localisation(
                row.per_class.setdefault(class_name, {}), [on_source[k] for k in chosen], [masks[k] for k in chosen]
            )
        _faithfulness(row, model, prepared, maps, lesions, settings, progress, label)
        baseline = None
        if len(lesions) > 1:
            baseline = Figure(randomisation.ssim_baseline(maps[lesions], seed=settings.seed), len(lesions))
        _randomisation(
            row,
            model,
            explainer,
            prepared,
            lesions[: settings.randomisation_images],
            baseline,
            settings,
            progress,
            label,
        )
    else:
        row.figures["hit_rate"] = Figure(None, 0, "no image with a ground-truth finding")
    _repeatability(row, model, explainer, method, method_settings, prepared, settings)
    return row


def _explain_all(
    explainer: Explainer,
    explained_model: ModelLike,
    prepared: _Prepared,
    batch_size: int,
    progress: Progress,
    label: str,
    sample: InputSample | None = None,
) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Maps ``[N, H, W]`` of every image, the seconds it took, and the model rows run without and with
    gradients (counted at the torch module's input layer, or at the forward-only runner); the rows
    themselves go to ``sample`` (the sampling is inside the timed calls: a copy per kept row)."""
    counter = None
    hook = None
    if isinstance(explained_model, torch.nn.Module):
        counter = RowCounter(input_layer(explained_model, prepared.inputs[:1]))
        if sample is not None:
            hook = explained_model.register_forward_pre_hook(lambda _module, args: sample.offer(args[0]))
    else:
        explained_model = _CountingRunner(explained_model, sample)
    maps, seconds = [], 0.0
    total = len(prepared.images)
    try:
        for first in range(0, total, batch_size):
            batch = prepared.inputs[first : first + batch_size]
            targets = prepared.targets[first : first + batch_size]
            started = time.perf_counter()
            if counter is not None:
                with counter:
                    result = explainer.explain(explained_model, batch, targets)
            else:
                result = explainer.explain(explained_model, batch, targets)
            seconds += time.perf_counter() - started
            maps.append(result.cpu().numpy())
            progress(_bar(f"{label}: explain", min(first + batch_size, total), total))
    finally:
        if hook is not None:
            hook.remove()
    if counter is not None:
        rows = (counter.nograd_rows, counter.grad_rows)
    else:
        rows = (explained_model.rows, 0)
    return np.concatenate(maps), seconds, rows


class InputSample:
    """A uniform random sample of at most ``size`` of the rows offered to it (reservoir sampling,
    Vitter's algorithm R), from ``seed``: the model inputs a method ran, as float32 ``[C, H, W]``."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.rows: list[np.ndarray] = []
        self.offered = 0
        self._random = np.random.default_rng(seed)

    def offer(self, batch: torch.Tensor | np.ndarray) -> None:
        """Consider each row of ``batch`` ``[N, C, H, W]``."""
        for index in range(int(batch.shape[0])):
            self.offered += 1
            slot = len(self.rows) if len(self.rows) < self.size else int(self._random.integers(self.offered))
            if slot < self.size:
                row = batch[index]
                copy = row.detach().to("cpu", torch.float32).numpy() if isinstance(row, torch.Tensor) else row
                copy = np.array(copy, dtype=np.float32)
                if slot == len(self.rows):
                    self.rows.append(copy)
                else:
                    self.rows[slot] = copy


class _CountingRunner:
    """A forward-only runner (the inference pool) that counts the rows it is given and offers them to a sample."""

    torch_module = None

    def __init__(self, runner: Runner, sample: InputSample | None = None) -> None:
        self._runner = runner
        self._sample = sample
        self.rows = 0

    @property
    def device(self) -> str:
        return self._runner.device

    def forward(self, batch: np.ndarray) -> np.ndarray:
        self.rows += int(batch.shape[0])
        if self._sample is not None:
            self._sample.offer(batch)
        return self._runner.forward(batch)


def _perturbed_ood_table(
    model: DeployedModel, prepared: _Prepared, detector: OodDetector, settings: EvaluationSettings
) -> list[dict[str, Any]]:
    """The OOD verdicts on every image with random regions filled by the constant, the blur and, where
    the card has a healthy-appearance model, h(x) (:func:`service.trust.perturbed.perturbed_ood`)."""
    inputs = prepared.inputs
    replacements = {
        f"constant {TABLE_BASELINE:g}": torch.full_like(inputs, TABLE_BASELINE),
        f"blur {TABLE_BLUR_SIGMA:g} px": gaussian_blur(inputs, TABLE_BLUR_SIGMA),
    }
    if HEALTHY_CARD_ENTRY in model.card.auxiliary:
        healthy = HealthyAppearance(model.card.auxiliary_path(HEALTHY_CARD_ENTRY))
        replacements["healthy h(x)"] = torch.cat([healthy(part) for part in inputs.split(settings.batch_size)])
    module = model.gradient_runner.torch_module
    results = perturbed_ood(detector, module, inputs, replacements, seed=settings.seed)
    return [
        {
            "fill": result.fill,
            "fraction": result.fraction,
            "flag_rate": result.flag_rate,
            "distance_p50": result.distance_p50,
            "images": result.images,
        }
        for result in results
    ]


def _example_images(prepared: _Prepared) -> list[int]:
    """The first :data:`EXAMPLES_PER_CLASS` images of each lesion class (the pictures' rows)."""
    chosen: dict[str, list[int]] = {}
    for index, image in enumerate(prepared.images):
        if image.mask is not None and len(chosen.setdefault(image.label, [])) < EXAMPLES_PER_CLASS:
            chosen[image.label].append(index)
    return [index for indices in chosen.values() for index in indices]


def _model_grid_mask(prepared: _Prepared, index: int) -> np.ndarray:
    """The ground-truth mask of image ``index`` on the model grid (bool ``[H, W]``), for the pictures."""
    mask = prepared.images[index].mask
    assert mask is not None
    return prepared.frames[index].mapping.to_model_grid(mask.astype(np.float32)) > 0.5


def _shortcut_exposure(row: Row, card: ModelCard, prepared: _Prepared, maps: np.ndarray) -> None:
    figures = [
        shortcut_figures(frame.mapping.to_source_grid(saliency), region)
        for frame, saliency, region in zip(prepared.frames, maps, prepared.regions)
    ]
    shares = np.array([figure.share for figure in figures])
    thresholds = ShortcutThresholds(card.trust.shortcut.share, card.trust.shortcut.concentration)
    flagged = [is_shortcut_suspected(figure, thresholds) for figure in figures]
    count = len(figures)
    row.figures["outside_anatomy_share_p50"] = Figure(float(np.percentile(shares, 50)), count)
    row.figures["outside_anatomy_share_p99"] = Figure(float(np.percentile(shares, 99)), count)
    row.figures["shortcut_flag_rate"] = Figure(float(np.mean(flagged)), count)
    row.shortcut_figures = [(figure.share, figure.concentration) for figure in figures]


def _localisation(figures: dict[str, Figure], maps: list[np.ndarray], masks: list[np.ndarray]) -> None:
    summary = localisation.localisation_summary(maps, masks)
    for name in PER_CLASS_COLUMNS:
        figures[name] = Figure(getattr(summary, name), summary.images)


def _faithfulness(
    row: Row,
    model: DeployedModel,
    prepared: _Prepared,
    maps: np.ndarray,
    lesions: list[int],
    settings: EvaluationSettings,
    progress: Progress,
    label: str,
) -> None:
    batch, lesion_maps = prepared.inputs[lesions], maps[lesions]
    targets = [prepared.targets[i] for i in lesions]
    activation = model.card.output.activation
    pixels = lesion_maps.shape[1] * lesion_maps.shape[2]
    step = max(1, pixels // CURVE_STEPS)
    progress(f"{label}: deletion and insertion on {len(lesions)} images")
    deletion = faithfulness.deletion(
        model.pool,
        batch,
        lesion_maps,
        targets,
        baseline=_black(model.card),
        pixels_per_step=step,
        activation=activation,
        seed=settings.seed,
    )
    insertion = faithfulness.insertion(
        model.pool, batch, lesion_maps, targets, pixels_per_step=step, activation=activation, seed=settings.seed
    )
    count = len(lesions)
    row.figures["deletion_auc"] = Figure(float(deletion.auc.mean()), count)
    row.figures["deletion_ratio"] = Figure(float(deletion.ratio.mean()), count)
    row.figures["insertion_auc"] = Figure(float(insertion.auc.mean()), count)
    row.figures["insertion_ratio"] = Figure(float(insertion.ratio.mean()), count)
    row.curves = {
        "deletion": _mean_curve(deletion.curve),
        "insertion": _mean_curve(insertion.curve),
    }
    chosen = lesions[: settings.road_images]
    if not chosen:
        row.figures["road_combined"] = Figure(None, 0, "not run (road_images 0)")
        return
    progress(f"{label}: ROAD on {len(chosen)} images")
    road = faithfulness.road(
        model.pool,
        prepared.inputs[chosen],
        maps[chosen],
        [prepared.targets[i] for i in chosen],
        activation=activation,
        seed=settings.seed,
    )
    for name in ("morf", "lerf", "combined"):
        row.figures[f"road_{name}"] = Figure(float(getattr(road, name).mean()), len(chosen))


def _randomisation(
    row: Row,
    model: DeployedModel,
    explainer: Explainer,
    prepared: _Prepared,
    chosen: list[int],
    baseline: Figure | None,
    settings: EvaluationSettings,
    progress: Progress,
    label: str,
) -> None:
    """The cascade on the ``chosen`` images; the verdict against ``baseline``, the mean SSIM of 50 random
    pairs of the trained maps of every image with a finding (a steadier estimate than the subset's)."""
    if not chosen:
        row.figures["randomisation_passes"] = Figure(None, 0, "not run (randomisation_images 0)")
        return
    if len(chosen) < 2 or baseline is None:
        row.figures["randomisation_passes"] = Figure(None, len(chosen), "needs at least 2 images with a finding")
        return
    module = model.gradient_runner.torch_module
    batch, targets = prepared.inputs[chosen], [prepared.targets[i] for i in chosen]
    progress(f"{label}: cascading randomisation on {len(chosen)} images")
    cascade = randomisation.cascading_randomisation(module, explainer, batch, targets, seed=settings.seed)
    row.randomisation_steps = [
        {"layer": step.layer, "ssim": float(step.ssim.mean()), "spearman": float(step.spearman.mean())}
        for step in cascade.steps
    ]
    row.figures["randomisation_ssim"] = Figure(cascade.verdict_ssim, len(chosen))
    row.figures["randomisation_baseline"] = baseline
    row.figures["randomisation_passes"] = Figure(float(cascade.verdict_ssim <= baseline.value), len(chosen))
    logit = randomisation.random_logit(
        module, explainer, batch, targets, num_classes=len(model.card.output.classes), seed=settings.seed
    )
    row.figures["random_logit_ssim"] = Figure(float(logit.ssim.mean()), len(chosen))


def _repeatability(
    row: Row,
    model: DeployedModel,
    explainer: Explainer,
    method: str,
    method_settings: Mapping[str, Any],
    prepared: _Prepared,
    settings: EvaluationSettings,
) -> None:
    count = min(settings.repeatability_images, len(prepared.images))
    if count == 0:
        return
    batch, targets = prepared.inputs[:count], prepared.targets[:count]
    if repeatability.stochastic(method):
        extra = {key: value for key, value in method_settings.items() if key != "seed"}
        explained = model.model_for(needs_gradients=explainer.needs_gradients)
        seeds = repeatability.seed_repeatability(explained, method, batch, targets, settings=extra)
        row.figures["seed_repeatability_ssim"] = Figure(float(seeds.ssim.mean()), count)
    if not explainer.needs_gradients and "onnx" in model.card.weights:
        agreement = repeatability.model_path_agreement(
            explainer, model.pool, model.gradient_runner.torch_module, batch, targets
        )
        row.figures["path_agreement_pearson"] = Figure(float(agreement.pearson.mean()), count)


def _black(card: ModelCard) -> float:
    """The model input of a black pixel (value 0: no attenuation, air), averaged over the channels:
    the deletion baseline. On a radiograph, removing evidence means removing tissue; the normalised 0
    is mid-grey, which reads as soft tissue (to the demo model, grey patches even raise p(nodule))."""
    return float(card.input.normalise(np.zeros((1, card.input.channels, 1, 1), dtype=np.float32)).mean())


def _mean_curve(curve: faithfulness.PerturbationCurve) -> dict[str, list[float]]:
    return {
        "fraction": [float(x) for x in curve.fractions],
        "probability": [float(p) for p in curve.probabilities.mean(axis=0)],
    }


def _bar(label: str, done: int, total: int, width: int = 24) -> str:
    filled = round(width * done / total)
    return f"{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


def _plain(value: Any) -> Any:
    """A setting as JSON can hold it (paths as text, explainer instances by name)."""
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, Explainer):
        return value.name
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return str(value)
