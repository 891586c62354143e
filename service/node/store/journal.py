"""The journal: the node's state in one SQLite file (WAL mode): its schema and version, the
instance rows (``received`` -> ``done`` | ``skipped`` | ``failed``), and the outbox and quarantine
rows, reached as ``journal.outbox`` and ``journal.quarantine`` on the same connection.

The journal holds UIDs, paths, AE titles, states and error texts, never patient names or IDs.

Commits are durable (``synchronous=FULL``): once a method returns, its change survives SIGKILL and
power loss (with ``durability="process-crash"``: ``synchronous=NORMAL``, SIGKILL only; see
:mod:`service.node.store.spool` for the two modes).

**Re-sent instance** (same SOP Instance UID journaled before): the spool file is replaced (same
path when study and series are unchanged; otherwise the old file stays where it was, unreferenced),
the row takes the new path/association/time, goes back to state ``received`` whatever it was, and
:meth:`Journal.record_received` returns ``False``. The receiver hands it to the assembler again, so
it is processed as a follow-up; derived UIDs are deterministic, so its outputs replace the old
ones at the destination instead of duplicating them. To avoid marking a copy that arrived while
the previous one was being processed, the pipeline passes ``received_before`` (the ``received_at``
of the copy it read) to :meth:`Journal.mark_processed`, :meth:`Journal.complete` and
:meth:`Journal.complete_series`: a row received again since stays ``received``.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from service.node.store.connection import JournalConnection
from service.node.store.errors import StoreError, validate_uid
from service.node.store.outbox import OUTBOX_STATES, NewOutput, Outbox, insert_output
from service.node.store.quarantine import Quarantine
from service.node.store.series import SERIES_SCHEMA, SeriesClaims, drop_claims
from service.node.store.spool import Durability, check_durability

__all__ = ["INSTANCE_STATES", "SCHEMA_VERSION", "Journal", "ReceivedInstance"]

#: Version of the journal schema written by this code; a different one refuses to open.
SCHEMA_VERSION = 1
#: ``received`` = journaled, waiting to be processed; the other three are outcomes.
INSTANCE_STATES = ("received", "done", "skipped", "failed")

_SCHEMA = f"""
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE instances (
    sop_instance_uid    TEXT PRIMARY KEY,
    sop_class_uid       TEXT NOT NULL,
    study_instance_uid  TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    path                TEXT NOT NULL,
    calling_ae          TEXT NOT NULL,
    association_id      TEXT NOT NULL,
    received_at         REAL NOT NULL,
    times_received      INTEGER NOT NULL DEFAULT 1,
    state               TEXT NOT NULL CHECK (state IN {INSTANCE_STATES!r}),
    reason              TEXT NOT NULL DEFAULT '',
    updated_at          REAL NOT NULL
);
CREATE INDEX instances_by_state ON instances (state, received_at);
CREATE INDEX instances_by_series ON instances (series_instance_uid);
CREATE TABLE quarantine (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    path           TEXT NOT NULL,
    reason         TEXT NOT NULL,
    calling_ae     TEXT NOT NULL,
    association_id TEXT NOT NULL,
    at             REAL NOT NULL
);
CREATE TABLE outbox (
    sop_instance_uid        TEXT NOT NULL,
    destination             TEXT NOT NULL,
    source_sop_instance_uid TEXT NOT NULL,
    path                    TEXT NOT NULL,
    kind                    TEXT NOT NULL,
    method                  TEXT NOT NULL,
    state                   TEXT NOT NULL CHECK (state IN {OUTBOX_STATES!r}),
    attempts                INTEGER NOT NULL DEFAULT 0,
    next_attempt_at         REAL NOT NULL DEFAULT 0,
    last_error              TEXT NOT NULL DEFAULT '',
    created_at              REAL NOT NULL,
    updated_at              REAL NOT NULL,
    PRIMARY KEY (sop_instance_uid, destination)
);
CREATE INDEX outbox_by_due ON outbox (state, next_attempt_at);
CREATE INDEX outbox_in_order ON outbox (state, destination, created_at);
"""

#: Instances of another node's journal that this journal's worker processes for it (the Redis queue,
#: :mod:`service.node.queue.consumer`): their outputs go back to ``node`` in a done note, and this
#: journal's sender never takes them (:meth:`Outbox.due <service.node.store.outbox.Outbox.due>`).
#: Additive: created when missing.
_FOREIGN_SCHEMA = """
CREATE TABLE IF NOT EXISTS foreign_instances (
    sop_instance_uid TEXT PRIMARY KEY,
    node             TEXT NOT NULL
)
"""

_INSTANCE_COLUMNS = (
    "sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid, path, calling_ae, "
    "association_id, received_at"
)


@dataclass(frozen=True)
class ReceivedInstance:
    """One instance as journaled on receipt: its UIDs, where its bytes are, who sent it and when (Unix time)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    path: Path
    calling_ae: str
    association_id: str
    received_at: float


