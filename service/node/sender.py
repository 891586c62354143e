"""Delivering the outbox: C-STORE to each destination, retries with backoff, then the dead letter.

Each pass takes the outbox rows that are due, sends them per destination over one association,
and records each object's verdict:

- delivered -> ``sent``;
- retry (destination down, association aborted, out of resources) -> ``pending`` again after an
  exponential delay with full jitter, until ``max_attempts``, then ``dead`` with the last reason;
- reject (the destination refuses the SOP class or the object) -> ``dead`` at once: resending
  would only loop.

A journal that cannot be written (a full disk) stops the pass; :meth:`OutboxSender.send_pass`
logs it and waits, so the sending loop (a thread, or the sender process) lives on and resumes by
itself when space returns. An object the destination accepted but whose ``sent`` could not be
recorded is sent again then, with the same SOP Instance UID.
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable, Mapping

from dicom_io.net.scu import Destination, StoreSCU
from service.node.config import SendConfig
from service.node.metrics import NodeMetrics
from service.node.store import Journal, OutboxEntry, StoreError, backoff_delay

log = logging.getLogger(__name__)

#: Seconds the sender waits after the journal could not be written (a full disk) before its next pass.
STORE_RETRY_SECONDS = 1.0


class OutboxSender:
    """Sends what the journal says is due; dependencies passed in, no state between passes."""

    def __init__(
        self,
        journal: Journal,
        scu: StoreSCU,
        destinations: Mapping[str, Destination],
        policy: SendConfig,
        metrics: NodeMetrics,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._journal = journal
        self._scu = scu
        self._destinations = dict(destinations)
        self._policy = policy
        self._metrics = metrics
        self._clock = clock
        self._rng = rng or random.Random()

    def send_pass(self, wait: Callable[[float], object]) -> dict[str, int]:
        """:meth:`send_due`; when the journal cannot be written (a full disk) log it, ``wait``
        STORE_RETRY_SECONDS (e.g. a stop event's ``wait``) and return no counts."""
        try:
            return self.send_due()
        except StoreError as exc:
            log.error("outbox pass stopped, the journal cannot be written (%s); next pass in %.0f s", exc,
                      STORE_RETRY_SECONDS)  # fmt: skip
            wait(STORE_RETRY_SECONDS)
            return {}

    def send_due(self, limit: int = 100) -> dict[str, int]:
        """One pass over the due outbox rows; returns counts of sent / retry / dead."""
        tally = {"sent": 0, "retry": 0, "dead": 0}
        by_destination: dict[str, list[OutboxEntry]] = defaultdict(list)
        for entry in self._journal.outbox.due(self._clock(), limit=limit):
            by_destination[entry.destination].append(entry)
        for name, entries in by_destination.items():
            destination = self._destinations.get(name)
            if destination is None:
                for entry in entries:
                    self._journal.outbox.mark_dead(
                        entry.sop_instance_uid, name, error=f"destination {name!r} is not configured"
                    )
                    self._metrics.outputs.labels(name, "dead").inc()
                    tally["dead"] += 1
                continue
            self._send_to(name, destination, entries, tally)
        return tally

    def _send_to(self, name: str, destination: Destination, entries: list[OutboxEntry], tally: dict[str, int]) -> None:
        with self._metrics.stage_seconds.labels("send").time():
            outcomes = self._scu.send(destination, [e.path for e in entries])  # one outcome per path, in order
        for entry, outcome in zip(entries, outcomes, strict=True):
            verdict, detail = outcome.verdict, outcome.detail
            if verdict == "delivered":
                self._journal.outbox.mark_sent(entry.sop_instance_uid, name)
                self._metrics.outputs.labels(name, "sent").inc()
                tally["sent"] += 1
            elif verdict == "reject" or entry.attempts + 1 >= self._policy.max_attempts:
                reason = detail if verdict == "reject" else f"gave up after {entry.attempts + 1} attempts: {detail}"
                self._journal.outbox.mark_dead(entry.sop_instance_uid, name, error=reason)
                log.warning("output %s to %s dead-lettered: %s", entry.sop_instance_uid, name, reason)
                self._metrics.outputs.labels(name, "dead").inc()
                tally["dead"] += 1
            else:
                delay = backoff_delay(
                    entry.attempts + 1,
                    base=self._policy.base_delay_seconds,
                    maximum=self._policy.max_delay_seconds,
                    rng=self._rng,
                )
                self._journal.outbox.mark_retry(
                    entry.sop_instance_uid, name, error=detail, next_attempt_at=self._clock() + delay
                )
                log.info("output %s to %s: retry in %.1f s (%s)", entry.sop_instance_uid, name, delay, detail)
                self._metrics.outputs.labels(name, "retry").inc()
                tally["retry"] += 1
