"""The stream against a real redis-server: messages, the consumer group, reclaiming, acknowledging,
lag, done notes, and errors that name the server."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from dicom_io.net.network import free_port
from service.node.queue.stream import NoteToSend, QueueCollector, QueueError, WorkQueue, redis_address
from tests.unit.service.node.helpers import received_instance


def test_a_published_instance_reads_back_with_its_path_under_the_workers_spool(
    work_queue: WorkQueue, spool_root: Path, tmp_path: Path, redis_server
) -> None:
    work_queue.ensure_group()
    sent = received_instance(1, spool_root / "instances" / "a" / "b.dcm", at=1234.5678901234)
    work_queue.publish("intake-a", sent)
    # A worker on another machine mounts the shared spool elsewhere: the path follows its mount.
    elsewhere = WorkQueue(redis_server.url, stream=work_queue.stream, group="workers", spool_root=tmp_path / "mnt")
    (message,) = elsewhere.read("w-1", block_seconds=0.1)
    assert message.node == "intake-a"
    assert message.instance.path == tmp_path / "mnt" / "instances" / "a" / "b.dcm"
    assert message.instance.received_at == sent.received_at  # repr round-trips a float exactly
    fields = ("sop_instance_uid", "sop_class_uid", "study_instance_uid", "series_instance_uid", "calling_ae")
    assert all(getattr(message.instance, name) == getattr(sent, name) for name in (*fields, "association_id"))
    elsewhere.close()


def test_each_message_goes_to_one_consumer_of_the_group(work_queue: WorkQueue) -> None:
    work_queue.ensure_group()
    for n in range(5):
        work_queue.publish("node", received_instance(n))
    first = work_queue.read("w-1", block_seconds=0.05)
    second = work_queue.read("w-2", block_seconds=0.05)
    assert len(first) == 5 and second == []


def test_a_message_left_pending_is_reclaimed_after_min_idle_only(work_queue: WorkQueue) -> None:
    work_queue.ensure_group()
    work_queue.publish("node", received_instance(1))
    (held,) = work_queue.read("dead-worker", block_seconds=0.05)
    assert work_queue.reclaim("w-2", min_idle_seconds=60) == []
    time.sleep(0.15)
    (taken,) = work_queue.reclaim("w-2", min_idle_seconds=0.1)
    assert taken.message_id == held.message_id and taken.instance == held.instance


def test_refresh_keeps_a_live_consumers_messages_and_series_from_being_reclaimed_and_steals_nothing(
    work_queue: WorkQueue, redis_client: redis.Redis
) -> None:
    work_queue.ensure_group()
    for n in range(3):
        work_queue.publish("node", received_instance(n))
    work_queue.read_count = 2
    mine = [m.message_id for m in work_queue.read("w-1", block_seconds=0.05)]
    (theirs,) = work_queue.read("w-2", block_seconds=0.05)
    study, series = received_instance(0).study_instance_uid, received_instance(0).series_instance_uid
    assert work_queue.own_series("w-1", study, series, ttl_seconds=0.5) == "w-1"
    time.sleep(0.3)
    assert work_queue.refresh("w-1", [*mine, theirs.message_id], [(study, series)], ttl_seconds=5) == 2
    assert redis_client.pttl(f"{work_queue.stream}:owner:{study}:{series}") > 4000
    time.sleep(0.1)
    assert [m.message_id for m in work_queue.reclaim("w-3", min_idle_seconds=0.25)] == [theirs.message_id]
    pending = redis_client.xpending_range(work_queue.stream, work_queue.group, min="-", max="+", count=10)
    assert {p["message_id"].decode(): p["consumer"].decode() for p in pending} == {
        mine[0]: "w-1",
        mine[1]: "w-1",
        theirs.message_id: "w-3",
    }
    assert {p["times_delivered"] for p in pending if p["consumer"] == b"w-1"} == {1}  # JUSTID: not a delivery


def test_ack_ends_pending_and_lag_counts_undelivered_and_pending(work_queue: WorkQueue) -> None:
    work_queue.ensure_group()
    for n in range(4):
        work_queue.publish("node", received_instance(n))
    assert work_queue.lag() == (4, 0)
    assert work_queue.reclaim("w-1", min_idle_seconds=0) == []  # nothing delivered yet: nothing to reclaim
    work_queue.read_count = 3
    taken = work_queue.read("w-1", block_seconds=0.05)
    assert len(taken) == 3 and work_queue.lag() == (1, 3)
    assert work_queue.ack([m.message_id for m in taken[:2]]) == 2
    assert work_queue.lag() == (1, 1)
    assert work_queue.ack([taken[0].message_id]) == 0  # acknowledged once only


def test_the_group_is_created_once_and_found_missing_after_redis_lost_its_data(
    work_queue: WorkQueue, redis_client: redis.Redis
) -> None:
    assert not work_queue.group_exists()
    assert work_queue.ensure_group() is True
    assert work_queue.ensure_group() is False
    assert work_queue.group_exists()
    redis_client.flushall()
    assert not work_queue.group_exists()


def test_done_notes_reach_their_node_only_and_are_dropped(work_queue: WorkQueue) -> None:
    work_queue.note_done("node-a", received_instance(1, at=5.5), "done", "")
    work_queue.note_done("node-b", received_instance(2), "failed", "cannot decode")
    (note,) = work_queue.done_notes("node-a")
    expected = (received_instance(1).sop_instance_uid, 5.5, "done")
    assert (note.sop_instance_uid, note.received_at, note.outcome) == expected
    work_queue.drop_done_notes("node-a", [note.note_id])
    assert work_queue.done_notes("node-a") == []
    assert [n.reason for n in work_queue.done_notes("node-b")] == ["cannot decode"]


def test_an_acknowledgement_carries_its_done_notes_and_a_hand_over_is_seen_once_by_its_receiver(
    work_queue: WorkQueue,
) -> None:
    work_queue.ensure_group()
    for n in range(3):
        work_queue.publish("node-a", received_instance(n))
    taken = work_queue.read("w-1", block_seconds=0.05)
    work_queue.transfer([taken[2].message_id], "w-2")
    assert work_queue.poll("w-2", block_seconds=0.01) == ([], True)
    assert work_queue.poll("w-2", block_seconds=0.01) == ([], False)  # the marker is taken once
    assert [m.message_id for m in work_queue.read_own_pending("w-2")] == [taken[2].message_id]
    notes = [NoteToSend("node-a", m.instance, "done", "") for m in taken[:2]]
    assert work_queue.ack([m.message_id for m in taken[:2]], notes) == 2
    assert [n.sop_instance_uid for n in work_queue.done_notes("node-a")] == [received_instance(n).sop_instance_uid
                                                                             for n in range(2)]  # fmt: skip
    assert work_queue.lag() == (0, 1)


def test_the_collector_reports_lag_and_pending(work_queue: WorkQueue) -> None:
    work_queue.ensure_group()
    for n in range(3):
        work_queue.publish("node", received_instance(n))
    work_queue.read_count = 1
    work_queue.read("w", block_seconds=0.05)
    values = {family.name: family.samples[0].value for family in QueueCollector(work_queue).collect()}
    assert values == {"pacsxai_queue_lag": 2, "pacsxai_queue_pending": 1}


def test_an_unreachable_redis_is_an_error_naming_it_without_the_password(tmp_path: Path) -> None:
    port = free_port()
    queue = WorkQueue(f"redis://:s3cret@127.0.0.1:{port}/0", stream="s", group="g", spool_root=tmp_path)
    with pytest.raises(QueueError, match=f"127.0.0.1:{port}/0") as caught:
        queue.publish("node", received_instance(1))
    assert "s3cret" not in str(caught.value)
    assert list(QueueCollector(queue).collect()) == []  # a scrape goes on without the queue's gauges
    assert redis_address("redis://h") == "h:6379/0"


def test_a_consumer_is_forgotten_only_when_nothing_is_pending_with_it(work_queue: WorkQueue, redis_client) -> None:
    work_queue.ensure_group()
    work_queue.publish("node", received_instance(1))
    (message,) = work_queue.read("w-1", block_seconds=0.05)
    assert work_queue.forget_consumer("w-1") is False  # its pending message would vanish with it
    assert work_queue.reclaim("w-2", min_idle_seconds=0) != []
    assert work_queue.forget_consumer("w-1") is True
    names = {c["name"].decode() for c in redis_client.xinfo_consumers(work_queue.stream, work_queue.group)}
    assert names == {"w-2"}


def test_an_entry_that_is_not_a_pacs_xai_message_is_acknowledged_not_raised(
    work_queue: WorkQueue, redis_client, caplog: pytest.LogCaptureFixture
) -> None:
    """A reclaimed entry that raised would stop every consumer that reclaims it in turn."""
    work_queue.ensure_group()
    work_queue.publish("node", received_instance(1))
    stray = redis_client.xadd(work_queue.stream, {"sop": "1.2.3"})  # written by something else: fields missing
    work_queue.publish("node", received_instance(2))
    messages = work_queue.read("w-1", block_seconds=0.05)
    assert [m.instance.sop_instance_uid for m in messages] == [
        received_instance(1).sop_instance_uid,
        received_instance(2).sop_instance_uid,
    ]
    assert work_queue.lag() == (0, 2), "the stray entry is acknowledged, the two messages pending"
    assert stray.decode() in caplog.text
