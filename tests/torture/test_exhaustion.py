"""Exhaustion: a data folder that fills up, idle connections at the association limit
(slow-loris), an instance over the size limit. (The 5,000-instance soak is ``pacs-xai bench soak``;
its short CI run is in tests/torture/test_soak.py.)"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import SecondaryCaptureImageStorage, Verification

from dicom_io.net.network import Status
from service.node.app import Node
from service.node.config import load_config
from service.node.receiver import Receiver, parse_instance_uids
from tests.helpers import require_dcmtk
from tests.torture import pdu as P
from tests.torture import report
from tests.torture.file_cases import base_instances
from tests.torture.test_wire import LOCALHOST, start_node, wait_freed
from tests.torture.wire import connect, echo
from tests.torture.wire_cases import small_dataset

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]


def _associate(port: int, calling: str = "MODALITY") -> object:
    ae = AE(ae_title=calling)
    ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate(LOCALHOST, port, ae_title="PACSXAI")
    assert assoc.is_established
    return assoc


def _instance(index: int, size: int = 128) -> object:
    ds = small_dataset(rows=size, cols=size)
    ds.PixelData = np.random.default_rng(index).integers(0, 255, size * size, dtype=np.uint8).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def test_full_disk_answers_out_of_resources_acknowledges_only_what_is_stored_and_recovers(
    small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fill the data folder's filesystem while instances arrive: every Success is a journaled,
    readable file; every other answer is 0xA700 (also when the file a data set is written to as it
    arrives cannot grow: it is on the same disk, as in a receiver process); once space returns the
    same node stores again."""
    running = start_node(small_disk, acse_timeout=10, network_timeout=10, dimse_timeout=10)
    monkeypatch.setattr(tempfile, "tempdir", str(small_disk / "spool" / "incoming"))
    filler = small_disk / "filler"
    try:
        # leave about 600 KiB: a few 16 KiB instances fit, then the disk is full
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        filler.write_bytes(b"\0" * max(0, free - 600 * 1024))
        instances = [_instance(i) for i in range(80)]
        assoc = _associate(running.port)
        statuses = {}
        for ds in instances:
            status = assoc.send_c_store(ds)
            statuses[str(ds.SOPInstanceUID)] = int(status.Status) if "Status" in status else None
        assoc.release()
        acknowledged = [uid for uid, s in statuses.items() if s == 0x0000]
        refused = [uid for uid, s in statuses.items() if s != 0x0000]
        assert acknowledged and refused, f"the disk never filled (or nothing fit): {len(acknowledged)} stored"
        assert {statuses[uid] for uid in refused} == {0xA700}, {hex(statuses[u] or 0) for u in refused}
        journaled = {i.sop_instance_uid: i for i in running.journal.pending_instances()}
        assert set(journaled) == set(acknowledged), "acknowledged and journaled differ"
        for uid in acknowledged:
            assert journaled[uid].path.stat().st_size > 128 * 128, f"{uid} acknowledged but its file is short"
        spooled = {path.stem for path in (small_disk / "spool" / "instances").rglob("*.dcm")}
        assert spooled == set(acknowledged), f"files kept for refused instances: {sorted(spooled - set(acknowledged))}"
        assert not [p for p in (small_disk / "spool").rglob(".*") if p.is_file()], "temp files left behind"
        assert not list((small_disk / "spool" / "incoming").iterdir()), "data sets left in incoming/"

        # space returns: the same node, no restart, stores what it refused
        filler.unlink()
        assoc = _associate(running.port)
        again = {uid: assoc.send_c_store(ds) for ds in instances if (uid := str(ds.SOPInstanceUID)) in refused}
        assoc.release()
        not_stored = {
            uid: hex(int(s.Status)) if "Status" in s else None
            for uid, s in again.items()
            if s.get("Status", None) is None or int(s.Status) != 0x0000
        }
        assert not not_stored, f"refused after space returned: {not_stored}"
        assert {i.sop_instance_uid for i in running.journal.pending_instances()} == set(statuses)
    finally:
        running.scp.stop()
        running.journal.close()
    report.record(
        report.Finding(
            "exhaustion",
            "data folder on a 16 MiB tmpfs that fills up while 80 instances arrive",
            "C-STORE 0xA700 when the instance cannot be kept; Success only for journaled files; "
            "recovers without a restart when space returns",
            len(statuses) + len(refused),
            {
                "stored (0x0000)": len(acknowledged),
                "refused (0xA700)": len(refused),
                "stored after space returned": len(refused),
            },
            "",
            lost=0,
            duplicated=0,
        )
    )


