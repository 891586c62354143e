"""``pacs-xai bench throughput`` on the CPU: figures, peer agreement, files. Not a timed test."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from service.tools.bench.throughput import run_throughput_bench

pytestmark = pytest.mark.integration


def test_throughput_figures_on_the_demo_model(tmp_path: Path) -> None:
    figures = run_throughput_bench("demo", [2, 3], 4, tmp_path, lambda _: None, device="cpu")
    assert [row["batch"] for row in figures["rows"]] == [2, 3]
    for row in figures["rows"]:
        ours, peer = row["pacs-xai"], row["pytorch-grad-cam"]
        assert ours["status"] == "ok" and peer["status"] == "ok"
        # Whole batches, at least 3 calls, and the rate is what was timed.
        assert ours["images"] == ours["calls"] * row["batch"] >= max(4, 3 * row["batch"])
        assert ours["images_per_s"] == pytest.approx(ours["images"] / ours["seconds"])
        assert row["pearson_min"] > 0.99  # both compute Grad-CAM on the same layer
    assert figures["goal"]["met"] is None  # judged on a GPU only
    assert (tmp_path / "throughput.json").is_file()
    with Image.open(tmp_path / "throughput.png") as plot:
        assert plot.size[0] > 400


def test_bad_requests_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="resnet"):
        run_throughput_bench("resnet", None, None, tmp_path, lambda _: None, device="cpu")
    with pytest.raises(ValueError, match=r"\[0\]"):
        run_throughput_bench("demo", [0], 4, tmp_path, lambda _: None, device="cpu")
