"""What the node does with each received instance: parse, spool, journal, then answer.

The answer to a C-STORE is decided here, and Success is only ever returned after the bytes are
in the spool (fsync'ed) and the journal row is committed:

- bytes that do not parse as a DICOM dataset with the four UIDs an instance needs are kept in
  quarantine with the reason, and answered 0xC000 "cannot understand";
- a spool or journal failure is answered 0xA700 "out of resources" (the sender retries later);
- otherwise 0x0000 Success, and the instance is handed to the assembler.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.uid import UID

from dicom_io.faults import fault_point
from dicom_io.net.network import Status
from service.node.assembler import Assembler, JournalAssembly, SeriesKey
from service.node.metrics import NodeMetrics
from service.node.store import Journal, ReceivedInstance, Spool, StoreError

log = logging.getLogger(__name__)

_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


class UnusableInstanceError(ValueError):
    """The received bytes are not a dataset the node can keep; the message is the reason."""


class Receiver:
    """The node's :class:`dicom_io.net.scp.StorageEvents`: dependencies are passed in, nothing global."""

    def __init__(
        self,
        spool: Spool,
        journal: Journal,
        assembler: Assembler | JournalAssembly,
        metrics: NodeMetrics,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._spool = spool
        self._journal = journal
        self._assembler = assembler
        self._metrics = metrics
        self._clock = clock

    def on_store(self, encoded: bytes, *, calling_ae: str, association_id: str) -> int:
        """Keep a data set given as Part 10 bytes."""
        return self._received(encoded, calling_ae, association_id)

    def on_store_file(self, path: Path, *, calling_ae: str, association_id: str) -> int:
        """Keep a data set the listener wrote to ``path`` as it arrived: the file is moved into
        the spool (or quarantine), never read whole into memory."""
        return self._received(path, calling_ae, association_id)

    def _received(self, encoded: bytes | Path, calling_ae: str, association_id: str) -> int:
        with self._metrics.stage_seconds.labels("receive").time():
            status = self._store(encoded, calling_ae, association_id)
        outcome = {Status.SUCCESS: "stored", Status.CANNOT_UNDERSTAND: "quarantined"}.get(status, "refused")
        self._metrics.instances_received.labels(outcome).inc()
        if status == Status.SUCCESS:
            self._metrics.last_received.set(self._clock())
        return status

    def _store(self, encoded: bytes | Path, calling_ae: str, association_id: str) -> int:
        try:
            instance_uids = parse_instance_uids(encoded)
        except UnusableInstanceError as exc:
            return self._quarantine(encoded, str(exc), calling_ae, association_id)
        sop_class, sop_uid, study_uid, series_uid = instance_uids
        path: Path | None = None
        try:
            with self._metrics.stage_seconds.labels("spool").time():
                path = self._spool.write_instance(encoded, study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid)
                fault_point("after-spool-write")
                self._journal.record_received(
                    ReceivedInstance(
                        sop_instance_uid=sop_uid,
                        sop_class_uid=sop_class,
                        study_instance_uid=study_uid,
                        series_instance_uid=series_uid,
                        path=path,
                        calling_ae=calling_ae,
                        association_id=association_id,
                        received_at=self._clock(),
                    )
                )
        except StoreError as exc:
            log.error("could not store instance %s from %s: %s", sop_uid, calling_ae, exc)
            if path is not None:
                self._forget_unjournaled(path, sop_uid)
            return Status.OUT_OF_RESOURCES
        fault_point("after-journal")
        self._assembler.instance_arrived(SeriesKey(study_uid, series_uid), sop_uid, association_id)
        log.debug("stored instance %s of series %s", sop_uid, series_uid)
        return Status.SUCCESS

    def _forget_unjournaled(self, path: Path, sop_uid: str) -> None:
        """The file is written but its journal row is not (a full disk): the caller is told 0xA700,
        so the file is promised to no one; delete it, unless an earlier copy's row points at it."""
        try:
            if self._journal.instance_state(sop_uid) is None:
                path.unlink(missing_ok=True)
        except (StoreError, OSError) as exc:  # left for the spool's clean-up; nothing was acknowledged
            log.warning("instance %s: its unjournaled spool file could not be removed: %s", sop_uid, exc)

    def on_association_accepted(self, calling_ae: str, host: str, association_id: str) -> None:
        self._metrics.associations.labels("accepted").inc()
        try:
            self._assembler.association_opened(association_id)
        except StoreError as exc:  # its series may then be taken before it ends: split, never lost
            log.error("could not journal association %s: %s", association_id, exc)
        log.info("association %s accepted from %s at %s", association_id, calling_ae, host)

    def on_association_released(self, association_id: str) -> None:
        try:
            self._assembler.association_ended(association_id)
        except StoreError as exc:  # max_wait_seconds still bounds its series
            log.error("could not journal the end of association %s: %s", association_id, exc)
        log.info("association %s ended", association_id)

    def on_association_rejected(self, calling_ae: str, host: str, reason: str) -> None:
        self._metrics.associations.labels("rejected").inc()
        log.warning("association from %s at %s rejected: %s", calling_ae, host, reason)

    def _quarantine(self, encoded: bytes | Path, reason: str, calling_ae: str, association_id: str) -> int:
        try:
            path = self._spool.write_quarantine(encoded, reason_slug="unparseable")
            self._journal.quarantine.record(path, reason, calling_ae, association_id)
        except StoreError as exc:
            log.error("could not quarantine a dataset from %s (%s): %s", calling_ae, reason, exc)
            return Status.OUT_OF_RESOURCES
        log.warning("quarantined a dataset from %s: %s (kept as %s)", calling_ae, reason, path.name)
        return Status.CANNOT_UNDERSTAND


def parse_instance_uids(encoded: bytes | Path) -> tuple[str, str, str, str]:
    """(SOP Class, SOP Instance, Study Instance, Series Instance) UIDs of a Part 10 byte stream or file."""
    try:
        ds = pydicom.dcmread(encoded if isinstance(encoded, Path) else BytesIO(encoded), stop_before_pixels=True)
    except Exception as exc:  # untrusted bytes: BytesLengthException, struct.error, ...: "cannot understand"
        raise UnusableInstanceError(f"cannot parse the dataset: {type(exc).__name__}: {exc}") from exc
    values = []
    for keyword in _REQUIRED_UIDS:
        try:
            value = str(ds.get(keyword, "") or "")
        except Exception as exc:  # a malformed element only fails when it is read (any pydicom error)
            raise UnusableInstanceError(f"{keyword} cannot be read: {exc}") from exc
        if not value:
            raise UnusableInstanceError(f"{keyword} is missing")
        if not UID(value).is_valid:
            raise UnusableInstanceError(f"{keyword} is not a valid UID: {value[:70]!r}")
        values.append(value)
    return values[0], values[1], values[2], values[3]
