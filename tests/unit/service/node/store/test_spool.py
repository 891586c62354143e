"""The spool: exact bytes written atomically and durably, no partial file ever seen, failures that name
the path, stale temp files removed, and every journal row pointing to a complete file across SIGKILL.

Real files in tmp_path; the SIGKILL test kills a real writer process.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from service.node.store.errors import StoreError
from service.node.store.journal import Journal
from service.node.store.spool import Spool
from tests.helpers import REPO_ROOT
from tests.unit.service.node.helpers import ROOT_UID, SERIES, STUDY, temp_files


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
    assert temp_files(tmp_path) == []


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
    assert temp_files(tmp_path) == []


def test_stale_temp_files_are_removed_at_start_up(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    stale = spool.instances_dir / STUDY / SERIES / f".{ROOT_UID}.3.1.dcm.abc.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half")
    kept = spool.write_output(b"whole", sop_uid=f"{ROOT_UID}.9.1")
    assert spool.remove_stale_temp_files() == 1
    assert not stale.exists() and kept.read_bytes() == b"whole"


def test_data_sets_cut_off_mid_transfer_in_incoming_are_removed_at_start_up(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    (spool.incoming_dir / "tmpab12cd.dcm").write_bytes(b"the first fragments of a data set")
    assert spool.remove_stale_temp_files() == 1
    assert list(spool.incoming_dir.iterdir()) == []


@pytest.mark.parametrize("where", ["same filesystem", "another filesystem"])
def test_a_received_file_is_moved_into_the_spool_whole(tmp_path: Path, where: str) -> None:
    """The file the listener received into becomes the instance: renamed on the spool's
    filesystem, copied and deleted from another one (tmpfs /dev/shm against the disk)."""
    if where == "another filesystem":
        shm = Path("/dev/shm")
        if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
            pytest.skip("no second filesystem (/dev/shm) on this machine")
        folder = Path(tempfile.mkdtemp(dir=shm))
    else:
        folder = tmp_path / "incoming"
        folder.mkdir()
    data = os.urandom(300_000)
    handle, name = tempfile.mkstemp(dir=folder, suffix=".dcm")  # private (0600), as pynetdicom's file
    os.close(handle)
    received = Path(name)
    received.write_bytes(data)
    spool = Spool(tmp_path / "spool")
    try:
        path = spool.write_instance(received, study_uid=STUDY, series_uid=SERIES, sop_uid=f"{ROOT_UID}.4.1")
    finally:
        if where == "another filesystem":
            shutil.rmtree(folder, ignore_errors=True)
    assert path.read_bytes() == data
    assert not received.exists()
    assert temp_files(spool.root) == []
    written = spool.write_instance(data, study_uid=STUDY, series_uid=SERIES, sop_uid=f"{ROOT_UID}.4.2")
    assert path.stat().st_mode == written.stat().st_mode, "a moved file is readable as a written one"


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
        assert path.read_bytes() == data and temp_files(root) == []
        assert bool(synced) == expect_fsync
        with Journal(root / "journal.sqlite", durability=durability) as journal:
            assert journal._connection.pragma("synchronous") == expected_synchronous
    with pytest.raises(ValueError, match="'fast'"):
        Spool(tmp_path / "x", durability="fast")
    with pytest.raises(ValueError, match="'fast'"):
        Journal(tmp_path / "x.sqlite", durability="fast")


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
        assert temp_files(tmp_path) == []
    assert len(acknowledged) >= 24


def test_on_a_shared_spool_only_old_temp_files_are_removed(tmp_path: Path) -> None:
    """Other machines write into a shared spool now: their temp files are young and kept."""
    spool = Spool(tmp_path / "spool")
    old = spool.instances_dir / "a" / ".old.dcm.abc.tmp"
    young = spool.instances_dir / "a" / ".young.dcm.abc.tmp"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"left by a killed writer")
    young.write_bytes(b"being written")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert spool.remove_stale_temp_files(older_than_seconds=3600) == 1
    assert not old.exists() and young.exists()
