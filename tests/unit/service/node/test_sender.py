"""The outbox sender: due outputs go over real DICOM associations, each verdict is journaled.

Destinations are real: the node's own Storage SCP (dicom_io.net.scp) on a loopback port, a
pynetdicom AE that supports CT only, and a port where nobody listens. The outputs are pydicom's
CT_small and MR_small test files in a real spool and journal.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification

from dicom_io.net.network import Status, free_port
from dicom_io.net.scp import ListenerSettings, StorageSCP
from dicom_io.net.scu import Destination, StoreSCU
from service.node.config import SendConfig
from service.node.metrics import NodeMetrics
from service.node.sender import STORE_RETRY_SECONDS, OutboxSender
from service.node.store import Journal, OutboxEntry, Spool, StoreError
from tests.helpers import data_file
from tests.unit.service.node.helpers import FakeClock, sample

CT_SMALL, MR_SMALL = "CT_small.dcm", "MR_small.dcm"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
#: Doubling from 1 s, far below the cap: a retry waits 2, 4, 8 ... s at the top of the jitter range.
POLICY = SendConfig(base_delay_seconds=1.0, max_delay_seconds=1_000.0, max_attempts=4)


class TopOfTheJitterRange(random.Random):
    """A generator that always draws the top of the range, so each retry delay is exactly its cap."""

    def random(self) -> float:
        return 1.0


class Recorder:
    """StorageEvents for the destination SCP: keeps each object received and answers Success."""

    def __init__(self) -> None:
        self.received: list[pydicom.Dataset] = []
        self._lock = threading.Lock()

    def on_store(self, encoded: bytes, *, calling_ae: str, association_id: str) -> int:
        with self._lock:
            self.received.append(pydicom.dcmread(BytesIO(encoded)))
        return Status.SUCCESS

    def on_association_accepted(self, calling_ae: str, host: str, association_id: str) -> None:
        pass

    def on_association_released(self, association_id: str) -> None:
        pass

    def on_association_rejected(self, calling_ae: str, host: str, reason: str) -> None:
        pass


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


@pytest.fixture()
def journal(tmp_path: Path, clock: FakeClock) -> Iterator[Journal]:
    """The journal on the sender's clock, so due times and retries are the test's to move."""
    with Journal(tmp_path / "journal.sqlite", clock=clock) as opened:
        yield opened


@pytest.fixture()
def recorder() -> Iterator[tuple[Recorder, int]]:
    """The node's own Storage SCP as the destination DEST; yields what it received and its port."""
    events = Recorder()
    scp = StorageSCP(ListenerSettings(ae_title="DEST", port=0), events)
    scp.start()
    yield events, scp.port
    scp.stop()


def _sender(
    journal: Journal, metrics: NodeMetrics, clock: FakeClock, destinations: dict[str, Destination]
) -> OutboxSender:
    return OutboxSender(
        journal, StoreSCU("PACSXAI"), destinations, POLICY, metrics, clock=clock, rng=TopOfTheJitterRange()
    )


def _queue(spool: Spool, journal: Journal, name: str, destination: str) -> str:
    """Put a pydicom test file into the spool's outbox for ``destination``; returns its SOP Instance UID."""
    encoded = Path(data_file(name)).read_bytes()
    uid = str(pydicom.dcmread(BytesIO(encoded), stop_before_pixels=True).SOPInstanceUID)
    path = spool.write_output(encoded, sop_uid=uid)
    journal.outbox.add(
        sop_instance_uid=uid,
        source_sop_instance_uid=uid,
        destination=destination,
        path=path,
        kind="sc",
        method="gradcam",
    )
    return uid


def _entry(journal: Journal, uid: str) -> OutboxEntry:
    (entry,) = [e for e in journal.outbox.entries(("pending", "sent", "dead")) if e.sop_instance_uid == uid]
    return entry


def test_due_outputs_are_delivered_to_a_real_scp_and_marked_sent(
    recorder: tuple[Recorder, int], spool: Spool, journal: Journal, metrics: NodeMetrics, clock: FakeClock
) -> None:
    events, port = recorder
    uids = [_queue(spool, journal, name, "dest") for name in (CT_SMALL, MR_SMALL)]
    sender = _sender(journal, metrics, clock, {"dest": Destination("DEST", "127.0.0.1", port)})

    assert sender.send_due() == {"sent": 2, "retry": 0, "dead": 0}

    assert sorted(str(ds.SOPInstanceUID) for ds in events.received) == sorted(uids)
    for uid, name in zip(uids, (CT_SMALL, MR_SMALL)):
        sent = next(ds for ds in events.received if ds.SOPInstanceUID == uid)
        assert sent.PixelData == pydicom.dcmread(data_file(name)).PixelData, f"{name} arrived changed"
        entry = _entry(journal, uid)
        assert (entry.state, entry.attempts, entry.last_error) == ("sent", 1, "")
    assert sample(metrics, "pacsxai_outputs_total", destination="dest", outcome="sent") == 2
    assert sample(metrics, "pacsxai_stage_seconds_count", stage="send") == 1

    clock.now += 3_600
    assert sender.send_due() == {"sent": 0, "retry": 0, "dead": 0}, "a sent output is never sent again"
    assert len(events.received) == 2


