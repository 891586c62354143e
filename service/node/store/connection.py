"""The journal's one SQLite connection, in WAL mode, shared by every thread: transactions that
serialise, commit or roll back, and name the database in every error.

Threading: one connection shared by all threads, serialised by a lock (SQLite serialises writers
anyway, and every transaction is short). Other processes (the receivers and workers of a node in
several processes, ``pacs-xai outbox ...``) open the same file. Their write transactions queue on
an exclusive ``flock`` of ``<journal>.lock`` first: a blocked writer wakes the moment the lock is
free, where SQLite's own busy handler sleeps and polls (1, 2, 5 ... 100 ms), which cut the
receive rate of two receiver processes to a third of one process's. SQLite's lock, with
``busy_timeout``, stays the second line (a process that does not take the file lock). ``synchronous=FULL`` makes
every commit durable across SIGKILL and power loss; ``NORMAL`` (in WAL mode) across SIGKILL only.
Every ``sqlite3.Error`` becomes a :class:`~service.node.store.errors.StoreError` naming the database.

The journal, its outbox and its quarantine share one :class:`JournalConnection`, so each of their
methods is one transaction on the same database.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from service.node.store.errors import StoreError

__all__ = ["JournalConnection"]


class JournalConnection:
    """An open SQLite database in WAL mode; use it through :meth:`transaction`."""

    def __init__(self, path: Path, *, busy_timeout: float, synchronous: Literal["FULL", "NORMAL"]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._file_lock: int | None = None
        try:
            self._sqlite = sqlite3.connect(
                self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open journal {self.path}: {exc}") from exc
        try:
            self._use_wal(synchronous, busy_timeout)
            self._file_lock = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            self._sqlite.close()
            raise StoreError(f"cannot open the lock file of journal {self.path}: {exc}") from exc
        except BaseException:
            self._sqlite.close()
            raise

    def _use_wal(self, synchronous: str, busy_timeout: float) -> None:
        # Switching a new database to WAL takes an exclusive lock for which SQLite calls no busy
        # handler: processes opening one journal at once (receivers starting together) are told
        # "database is locked" at once. Each tries again until the busy timeout.
        deadline = time.monotonic() + busy_timeout
        while True:
            try:
                mode = self._sqlite.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                self._sqlite.execute(f"PRAGMA synchronous={synchronous}")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise StoreError(f"cannot open journal {self.path}: {exc}") from exc
                time.sleep(0.05)
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open journal {self.path}: {exc}") from exc
        if str(mode).lower() != "wal":
            raise StoreError(f"journal {self.path} cannot use WAL mode (SQLite answered {mode!r})")

    def pragma(self, name: str) -> object:
        """The value of ``PRAGMA <name>`` on this connection (``synchronous`` is per connection)."""
        with self._lock:
            try:
                row = self._sqlite.execute(f"PRAGMA {name}").fetchone()
            except sqlite3.Error as exc:
                raise StoreError(f"journal {self.path}: cannot read PRAGMA {name}: {exc}") from exc
        return None if row is None else row[0]

    @contextlib.contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[sqlite3.Connection]:
        """Lock, BEGIN, yield, COMMIT (ROLLBACK on error); sqlite3 errors become StoreError.

        A write transaction takes SQLite's write lock at once (BEGIN IMMEDIATE), so it waits for
        other processes up front instead of failing half-way; a read one (BEGIN DEFERRED) reads a
        consistent snapshot without blocking writers (WAL).
        """
        with self._lock, self._writers_queue(write):
            db = self._sqlite
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

    @contextlib.contextmanager
    def _writers_queue(self, write: bool) -> Iterator[None]:
        """For a write: the exclusive file lock every process's writers queue on (see the module docstring)."""
        if not write or self._file_lock is None:
            yield
            return
        try:
            fcntl.flock(self._file_lock, fcntl.LOCK_EX)
        except OSError as exc:
            raise StoreError(f"journal {self.path}: cannot lock {self.path}.lock: {exc}") from exc
        try:
            yield
        finally:
            fcntl.flock(self._file_lock, fcntl.LOCK_UN)

    def _rollback(self) -> None:
        """Undo the open transaction; a failing rollback is reported, chained to the first error."""
        if self._sqlite.in_transaction:
            try:
                self._sqlite.execute("ROLLBACK")
            except sqlite3.Error as exc:
                raise StoreError(f"journal {self.path}: rollback failed: {exc}") from exc

    def close(self) -> None:
        """Close the connection (checkpointing the WAL); later transactions raise StoreError."""
        with self._lock:
            if self._file_lock is not None:
                os.close(self._file_lock)
                self._file_lock = None
            try:
                self._sqlite.close()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot close journal {self.path}: {exc}") from exc
