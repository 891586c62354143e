"""``pacs-xai bench explain --volume`` at a small size: both implementations run on MONAI's 3D
DenseNet121 in one run, their maps agree, the figures, goals and plot are written, and settings
MONAI would place differently from us are refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.tools.bench.volume import run_volume_bench

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


def test_small_volume_bench_writes_figures_and_plot(tmp_path: Path) -> None:
    figures = run_volume_bench(tmp_path, lambda _: None, size=64, window=32, stride=32, device="cpu")
    written = json.loads((tmp_path / "explain-volume.json").read_text())
    assert written == json.loads(json.dumps(figures))
    assert (tmp_path / "explain-volume.png").stat().st_size > 0
    methods = {record["method"]: record for record in written["results"]}
    assert set(methods) == {"gradcam", "occlusion", "occlusion-whole-passes"}
    # at 64³ the CAM layer is 2³, so the maps have structure to correlate
    for record in methods.values():
        assert record["pearson_with_monai"] >= 0.99
        assert record["peers"][0]["library"] == "monai" and record["peers"][0]["time_s_per_image"] > 0
    # the clean pass and one per window, incremental (a window's box counts as a row) or whole
    assert methods["occlusion"]["rows"] == methods["occlusion-whole-passes"]["rows"] == 1 + 2**3
    assert {goal["goal"] for goal in written["goals"]} >= {"occlusion at least 2x MONAI's OcclusionSensitivity"}


def test_windows_monai_would_shift_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple of stride"):
        run_volume_bench(tmp_path, lambda _: None, size=64, window=24, stride=16)
