"""The scorecard of ``pacs-xai evaluate``: one row per model x method, every figure tagged with the
Co-12 property it measures (Nauta et al., "From Anecdotal Evidence to Quantitative Evaluation
Methods: A Systematic Review on Evaluating Explainable AI", ACM Computing Surveys 2023), written as
``scorecard.json`` (every figure, its definition and sample count) and ``scorecard.md`` (the
table a governance board reads, with the definitions below it).
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from service import __version__

#: name -> (Co-12 property, what it is, which way is better). The exact definitions are in
#: :mod:`service.trust` (localisation, faithfulness, randomisation, repeatability).
METRICS: dict[str, tuple[str, str, str]] = {
    "hit_rate": (
        "Coherence",
        "share of lesion images whose map maximum, on the source grid, lies inside the ground truth "
        "(CheXlocalize, Saporta et al. 2022)",
        "higher",
    ),
    "mean_iou": (
        "Coherence",
        "IoU of the min-max-normalised map thresholded by Otsu with the ground truth, mean (CheXlocalize)",
        "higher",
    ),
    "relevance_mass_accuracy": (
        "Coherence",
        "positive attribution inside the ground truth / all positive attribution, mean (Quantus)",
        "higher",
    ),
    "pointing_game": (
        "Coherence",
        "share of lesion images whose map maximum lies within 15 px of the ground truth (Zhang et al. 2018)",
        "higher",
    ),
    "deletion_auc": (
        "Correctness",
        "area under the target probability as the most relevant pixels are replaced by the baseline "
        "(Petsiuk et al. 2018)",
        "lower",
    ),
    "deletion_ratio": ("Correctness", "deletion AUC / the same with a random pixel order (< 1 beats chance)", "lower"),
    "insertion_auc": (
        "Correctness",
        "area under the target probability as the most relevant pixels are put back into a blurred image "
        "(Petsiuk et al. 2018)",
        "higher",
    ),
    "insertion_ratio": (
        "Correctness",
        "insertion AUC / the same with a random pixel order (> 1 beats chance)",
        "higher",
    ),
    "road_morf": (
        "Correctness",
        "mean probability change with the most relevant 10..90 % imputed (ROAD, Rong et al. 2022)",
        "lower",
    ),
    "road_lerf": ("Correctness", "the same with the least relevant 10..90 % imputed (ROAD)", "higher"),
    "road_combined": ("Correctness", "(LeRF - MoRF) / 2 (ROAD, as pytorch-grad-cam's ROADCombined)", "higher"),
    "randomisation_ssim": (
        "Correctness",
        "mean SSIM of the maps to the trained model's once the head and the last feature block are "
        "re-initialised (cascading randomisation, Adebayo et al. 2018)",
        "lower",
    ),
    "randomisation_baseline": (
        "Correctness",
        "mean SSIM of 50 random pairs of the trained model's maps of different images (Arun et al. 2021)",
        "reference",
    ),
    "randomisation_passes": (
        "Correctness",
        "1 when randomisation_ssim <= randomisation_baseline: the map depends on what the model learned",
        "1",
    ),
    "random_logit_ssim": (
        "Contrastivity",
        "SSIM of the map for a random other class to the map for the target class (Sixt et al. 2020)",
        "lower",
    ),
    "seed_repeatability_ssim": ("Consistency", "mean pairwise SSIM of the maps over 3 seeds", "higher"),
    "path_agreement_pearson": (
        "Consistency",
        "Pearson correlation of the maps through the node's ONNX path and the torch module",
        "higher",
    ),
    "outside_anatomy_share_p50": (
        "Coherence",
        "median share of positive attribution outside the anatomy (image edge band, outside the body, "
        "burned-in text and markers) over all images",
        "lower",
    ),
    "outside_anatomy_share_p99": ("Coherence", "99th percentile of the same share", "lower"),
    "shortcut_flag_rate": ("Coherence", "share of all images whose result the node would flag as a shortcut", "lower"),
    "perturbed_ood_flag_rate": (
        "Correctness",
        "share of the inputs the method ran through the model (a uniform sample of up to 256) that the card's "
        "out-of-distribution signal flags: how often the method's scores come from images unlike the training "
        "data (Uzunova et al. 2019; Mahalanobis distance, Lee et al. 2018)",
        "lower",
    ),
    "perturbed_ood_distance_p50": (
        "Correctness",
        "median Mahalanobis distance of those inputs to the training data (the card's threshold flags above it)",
        "lower",
    ),
    "ms_per_image": ("cost (no Co-12 property)", "wall time of the explanation per image, milliseconds", "lower"),
    "forward_passes_per_image": ("cost (no Co-12 property)", "model rows run without gradients per image", "lower"),
    "backward_passes_per_image": (
        "cost (no Co-12 property)",
        "model rows run with gradients (forward + backward) per image",
        "lower",
    ),
}

#: The columns of the Markdown table, in order.
TABLE_COLUMNS = (
    "hit_rate",
    "pointing_game",
    "mean_iou",
    "relevance_mass_accuracy",
    "deletion_ratio",
    "insertion_ratio",
    "road_combined",
    "randomisation_ssim",
    "randomisation_baseline",
    "random_logit_ssim",
    "outside_anatomy_share_p50",
    "perturbed_ood_flag_rate",
    "ms_per_image",
)

#: The localisation figures also given per ground-truth class.
PER_CLASS_COLUMNS = ("hit_rate", "pointing_game", "mean_iou", "relevance_mass_accuracy")


@dataclass(frozen=True)
class Figure:
    """One measured figure: its value (None when not measured, with the reason) and on how many images."""

    value: float | None
    images: int
    note: str = ""


@dataclass
class Examples:
    """What the pictures show besides the maps: the example images (model grid, normalised) and
    their ground-truth masks (model grid), by image name. Not written to ``scorecard.json``."""

    images: dict[str, Any] = field(default_factory=dict)
    masks: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    """One model x method (or a variant of a method, ``method:variant``, with settings of its own)."""

    model: str
    model_version: str
    method: str
    settings: dict[str, Any]
    #: The variant's label (``occlusion:healthy`` -> ``healthy``); ``None`` for the method as configured.
    variant: str | None = None
    figures: dict[str, Figure] = field(default_factory=dict)
    #: Localisation per ground-truth class: class -> figure name -> figure.
    per_class: dict[str, dict[str, Figure]] = field(default_factory=dict)
    #: Per step of the cascading randomisation: layer, mean SSIM, mean Spearman.
    randomisation_steps: list[dict[str, Any]] = field(default_factory=list)
    #: (share, concentration) of every image's explanation outside the anatomy, for the calibration.
    shortcut_figures: list[tuple[float, float]] = field(default_factory=list)
    #: Mean deletion and insertion curves: fraction of pixels -> mean target probability.
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    #: The maps of the example images (model grid) by image name, for the pictures; not in the JSON.
    example_maps: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``method`` or ``method:variant``: how tables and pictures name the row."""
        return self.method if self.variant is None else f"{self.method}:{self.variant}"

    def value(self, name: str) -> float | None:
        figure = self.figures.get(name)
        return None if figure is None else figure.value


