"""A worker's consumer against a real redis-server and a real journal: series assembled from the
messages, acknowledged only after the outbox commit, redeliveries not processed again, a dead
consumer's messages reclaimed, another journal told through done notes, held messages handed back.

The processor here journals one output per instance the way the real one does
(:meth:`Journal.complete`), and records each batch; the pipeline itself is tested elsewhere."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import redis

from service.node.assembler import SeriesKey
from service.node.queue.consumer import StreamConsumer
from service.node.queue.refill import Refiller, apply_done_notes
from service.node.queue.stream import WorkQueue
from service.node.store import Journal, NewOutput, ReceivedInstance, StoreError, thread_claimant
from tests.unit.service.node.helpers import received_instance


class JournalingProcessor:
    """Completes every instance with one outbox row, as :class:`SeriesProcessor` does; records the batches."""

    def __init__(self, journal: Journal, *, check: object = None) -> None:
        self.journal = journal
        self.batches: list[list[str]] = []
        self.check = check

    def process_batch(self, key: SeriesKey, instances: Sequence[ReceivedInstance]) -> dict[str, int]:
        if callable(self.check):
            self.check()
        self.batches.append([i.sop_instance_uid for i in instances])
        for instance in instances:
            output = NewOutput(
                f"{instance.sop_instance_uid}.1", instance.sop_instance_uid, "PACS", Path("/o.dcm"), "sc", "gradcam"
            )
            self.journal.complete(instance.sop_instance_uid, [output])
        return {"done": len(instances), "skipped": 0, "failed": 0}


def _consumer(
    queue: WorkQueue, journal: Journal, processor: JournalingProcessor, name: str, thread: int = 0, **kwargs: object
) -> StreamConsumer:
    settings = {"idle_seconds": 0.2, "max_wait_seconds": 30.0, "reclaim_idle_seconds": 60.0, "node": "node-a"}
    settings.update(kwargs)
    return StreamConsumer(queue, journal, processor, consumer=thread_claimant(name, thread), **settings)


def _publish(journal: Journal, queue: WorkQueue, spool_root: Path, ns: Sequence[int]) -> list[str]:
    now = time.time()
    uids = []
    for n in ns:
        instance = received_instance(n, spool_root / f"{n}.dcm", at=now)
        journal.record_received(instance)
        queue.publish("node-a", instance)
        uids.append(instance.sop_instance_uid)
    return uids


def _steps_until(consumer: StreamConsumer, done: object, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, "the consumer did not get there in time"
        consumer.step()


def test_a_series_is_processed_once_ready_then_acknowledged_after_its_outputs_are_in_the_outbox(
    journal: Journal, work_queue: WorkQueue, spool_root: Path
) -> None:
    work_queue.ensure_group()
    uids = _publish(journal, work_queue, spool_root, range(3))

    def nothing_acknowledged_before_the_outbox() -> None:
        assert work_queue.lag() == (0, 3)  # delivered and pending while the batch runs

    processor = JournalingProcessor(journal, check=nothing_acknowledged_before_the_outbox)
    consumer = _consumer(work_queue, journal, processor, "worker-0:1")
    consumer.step()
    assert processor.batches == []  # idle_seconds not yet passed: the series may grow
    _steps_until(consumer, lambda: processor.batches)
    assert processor.batches == [uids]
    assert journal.counts()["outbox_pending"] == 3
    assert work_queue.lag() == (0, 0) and consumer.held == 0


def test_a_redelivered_processed_instance_is_acknowledged_not_processed_again(
    journal: Journal, work_queue: WorkQueue, spool_root: Path
) -> None:
    work_queue.ensure_group()
    (uid,) = _publish(journal, work_queue, spool_root, [1])
    processor = JournalingProcessor(journal)
    consumer = _consumer(work_queue, journal, processor, "worker-0:1")
    _steps_until(consumer, lambda: processor.batches)
    (row,) = journal.get_instances([uid])
    work_queue.publish("node-a", row)  # the same journaled copy published again (a refill)
    _steps_until(consumer, lambda: work_queue.lag() == (0, 0))
    assert processor.batches == [[uid]]


def test_a_dead_consumers_messages_are_reclaimed_and_processed_once(
    journal: Journal, work_queue: WorkQueue, spool_root: Path
) -> None:
    work_queue.ensure_group()
    uids = _publish(journal, work_queue, spool_root, range(4))
    work_queue.read("worker-9:9-0", block_seconds=0.05)  # read, then SIGKILLed: pending, never acknowledged
    processor = JournalingProcessor(journal)
    survivor = _consumer(work_queue, journal, processor, "worker-1:2", reclaim_idle_seconds=0.3)
    _steps_until(survivor, lambda: processor.batches)
    assert processor.batches == [uids]
    _steps_until(survivor, lambda: work_queue.lag() == (0, 0))


def test_instances_another_worker_claimed_are_acknowledged_once_it_is_done(
    journal: Journal, work_queue: WorkQueue, spool_root: Path
) -> None:
    work_queue.ensure_group()
    uids = _publish(journal, work_queue, spool_root, range(2))
    assert journal.series.claim_series("worker-7:7", received_instance(0).study_instance_uid,
                                       received_instance(0).series_instance_uid) == tuple(uids)  # fmt: skip
    processor = JournalingProcessor(journal)
    consumer = _consumer(work_queue, journal, processor, "worker-0:1")
    for _ in range(3):
        consumer.step()
        time.sleep(0.1)
    assert processor.batches == [] and consumer.held == 2  # the other worker has them
    JournalingProcessor(journal).process_batch(SeriesKey("s", "s"), journal.get_instances(uids))  # it finishes
    _steps_until(consumer, lambda: consumer.held == 0)
    assert processor.batches == [] and work_queue.lag() == (0, 0)


def test_a_worker_of_another_journal_hands_its_results_to_the_receiving_node(
    journal: Journal, work_queue: WorkQueue, spool_root: Path, tmp_path: Path
) -> None:
    work_queue.ensure_group()
    uids = _publish(journal, work_queue, spool_root, range(2))  # `journal`: the receiving node's
    with Journal(tmp_path / "worker-box.sqlite") as own:
        processor = JournalingProcessor(own)
        consumer = _consumer(work_queue, own, processor, "worker-0:1", node="node-b")
        _steps_until(consumer, lambda: work_queue.lag() == (0, 0))
        assert processor.batches == [uids]
        assert [own.instance_state(uid) for uid in uids] == [None] * 2  # handed over: this box keeps nothing
        assert own.counts()["outbox_pending"] == 0
    assert [journal.instance_state(uid) for uid in uids] == [("received", "")] * 2  # until the node reads the notes
    assert apply_done_notes(journal, work_queue, "node-a") == 2
    assert [journal.instance_state(uid) for uid in uids] == [("done", "")] * 2
    delivered = journal.outbox.entries()
    assert sorted((e.source_sop_instance_uid, e.sop_instance_uid, e.destination, e.kind) for e in delivered) == [
        (uid, f"{uid}.1", "PACS", "sc") for uid in uids
    ]


def test_stopping_hands_held_messages_back_for_another_worker(
    journal: Journal, work_queue: WorkQueue, spool_root: Path
) -> None:
    work_queue.ensure_group()
    uids = _publish(journal, work_queue, spool_root, range(3))
    processor = JournalingProcessor(journal)
    consumer = _consumer(work_queue, journal, processor, "worker-0:1", idle_seconds=30.0)
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop,))
    thread.start()
    deadline = time.monotonic() + 10
    while consumer.held < 3:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    stop.set()
    thread.join(10)
    assert processor.batches == [] and work_queue.lag() == (3, 0)  # undelivered again, pending with no one
    other = JournalingProcessor(journal)
    _steps_until(_consumer(work_queue, journal, other, "worker-1:2", idle_seconds=0.01), lambda: other.batches)
    assert other.batches == [uids]


@pytest.mark.parametrize("outcome", ["skipped", "failed"])
def test_instances_that_end_skipped_or_failed_are_acknowledged_too(
    journal: Journal, work_queue: WorkQueue, spool_root: Path, outcome: str
) -> None:
    work_queue.ensure_group()
    uids = _publish(journal, work_queue, spool_root, range(2))

    class Refusing(JournalingProcessor):
        def process_batch(self, key: SeriesKey, instances: Sequence[ReceivedInstance]) -> dict[str, int]:
            self.batches.append([i.sop_instance_uid for i in instances])
            self.journal.mark_processed([i.sop_instance_uid for i in instances], outcome, "not an image")
            return {"done": 0, "skipped": 0, "failed": 0, outcome: len(instances)}

    processor = Refusing(journal)
    consumer = _consumer(work_queue, journal, processor, "worker-0:1")
    _steps_until(consumer, lambda: work_queue.lag() == (0, 0) and processor.batches)
    assert processor.batches == [uids] and consumer.held == 0


def test_a_series_read_by_two_consumers_on_two_machines_is_assembled_by_one(
    journal: Journal, work_queue: WorkQueue, spool_root: Path, tmp_path: Path
) -> None:
    """Each worker box has its own journal, so only the series' owner in Redis keeps it whole."""
    work_queue.ensure_group()
    uids = _publish(journal, work_queue, spool_root, range(4))
    work_queue.read_count = 2  # each consumer's read takes half of the series
    with Journal(tmp_path / "box-a.sqlite") as box_a, Journal(tmp_path / "box-b.sqlite") as box_b:
        on_a, on_b = JournalingProcessor(box_a), JournalingProcessor(box_b)
        a = _consumer(work_queue, box_a, on_a, "worker-0:1", node="box-a", idle_seconds=0.5)
        b = _consumer(work_queue, box_b, on_b, "worker-0:2", node="box-b", idle_seconds=0.5)
        a.step()  # reads two, owns the series
        b.step()  # reads two, hands them to a
        assert a.held == 2 and b.held == 0
        _steps_until(a, lambda: on_a.batches)
        assert on_a.batches == [uids] and on_b.batches == []
        _steps_until(a, lambda: work_queue.lag() == (0, 0))
    assert apply_done_notes(journal, work_queue, "node-a") == 4


