"""The node's DICOM networking against real peers on 127.0.0.1: DCMTK echoscu/storescu into the
Storage SCP, the Storage SCU into DCMTK storescp, TLS with certificates made here by openssl.

The SCP's ``StorageEvents`` is a :class:`Recorder` that keeps what arrives in memory and answers
the status it is told to (spooling is the service's job); everything on the wire is real.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, _config, dimse_messages, evt
from pynetdicom.events import Event
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import MRImageStorage

from dicom_io.compression import compress_pixels
from dicom_io.net.network import Status, classify_store_status, describe_status
from dicom_io.net.scp import AllowedCaller, ListenerSettings, StorageSCP, TlsFiles
from dicom_io.net.scu import Destination, StoreSCU
from tests.helpers import Pki, data_file, free_port, make_pki, require_dcmtk
from tests.torture.pdu import associate_rq

pytestmark = pytest.mark.integration

NODE = "PACSXAI"
LOCALHOST = "127.0.0.1"
# DCMTK tools read this and switch Nagle off on their side (see environment notes).
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}

# One small real file per transfer syntax the node accepts (pydicom's test data).
FILES_BY_SYNTAX = {
    "1.2.840.10008.1.2.1": "CT_small.dcm",  # explicit VR little endian
    "1.2.840.10008.1.2": "rtdose_1frame.dcm",  # implicit VR little endian
    "1.2.840.10008.1.2.2": "MR_small_bigendian.dcm",  # explicit VR big endian
    "1.2.840.10008.1.2.1.99": "image_dfl.dcm",  # deflated explicit VR little endian
    "1.2.840.10008.1.2.4.50": "SC_rgb_small_odd_jpeg.dcm",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "JPEG-lossy.dcm",  # JPEG extended
    "1.2.840.10008.1.2.4.70": "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80": "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "JPEGLSNearLossless_08.dcm",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "JPEG2000.dcm",  # JPEG 2000
    "1.2.840.10008.1.2.5": "MR_small_RLE.dcm",  # RLE lossless
}


# --------------------------------------------------------------------------- recorder and helpers


@dataclass
class Recorder:
    """StorageEvents that keeps everything in memory; ``status``/``error`` say how to answer;
    ``understand`` makes it answer 0xC000 for bytes that do not parse as the announced object."""

    status: int = Status.SUCCESS
    error: Exception | None = None
    understand: bool = False
    stores: list[tuple[str, str, bytes]] = field(default_factory=list)  # (association id, calling AE, bytes)
    log: list[tuple[str, ...]] = field(default_factory=list)  # every call in order
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_store(self, encoded: bytes, *, calling_ae: str, association_id: str) -> int:
        with self.lock:
            self.log.append(("store", association_id))
            if self.error is not None:
                raise self.error
            if self.understand and not _parses_as_announced(encoded):
                return Status.CANNOT_UNDERSTAND
            self.stores.append((association_id, calling_ae, encoded))
            return self.status

    def on_association_released(self, association_id: str) -> None:
        with self.lock:
            self.log.append(("released", association_id))

    def on_association_rejected(self, calling_ae: str, host: str, reason: str) -> None:
        with self.lock:
            self.log.append(("rejected", calling_ae, host, reason))

    def on_association_accepted(self, calling_ae: str, host: str, association_id: str) -> None:
        with self.lock:
            self.log.append(("accepted", calling_ae, host, association_id))

    def entries(self, kind: str) -> list[tuple[str, ...]]:
        with self.lock:
            return [entry for entry in self.log if entry[0] == kind]

    def datasets(self) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(io.BytesIO(encoded)) for _, _, encoded in self.stores]


def _parses_as_announced(encoded: bytes) -> bool:
    """The service's rule in miniature: a data set whose SOP Instance UID is the announced one."""
    try:
        dataset = pydicom.dcmread(io.BytesIO(encoded))
    except Exception:
        return False
    return dataset.get("SOPInstanceUID") == dataset.file_meta.MediaStorageSOPInstanceUID


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_dcmtk(args[0]), *args[1:]], capture_output=True, text=True, env=DCMTK_ENV, timeout=30
    )


