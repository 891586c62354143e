"""The held-out reconstruction figure of a healthy-appearance model (matplotlib, PNG).

One row per held-out image (normal images first, then lesion images with their lesion outlined):
the image x, its healthy appearance h(x), and |x - h(x)|, all in the card's normalised units on
the model grid (grey scale over the image's own range; the difference on a fixed scale).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402 (after the backend is chosen)
import numpy as np  # noqa: E402

from service.tools.healthy.train import HealthyReport, HeldOutLesions  # noqa: E402

#: Rows of each kind in the figure.
NORMAL_ROWS = 3
LESION_ROWS = 4


def plot_reconstructions(report: HealthyReport, lesions: HeldOutLesions | None, path: Path, title: str) -> Path:
    """Write the figure to ``path`` (PNG) and return it."""
    rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]] = []
    for index in range(min(NORMAL_ROWS, len(report.held_out))):
        rows.append(("normal", report.held_out[index, 0], report.held_out_healthy[index, 0], None))
    if lesions is not None and report.lesions_healthy is not None:
        for index in range(min(LESION_ROWS, len(lesions.inputs))):
            rows.append(
                (
                    lesions.labels[index],
                    lesions.inputs[index, 0],
                    report.lesions_healthy[index, 0],
                    lesions.masks[index],
                )
            )
    figure, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.5 * len(rows)), squeeze=False, constrained_layout=True)
    for (label, image, healthy, mask), (left, middle, right) in zip(rows, axes):
        low, high = float(image.min()), float(image.max())
        left.imshow(image, cmap="gray", vmin=low, vmax=high)
        middle.imshow(healthy, cmap="gray", vmin=low, vmax=high)
        difference = right.imshow(np.abs(image - healthy), cmap="magma", vmin=0, vmax=1.5)
        if mask is not None:
            for panel in (left, middle, right):
                panel.contour(mask, levels=[0.5], colors="cyan", linewidths=0.8)
        left.set_ylabel(label)
        for panel in (left, middle, right):
            panel.set_xticks([])
            panel.set_yticks([])
    axes[0, 0].set_title("x (held out)")
    axes[0, 1].set_title("h(x), healthy appearance")
    axes[0, 2].set_title("|x - h(x)|")
    figure.colorbar(difference, ax=axes[:, 2], shrink=0.3, label="normalised units")
    figure.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
