"""The journal's SQLite connection: WAL mode, transactions that commit whole or not at all, and
errors that name the database. Real SQLite files in tmp_path."""

from __future__ import annotations

import multiprocessing
import multiprocessing.queues
import sqlite3
import time
from pathlib import Path

import pytest

from service.node.store.connection import JournalConnection
from service.node.store.errors import StoreError


@pytest.fixture()
def connection(tmp_path: Path) -> JournalConnection:
    opened = JournalConnection(tmp_path / "c.sqlite", busy_timeout=0.05, synchronous="FULL")
    with opened.transaction() as db:
        db.execute("CREATE TABLE rows (value INTEGER UNIQUE)")
    return opened


def _values(connection: JournalConnection) -> list[int]:
    with connection.transaction(write=False) as db:
        return [row[0] for row in db.execute("SELECT value FROM rows ORDER BY value")]


@pytest.mark.parametrize(("synchronous", "level"), [("FULL", 2), ("NORMAL", 1)])
def test_the_connection_is_in_wal_mode_with_the_synchronous_level_asked(
    tmp_path: Path, synchronous: str, level: int
) -> None:
    connection = JournalConnection(tmp_path / "c.sqlite", busy_timeout=1.0, synchronous=synchronous)
    assert connection.pragma("journal_mode") == "wal"
    assert connection.pragma("synchronous") == level
    connection.close()


def test_a_failing_statement_rolls_the_whole_transaction_back_and_names_the_database(
    connection: JournalConnection,
) -> None:
    with connection.transaction() as db:
        db.execute("INSERT INTO rows VALUES (1)")
    with pytest.raises(StoreError, match=str(connection.path)) as error:
        with connection.transaction() as db:
            db.execute("INSERT INTO rows VALUES (2)")
            db.execute("INSERT INTO rows VALUES (1)")  # UNIQUE fails: the 2 goes too
    assert isinstance(error.value.__cause__, sqlite3.IntegrityError)
    assert _values(connection) == [1]


def test_any_other_exception_rolls_back_and_passes_through_unchanged(connection: JournalConnection) -> None:
    with pytest.raises(LookupError, match="unknown UID 9"):
        with connection.transaction() as db:
            db.execute("INSERT INTO rows VALUES (3)")
            raise LookupError("unknown UID 9")
    assert _values(connection) == []
    with connection.transaction() as db:  # the connection is usable afterwards
        db.execute("INSERT INTO rows VALUES (4)")
    assert _values(connection) == [4]


def test_a_write_locked_by_another_process_fails_after_the_busy_timeout_naming_the_database(
    connection: JournalConnection,
) -> None:
    other = sqlite3.connect(connection.path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreError, match=f"journal {connection.path}: cannot begin a transaction: .*locked"):
            with connection.transaction():
                pass
        assert _values(connection) == [], "a read still works beside the other writer (WAL)"
    finally:
        other.execute("ROLLBACK")
        other.close()
    with connection.transaction() as db:
        db.execute("INSERT INTO rows VALUES (5)")
    assert _values(connection) == [5]


def test_after_close_every_transaction_is_a_store_error(connection: JournalConnection) -> None:
    connection.close()
    with pytest.raises(StoreError, match=str(connection.path)):
        _values(connection)


def test_a_database_that_cannot_be_opened_is_a_store_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StoreError, match=f"cannot open journal {tmp_path / 'file' / 'c.sqlite'}"):
        JournalConnection(tmp_path / "file" / "c.sqlite", busy_timeout=1.0, synchronous="FULL")


def _open_at(path: str, start: float, results: multiprocessing.queues.Queue[str]) -> None:
    while time.time() < start:  # every process asks for WAL mode at the same moment
        pass
    try:
        JournalConnection(Path(path), busy_timeout=10.0, synchronous="FULL").close()
        results.put("ok")
    except StoreError as exc:
        results.put(str(exc))


def test_processes_opening_a_new_journal_at_once_all_get_it(tmp_path: Path) -> None:
    """Receivers starting together on a fresh data folder (seen in `bench receive`: one receiver
    exited with "database is locked"): two connections that both read the new database and then
    want its exclusive lock for the switch to WAL deadlock, and SQLite answers one of them at once,
    without its busy handler. Each must wait its turn, not fail. The race depends on timing: this
    test can pass without the retry, but it fails whenever the race happens and the retry is gone."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    start = time.time() + 0.5
    processes = [
        context.Process(target=_open_at, args=(str(tmp_path / "journal.sqlite"), start, results)) for _ in range(8)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=30)
    answers = [results.get(timeout=5) for _ in processes]
    assert answers == ["ok"] * len(processes), answers
