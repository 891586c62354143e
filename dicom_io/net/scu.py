"""The node's Storage SCU: C-STORE of results to a destination AE, one verdict per object.

Each object sent gets a :class:`SendOutcome` that tells the outbox what to do with it:

- ``"delivered"``: the destination answered Success or a warning (it keeps the object);
- ``"retry"``: nothing definite happened (no association: refused, rejected, aborted, timed out;
  or the destination is out of resources): send again later, with backoff;
- ``"reject"``: the destination will not take this object as it is (it did not accept the SOP
  class or transfer syntax, or answered a failure such as "cannot understand"), or the object
  cannot be read: it goes to the dead letter at once, never round a loop.

One association carries a whole batch; its presentation contexts are built from the objects'
(SOP class, transfer syntax) pairs, at most 128 per association (PS3.8 9.3.2.2), so a batch with
more pairs uses several associations. TCP_NODELAY is set on the socket as soon as it connects.

A Part 10 file whose transfer syntax the destination accepted goes out as stored: pynetdicom's
``STORE_SEND_CHUNKED_DATASET`` is switched on at import, so its data set is read from the file in
chunks, neither decoded nor encoded again (a deflated 2k² Secondary Capture is not inflated and
deflated once more) and never held whole in memory. A file that needs another syntax is read and
converted.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.events import Event, EventType
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification

from dicom_io.compression import uncompressed
from dicom_io.faults import fault_point
from dicom_io.net.network import (
    Status,
    StoreVerdict,
    classify_store_status,
    client_ssl_context,
    describe_status,
    set_tcp_nodelay,
    validate_ae_title,
)

__all__ = ["Destination", "SendOutcome", "StoreSCU", "MAX_CONTEXTS_PER_ASSOCIATION"]

LOGGER = logging.getLogger(__name__)

# Files go out as stored (see the module docstring); _as_accepted hands pynetdicom a file only
# when its own transfer syntax was accepted, since a chunked file cannot be converted.
_config.STORE_SEND_CHUNKED_DATASET = True

#: PS3.8 9.3.2.2: presentation context IDs are odd numbers 1-255, so 128 per association.
MAX_CONTEXTS_PER_ASSOCIATION = 128

_DESTINATION_PATTERN = re.compile(r"^(?P<ae>[^@]+)@(?P<host>\[[^\]]+\]|[^:@\[\]]+):(?P<port>\d+)$")
_LITTLE_ENDIAN_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)

# A-ASSOCIATE-AC presentation context results (PS3.8 9.3.3.2).
_CONTEXT_REFUSAL = {
    0x01: "user rejection",
    0x02: "no reason",
    0x03: "abstract syntax (SOP class) not supported",
    0x04: "transfer syntaxes not supported",
}


@dataclass(frozen=True)
class Destination:
    """A C-STORE destination: AE title, host, port, and the PEM files for TLS (``tls_ca`` set
    means TLS; ``tls_certificate``/``tls_key`` for destinations that require mutual TLS)."""

    ae_title: str
    host: str
    port: int
    tls_ca: Path | None = None
    tls_certificate: Path | None = None
    tls_key: Path | None = None
    #: Lossless compressed syntaxes this destination may be sent, preferred first (see
    #: :mod:`dicom_io.compression`). Empty: objects go as they are stored. Non-empty: an object is
    #: proposed in its own syntax when listed, deflated when listed, and uncompressed as the last
    #: resort, each in a context of its own; a compressed object the destination does not take
    #: is decompressed here before it is sent.
    transfer_syntaxes: tuple[UID, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", validate_ae_title(self.ae_title, "destination AE title"))
        object.__setattr__(self, "transfer_syntaxes", tuple(UID(str(uid)) for uid in self.transfer_syntaxes))
        if not isinstance(self.host, str) or not self.host.strip():
            raise ValueError(f"destination host must be a host name or address, got {self.host!r}")
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 1 <= self.port <= 65535:
            raise ValueError(f"destination port must be an integer 1-65535, got {self.port!r}")
        if (self.tls_certificate is None) != (self.tls_key is None):
            raise ValueError(
                f"destination {self}: a TLS client certificate needs its key and vice versa, got "
                f"certificate={self.tls_certificate!s} key={self.tls_key!s}"
            )
        if self.tls_certificate is not None and self.tls_ca is None:
            raise ValueError(f"destination {self}: a TLS client certificate is set but no tls_ca to verify the peer")

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``"AE@HOST:PORT"`` (``"AE@[::1]:104"`` for IPv6) to a destination without TLS."""
        match = _DESTINATION_PATTERN.match(text.strip()) if isinstance(text, str) else None
        if match is None:
            raise ValueError(f"a destination is written AE@HOST:PORT (e.g. ORTHANC@10.0.0.5:4242), got {text!r}")
        try:
            return cls(match["ae"], match["host"].strip("[]"), int(match["port"]))
        except ValueError as exc:
            raise ValueError(f"destination {text!r}: {exc}") from exc

    @property
    def uses_tls(self) -> bool:
        return self.tls_ca is not None

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class SendOutcome:
    """What happened to one object. ``status`` is the DIMSE status, ``None`` when no response
    came (no association, or it ended first); ``detail`` says why (never patient data)."""

    sop_instance_uid: str
    status: int | None
    verdict: StoreVerdict
    detail: str


