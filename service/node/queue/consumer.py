"""A worker's side of the queue: read instances from the consumer group, assemble them into
series, process each ready series, and acknowledge only once the outputs are in the outbox.

One :class:`StreamConsumer` per pipeline thread of a worker process (Redis consumer
``<worker>-<n>``). Each message's instance is first made known to the worker's journal: on the
receiving box the row is there already; a worker on another machine journals it in its own
journal (the path resolved against its mount of the shared spool), marked as the receiving node's
(``for_node``): its outputs go back in a done note, and this box's own sender, on a box that also
receives, never sends them. An instance the journal says
is processed (a redelivery) is acknowledged at once, never processed twice.

Assembly: one consumer assembles a series, whichever receivers took its instances. The first to
read an instance of it becomes its owner (a Redis key, ``SET NX`` with a time to live of
``max_wait_seconds + reclaim_idle_seconds``); another consumer reading an instance of that series
hands the message to the owner (``XCLAIM`` on its behalf, with a marker), and the owner, seeing
the marker in its next read's round trip, finds it among its own pending messages (which it reads
only then, at start and after an error: a message pending with it and never read is reclaimed
after ``reclaim_idle_seconds`` in any case). A consumer that reclaims a dead one's messages takes its series over. The
messages of a series are held until it is ready by the assembler's timers on the receivers' clock
(``received_at``): ``assembly.idle_seconds`` after its last instance, or
``assembly.max_wait_seconds`` after its first. Meanwhile, and while the batch runs, a thread of
the consumer refreshes the messages it holds and the series it owns every ``queue.refresh_seconds``
(:meth:`~service.node.queue.stream.WorkQueue.refresh`), so however long a series waits or runs,
no other worker reclaims it (``queue.reclaim_idle_seconds`` is only how long a dead consumer's
messages wait). Then the worker claims, in its journal, every
unclaimed ``received`` instance of the series (:meth:`~service.node.store.SeriesClaims.claim_series`),
including any whose message another consumer of the same journal still holds (those acknowledge
theirs once the journal says done), and processes them as one batch.

Acknowledgement: after :meth:`SeriesProcessor.process_batch
<service.node.processor.SeriesProcessor.process_batch>` committed the outputs and outcomes
(one journal transaction per instance), a done note goes to a receiving node whose journal is not
this one, with the outbox rows (files in the shared spool): that node's journal takes them and its
sender delivers them (:mod:`service.node.queue.refill`); then ``XACK``, and this journal forgets
those instances and their rows. A box of only workers keeps nothing that is not also in a
receiving node's journal or in Redis, so it may be replaced at any time (a Kubernetes
Deployment); and a message for an instance it handed over (Redis emptied before the note was
read, refilled from the receiving journal) is processed again, never answered with a note
without its outputs. A worker killed before the ``XACK`` leaves its messages pending; another
worker reclaims them after ``queue.reclaim_idle_seconds`` (``XAUTOCLAIM``) and either processes
them (the claim was released by the supervisor) or acknowledges them (the journal says done,
with the outputs still there for the note). Derived UIDs are deterministic, so
even an instance processed twice on two machines replaces its results instead of duplicating them.

SIGTERM: the batch in hand finishes; messages held for series not yet ready are published again and
acknowledged, so another worker takes them at once.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from service.node.assembler import SeriesKey
from service.node.config import default_refresh_seconds
from service.node.processor import RETRY_LATER, STORE_RETRY_SECONDS, SeriesProcessor
from service.node.queue.stream import NoteToSend, QueueError, QueueMessage, WorkQueue
from service.node.store import Journal, StoreError

log = logging.getLogger(__name__)

#: Longest wait for new messages in one read, seconds (also how often reclaiming is considered).
READ_BLOCK_SECONDS = 0.5
#: Pause after Redis could not be reached, seconds.
REDIS_RETRY_SECONDS = 1.0


@dataclass
class _Held:
    """The messages of one series this consumer holds, and the series' first and last arrival."""

    first: float
    last: float
    messages: dict[str, QueueMessage] = field(default_factory=dict)

    def ready_in(self, now: float, idle_seconds: float, max_wait_seconds: float) -> float:
        return min(self.first + max_wait_seconds, self.last + idle_seconds) - now


