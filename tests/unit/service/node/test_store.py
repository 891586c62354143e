"""The spool and the journal: atomic durable files, a WAL journal that survives restarts and SIGKILL.

Real SQLite files and real files in tmp_path; the SIGKILL test kills a real writer process.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from service.node.store import (
    InvalidUIDError,
    Journal,
    ReceivedInstance,
    Spool,
    StoreError,
    backoff_delay,
    validate_uid,
)
from tests.helpers import REPO_ROOT

ROOT_UID = "1.2.826.0.1.3680043.10.999"
STUDY = f"{ROOT_UID}.1"
SERIES = f"{ROOT_UID}.2"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _instance(
    n: int, path: Path | None = None, *, association: str = "assoc-1", at: float | None = None
) -> ReceivedInstance:
    return ReceivedInstance(
        sop_instance_uid=f"{ROOT_UID}.3.{n}",
        sop_class_uid=CT_IMAGE_STORAGE,
        study_instance_uid=STUDY,
        series_instance_uid=SERIES,
        path=path or Path(f"/spool/{n}.dcm"),
        calling_ae="MODALITY",
        association_id=association,
        received_at=float(n) if at is None else at,
    )


class FakeClock:
    """Unix time under the test's control."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def journal(tmp_path: Path) -> Journal:
    with Journal(tmp_path / "journal.sqlite") as opened:
        yield opened