def record_nodelay(event: Event, seen: list[int]) -> None:
    """Test hook: the TCP_NODELAY option as the kernel reports it on the association's socket."""
    seen.append(event.assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


@pytest.fixture
def start_scp() -> Iterator[Callable[..., tuple[StorageSCP, Recorder]]]:
    """Start a StorageSCP on a free port with a fresh Recorder; all are stopped at the end."""
    started: list[StorageSCP] = []

    def start(recorder: Recorder | None = None, extra_handlers=(), **settings) -> tuple[StorageSCP, Recorder]:
        recorder = recorder or Recorder()
        scp = StorageSCP(ListenerSettings(**{"port": 0, **settings}), recorder, extra_handlers=extra_handlers)
        scp.start()
        started.append(scp)
        return scp, recorder

    yield start
    for scp in started:
        scp.stop(timeout=5)


def copies_with_new_uids(source: str, folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    original = pydicom.dcmread(source)
    paths = []
    for number in range(count):
        copy = original.copy()
        copy.SOPInstanceUID = generate_uid()
        copy.file_meta.MediaStorageSOPInstanceUID = copy.SOPInstanceUID
        paths.append(folder / f"{number:03d}.dcm")
        copy.save_as(paths[-1], enforce_file_format=True)
    return paths


# --------------------------------------------------------------------------- status rules


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (0x0000, "delivered"),
        (0x0001, "delivered"),
        (0xB000, "delivered"),
        (0xB007, "delivered"),
        (0xA700, "retry"),
        (0xA7FF, "retry"),
        (0x0213, "retry"),
        (0xA900, "reject"),
        (0xC000, "reject"),
        (0xC123, "reject"),
        (0x0122, "reject"),
        (0x0110, "reject"),
    ],
)
def test_store_status_verdicts(status: int, verdict: str) -> None:
    assert classify_store_status(status) == verdict


def test_status_descriptions_and_bad_status() -> None:
    assert describe_status(0xA7FE) == "0xA7FE (out of resources)"
    assert describe_status(Status.CANNOT_UNDERSTAND) == "0xC000 (cannot understand)"
    with pytest.raises(ValueError, match="0x10000|65536"):
        classify_store_status(0x10000)


def test_destination_parse() -> None:
    assert Destination.parse("ORTHANC@10.0.0.5:4242") == Destination("ORTHANC", "10.0.0.5", 4242)
    assert Destination.parse("PACS@[::1]:104").host == "::1"
    for bad in ("ORTHANC@10.0.0.5", "10.0.0.5:4242", "A@h:0", "WAYTOOLONGAETITLE17@h:104", "A@h:port"):
        with pytest.raises(ValueError, match=bad.replace("[", r"\[").replace("]", r"\]")):
            Destination.parse(bad)


def test_settings_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="not-an-ip"):
        AllowedCaller("GOOD", "not-an-ip")
    with pytest.raises(ValueError, match="without backslash, got .BAD"):
        ListenerSettings(ae_title="BAD\\AE")
    with pytest.raises(ValueError, match="70000"):
        ListenerSettings(port=70000)


# --------------------------------------------------------------------------- receive: DCMTK into the SCP


def test_echoscu_is_answered_and_a_wrong_called_ae_is_rejected(start_scp) -> None:
    scp, recorder = start_scp()
    port = str(scp.port)

    assert run_tool("echoscu", "-aet", "MODALITY", "-aec", NODE, LOCALHOST, port).returncode == 0

    wrong = run_tool("echoscu", "-aet", "MODALITY", "-aec", "NOTTHENODE", LOCALHOST, port)
    assert wrong.returncode != 0
    assert "Called AE Title Not Recognized" in wrong.stderr
    assert wait_until(lambda: len(recorder.entries("rejected")) == 1)
    _, calling, host, reason = recorder.entries("rejected")[0]
    assert (calling, host) == ("MODALITY", LOCALHOST) and "NOTTHENODE" in reason


def test_storescu_objects_arrive_byte_exact_on_one_association(start_scp) -> None:
    scp, recorder = start_scp()
    sources = [data_file("CT_small.dcm"), data_file("MR_small.dcm"), data_file("MR_small_jp2klossless.dcm")]

    # -xv: propose JPEG 2000 lossless besides the uncompressed syntaxes, so the J2K file goes as it is.
    sent = run_tool("storescu", "-xv", "-aet", "MODALITY", "-aec", NODE, LOCALHOST, str(scp.port), *sources)
    assert sent.returncode == 0, sent.stderr

    # MR_small and its JPEG 2000 twin share their UIDs: the syntax tells them apart.
    received = {(ds.SOPInstanceUID, ds.file_meta.TransferSyntaxUID): ds for ds in recorder.datasets()}
    assert len(received) == 3
    for path in sources:
        original = pydicom.dcmread(path)
        copy = received[(original.SOPInstanceUID, original.file_meta.TransferSyntaxUID)]
        assert copy.PixelData == original.PixelData
        assert (copy.pixel_array == original.pixel_array).all()
    assert JPEG2000Lossless in {syntax for _, syntax in received}

    association_ids = {association_id for association_id, _, _ in recorder.stores}
    assert len(association_ids) == 1 and {calling for _, calling, _ in recorder.stores} == {"MODALITY"}
    (association_id,) = association_ids
    assert wait_until(lambda: recorder.entries("released") == [("released", association_id)])
    assert recorder.log[-1] == ("released", association_id)  # after the last store
    assert recorder.entries("accepted") == [("accepted", "MODALITY", LOCALHOST, association_id)]