def test_the_series_of_a_dead_owner_is_taken_over_with_its_messages(
    journal: Journal, work_queue: WorkQueue, spool_root: Path
) -> None:
    work_queue.ensure_group()
    first = _publish(journal, work_queue, spool_root, range(2))
    study, series = received_instance(0).study_instance_uid, received_instance(0).series_instance_uid
    assert work_queue.own_series("worker-9:9-0", study, series, ttl_seconds=600) == "worker-9:9-0"
    work_queue.read("worker-9:9-0", block_seconds=0.05)  # then SIGKILLed
    processor = JournalingProcessor(journal)
    survivor = _consumer(work_queue, journal, processor, "worker-1:2", reclaim_idle_seconds=0.3)
    _steps_until(survivor, lambda: processor.batches)
    assert processor.batches == [first]
    later = _publish(journal, work_queue, spool_root, [5])  # the series goes on: to the new owner
    _steps_until(survivor, lambda: len(processor.batches) == 2)
    assert processor.batches[1] == later


def test_a_retry_later_in_one_pipeline_thread_leaves_its_siblings_claims_alone(
    journal: Journal, work_queue: WorkQueue, spool_root: Path
) -> None:
    """workers.pipeline = 2 in one worker process: thread 1 meets a full disk while thread 0 processes
    another series; the claims of thread 0's batch stay, so no other worker takes them meanwhile."""
    work_queue.ensure_group()
    first = _publish(journal, work_queue, spool_root, range(2))
    study = received_instance(0).study_instance_uid

    class FullDisk(JournalingProcessor):
        def process_batch(self, key: SeriesKey, instances: Sequence[ReceivedInstance]) -> dict[str, int]:
            raise StoreError("No space left on device")

    sibling = _consumer(work_queue, journal, FullDisk(journal), "worker-0:1", thread=1)
    kept: list[list[str]] = []

    def while_thread_0_processes() -> None:
        later = [dataclasses.replace(received_instance(n, spool_root / f"{n}.dcm", at=time.time()),
                                     series_instance_uid=f"{received_instance(0).series_instance_uid}.2")
                 for n in (5, 6)]  # fmt: skip
        for instance in later:
            journal.record_received(instance)
            work_queue.publish("node-a", instance)
        deadline = time.monotonic() + 10
        with pytest.raises(StoreError):
            while time.monotonic() < deadline:
                sibling.step()
        kept.append(journal.series.claimed_by(thread_claimant("worker-0:1", 0)))
        assert journal.series.claim_series("worker-1:2-0", study, received_instance(0).series_instance_uid) == ()

    processor = JournalingProcessor(journal, check=while_thread_0_processes)
    consumer = _consumer(work_queue, journal, processor, "worker-0:1", thread=0)
    consumer.step()  # reads the first series before the second is published
    _steps_until(consumer, lambda: processor.batches)
    assert kept == [first] and processor.batches == [first]


