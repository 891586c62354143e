"""The journal: WAL mode and schema version, instance rows received -> processed that survive a
restart, re-sent instances, concurrent writers, and no patient data. Real SQLite files in tmp_path.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from pathlib import Path

import pytest

from service.node.store.errors import StoreError
from service.node.store.journal import Journal
from service.node.store.outbox import NewOutput
from tests.unit.service.node.helpers import ROOT_UID, add_output, received_instance


def test_journal_is_in_wal_mode_with_a_schema_version(tmp_path: Path, journal: Journal) -> None:
    with sqlite3.connect(tmp_path / "journal.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(1,)]


def test_journal_refuses_an_unknown_schema_version(tmp_path: Path) -> None:
    Journal(tmp_path / "j.sqlite").close()
    with sqlite3.connect(tmp_path / "j.sqlite") as db:
        db.execute("UPDATE schema_version SET version = 99")
    db.close()
    with pytest.raises(StoreError, match="schema version 99"):
        Journal(tmp_path / "j.sqlite")


def test_journal_that_cannot_be_opened_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StoreError, match=str(tmp_path / "file" / "j.sqlite")):
        Journal(tmp_path / "file" / "j.sqlite")


def test_received_pending_processed_and_the_state_survives_a_restart(tmp_path: Path) -> None:
    db_path = tmp_path / "journal.sqlite"
    journal = Journal(db_path)
    for n in (3, 1, 2):
        assert journal.record_received(received_instance(n)) is True
    assert [i.sop_instance_uid for i in journal.pending_instances()] == [f"{ROOT_UID}.3.{n}" for n in (1, 2, 3)]
    assert journal.pending_instances()[0] == received_instance(1)
    journal.mark_processed([f"{ROOT_UID}.3.1"], "done")
    journal.mark_processed([f"{ROOT_UID}.3.2"], "skipped", "modality MR not covered by the model card")
    journal.close()

    with Journal(db_path) as restarted:
        assert [i.sop_instance_uid for i in restarted.pending_instances()] == [f"{ROOT_UID}.3.3"]
        assert restarted.instance_state(f"{ROOT_UID}.3.1") == ("done", "")
        assert restarted.instance_state(f"{ROOT_UID}.3.2") == ("skipped", "modality MR not covered by the model card")
        assert restarted.instance_state(f"{ROOT_UID}.3.404") is None
        assert restarted.get_instances([f"{ROOT_UID}.3.3", f"{ROOT_UID}.3.1"]) == [
            received_instance(3),
            received_instance(1),
        ]


def test_mark_processed_checks_its_arguments(journal: Journal) -> None:
    journal.record_received(received_instance(1))
    with pytest.raises(ValueError, match="'finished'"):
        journal.mark_processed([f"{ROOT_UID}.3.1"], "finished")  # type: ignore[arg-type]
    with pytest.raises(LookupError, match=f"{ROOT_UID}.3.2"):
        journal.mark_processed([f"{ROOT_UID}.3.1", f"{ROOT_UID}.3.2"], "done")
    assert journal.instance_state(f"{ROOT_UID}.3.1") == ("received", "")  # all or nothing
    with pytest.raises(ValueError, match="string"):
        journal.mark_processed(f"{ROOT_UID}.3.1", "done")


def test_a_resent_instance_replaces_the_row_and_is_requeued_as_a_follow_up(journal: Journal) -> None:
    uid = f"{ROOT_UID}.3.1"
    assert journal.record_received(received_instance(1, Path("/spool/a.dcm"), association="assoc-1", at=10.0)) is True
    journal.mark_processed([uid], "done")
    assert journal.record_received(received_instance(1, Path("/spool/b.dcm"), association="assoc-2", at=20.0)) is False
    assert journal.instance_state(uid) == ("received", "")
    assert journal.pending_instances() == [received_instance(1, Path("/spool/b.dcm"), association="assoc-2", at=20.0)]
    assert journal.counts()["instances_received"] == 1  # one row, never two

    # A copy that arrives while the previous one is processed is not swallowed by its mark_processed.
    assert journal.record_received(received_instance(1, Path("/spool/c.dcm"), at=30.0)) is False
    journal.mark_processed([uid], "done", received_before=25.0)
    assert journal.instance_state(uid) == ("received", "")
    journal.mark_processed([uid], "done", received_before=35.0)
    assert journal.instance_state(uid) == ("done", "")


def test_complete_leaves_a_copy_resent_during_processing_received_without_the_old_copys_outputs(
    journal: Journal,
) -> None:
    uid = f"{ROOT_UID}.3.1"
    journal.record_received(received_instance(1, at=10.0))
    journal.series.claim_series("worker-0:1-0", received_instance(1).study_instance_uid,
                                received_instance(1).series_instance_uid)  # fmt: skip
    journal.record_received(received_instance(1, at=20.0))  # re-sent while the copy of 10.0 was processed
    output = NewOutput(f"{ROOT_UID}.9.1", uid, "PACS", Path("/spool/outbox/sc.dcm"), "sc", "gradcam")
    assert journal.complete(uid, [output], received_before=10.0) is False
    assert journal.instance_state(uid) == ("received", "")
    assert journal.outbox.entries(("pending",)) == []
    assert journal.series.claimed_by("worker-0:1-0") == []  # the new copy can be claimed
    assert journal.complete(uid, [output], "failed", "one route failed", received_before=20.0) is True
    assert journal.instance_state(uid) == ("failed", "one route failed")
    assert [e.sop_instance_uid for e in journal.outbox.entries(("pending",))] == [output.sop_instance_uid]


def test_complete_series_leaves_the_whole_series_received_when_one_instance_was_resent(journal: Journal) -> None:
    """The volume was explained from the old copy: nothing of it is journaled, the series is explained again."""
    for n in (1, 2, 3):
        journal.record_received(received_instance(n, at=10.0))
    journal.record_received(received_instance(2, at=30.0))  # re-sent during the volume's processing
    output = NewOutput(f"{ROOT_UID}.9.1", f"{ROOT_UID}.3.1", "PACS", Path("/spool/outbox/pm.dcm"), "pm", "gradcam")
    rows = [(f"{ROOT_UID}.3.{n}", "done", "") for n in (1, 2, 3)]
    read = {f"{ROOT_UID}.3.{n}": 10.0 for n in (1, 2, 3)}
    assert journal.complete_series(rows, [output], received_before=read) is False  # type: ignore[arg-type]
    assert [journal.instance_state(f"{ROOT_UID}.3.{n}") for n in (1, 2, 3)] == [("received", "")] * 3
    assert journal.outbox.entries(("pending",)) == []
    read[f"{ROOT_UID}.3.2"] = 30.0
    assert journal.complete_series(rows, [output], received_before=read) is True  # type: ignore[arg-type]
    assert [journal.instance_state(f"{ROOT_UID}.3.{n}") for n in (1, 2, 3)] == [("done", "")] * 3


def test_hand_over_forgets_another_nodes_instances_with_their_rows_and_keeps_this_nodes(
    journal: Journal, tmp_path: Path
) -> None:
    """After the done note: nothing of another node's instance stays (a later message for it is
    processed again); the result files stay for that node's sender; this node's rows are untouched."""
    kept = tmp_path / "result.dcm"
    kept.write_bytes(b"result")
    journal.record_received(received_instance(1), for_node="intake-a")
    journal.record_received(received_instance(2))
    add_output(journal, 1, "PACS", kept)
    add_output(journal, 1, "ARCHIVE", kept)
    own = add_output(journal, 2, "PACS")
    journal.mark_processed([f"{ROOT_UID}.3.1", f"{ROOT_UID}.3.2"], "done")
    assert journal.hand_over([f"{ROOT_UID}.3.1", f"{ROOT_UID}.3.2"]) == 1
    assert journal.instance_state(f"{ROOT_UID}.3.1") is None
    assert journal.instance_state(f"{ROOT_UID}.3.2") == ("done", "")
    assert [e.sop_instance_uid for e in journal.outbox.entries()] == [own]
    assert kept.read_bytes() == b"result"
    assert journal.record_received(received_instance(1), for_node="intake-a") is True  # as new: processed again


def test_an_instance_received_here_after_it_was_processed_for_another_node_is_this_nodes_own(
    journal: Journal,
) -> None:
    """A modality's retry brings here an instance a worker of this box held for another node: its
    outputs are this node's to send, and the other node's hand-over leaves its row alone."""
    uid = f"{ROOT_UID}.3.1"
    journal.record_received(received_instance(1, at=1.0), for_node="intake-a")
    journal.record_received(received_instance(1, at=2.0))
    add_output(journal, 1)
    journal.mark_processed([uid], "done")
    assert [e.source_sop_instance_uid for e in journal.outbox.due(now=1e12)] == [uid]
    assert journal.hand_over([uid]) == 0
    assert journal.instance_state(uid) == ("done", "")


@pytest.mark.parametrize("shared", [True, False], ids=["one-journal", "journal-per-thread"])
def test_concurrent_record_received_all_land(tmp_path: Path, shared: bool) -> None:
    db_path = tmp_path / "journal.sqlite"
    common = Journal(db_path)
    errors: list[BaseException] = []

    def receive(thread: int) -> None:
        own = common if shared else Journal(db_path)
        try:
            for k in range(50):
                own.record_received(received_instance(thread * 1000 + k, association=f"assoc-{thread}"))
        except BaseException as exc:  # reported to the main thread below
            errors.append(exc)
        finally:
            if not shared:
                own.close()

    threads = [threading.Thread(target=receive, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    pending = common.pending_instances()
    assert len(pending) == 200 == len({i.sop_instance_uid for i in pending})
    assert common.counts()["instances_received"] == 200
    common.close()


def test_journal_holds_no_patient_data(tmp_path: Path) -> None:
    with Journal(tmp_path / "journal.sqlite") as journal:
        journal.record_received(received_instance(1))
        add_output(journal, 1)
    with sqlite3.connect(tmp_path / "journal.sqlite") as db:
        columns = {
            row[1]
            for table in ("instances", "outbox", "quarantine")
            for row in db.execute(f"PRAGMA table_info({table})")
        }
    db.close()
    assert not {c for c in columns if "patient" in c or "name" in c or "birth" in c}


def test_series_instance_count_counts_each_journaled_instance_once_in_any_state(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    with Journal(path) as journal:
        for n in (1, 2, 3):
            journal.record_received(received_instance(n))
        journal.record_received(received_instance(2, at=10.0))  # re-sent: the same row
        journal.mark_processed([f"{ROOT_UID}.3.1"], "skipped", "not routed")
        other = dataclasses.replace(received_instance(4), series_instance_uid=f"{ROOT_UID}.77")
        journal.record_received(other)
        assert journal.series_instance_count(received_instance(1).series_instance_uid) == 3
        assert journal.series_instance_count(f"{ROOT_UID}.77") == 1
        assert journal.series_instance_count(f"{ROOT_UID}.78") == 0
    # A journal written before the series index existed gets it when opened.
    with sqlite3.connect(path) as db:
        db.execute("DROP INDEX instances_by_series")
    with Journal(path) as journal:
        assert journal.series_instance_count(received_instance(1).series_instance_uid) == 3
    with sqlite3.connect(path) as db:
        plan = " ".join(
            str(row)
            for row in db.execute(
                "EXPLAIN QUERY PLAN SELECT COUNT(*) FROM instances WHERE series_instance_uid = ?", ("x",)
            )
        )
    assert "instances_by_series" in plan


def test_complete_series_journals_every_instance_and_the_outputs_in_one_transaction(journal: Journal) -> None:
    """A volume's outputs belong to all its instances: all rows change with the outbox rows, or none."""
    for n in (1, 2, 3):
        journal.record_received(received_instance(n))
    output = NewOutput(f"{ROOT_UID}.9.1", f"{ROOT_UID}.3.1", "PACS", Path("/spool/outbox/pm.dcm"), "pm", "gradcam")
    with pytest.raises(LookupError, match=f"{ROOT_UID}.3.404"):
        journal.complete_series([(f"{ROOT_UID}.3.1", "done", ""), (f"{ROOT_UID}.3.404", "done", "")], [output])
    assert journal.instance_state(f"{ROOT_UID}.3.1") == ("received", "") and journal.outbox.entries(("pending",)) == []
    with pytest.raises(ValueError, match="'finished'"):
        journal.complete_series([(f"{ROOT_UID}.3.1", "finished", "")], [])  # type: ignore[list-item]

    journal.complete_series(
        [(f"{ROOT_UID}.3.1", "done", ""), (f"{ROOT_UID}.3.2", "done", ""), (f"{ROOT_UID}.3.3", "failed", "why")],
        [output],
    )
    states = [journal.instance_state(f"{ROOT_UID}.3.{n}") for n in (1, 2, 3)]
    assert states == [("done", ""), ("done", ""), ("failed", "why")]
    assert [(e.sop_instance_uid, e.destination) for e in journal.outbox.entries(("pending",))] == [
        (f"{ROOT_UID}.9.1", "PACS")
    ]
    assert journal.pending_instances() == []