@dataclass(frozen=True)
class _Item:
    """One object to send: the source as given, and the header values that plan its context."""

    index: int
    source: Dataset | Path
    sop_class_uid: UID
    sop_instance_uid: str
    transfer_syntax: UID

    @property
    def context_key(self) -> tuple[UID, UID]:
        return self.sop_class_uid, self.transfer_syntax


@dataclass
class _ConnectionProbe:
    """Set by the EVT_CONN_OPEN handler: did the TCP (and TLS) connection open at all?"""

    opened: bool = False


#: A presentation context to propose: abstract syntax (SOP class) and transfer syntaxes.
ContextKey = tuple[UID, tuple[UID, ...]]


@dataclass
class _Batch:
    """Objects that go over one association, and the presentation contexts they need."""

    contexts: list[ContextKey] = field(default_factory=list)
    items: list[_Item] = field(default_factory=list)


HandlerBinding = tuple[EventType, Callable[..., Any]] | tuple[EventType, Callable[..., Any], list[Any]]


class StoreSCU:
    """Sends objects by C-STORE as ``calling_ae``; a fresh pynetdicom AE per call, so one
    instance may serve several sender threads. ``extra_handlers``: more pynetdicom bindings for
    each association (metrics, tests), run after the SCU's own."""

    def __init__(
        self,
        calling_ae: str = "PACSXAI",
        *,
        acse_timeout: float = 30,
        dimse_timeout: float = 60,
        network_timeout: float = 60,
        extra_handlers: Sequence[HandlerBinding] = (),
    ) -> None:
        self.calling_ae = validate_ae_title(calling_ae, "calling AE title")
        for name, value in (
            ("acse_timeout", acse_timeout),
            ("dimse_timeout", dimse_timeout),
            ("network_timeout", network_timeout),
        ):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        self._timeouts = (acse_timeout, dimse_timeout, network_timeout)
        self._extra_handlers = list(extra_handlers)

    def send(self, destination: Destination, datasets: Sequence[Dataset | Path | str]) -> list[SendOutcome]:
        """C-STORE every object (a Dataset with File Meta, or a Part 10 file path) to
        ``destination``; one outcome per object, in the order given.

        Network trouble is an outcome ("retry"), never an exception; TLS files of the destination
        that cannot be loaded raise (``OSError``/``ssl.SSLError``): that is configuration.
        """
        outcomes: list[SendOutcome | None] = [None] * len(datasets)
        items: list[_Item] = []
        for index, source in enumerate(datasets):
            planned = _plan(index, source)
            if isinstance(planned, SendOutcome):
                outcomes[index] = planned
            else:
                items.append(planned)
        for batch in _batches(items, destination.transfer_syntaxes):
            for item, outcome in self._send_batch(destination, batch):
                outcomes[item.index] = outcome
        missing = [index for index, outcome in enumerate(outcomes) if outcome is None]
        if missing:
            raise RuntimeError(f"no outcome for objects at positions {missing}: a bug in StoreSCU.send")
        return cast(list[SendOutcome], outcomes)

    def echo(self, destination: Destination) -> bool:
        """C-ECHO (Verification, PS3.4 Annex A): True when the destination answers Success."""
        probe = _ConnectionProbe()
        assoc = self._associate(destination, [build_context(Verification)], probe)
        if not assoc.is_established:
            LOGGER.warning("C-ECHO to %s: %s", destination, _association_failure(assoc, probe, destination))
            return False
        try:
            response = assoc.send_c_echo()
        finally:
            _release(assoc)
        status = response.get("Status") if response else None
        if status != Status.SUCCESS:
            LOGGER.warning("C-ECHO to %s answered %s", destination, _status_text(status))
        return status == Status.SUCCESS

    def _associate(
        self, destination: Destination, contexts: list[PresentationContext], probe: _ConnectionProbe
    ) -> Association:
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = self._timeouts
        tls_args = None
        if destination.tls_ca is not None:
            context = client_ssl_context(destination.tls_ca, destination.tls_certificate, destination.tls_key)
            tls_args = (context, destination.host)
        handlers: list[HandlerBinding] = [(evt.EVT_CONN_OPEN, _on_connection_open, [probe])]
        return ae.associate(
            destination.host,
            destination.port,
            contexts=contexts,
            ae_title=destination.ae_title,
            tls_args=tls_args,
            evt_handlers=handlers + self._extra_handlers,
        )

    def _send_batch(self, destination: Destination, batch: _Batch) -> list[tuple[_Item, SendOutcome]]:
        probe = _ConnectionProbe()
        contexts = [build_context(sop_class, list(syntaxes)) for sop_class, syntaxes in batch.contexts]
        assoc = self._associate(destination, contexts, probe)
        if not assoc.is_established:
            if assoc.rejected_contexts and not assoc.accepted_contexts:
                # The destination answered the association but accepted none of the contexts:
                # pynetdicom then aborts. That is a refusal of these SOP classes, not a transient failure.
                return [(item, _refused(assoc, item)) for item in batch.items]
            reason = _association_failure(assoc, probe, destination)
            LOGGER.warning("%d object(s) not sent, will retry: %s", len(batch.items), reason)
            return [(item, SendOutcome(item.sop_instance_uid, None, "retry", reason)) for item in batch.items]
        results: list[tuple[_Item, SendOutcome]] = []
        try:
            for item in batch.items:
                if not assoc.is_established:
                    reason = f"association with {destination} ended before this object was sent"
                    results.append((item, SendOutcome(item.sop_instance_uid, None, "retry", reason)))
                    continue
                results.append((item, _send_one(assoc, item, destination)))
                fault_point("mid-send")
        finally:
            _release(assoc)
        return results


