"""Quarantine rows: the bytes' path, the reason (required) and who sent them. Real SQLite and spool files."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.node.store.journal import Journal
from service.node.store.spool import Spool


def test_quarantine_rows(journal: Journal, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    path = spool.write_quarantine(b"\x00garbage", reason_slug="cannot-parse")
    entry_id = journal.quarantine.record(path, "cannot parse: no File Meta", "MODALITY", "assoc-7")
    (entry,) = journal.quarantine.entries()
    assert entry.id == entry_id and entry.path == path and entry.reason == "cannot parse: no File Meta"
    assert (entry.calling_ae, entry.association_id) == ("MODALITY", "assoc-7") and entry.at > 0
    assert journal.counts()["quarantined"] == 1
    with pytest.raises(ValueError, match="reason"):
        journal.quarantine.record(path, " ", "MODALITY", "assoc-7")