def _instance(row: sqlite3.Row) -> ReceivedInstance:
    return ReceivedInstance(
        sop_instance_uid=row[0],
        sop_class_uid=row[1],
        study_instance_uid=row[2],
        series_instance_uid=row[3],
        path=Path(row[4]),
        calling_ae=row[5],
        association_id=row[6],
        received_at=row[7],
    )


class Journal:
    """The node's journal; safe to use from several threads; every method is one transaction.

    ``journal.outbox`` (:class:`~service.node.store.outbox.Outbox`) and ``journal.quarantine``
    (:class:`~service.node.store.quarantine.Quarantine`) share its connection (see
    :mod:`service.node.store.connection` for threading, other processes and errors). A wrong
    argument is a ``ValueError`` and an unknown UID a ``LookupError``, both naming the value.
    """

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
        durability: Durability = "power-loss",
    ) -> None:
        self.path = Path(path)
        self.durability = check_durability(durability)
        self._clock = clock
        synchronous = "FULL" if self.durability == "power-loss" else "NORMAL"
        self._connection = JournalConnection(self.path, busy_timeout=busy_timeout, synchronous=synchronous)
        try:
            self._check_schema()
        except BaseException:
            self._connection.close()
            raise
        self.outbox = Outbox(self._connection, clock)
        self.quarantine = Quarantine(self._connection, clock)
        self.series = SeriesClaims(self._connection, clock)

    def _check_schema(self) -> None:
        """Create the schema when the file is new; otherwise refuse any version but :data:`SCHEMA_VERSION`."""
        with self._connection.transaction() as db:
            exists = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
            ).fetchone()
            if exists is None:
                # executescript() would commit on its own: create statement by statement instead.
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    db.execute(statement)
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                row = (SCHEMA_VERSION,)
            else:
                row = db.execute("SELECT version FROM schema_version").fetchone()
            version = None if row is None else row[0]
            if version != SCHEMA_VERSION:
                raise StoreError(
                    f"journal {self.path} has schema version {version!r}; this pacs-xai reads version {SCHEMA_VERSION}"
                )
            # Journals written before the index existed get it (routing counts a series' instances).
            db.execute("CREATE INDEX IF NOT EXISTS instances_by_series ON instances (series_instance_uid)")
            # ... and the one the sender reads each destination's queue in order by.
            db.execute("CREATE INDEX IF NOT EXISTS outbox_in_order ON outbox (state, destination, created_at)")
            # The multi-process tables (service.node.store.series) are additive: created when missing.
            for statement in filter(str.strip, SERIES_SCHEMA.split(";")):
                db.execute(statement)
            db.execute(_FOREIGN_SCHEMA)

    def close(self) -> None:
        """Close the connection (checkpointing the WAL); later calls raise StoreError."""
        self._connection.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------- instances

    def record_received(self, instance: ReceivedInstance, *, for_node: str | None = None) -> bool:
        """Journal a received instance (state ``received``); ``True`` when new.

        ``False`` when the SOP Instance UID was journaled before: the row is updated to this copy
        and re-queued (state ``received``), to be processed as a follow-up (see the module docstring).
        ``for_node``: the instance is another node's (a worker of the Redis queue journals it to
        process it): its outputs are that node's to send, never this journal's sender's. Received
        here (no ``for_node``), the instance is this node's own again, even if it was another's.
        """
        validate_uid(instance.sop_instance_uid, "SOP Instance UID")
        validate_uid(instance.sop_class_uid, "SOP Class UID")
        validate_uid(instance.study_instance_uid, "Study Instance UID")
        validate_uid(instance.series_instance_uid, "Series Instance UID")
        now = self._clock()
        with self._connection.transaction() as db:
            known = db.execute(
                "SELECT 1 FROM instances WHERE sop_instance_uid = ?", (instance.sop_instance_uid,)
            ).fetchone()
            db.execute(
                f"INSERT INTO instances ({_INSTANCE_COLUMNS}, state, reason, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'received', '', ?) "
                "ON CONFLICT (sop_instance_uid) DO UPDATE SET "
                "sop_class_uid = excluded.sop_class_uid, study_instance_uid = excluded.study_instance_uid, "
                "series_instance_uid = excluded.series_instance_uid, path = excluded.path, "
                "calling_ae = excluded.calling_ae, association_id = excluded.association_id, "
                "received_at = excluded.received_at, times_received = times_received + 1, "
                "state = 'received', reason = '', updated_at = excluded.updated_at",
                (
                    instance.sop_instance_uid,
                    instance.sop_class_uid,
                    instance.study_instance_uid,
                    instance.series_instance_uid,
                    str(instance.path),
                    instance.calling_ae,
                    instance.association_id,
                    instance.received_at,
                    now,
                ),
            )
            if for_node is not None:
                db.execute(
                    "INSERT INTO foreign_instances (sop_instance_uid, node) VALUES (?, ?) "
                    "ON CONFLICT (sop_instance_uid) DO UPDATE SET node = excluded.node",
                    (instance.sop_instance_uid, for_node),
                )
            else:  # received here: this node's own now, its outputs this node's to send
                db.execute("DELETE FROM foreign_instances WHERE sop_instance_uid = ?", (instance.sop_instance_uid,))
        return known is None

    def pending_instances(self) -> list[ReceivedInstance]:
        """Instances received but not yet processed (state ``received``), oldest first: what a restart must process."""
        with self._connection.transaction(write=False) as db:
            rows = db.execute(
                f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE state = 'received' ORDER BY received_at, rowid"
            ).fetchall()
        return [_instance(row) for row in rows]

    def get_instances(self, sop_instance_uids: Sequence[str]) -> list[ReceivedInstance]:
        """The journaled instances with these UIDs, in the given order; LookupError naming any unknown one."""
        with self._connection.transaction(write=False) as db:
            found = {
                row[0]: _instance(row)
                for uid in sop_instance_uids
                for row in db.execute(f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE sop_instance_uid = ?", (uid,))
            }
        missing = [uid for uid in sop_instance_uids if uid not in found]
        if missing:
            raise LookupError(f"SOP Instance UID(s) not in the journal: {missing!r}")
        return [found[uid] for uid in sop_instance_uids]

    def mark_processed(
        self,
        sop_instance_uids: Sequence[str],
        outcome: Literal["done", "skipped", "failed"],
        reason: str = "",
        *,
        received_before: float | None = None,
    ) -> None:
        """Record the outcome of processing these instances (``reason`` says why skipped or failed).

        With ``received_before`` (the Unix time the processing read its input), an instance whose
        journaled ``received_at`` is later was re-sent meanwhile and stays ``received`` for its
        follow-up. An unknown UID is a LookupError naming it, and nothing is changed.
        """
        if outcome not in INSTANCE_STATES[1:]:
            raise ValueError(f"outcome must be one of {INSTANCE_STATES[1:]!r}, got {outcome!r}")
        if isinstance(sop_instance_uids, str):
            raise ValueError(f"sop_instance_uids must be a sequence of UIDs, got the string {sop_instance_uids!r}")
        now = self._clock()
        with self._connection.transaction() as db:
            missing = [
                uid
                for uid in sop_instance_uids
                if db.execute("SELECT 1 FROM instances WHERE sop_instance_uid = ?", (uid,)).fetchone() is None
            ]
            if missing:
                raise LookupError(f"SOP Instance UID(s) not in the journal: {missing!r}")
            db.executemany(
                "UPDATE instances SET state = ?, reason = ?, updated_at = ? "
                "WHERE sop_instance_uid = ? AND (? IS NULL OR received_at <= ?)",
                [(outcome, reason, now, uid, received_before, received_before) for uid in sop_instance_uids],
            )
            drop_claims(db, sop_instance_uids)

    def complete(
        self,
        sop_instance_uid: str,
        outputs: Sequence[NewOutput],
        outcome: Literal["done", "failed"] = "done",
        reason: str = "",
        *,
        received_before: float | None = None,
    ) -> bool:
        """In one transaction: queue the outputs of an instance and record its outcome (``failed``
        when one route failed and others produced these outputs); ``True`` when recorded.

        One commit, so a process killed at any moment leaves either nothing (the instance is
        processed again) or everything; the outputs of a delivered result are never queued twice.
        With ``received_before`` (the ``received_at`` of the copy the processing read), an instance
        re-sent meanwhile stays ``received`` for its follow-up and the old copy's outputs are not
        queued (``False``), as in :meth:`mark_processed`; its claim ends either way.
        """
        if outcome not in ("done", "failed"):
            raise ValueError(f"outcome must be 'done' or 'failed', got {outcome!r}")
        now = self._clock()
        with self._connection.transaction() as db:
            row = db.execute(
                "SELECT received_at FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone()
            if row is None:
                raise LookupError(f"SOP Instance UID not in the journal: {sop_instance_uid!r}")
            drop_claims(db, [sop_instance_uid])
            if received_before is not None and row[0] > received_before:
                return False
            db.execute(
                "UPDATE instances SET state = ?, reason = ?, updated_at = ? WHERE sop_instance_uid = ?",
                (outcome, reason, now, sop_instance_uid),
            )
            for output in outputs:
                insert_output(db, output, now)
        return True

    def complete_series(
        self,
        outcomes: Sequence[tuple[str, Literal["done", "skipped", "failed"], str]],
        outputs: Sequence[NewOutput],
        *,
        received_before: Mapping[str, float] | None = None,
    ) -> bool:
        """In one transaction: queue the outputs of a series explained as one volume and record
        each of its instances' ``(SOP Instance UID, outcome, reason)``; ``True`` when recorded.

        The volume's objects belong to every instance at once, so all rows change in the same
        commit as the outbox rows: a process killed at any moment leaves the whole series to be
        processed again, or nothing; never half of it. With ``received_before`` (per SOP Instance
        UID, the ``received_at`` of the copy the processing read): when any instance was re-sent
        meanwhile, nothing is recorded and no output queued (``False``): the whole series stays
        ``received``, to be explained again with the new copy. Claims end either way. An unknown
        UID is a LookupError naming it, and nothing is changed.
        """
        bad = [outcome for _, outcome, _ in outcomes if outcome not in INSTANCE_STATES[1:]]
        if bad:
            raise ValueError(f"outcomes must be one of {INSTANCE_STATES[1:]!r}, got {bad!r}")
        now = self._clock()
        uids = [uid for uid, _, _ in outcomes]
        with self._connection.transaction() as db:
            received = {}
            for uid in uids:
                row = db.execute("SELECT received_at FROM instances WHERE sop_instance_uid = ?", (uid,)).fetchone()
                if row is None:
                    raise LookupError(f"SOP Instance UID not in the journal: {uid!r}")
                received[uid] = row[0]
            drop_claims(db, uids)
            if received_before is not None and any(
                uid in received_before and received[uid] > received_before[uid] for uid in uids
            ):
                return False
            db.executemany(
                "UPDATE instances SET state = ?, reason = ?, updated_at = ? WHERE sop_instance_uid = ?",
                [(outcome, reason, now, uid) for uid, outcome, reason in outcomes],
            )
            for output in outputs:
                insert_output(db, output, now)
        return True

    def hand_over(self, sop_instance_uids: Sequence[str]) -> int:
        """Forget the instances processed here for another node (``record_received(for_node=...)``)
        once their done note is written: their rows, their outbox rows (the files stay: that node
        sends them) and claims, in one transaction; returns how many. This node's own instances
        are left as they are.

        Nothing of them is kept, so a later message for one of them (Redis emptied before that node
        read the note, then refilled from its journal) finds no row here and is processed again:
        a done note is never sent again without the outputs it carried.
        """
        with self._connection.transaction() as db:
            foreign = [
                uid
                for uid in sop_instance_uids
                if db.execute("SELECT 1 FROM foreign_instances WHERE sop_instance_uid = ?", (uid,)).fetchone()
            ]
            rows = [(uid,) for uid in foreign]
            db.executemany("DELETE FROM outbox WHERE source_sop_instance_uid = ?", rows)
            db.executemany("DELETE FROM instances WHERE sop_instance_uid = ?", rows)
            db.executemany("DELETE FROM foreign_instances WHERE sop_instance_uid = ?", rows)
            drop_claims(db, foreign)
        return len(foreign)

    def series_instance_count(self, series_instance_uid: str) -> int:
        """Instances of the series journaled so far, in any state (a re-sent instance counts once)."""
        with self._connection.transaction(write=False) as db:
            row = db.execute(
                "SELECT COUNT(*) FROM instances WHERE series_instance_uid = ?", (series_instance_uid,)
            ).fetchone()
        return int(row[0])

    def instance_state(self, sop_instance_uid: str) -> tuple[str, str] | None:
        """``(state, reason)`` of a journaled instance, ``None`` when it is not journaled."""
        with self._connection.transaction(write=False) as db:
            row = db.execute(
                "SELECT state, reason FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone()
        return None if row is None else (row[0], row[1])

    # ------------------------------------------------------------------------------------- metrics

    def counts(self) -> dict[str, int]:
        """Gauges for metrics: ``instances_<state>`` (``instances_received`` = waiting to be processed),
        ``outbox_<state>`` and ``quarantined``; every key present, zero when empty. One snapshot of all three tables."""
        result = {f"instances_{state}": 0 for state in INSTANCE_STATES}
        result.update({f"outbox_{state}": 0 for state in OUTBOX_STATES})
        with self._connection.transaction(write=False) as db:
            for state, count in db.execute("SELECT state, COUNT(*) FROM instances GROUP BY state"):
                result[f"instances_{state}"] = count
            for state, count in db.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state"):
                result[f"outbox_{state}"] = count
            result["quarantined"] = db.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0]
        return result