def _on_connection_open(event: Event, probe: _ConnectionProbe) -> None:
    """EVT_CONN_OPEN (requestor): TCP_NODELAY before the A-ASSOCIATE-RQ goes out."""
    probe.opened = True
    set_tcp_nodelay(event.assoc.dul.socket.socket)


def _release(assoc: Association) -> None:
    if assoc.is_established:
        assoc.release()


def _plan(index: int, source: Dataset | Path | str) -> _Item | SendOutcome:
    """Read what the context needs (SOP class, instance, transfer syntax) without the pixels."""
    if isinstance(source, Dataset):
        return _plan_dataset(index, source)
    if isinstance(source, (str, Path)):
        return _plan_file(index, Path(source))
    raise TypeError(f"send() takes pydicom Datasets or file paths, got {type(source).__name__} at position {index}")


def _plan_dataset(index: int, dataset: Dataset) -> _Item | SendOutcome:
    uid = str(dataset.get("SOPInstanceUID", ""))
    file_meta = getattr(dataset, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    missing = [kw for kw in ("SOPClassUID", "SOPInstanceUID") if kw not in dataset]
    if syntax is None:
        missing.append("file_meta.TransferSyntaxUID")
    if missing:
        return _unsendable(uid, f"dataset lacks {', '.join(missing)}")
    return _Item(index, dataset, UID(str(dataset.SOPClassUID)), uid, UID(str(syntax)))


def _plan_file(index: int, path: Path) -> _Item | SendOutcome:
    try:
        meta = read_file_meta_info(path)
    except (OSError, InvalidDicomError, ValueError) as exc:
        LOGGER.error("cannot read the File Meta of %s: %s", path, exc)
        return _unsendable("", f"cannot read {path} as a DICOM Part 10 file: {exc}")
    uid = str(meta.get("MediaStorageSOPInstanceUID", ""))
    missing = [
        kw for kw in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID") if kw not in meta
    ]
    if missing:
        return _unsendable(uid, f"{path} lacks File Meta {', '.join(missing)}")
    return _Item(index, path, UID(str(meta.MediaStorageSOPClassUID)), uid, UID(str(meta.TransferSyntaxUID)))


def _unsendable(sop_instance_uid: str, reason: str) -> SendOutcome:
    LOGGER.error("not sending %s: %s", sop_instance_uid or "an object", reason)
    return SendOutcome(sop_instance_uid, None, "reject", reason)


def _batches(items: list[_Item], allowed: tuple[UID, ...] = ()) -> list[_Batch]:
    """Group items so each association proposes at most 128 presentation contexts; items keep
    their order within a batch, and items with the same (SOP class, syntax) share a batch."""
    batch_of_key: dict[tuple[UID, UID], int] = {}
    batches: list[_Batch] = []
    for item in items:
        key = item.context_key
        if key not in batch_of_key:
            wanted = _contexts_for(*key, allowed)
            needed = [c for c in wanted if not batches or c not in batches[-1].contexts]
            if not batches or len(batches[-1].contexts) + len(needed) > MAX_CONTEXTS_PER_ASSOCIATION:
                batches.append(_Batch())
                needed = wanted
            batches[-1].contexts.extend(needed)
            batch_of_key[key] = len(batches) - 1
        batches[batch_of_key[key]].items.append(item)
    return batches


def _contexts_for(sop_class: UID, syntax: UID, allowed: tuple[UID, ...] = ()) -> list[ContextKey]:
    """The contexts that can carry an object: its own transfer syntax, and for little-endian
    uncompressed data also explicit/implicit VR little endian (which pynetdicom converts to;
    every SCP supports implicit VR little endian). The native syntax gets a context of its own
    because the acceptor, not the requestor, picks among a context's syntaxes. Without
    ``allowed`` compressed data is sent as it is, never transcoded; with it (a destination's
    lossless syntaxes), see :attr:`Destination.transfer_syntaxes`."""
    fallback: ContextKey = (sop_class, (ExplicitVRLittleEndian, ImplicitVRLittleEndian))
    if allowed:
        contexts: list[ContextKey] = []
        if syntax in allowed and syntax not in _LITTLE_ENDIAN_UNCOMPRESSED:
            contexts.append((sop_class, (syntax,)))
        if DeflatedExplicitVRLittleEndian in allowed:
            contexts.append((sop_class, (DeflatedExplicitVRLittleEndian,)))
        if syntax in _LITTLE_ENDIAN_UNCOMPRESSED and syntax not in (
            ExplicitVRLittleEndian,
            DeflatedExplicitVRLittleEndian,
        ):
            contexts.append((sop_class, (syntax,)))
        return [*contexts, fallback]
    if syntax == ExplicitVRLittleEndian:
        return [fallback]
    if syntax in _LITTLE_ENDIAN_UNCOMPRESSED:
        return [(sop_class, (syntax,)), fallback]
    return [(sop_class, (syntax,))]


def _refused(assoc: Association, item: _Item) -> SendOutcome:
    """The "reject" outcome for an object no accepted context can carry."""
    refusal = _context_refusal(assoc, item) or "destination accepted no presentation context"
    LOGGER.warning("%s: %s", item.sop_instance_uid, refusal)
    return SendOutcome(item.sop_instance_uid, None, "reject", refusal)


def _send_one(assoc: Association, item: _Item, destination: Destination) -> SendOutcome:
    allowed = destination.transfer_syntaxes
    accepted = {UID(c.transfer_syntax[0]) for c in assoc.accepted_contexts if c.abstract_syntax == item.sop_class_uid}
    if _context_refusal(assoc, item) is not None and not (allowed and accepted & set(_LITTLE_ENDIAN_UNCOMPRESSED)):
        return _refused(assoc, item)
    try:
        response = assoc.send_c_store(_as_accepted(item, accepted, allowed))
    except (ValueError, AttributeError, OSError, InvalidDicomError, RuntimeError, NotImplementedError) as exc:
        LOGGER.exception("C-STORE of %s to %s could not be sent", item.sop_instance_uid, destination)
        return SendOutcome(item.sop_instance_uid, None, "reject", f"could not encode or read the object: {exc}")
    status = response.get("Status") if response else None
    if status is None:
        reason = f"no C-STORE response from {destination} (DIMSE timeout or association aborted)"
        LOGGER.warning("%s: %s", item.sop_instance_uid, reason)
        return SendOutcome(item.sop_instance_uid, None, "retry", reason)
    verdict = classify_store_status(int(status))
    detail = f"{destination} answered {describe_status(int(status))}"
    (LOGGER.debug if verdict == "delivered" else LOGGER.warning)("C-STORE %s: %s", item.sop_instance_uid, detail)
    return SendOutcome(item.sop_instance_uid, int(status), verdict, detail)


def _as_accepted(item: _Item, accepted: set[UID], allowed: tuple[UID, ...]) -> Dataset | Path:
    """What to hand pynetdicom for ``item``: the object as stored when its syntax was accepted (or
    pynetdicom converts it); for a destination with lossless syntaxes, deflated when that was
    accepted, else decoded to explicit VR little endian (pynetdicom picks the exact context)."""
    if item.transfer_syntax in accepted:
        return item.source  # a file goes out as stored, in chunks
    dataset = item.source if isinstance(item.source, Dataset) else dcmread(item.source)
    if not allowed or (
        item.transfer_syntax in _LITTLE_ENDIAN_UNCOMPRESSED and DeflatedExplicitVRLittleEndian not in accepted
    ):
        return dataset  # pynetdicom converts between the uncompressed syntaxes
    if DeflatedExplicitVRLittleEndian in accepted:
        return uncompressed(dataset, DeflatedExplicitVRLittleEndian)
    return uncompressed(dataset)


def _context_refusal(assoc: Association, item: _Item) -> str | None:
    """Why no accepted context can carry this object, or ``None`` when one can."""
    for context in assoc.accepted_contexts:
        if context.abstract_syntax == item.sop_class_uid and _convertible(
            item.transfer_syntax, UID(context.transfer_syntax[0])
        ):
            return None
    sop = f"{item.sop_class_uid.name} ({item.sop_class_uid})" if item.sop_class_uid.is_valid else item.sop_class_uid
    results = {context.result for context in assoc.rejected_contexts if context.abstract_syntax == item.sop_class_uid}
    if results == {0x04}:
        return f"destination refused transfer syntax {item.transfer_syntax.name} for SOP class {sop}"
    why = ", ".join(_CONTEXT_REFUSAL.get(result, f"result {result}") for result in sorted(results)) or "not accepted"
    return f"destination refused SOP class {sop} ({why})"


def _convertible(source: UID, accepted: UID) -> bool:
    """pynetdicom sends ``source`` data under ``accepted``: the same, or both little endian
    uncompressed (explicit/implicit VR, deflated/inflated)."""
    return source == accepted or (source in _LITTLE_ENDIAN_UNCOMPRESSED and accepted in _LITTLE_ENDIAN_UNCOMPRESSED)


def _association_failure(assoc: Association, probe: _ConnectionProbe, destination: Destination) -> str:
    """Why no association came up, for the outcome detail."""
    if assoc.is_rejected:
        primitive = assoc.acceptor.primitive
        return (
            f"association rejected by {destination}: {primitive.result_str}, source {primitive.source_str}, "
            f"reason {primitive.reason_str}"
        )
    if not probe.opened:
        tls = " (TLS handshake included)" if destination.uses_tls else ""
        return f"could not connect to {destination}{tls}: refused, unreachable or timed out"
    if assoc.is_aborted:
        return f"association with {destination} aborted during negotiation"
    return f"no association with {destination} (no answer within the ACSE timeout)"


def _status_text(status: int | None) -> str:
    return "nothing" if status is None else describe_status(int(status))