def test_a_box_that_also_receives_never_has_another_nodes_outputs_due_for_its_own_sender(
    journal: Journal, work_queue: WorkQueue, spool_root: Path, tmp_path: Path
) -> None:
    """Between the outputs' commit and their hand-over in the done note, this box's sender must not
    see them: the receiving node delivers them, and two senders would send every result twice."""
    work_queue.ensure_group()
    uids = _publish(journal, work_queue, spool_root, range(2))  # received by node-a
    due_after_commit: list[list[str]] = []
    with Journal(tmp_path / "box-b.sqlite") as box_b:  # node-b: receives (has a sender) and works

        class Watching(JournalingProcessor):
            def process_batch(self, key: SeriesKey, instances: Sequence[ReceivedInstance]) -> dict[str, int]:
                tally = super().process_batch(key, instances)
                due_after_commit.append([e.sop_instance_uid for e in box_b.outbox.due(time.time() + 3600)])
                return tally

        processor = Watching(box_b)
        _steps_until(_consumer(work_queue, box_b, processor, "worker-0:1", node="node-b"), lambda: processor.batches)
    assert due_after_commit == [[]]
    assert apply_done_notes(journal, work_queue, "node-a") == 2
    assert sorted(e.source_sop_instance_uid for e in journal.outbox.due(time.time())) == sorted(uids)


