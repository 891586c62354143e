"""Series assembly in the journal, for a node of several processes: which associations are open,
which series are ready, and which worker has claimed which instances.

With one process the in-memory :class:`~service.node.assembler.Assembler` decides when a series
is ready. With several receiver processes a series may arrive over associations served by
different processes, and several worker processes take ready series: the decision must be made
where they all look, in the journal. Two tables (created when missing, so a journal written
before them opens unchanged):

- ``associations``: one row per accepted association (``owner`` = the receiver process serving
  it), ``ended_at`` set when it is released or aborted, or when its owner died;
- ``claims``: one row per instance a worker has taken (``worker`` = the worker process's pipeline
  thread that took it, :func:`thread_claimant`); the
  instance stays ``received`` in ``instances`` until the worker marks it processed, which deletes
  the claim. The claims of a worker that died are released (deleted), so its instances are taken
  again; derived UIDs are deterministic, so a half-done instance done twice sends replacements,
  not duplicates.

Readiness is the assembler's rule (see :mod:`service.node.assembler`) over the unclaimed
``received`` instances of a series, on Unix time (``received_at``), which every process shares:
ready when ``max_wait_seconds`` have passed since its first instance, or when none of the
associations that delivered its instances is open (or each has moved on to another series) and
``idle_seconds`` have passed since its last.
An instance whose association has no row (journaled by a single-process node, or restored after a
restart) counts as delivered on an ended association.

:meth:`SeriesClaims.claim_ready` takes one ready series in one ``BEGIN IMMEDIATE`` transaction:
SQLite lets one writer in at a time, across processes, so two workers never claim the same
instance.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from service.node.store.connection import JournalConnection

__all__ = ["SERIES_SCHEMA", "ReadySeries", "SeriesClaims", "thread_claimant"]

#: Created on every open when missing (additive: the journal's schema version is unchanged).
SERIES_SCHEMA = """
CREATE TABLE IF NOT EXISTS associations (
    association_id TEXT PRIMARY KEY,
    owner          TEXT NOT NULL,
    opened_at      REAL NOT NULL,
    ended_at       REAL
);
CREATE INDEX IF NOT EXISTS associations_by_owner ON associations (owner, ended_at);
CREATE TABLE IF NOT EXISTS claims (
    sop_instance_uid TEXT PRIMARY KEY,
    worker           TEXT NOT NULL,
    claimed_at       REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS claims_by_worker ON claims (worker);
CREATE INDEX IF NOT EXISTS instances_waiting_by_series ON instances (state, study_instance_uid, series_instance_uid);
CREATE INDEX IF NOT EXISTS instances_by_association ON instances (association_id, received_at);
"""

# The unclaimed received instances of each series: first and last arrival, and whether any of
# the associations that delivered them is still open and still on this series (the latest
# instance it delivered is of this series: it has not moved on). One indexed look per instance.
_WAITING_SERIES = """
SELECT i.study_instance_uid, i.series_instance_uid, MIN(i.received_at), MAX(i.received_at),
       MAX(CASE WHEN a.association_id IS NOT NULL AND a.ended_at IS NULL AND (
               SELECT latest.series_instance_uid = i.series_instance_uid
                      AND latest.study_instance_uid = i.study_instance_uid
               FROM instances AS latest WHERE latest.association_id = i.association_id
               ORDER BY latest.received_at DESC LIMIT 1)
           THEN 1 ELSE 0 END)
FROM instances AS i
LEFT JOIN associations AS a ON a.association_id = i.association_id
WHERE i.state = 'received' AND NOT EXISTS (SELECT 1 FROM claims AS c WHERE c.sop_instance_uid = i.sop_instance_uid)
GROUP BY i.study_instance_uid, i.series_instance_uid
"""


@dataclass(frozen=True)
class ReadySeries:
    """A series batch a worker has claimed: its UIDs and the SOP Instance UIDs, in arrival order."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uids: tuple[str, ...]


@dataclass(frozen=True)
class _Waiting:
    study: str
    series: str
    first: float
    last: float
    open: bool

    def ready_in(self, now: float, idle_seconds: float, max_wait_seconds: float) -> float:
        """Seconds until ready if nothing else happens (<= 0: ready now)."""
        by_max_wait = self.first + max_wait_seconds - now
        if self.open:
            return by_max_wait
        return min(by_max_wait, self.last + idle_seconds - now)


class SeriesClaims:
    """The associations and claims tables of a journal (reach it as ``journal.series``); every
    method is one transaction."""

    def __init__(self, connection: JournalConnection, clock: Callable[[], float]) -> None:
        self._connection = connection
        self._clock = clock

    # -------------------------------------------------------------------------------- associations

    def association_opened(self, association_id: str, owner: str) -> None:
        """Association ``association_id``, served by process ``owner``, was accepted."""
        with self._connection.transaction() as db:
            db.execute(
                "INSERT INTO associations (association_id, owner, opened_at) VALUES (?, ?, ?) "
                "ON CONFLICT (association_id) DO UPDATE SET owner = excluded.owner, ended_at = NULL",
                (association_id, owner, self._clock()),
            )

    def association_ended(self, association_id: str) -> None:
        """Association ``association_id`` was released or aborted: it holds no series back any more."""
        with self._connection.transaction() as db:
            db.execute(
                "UPDATE associations SET ended_at = ? WHERE association_id = ? AND ended_at IS NULL",
                (self._clock(), association_id),
            )

    def end_associations_of(self, owner: str) -> int:
        """Every association still open of process ``owner`` ends (it died); returns how many."""
        with self._connection.transaction() as db:
            return db.execute(
                "UPDATE associations SET ended_at = ? WHERE owner = ? AND ended_at IS NULL", (self._clock(), owner)
            ).rowcount

    def end_all_associations(self) -> int:
        """At start-up, before any receiver runs: no association of an earlier run is open."""
        with self._connection.transaction() as db:
            return db.execute("UPDATE associations SET ended_at = ? WHERE ended_at IS NULL", (self._clock(),)).rowcount

    def forget_ended_associations(self, older_than: float) -> int:
        """Delete association rows that ended before Unix time ``older_than`` and no waiting instance names."""
        with self._connection.transaction() as db:
            return db.execute(
                "DELETE FROM associations WHERE ended_at IS NOT NULL AND ended_at < ? AND NOT EXISTS "
                "(SELECT 1 FROM instances AS i WHERE i.association_id = associations.association_id "
                "AND i.state = 'received')",
                (older_than,),
            ).rowcount

    # -------------------------------------------------------------------------------------- claims

    def next_ready_in(self, *, idle_seconds: float, max_wait_seconds: float) -> float | None:
        """Seconds until the first unclaimed series can be ready (<= 0: one is ready now); ``None``
        when nothing waits. A read: it never blocks a writer."""
        now = self._clock()
        with self._connection.transaction(write=False) as db:
            waiting = _waiting(db)
        if not waiting:
            return None
        return min(series.ready_in(now, idle_seconds, max_wait_seconds) for series in waiting)

    def claim_ready(self, worker: str, *, idle_seconds: float, max_wait_seconds: float) -> ReadySeries | None:
        """Claim the oldest ready series for ``worker`` (all its unclaimed received instances), or ``None``.

        A read first (it never waits for a writer); the write transaction only when a series is ready.
        """
        wait = self.next_ready_in(idle_seconds=idle_seconds, max_wait_seconds=max_wait_seconds)
        if wait is None or wait > 0:
            return None
        now = self._clock()
        with self._connection.transaction() as db:
            ready = [s for s in _waiting(db) if s.ready_in(now, idle_seconds, max_wait_seconds) <= 0]
            if not ready:
                return None
            chosen = min(ready, key=lambda s: s.first)
            uids = _claim_unclaimed(db, worker, chosen.study, chosen.series, now)
        return ReadySeries(chosen.study, chosen.series, uids)

    def claim_series(self, worker: str, study_instance_uid: str, series_instance_uid: str) -> tuple[str, ...]:
        """Claim for ``worker`` every unclaimed ``received`` instance of one series, whatever its
        readiness (a worker of the Redis queue decided it is ready); their UIDs in arrival order."""
        with self._connection.transaction() as db:
            return _claim_unclaimed(db, worker, study_instance_uid, series_instance_uid, self._clock())

    def claimed_by(self, worker: str) -> list[str]:
        """SOP Instance UIDs ``worker`` has claimed and not yet marked processed."""
        with self._connection.transaction(write=False) as db:
            return [
                row[0]
                for row in db.execute("SELECT sop_instance_uid FROM claims WHERE worker = ? ORDER BY rowid", (worker,))
            ]

    def release(self, worker: str) -> int:
        """Give back what ``worker`` claimed: its instances can be claimed again; returns how many.

        A worker process (it died) gives back its pipeline threads' claims with its own
        (:func:`thread_claimant`); one thread (a full disk, Triton away) gives back only its own.
        """
        prefix = thread_claimant(worker, "")
        with self._connection.transaction() as db:
            return db.execute(
                "DELETE FROM claims WHERE worker = ? OR substr(worker, 1, ?) = ?", (worker, len(prefix), prefix)
            ).rowcount

    def release_all(self) -> int:
        """At start-up, before any worker runs: no claim of an earlier run holds."""
        with self._connection.transaction() as db:
            return db.execute("DELETE FROM claims").rowcount


def thread_claimant(worker: str, thread: int | str) -> str:
    """The name pipeline thread ``thread`` of worker process ``worker`` claims under (``<worker>-<thread>``,
    also its Redis consumer): a thread that gives its claims back leaves its siblings' alone, and
    :meth:`SeriesClaims.release` of the process releases them all."""
    return f"{worker}-{thread}"


def drop_claims(db: sqlite3.Connection, sop_instance_uids: Sequence[str]) -> None:
    """Inside a journal transaction: the instances were marked processed, their claims end."""
    db.executemany("DELETE FROM claims WHERE sop_instance_uid = ?", [(uid,) for uid in sop_instance_uids])


def _claim_unclaimed(db: sqlite3.Connection, worker: str, study: str, series: str, now: float) -> tuple[str, ...]:
    """Inside a write transaction: claim the unclaimed received instances of a series; their UIDs."""
    uids = [
        row[0]
        for row in db.execute(
            "SELECT i.sop_instance_uid FROM instances AS i WHERE i.state = 'received' "
            "AND i.study_instance_uid = ? AND i.series_instance_uid = ? AND NOT EXISTS "
            "(SELECT 1 FROM claims AS c WHERE c.sop_instance_uid = i.sop_instance_uid) "
            "ORDER BY i.received_at, i.rowid",
            (study, series),
        )
    ]
    db.executemany(
        "INSERT INTO claims (sop_instance_uid, worker, claimed_at) VALUES (?, ?, ?)",
        [(uid, worker, now) for uid in uids],
    )
    return tuple(uids)


def _waiting(db: sqlite3.Connection) -> list[_Waiting]:
    return [_Waiting(row[0], row[1], row[2], row[3], bool(row[4])) for row in db.execute(_WAITING_SERIES)]
