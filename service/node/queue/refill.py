"""The receiving node's side of the queue: a thread of the supervisor that keeps Redis in step
with the journal.

- **Refill.** At start, and whenever the consumer group is found missing (a Redis that restarted
  empty: no AOF, or a lost volume) or a publish failed (``run/queue-backlog``, written by a
  receiver), every instance the journal says is not yet processed (state ``received``) is
  published again. The journal is the truth; Redis only distributes the work, so nothing is
  lost. A message published twice is harmless: a worker processes an instance only while the
  journal says ``received`` and it holds the instance's claim, and derived UIDs are deterministic.
- **Done notes.** A worker on another machine (its own journal) tells this node what became of
  each instance (``<stream>:done:<node>``); the notes are written into this journal
  (``received_before``: a copy re-sent meanwhile stays ``received``), then deleted from Redis.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from service.node.queue.stream import QueueError, WorkQueue
from service.node.store import Journal, StoreError

log = logging.getLogger(__name__)

#: Instances per pipelined XADD round trip.
PUBLISH_BATCH = 256
#: Name of the file a receiver creates when a publish failed (in the data folder's run/).
BACKLOG_MARKER = "queue-backlog"


def backlog_marker(data_dir: Path) -> Path:
    """``<data_dir>/run/queue-backlog``: an instance is journaled and not in the stream."""
    return Path(data_dir) / "run" / BACKLOG_MARKER


def refill(journal: Journal, queue: WorkQueue, node: str) -> int:
    """Publish every instance the journal has not yet processed; returns how many."""
    pending = journal.pending_instances()
    for start in range(0, len(pending), PUBLISH_BATCH):
        queue.publish_many(node, pending[start : start + PUBLISH_BATCH])
    return len(pending)


def apply_done_notes(journal: Journal, queue: WorkQueue, node: str) -> int:
    """Write the done notes for ``node`` into its journal (outcome and outbox rows in one
    transaction, so this node's sender delivers them), then drop them; returns how many were applied.

    A note is applied only while the journal holds the instance ``received`` and no later copy:
    a note applied twice, or one for a copy re-sent meanwhile, changes nothing (the newer copy's
    own message brings its own note).
    """
    applied = 0
    while notes := queue.done_notes(node):
        for note in notes:
            uid = note.sop_instance_uid
            try:
                state = journal.instance_state(uid)
                if state is None:  # not this journal's (a misconfigured node name): nothing to update
                    log.warning("done note for instance %s, which this journal does not hold", uid)
                    continue
                (row,) = journal.get_instances([uid])
                if state[0] != "received" or row.received_at > note.received_at:
                    continue
                if note.outcome == "done" or note.outputs:
                    outcome = "done" if note.outcome == "done" else "failed"
                    # received_before: a copy re-sent since the check above stays received, and the
                    # old copy's outputs are not queued (the new copy's own message brings its note).
                    recorded = journal.complete(
                        uid,
                        note.outputs,
                        outcome,  # type: ignore[arg-type]
                        note.reason,
                        received_before=note.received_at,
                    )
                else:
                    outcome = note.outcome if note.outcome in ("skipped", "failed") else "failed"
                    journal.mark_processed([uid], outcome, note.reason, received_before=note.received_at)  # type: ignore[arg-type]
                    recorded = True
                applied += recorded
            except LookupError:  # the row went away meanwhile
                continue
        queue.drop_done_notes(node, [note.note_id for note in notes])
    return applied


class Refiller:
    """Checks every ``check_seconds``: group present (else create it and refill), publish backlog,
    done notes. :meth:`check` once before the children start; then :meth:`start`."""

    def __init__(
        self,
        journal: Journal,
        queue: WorkQueue,
        node: str,
        data_dir: Path,
        *,
        check_seconds: float,
        outputs_queued: Callable[[], None] = lambda: None,
    ) -> None:
        """``outputs_queued``: called when done notes put outputs in the outbox (the outbox bell)."""
        self._outputs_queued = outputs_queued
        self._journal = journal
        self._queue = queue
        self._node = node
        self._marker = backlog_marker(data_dir)
        self._check_seconds = check_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refill_next = True  # at start: whatever the journal holds may be missing from Redis

    def check(self) -> None:
        """One look; Redis or journal errors are logged, and the next look tries again."""
        try:
            created = self._queue.ensure_group()
            backlog = self._marker.exists()
            if created or backlog or self._refill_next:
                self._marker.unlink(missing_ok=True)  # before the refill: a failure during it marks again
                count = refill(self._journal, self._queue, self._node)
                why = (
                    "a new or emptied Redis"
                    if created
                    else ("a failed publish" if backlog else "start or a receiver's end")
                )
                if count:
                    log.warning("queue refilled from the journal (%s): %d instance(s) published again", why, count)
                self._refill_next = False
            if apply_done_notes(self._journal, self._queue, self._node):
                self._outputs_queued()  # the sender sends them now, not at its next look
        except (QueueError, StoreError) as exc:
            log.error("queue check failed, trying again in %.1f s: %s", self._check_seconds, exc)

    def request_refill(self) -> None:
        """Publish the journal's waiting instances again at the next look (a receiver died: what it
        had journaled and not yet published would otherwise wait for the next restart)."""
        self._refill_next = True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="queue-refill", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._check_seconds):
            self.check()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._queue.close()