@dataclass
class FileRecorder(Recorder):
    """A Recorder that takes each data set as the file the listener wrote while it arrived."""

    files: list[tuple[Path, bool]] = field(default_factory=list)  # (path, inside tempfile's folder)

    def on_store_file(self, path: Path, *, calling_ae: str, association_id: str) -> int:
        self.files.append((path, path.parent == Path(tempfile.gettempdir())))
        return self.on_store(path.read_bytes(), calling_ae=calling_ae, association_id=association_id)


def test_a_data_set_arrives_as_a_file_written_while_it_came_and_removed_after(start_scp) -> None:
    """Chunked receive: the data set is a temporary Part 10 file, byte exact, gone after the call
    (the handler did not move it); a 2k² radiograph is never held whole in memory."""
    scp, recorder = start_scp(FileRecorder())
    source = data_file("RG1_UNCR.dcm")  # a 7 MB CR
    sent = run_tool("storescu", "-aet", "MODALITY", "-aec", NODE, LOCALHOST, str(scp.port), source)
    assert sent.returncode == 0, sent.stderr
    ((path, in_tempdir),) = recorder.files
    assert in_tempdir
    ((_, _, encoded),) = recorder.stores
    original = Path(source).read_bytes()
    received = pydicom.dcmread(io.BytesIO(encoded))
    assert received.SOPInstanceUID == pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID
    assert received.PixelData == pydicom.dcmread(source).PixelData and len(encoded) > 0.9 * len(original)
    assert wait_until(lambda: not path.exists())


