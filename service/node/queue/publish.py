"""A receiver's hook into the queue: after an instance's journal commit, ``XADD`` it to the stream.

:class:`PublishingAssembly` stands where the receiver's
:class:`~service.node.assembler.JournalAssembly` stands (the receiver calls ``instance_arrived``
only after the spool file is fsynced and the journal row committed) and hands the instance to a
publisher thread, which sends what has gathered in one pipelined round trip: with
``appendfsync always`` Redis fsyncs once per round trip, so the C-STORE answer never waits for
Redis's disk and a burst costs one fsync, not one per image.

Nothing is lost on the way: the journal holds the instance before it is handed over. A publish
that fails (Redis away) is logged and ``run/queue-backlog`` tells the supervisor's
:class:`~service.node.queue.refill.Refiller` to publish the journal's waiting instances again; a
receiver that dies with instances not yet published makes the supervisor do the same. A message
published twice is harmless (see :mod:`service.node.queue.consumer`).
"""

from __future__ import annotations

import logging
import queue as queues
import threading
from pathlib import Path

from service.node.assembler import JournalAssembly, SeriesKey
from service.node.queue.refill import PUBLISH_BATCH, backlog_marker
from service.node.queue.stream import QueueError, WorkQueue
from service.node.store import Journal, StoreError

log = logging.getLogger(__name__)

_STOP = object()


class PublishingAssembly(JournalAssembly):
    """The journal's assembly bookkeeping, then one message per journaled instance (from a
    publisher thread). :meth:`close` publishes what is left, then stops the thread."""

    def __init__(self, journal: Journal, owner: str, queue: WorkQueue, node: str, data_dir: Path) -> None:
        super().__init__(journal, owner)
        self._queue = queue
        self._node = node
        self._marker = backlog_marker(data_dir)
        self._waiting: queues.SimpleQueue = queues.SimpleQueue()
        self._thread = threading.Thread(target=self._publish_loop, name=f"{owner}-publish", daemon=True)
        self._thread.start()

    def instance_arrived(self, key: SeriesKey, sop_instance_uid: str, association_id: str) -> None:
        super().instance_arrived(key, sop_instance_uid, association_id)
        self._waiting.put(sop_instance_uid)

    def close(self) -> None:
        """Publish everything handed over so far, then stop the publisher thread."""
        self._waiting.put(_STOP)
        self._thread.join()

    def _publish_loop(self) -> None:
        stopping = False
        while not stopping:
            uids = [self._waiting.get()]
            while len(uids) < PUBLISH_BATCH:
                try:
                    uids.append(self._waiting.get_nowait())
                except queues.Empty:
                    break
            if _STOP in uids:
                stopping = True
                uids = [uid for uid in uids if uid is not _STOP]
            if uids:
                self._publish(uids)

    def _publish(self, uids: list[str]) -> None:
        try:
            rows = self._journal.get_instances(list(dict.fromkeys(uids)))  # the committed rows, as journaled
            self._queue.publish_many(self._node, rows)
        except (QueueError, StoreError, LookupError) as exc:
            log.error("%d journaled instance(s) not published (the node publishes them again): %s", len(uids), exc)
            try:
                self._marker.parent.mkdir(parents=True, exist_ok=True)
                self._marker.touch()
            except OSError as marker_error:  # the next start refills from the journal in any case
                log.error("could not mark the publish backlog: %s", marker_error)
