"""The node's durable state: the spool (files) and the journal (SQLite in WAL mode).

Nothing is acknowledged that is not stored. The receive path is::

    path = spool.write_instance(data, study_uid=..., series_uid=..., sop_uid=...)   # temp, fsync, rename
    journal.record_received(ReceivedInstance(..., path=path, ...))                  # committed, fsynced
    return 0x0000                                                                   # only now

and any :class:`StoreError` on the way is answered with a failure status (out of resources), never
Success. A UID that is not a DICOM UID raises :class:`InvalidUIDError` (a :class:`StoreError`) so the
receiver can tell "cannot understand" apart from "disk full".

Invariant kept across SIGKILL at any moment: every journal row points to a complete file, because a
file is only renamed to its final name after its bytes are fsynced, and the row is only written
after the rename (and the folder) are fsynced. What a kill can leave behind is harmless: a temp
file (``.*.tmp``, removed by :meth:`Spool.remove_stale_temp_files` at start-up) or a complete file
that no row points to (the sender was never acknowledged, so it will send again).

Durability (``storage.durability``): ``"power-loss"`` (the default) fsyncs every file, folder and
commit, so an acknowledged instance survives power loss. ``"process-crash"`` leaves the flushing to
the operating system (no fsync; SQLite ``synchronous=NORMAL`` in WAL mode): an acknowledged
instance survives SIGKILL and any crash of the node, because the bytes are in the kernel's page
cache before Success is sent, but the last seconds may be lost when the machine itself loses
power. The invariants above hold in both modes for process crashes.

The journal holds UIDs, paths, AE titles, states and error texts, never patient names or IDs.

Rules:

* **Re-sent instance** (same SOP Instance UID journaled before): the spool file is replaced (same
  path when study and series are unchanged; otherwise the old file stays where it was, unreferenced),
  the row takes the new path/association/time, goes back to state ``received`` whatever it was, and
  :meth:`Journal.record_received` returns ``False``. The receiver hands it to the assembler again, so
  it is processed as a follow-up; derived UIDs are deterministic, so its outputs replace the old
  ones at the destination instead of duplicating them. To avoid marking a copy that arrived while
  the previous one was being processed, the pipeline passes ``received_before`` to
  :meth:`Journal.mark_processed`.
* **Purge** deletes the outbox rows in the given states (optionally only those whose last state
  change is older than a Unix timestamp) in one transaction, then deletes their files from disk
  when no remaining outbox row points to the same file (one file serves every destination of an
  output). Rows go first: a kill in between leaves an unreferenced file, never a row without its
  file. Instance and quarantine files are not touched by purge.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import random
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "INSTANCE_STATES",
    "OUTBOX_STATES",
    "SCHEMA_VERSION",
    "InvalidUIDError",
    "Journal",
    "OutboxEntry",
    "QuarantineEntry",
    "ReceivedInstance",
    "Spool",
    "StoreError",
    "backoff_delay",
    "validate_uid",
]

#: Version of the journal schema written by this code; a different one refuses to open.
SCHEMA_VERSION = 1
#: ``received`` = journaled, waiting to be processed; the other three are outcomes.
INSTANCE_STATES = ("received", "done", "skipped", "failed")
#: ``pending`` = waiting for (another) send attempt; ``dead`` = gave up (the dead letter).
OUTBOX_STATES = ("pending", "sent", "dead")

# A DICOM UID is digits and dots, at most 64 characters, no empty component. Leading zeros in a
# component are not conformant but occur in the wild; they are accepted since they are path-safe.
_UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_UID_MAX_LENGTH = 64
_TEMP_SUFFIX = ".tmp"
_SLUG_PATTERN = re.compile(r"[^A-Za-z0-9_-]+")
_SLUG_MAX_LENGTH = 48


class StoreError(RuntimeError):
    """Storing failed (disk full, permission, broken path, database error): answer OUT_OF_RESOURCES."""


class InvalidUIDError(StoreError, ValueError):
    """A UID that is not a DICOM UID: refused before it can become part of a path."""


def validate_uid(value: str, name: str = "UID") -> str:
    """``value`` when it is a DICOM UID (digits and dots, at most 64 characters), else InvalidUIDError."""
    if not isinstance(value, str) or len(value) > _UID_MAX_LENGTH or not _UID_PATTERN.match(value):
        raise InvalidUIDError(
            f"{name} {value!r} is not a DICOM UID (digits and dots, at most {_UID_MAX_LENGTH} characters)"
        )
    return value


def backoff_delay(attempt: int, *, base: float, maximum: float, rng: random.Random) -> float:
    """Seconds to wait before retry number ``attempt`` (0 = first retry): exponential, full jitter, capped.

    The cap is ``min(maximum, base * 2**attempt)`` and the delay is uniform in ``[0, cap]`` ("full
    jitter"), so many senders failing together do not retry in lockstep. A seeded ``rng`` makes
    it deterministic.
    """
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 0:
        raise ValueError(f"attempt must be an integer >= 0, got {attempt!r}")
    if not base > 0:
        raise ValueError(f"base must be > 0 seconds, got {base!r}")
    if not maximum >= base:
        raise ValueError(f"maximum must be >= base ({base!r}), got {maximum!r}")
    # 2.0 ** 1000 is still finite; beyond it the cap is the maximum anyway.
    cap = min(maximum, base * 2.0 ** min(attempt, 1000))
    return rng.uniform(0.0, cap)


# --------------------------------------------------------------------------------------------- spool


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ensure_dir(path: Path, *, fsync: bool = True) -> None:
    """Create ``path`` and missing parents, fsyncing each parent that gained an entry (``fsync``)."""
    missing: list[Path] = []
    current = path
    while not current.is_dir():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            if not folder.is_dir():
                raise
        if fsync:
            _fsync_dir(folder.parent)


#: How much an acknowledged instance survives: see the module docstring.
Durability = Literal["power-loss", "process-crash"]
DURABILITY_MODES: tuple[Durability, ...] = ("power-loss", "process-crash")


def _check_durability(durability: object) -> Durability:
    if durability not in DURABILITY_MODES:
        raise ValueError(f"durability must be one of {', '.join(DURABILITY_MODES)}, got {durability!r}")
    return durability  # type: ignore[return-value]


class Spool:
    """Durable files: temp file in the same folder, flush + os.fsync, os.replace to the final name, fsync the folder.

    Layout below ``root``: ``instances/<study>/<series>/<sop>.dcm`` (received instances),
    ``quarantine/<time>-<uuid>-<reason>.bin`` (raw bytes that could not be understood) and
    ``outbox/<sop>.dcm`` (encoded outputs). Every OSError becomes a :class:`StoreError` naming the path.
    """

    def __init__(self, root: Path, *, durability: Durability = "power-loss") -> None:
        self.root = Path(os.path.abspath(root))
        self.durability = _check_durability(durability)
        self._fsync = durability == "power-loss"
        self.instances_dir = self.root / "instances"
        self.quarantine_dir = self.root / "quarantine"
        self.outbox_dir = self.root / "outbox"
        for folder in (self.instances_dir, self.quarantine_dir, self.outbox_dir):
            try:
                _ensure_dir(folder)
            except OSError as exc:
                raise StoreError(f"cannot create spool folder {folder}: {exc}") from exc

    def write_instance(self, data: bytes, *, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Store a received instance's encoded bytes; returns ``instances/<study>/<series>/<sop>.dcm``."""
        validate_uid(study_uid, "Study Instance UID")
        validate_uid(series_uid, "Series Instance UID")
        validate_uid(sop_uid, "SOP Instance UID")
        return self._write_atomic(self.instances_dir / study_uid / series_uid / f"{sop_uid}.dcm", data)

    def write_quarantine(self, data: bytes, *, reason_slug: str) -> Path:
        """Keep raw bytes that could not be understood under a unique name (UTC time + uuid + slug)."""
        slug = _SLUG_PATTERN.sub("-", reason_slug).strip("-_")[:_SLUG_MAX_LENGTH] or "unknown"
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
        return self._write_atomic(self.quarantine_dir / f"{stamp}-{uuid.uuid4().hex}-{slug}.bin", data)

    def write_output(self, data: bytes, *, sop_uid: str) -> Path:
        """Store an encoded output object; returns ``outbox/<sop>.dcm`` (replaced when rewritten)."""
        validate_uid(sop_uid, "SOP Instance UID")
        return self._write_atomic(self.outbox_dir / f"{sop_uid}.dcm", data)

    def remove_stale_temp_files(self) -> int:
        """Delete temp files a killed process left behind (call at start-up, before receiving); returns how many."""
        removed = 0
        for folder in (self.instances_dir, self.quarantine_dir, self.outbox_dir):
            for temp in folder.rglob(f".*{_TEMP_SUFFIX}"):
                try:
                    temp.unlink()
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise StoreError(f"cannot remove stale temp file {temp}: {exc}") from exc
                removed += 1
        return removed

    def _write_atomic(self, final: Path, data: bytes) -> Path:
        """Write ``data`` to ``final`` so that ``final`` is either absent/old or complete, durably."""
        temp = final.with_name(f".{final.name}.{uuid.uuid4().hex}{_TEMP_SUFFIX}")
        try:
            _ensure_dir(final.parent, fsync=self._fsync)
            with open(temp, "xb") as handle:
                handle.write(data)
                if self._fsync:
                    handle.flush()
                    os.fsync(handle.fileno())
            os.replace(temp, final)
            if self._fsync:
                _fsync_dir(final.parent)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                temp.unlink()
            raise StoreError(f"cannot write {final}: {exc}") from exc
        return final


# ------------------------------------------------------------------------------------------- journal


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


@dataclass(frozen=True)
class QuarantineEntry:
    """Raw bytes that could not be understood, with the reason and who sent them (``at``: Unix time)."""

    id: int
    path: Path
    reason: str
    calling_ae: str
    association_id: str
    at: float


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
"""

_INSTANCE_COLUMNS = (
    "sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid, path, calling_ae, "
    "association_id, received_at"
)
_OUTBOX_COLUMNS = (
    "sop_instance_uid, source_sop_instance_uid, destination, path, kind, method, state, attempts, "
    "next_attempt_at, last_error"
)


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


def _check_states(states: Sequence[str], allowed: tuple[str, ...]) -> tuple[str, ...]:
    """The states as a tuple, each one checked against ``allowed``."""
    if isinstance(states, str):
        raise ValueError(f"states must be a sequence of state names, got the string {states!r}")
    unknown = [state for state in states if state not in allowed]
    if unknown:
        raise ValueError(f"unknown state(s) {unknown!r}; expected some of {allowed!r}")
    return tuple(states)


def _placeholders(count: int) -> str:
    return ", ".join("?" * count)


class Journal:
    """SQLite in WAL mode; safe to use from several threads; every method is one transaction.

    Threading: one connection shared by all threads, serialised by a lock (SQLite serialises
    writers anyway, and every method is short). Other processes (``pacs-xai outbox ...``) may open
    the same file; a write waits up to ``busy_timeout`` seconds for their lock. Commits are durable
    (``synchronous=FULL``): once a method returns, its change survives SIGKILL and power loss
    (with ``durability="process-crash"``: ``synchronous=NORMAL``, SIGKILL only).
    Every ``sqlite3.Error`` becomes a :class:`StoreError` naming the database; a wrong argument is
    a ``ValueError`` and an unknown UID a ``LookupError``, both naming the value.
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
        self.durability = _check_durability(durability)
        self._clock = clock
        self._lock = threading.Lock()
        try:
            self._connection = sqlite3.connect(
                self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open journal {self.path}: {exc}") from exc
        try:
            self._configure()
        except BaseException:
            self._connection.close()
            raise

    def _configure(self) -> None:
        """WAL mode, durable commits, and the schema (created when the file is new)."""
        try:
            mode = self._connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            synchronous = "FULL" if self.durability == "power-loss" else "NORMAL"
            self._connection.execute(f"PRAGMA synchronous={synchronous}")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open journal {self.path}: {exc}") from exc
        if str(mode).lower() != "wal":
            raise StoreError(f"journal {self.path} cannot use WAL mode (SQLite answered {mode!r})")
        with self._transaction() as db:
            exists = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
            ).fetchone()
            if exists is None:
                # executescript() would commit on its own: create statement by statement instead.
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    db.execute(statement)
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                return
            row = db.execute("SELECT version FROM schema_version").fetchone()
        version = None if row is None else row[0]
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"journal {self.path} has schema version {version!r}; this pacs-xai reads version {SCHEMA_VERSION}"
            )

    @contextlib.contextmanager
    def _transaction(self, *, write: bool = True) -> Iterator[sqlite3.Connection]:
        """Lock, BEGIN, yield, COMMIT (ROLLBACK on error); sqlite3 errors become StoreError.

        A write transaction takes SQLite's write lock at once (BEGIN IMMEDIATE), so it waits for
        other processes up front instead of failing half-way; a read one (BEGIN DEFERRED) reads a
        consistent snapshot without blocking writers (WAL).
        """
        with self._lock:
            db = self._connection
            try:
                db.execute("BEGIN IMMEDIATE" if write else "BEGIN DEFERRED")
            except sqlite3.Error as exc:
                raise StoreError(f"journal {self.path}: cannot begin a transaction: {exc}") from exc
            try:
                yield db
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise StoreError(f"journal {self.path}: {exc}") from exc
            except BaseException:
                self._rollback()
                raise

    def _rollback(self) -> None:
        """Undo the open transaction; a failing rollback is reported, chained to the first error."""
        if self._connection.in_transaction:
            try:
                self._connection.execute("ROLLBACK")
            except sqlite3.Error as exc:
                raise StoreError(f"journal {self.path}: rollback failed: {exc}") from exc

    def close(self) -> None:
        """Close the connection (checkpointing the WAL); later calls raise StoreError."""
        with self._lock:
            try:
                self._connection.close()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot close journal {self.path}: {exc}") from exc

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------- instances

    def record_received(self, instance: ReceivedInstance) -> bool:
        """Journal a received instance (state ``received``); ``True`` when new.

        ``False`` when the SOP Instance UID was journaled before: the row is updated to this copy
        and re-queued (state ``received``), to be processed as a follow-up (see the module rules).
        """
        validate_uid(instance.sop_instance_uid, "SOP Instance UID")
        validate_uid(instance.sop_class_uid, "SOP Class UID")
        validate_uid(instance.study_instance_uid, "Study Instance UID")
        validate_uid(instance.series_instance_uid, "Series Instance UID")
        now = self._clock()
        with self._transaction() as db:
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
        return known is None

    def pending_instances(self) -> list[ReceivedInstance]:
        """Instances received but not yet processed (state ``received``), oldest first: what a restart must process."""
        with self._transaction(write=False) as db:
            rows = db.execute(
                f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE state = 'received' ORDER BY received_at, rowid"
            ).fetchall()
        return [_instance(row) for row in rows]

    def get_instances(self, sop_instance_uids: Sequence[str]) -> list[ReceivedInstance]:
        """The journaled instances with these UIDs, in the given order; LookupError naming any unknown one."""
        with self._transaction(write=False) as db:
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
        with self._transaction() as db:
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

    def instance_state(self, sop_instance_uid: str) -> tuple[str, str] | None:
        """``(state, reason)`` of a journaled instance, ``None`` when it is not journaled."""
        with self._transaction(write=False) as db:
            row = db.execute(
                "SELECT state, reason FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone()
        return None if row is None else (row[0], row[1])

    # ---------------------------------------------------------------------------------- quarantine

    def record_quarantined(self, path: Path, reason: str, calling_ae: str, association_id: str) -> int:
        """Journal quarantined bytes (already in the spool at ``path``) with their reason; returns the entry id."""
        if not isinstance(reason, str) or not reason.strip():
            raise ValueError(f"a quarantined file needs a reason, got {reason!r}")
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO quarantine (path, reason, calling_ae, association_id, at) VALUES (?, ?, ?, ?, ?)",
                (str(path), reason, calling_ae, association_id, self._clock()),
            )
            entry_id = cursor.lastrowid
        if entry_id is None:
            raise StoreError(f"journal {self.path}: no id returned for the quarantine entry of {path}")
        return entry_id

    def quarantined(self) -> list[QuarantineEntry]:
        """Every quarantine entry, oldest first."""
        with self._transaction(write=False) as db:
            rows = db.execute(
                "SELECT id, path, reason, calling_ae, association_id, at FROM quarantine ORDER BY id"
            ).fetchall()
        return [QuarantineEntry(row[0], Path(row[1]), row[2], row[3], row[4], row[5]) for row in rows]

    # -------------------------------------------------------------------------------------- outbox

    def add_output(
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
        validate_uid(sop_instance_uid, "SOP Instance UID")
        validate_uid(source_sop_instance_uid, "source SOP Instance UID")
        if not destination:
            raise ValueError(f"destination must be a non-empty name, got {destination!r}")
        now = self._clock()
        with self._transaction() as db:
            db.execute(
                "INSERT INTO outbox (sop_instance_uid, destination, source_sop_instance_uid, path, kind, method, "
                "state, attempts, next_attempt_at, last_error, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, 'pending', 0, 0, '', ?, ?) "
                "ON CONFLICT (sop_instance_uid, destination) DO UPDATE SET "
                "source_sop_instance_uid = excluded.source_sop_instance_uid, path = excluded.path, "
                "kind = excluded.kind, method = excluded.method, state = 'pending', attempts = 0, "
                "next_attempt_at = 0, last_error = '', updated_at = excluded.updated_at",
                (sop_instance_uid, destination, source_sop_instance_uid, str(path), kind, method, now, now),
            )

    def due_outputs(self, now: float, limit: int = 100) -> list[OutboxEntry]:
        """Pending outputs whose ``next_attempt_at <= now`` (Unix time), earliest due first, at most ``limit``."""
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit!r}")
        with self._transaction(write=False) as db:
            rows = db.execute(
                f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE state = 'pending' AND next_attempt_at <= ? "
                "ORDER BY next_attempt_at, created_at, rowid LIMIT ?",
                (now, limit),
            ).fetchall()
        return [_outbox_entry(row) for row in rows]

    def mark_sent(self, sop_instance_uid: str, destination: str) -> None:
        """The destination accepted the output: state ``sent`` (attempts counts this one too)."""
        self._update_output(
            sop_instance_uid,
            destination,
            "state = 'sent', attempts = attempts + 1, last_error = ''",
            (),
        )

    def mark_retry(self, sop_instance_uid: str, destination: str, *, error: str, next_attempt_at: float) -> None:
        """A send attempt failed and will be retried at ``next_attempt_at`` (Unix time); attempts += 1."""
        self._update_output(
            sop_instance_uid,
            destination,
            "state = 'pending', attempts = attempts + 1, next_attempt_at = ?, last_error = ?",
            (next_attempt_at, error),
        )

    def mark_dead(self, sop_instance_uid: str, destination: str, *, error: str) -> None:
        """Give up on this output (refused, or out of retries): state ``dead`` with the reason; attempts += 1."""
        self._update_output(
            sop_instance_uid,
            destination,
            "state = 'dead', attempts = attempts + 1, last_error = ?",
            (error,),
        )

    def _update_output(self, sop_instance_uid: str, destination: str, assignments: str, values: tuple) -> None:
        """Apply ``assignments`` to one outbox row; LookupError naming it when there is no such row."""
        with self._transaction() as db:
            cursor = db.execute(
                f"UPDATE outbox SET {assignments}, updated_at = ? WHERE sop_instance_uid = ? AND destination = ?",
                (*values, self._clock(), sop_instance_uid, destination),
            )
            if cursor.rowcount == 0:
                raise LookupError(f"no outbox entry for SOP Instance UID {sop_instance_uid!r} to {destination!r}")

    def outbox(self, states: Sequence[str] = ("pending", "dead")) -> list[OutboxEntry]:
        """Outbox entries in the given states, oldest first (what ``pacs-xai outbox list`` shows)."""
        wanted = _check_states(states, OUTBOX_STATES)
        if not wanted:
            return []
        with self._transaction(write=False) as db:
            rows = db.execute(
                f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE state IN ({_placeholders(len(wanted))}) "
                "ORDER BY created_at, rowid",
                wanted,
            ).fetchall()
        return [_outbox_entry(row) for row in rows]

    def retry_dead(self, sop_instance_uid: str | None = None) -> int:
        """Dead outputs back to pending, due at once, attempts reset (``None``: all of them); returns how many.

        The last error is kept for the record until the next attempt overwrites it.
        """
        condition, values = ("", ()) if sop_instance_uid is None else (" AND sop_instance_uid = ?", (sop_instance_uid,))
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = 0, updated_at = ? "
                f"WHERE state = 'dead'{condition}",
                (self._clock(), *values),
            )
            return cursor.rowcount

    def purge(self, states: Sequence[str] = ("sent",), older_than: float | None = None) -> int:
        """Delete outbox rows in ``states`` (last changed before Unix time ``older_than`` when given) and their files.

        Rows are deleted in one transaction first; then each file no remaining row points to is
        deleted. Returns the number of rows deleted. A file that cannot be deleted is a StoreError
        naming it (the rows are gone by then; the file is merely orphaned).
        """
        wanted = _check_states(states, OUTBOX_STATES)
        if not wanted:
            return 0
        condition = f"state IN ({_placeholders(len(wanted))})"
        values: tuple = wanted
        if older_than is not None:
            condition += " AND updated_at < ?"
            values = (*wanted, older_than)
        with self._transaction() as db:
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

    # ------------------------------------------------------------------------------------- metrics

    def counts(self) -> dict[str, int]:
        """Gauges for metrics: ``instances_<state>`` (``instances_received`` = waiting to be processed),
        ``outbox_<state>`` and ``quarantined``; every key present, zero when empty."""
        result = {f"instances_{state}": 0 for state in INSTANCE_STATES}
        result.update({f"outbox_{state}": 0 for state in OUTBOX_STATES})
        with self._transaction(write=False) as db:
            for state, count in db.execute("SELECT state, COUNT(*) FROM instances GROUP BY state"):
                result[f"instances_{state}"] = count
            for state, count in db.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state"):
                result[f"outbox_{state}"] = count
            result["quarantined"] = db.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0]
        return result
