"""The quarantine rows of the journal: bytes received that could not be understood, with the reason.

The bytes themselves are already in the spool (:meth:`Spool.write_quarantine
<service.node.store.spool.Spool.write_quarantine>`) when their row is written; the row says why,
who sent them (calling AE title, association) and when. Nothing is ever processed or sent from
the quarantine, and purge leaves it alone: it is kept for a person to look at.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from service.node.store.connection import JournalConnection
from service.node.store.errors import StoreError

__all__ = ["Quarantine", "QuarantineEntry"]


@dataclass(frozen=True)
class QuarantineEntry:
    """Raw bytes that could not be understood, with the reason and who sent them (``at``: Unix time)."""

    id: int
    path: Path
    reason: str
    calling_ae: str
    association_id: str
    at: float


class Quarantine:
    """The quarantine table of a journal (reach it as ``journal.quarantine``); every method is one transaction."""

    def __init__(self, connection: JournalConnection, clock: Callable[[], float]) -> None:
        self._connection = connection
        self._clock = clock

    def record(self, path: Path, reason: str, calling_ae: str, association_id: str) -> int:
        """Journal quarantined bytes (already in the spool at ``path``) with their reason; returns the entry id."""
        if not isinstance(reason, str) or not reason.strip():
            raise ValueError(f"a quarantined file needs a reason, got {reason!r}")
        with self._connection.transaction() as db:
            cursor = db.execute(
                "INSERT INTO quarantine (path, reason, calling_ae, association_id, at) VALUES (?, ?, ?, ?, ?)",
                (str(path), reason, calling_ae, association_id, self._clock()),
            )
            entry_id = cursor.lastrowid
        if entry_id is None:
            raise StoreError(f"journal {self._connection.path}: no id returned for the quarantine entry of {path}")
        return entry_id

    def entries(self) -> list[QuarantineEntry]:
        """Every quarantine entry, oldest first."""
        with self._connection.transaction(write=False) as db:
            rows = db.execute(
                "SELECT id, path, reason, calling_ae, association_id, at FROM quarantine ORDER BY id"
            ).fetchall()
        return [QuarantineEntry(row[0], Path(row[1]), row[2], row[3], row[4], row[5]) for row in rows]
