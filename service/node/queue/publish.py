"""A receiver's hook into the queue: after an instance's journal commit, ``XADD`` it to the stream.

:class:`PublishingAssembly` stands where the receiver's
:class:`~service.node.assembler.JournalAssembly` stands (the receiver calls ``instance_arrived``
only after the spool file is fsynced and the journal row committed) and adds the publish. A
publish that fails (Redis away) does not change the C-STORE answer: the instance is safe in the
journal, the failure is logged and counted, and ``run/queue-backlog`` tells the supervisor's
:class:`~service.node.queue.refill.Refiller` to publish the journal's unprocessed instances again.
"""

from __future__ import annotations

import logging
from pathlib import Path

from service.node.assembler import JournalAssembly, SeriesKey
from service.node.queue.refill import backlog_marker
from service.node.queue.stream import QueueError, WorkQueue
from service.node.store import Journal, StoreError

log = logging.getLogger(__name__)


class PublishingAssembly(JournalAssembly):
    """The journal's assembly bookkeeping, then one message per journaled instance."""

    def __init__(self, journal: Journal, owner: str, queue: WorkQueue, node: str, data_dir: Path) -> None:
        super().__init__(journal, owner)
        self._queue = queue
        self._node = node
        self._marker = backlog_marker(data_dir)

    def instance_arrived(self, key: SeriesKey, sop_instance_uid: str, association_id: str) -> None:
        super().instance_arrived(key, sop_instance_uid, association_id)
        try:
            (instance,) = self._journal.get_instances([sop_instance_uid])  # the committed row, as journaled
            self._queue.publish(self._node, instance)
        except (QueueError, StoreError) as exc:
            log.error(
                "instance %s journaled but not published (the node publishes it again): %s", sop_instance_uid, exc
            )
            try:
                self._marker.parent.mkdir(parents=True, exist_ok=True)
                self._marker.touch()
            except OSError as marker_error:  # the next start refills from the journal in any case
                log.error("could not mark the publish backlog: %s", marker_error)
