"""What the browser tests share: headless Chromium screenshots of OHIF and image statistics on them.

The assertions are image statistics on the viewport of a screenshot, not checksums; the
screenshots are kept in ``test-artifacts/viewer/``.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO_ROOT

ARTIFACTS = REPO_ROOT / "test-artifacts" / "viewer"
WINDOW = (1400, 900)
#: The viewport in a 1400x900 window: right of the study browser panel, below the toolbar.
VIEWPORT = (292, 56, 1392, 892)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("Chromium is not installed: apt-get install chromium (make test-viewer does it)")


def screenshot(url: str, out: Path, attempts: int = 3) -> np.ndarray:
    """Open ``url`` headless and keep the screenshot; the viewport (RGB array) is returned.

    The viewport is rendered after the frame has been fetched and decoded, which can outlast the
    virtual time budget on a cold start: a black viewport is taken again, with a larger budget.
    """
    viewport = np.zeros((1, 1, 3), np.uint8)
    for attempt in range(attempts):
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run(
                [
                    chromium(),
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    f"--user-data-dir={profile}",
                    f"--window-size={WINDOW[0]},{WINDOW[1]}",
                    f"--virtual-time-budget={30000 * (attempt + 1)}",
                    f"--screenshot={out}",
                    url,
                ],
                capture_output=True,
                timeout=180,
                check=True,
            )
        viewport = np.asarray(Image.open(out).convert("RGB").crop(VIEWPORT)).astype(np.int16)
        if (viewport.max(axis=2) > 40).mean() > 0.05:  # something rendered beyond the text overlays
            return viewport
        time.sleep(1.0)
    return viewport


def warm_fraction(viewport: np.ndarray) -> float:
    """Share of viewport pixels in the heatmap's warm colours (red, orange, yellow): R well above B."""
    r, g, b = viewport[..., 0], viewport[..., 1], viewport[..., 2]
    return float(((r - b > 60) & (r > 100) & (g < r + 10)).mean())


def coloured_fraction(viewport: np.ndarray) -> float:
    """Share of viewport pixels that are not grey (any hue)."""
    return float((viewport.max(axis=2) - viewport.min(axis=2) > 40).mean())


def tinted_fraction(viewport: np.ndarray) -> float:
    """Share of viewport pixels with a faint hue (channel spread 5-39): a colour map at low opacity on grey."""
    spread = viewport.max(axis=2) - viewport.min(axis=2)
    return float(((spread >= 5) & (spread < 40)).mean())
