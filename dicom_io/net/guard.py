"""What keeps the Storage SCP answering when a peer sends garbage, floods it or stalls.

pynetdicom, as it comes, lets a broken connection keep its association slot until the ACSE
timeout: a connection that sends bytes that are not an A-ASSOCIATE-RQ (or closes at once) is
aborted by the DICOM Upper Layer, but the association thread waits for the request that will
never come, and while it waits the node answers every caller "local limit exceeded" (20 such
connections: 29 s of refusals, measured). A PDU length of 4 GB is read as it is, into memory,
and a PDU that stops half-way blocks its reader for ever. This module changes that, each piece
small and on pynetdicom's documented extension points where there is one:

- :class:`ConnectionGate`: live connections per calling address (from accept to close, TLS
  handshake and idle time included), so one host cannot hold every slot; a connection over the
  limit gets A-ASSOCIATE-RJ "local limit exceeded" at once and no association thread.
- :class:`GuardedSocket`: every PDU has a length limit by type (P-DATA-TF: the maximum PDU we
  announce) and a deadline (the A-ASSOCIATE-RQ: ``acse_timeout`` from the accept; every later
  PDU: ``network_timeout`` from its first byte). Past either, the peer gets A-ABORT (source
  service provider, "invalid PDU parameter value") and the connection is closed.
- :class:`GuardedAssociation`: the acceptor waits for the A-ASSOCIATE-RQ in short slices and
  gives up as soon as the Upper Layer has left the state "awaiting A-ASSOCIATE-RQ" without one
  (garbage, A-ABORT, closed connection): the slot is free within ~50 ms instead of
  ``acse_timeout``. ``kill()`` is bounded: a stuck reader is shut down after 2 s.
- :class:`GuardedDIMSE`: P-DATA on a presentation context that was not accepted, an empty PDV,
  a command set over 64 KiB or a DIMSE decoding error aborts the association (A-ABORT) instead
  of killing the Upper Layer thread silently; a data set over ``max_instance_bytes`` is counted
  and dropped as it arrives (never buffered) and its C-STORE is marked for refusal
  (:func:`oversized_bytes`). The file a data set is written to as it arrives (pynetdicom's
  chunked receive) records a write error (a full disk) instead of raising it, so that C-STORE
  is answered 0xA700 and the association goes on (:func:`unwritten_reason`); for that, each
  presentation data value is handed to pynetdicom on its own, and the file is wrapped as soon
  as it exists, before any data set byte is written to it.

Everything here relies on pynetdicom 3.0 internals (the request handler's association factory,
the DUL's read pattern of a 6-byte header then the body, the acceptor's reactor); the version
is pinned below 4 in pyproject.toml and the torture suite exercises each path.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import queue
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.pdu_primitives import A_ASSOCIATE, P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, RequestHandler
from pynetdicom.utils import set_timer_resolution

if TYPE_CHECKING:  # pragma: no cover
    from pynetdicom.pdu_primitives import P_DATA

__all__ = [
    "COMMAND_SET_LIMIT",
    "OTHER_PDU_LIMIT",
    "ConnectionGate",
    "GuardedAssociation",
    "GuardedDIMSE",
    "GuardedRequestHandler",
    "GuardedSocket",
    "PduLimits",
    "Slot",
    "calling_ae_title",
    "oversized_bytes",
    "unwritten_reason",
    "reject_pdu",
]

LOGGER = logging.getLogger(__name__)

#: Largest A-ASSOCIATE-RQ (and any PDU but P-DATA-TF) read: 128 contexts with all their transfer
#: syntaxes and user identity items fit many times over.
OTHER_PDU_LIMIT = 1 << 20
#: Largest DIMSE command set accepted (a C-STORE-RQ's is about 200 bytes).
COMMAND_SET_LIMIT = 1 << 16
#: How often the acceptor looks at its Upper Layer while waiting for the A-ASSOCIATE-RQ.
_WAIT_SLICE = 0.005
#: How long ``kill()`` waits for the Upper Layer to go idle before shutting the socket.
_KILL_GRACE = 2.0
_KNOWN_PDU_TYPES = frozenset(range(1, 8))
_A_ASSOCIATE_RQ, _P_DATA_TF = 0x01, 0x04
# A-ASSOCIATE-RJ: rejected-transient, service-provider (presentation), local-limit-exceeded
_RJ_LOCAL_LIMIT = bytes([0x03, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x02, 0x03, 0x02])
# A-ABORT: source service-provider (2), reason invalid-PDU-parameter value (6)
_ABORT_INVALID_PARAMETER = bytes([0x07, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x02, 0x06])
#: Attribute set on a C-STORE primitive whose data set went over ``max_instance_bytes``.
_OVERSIZED = "_pacsxai_oversized_bytes"


@dataclass(frozen=True)
class PduLimits:
    """What one connection may send: P-DATA-TF bodies up to ``p_data`` bytes (the announced
    maximum PDU, or the instance limit when unlimited), data sets up to ``instance`` bytes,
    the A-ASSOCIATE-RQ within ``acse_timeout`` of the accept, each later PDU within
    ``network_timeout`` of its first byte."""

    p_data: int
    instance: int
    acse_timeout: float
    network_timeout: float


class Slot:
    """One live connection of one host, counted by a :class:`ConnectionGate`; ``release`` is idempotent."""

    def __init__(self, gate: ConnectionGate, host: str) -> None:
        self.host = host
        self.accepted_at = time.monotonic()
        self._gate = gate
        self.taken = False  # an association thread owns the slot (and releases it when it ends)
        self._released = False
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._gate._release(self.host)


class ConnectionGate:
    """Live connections per calling address, at most ``per_host`` each (thread-safe)."""

    def __init__(self, per_host: int) -> None:
        if per_host < 1:
            raise ValueError(f"connections per host must be at least 1, got {per_host!r}")
        self.per_host = per_host
        self._lock = threading.Lock()
        self._live: Counter[str] = Counter()

    def admit(self, host: str) -> Slot | None:
        """A slot for a new connection from ``host``, or ``None`` when it has ``per_host`` already."""
        with self._lock:
            if self._live[host] >= self.per_host:
                return None
            self._live[host] += 1
        return Slot(self, host)

    def _release(self, host: str) -> None:
        with self._lock:
            self._live[host] -= 1
            if self._live[host] <= 0:
                del self._live[host]

    def live(self, host: str | None = None) -> int:
        """Connections open now, from ``host`` or from everyone."""
        with self._lock:
            return self._live[host] if host is not None else sum(self._live.values())


def reject_pdu(sock: socket.socket, grace: float = 1.0) -> str:
    """Answer a connection over its host's limit with A-ASSOCIATE-RJ "local limit exceeded" and
    close it: send, stop writing, read what the peer still sends (its A-ASSOCIATE-RQ) for at most
    ``grace`` seconds, so the close does not reset the answer away. Returns the calling AE title
    of that A-ASSOCIATE-RQ when one came (for the rejection's report), else ``""``."""
    received = bytearray()
    try:
        sock.settimeout(grace)
        sock.sendall(_RJ_LOCAL_LIMIT)
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            if len(received) < 42:
                received.extend(chunk[: 42 - len(received)])
    except OSError:
        pass
    finally:
        _close(sock)
    return calling_ae_title(bytes(received))


def calling_ae_title(head: bytes) -> str:
    """The Calling AE Title of an A-ASSOCIATE-RQ from its first 42 bytes (PS3.8 9.3.2), or ``""``."""
    if len(head) < 42 or head[0] != _A_ASSOCIATE_RQ:
        return ""
    return head[26:42].decode("ascii", "replace").strip()


def _close(sock: socket.socket | None) -> None:
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class GuardedSocket(AssociationSocket):
    """pynetdicom's acceptor socket with a length limit and a deadline on every PDU read.

    The Upper Layer reads a PDU as ``recv(6)`` (the header) then ``recv(length)`` (the body),
    and reads no body after a header of an unknown type; this class follows that pattern. A read
    that runs past its deadline, or a header over its type's limit, closes the connection (with
    A-ABORT for the latter) and returns what was read, which the Upper Layer takes as a closed
    connection.
    """

    def __init__(self, assoc: Association, client_socket: socket.socket, limits: PduLimits, slot: Slot) -> None:
        super().__init__(assoc, client_socket=client_socket)
        self.limits = limits
        self.slot = slot
        self._expect_header = True
        self._first_pdu = True
        self._deadline = 0.0
        self.refusal: str | None = None  # why the connection was closed by the guard, if it was
        client_socket.settimeout(limits.network_timeout)  # sends to a peer that never reads end too

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        if sock is None:
            return bytearray()
        if self._expect_header:
            self._deadline = (
                self.slot.accepted_at + self.limits.acse_timeout
                if self._first_pdu
                else time.monotonic() + self.limits.network_timeout
            )
        data = self._read(sock, nr_bytes)
        if len(data) < nr_bytes:
            return data
        if self._expect_header and nr_bytes == 6:
            pdu_type, _, length = struct.unpack(">BBL", data)
            if pdu_type not in _KNOWN_PDU_TYPES or (self._first_pdu and pdu_type != _A_ASSOCIATE_RQ):
                # The Upper Layer answers these with A-ABORT but would first read the next header
                # from whatever follows (and wait for it): the guard aborts and closes at once.
                expected = "an A-ASSOCIATE-RQ" if self._first_pdu else "a PDU"
                self._refuse(f"PDU type 0x{pdu_type:02X} where {expected} was expected")
                self._first_pdu = False
                return data
            if pdu_type in _KNOWN_PDU_TYPES:
                limit = self.limits.p_data if pdu_type == _P_DATA_TF else OTHER_PDU_LIMIT
                if length > limit:
                    self._refuse(f"PDU type 0x{pdu_type:02X} of {length} bytes is over the limit of {limit}")
                    return bytearray()
                self._expect_header = False
        else:
            self._expect_header = True
            self._first_pdu = False
        return data

    def _read(self, sock: socket.socket, count: int) -> bytearray:
        """Up to ``count`` bytes before the deadline; fewer (and the socket closed) past it or on EOF."""
        data = bytearray()
        try:
            while len(data) < count:
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    self._refuse(
                        "the A-ASSOCIATE-RQ did not arrive within the ACSE timeout"
                        if self._first_pdu
                        else "a PDU did not arrive within the network timeout",
                        abort=False,
                    )
                    break
                sock.settimeout(remaining)
                chunk = sock.recv(min(65536, count - len(data)))
                if not chunk:
                    break
                data.extend(chunk)
        except (TimeoutError, ssl.SSLError, OSError):
            pass
        finally:
            if self.socket is not None:
                try:
                    self.socket.settimeout(self.limits.network_timeout)
                except OSError:
                    pass
        return data

    def _refuse(self, reason: str, *, abort: bool = True) -> None:
        """Send A-ABORT (when ``abort``) and close; the reason is logged once, with the peer's address."""
        if self.refusal is None:
            self.refusal = reason
            LOGGER.warning("closing the connection from %s: %s", self.slot.host, reason)
        sock = self.socket
        if sock is not None and abort:
            try:
                sock.settimeout(1.0)
                sock.sendall(_ABORT_INVALID_PARAMETER)
            except OSError:
                pass
        _close(sock)


class GuardedDIMSE(DIMSEServiceProvider):
    """DIMSE provider that aborts on malformed P-DATA and drops data sets over the instance limit."""

    def __init__(self, assoc: Association, instance_limit: int) -> None:
        super().__init__(assoc)
        self.instance_limit = instance_limit
        self._command_bytes = 0
        self._dataset_bytes = 0
        self.msg_queue = _MarkingQueue(self)

    def receive_primitive(self, primitive: P_DATA) -> None:
        try:
            problem = self._account(primitive)
            if problem is None:
                for value in primitive.presentation_data_value_list:
                    self._receive_value(value)
        except Exception as exc:  # a DIMSE decoding error must end the association, not the thread
            problem = f"invalid DIMSE message: {type(exc).__name__}: {exc}"
        if problem is not None:
            LOGGER.warning("aborting the association from %s: %s", _peer(self.assoc), problem)
            self.message = None
            self.dul.event_queue.put("Evt19")  # invalid PDU: A-ABORT to the peer, A-P-ABORT to the user

    def _receive_value(self, value: tuple[int, bytes]) -> None:
        """One presentation data value through pynetdicom; then the data set's file, if pynetdicom
        just created it, is wrapped so that no write to it can raise."""
        single = P_DATA()
        single.presentation_data_value_list = [list(value)]
        try:
            super().receive_primitive(single)
        except OSError as exc:  # creating the file or writing its File Meta failed (a full disk)
            if self.message is None:
                raise
            self._wrap_data_set_file(exc)
        if self.message is None:  # a message completed (and was queued, marked if oversized)
            self._command_bytes = self._dataset_bytes = 0
        else:
            self._wrap_data_set_file()

    def discard_unfinished(self) -> None:
        """The association ended: a data set still arriving will never be complete, and pynetdicom
        removes its file only after a C-STORE handler, which will not run: remove it now."""
        written = getattr(self.message, "_data_set_file", None)
        if written is None:
            return
        with contextlib.suppress(OSError, ValueError):
            written.close()
        with contextlib.suppress(OSError):
            os.unlink(written.name)

    def _wrap_data_set_file(self, error: OSError | None = None) -> None:
        message = self.message
        written = getattr(message, "_data_set_file", None)
        if written is not None and not isinstance(written, _DataSetFile):
            written = message._data_set_file = _DataSetFile(written)  # type: ignore[union-attr]
        if isinstance(written, _DataSetFile) and error is not None:
            written.failed(error)

    def _account(self, primitive: P_DATA) -> str | None:
        """Count command and data set bytes; drop data past the instance limit; a problem, or ``None``."""
        values = primitive.presentation_data_value_list
        for index, (context_id, data) in enumerate(values):
            if context_id not in self.assoc._accepted_cx:
                return f"P-DATA on presentation context {context_id}, which was not accepted"
            if not data:
                return "an empty presentation data value"
            if data[0] & 1:
                self._command_bytes += len(data) - 1
                if self._command_bytes > COMMAND_SET_LIMIT:
                    return f"a command set of more than {COMMAND_SET_LIMIT} bytes"
            else:
                self._dataset_bytes += len(data) - 1
                if self._dataset_bytes > self.instance_limit:
                    values[index] = (context_id, bytes(data[:1]))  # keep the control header, drop the bytes
        return None


class _MarkingQueue(queue.Queue):
    """The DIMSE message queue: a message completed while its data set is over the limit is
    marked before it is queued, so the association thread never sees it unmarked."""

    def __init__(self, dimse: GuardedDIMSE) -> None:
        super().__init__()
        self._dimse = dimse

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        size = self._dimse._dataset_bytes
        if size > self._dimse.instance_limit and isinstance(item, tuple) and len(item) == 2:
            setattr(item[1], _OVERSIZED, size)
        super().put(item, block, timeout)


class _DataSetFile:
    """pynetdicom's temporary file for a data set received in chunks, where a write error (a full
    disk) is recorded and the rest of the data set dropped, instead of an exception that would
    end the association: the C-STORE is then answered 0xA700 (:func:`unwritten_reason`)."""

    def __init__(self, file: Any) -> None:
        self._file = file
        self.name = file.name
        self.error: OSError | None = None
        self.file = self  # pynetdicom flushes through ``.file``

    def failed(self, error: OSError) -> None:
        if self.error is None:
            self.error = error

    def write(self, data: bytes) -> None:
        if self.error is None:
            try:
                self._file.write(data)
            except (OSError, ValueError) as exc:  # ValueError: closed by discard_unfinished meanwhile
                self.failed(exc if isinstance(exc, OSError) else OSError(str(exc)))

    def flush(self) -> None:
        if self.error is None:
            try:
                self._file.flush()
            except OSError as exc:
                self.failed(exc)

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as exc:  # the bytes that did not fit, flushed once more
            self.failed(exc)


def unwritten_reason(request: Any) -> str | None:
    """Why a C-STORE request's data set could not be written to its file as it arrived, else ``None``."""
    written = getattr(request, "_dataset_file", None)
    if isinstance(written, _DataSetFile) and written.error is not None:
        return f"its data set could not be written as it arrived: {written.error}"
    return None


def oversized_bytes(request: Any) -> int | None:
    """The data set size of a C-STORE request that went over the instance limit, else ``None``."""
    value = getattr(request, _OVERSIZED, None)
    return int(value) if value is not None else None


class GuardedAssociation(Association):
    """pynetdicom's acceptor association with a prompt end when no A-ASSOCIATE-RQ comes and a
    bounded ``kill()``; its slot is released when its thread ends."""

    def __init__(self, ae: Any, slot: Slot, limits: PduLimits) -> None:
        super().__init__(ae, MODE_ACCEPTOR)
        self.slot = slot
        self.limits = limits
        self.dimse = GuardedDIMSE(self, limits.instance)
        #: Set when the Upper Layer leaves "awaiting A-ASSOCIATE-RQ" (Sta2) other than for Sta3.
        self.no_request = threading.Event()
        self.bind(evt.EVT_FSM_TRANSITION, _watch_for_request, [self.no_request])

    def run_reactor(self) -> None:
        try:
            self._run_acceptor()
        finally:
            self._shutdown_transport()
            self.slot.release()

    def _run_acceptor(self) -> None:
        if not self._started_dul:
            self.dul.start()
            self._started_dul = True
            self._dul_ready.wait()
        primitive = self._await_request()
        if primitive is None:
            self.kill()
            return
        self.requestor.primitive = primitive
        evt.trigger(self, evt.EVT_REQUESTED, {})
        if not self.is_aborted and not self.is_rejected:
            self.acse.negotiate_association()
        if self.is_established:
            with set_timer_resolution(self._timer_resolution):
                self._run_reactor()

    def _await_request(self) -> A_ASSOCIATE | None:
        """The A-ASSOCIATE-RQ indication, or ``None`` as soon as none can come any more."""
        deadline = self.slot.accepted_at + self.limits.acse_timeout
        while True:
            primitive = self.dul.receive_pdu(wait=True, timeout=_WAIT_SLICE)
            if primitive is not None:
                return primitive if isinstance(primitive, A_ASSOCIATE) else None
            if self.no_request.is_set() or not self.dul.is_alive():
                return None
            if time.monotonic() > deadline:
                LOGGER.info("no A-ASSOCIATE-RQ from %s within the ACSE timeout", self.slot.host)
                return None

    def _serve_request(self, msg: Any, context_id: int) -> None:
        """As pynetdicom's, but a message that is not a valid request (a response, a request
        missing a required element) aborts the association instead of being ignored, so the
        peer is not left waiting for an answer that never comes (PS3.7 7.5.1)."""
        if not self._sent_release and not msg.is_valid_request:
            LOGGER.warning("aborting the association from %s: %s is not a valid request", self.slot.host, msg.msg_type)
            self.abort()
            return
        super()._serve_request(msg, context_id)

    def kill(self) -> None:
        """Stop the association without waiting on the peer: once the Upper Layer has sent its last
        PDU (A-ABORT or A-RELEASE-RP, state Sta13) or after ``_KILL_GRACE`` s, the socket is shut
        and the Upper Layer told so."""
        self._reactor_checkpoint.set()
        self._kill = True
        self.is_established = False
        self._is_paused = True
        deadline = time.monotonic() + _KILL_GRACE
        closed = False
        while self.dul.is_alive() and not self.dul.stop_dul():
            now = time.monotonic()
            if not closed and (self.dul.state_machine.current_state == "Sta13" or now > deadline):
                # The Upper Layer does not see a socket closed under it: tell it (Evt17, transport
                # closed), or it waits in Sta13 for its ARTIM timer (the ACSE timeout) to expire.
                self._shutdown_transport()
                self.dul.event_queue.put("Evt17")
                closed = True
            if now > deadline + _KILL_GRACE:
                self.dul.kill_dul()
                break
            time.sleep(0.01)

    def _shutdown_transport(self) -> None:
        sock = cast(AssociationSocket | None, self.dul.socket)
        if sock is not None:
            _close(sock.socket)


def _watch_for_request(event: evt.Event, no_request: threading.Event) -> None:
    """EVT_FSM_TRANSITION: garbage, A-ABORT or a closed connection while awaiting the request."""
    if event.current_state == "Sta2" and event.next_state != "Sta3":  # type: ignore[attr-defined]
        no_request.set()


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's request handler, making a :class:`GuardedAssociation` on a :class:`GuardedSocket`.

    The server passes the connection's :class:`Slot` and the :class:`PduLimits` as ``slot`` and
    ``limits`` attributes of the request socket's wrapper (see ``_NodeServer`` in ``scp.py``).
    """

    def _create_association(self) -> Association:
        """As pynetdicom 3.0's ``RequestHandler._create_association``, with the guarded classes."""
        server = cast(Any, self.server)
        slot, limits = server.connection_slot(self.request), server.pdu_limits
        assoc = GuardedAssociation(self.ae, slot, limits)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.strftime(datetime.now(), '%Y%m%d%H%M%S')}"
        assoc.set_socket(GuardedSocket(assoc, self.request, limits, slot))
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = _copy_contexts(self.server.contexts)
        assoc.requestor.address_info = self.remote
        for event in self.server._handlers:
            if event.is_intervention and self.server._handlers[event]:
                assoc.bind(event, *self.server._handlers[event])
            elif isinstance(event, evt.NotificationEvent):
                for handler in cast(list, self.server._handlers[event]):
                    assoc.bind(event, handler[0], handler[1])
        return assoc


def _copy_contexts(contexts: list[PresentationContext]) -> list[PresentationContext]:
    """Each association's own copy of the supported presentation contexts, as pynetdicom's
    ``deepcopy`` makes it but about 100 times faster: a context's attributes are plain values
    and UIDs (immutable strings), only its list of transfer syntaxes needs a copy of its own.
    (All storage SOP classes with their transfer syntaxes: 171 contexts; deepcopy took 14 ms of
    CPU per association, more than the rest of an echo association.)"""
    copies = []
    for context in contexts:
        twin = copy.copy(context)
        twin._transfer_syntax = list(context._transfer_syntax)
        copies.append(twin)
    return copies


def _peer(assoc: Association) -> str:
    try:
        return f"{assoc.requestor.address}:{assoc.requestor.port}"
    except (AttributeError, ValueError):
        return "unknown peer"
