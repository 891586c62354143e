"""The receiver: what a C-STORE's bytes become (spool file + journal row, quarantine, or a refusal)
and the status answered. Real pydicom test files, a real spool and journal in tmp_path."""

from __future__ import annotations

import logging
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian

from dicom_io.net.network import Status
from service.node.assembler import Assembler, SeriesKey
from service.node.metrics import NodeMetrics
from service.node.receiver import Receiver
from service.node.store import Journal, ReceivedInstance, Spool
from tests.helpers import data_file
from tests.unit.service.node.helpers import FakeClock, sample

# pydicom reads text after a File Meta leniently, warning about it; the receiver still refuses it.
pytestmark = pytest.mark.filterwarnings("ignore:Expected explicit VR:UserWarning")

IDLE_SECONDS = 5.0


@pytest.fixture()
def assembler_clock() -> FakeClock:
    return FakeClock(100.0)  # monotonic seconds


@pytest.fixture()
def assembler(assembler_clock: FakeClock) -> Assembler:
    return Assembler(idle_seconds=IDLE_SECONDS, max_wait_seconds=60.0, clock=assembler_clock)


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)  # Unix time


@pytest.fixture()
def receiver(spool: Spool, journal: Journal, assembler: Assembler, metrics: NodeMetrics, clock: FakeClock) -> Receiver:
    return Receiver(spool, journal, assembler, metrics, clock=clock)


def _ct_small() -> tuple[bytes, pydicom.Dataset]:
    path = data_file("CT_small.dcm")
    return Path(path).read_bytes(), pydicom.dcmread(path)