def test_a_data_set_cut_off_half_way_leaves_no_file_behind(
    start_scp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sender dies after 5 P-DATA of a 2 MB data set: no C-STORE handler runs, and the file it
    was being written to is removed when the association ends (pynetdicom removes it only after a
    handler)."""
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(incoming))
    scp, recorder = start_scp(FileRecorder(), max_pdu=16384)
    ds = pydicom.dcmread(data_file("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.Rows = ds.Columns = 1024
    ds.PixelData = np.zeros((1024, 1024), np.uint16).tobytes()
    whole = dimse_messages.DIMSEMessage.encode_msg

    def first_five(self, context_id, max_pdu):  # the peer stops sending mid data set
        for number, primitive in enumerate(whole(self, context_id, max_pdu)):
            if number >= 5:
                return
            yield primitive

    monkeypatch.setattr(dimse_messages.DIMSEMessage, "encode_msg", first_five)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.dimse_timeout = 1
    assoc = ae.associate(LOCALHOST, scp.port, ae_title=NODE)
    assert assoc.is_established
    assoc.send_c_store(ds)  # no answer within the DIMSE timeout: the sender aborts
    if assoc.is_established:
        assoc.abort()
    assert wait_until(lambda: recorder.entries("released") != [])
    assert recorder.stores == [] and recorder.files == []
    assert wait_until(lambda: list(incoming.iterdir()) == []), list(incoming.iterdir())


def test_nagle_is_off_on_accepted_sockets_while_storescu_sends_50_objects(start_scp, tmp_path: Path) -> None:
    nodelay: list[int] = []
    scp, recorder = start_scp(extra_handlers=[(evt.EVT_ACCEPTED, record_nodelay, [nodelay])])
    copies_with_new_uids(data_file("MR_small.dcm"), tmp_path / "fifty", 50)

    started = time.monotonic()
    sent = run_tool("storescu", "+sd", "-aec", NODE, LOCALHOST, str(scp.port), str(tmp_path / "fifty"))
    elapsed = time.monotonic() - started

    assert sent.returncode == 0, sent.stderr
    assert len(recorder.stores) == 50 and len({a for a, _, _ in recorder.stores}) == 1
    assert nodelay and all(value != 0 for value in nodelay), f"TCP_NODELAY on the acceptor socket: {nodelay}"
    print(f"storescu -> StorageSCP: 50 objects on one association in {elapsed:.2f} s")


def test_allow_list_by_calling_ae_and_host(start_scp) -> None:
    callers = (AllowedCaller("GOOD"), AllowedCaller("LOCAL", "127.0.0.0/8"), AllowedCaller("REMOTE", "10.0.0.1"))
    scp, recorder = start_scp(allowed_callers=callers)
    port = str(scp.port)

    assert run_tool("echoscu", "-aet", "GOOD", "-aec", NODE, LOCALHOST, port).returncode == 0
    assert run_tool("echoscu", "-aet", "LOCAL", "-aec", NODE, LOCALHOST, port).returncode == 0
    evil = run_tool("echoscu", "-aet", "EVIL", "-aec", NODE, LOCALHOST, port)
    remote = run_tool("echoscu", "-aet", "REMOTE", "-aec", NODE, LOCALHOST, port)

    for refused in (evil, remote):
        assert refused.returncode != 0
        assert "Rejected Permanent" in refused.stderr and "Calling AE Title Not Recognized" in refused.stderr
    assert wait_until(lambda: len(recorder.entries("rejected")) == 2)
    reasons = {entry[1]: entry[3] for entry in recorder.entries("rejected")}
    assert "not in the allow-list" in reasons["EVIL"]
    assert "not allowed from host 127.0.0.1" in reasons["REMOTE"]
    assert [entry[1] for entry in recorder.entries("accepted")] == ["GOOD", "LOCAL"]


def test_associations_beyond_the_limit_are_rejected_transiently(start_scp) -> None:
    scp, recorder = start_scp(max_associations=1)
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    held = ae.associate(LOCALHOST, scp.port, ae_title=NODE)
    try:
        assert held.is_established
        busy = run_tool("echoscu", "-aet", "LATE", "-aec", NODE, LOCALHOST, str(scp.port))
    finally:
        held.release()
    assert busy.returncode != 0 and "Rejected Transient" in busy.stderr
    assert wait_until(lambda: len(recorder.entries("rejected")) == 1)
    assert recorder.entries("rejected")[0][1] == "LATE" and "Local limit exceeded" in recorder.entries("rejected")[0][3]


def test_storescu_sees_out_of_resources(start_scp) -> None:
    scp, _ = start_scp(Recorder(status=Status.OUT_OF_RESOURCES))
    sent = run_tool("storescu", "-v", "-aec", NODE, LOCALHOST, str(scp.port), data_file("CT_small.dcm"))
    assert sent.returncode != 0
    assert "Received Store Response (Refused: OutOfResources)" in sent.stderr


@pytest.mark.parametrize("status", [0x0000, 0xB000, 0xA700, 0xA900, 0xC000, 0x0122])
def test_the_status_on_store_returns_reaches_the_scu_unchanged(start_scp, status: int) -> None:
    scp, _ = start_scp(Recorder(status=status))
    (outcome,) = StoreSCU("SENDER").send(Destination(NODE, LOCALHOST, scp.port), [data_file("CT_small.dcm")])
    assert outcome.status == status
    assert outcome.verdict == classify_store_status(status)


def test_a_failing_store_answers_out_of_resources_and_the_node_keeps_serving(start_scp) -> None:
    recorder = Recorder(error=OSError("disk full"))
    scp, _ = start_scp(recorder)
    destination = Destination(NODE, LOCALHOST, scp.port)

    (failed,) = StoreSCU("SENDER").send(destination, [data_file("CT_small.dcm")])
    assert (failed.status, failed.verdict) == (Status.OUT_OF_RESOURCES, "retry")

    recorder.error = None
    (stored,) = StoreSCU("SENDER").send(destination, [data_file("CT_small.dcm")])
    assert (stored.status, stored.verdict) == (Status.SUCCESS, "delivered")


@pytest.mark.filterwarnings("ignore:Expected explicit VR:UserWarning")  # the recorder parses the junk
def test_bytes_that_are_not_a_dataset_get_cannot_understand(start_scp, tmp_path: Path, monkeypatch) -> None:
    scp, recorder = start_scp(Recorder(understand=True))
    broken = tmp_path / "broken.dcm"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with broken.open("wb") as stream:
        stream.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(stream, meta)
        stream.write(b"this is not a DICOM data set, only text")

    # pynetdicom's chunked mode sends the bytes after the File Meta as they are, undecoded.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(LOCALHOST, scp.port, ae_title=NODE)
    assert assoc.is_established
    try:
        response = assoc.send_c_store(broken)
    finally:
        assoc.release()
    assert response.Status == Status.CANNOT_UNDERSTAND
    assert recorder.stores == []

    (outcome,) = StoreSCU("SENDER").send(Destination(NODE, LOCALHOST, scp.port), [data_file("CT_small.dcm")])
    assert outcome.verdict == "delivered"


def test_every_accepted_transfer_syntax_arrives_as_sent(start_scp) -> None:
    scp, recorder = start_scp()
    paths = [data_file(name) for name in FILES_BY_SYNTAX.values()]

    outcomes = StoreSCU("SENDER").send(Destination(NODE, LOCALHOST, scp.port), paths)

    assert [outcome.verdict for outcome in outcomes] == ["delivered"] * len(paths), outcomes
    received = {(ds.SOPInstanceUID, ds.file_meta.TransferSyntaxUID): ds for ds in recorder.datasets()}
    for syntax, path in zip(FILES_BY_SYNTAX, paths):
        original = pydicom.dcmread(path)
        copy = received[(original.SOPInstanceUID, syntax)]
        assert copy.PixelData == original.PixelData, path
    assert len({association_id for association_id, _, _ in recorder.stores}) == 1


# --------------------------------------------------------------------------- send: the SCU into DCMTK


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """DCMTK storescp as DEST on a free port, writing what it receives to a folder."""
    folder = tmp_path / "storescp"
    folder.mkdir()
    port = free_port()
    process = subprocess.Popen(
        [require_dcmtk("storescp"), "-aet", "DEST", "--output-directory", str(folder), "+xa", str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        listening = wait_until(
            lambda: (
                process.poll() is not None
                or run_tool("echoscu", "-to", "1", "-aec", "DEST", LOCALHOST, str(port)).returncode == 0
            ),
            timeout=10,
        )
        if process.poll() is not None or not listening:
            pytest.fail(f"storescp did not start on port {port}: {process.stderr.read() if process.stderr else ''}")
        yield port, folder
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_scu_delivers_files_and_datasets_to_dcmtk_storescp(storescp) -> None:
    port, folder = storescp
    nodelay: list[int] = []
    in_memory = pydicom.dcmread(data_file("MR_small.dcm"))
    in_memory.SOPInstanceUID = generate_uid()  # MR_small and its JPEG 2000 twin share their UIDs
    sources = [data_file("CT_small.dcm"), in_memory, Path(data_file("MR_small_jp2klossless.dcm"))]
    scu = StoreSCU("PACSXAI", extra_handlers=[(evt.EVT_ACCEPTED, record_nodelay, [nodelay])])

    outcomes = scu.send(Destination("DEST", LOCALHOST, port), sources)

    assert [(o.verdict, o.status) for o in outcomes] == [("delivered", 0)] * 3, outcomes
    assert nodelay and all(value != 0 for value in nodelay), f"TCP_NODELAY on the requestor socket: {nodelay}"
    received = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(path) for path in folder.iterdir())}
    for source in sources:
        original = source if isinstance(source, pydicom.Dataset) else pydicom.dcmread(source)
        assert outcomes[sources.index(source)].sop_instance_uid == original.SOPInstanceUID
        assert received[original.SOPInstanceUID].PixelData == original.PixelData


def test_scu_echo(storescp, start_scp) -> None:
    port, _ = storescp
    scp, _ = start_scp()
    assert StoreSCU().echo(Destination("DEST", LOCALHOST, port))
    assert StoreSCU().echo(Destination(NODE, LOCALHOST, scp.port))
    assert not StoreSCU().echo(Destination("SOMEONEELSE", LOCALHOST, scp.port))


def test_nobody_listening_means_retry() -> None:
    port = free_port()
    outcomes = StoreSCU().send(Destination("DEST", LOCALHOST, port), [data_file("CT_small.dcm")] * 2)
    assert [(o.verdict, o.status) for o in outcomes] == [("retry", None)] * 2
    assert "could not connect" in outcomes[0].detail


def test_a_rejected_association_means_retry_with_the_reason(start_scp) -> None:
    scp, _ = start_scp(allowed_callers=(AllowedCaller("OTHER"),))
    (outcome,) = StoreSCU("PACSXAI").send(Destination(NODE, LOCALHOST, scp.port), [data_file("CT_small.dcm")])
    assert (outcome.verdict, outcome.status) == ("retry", None)
    assert "rejected" in outcome.detail and "Calling AE title not recognised" in outcome.detail


def test_a_refused_sop_class_or_syntax_is_rejected_at_once() -> None:
    """A destination that takes CT only, and MR only uncompressed: the others are dead letters."""
    ae = AE(ae_title="CTONLY")
    ae.add_supported_context(CTImageStorage)
    ae.add_supported_context(MRImageStorage, ExplicitVRLittleEndian)
    server = ae.start_server((LOCALHOST, 0), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
    try:
        port = server.server_address[1]
        sources = [data_file("CT_small.dcm"), data_file("MR_small_jp2klossless.dcm"), data_file("JPEG2000.dcm")]
        outcomes = StoreSCU().send(Destination("CTONLY", LOCALHOST, port), sources)
    finally:
        server.shutdown()

    assert [o.verdict for o in outcomes] == ["delivered", "reject", "reject"], outcomes
    assert "refused transfer syntax JPEG 2000 Image Compression (Lossless Only)" in outcomes[1].detail
    assert "MR Image Storage" in outcomes[1].detail
    assert "refused SOP class Secondary Capture Image Storage" in outcomes[2].detail


def test_a_file_that_is_not_dicom_is_rejected_without_sending(tmp_path: Path, start_scp) -> None:
    scp, recorder = start_scp()
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    outcomes = StoreSCU().send(Destination(NODE, LOCALHOST, scp.port), [junk, data_file("CT_small.dcm")])
    assert [o.verdict for o in outcomes] == ["reject", "delivered"]
    assert "junk.dcm" in outcomes[0].detail and len(recorder.stores) == 1


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A test CA and two certificates it signs (server for 127.0.0.1/localhost, client), EC P-256."""
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_tls_store_and_nodelay_on_the_tls_socket(start_scp, pki: Pki) -> None:
    nodelay: list[int] = []
    scp, recorder = start_scp(
        tls=TlsFiles(pki.server_certificate, pki.server_key),
        extra_handlers=[(evt.EVT_ACCEPTED, record_nodelay, [nodelay])],
    )
    destination = Destination(NODE, LOCALHOST, scp.port, tls_ca=pki.ca)

    (outcome,) = StoreSCU().send(destination, [data_file("CT_small.dcm")])

    assert outcome.verdict == "delivered", outcome
    assert nodelay and all(value != 0 for value in nodelay), f"TCP_NODELAY on the TLS socket: {nodelay}"
    assert StoreSCU().echo(destination)
    # Without TLS the node does not answer DICOM on its TLS port.
    assert not StoreSCU(acse_timeout=5).echo(Destination(NODE, LOCALHOST, scp.port))


def test_mutual_tls_refuses_clients_without_a_certificate(start_scp, pki: Pki) -> None:
    scp, recorder = start_scp(tls=TlsFiles(pki.server_certificate, pki.server_key, client_ca=pki.ca))
    anonymous = Destination(NODE, LOCALHOST, scp.port, tls_ca=pki.ca)
    with_certificate = Destination(
        NODE, LOCALHOST, scp.port, tls_ca=pki.ca, tls_certificate=pki.client_certificate, tls_key=pki.client_key
    )

    (refused,) = StoreSCU().send(anonymous, [data_file("CT_small.dcm")])
    assert (refused.verdict, refused.status) == ("retry", None)
    assert wait_until(lambda: any("TLS handshake failed" in entry[3] for entry in recorder.entries("rejected")))

    (delivered,) = StoreSCU().send(with_certificate, [data_file("CT_small.dcm")])
    assert delivered.verdict == "delivered", delivered
    assert len(recorder.stores) == 1


def test_mutual_tls_with_dcmtk(start_scp, pki: Pki) -> None:
    scp, _ = start_scp(tls=TlsFiles(pki.server_certificate, pki.server_key, client_ca=pki.ca))
    port = str(scp.port)
    trust = ("+cf", str(pki.ca))
    client = ("+tls", str(pki.client_key), str(pki.client_certificate))
    assert run_tool("echoscu", *client, *trust, "-aec", NODE, LOCALHOST, port).returncode == 0
    stored = run_tool("storescu", *client, *trust, "-aec", NODE, LOCALHOST, port, data_file("CT_small.dcm"))
    assert stored.returncode == 0, stored.stderr
    assert run_tool("echoscu", "+tla", *trust, "-aec", NODE, LOCALHOST, port).returncode != 0


def test_a_silent_tls_client_does_not_hold_up_other_callers(start_scp, pki: Pki) -> None:
    scp, _ = start_scp(tls=TlsFiles(pki.server_certificate, pki.server_key))
    with socket.create_connection((LOCALHOST, scp.port)):  # connects, never says a word
        time.sleep(0.1)
        assert StoreSCU(acse_timeout=5).echo(Destination(NODE, LOCALHOST, scp.port, tls_ca=pki.ca))


def test_more_than_128_contexts_use_several_associations(start_scp) -> None:
    scp, recorder = start_scp()
    datasets = []
    for context in AllStoragePresentationContexts[:130]:  # 130 SOP classes: 130 contexts
        dataset = pydicom.Dataset()
        dataset.SOPClassUID = context.abstract_syntax
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta = FileMetaDataset()
        dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        datasets.append(dataset)

    outcomes = StoreSCU().send(Destination(NODE, LOCALHOST, scp.port), datasets)

    assert [o.sop_instance_uid for o in outcomes] == [d.SOPInstanceUID for d in datasets]
    assert {o.verdict for o in outcomes} == {"delivered"}
    assert len({association_id for association_id, _, _ in recorder.stores}) == 2


def test_listeners_with_reuse_port_share_one_port_and_both_serve(start_scp) -> None:
    """SO_REUSEPORT (a node's receiver processes): a second listener binds the same port only when
    both ask for it, and the kernel hands connections to both."""
    first, first_recorder = start_scp(reuse_port=True)
    with pytest.raises(OSError):
        start_scp(port=first.port)  # without SO_REUSEPORT the port is taken
    second, second_recorder = start_scp(port=first.port, reuse_port=True)
    assert second.port == first.port
    for _ in range(24):  # connections are spread by a hash of the peer's port: 24 all on one side is 2^-23
        assert StoreSCU("MODALITY").echo(Destination(NODE, LOCALHOST, first.port))
        if first_recorder.entries("accepted") and second_recorder.entries("accepted"):
            break
    assert first_recorder.entries("accepted") and second_recorder.entries("accepted")


# --------------------------------------------------------------------------- lossless compression


def _jpeg_ls_copy(folder: Path) -> tuple[Path, pydicom.Dataset]:
    """An RGB Secondary Capture stored JPEG-LS lossless, and the uncompressed original."""
    original = pydicom.dcmread(data_file("SC_rgb.dcm"))
    compressed = pydicom.dcmread(data_file("SC_rgb.dcm"))
    assert compress_pixels(compressed, [JPEGLSLossless]) == JPEGLSLossless
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sc-jls.dcm"
    compressed.save_as(path, enforce_file_format=True)
    return path, original


def _received_syntax(encoded: bytes) -> UID:
    return pydicom.dcmread(io.BytesIO(encoded)).file_meta.TransferSyntaxUID


def test_a_destination_that_takes_jpeg_ls_gets_the_stored_bytes(start_scp, tmp_path: Path) -> None:
    path, original = _jpeg_ls_copy(tmp_path)
    scp, recorder = start_scp()
    destination = Destination(
        NODE, LOCALHOST, scp.port, transfer_syntaxes=(JPEGLSLossless, DeflatedExplicitVRLittleEndian)
    )
    (outcome,) = StoreSCU().send(destination, [path])
    assert outcome.verdict == "delivered", outcome
    ((_, _, encoded),) = recorder.stores
    assert _received_syntax(encoded) == JPEGLSLossless
    received = pydicom.dcmread(io.BytesIO(encoded))
    assert received.SOPInstanceUID == original.SOPInstanceUID
    assert np.array_equal(received.pixel_array, original.pixel_array)


def test_a_deflated_file_goes_out_as_stored_not_deflated_again(start_scp, tmp_path: Path) -> None:
    """A deflated file whose syntax the destination accepts is sent byte for byte: its data set is
    not inflated and deflated again (at zlib's default level, which would give other bytes)."""
    original = pydicom.dcmread(data_file("SC_rgb.dcm"))
    original.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    plain = DicomBytesIO()
    plain.is_little_endian, plain.is_implicit_VR = True, False
    write_dataset(plain, original)  # the data set alone, explicit VR little endian
    deflater = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)  # level 1: not what pydicom uses
    dataset_bytes = deflater.compress(plain.getvalue()) + deflater.flush()
    path = tmp_path / "sc-deflated-level-1.dcm"
    with path.open("wb") as handle:
        handle.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(handle, original.file_meta, enforce_standard=True)
        handle.write(dataset_bytes)
    scp, recorder = start_scp()
    destination = Destination(NODE, LOCALHOST, scp.port, transfer_syntaxes=(DeflatedExplicitVRLittleEndian,))
    (outcome,) = StoreSCU().send(destination, [path])
    assert outcome.verdict == "delivered", outcome
    ((_, _, encoded),) = recorder.stores
    assert encoded.endswith(dataset_bytes)
    assert np.array_equal(pydicom.dcmread(io.BytesIO(encoded)).pixel_array, original.pixel_array)


