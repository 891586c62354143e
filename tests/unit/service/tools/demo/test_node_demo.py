"""The demo run's routes and table: its inputs go where the demo promises (radiographs to the 2D
demo model, the CT phantom series and the single CT slice to the volume model), its rules pass
``config check``, and a series with no result is shown with the journal's reason, UIDs left out."""

from __future__ import annotations

from pathlib import Path

import pydicom

from service.node.config import load_config
from service.node.routing import InstanceFacts, check_rules, compile_rules, select
from service.node.store import Journal, ReceivedInstance
from service.synthetic.volumes import make_ct_phantom, write_ct_series
from service.tools.demo.node_demo import CT_PHANTOMS, demo_routes, gather_inputs, series_rows


def test_the_demo_inputs_take_the_routes_the_demo_promises(tmp_path: Path) -> None:
    config = load_config(None, {"routes": demo_routes(["gradcam", "lime"])})
    check = check_rules(config)
    assert check.errors == [], "lime is left out of the volume rule, which cannot run it"
    assert [rule.methods for rule in check.rules] == [("gradcam", "lime"), ("gradcam",)]
    rules = compile_rules(config)
    files = gather_inputs(tmp_path / "input", lambda line: None)
    by_series: dict[str, list[pydicom.Dataset]] = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        by_series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    taken = {}
    for datasets in by_series.values():
        facts = InstanceFacts.from_dataset(datasets[0], instances=len(datasets))
        taken.setdefault(tuple(rule.name for rule in select(rules, facts)), []).append(len(datasets))
    ct = taken[("chest-ct",)]
    assert ct.count(48) == len(CT_PHANTOMS) and set(ct) <= {1, 48}, "the phantom series whole, and CT_small"
    assert len(taken[("chest-xray",)]) >= 6 and set(taken[("chest-xray",)]) == {1}
    assert set(taken) == {("chest-ct",), ("chest-xray",)}, "every demo input is routed"


def test_a_series_without_results_shows_the_journals_reason_without_uids(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path / "ct", make_ct_phantom(0, "normal", shape=(8, 16, 16)))
    config = load_config(None, {"routes": demo_routes(["gradcam"])})
    with Journal(tmp_path / "journal.sqlite") as journal:
        for path in paths:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            uid, series = str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)
            journal.record_received(
                ReceivedInstance(uid, str(ds.SOPClassUID), str(ds.StudyInstanceUID), series, path, "A", "a", 0.0)
            )
            journal.mark_processed([uid], "skipped", f"route chest-ct: gap between slices of series {series} here")
        (received := tmp_path / "received").mkdir()
        (row,) = series_rows(paths, received, {}, 0.0, config, {"chest-ct": "volume-model"}, journal)
    assert (row.series, row.route, row.model, row.delivered) == ("ct/ (8 slices)", "chest-ct", "volume-model", "0")
    assert row.finding == "skipped: gap between slices of series here"
