"""The scorecard's pictures (matplotlib, PNG), one per model: the randomisation cascade per method
with its baseline, the localisation scores, and the mean deletion and insertion curves."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402 (after the backend is chosen)

from service.tools.evaluate.scorecard import Row, Scorecard  # noqa: E402

LOCALISATION = ("hit_rate", "pointing_game", "mean_iou", "relevance_mass_accuracy")


def plot_scorecard(scorecard: Scorecard, out_dir: Path) -> list[Path]:
    """``scorecard-<model>.png`` per model in ``out_dir``; returns the paths."""
    written = []
    for model in dict.fromkeys(row.model for row in scorecard.rows):
        rows = [row for row in scorecard.rows if row.model == model]
        figure, (cascade, bars, curves) = plt.subplots(1, 3, figsize=(17, 5.2), constrained_layout=True)
        _cascade(cascade, rows)
        _localisation(bars, rows)
        _curves(curves, rows)
        figure.suptitle(f"{model} {rows[0].model_version}: {scorecard.dataset}", fontsize=12)
        path = out_dir / f"scorecard-{re.sub(r'[^A-Za-z0-9._-]+', '_', model)}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def _cascade(axes: plt.Axes, rows: list[Row]) -> None:
    for index, row in enumerate(rows):
        if not row.randomisation_steps:
            continue
        colour = f"C{index % 10}"
        layers = ["trained"] + [step["layer"] for step in row.randomisation_steps]
        values = [1.0] + [step["ssim"] for step in row.randomisation_steps]
        verdict = "passes" if (row.value("randomisation_passes") or 0) >= 1 else "FAILS"
        axes.plot(range(len(values)), values, marker="o", color=colour, label=f"{row.method} ({verdict})")
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
        axes.bar(positions, values, width=width, label=row.method, color=f"C{index % 10}")
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
                axes.plot(curve["fraction"], curve["probability"], style, color=colour, label=f"{row.method} {kind}")
    axes.set_xlabel("fraction of pixels removed (deletion, solid) or inserted (insertion, dashed)")
    axes.set_ylabel("mean probability of the true class")
    axes.set_ylim(0, 1.02)
    axes.set_title("Deletion and insertion (Petsiuk et al. 2018)")
    axes.legend(fontsize=7, ncol=2)
