"""``pacs-xai bench pipeline`` with a few images: sender -> node -> destination on 127.0.0.1. Not a timed test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.tools.bench.pipeline import run_pipeline_bench

pytestmark = pytest.mark.integration


def test_pipeline_figures_decompose_the_latency(tmp_path: Path) -> None:
    figures = run_pipeline_bench("gradcam", 2, 2, tmp_path, lambda _: None)
    # A result cannot reach the destination before the node computed it: every image's latency holds
    # its own prepare, infer, explain and encode stages, so the slowest latency is at least their mean.
    # (The separately timed compute_p50 is no bound: it is measured in another phase of the run.)
    computed = sum(figures.stage_means_s[stage] for stage in ("prepare", "infer", "explain", "encode"))
    assert figures.latency_p95_s >= computed > 0
    assert figures.transfer_in_s > 0 and figures.transfer_out_s > 0
    assert figures.throughput_per_s > 0
    assert {"receive", "spool", "assemble_wait", "prepare", "infer", "explain", "encode", "send"} <= set(
        figures.stage_means_s
    )
    written = json.loads((tmp_path / "pipeline-gradcam.json").read_text())
    assert written["transfer_ratio"] == round(figures.transfer_ratio, 3)
    assert written["overhead_beyond_transfers"] == round(figures.overhead_beyond_transfers, 3)