def test_nobody_listening_schedules_retries_with_a_growing_delay_then_the_dead_letter(
    spool: Spool, journal: Journal, metrics: NodeMetrics, clock: FakeClock
) -> None:
    uid = _queue(spool, journal, CT_SMALL, "away")
    sender = _sender(journal, metrics, clock, {"away": Destination("DEST", "127.0.0.1", free_port())})

    delays = []
    for attempt in range(1, POLICY.max_attempts):
        assert sender.send_due() == {"sent": 0, "retry": 1, "dead": 0}
        entry = _entry(journal, uid)
        assert (entry.state, entry.attempts) == ("pending", attempt)
        assert "could not connect" in entry.last_error, entry.last_error
        delays.append(entry.next_attempt_at - clock.now)
        clock.now = entry.next_attempt_at - 0.001
        assert sender.send_due() == {"sent": 0, "retry": 0, "dead": 0}, "not due before its delay passed"
        clock.now = entry.next_attempt_at
    assert delays == [2.0, 4.0, 8.0]

    assert sender.send_due() == {"sent": 0, "retry": 0, "dead": 1}
    entry = _entry(journal, uid)
    assert (entry.state, entry.attempts) == ("dead", POLICY.max_attempts)
    assert entry.last_error.startswith(f"gave up after {POLICY.max_attempts} attempts: could not connect")
    assert sample(metrics, "pacsxai_outputs_total", destination="away", outcome="retry") == 3
    assert sample(metrics, "pacsxai_outputs_total", destination="away", outcome="dead") == 1


def test_a_destination_that_refuses_the_sop_class_dead_letters_it_at_once_with_the_reason(
    spool: Spool, journal: Journal, metrics: NodeMetrics, clock: FakeClock
) -> None:
    received: list[str] = []

    def store(event: evt.Event) -> int:
        received.append(str(event.dataset.SOPInstanceUID))
        return Status.SUCCESS

    ae = AE(ae_title="CTONLY")
    ae.add_supported_context(CTImageStorage)
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])
    try:
        ct, mr = _queue(spool, journal, CT_SMALL, "ctonly"), _queue(spool, journal, MR_SMALL, "ctonly")
        port = server.server_address[1]
        sender = _sender(journal, metrics, clock, {"ctonly": Destination("CTONLY", "127.0.0.1", port)})

        assert sender.send_due() == {"sent": 1, "retry": 0, "dead": 1}
    finally:
        server.shutdown()
    assert received == [ct], "the CT on the same association still goes"
    refused = _entry(journal, mr)
    assert (refused.state, refused.attempts) == ("dead", 1), "a refused SOP class is never retried"
    assert f"refused SOP class MR Image Storage ({MR_IMAGE_STORAGE})" in refused.last_error, refused.last_error
    assert _entry(journal, ct).state == "sent"
    clock.now += 3_600
    assert sender.send_due() == {"sent": 0, "retry": 0, "dead": 0}
    assert sample(metrics, "pacsxai_outputs_total", destination="ctonly", outcome="dead") == 1


def test_an_output_for_a_destination_no_longer_configured_is_dead_lettered_naming_it(
    spool: Spool, journal: Journal, metrics: NodeMetrics, clock: FakeClock
) -> None:
    uid = _queue(spool, journal, CT_SMALL, "retired")
    sender = _sender(journal, metrics, clock, {})

    assert sender.send_due() == {"sent": 0, "retry": 0, "dead": 1}
    entry = _entry(journal, uid)
    assert (entry.state, entry.last_error) == ("dead", "destination 'retired' is not configured")
    assert sample(metrics, "pacsxai_outputs_total", destination="retired", outcome="dead") == 1


def test_a_journal_that_cannot_be_written_pauses_the_pass_and_the_next_one_resends(
    spool: Spool,
    journal: Journal,
    metrics: NodeMetrics,
    clock: FakeClock,
    recorder: tuple[Recorder, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A full disk while sending (the destination accepted the object, ``sent`` could not be
    journaled): the pass stops with the error logged and a wait, instead of ending the sending loop;
    the next pass sends the object again, with the same UID, and records it."""
    events, port = recorder
    uid = _queue(spool, journal, CT_SMALL, "dest")
    sender = _sender(journal, metrics, clock, {"dest": Destination("DEST", "127.0.0.1", port)})

    def full(*args: object, **kwargs: object) -> None:
        raise StoreError("journal: database or disk is full")

    waits: list[float] = []
    with monkeypatch.context() as patch:
        patch.setattr(journal.outbox, "mark_sent", full)
        assert sender.send_pass(waits.append) == {}
    assert waits == [STORE_RETRY_SECONDS] and _entry(journal, uid).state == "pending"
    assert sender.send_pass(waits.append) == {"sent": 1, "retry": 0, "dead": 0}
    assert _entry(journal, uid).state == "sent" and len(waits) == 1
    assert [str(ds.SOPInstanceUID) for ds in events.received] == [uid, uid]