def test_idle_connections_at_the_limit_are_freed_by_the_timeout(tmp_path: Path) -> None:
    """max_associations connections that never speak (or trickle one byte at a time): a caller
    beyond the limit is rejected cleanly, and served again within the ACSE timeout."""
    timeout = 2.0
    running = start_node(tmp_path, max_associations=4, acse_timeout=timeout, network_timeout=timeout)
    held = []
    try:
        started = time.monotonic()
        for index in range(4):
            sock = connect(LOCALHOST, running.port, source=f"127.0.0.{20 + index}")
            if index % 2:  # trickle: the first bytes of a request, then nothing more
                sock.sendall(P.associate_rq()[:3])
            held.append(sock)
        time.sleep(0.2)
        refused = echo(LOCALHOST, running.port, source="127.0.0.30")
        assert refused.startswith("no A-ASSOCIATE-AC: A-ASSOCIATE-RJ"), refused
        while (answer := echo(LOCALHOST, running.port, source="127.0.0.30")) != "ok":
            assert time.monotonic() - started < timeout + 1.5, f"still refused after the ACSE timeout: {answer}"
            time.sleep(0.05)
        served_after = time.monotonic() - started
        for sock in held:
            assert P.read_until_closed(sock, timeout=1).closed, "an idle connection was not closed"
        wait_freed(running.scp, None)
    finally:
        for sock in held:
            sock.close()
        running.scp.stop()
        running.journal.close()
    assert served_after <= timeout + 1.5
    report.record(
        report.Finding(
            "exhaustion",
            f"slow-loris: max_associations (4) connections idle or trickling, ACSE timeout {timeout:.0f} s",
            "beyond the limit: A-ASSOCIATE-RJ at once; idle connections closed by the timeout; "
            "never deaf longer than the timeout",
            5,
            {"rejected cleanly while full": 1, "idle connections closed": 4},
            f"a new caller was served {served_after:.2f} s after the four connections opened",
        )
    )


def test_an_instance_over_the_size_limit_is_refused_without_being_held(tmp_path: Path) -> None:
    """A 48 MiB instance against max_instance_bytes 1 MiB, sent by DCMTK storescu from another
    process: 0xA700, nothing spooled, and the node's Python allocations never near the size."""
    limit = 1 << 20
    rows, cols = 4096, 6144  # 16-bit: 48 MiB of pixel data
    ds = small_dataset(rows=8, cols=8)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.Rows, ds.Columns = rows, cols
    ds.PixelData = np.zeros(rows * cols, dtype=np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    big = tmp_path / "big.dcm"
    ds.save_as(big, enforce_file_format=True)
    del ds
    running = start_node(tmp_path / "node", max_instance_bytes=limit, network_timeout=30, dimse_timeout=30)
    small = _instance(1, size=64)
    try:
        tracemalloc.start()
        sent = subprocess.run(
            [
                require_dcmtk("storescu"),
                "-v",
                "-aet",
                "BIG",
                "-aec",
                "PACSXAI",
                "-xs",
                LOCALHOST,
                str(running.port),
                str(big),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        output = sent.stdout + sent.stderr
        assert "Refused: OutOfResources" in output, output
        assert running.journal.pending_instances() == []
        assert not list((tmp_path / "node" / "spool" / "instances").rglob("*.dcm"))
        assert peak < 8 * limit, f"the node allocated {peak / 2**20:.0f} MiB for a refused 48 MiB instance"
        assoc = _associate(running.port)  # the association and the node go on
        assert int(assoc.send_c_store(small).Status) == 0x0000
        assoc.release()
    finally:
        running.scp.stop()
        running.journal.close()
    report.record(
        report.Finding(
            "exhaustion",
            "a 48 MiB instance against max_instance_bytes 1 MiB (DCMTK storescu)",
            "0xA700, nothing spooled, never held in memory; the next instance is stored",
            1,
            {"refused (0xA700)": 1},
            f"peak Python allocations during the transfer: {peak / 2**20:.1f} MiB",
        )
    )


def test_a_disk_that_fills_while_processing_defers_the_series_and_the_node_recovers(small_disk: Path) -> None:
    """The disk fills between receiving an instance and writing its outputs: the batch is deferred
    (``pacsxai_series_processed_total{outcome="deferred"}``), the processing loop goes on, and once
    space returns the same node explains the instance and queues its outputs, without a restart."""
    overrides = {
        "listener": {"port": 0, "processes": 1},
        "workers": {"processes": 1},
        "storage": {"data_dir": str(small_disk / "node"), "durability": "process-crash"},
        "explain": {"methods": ["gradcam"], "outputs": ["sc"]},
        "destinations": [{"name": "pacs", "ae_title": "NOWHERE", "host": LOCALHOST, "port": 9}],
        "metrics": {"enabled": False},
        "model": {"warm_up": False},
        "assembly": {"idle_seconds": 1.0},
    }
    node = Node(load_config(None, overrides))
    receiver = Receiver(node.spool, node.journal, node.assembler, node.metrics)
    data = base_instances(1)[0]
    _, sop_uid, _, _ = parse_instance_uids(data)
    deferred = node.metrics.series_processed.labels("deferred")
    filler = small_disk / "filler"
    node.start()
    try:
        assert receiver.on_store(data, calling_ae="MODALITY", association_id="a1") == Status.SUCCESS
        receiver.on_association_released("a1")
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        filler.write_bytes(b"\0" * max(0, free - 4096))  # no room for an output object
        _wait(lambda: deferred._value.get() >= 1, 60, "the batch to be deferred")
        assert node.journal.instance_state(sop_uid)[0] == "received"
        filler.unlink()
        _wait(lambda: node.journal.instance_state(sop_uid)[0] == "done", 60, "the instance to be done")
        queued = [e for e in node.journal.outbox.entries(("pending",)) if e.source_sop_instance_uid == sop_uid]
        assert queued, "no output queued for the destination"
    finally:
        node.stop()
    report.record(
        report.Finding(
            "exhaustion",
            "the data folder's disk fills while an instance is processed (outputs cannot be written)",
            "the batch waits and is tried again; explained and queued once space returns; no restart",
            1,
            {"deferred, then done": 1},
            "found by the review of the merged node: a full disk while processing raised out of the processing "
            "loop and ended its thread (now: deferred, retried after 5 s)",
            lost=0,
        )
    )


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.1)
