"""The scorecard's pictures (matplotlib, PNG) per model: ``scorecard-<model>.png`` with the
randomisation cascade per method and its baseline, the localisation scores, the mean deletion and
insertion curves and, where measured, the out-of-distribution share of images with filled regions
per fill; ``maps-<model>.png`` with every method's map of a few lesion images side by side."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402 (after the backend is chosen)

from service.tools.evaluate.scorecard import Examples, Row, Scorecard  # noqa: E402

LOCALISATION = ("hit_rate", "pointing_game", "mean_iou", "relevance_mass_accuracy")


def plot_scorecard(scorecard: Scorecard, out_dir: Path) -> list[Path]:
    """``scorecard-<model>.png`` per model in ``out_dir``; returns the paths."""
    written = []
    for model in dict.fromkeys(row.model for row in scorecard.rows):
        rows = [row for row in scorecard.rows if row.model == model]
        table = scorecard.perturbed_ood.get(model, [])
        panels = []  # each panel where its figures were measured
        if any(row.randomisation_steps for row in rows):
            panels.append(lambda axes, rows=rows: _cascade(axes, rows))
        panels += [lambda axes, rows=rows: _localisation(axes, rows), lambda axes, rows=rows: _curves(axes, rows)]
        if table:
            panels.append(lambda axes, table=table: _perturbed_ood(axes, table))
        figure, axes = plt.subplots(
            1, len(panels), figsize=(5.7 * len(panels), 5.2), squeeze=False, constrained_layout=True
        )
        for draw, panel in zip(panels, axes[0]):
            draw(panel)
        figure.suptitle(f"{model} {rows[0].model_version}: {scorecard.dataset}", fontsize=12)
        path = out_dir / f"scorecard-{_file_name(model)}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
        examples = scorecard.examples.get(model)
        if examples is not None and examples.images and any(row.example_maps for row in rows):
            written.append(_plot_maps(rows, examples, out_dir / f"maps-{_file_name(model)}.png"))
    return written


def _file_name(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model)


def _plot_maps(rows: list[Row], examples: Examples, path: Path) -> Path:
    """One row per example image (outlined: the ground truth), one column per method: the map's
    positive part over the image, each map scaled to its own maximum."""
    names = list(examples.images)
    figure, axes = plt.subplots(
        len(names), len(rows) + 1, figsize=(2.1 * (len(rows) + 1), 2.3 * len(names)), squeeze=False
    )
    for line, name in zip(axes, names):
        image, mask = examples.images[name], examples.masks[name]
        line[0].imshow(image, cmap="gray")
        line[0].contour(mask, levels=[0.5], colors="cyan", linewidths=0.8)
        line[0].set_ylabel(name, fontsize=7)
        for panel, row in zip(line[1:], rows):
            saliency = row.example_maps.get(name)
            panel.imshow(image, cmap="gray")
            if saliency is not None:
                positive = np.clip(saliency, 0, None)
                peak = float(positive.max())
                if peak > 0:
                    panel.imshow(positive / peak, cmap="jet", alpha=0.45, vmin=0, vmax=1)
                    top = np.unravel_index(int(np.argmax(positive)), positive.shape)
                    panel.plot(top[1], top[0], marker="+", color="white", markersize=9, mew=2)
            panel.contour(mask, levels=[0.5], colors="cyan", linewidths=0.8)
    axes[0, 0].set_title("image (ground truth)", fontsize=8)
    for panel, row in zip(axes[0, 1:], rows):
        panel.set_title(row.label.replace(":", "\n"), fontsize=8)
    for panel in axes.flat:
        panel.set_xticks([])
        panel.set_yticks([])
    figure.suptitle("Positive attribution of each method (+: the map's maximum; cyan: the lesion)", fontsize=10)
    figure.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(figure)
    return path


def _perturbed_ood(axes: plt.Axes, table: list[dict]) -> None:
    fills = [fill for fill in dict.fromkeys(entry["fill"] for entry in table) if fill != "none"]
    fractions = sorted({entry["fraction"] for entry in table if entry["fill"] != "none"})
    width = 0.8 / max(1, len(fills))
    for index, fill in enumerate(fills):
        rates = {entry["fraction"]: entry["flag_rate"] for entry in table if entry["fill"] == fill}
        positions = [k + index * width for k in range(len(fractions))]
        axes.bar(positions, [rates.get(f, 0.0) for f in fractions], width=width, label=fill, color=f"C{index}")
    reference = next((entry["flag_rate"] for entry in table if entry["fill"] == "none"), None)
    if reference is not None:
        axes.axhline(reference, color="grey", linestyle=":", label=f"unperturbed ({reference:.0%})")
    axes.set_xticks([k + 0.4 - width / 2 for k in range(len(fractions))], [f"{f:.0%} filled" for f in fractions])
    axes.set_ylim(0, 1.02)
    axes.set_ylabel("share flagged out of distribution")
    axes.set_title("Images with random regions filled: out of distribution?\n(Uzunova et al. 2019; lower is better)")
    axes.legend(fontsize=8)


def _cascade(axes: plt.Axes, rows: list[Row]) -> None:
    for index, row in enumerate(rows):
        if not row.randomisation_steps:
            continue
        colour = f"C{index % 10}"
        layers = ["trained"] + [step["layer"] for step in row.randomisation_steps]
        values = [1.0] + [step["ssim"] for step in row.randomisation_steps]
        verdict = "passes" if (row.value("randomisation_passes") or 0) >= 1 else "FAILS"
        axes.plot(range(len(values)), values, marker="o", color=colour, label=f"{row.label} ({verdict})")
        baseline = row.value("randomisation_baseline")
        if baseline is not None:
            axes.axhline(baseline, color=colour, linestyle=":", linewidth=1)
        axes.set_xticks(range(len(layers)), layers, rotation=35, ha="right", fontsize=8)
    axes.axvline(2, color="grey", linewidth=0.8)
    axes.set_ylim(-0.05, 1.05)
    axes.set_ylabel("SSIM to the trained model's maps")
    axes.set_title("Cascading randomisation (dotted: each method's baseline;\nverdict after head + last block)")
    axes.legend(fontsize=8)


def _localisation(axes: plt.Axes, rows: list[Row]) -> None:
    width = 0.8 / max(1, len(rows))
    for index, row in enumerate(rows):
        values = [row.value(name) or 0.0 for name in LOCALISATION]
        positions = [k + index * width for k in range(len(LOCALISATION))]
        axes.bar(positions, values, width=width, label=row.label, color=f"C{index % 10}")
    axes.set_xticks(
        [k + 0.4 - width / 2 for k in range(len(LOCALISATION))], [n.replace("_", " ") for n in LOCALISATION]
    )
    axes.set_ylim(0, 1)
    axes.set_title("Localisation against the ground truth (higher is better)")
    axes.legend(fontsize=8)


def _curves(axes: plt.Axes, rows: list[Row]) -> None:
    for index, row in enumerate(rows):
        colour = f"C{index % 10}"
        for kind, style in (("deletion", "-"), ("insertion", "--")):
            curve = row.curves.get(kind)
            if curve:
                axes.plot(curve["fraction"], curve["probability"], style, color=colour, label=f"{row.label} {kind}")
    axes.set_xlabel("fraction of pixels removed (deletion, solid) or inserted (insertion, dashed)")
    axes.set_ylabel("mean probability of the true class")
    axes.set_ylim(0, 1.02)
    axes.set_title("Deletion and insertion (Petsiuk et al. 2018)")
    axes.legend(fontsize=7, ncol=2)