def test_deflated_then_uncompressed_when_the_destination_refuses_jpeg_ls(tmp_path: Path) -> None:
    """A pynetdicom SCP that takes Secondary Capture deflated or uncompressed, then DCMTK storescp
    with its defaults (uncompressed only): the JPEG-LS object is decoded here and arrives whole."""
    path, original = _jpeg_ls_copy(tmp_path)
    syntaxes = (JPEGLSLossless, DeflatedExplicitVRLittleEndian)
    seen: list[tuple[UID, bytes]] = []

    def keep(event: Event) -> int:
        seen.append((UID(event.context.transfer_syntax), event.dataset_path.read_bytes()))  # chunked receive
        return 0x0000

    ae = AE(ae_title="DEFLATE")
    ae.add_supported_context(SecondaryCaptureImageStorage, [DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian])
    server = ae.start_server((LOCALHOST, 0), block=False, evt_handlers=[(evt.EVT_C_STORE, keep)])
    try:
        destination = Destination("DEFLATE", LOCALHOST, server.server_address[1], transfer_syntaxes=syntaxes)
        (outcome,) = StoreSCU().send(destination, [path])
    finally:
        server.shutdown()
    assert outcome.verdict == "delivered", outcome
    ((context_syntax, encoded),) = seen
    assert context_syntax == DeflatedExplicitVRLittleEndian
    received = pydicom.dcmread(io.BytesIO(encoded))
    assert received.SOPInstanceUID == original.SOPInstanceUID, "decoding must not make a new instance"
    assert np.array_equal(received.pixel_array, original.pixel_array)

    folder = tmp_path / "storescp"
    folder.mkdir()
    port = free_port()
    process = subprocess.Popen(
        [require_dcmtk("storescp"), "-aet", "DEST", "-od", str(folder), str(port)], env=DCMTK_ENV
    )
    try:
        assert wait_until(
            lambda: run_tool("echoscu", "-to", "1", "-aec", "DEST", LOCALHOST, str(port)).returncode == 0, 10
        )
        (outcome,) = StoreSCU().send(Destination("DEST", LOCALHOST, port, transfer_syntaxes=syntaxes), [path])
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert outcome.verdict == "delivered", outcome
    (stored,) = [pydicom.dcmread(p) for p in folder.iterdir()]
    assert not stored.file_meta.TransferSyntaxUID.is_compressed
    assert stored.SOPInstanceUID == original.SOPInstanceUID
    assert np.array_equal(stored.pixel_array, original.pixel_array)


