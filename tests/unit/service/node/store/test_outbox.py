"""The outbox: one row per output and destination, due times, sent/retry/dead, dead letters back to
pending, and purge (rows first, then the files no row needs). Real SQLite and spool files in tmp_path.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from service.node.store.journal import Journal
from service.node.store.spool import Spool
from tests.unit.service.node.helpers import ROOT_UID, FakeClock, add_output, received_instance


def test_add_output_is_idempotent_and_resets_to_pending(journal: Journal) -> None:
    uid = add_output(journal, 1)
    add_output(journal, 1)
    assert len(journal.outbox.entries(("pending", "sent", "dead"))) == 1
    journal.outbox.mark_dead(uid, "PACS", error="refused: SOP class not supported")
    add_output(journal, 1, path=Path("/spool/outbox/new.dcm"))  # reprocessed: replaces the old one
    (entry,) = journal.outbox.entries(("pending", "sent", "dead"))
    assert (entry.state, entry.attempts, entry.path, entry.last_error) == (
        "pending",
        0,
        Path("/spool/outbox/new.dcm"),
        "",
    )
    add_output(journal, 1, destination="ARCHIVE")  # another destination is another row
    assert len(journal.outbox.entries()) == 2


def test_due_outputs_respects_next_attempt_at_and_limit(journal: Journal) -> None:
    first, second, third = add_output(journal, 1), add_output(journal, 2), add_output(journal, 3)
    assert [e.sop_instance_uid for e in journal.outbox.due(now=0.0)] == [first, second, third]
    assert len(journal.outbox.due(now=0.0, limit=2)) == 2
    journal.outbox.mark_sent(first, "PACS")
    journal.outbox.mark_retry(second, "PACS", error="association rejected", next_attempt_at=100.0)
    journal.outbox.mark_retry(third, "PACS", error="timeout", next_attempt_at=50.0)
    assert journal.outbox.due(now=60.0) == [], "the head (second) is not due: nothing may overtake it"
    assert [e.sop_instance_uid for e in journal.outbox.due(now=100.0)] == [second, third]
    (retried,) = [e for e in journal.outbox.entries() if e.sop_instance_uid == second]
    assert (retried.attempts, retried.next_attempt_at, retried.last_error) == (1, 100.0, "association rejected")
    journal.outbox.mark_sent(third, "PACS")
    assert third not in [e.sop_instance_uid for e in journal.outbox.due(now=1e12)]
    with pytest.raises(ValueError, match="limit"):
        journal.outbox.due(now=0.0, limit=0)


def test_due_keeps_each_destination_in_the_order_queued(journal: Journal) -> None:
    """A retry holds back what was queued after it for the same destination (no overtaking), a new
    output waits behind the head's backoff, another destination is not held back, a dead head no
    longer blocks, and a re-added output keeps its place."""
    a1, a2 = add_output(journal, 1), add_output(journal, 2)
    b1 = add_output(journal, 3, destination="ARCHIVE")
    journal.outbox.mark_retry(a1, "PACS", error="association rejected", next_attempt_at=100.0)
    journal.outbox.mark_retry(a2, "PACS", error="association rejected", next_attempt_at=10.0)
    a3 = add_output(journal, 4)  # queued during the outage: due at once on its own, but behind a1
    assert [e.sop_instance_uid for e in journal.outbox.due(now=50.0)] == [b1]
    assert [e.sop_instance_uid for e in journal.outbox.due(now=100.0)] == [a1, a2, b1, a3]
    add_output(journal, 2)  # a2 reprocessed: reset, same place in the queue
    assert [e.sop_instance_uid for e in journal.outbox.due(now=100.0)] == [a1, a2, b1, a3]
    journal.outbox.mark_dead(a1, "PACS", error="refused")
    journal.outbox.mark_retry(a2, "PACS", error="timeout", next_attempt_at=200.0)
    assert [e.sop_instance_uid for e in journal.outbox.due(now=150.0)] == [b1]
    assert [e.sop_instance_uid for e in journal.outbox.due(now=200.0)] == [a2, b1, a3]


def test_retry_dead_purge_and_counts(tmp_path: Path) -> None:
    clock = FakeClock(1_000.0)
    spool = Spool(tmp_path / "spool")
    journal = Journal(tmp_path / "journal.sqlite", clock=clock)
    paths = {n: spool.write_output(b"o%d" % n, sop_uid=f"{ROOT_UID}.9.{n}") for n in range(1, 5)}
    uids = {n: add_output(journal, n, path=paths[n]) for n in range(1, 5)}
    add_output(journal, 1, destination="ARCHIVE", path=paths[1])  # same file, second destination
    journal.outbox.mark_sent(uids[1], "PACS")
    journal.outbox.mark_sent(uids[2], "PACS")
    journal.outbox.mark_dead(uids[3], "PACS", error="0xA900 dataset does not match SOP class")
    journal.outbox.mark_dead(uids[4], "PACS", error="out of retries")
    assert journal.counts() == {
        "instances_received": 0,
        "instances_done": 0,
        "instances_skipped": 0,
        "instances_failed": 0,
        "outbox_pending": 1,
        "outbox_sent": 2,
        "outbox_dead": 2,
        "quarantined": 0,
    }
    assert {e.sop_instance_uid for e in journal.outbox.entries(("dead",))} == {uids[3], uids[4]}

    with pytest.raises(LookupError, match="NOWHERE"):
        journal.outbox.mark_sent(uids[1], "NOWHERE")
    assert journal.outbox.retry_dead(uids[3]) == 1
    (revived,) = [e for e in journal.outbox.due(now=clock.now) if e.sop_instance_uid == uids[3]]
    assert (revived.state, revived.attempts) == ("pending", 0)
    assert journal.outbox.retry_dead() == 1
    assert journal.outbox.retry_dead() == 0

    journal.outbox.mark_dead(uids[4], "PACS", error="refused")
    clock.now = 2_000.0
    journal.outbox.mark_sent(uids[3], "PACS")  # sent later than the other two
    assert journal.outbox.purge(("sent",), older_than=1_500.0) == 2  # uids 1 and 2 to PACS
    assert not paths[2].exists()
    assert paths[1].exists()  # still needed for ARCHIVE
    assert paths[3].exists() and paths[4].exists()
    assert journal.outbox.purge(("dead",)) == 1 and not paths[4].exists()
    assert journal.outbox.purge() == 1 and not paths[3].exists()
    assert journal.counts()["outbox_pending"] == 1 and journal.counts()["outbox_sent"] == 0
    with pytest.raises(ValueError, match="'gone'"):
        journal.outbox.purge(("gone",))
    journal.close()


def test_rows_of_one_source_are_listed(journal: Journal) -> None:
    """A worker of the queue lists the rows it hands to the receiving node in a done note."""
    first = add_output(journal, 1, "PACS")
    add_output(journal, 1, "ARCHIVE")
    add_output(journal, 2, "PACS")
    listed = journal.outbox.of_source(f"{ROOT_UID}.3.1")
    assert sorted((e.sop_instance_uid, e.destination) for e in listed) == [(first, "ARCHIVE"), (first, "PACS")]


def test_outputs_of_another_nodes_instance_are_never_due_for_this_nodes_sender(journal: Journal) -> None:
    """A box that receives and works: what its worker made for another node's instance goes back in a done note."""
    journal.record_received(received_instance(1))
    journal.record_received(received_instance(2), for_node="intake-a")
    own, foreign = add_output(journal, 1), add_output(journal, 2)
    assert [e.sop_instance_uid for e in journal.outbox.due(now=1e12)] == [own]
    assert [e.sop_instance_uid for e in journal.outbox.of_source(f"{ROOT_UID}.3.2")] == [foreign]
