"""A receiver's publish: after the journal commit, the committed row, from a publisher thread in
pipelined batches; a failed publish never changes the answer and marks the backlog. Against a real
redis-server."""

from __future__ import annotations

from pathlib import Path

from dicom_io.net.network import free_port
from service.node.assembler import SeriesKey
from service.node.queue.publish import PublishingAssembly
from service.node.queue.refill import backlog_marker
from service.node.queue.stream import WorkQueue
from service.node.store import Journal
from tests.unit.service.node.helpers import SERIES, STUDY, received_instance


def test_the_committed_journal_row_is_published(
    journal: Journal, work_queue: WorkQueue, spool_root: Path, tmp_path: Path
) -> None:
    work_queue.ensure_group()
    assembly = PublishingAssembly(journal, "receiver-0:1", work_queue, "node-a", tmp_path)
    assembly.association_opened("assoc-1")
    instance = received_instance(1, spool_root / "instances" / "1.dcm", association="assoc-1", at=77.25)
    journal.record_received(instance)
    assembly.instance_arrived(SeriesKey(STUDY, SERIES), instance.sop_instance_uid, "assoc-1")
    assembly.close()  # everything handed over is published before it returns
    (message,) = work_queue.read("w", block_seconds=0.05)
    assert (message.node, message.instance) == ("node-a", instance)
    assert not backlog_marker(tmp_path).exists()


def test_a_burst_is_published_whole_in_arrival_order(
    journal: Journal, work_queue: WorkQueue, spool_root: Path, tmp_path: Path
) -> None:
    work_queue.ensure_group()
    assembly = PublishingAssembly(journal, "receiver-0:1", work_queue, "node-a", tmp_path)
    sent = [received_instance(n, spool_root / f"{n}.dcm") for n in range(600)]  # more than one batch
    for instance in sent:
        journal.record_received(instance)
        assembly.instance_arrived(SeriesKey(STUDY, SERIES), instance.sop_instance_uid, "assoc-1")
    assembly.close()
    work_queue.read_count = 1000
    assert [m.instance for m in work_queue.read("w", block_seconds=0.05)] == sent


def test_redis_away_leaves_the_instance_in_the_journal_and_marks_the_backlog(
    journal: Journal, spool_root: Path, tmp_path: Path
) -> None:
    away = WorkQueue(f"redis://127.0.0.1:{free_port()}/0", stream="s", group="g", spool_root=spool_root)
    assembly = PublishingAssembly(journal, "receiver-0:1", away, "node-a", tmp_path)
    instance = received_instance(1, spool_root / "1.dcm")
    journal.record_received(instance)
    assembly.instance_arrived(SeriesKey(STUDY, SERIES), instance.sop_instance_uid, "assoc-1")  # no exception
    assembly.close()
    assert backlog_marker(tmp_path).exists()
    assert journal.instance_state(instance.sop_instance_uid) == ("received", "")