class StreamConsumer:
    """One consumer of the group; :meth:`run` until the stop event is set."""

    def __init__(
        self,
        queue: WorkQueue,
        journal: Journal,
        processor: SeriesProcessor,
        *,
        consumer: str,
        node: str,
        idle_seconds: float,
        max_wait_seconds: float,
        reclaim_idle_seconds: float,
        refresh_seconds: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``refresh_seconds``: how often :meth:`run` tells Redis this consumer still holds its
        messages (default a quarter of ``reclaim_idle_seconds``; see ``queue.refresh_seconds``)."""
        self._queue = queue
        self._journal = journal
        self._processor = processor
        # Its journal claims name this consumer (``thread_claimant(worker, n)``): a retry gives back
        # this thread's claims only, and the supervisor releases every thread's when the worker dies.
        self.consumer = consumer
        self._node = node
        self._idle = idle_seconds
        self._max_wait = max_wait_seconds
        self._reclaim_idle = reclaim_idle_seconds
        self._refresh_seconds = (
            default_refresh_seconds(reclaim_idle_seconds) if refresh_seconds is None else refresh_seconds
        )
        self._clock = clock
        self._held: dict[SeriesKey, _Held] = {}
        # What the refresher thread refreshes: (message IDs, series), replaced whole by this
        # consumer's thread when it takes messages (a stale entry is harmless: see WorkQueue.refresh).
        self._holding: tuple[tuple[str, ...], tuple[tuple[str, str], ...]] = ((), ())
        self._next_reclaim = 0.0
        # Read the messages pending with this consumer at start and after an error (some may be
        # pending and not held); otherwise only when another consumer marked that it handed some.
        self._look_own = True

    @property
    def held(self) -> int:
        """Messages this consumer holds and has not acknowledged."""
        return sum(len(held.messages) for held in self._held.values())

    def run(self, stop: threading.Event) -> None:
        done = threading.Event()
        refresher = self.keep_alive(done)
        try:
            self._loop(stop)
        finally:
            done.set()
            refresher.join()
        self.hand_back()

    def keep_alive(self, stop: threading.Event) -> threading.Thread:
        """Start the thread that refreshes, every ``refresh_seconds`` until ``stop``, the messages
        this consumer holds and the series it owns (:meth:`WorkQueue.refresh`): a series that
        waits for ``max_wait_seconds``, or whose batch runs longer than ``reclaim_idle_seconds``,
        is never reclaimed by another worker and processed twice. A thread of its own, so a long
        batch (or a journal busy for a while) does not hold the refresh back."""
        thread = threading.Thread(target=self._refresh_loop, args=(stop,), name=f"{self.consumer}-refresh", daemon=True)
        thread.start()
        return thread

    def _refresh_loop(self, stop: threading.Event) -> None:
        while not stop.wait(self._refresh_seconds):
            message_ids, series = self._holding
            try:
                self._queue.refresh(self.consumer, message_ids, series, ttl_seconds=self._max_wait + self._reclaim_idle)
            except QueueError as exc:  # Redis away: the messages may be reclaimed; the journal claims still hold
                log.warning("%s: held messages not refreshed: %s", self.consumer, exc)

    def _note_holding(self) -> None:
        self._holding = (
            tuple(message_id for held in self._held.values() for message_id in held.messages),
            tuple((key.study_instance_uid, key.series_instance_uid) for key in self._held),
        )

    def _loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.step()
            except QueueError as exc:  # Redis away or emptied: the receiving node refills it; look again
                log.error("%s: %s", self.consumer, exc)
                self._look_own = True
                stop.wait(REDIS_RETRY_SECONDS)
            except RETRY_LATER as exc:  # a full disk, Triton away: what is claimed goes back; the messages stay held
                log.error("%s: a series not processed (%s); retried later", self.consumer, exc)
                self._look_own = True  # messages read but not yet held are this consumer's to take again
                try:
                    self._journal.series.release(self.consumer)
                except StoreError:
                    pass
                stop.wait(STORE_RETRY_SECONDS)
            except Exception as exc:  # noqa: BLE001 - the loop must outlive one bad batch, as the claim loop does
                # Where it broke, not what it said: an exception's text may quote a dataset.
                frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
                where = f"{Path(frame.filename).name}:{frame.lineno}" if frame else "?"
                log.error("%s: %s at %s in the stream loop; going on", self.consumer, type(exc).__name__, where)
                self._look_own = True
                stop.wait(STORE_RETRY_SECONDS)

    def step(self) -> int:
        """Reclaim stale messages now and then, read new ones, process the series that are ready;
        returns how many series were processed."""
        if time.monotonic() >= self._next_reclaim:
            self._take(self._queue.reclaim(self.consumer, min_idle_seconds=self._reclaim_idle), reclaimed=True)
            self._next_reclaim = time.monotonic() + min(self._reclaim_idle / 2, 5.0)
        if self._look_own:
            self._take(self._queue.read_own_pending(self.consumer))
            self._look_own = False
        now = self._clock()
        waits = [held.ready_in(now, self._idle, self._max_wait) for held in self._held.values()]
        block = min([READ_BLOCK_SECONDS, *waits])
        if block > 0.001:
            messages, handed = self._queue.poll(self.consumer, block_seconds=block)
            self._take(messages)
            if handed:  # instances of series this consumer assembles, from other consumers
                self._take(self._queue.read_own_pending(self.consumer))
        now = self._clock()
        ready = [key for key, held in self._held.items() if held.ready_in(now, self._idle, self._max_wait) <= 0]
        if ready and self._queue.was_handed(self.consumer):  # what was handed over until now belongs in these batches
            self._take(self._queue.read_own_pending(self.consumer))
            ready = [key for key, held in self._held.items() if held.ready_in(now, self._idle, self._max_wait) <= 0]
        for key in ready:
            self._process(key)
        return len(ready)

    def _take(self, messages: list[QueueMessage], *, reclaimed: bool = False) -> None:
        """Make each message's instance known to the journal and hold it; acknowledge redeliveries
        of instances already processed; hand the instances of a series another live consumer
        assembles to that consumer (with ``reclaimed``: take the series over, its owner died)."""
        finished = []
        owners: dict[SeriesKey, str] = {}
        handed: dict[str, list[str]] = {}
        for message in messages:
            instance = message.instance
            known = self._held.get(SeriesKey(instance.study_instance_uid, instance.series_instance_uid))
            if known is not None and message.message_id in known.messages:
                continue  # held already (a look at this consumer's own pending messages)
            state = self._journal.instance_state(instance.sop_instance_uid)
            # Another node's instance: its outputs go back in a done note, never to this box's sender.
            for_node = None if message.node == self._node else message.node
            if state is None:
                self._journal.record_received(instance, for_node=for_node)  # a worker box of its own journal
            elif state[0] != "received":
                (row,) = self._journal.get_instances([instance.sop_instance_uid])
                if row.received_at >= instance.received_at:
                    finished.append(message)  # processed already: a redelivery
                    continue
                self._journal.record_received(instance, for_node=for_node)  # a newer copy than the one processed here
            key = SeriesKey(instance.study_instance_uid, instance.series_instance_uid)
            if key not in owners:
                owners[key] = (
                    self.consumer
                    if key in self._held
                    else self._queue.own_series(
                        self.consumer,
                        key.study_instance_uid,
                        key.series_instance_uid,
                        ttl_seconds=self._max_wait + self._reclaim_idle,
                        force=reclaimed,
                    )
                )
            if owners[key] != self.consumer:
                handed.setdefault(owners[key], []).append(message.message_id)
                continue
            held = self._held.get(key)
            if held is None:
                held = self._held[key] = _Held(instance.received_at, instance.received_at)
            held.first = min(held.first, instance.received_at)
            held.last = max(held.last, instance.received_at)
            held.messages[message.message_id] = message
        self._note_holding()
        for owner, message_ids in handed.items():
            self._queue.transfer(message_ids, owner)
        self._finish(finished)

    def _process(self, key: SeriesKey) -> None:
        held = self._held[key]
        uids = self._journal.series.claim_series(self.consumer, key.study_instance_uid, key.series_instance_uid)
        if uids:
            try:
                self._processor.process_batch(key, self._journal.get_instances(uids))
            except RETRY_LATER:
                self._journal.series.release(self.consumer)
                raise
        finished = []
        for message in list(held.messages.values()):
            state = self._journal.instance_state(message.instance.sop_instance_uid)
            if state is None or state[0] != "received":  # None: handed over already (see _finish)
                finished.append(message)
                del held.messages[message.message_id]
        self._finish(finished)
        if held.messages:  # claimed by another worker, or re-sent meanwhile: look again after idle_seconds
            # The wait starts again, max_wait included: else, past it, the series is ready at once
            # on every step and the loop spins on its claim.
            held.first = held.last = self._clock()
        else:
            del self._held[key]
            self._queue.release_series(self.consumer, key.study_instance_uid, key.series_instance_uid)
        self._note_holding()

    def _finish(self, messages: list[QueueMessage]) -> None:
        """Done notes to receiving nodes of other journals (with the outputs for their senders)
        and ``XACK``, in one round trip; then this journal forgets those instances (:meth:`Journal.hand_over`: a later
        message for one of them is processed again, never answered with an empty note). An
        instance another consumer of this journal handed over already (no row) had its note
        then: its message is only acknowledged."""
        notes, handed_over = [], []
        for message in messages:
            if message.node != self._node:
                uid = message.instance.sop_instance_uid
                state = self._journal.instance_state(uid)
                if state is None:
                    continue
                outputs = self._journal.outbox.of_source(uid)
                notes.append(NoteToSend(message.node, message.instance, state[0], state[1], outputs))
                handed_over.append(uid)
        # One MULTI/EXEC round trip for the batch: the notes, then the acknowledgement.
        self._queue.ack([message.message_id for message in messages], notes)
        self._journal.hand_over(handed_over)

    def hand_back(self) -> None:
        """Stopping: publish the held messages again and acknowledge them, so another worker takes
        them now rather than after ``reclaim_idle_seconds``; then leave the group."""
        try:
            for key, held in self._held.items():
                for message in held.messages.values():
                    self._queue.publish(message.node, message.instance)
                self._queue.ack(list(held.messages))
                self._queue.release_series(self.consumer, key.study_instance_uid, key.series_instance_uid)
            self._held.clear()
            self._note_holding()
            self._queue.forget_consumer(self.consumer)
        except QueueError as exc:  # they stay pending and are reclaimed after reclaim_idle_seconds
            log.warning("%s: held messages not handed back (%s); reclaimed later", self.consumer, exc)
