"""``pacs-xai bench receive`` with a few small files: every receiver got every file. Not a timed test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.tools.bench.receive import run_receive_bench, run_receivers_bench
from tests.helpers import require_dcmtk

pytestmark = pytest.mark.integration


def test_receive_figures_and_files(tmp_path: Path) -> None:
    for tool in ("storescu", "storescp"):
        require_dcmtk(tool)  # the bench runs them; make test installs DCMTK
    figures = run_receive_bench(6, [1, 2], tmp_path, lambda _: None, sources={"CT small": "CT_small.dcm"})
    assert [(f.images, f.associations, f.count) for f in figures] == [("CT small", 1, 6), ("CT small", 2, 6)]
    for figure in figures:
        rates = (
            figure.pacs_xai_per_second,
            figure.pacs_xai_no_fsync_per_second,
            figure.storescp_per_second,
            figure.pynetdicom_ceiling_per_second,
        )
        assert all(rate > 0 for rate in rates)  # storescu exits non-zero (an error here) if any store failed
        assert figure.ceiling_ratio == pytest.approx(figure.pynetdicom_ceiling_per_second / figure.storescp_per_second)
    written = json.loads((tmp_path / "receive.json").read_text())
    assert [row["associations"] for row in written] == [1, 2] and "ceiling_ratio" in written[0]
    assert (tmp_path / "receive.png").stat().st_size > 1000


def test_receiver_processes_figures_and_their_memory(tmp_path: Path) -> None:
    require_dcmtk("storescu")
    figures = run_receivers_bench(8, 2, [2], tmp_path, lambda _: None, sources={"CT small": "CT_small.dcm"}, rounds=1)
    (figure,) = figures
    assert (figure.images, figure.associations, figure.count, figure.receivers) == ("CT small", 2, 8, 2)
    rates = (
        figure.one_process_per_second,
        figure.processes_per_second,
        figure.one_process_no_fsync_per_second,
        figure.processes_no_fsync_per_second,
    )
    assert all(rate > 0 for rate in rates)  # storescu exits non-zero (an error here) if any store failed
    assert len(figure.receiver_rss_mb) == 2 and all(mb > 0 for mb in figure.receiver_rss_mb)
    assert all(peak >= 0.9 * rest for peak, rest in zip(figure.receiver_peak_mb, figure.receiver_rss_mb, strict=True))
    written = json.loads((tmp_path / "receive-processes.json").read_text())
    assert written[0]["ratio"] == round(figure.ratio, 3)
    assert (tmp_path / "receive-processes.png").stat().st_size > 1000
