"""Series completion: group arriving instances by study and series and say when a series is ready.

A *batch* is the instances of one series that arrived since the series was last taken. It is
ready when

* every association that delivered to it has ended (released or aborted) or has moved on to
  another series, and nothing new arrived for ``idle_seconds``, or
* ``max_wait_seconds`` have passed since its first arrival, even with an association still open
  (a sender that never releases cannot hold a series back for ever).

:meth:`Assembler.take_ready` hands ready batches out once and forgets them (:meth:`Assembler.wait_ready`
does the same after sleeping until one can be ready); instances of the same series that arrive
later start a new batch, processed as a follow-up. The assembler is in memory
only: the journal is the durable record, and after a restart the journaled-but-unprocessed
instances are put back with :meth:`Assembler.restore`.

An association that sends again after :meth:`Assembler.association_ended` was called for it (not
expected from a DICOM SCP) counts as open again; ``max_wait_seconds`` still bounds that batch.

"Moved on": senders send a series' instances one after the other, so once an association delivers
an instance of another series, it holds the series it sent before no longer. A PACS forwarding
a hundred radiographs over one association gets each explained while the rest still arrive,
instead of after the last. A sender that interleaves two series sends them within
``idle_seconds`` of each other, so neither is ready before the interleaving stops (a series
interleaved more slowly than that is processed in batches, as a series split over time is).

A node of several processes assembles in the journal instead (the same rule, see
:mod:`service.node.store.series`): its receivers use :class:`JournalAssembly`, which records
associations opening and ending where every worker process looks.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from service.node.store import Journal

__all__ = ["Assembler", "JournalAssembly", "SeriesKey"]


@dataclass(frozen=True)
class SeriesKey:
    """One series of one study."""

    study_instance_uid: str
    series_instance_uid: str


@dataclass
class _Batch:
    """Instances of one series waiting to be taken, with the times that decide readiness."""

    first_arrival: float
    last_arrival: float
    # dict as an ordered set: arrival order kept, a repeated SOP UID counted once.
    sop_instance_uids: dict[str, None] = field(default_factory=dict)
    open_associations: set[str] = field(default_factory=set)

    def add(self, sop_instance_uid: str, at: float) -> None:
        self.sop_instance_uids[sop_instance_uid] = None
        self.first_arrival = min(self.first_arrival, at)
        self.last_arrival = max(self.last_arrival, at)


class Assembler:
    """Groups arriving instances into series and says when a series is ready.

    Thread-safe (one lock around every method). Time comes from an injected clock (a callable
    returning seconds, monotonic by default) so tests need no sleeps.
    """

    def __init__(
        self, *, idle_seconds: float, max_wait_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not (isinstance(idle_seconds, int | float) and math.isfinite(idle_seconds) and idle_seconds > 0):
            raise ValueError(f"idle_seconds must be a finite number > 0, got {idle_seconds!r}")
        if not (isinstance(max_wait_seconds, int | float) and math.isfinite(max_wait_seconds)):
            raise ValueError(f"max_wait_seconds must be a finite number, got {max_wait_seconds!r}")
        if max_wait_seconds < idle_seconds:
            raise ValueError(f"max_wait_seconds ({max_wait_seconds!r}) must be >= idle_seconds ({idle_seconds!r})")
        if not callable(clock):
            raise ValueError(f"clock must be a callable returning seconds, got {clock!r}")
        self.idle_seconds = float(idle_seconds)
        self.max_wait_seconds = float(max_wait_seconds)
        self._clock = clock
        self._lock = threading.Lock()
        #: Notified on every change, so :meth:`wait_ready` wakes when a series may have become ready.
        self._changed = threading.Condition(self._lock)
        self._wakes = 0  # counts wake() calls
        self._batches: dict[SeriesKey, _Batch] = {}
        #: The series each open association delivered last.
        self._last_series: dict[str, SeriesKey] = {}

    def instance_arrived(self, key: SeriesKey, sop_instance_uid: str, association_id: str) -> None:
        """An instance of ``key`` was stored (spooled and journaled) on association ``association_id``."""
        with self._lock:
            now = self._clock()
            before = self._last_series.get(association_id)
            if before is not None and before != key and before in self._batches:  # it moved on
                self._batches[before].open_associations.discard(association_id)
            self._last_series[association_id] = key
            batch = self._batch(key, now)
            batch.add(sop_instance_uid, now)
            batch.open_associations.add(association_id)
            self._changed.notify_all()

    def association_opened(self, association_id: str) -> None:
        """Nothing to do: in memory, an association holds a series back from its first instance on."""

    def association_ended(self, association_id: str) -> None:
        """Association ``association_id`` was released or aborted: it no longer holds any series back."""
        with self._lock:
            self._last_series.pop(association_id, None)
            for batch in self._batches.values():
                batch.open_associations.discard(association_id)
            self._changed.notify_all()

    def take_ready(self) -> list[tuple[SeriesKey, list[str]]]:
        """The ready batches (oldest first) with their SOP Instance UIDs in arrival order; they are forgotten."""
        with self._lock:
            return self._take_ready(self._clock())

    def wait_ready(self, timeout: float) -> list[tuple[SeriesKey, list[str]]]:
        """:meth:`take_ready`, waiting up to ``timeout`` seconds (real time) for a batch to be ready.

        Sleeps until the earliest moment a batch can become ready (its idle or maximum wait ends)
        or until an arrival, an association's end or :meth:`wake` changes the picture; returns
        ``[]`` when the timeout passes first or after :meth:`wake`.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            woken = self._wakes
            while True:
                now = self._clock()
                ready = self._take_ready(now)
                remaining = deadline - time.monotonic()
                if ready or remaining <= 0 or self._wakes != woken:
                    return ready
                until_ready = min((self._ready_in(batch, now) for batch in self._batches.values()), default=remaining)
                self._changed.wait(min(remaining, max(until_ready, 0.0)))

    def wake(self) -> None:
        """Make every :meth:`wait_ready` return now (e.g. when the node stops)."""
        with self._lock:
            self._wakes += 1
            self._changed.notify_all()

    def restore(self, key: SeriesKey, sop_instance_uid: str, received_at_monotonic: float | None = None) -> None:
        """After a restart: a journaled-but-unprocessed instance rejoins its series with no open association.

        It counts as arriving at ``received_at_monotonic`` (a time on this assembler's clock), or
        now when ``None``, so the batch is ready ``idle_seconds`` later.
        """
        with self._lock:
            at = self._clock() if received_at_monotonic is None else received_at_monotonic
            self._batch(key, at).add(sop_instance_uid, at)
            self._changed.notify_all()

    def pending(self) -> int:
        """Number of instances waiting in batches not yet taken."""
        with self._lock:
            return sum(len(batch.sop_instance_uids) for batch in self._batches.values())

    def _batch(self, key: SeriesKey, at: float) -> _Batch:
        """The open batch of ``key``, created (first arrival ``at``) when there is none."""
        batch = self._batches.get(key)
        if batch is None:
            batch = self._batches[key] = _Batch(first_arrival=at, last_arrival=at)
        return batch

    def _take_ready(self, now: float) -> list[tuple[SeriesKey, list[str]]]:
        ready = [(key, batch) for key, batch in self._batches.items() if self._is_ready(batch, now)]
        ready.sort(key=lambda item: item[1].first_arrival)
        for key, _ in ready:
            del self._batches[key]
        return [(key, list(batch.sop_instance_uids)) for key, batch in ready]

    def _ready_in(self, batch: _Batch, now: float) -> float:
        """Seconds until ``batch`` is ready if nothing else happens (an open association waits for max_wait)."""
        by_max_wait = batch.first_arrival + self.max_wait_seconds - now
        if batch.open_associations:
            return by_max_wait
        return min(by_max_wait, batch.last_arrival + self.idle_seconds - now)

    def _is_ready(self, batch: _Batch, now: float) -> bool:
        if now - batch.first_arrival >= self.max_wait_seconds:
            return True
        return not batch.open_associations and now - batch.last_arrival >= self.idle_seconds


class JournalAssembly:
    """The receiver's side of assembly in the journal (several processes): each association is
    recorded when accepted, before any of its instances is acknowledged, and when it ends; the
    instance rows the receiver journals are the arrivals. Workers claim ready series with
    :meth:`service.node.store.SeriesClaims.claim_ready`."""

    def __init__(self, journal: Journal, owner: str) -> None:
        self._journal = journal
        self.owner = owner

    def association_opened(self, association_id: str) -> None:
        self._journal.series.association_opened(association_id, self.owner)

    def instance_arrived(self, key: SeriesKey, sop_instance_uid: str, association_id: str) -> None:
        """Nothing to do: the instance's journal row is its arrival."""

    def association_ended(self, association_id: str) -> None:
        self._journal.series.association_ended(association_id)