@dataclass
class Scorecard:
    """Everything ``pacs-xai evaluate`` measured in one run."""

    dataset: str
    images: int
    lesion_images: int
    rows: list[Row] = field(default_factory=list)
    #: Per model: the suggested shortcut thresholds from this (honest) set, and the figures behind them.
    shortcut_calibration: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    #: Per model: the OOD signal on images with random regions filled by each fill
    #: (:mod:`service.trust.perturbed`): rows of fill, fraction, flag_rate, distance_p50, images.
    perturbed_ood: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: Per model: the example images of the pictures; not in the JSON.
    examples: dict[str, Examples] = field(default_factory=dict)
    seconds: float = 0.0
    device: str = "cpu"
    created: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    pacs_xai_version: str = __version__

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        """``scorecard.json`` and ``scorecard.md`` in ``out_dir``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        as_json = out_dir / "scorecard.json"
        payload = asdict(self)
        del payload["examples"]
        for row in payload["rows"]:
            del row["example_maps"]
        payload["metrics"] = {
            name: {"co12": co12, "definition": text, "better": better} for name, (co12, text, better) in METRICS.items()
        }
        as_json.write_text(json.dumps(_finite(payload), indent=2) + "\n", encoding="utf-8")
        as_markdown = out_dir / "scorecard.md"
        as_markdown.write_text(self.markdown(), encoding="utf-8")
        return as_json, as_markdown

    def markdown(self) -> str:
        lines = [
            "# Explanation scorecard",
            "",
            f"{self.dataset}: {self.images} images, {self.lesion_images} with a ground-truth finding. "
            f"pacs-xai {self.pacs_xai_version}, {self.created}, {self.device}, {self.seconds:.0f} s.",
            "",
        ]
        for model in dict.fromkeys(row.model for row in self.rows):
            rows = [row for row in self.rows if row.model == model]
            lines += [f"## {model} {rows[0].model_version}", ""]
            lines.append("| method | " + " | ".join(TABLE_COLUMNS) + " | randomisation check |")
            lines.append("|---" * (len(TABLE_COLUMNS) + 2) + "|")
            for row in rows:
                cells = [_cell(row.figures.get(name)) for name in TABLE_COLUMNS]
                passes = row.value("randomisation_passes")
                verdict = "n/a" if passes is None else ("passes" if passes >= 1 else "**FAILS**")
                lines.append(f"| {row.label} | " + " | ".join(cells) + f" | {verdict} |")
            lines += [
                "",
                "Localisation per class:",
                "",
                "| method | class | images | hit_rate | pointing_game | mean_iou | relevance_mass_accuracy |",
                "|---|---|---|---|---|---|---|",
            ]
            for row in rows:
                for label, figures in row.per_class.items():
                    cells = [_cell(figures.get(name)) for name in PER_CLASS_COLUMNS]
                    images = next(iter(figures.values())).images if figures else 0
                    lines.append(f"| {row.label} | {label} | {images} | " + " | ".join(cells) + " |")
            lines += _perturbed_ood_lines(self.perturbed_ood.get(model, []))
            calibration = self.shortcut_calibration.get(model)
            if calibration:
                lines += [
                    "",
                    "Shortcut thresholds this (honest) set suggests for the card's `trust.shortcut` section: "
                    + ", ".join(f"{key} {value}" for key, value in calibration.get("suggested", {}).items()),
                ]
            lines.append("")
        lines += [
            "## What each figure is",
            "",
            "| figure | Co-12 property | definition | better |",
            "|---|---|---|---|",
        ]
        lines += [f"| {name} | {co12} | {text} | {better} |" for name, (co12, text, better) in METRICS.items()]
        if self.skipped:
            lines += ["", "## Left out", ""] + [f"- {reason}" for reason in self.skipped]
        return "\n".join(lines) + "\n"


def _perturbed_ood_lines(table: list[dict[str, Any]]) -> list[str]:
    """The Markdown table of the OOD signal on images with filled regions (empty without one)."""
    if not table:
        return []
    lines = [
        "",
        "Out-of-distribution signal on the images with random regions (smooth blobs) filled, "
        "share flagged / median distance (Uzunova et al. 2019; `service.trust.perturbed`):",
        "",
        "| fill | area filled | images | flagged | median distance |",
        "|---|---|---|---|---|",
    ]
    for entry in table:
        lines.append(
            f"| {entry['fill']} | {entry['fraction']:.0%} | {entry['images']} | {entry['flag_rate']:.0%} "
            f"| {entry['distance_p50']:.1f} |"
        )
    return lines


def _cell(figure: Figure | None) -> str:
    if figure is None or figure.value is None:
        return "n/a"
    return f"{figure.value:.3g}" if abs(figure.value) < 1000 else f"{figure.value:.0f}"


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: they become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value