def test_a_result_whose_done_note_redis_lost_is_computed_again_not_noted_empty(
    journal: Journal, work_queue: WorkQueue, spool_root: Path, tmp_path: Path, redis_client
) -> None:
    """Redis empties after the worker box's note was written, before the receiving node read it:
    the node refills the instance from its journal, and the worker box, which handed the outputs
    over already, processes it again so that the new note carries them."""
    uids = _publish(journal, work_queue, spool_root, range(2))
    work_queue.ensure_group()
    with Journal(tmp_path / "worker-box.sqlite") as own:
        processor = JournalingProcessor(own)
        consumer = _consumer(work_queue, own, processor, "worker-0:1", node="node-b")
        _steps_until(consumer, lambda: work_queue.lag() == (0, 0) and processor.batches)
        redis_client.flushall()  # the notes with it
        refiller = Refiller(journal, work_queue, "node-a", tmp_path, check_seconds=60)
        refiller.check()  # a new group: the journal's waiting instances published again
        _steps_until(consumer, lambda: work_queue.lag() == (0, 0) and len(processor.batches) == 2)
    assert processor.batches == [uids, uids]
    assert apply_done_notes(journal, work_queue, "node-a") == 2
    assert sorted(e.source_sop_instance_uid for e in journal.outbox.entries()) == sorted(uids)
    assert [journal.instance_state(uid) for uid in uids] == [("done", "")] * 2