def _without(keyword: str) -> bytes:
    """CT_small re-encoded without one of the UIDs an instance needs."""
    ds = pydicom.dcmread(data_file("CT_small.dcm"))
    delattr(ds, keyword)
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _file_meta_then(payload: bytes) -> bytes:
    """A valid preamble and File Meta, then ``payload`` where the data set should be."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.10.999.77"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = BytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta)
    buffer.write(payload)
    return buffer.getvalue()


def test_a_valid_dataset_is_spooled_journaled_handed_to_the_assembler_and_counted(
    receiver: Receiver,
    spool: Spool,
    journal: Journal,
    assembler: Assembler,
    assembler_clock: FakeClock,
    metrics: NodeMetrics,
    clock: FakeClock,
) -> None:
    encoded, ds = _ct_small()
    receiver.on_association_accepted("MODALITY", "127.0.0.1", "assoc-1")
    assert receiver.on_store(encoded, calling_ae="MODALITY", association_id="assoc-1") == Status.SUCCESS

    path = spool.instances_dir / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert path.read_bytes() == encoded, "the spool keeps the bytes exactly as received"
    assert journal.pending_instances() == [
        ReceivedInstance(
            sop_instance_uid=ds.SOPInstanceUID,
            sop_class_uid=ds.SOPClassUID,
            study_instance_uid=ds.StudyInstanceUID,
            series_instance_uid=ds.SeriesInstanceUID,
            path=path,
            calling_ae="MODALITY",
            association_id="assoc-1",
            received_at=clock.now,
        )
    ]
    # The assembler was told: the series is ready once its association ended and it stayed idle.
    assert assembler.pending() == 1
    receiver.on_association_released("assoc-1")
    assembler_clock.now += IDLE_SECONDS
    assert assembler.take_ready() == [(SeriesKey(ds.StudyInstanceUID, ds.SeriesInstanceUID), [ds.SOPInstanceUID])]

    assert sample(metrics, "pacsxai_instances_received_total", outcome="stored") == 1
    assert sample(metrics, "pacsxai_associations_total", outcome="accepted") == 1
    assert sample(metrics, "pacsxai_stage_seconds_count", stage="receive") == 1
    assert sample(metrics, "pacsxai_stage_seconds_count", stage="spool") == 1
    assert sample(metrics, "pacsxai_last_instance_received_timestamp_seconds") == clock.now


@pytest.mark.parametrize(
    ("encoded", "reason"),
    [
        (b"this is not DICOM at all", "cannot parse the dataset"),
        (_file_meta_then(b"this is not a DICOM data set, only text"), "SOPClassUID is missing"),
        (_without("SeriesInstanceUID"), "SeriesInstanceUID is missing"),
        (_without("SOPClassUID"), "SOPClassUID is missing"),
    ],
    ids=["not-dicom", "garbage-after-file-meta", "no-series-uid", "no-sop-class"],
)
def test_bytes_that_are_not_a_usable_dataset_are_quarantined_with_the_reason(
    receiver: Receiver, journal: Journal, assembler: Assembler, metrics: NodeMetrics, encoded: bytes, reason: str
) -> None:
    status = receiver.on_store(encoded, calling_ae="MODALITY", association_id="assoc-9")
    assert status == Status.CANNOT_UNDERSTAND == 0xC000
    (entry,) = journal.quarantine.entries()
    assert reason in entry.reason, entry.reason
    assert entry.path.read_bytes() == encoded, "the quarantine keeps the bytes exactly as received"
    assert (entry.calling_ae, entry.association_id) == ("MODALITY", "assoc-9")
    assert journal.pending_instances() == [] and assembler.pending() == 0
    assert sample(metrics, "pacsxai_instances_received_total", outcome="quarantined") == 1
    assert sample(metrics, "pacsxai_instances_received_total", outcome="stored") == 0


@pytest.mark.parametrize("failing", ["spool", "journal", "quarantine"])
def test_a_storage_failure_is_answered_out_of_resources_never_success(
    receiver: Receiver,
    spool: Spool,
    journal: Journal,
    tmp_path: Path,
    assembler: Assembler,
    metrics: NodeMetrics,
    failing: str,
) -> None:
    encoded, ds = _ct_small()
    if failing == "spool":  # a regular file where the study's folder must go (fails even for root)
        (spool.instances_dir / ds.StudyInstanceUID).write_bytes(b"in the way")
    elif failing == "journal":
        journal.close()
    else:  # the quarantine folder is a file: not even the unreadable bytes can be kept
        spool.quarantine_dir.rmdir()
        spool.quarantine_dir.write_bytes(b"in the way")
        encoded = b"not DICOM"

    assert receiver.on_store(encoded, calling_ae="MODALITY", association_id="assoc-1") == Status.OUT_OF_RESOURCES
    assert assembler.pending() == 0, "nothing unstored may be processed"
    assert sample(metrics, "pacsxai_instances_received_total", outcome="refused") == 1
    assert sample(metrics, "pacsxai_last_instance_received_timestamp_seconds") == 0
    if failing != "journal":
        with Journal(tmp_path / "journal.sqlite") as reopened:
            assert reopened.counts()["instances_received"] == 0 and reopened.quarantine.entries() == []


def test_no_patient_name_or_id_in_the_logs(receiver: Receiver, spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    encoded, ds = _ct_small()
    mr = pydicom.dcmread(data_file("MR_small.dcm"))
    mr_blocked = Path(data_file("MR_small.dcm")).read_bytes()
    (spool.instances_dir / mr.StudyInstanceUID).write_bytes(b"in the way")
    with caplog.at_level(logging.DEBUG, logger="service.node.receiver"):
        receiver.on_association_accepted("MODALITY", "127.0.0.1", "assoc-1")
        assert receiver.on_store(encoded, calling_ae="MODALITY", association_id="assoc-1") == Status.SUCCESS
        assert receiver.on_store(mr_blocked, calling_ae="MODALITY", association_id="assoc-1") != Status.SUCCESS
        assert receiver.on_store(_without("SOPClassUID"), calling_ae="MODALITY", association_id="assoc-1") != 0
        receiver.on_association_released("assoc-1")
        receiver.on_association_rejected("EVIL", "10.0.0.9", "calling AE title not recognised")
    text = caplog.text
    assert "stored instance" in text and "could not store" in text and "quarantined" in text  # the logs were written
    for ds_ in (ds, mr):
        for secret in (str(ds_.PatientName), *str(ds_.PatientName).split("^"), str(ds_.PatientID)):
            assert secret not in text, f"{secret!r} (patient name or ID) in the log"


def test_a_data_set_received_into_a_file_is_moved_into_the_spool_and_journaled(
    receiver: Receiver, spool: Spool, journal: Journal, tmp_path: Path
) -> None:
    """What the listener wrote while the data set arrived becomes the spool file: the same
    bytes, no second copy left behind."""
    encoded, ds = _ct_small()
    incoming = tmp_path / "incoming.dcm"
    incoming.write_bytes(encoded)
    assert receiver.on_store_file(incoming, calling_ae="MODALITY", association_id="assoc-1") == Status.SUCCESS
    path = spool.instances_dir / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert path.read_bytes() == encoded
    assert not incoming.exists()
    assert [row.sop_instance_uid for row in journal.pending_instances()] == [ds.SOPInstanceUID]


def test_a_file_that_is_no_data_set_is_moved_into_quarantine(receiver: Receiver, spool: Spool, tmp_path: Path) -> None:
    incoming = tmp_path / "incoming.dcm"
    garbage = _file_meta_then(b"this is text, not a data set")
    incoming.write_bytes(garbage)
    status = receiver.on_store_file(incoming, calling_ae="MODALITY", association_id="assoc-1")
    assert status == Status.CANNOT_UNDERSTAND
    (kept,) = spool.quarantine_dir.iterdir()
    assert kept.read_bytes() == garbage
    assert not incoming.exists()
