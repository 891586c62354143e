"""Refilling an emptied Redis from the journal, and done notes into the journal, against a real redis-server."""

from __future__ import annotations

from pathlib import Path

import redis

from service.node.queue.refill import Refiller, apply_done_notes, backlog_marker, refill
from service.node.queue.stream import WorkQueue
from service.node.store import Journal, OutboxEntry
from tests.unit.service.node.helpers import received_instance


def _journal_with(journal: Journal, spool_root: Path, received: int, done: int) -> list[str]:
    """``received + done`` instances journaled; the last ``done`` of them processed. Returns the waiting UIDs."""
    instances = [received_instance(n, spool_root / f"{n}.dcm") for n in range(received + done)]
    for instance in instances:
        journal.record_received(instance)
    journal.mark_processed([i.sop_instance_uid for i in instances[received:]], "done")
    return [i.sop_instance_uid for i in instances[:received]]


def test_refill_publishes_exactly_what_the_journal_has_not_processed(
    journal: Journal, work_queue: WorkQueue, spool_root: Path
) -> None:
    waiting = _journal_with(journal, spool_root, received=3, done=2)
    work_queue.ensure_group()
    assert refill(journal, work_queue, "node-a") == 3
    messages = work_queue.read("w", block_seconds=0.05)
    assert [m.instance.sop_instance_uid for m in messages] == waiting
    assert {m.node for m in messages} == {"node-a"}


def test_a_redis_that_came_back_empty_is_refilled_once(
    journal: Journal, work_queue: WorkQueue, spool_root: Path, redis_client: redis.Redis, tmp_path: Path
) -> None:
    waiting = _journal_with(journal, spool_root, received=2, done=1)
    refiller = Refiller(journal, work_queue, "node-a", tmp_path, check_seconds=60)
    refiller.check()  # start: the journal's waiting instances may be missing from Redis
    assert work_queue.lag() == (2, 0)
    refiller.check()
    assert work_queue.lag() == (2, 0)  # nothing changed: nothing published again
    redis_client.flushall()  # Redis restarted without its data
    refiller.check()
    assert work_queue.group_exists()
    assert [m.instance.sop_instance_uid for m in work_queue.read("w", block_seconds=0.05)] == waiting


def test_a_failed_publish_marked_by_a_receiver_is_published_again(
    journal: Journal, work_queue: WorkQueue, spool_root: Path, tmp_path: Path
) -> None:
    refiller = Refiller(journal, work_queue, "node-a", tmp_path, check_seconds=60)
    refiller.check()
    (waiting,) = _journal_with(journal, spool_root, received=1, done=0)  # journaled; its XADD failed
    marker = backlog_marker(tmp_path)
    marker.parent.mkdir(parents=True)
    marker.touch()
    refiller.check()
    assert not marker.exists()
    assert [m.instance.sop_instance_uid for m in work_queue.read("w", block_seconds=0.05)] == [waiting]


def test_done_notes_queue_the_outputs_for_this_nodes_sender_once(
    journal: Journal, work_queue: WorkQueue, spool_root: Path
) -> None:
    first, second, resent = _journal_with(journal, spool_root, received=3, done=0)
    rows = {i.sop_instance_uid: i for i in journal.get_instances([first, second, resent])}
    result = OutboxEntry(
        f"{first}.1", first, "PACS", spool_root / "outbox" / "r.dcm", "sc", "gradcam", "pending", 0, 0, ""
    )
    work_queue.note_done("node-a", rows[first], "done", "", [result])
    work_queue.note_done("node-a", rows[first], "done", "", [result])  # a redelivery's second note
    work_queue.note_done("node-a", rows[second], "failed", "cannot decode the pixel data")
    # A copy of the third was re-sent after the worker read the first copy: it must stay waiting.
    journal.record_received(received_instance(2, spool_root / "2.dcm", at=rows[resent].received_at + 10))
    work_queue.note_done("node-a", rows[resent], "done", "")
    work_queue.note_done("node-b", rows[first], "failed", "another node's note")
    assert apply_done_notes(journal, work_queue, "node-a") == 2
    assert journal.instance_state(first) == ("done", "")
    assert journal.instance_state(second) == ("failed", "cannot decode the pixel data")
    assert journal.instance_state(resent) == ("received", "")
    (queued,) = journal.outbox.entries()
    assert (queued.sop_instance_uid, queued.path, queued.destination) == (f"{first}.1", result.path, "PACS")
    journal.outbox.mark_sent(queued.sop_instance_uid, "PACS")
    work_queue.note_done("node-a", rows[first], "done", "", [result])  # late: must not send it again
    apply_done_notes(journal, work_queue, "node-a")
    assert journal.outbox.entries(["pending"]) == []
    assert work_queue.done_notes("node-a") == []
    assert len(work_queue.done_notes("node-b")) == 1


def test_done_notes_that_queue_outputs_wake_the_sender(
    journal: Journal, work_queue: WorkQueue, spool_root: Path, tmp_path: Path
) -> None:
    rings: list[int] = []
    refiller = Refiller(
        journal, work_queue, "node-a", tmp_path, check_seconds=60, outputs_queued=lambda: rings.append(1)
    )
    refiller.check()
    assert rings == [], "no note, no wake-up"
    (first,) = _journal_with(journal, spool_root, received=1, done=0)
    (row,) = journal.get_instances([first])
    result = OutboxEntry(
        f"{first}.1", first, "PACS", spool_root / "outbox" / "r.dcm", "sc", "gradcam", "pending", 0, 0, ""
    )
    work_queue.note_done("node-a", row, "done", "", [result])
    refiller.check()
    assert rings == [1] and [e.sop_instance_uid for e in journal.outbox.entries(["pending"])] == [f"{first}.1"]


def test_a_requested_refill_publishes_the_waiting_instances_again(
    journal: Journal, work_queue: WorkQueue, spool_root: Path, tmp_path: Path
) -> None:
    """A receiver died: what it journaled may not be in the stream; the supervisor asks for a refill."""
    refiller = Refiller(journal, work_queue, "node-a", tmp_path, check_seconds=60)
    refiller.check()
    waiting = _journal_with(journal, spool_root, received=2, done=0)
    refiller.check()
    assert work_queue.lag() == (0, 0)  # nothing says they are missing
    refiller.request_refill()
    refiller.check()
    assert [m.instance.sop_instance_uid for m in work_queue.read("w", block_seconds=0.05)] == waiting