def test_a_batch_longer_than_reclaim_idle_is_not_reclaimed_by_another_worker_and_processed_twice(
    journal: Journal, work_queue: WorkQueue, spool_root: Path, tmp_path: Path
) -> None:
    """Box A's batch runs 4x reclaim_idle_seconds while box B (its own journal: no journal claim
    stops it) keeps reclaiming: A's refresher keeps its messages, so B never takes the series."""
    work_queue.ensure_group()
    uids = _publish(journal, work_queue, spool_root, range(3))
    processing, finish = threading.Event(), threading.Event()

    def slow() -> None:
        processing.set()
        assert finish.wait(20)

    with Journal(tmp_path / "box-a.sqlite") as box_a, Journal(tmp_path / "box-b.sqlite") as box_b:
        on_a, on_b = JournalingProcessor(box_a, check=slow), JournalingProcessor(box_b)
        a = _consumer(work_queue, box_a, on_a, "worker-0:1", node="box-a", reclaim_idle_seconds=0.4)
        b = _consumer(work_queue, box_b, on_b, "worker-0:2", node="box-b", reclaim_idle_seconds=0.4)
        stop = threading.Event()
        thread = threading.Thread(target=a.run, args=(stop,))
        thread.start()
        try:
            assert processing.wait(10)
            deadline = time.monotonic() + 1.6
            while time.monotonic() < deadline:
                b.step()
        finally:
            finish.set()
            _steps_until(b, lambda: work_queue.lag() == (0, 0))
            stop.set()
            thread.join(10)
        assert on_a.batches == [uids] and on_b.batches == []


def _calls(client: redis.Redis, command: str) -> int:
    return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def test_a_batchs_done_notes_and_acknowledgement_go_to_redis_in_one_transaction(
    journal: Journal, work_queue: WorkQueue, spool_root: Path, tmp_path: Path, redis_client: redis.Redis
) -> None:
    work_queue.ensure_group()
    uids = _publish(journal, work_queue, spool_root, range(4))
    with Journal(tmp_path / "worker-box.sqlite") as own:
        processor = JournalingProcessor(own)
        consumer = _consumer(work_queue, own, processor, "worker-0:1", node="node-b")
        _steps_until(consumer, lambda: consumer.held == 4)
        redis_client.config_resetstat()  # from here: the batch and its acknowledgement
        _steps_until(consumer, lambda: processor.batches)
    assert processor.batches == [uids]
    assert (_calls(redis_client, "multi"), _calls(redis_client, "exec")) == (1, 1)
    assert (_calls(redis_client, "xadd"), _calls(redis_client, "xack")) == (4, 1)  # four notes, one XACK
    assert apply_done_notes(journal, work_queue, "node-a") == 4


def test_messages_held_while_their_series_waits_are_not_read_again(
    journal: Journal, work_queue: WorkQueue, spool_root: Path, redis_client: redis.Redis
) -> None:
    """Reading the pending messages again on every step costs a round trip with every held message
    in it, and Redis counts each as a delivery: only at start, after an error or when handed some."""
    work_queue.ensure_group()
    _publish(journal, work_queue, spool_root, range(3))
    deliveries: list[set[int]] = []

    def count_deliveries() -> None:
        pending = redis_client.xpending_range(work_queue.stream, work_queue.group, min="-", max="+", count=10)
        deliveries.append({entry["times_delivered"] for entry in pending})

    processor = JournalingProcessor(journal, check=count_deliveries)
    consumer = _consumer(work_queue, journal, processor, "worker-0:1", idle_seconds=1.0)
    _steps_until(consumer, lambda: processor.batches)  # the series waits a second, then is processed
    assert deliveries == [{1}]
    assert work_queue.lag() == (0, 0)


def test_messages_pending_with_a_consumer_it_never_read_are_still_taken_after_reclaim_idle(
    journal: Journal, work_queue: WorkQueue, spool_root: Path, redis_client: redis.Redis
) -> None:
    """At least once: a hand-over whose marker was lost leaves messages pending with a consumer that
    does not know it holds them; after reclaim_idle_seconds it reclaims them like a dead consumer's."""
    work_queue.ensure_group()
    uids = _publish(journal, work_queue, spool_root, range(2))
    processor = JournalingProcessor(journal)
    consumer = _consumer(work_queue, journal, processor, "worker-0:1", reclaim_idle_seconds=0.3)
    consumer.step()  # its look at start: nothing pending yet; then it reads the two
    assert consumer.held == 2
    consumer._held.clear()  # as if a read's reply was lost on the way: pending with it, not held
    consumer._note_holding()
    _steps_until(consumer, lambda: processor.batches)
    assert processor.batches == [uids] and work_queue.lag() == (0, 0)