def test_without_lossless_syntaxes_a_compressed_object_is_never_transcoded(start_scp, tmp_path: Path) -> None:
    path, _ = _jpeg_ls_copy(tmp_path)
    ae = AE(ae_title="PLAIN")
    ae.add_supported_context(SecondaryCaptureImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    server = ae.start_server((LOCALHOST, 0), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
    try:
        (outcome,) = StoreSCU().send(Destination("PLAIN", LOCALHOST, server.server_address[1]), [path])
    finally:
        server.shutdown()
    assert outcome.verdict == "reject" and "refused transfer syntax JPEG-LS" in outcome.detail


class SlowToAccept(Recorder):
    """A Recorder whose acceptance report takes a while (a journal write waiting for its lock)."""

    def on_association_accepted(self, calling_ae: str, host: str, association_id: str) -> None:
        time.sleep(0.3)
        super().on_association_accepted(calling_ae, host, association_id)


def test_a_connection_closed_at_once_reports_its_end_after_its_acceptance(start_scp) -> None:
    """A caller that sends an A-ASSOCIATE-RQ and closes at once: the end (seen on another thread)
    used to be reported while the acceptance report was still running, so the journal's
    ``associations`` row was written after its end and stayed open for good (found by the torture
    suite against the many-process node)."""
    scp, recorder = start_scp(SlowToAccept())
    for _ in range(3):
        with socket.create_connection((LOCALHOST, scp.port)) as sock:
            sock.sendall(associate_rq(called=NODE))
    assert wait_until(lambda: len(recorder.entries("released")) == 3, 10), recorder.log
    order = [(entry[0], entry[-1] if entry[0] == "accepted" else entry[1]) for entry in recorder.log]
    for kind, association_id in order:
        if kind == "released":
            assert order.index(("accepted", association_id)) < order.index((kind, association_id)), order
