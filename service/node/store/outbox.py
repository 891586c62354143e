"""The outbox rows of the journal: one per (output object, destination), and where its delivery stands.

An output is added ``pending`` and due at once; each send attempt ends it ``sent``, ``pending``
again with a later ``next_attempt_at`` (a retry), or ``dead`` (the dead letter: refused, or out of
retries). Adding the same output for the same destination again (a reprocessed instance) replaces
the row and resets it to ``pending``; there is never a second row.

**Order**: per destination, outputs leave in the order they were queued (``created_at``; a
re-added output keeps its place). A destination's pending outputs are due together, when its
oldest pending output (the head) is due: a retry holds back what was queued after it instead of
letting it overtake, across an outage of the destination, a full disk or a restart. (Within one
pass the sender sends them in this order over one association; an object the destination itself
refuses for a while is the only one that can fall behind those after it.)

**Purge** deletes the outbox rows in the given states (optionally only those whose last state
change is older than a Unix timestamp) in one transaction, then deletes their files from disk
when no remaining outbox row points to the same file (one file serves every destination of an
output). Rows go first: a kill in between leaves an unreferenced file, never a row without its
file. Instance and quarantine files are not touched by purge.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from service.node.store.connection import JournalConnection
from service.node.store.errors import StoreError, validate_uid

__all__ = ["OUTBOX_STATES", "NewOutput", "Outbox", "OutboxEntry", "insert_output"]

#: ``pending`` = waiting for (another) send attempt; ``dead`` = gave up (the dead letter).
OUTBOX_STATES = ("pending", "sent", "dead")

_OUTBOX_COLUMNS = (
    "sop_instance_uid, source_sop_instance_uid, destination, path, kind, method, state, attempts, "
    "next_attempt_at, last_error"
)

#: An outbox row of this node's own (not of an instance processed for another node's journal).
_OWN = "source_sop_instance_uid NOT IN (SELECT sop_instance_uid FROM foreign_instances)"


@dataclass(frozen=True)
class OutboxEntry:
    """One output object for one destination and where its delivery stands."""

    sop_instance_uid: str
    source_sop_instance_uid: str
    destination: str
    path: Path
    kind: str
    method: str
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str


def _outbox_entry(row: sqlite3.Row) -> OutboxEntry:
    return OutboxEntry(
        sop_instance_uid=row[0],
        source_sop_instance_uid=row[1],
        destination=row[2],
        path=Path(row[3]),
        kind=row[4],
        method=row[5],
        state=row[6],
        attempts=row[7],
        next_attempt_at=row[8],
        last_error=row[9],
    )


def _check_states(states: Sequence[str]) -> tuple[str, ...]:
    """The states as a tuple, each one checked against :data:`OUTBOX_STATES`."""
    if isinstance(states, str):
        raise ValueError(f"states must be a sequence of state names, got the string {states!r}")
    unknown = [state for state in states if state not in OUTBOX_STATES]
    if unknown:
        raise ValueError(f"unknown state(s) {unknown!r}; expected some of {OUTBOX_STATES!r}")
    return tuple(states)


def _placeholders(count: int) -> str:
    return ", ".join("?" * count)


@dataclass(frozen=True)
class NewOutput:
    """An output object to queue for one destination (see :meth:`Outbox.add`)."""

    sop_instance_uid: str
    source_sop_instance_uid: str
    destination: str
    path: Path
    kind: str
    method: str

    def __post_init__(self) -> None:
        validate_uid(self.sop_instance_uid, "SOP Instance UID")
        validate_uid(self.source_sop_instance_uid, "source SOP Instance UID")
        if not self.destination:
            raise ValueError(f"destination must be a non-empty name, got {self.destination!r}")


def insert_output(db: sqlite3.Connection, output: NewOutput, now: float) -> None:
    """Inside a journal transaction: queue ``output`` (idempotent, see :meth:`Outbox.add`)."""
    db.execute(
        "INSERT INTO outbox (sop_instance_uid, destination, source_sop_instance_uid, path, kind, method, "
        "state, attempts, next_attempt_at, last_error, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?, 'pending', 0, 0, '', ?, ?) "
        "ON CONFLICT (sop_instance_uid, destination) DO UPDATE SET "
        "source_sop_instance_uid = excluded.source_sop_instance_uid, path = excluded.path, "
        "kind = excluded.kind, method = excluded.method, state = 'pending', attempts = 0, "
        "next_attempt_at = 0, last_error = '', updated_at = excluded.updated_at",
        (
            output.sop_instance_uid,
            output.destination,
            output.source_sop_instance_uid,
            str(output.path),
            output.kind,
            output.method,
            now,
            now,
        ),
    )


class Outbox:
    """The outbox table of a journal (reach it as ``journal.outbox``); every method is one transaction.

    A wrong argument is a ``ValueError`` and an unknown row a ``LookupError``, both naming the value.
    """

    def __init__(self, connection: JournalConnection, clock: Callable[[], float]) -> None:
        self._connection = connection
        self._clock = clock

    def add(
        self,
        *,
        sop_instance_uid: str,
        source_sop_instance_uid: str,
        destination: str,
        path: Path,
        kind: str,
        method: str,
    ) -> None:
        """Queue an output for a destination, due at once.

        Idempotent on ``(sop_instance_uid, destination)``: adding it again (a reprocessed output)
        replaces the row's path and details and resets it to ``pending`` with no attempts, whatever
        its state was; there is never a second row.
        """
        output = NewOutput(sop_instance_uid, source_sop_instance_uid, destination, Path(path), kind, method)
        now = self._clock()
        with self._connection.transaction() as db:
            insert_output(db, output, now)

    def due(self, now: float, limit: int = 100) -> list[OutboxEntry]:
        """Pending outputs of the destinations whose head (oldest pending output) has
        ``next_attempt_at <= now`` (Unix time), in the order they were queued, at most ``limit``
        (see the module docstring: a destination's queue keeps its order). Outputs of another
        node's instance (``foreign_instances``, see :meth:`Journal.record_received
        <service.node.store.Journal.record_received>`) are never due: they go back to that node."""
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit!r}")
        with self._connection.transaction(write=False) as db:
            heads = db.execute(
                "SELECT d.destination, (SELECT next_attempt_at FROM outbox WHERE state = 'pending' "
                f"AND destination = d.destination AND {_OWN} ORDER BY created_at, rowid LIMIT 1) "
                f"FROM (SELECT DISTINCT destination FROM outbox WHERE state = 'pending' AND {_OWN}) AS d"
            ).fetchall()
            ready = [destination for destination, head_due in heads if head_due <= now]
            if not ready:
                return []
            rows = db.execute(
                f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE state = 'pending' AND {_OWN} "
                f"AND destination IN ({_placeholders(len(ready))}) ORDER BY created_at, rowid LIMIT ?",
                (*ready, limit),
            ).fetchall()
        return [_outbox_entry(row) for row in rows]

    def mark_sent(self, sop_instance_uid: str, destination: str) -> None:
        """The destination accepted the output: state ``sent`` (attempts counts this one too)."""
        self._update(
            sop_instance_uid,
            destination,
            "state = 'sent', attempts = attempts + 1, last_error = ''",
            (),
        )

    def mark_retry(self, sop_instance_uid: str, destination: str, *, error: str, next_attempt_at: float) -> None:
        """A send attempt failed and will be retried at ``next_attempt_at`` (Unix time); attempts += 1."""
        self._update(
            sop_instance_uid,
            destination,
            "state = 'pending', attempts = attempts + 1, next_attempt_at = ?, last_error = ?",
            (next_attempt_at, error),
        )

    def mark_dead(self, sop_instance_uid: str, destination: str, *, error: str) -> None:
        """Give up on this output (refused, or out of retries): state ``dead`` with the reason; attempts += 1."""
        self._update(
            sop_instance_uid,
            destination,
            "state = 'dead', attempts = attempts + 1, last_error = ?",
            (error,),
        )

    def _update(self, sop_instance_uid: str, destination: str, assignments: str, values: tuple) -> None:
        """Apply ``assignments`` to one outbox row; LookupError naming it when there is no such row."""
        with self._connection.transaction() as db:
            cursor = db.execute(
                f"UPDATE outbox SET {assignments}, updated_at = ? WHERE sop_instance_uid = ? AND destination = ?",
                (*values, self._clock(), sop_instance_uid, destination),
            )
            if cursor.rowcount == 0:
                raise LookupError(f"no outbox entry for SOP Instance UID {sop_instance_uid!r} to {destination!r}")

    def entries(self, states: Sequence[str] = ("pending", "dead")) -> list[OutboxEntry]:
        """Outbox entries in the given states, oldest first (what ``pacs-xai outbox list`` shows)."""
        wanted = _check_states(states)
        if not wanted:
            return []
        with self._connection.transaction(write=False) as db:
            rows = db.execute(
                f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE state IN ({_placeholders(len(wanted))}) "
                "ORDER BY created_at, rowid",
                wanted,
            ).fetchall()
        return [_outbox_entry(row) for row in rows]

    def of_source(self, source_sop_instance_uid: str) -> list[OutboxEntry]:
        """The outbox rows derived from one source instance, any state, oldest first."""
        with self._connection.transaction(write=False) as db:
            rows = db.execute(
                f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE source_sop_instance_uid = ? ORDER BY created_at, rowid",
                (source_sop_instance_uid,),
            ).fetchall()
        return [_outbox_entry(row) for row in rows]

    def retry_dead(self, sop_instance_uid: str | None = None) -> int:
        """Dead outputs back to pending, due at once, attempts reset (``None``: all of them); returns how many.

        The last error is kept for the record until the next attempt overwrites it.
        """
        condition, values = ("", ()) if sop_instance_uid is None else (" AND sop_instance_uid = ?", (sop_instance_uid,))
        with self._connection.transaction() as db:
            cursor = db.execute(
                "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = 0, updated_at = ? "
                f"WHERE state = 'dead'{condition}",
                (self._clock(), *values),
            )
            return cursor.rowcount

    def purge(self, states: Sequence[str] = ("sent",), older_than: float | None = None) -> int:
        """Delete outbox rows in ``states`` (last changed before Unix time ``older_than`` when given) and their files.

        Rows are deleted in one transaction first; then each file no remaining row points to is
        deleted (see the module docstring). Returns the number of rows deleted. A file that cannot
        be deleted is a StoreError naming it (the rows are gone by then; the file is merely orphaned).
        """
        wanted = _check_states(states)
        if not wanted:
            return 0
        condition = f"state IN ({_placeholders(len(wanted))})"
        values: tuple = wanted
        if older_than is not None:
            condition += " AND updated_at < ?"
            values = (*wanted, older_than)
        with self._connection.transaction() as db:
            paths = {row[0] for row in db.execute(f"SELECT path FROM outbox WHERE {condition}", values)}
            deleted = db.execute(f"DELETE FROM outbox WHERE {condition}", values).rowcount
            still_used = {
                path
                for path in paths
                if db.execute("SELECT 1 FROM outbox WHERE path = ? LIMIT 1", (path,)).fetchone() is not None
            }
        failures = []
        for path in sorted(paths - still_used):
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                failures.append(f"{path}: {exc}")
        if failures:
            raise StoreError(f"purged {deleted} outbox row(s) but could not delete: {'; '.join(failures)}")
        return deleted