def _temp_files(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------- spool


def test_spool_writes_exact_bytes_atomically_and_leaves_no_temp_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    data = os.urandom(100_000)
    path = spool.write_instance(data, study_uid=STUDY, series_uid=SERIES, sop_uid=f"{ROOT_UID}.3.1")
    assert path == tmp_path / "spool" / "instances" / STUDY / SERIES / f"{ROOT_UID}.3.1.dcm"
    assert path.read_bytes() == data
    # Rewriting replaces the file in one step.
    assert spool.write_instance(b"v2", study_uid=STUDY, series_uid=SERIES, sop_uid=f"{ROOT_UID}.3.1") == path
    assert path.read_bytes() == b"v2"
    output = spool.write_output(b"out", sop_uid=f"{ROOT_UID}.9.1")
    assert output == tmp_path / "spool" / "outbox" / f"{ROOT_UID}.9.1.dcm"
    assert output.read_bytes() == b"out"
    first = spool.write_quarantine(b"junk", reason_slug="cannot parse: bad tag/../x")
    second = spool.write_quarantine(b"junk", reason_slug="cannot parse: bad tag/../x")
    assert first != second and first.parent == second.parent == tmp_path / "spool" / "quarantine"
    assert first.read_bytes() == b"junk" and "/" not in first.name and ".." not in first.name
    assert _temp_files(tmp_path) == []


def test_readers_never_see_a_partial_file_while_it_is_replaced(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    versions = [bytes([v]) * 2_000_000 for v in range(1, 9)]
    path = spool.write_output(versions[0], sop_uid=f"{ROOT_UID}.9.1")
    seen: list[bytes] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            data = path.read_bytes()
            if data not in versions:
                seen.append(data[:1] + str(len(data)).encode())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for version in versions * 3:
            spool.write_output(version, sop_uid=f"{ROOT_UID}.9.1")
    finally:
        done.set()
        reader.join()
    assert seen == [], f"partial files seen (first byte + length): {seen[:5]}"


def test_spool_failure_is_a_store_error_naming_the_path(tmp_path: Path) -> None:
    # Root ignores permission bits, so break the path itself: a file where a folder must be.
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "instances").write_bytes(b"not a folder")
    with pytest.raises(StoreError, match=str(blocked / "instances")):
        Spool(blocked)

    spool = Spool(tmp_path / "spool")
    (spool.instances_dir / STUDY).write_bytes(b"a file where the study folder goes")
    with pytest.raises(StoreError, match=str(spool.instances_dir / STUDY)):
        spool.write_instance(b"x", study_uid=STUDY, series_uid=SERIES, sop_uid=f"{ROOT_UID}.3.1")
    (spool.outbox_dir / f"{ROOT_UID}.9.1.dcm").mkdir()  # final name taken by a folder: rename fails
    with pytest.raises(StoreError, match=f"{ROOT_UID}.9.1.dcm"):
        spool.write_output(b"x", sop_uid=f"{ROOT_UID}.9.1")
    assert _temp_files(tmp_path) == []


@pytest.mark.parametrize("bad", ["1.2/../../etc", "..", "1.2.", "", "1..2", "1.2.abc", "/etc/passwd", "1" * 65])
def test_uids_that_could_escape_the_spool_are_refused(tmp_path: Path, journal: Journal, bad: str) -> None:
    spool = Spool(tmp_path / "spool")
    with pytest.raises(InvalidUIDError, match=repr(bad).replace(".", r"\.")) as error:
        spool.write_instance(b"x", study_uid=STUDY, series_uid=SERIES, sop_uid=bad)
    assert isinstance(error.value, StoreError)
    with pytest.raises(StoreError):
        spool.write_instance(b"x", study_uid=bad, series_uid=SERIES, sop_uid=f"{ROOT_UID}.3.1")
    with pytest.raises(StoreError):
        spool.write_output(b"x", sop_uid=bad)
    with pytest.raises(StoreError):
        journal.record_received(ReceivedInstance(bad, CT_IMAGE_STORAGE, STUDY, SERIES, Path("x"), "AE", "a", 0.0))
    assert list(tmp_path.rglob("*.dcm")) == []
    assert not (tmp_path.parent / "etc").exists()


def test_valid_uids_pass() -> None:
    assert validate_uid("1.2.840.10008.5.1.4.1.1.2") == "1.2.840.10008.5.1.4.1.1.2"
    assert validate_uid("0") == "0"


def test_stale_temp_files_are_removed_at_start_up(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    stale = spool.instances_dir / STUDY / SERIES / f".{ROOT_UID}.3.1.dcm.abc.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half")
    kept = spool.write_output(b"whole", sop_uid=f"{ROOT_UID}.9.1")
    assert spool.remove_stale_temp_files() == 1
    assert not stale.exists() and kept.read_bytes() == b"whole"


# -------------------------------------------------------------------------------------------- journal


def test_journal_is_in_wal_mode_with_a_schema_version(tmp_path: Path, journal: Journal) -> None:
    with sqlite3.connect(tmp_path / "journal.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(1,)]


def test_durability_modes_set_fsync_and_sqlite_synchronous(tmp_path: Path) -> None:
    """power-loss: fsync and synchronous=FULL (2); process-crash: no fsync and NORMAL (1)."""
    synced: list[int] = []
    real_fsync = os.fsync
    for durability, expected_synchronous, expect_fsync in (("power-loss", 2, True), ("process-crash", 1, False)):
        root = tmp_path / durability
        spool = Spool(root / "spool", durability=durability)
        os.fsync = lambda fd: (synced.append(fd), real_fsync(fd))[1]  # count, and still sync
        try:
            synced.clear()
            data = os.urandom(10_000)
            path = spool.write_instance(data, study_uid=STUDY, series_uid=SERIES, sop_uid=f"{ROOT_UID}.3.9")
        finally:
            os.fsync = real_fsync
        assert path.read_bytes() == data and _temp_files(root) == []
        assert bool(synced) == expect_fsync
        with Journal(root / "journal.sqlite", durability=durability) as journal:
            assert journal._connection.pragma("synchronous") == expected_synchronous
    with pytest.raises(ValueError, match="'fast'"):
        Spool(tmp_path / "x", durability="fast")
    with pytest.raises(ValueError, match="'fast'"):
        Journal(tmp_path / "x.sqlite", durability="fast")


def test_journal_refuses_an_unknown_schema_version(tmp_path: Path) -> None:
    Journal(tmp_path / "j.sqlite").close()
    with sqlite3.connect(tmp_path / "j.sqlite") as db:
        db.execute("UPDATE schema_version SET version = 99")
    db.close()
    with pytest.raises(StoreError, match="schema version 99"):
        Journal(tmp_path / "j.sqlite")


def test_journal_that_cannot_be_opened_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StoreError, match=str(tmp_path / "file" / "j.sqlite")):
        Journal(tmp_path / "file" / "j.sqlite")


def test_received_pending_processed_and_the_state_survives_a_restart(tmp_path: Path) -> None:
    db_path = tmp_path / "journal.sqlite"
    journal = Journal(db_path)
    for n in (3, 1, 2):
        assert journal.record_received(_instance(n)) is True
    assert [i.sop_instance_uid for i in journal.pending_instances()] == [f"{ROOT_UID}.3.{n}" for n in (1, 2, 3)]
    assert journal.pending_instances()[0] == _instance(1)
    journal.mark_processed([f"{ROOT_UID}.3.1"], "done")
    journal.mark_processed([f"{ROOT_UID}.3.2"], "skipped", "modality MR not covered by the model card")
    journal.close()

    with Journal(db_path) as restarted:
        assert [i.sop_instance_uid for i in restarted.pending_instances()] == [f"{ROOT_UID}.3.3"]
        assert restarted.instance_state(f"{ROOT_UID}.3.1") == ("done", "")
        assert restarted.instance_state(f"{ROOT_UID}.3.2") == ("skipped", "modality MR not covered by the model card")
        assert restarted.instance_state(f"{ROOT_UID}.3.404") is None
        assert restarted.get_instances([f"{ROOT_UID}.3.3", f"{ROOT_UID}.3.1"]) == [_instance(3), _instance(1)]


def test_mark_processed_checks_its_arguments(journal: Journal) -> None:
    journal.record_received(_instance(1))
    with pytest.raises(ValueError, match="'finished'"):
        journal.mark_processed([f"{ROOT_UID}.3.1"], "finished")  # type: ignore[arg-type]
    with pytest.raises(LookupError, match=f"{ROOT_UID}.3.2"):
        journal.mark_processed([f"{ROOT_UID}.3.1", f"{ROOT_UID}.3.2"], "done")
    assert journal.instance_state(f"{ROOT_UID}.3.1") == ("received", "")  # all or nothing
    with pytest.raises(ValueError, match="string"):
        journal.mark_processed(f"{ROOT_UID}.3.1", "done")


def test_a_resent_instance_replaces_the_row_and_is_requeued_as_a_follow_up(journal: Journal) -> None:
    uid = f"{ROOT_UID}.3.1"
    assert journal.record_received(_instance(1, Path("/spool/a.dcm"), association="assoc-1", at=10.0)) is True
    journal.mark_processed([uid], "done")
    assert journal.record_received(_instance(1, Path("/spool/b.dcm"), association="assoc-2", at=20.0)) is False
    assert journal.instance_state(uid) == ("received", "")
    assert journal.pending_instances() == [_instance(1, Path("/spool/b.dcm"), association="assoc-2", at=20.0)]
    assert journal.counts()["instances_received"] == 1  # one row, never two

    # A copy that arrives while the previous one is processed is not swallowed by its mark_processed.
    assert journal.record_received(_instance(1, Path("/spool/c.dcm"), at=30.0)) is False
    journal.mark_processed([uid], "done", received_before=25.0)
    assert journal.instance_state(uid) == ("received", "")
    journal.mark_processed([uid], "done", received_before=35.0)
    assert journal.instance_state(uid) == ("done", "")


@pytest.mark.parametrize("shared", [True, False], ids=["one-journal", "journal-per-thread"])
def test_concurrent_record_received_all_land(tmp_path: Path, shared: bool) -> None:
    db_path = tmp_path / "journal.sqlite"
    common = Journal(db_path)
    errors: list[BaseException] = []

    def receive(thread: int) -> None:
        own = common if shared else Journal(db_path)
        try:
            for k in range(50):
                own.record_received(_instance(thread * 1000 + k, association=f"assoc-{thread}"))
        except BaseException as exc:  # reported to the main thread below
            errors.append(exc)
        finally:
            if not shared:
                own.close()

    threads = [threading.Thread(target=receive, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    pending = common.pending_instances()
    assert len(pending) == 200 == len({i.sop_instance_uid for i in pending})
    assert common.counts()["instances_received"] == 200
    common.close()


def test_quarantine_rows(journal: Journal, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    path = spool.write_quarantine(b"\x00garbage", reason_slug="cannot-parse")
    entry_id = journal.quarantine.record(path, "cannot parse: no File Meta", "MODALITY", "assoc-7")
    (entry,) = journal.quarantine.entries()
    assert entry.id == entry_id and entry.path == path and entry.reason == "cannot parse: no File Meta"
    assert (entry.calling_ae, entry.association_id) == ("MODALITY", "assoc-7") and entry.at > 0
    assert journal.counts()["quarantined"] == 1
    with pytest.raises(ValueError, match="reason"):
        journal.quarantine.record(path, " ", "MODALITY", "assoc-7")


def _add(journal: Journal, n: int, destination: str = "PACS", path: Path | None = None) -> str:
    uid = f"{ROOT_UID}.9.{n}"
    journal.outbox.add(
        sop_instance_uid=uid,
        source_sop_instance_uid=f"{ROOT_UID}.3.{n}",
        destination=destination,
        path=path or Path(f"/spool/outbox/{uid}.dcm"),
        kind="sc",
        method="gradcam",
    )
    return uid


def test_add_output_is_idempotent_and_resets_to_pending(journal: Journal) -> None:
    uid = _add(journal, 1)
    _add(journal, 1)
    assert len(journal.outbox.entries(("pending", "sent", "dead"))) == 1
    journal.outbox.mark_dead(uid, "PACS", error="refused: SOP class not supported")
    _add(journal, 1, path=Path("/spool/outbox/new.dcm"))  # reprocessed: replaces the old one
    (entry,) = journal.outbox.entries(("pending", "sent", "dead"))
    assert (entry.state, entry.attempts, entry.path, entry.last_error) == (
        "pending",
        0,
        Path("/spool/outbox/new.dcm"),
        "",
    )
    _add(journal, 1, destination="ARCHIVE")  # another destination is another row
    assert len(journal.outbox.entries()) == 2


def test_due_outputs_respects_next_attempt_at_and_limit(journal: Journal) -> None:
    first, second, third = _add(journal, 1), _add(journal, 2), _add(journal, 3)
    assert [e.sop_instance_uid for e in journal.outbox.due(now=0.0)] == [first, second, third]
    assert len(journal.outbox.due(now=0.0, limit=2)) == 2
    journal.outbox.mark_retry(first, "PACS", error="association rejected", next_attempt_at=100.0)
    journal.outbox.mark_retry(second, "PACS", error="timeout", next_attempt_at=50.0)
    assert [e.sop_instance_uid for e in journal.outbox.due(now=10.0)] == [third]
    assert [e.sop_instance_uid for e in journal.outbox.due(now=60.0)] == [third, second]
    assert [e.sop_instance_uid for e in journal.outbox.due(now=100.0)] == [third, second, first]
    (retried,) = [e for e in journal.outbox.entries() if e.sop_instance_uid == first]
    assert (retried.attempts, retried.next_attempt_at, retried.last_error) == (1, 100.0, "association rejected")
    journal.outbox.mark_sent(third, "PACS")
    assert third not in [e.sop_instance_uid for e in journal.outbox.due(now=1e12)]
    with pytest.raises(ValueError, match="limit"):
        journal.outbox.due(now=0.0, limit=0)


def test_retry_dead_purge_and_counts(tmp_path: Path) -> None:
    clock = FakeClock(1_000.0)
    spool = Spool(tmp_path / "spool")
    journal = Journal(tmp_path / "journal.sqlite", clock=clock)
    paths = {n: spool.write_output(b"o%d" % n, sop_uid=f"{ROOT_UID}.9.{n}") for n in range(1, 5)}
    uids = {n: _add(journal, n, path=paths[n]) for n in range(1, 5)}
    _add(journal, 1, destination="ARCHIVE", path=paths[1])  # same file, second destination
    journal.outbox.mark_sent(uids[1], "PACS")
    journal.outbox.mark_sent(uids[2], "PACS")
    journal.outbox.mark_dead(uids[3], "PACS", error="0xA900 dataset does not match SOP class")
    journal.outbox.mark_dead(uids[4], "PACS", error="out of retries")
    assert journal.counts() == {
        "instances_received": 0,
        "instances_done": 0,
        "instances_skipped": 0,
        "instances_failed": 0,
        "outbox_pending": 1,
        "outbox_sent": 2,
        "outbox_dead": 2,
        "quarantined": 0,
    }
    assert {e.sop_instance_uid for e in journal.outbox.entries(("dead",))} == {uids[3], uids[4]}

    with pytest.raises(LookupError, match="NOWHERE"):
        journal.outbox.mark_sent(uids[1], "NOWHERE")
    assert journal.outbox.retry_dead(uids[3]) == 1
    (revived,) = [e for e in journal.outbox.due(now=clock.now) if e.sop_instance_uid == uids[3]]
    assert (revived.state, revived.attempts) == ("pending", 0)
    assert journal.outbox.retry_dead() == 1
    assert journal.outbox.retry_dead() == 0

    journal.outbox.mark_dead(uids[4], "PACS", error="refused")
    clock.now = 2_000.0
    journal.outbox.mark_sent(uids[3], "PACS")  # sent later than the other two
    assert journal.outbox.purge(("sent",), older_than=1_500.0) == 2  # uids 1 and 2 to PACS
    assert not paths[2].exists()
    assert paths[1].exists()  # still needed for ARCHIVE
    assert paths[3].exists() and paths[4].exists()
    assert journal.outbox.purge(("dead",)) == 1 and not paths[4].exists()
    assert journal.outbox.purge() == 1 and not paths[3].exists()
    assert journal.counts()["outbox_pending"] == 1 and journal.counts()["outbox_sent"] == 0
    with pytest.raises(ValueError, match="'gone'"):
        journal.outbox.purge(("gone",))
    journal.close()


def test_journal_holds_no_patient_data(tmp_path: Path) -> None:
    with Journal(tmp_path / "journal.sqlite") as journal:
        journal.record_received(_instance(1))
        _add(journal, 1)
    with sqlite3.connect(tmp_path / "journal.sqlite") as db:
        columns = {
            row[1]
            for table in ("instances", "outbox", "quarantine")
            for row in db.execute(f"PRAGMA table_info({table})")
        }
    db.close()
    assert not {c for c in columns if "patient" in c or "name" in c or "birth" in c}


# ------------------------------------------------------------------------------------------- backoff


def test_backoff_grows_exponentially_up_to_the_maximum_with_full_jitter() -> None:
    rng = random.Random(7)
    for attempt in range(12):
        cap = min(60.0, 1.0 * 2**attempt)
        delays = [backoff_delay(attempt, base=1.0, maximum=60.0, rng=rng) for _ in range(200)]
        assert all(0.0 <= d <= cap for d in delays)
        assert max(delays) > 0.8 * cap  # spread over the whole [0, cap]
    assert backoff_delay(10_000, base=1.0, maximum=60.0, rng=rng) <= 60.0
    assert [backoff_delay(3, base=0.5, maximum=30.0, rng=random.Random(1)) for _ in range(2)] == [
        backoff_delay(3, base=0.5, maximum=30.0, rng=random.Random(1))
    ] * 2
    with pytest.raises(ValueError, match="-1"):
        backoff_delay(-1, base=1.0, maximum=60.0, rng=rng)
    with pytest.raises(ValueError, match="0.5"):
        backoff_delay(1, base=1.0, maximum=0.5, rng=rng)


# ---------------------------------------------------------------------------------- restart (SIGKILL)

# The receive path as the SCP runs it: spool write, journal row, then the acknowledgement (a line).
# Every SOP Instance UID is sent twice, so half the writes replace a file a journal row points to.
_WRITER = r"""
import hashlib, random, sys, time
from pathlib import Path
from service.node.store import Journal, ReceivedInstance, Spool

root, start, durability = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
spool = Spool(root / "spool", durability=durability)
journal = Journal(root / "journal.sqlite", durability=durability)
rng = random.Random(start)
study, series = "1.2.826.0.1.3680043.10.999.1", "1.2.826.0.1.3680043.10.999.2"
for n in range(start, start + 100_000):
    body = rng.randbytes(rng.randrange(1_000, 4_000_000))
    data = hashlib.sha256(body).hexdigest().encode() + b"\n" + body
    sop = f"1.2.826.0.1.3680043.10.999.3.{n // 2}"
    path = spool.write_instance(data, study_uid=study, series_uid=series, sop_uid=sop)
    ct = "1.2.840.10008.5.1.4.1.1.2"
    journal.record_received(ReceivedInstance(sop, ct, study, series, path, "AE", f"a{start}", time.time()))
    print(n, flush=True)
"""


def _complete(path: Path) -> bool:
    digest, _, body = path.read_bytes().partition(b"\n")
    return hashlib.sha256(body).hexdigest().encode() == digest


@pytest.mark.parametrize("durability", ["power-loss", "process-crash"])
def test_sigkill_at_any_moment_leaves_every_journal_row_pointing_to_a_complete_file(
    tmp_path: Path, durability: str
) -> None:
    """Both durability modes survive a killed process (process-crash leaves flushing to the OS,
    whose page cache outlives the process)."""
    acknowledged: list[int] = []
    rng = random.Random(3)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    for round_ in range(8):
        child = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(tmp_path), str(round_ * 10_000), durability],
            stdout=subprocess.PIPE,
            env=env,
            cwd=REPO_ROOT,
        )
        try:
            assert child.stdout is not None
            for _ in range(rng.randrange(3, 6)):
                line = child.stdout.readline()
                assert line, f"writer exited early with status {child.poll()}"
                acknowledged.append(int(line))
            time.sleep(rng.uniform(0.0, 0.05))  # any moment: inside a write, a rename or a commit
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
            assert child.stdout is not None
            acknowledged.extend(int(line) for line in child.stdout.read().split())
        assert child.returncode == -signal.SIGKILL

        # Restart: every acknowledged instance is journaled; every row points to a complete file.
        with Journal(tmp_path / "journal.sqlite") as journal:
            pending = journal.pending_instances()
        journaled = {int(i.sop_instance_uid.rsplit(".", 1)[1]) for i in pending}
        assert {n // 2 for n in acknowledged} <= journaled
        for instance in pending:
            assert instance.path.is_file(), f"journal row {instance.sop_instance_uid} points to a missing file"
            assert _complete(instance.path), f"journal row {instance.sop_instance_uid} points to a partial file"
        Spool(tmp_path / "spool").remove_stale_temp_files()
        assert _temp_files(tmp_path) == []
    assert len(acknowledged) >= 24
