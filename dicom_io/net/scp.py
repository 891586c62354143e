"""The node's Storage SCP: C-ECHO and C-STORE over pynetdicom, with nothing acknowledged unstored.

What arrives is handed, still encoded (a DICOM Part 10 file, never decoded here), to a
:class:`StorageEvents` implementation (the service: spool file + fsync + journal row); the
DIMSE status it returns is what the sending AE gets. If it raises, the sender gets 0xA700
"out of resources", never Success.

A data set is never held whole in memory: pynetdicom's ``STORE_RECV_CHUNKED_DATASET`` is switched
on at import, so each P-DATA fragment is written to a temporary file (in ``tempfile``'s folder) as
it arrives. An implementation with ``on_store_file`` gets that file and may move it into place (a
rename when it is on the same filesystem); one with only ``on_store`` gets its bytes.

Association control (PS3.8 7.1.1.9, A-ASSOCIATE-RJ):

- the called AE title must be this node's ("rejected permanent", "service user", "called AE title
  not recognised");
- with a non-empty allow-list, the calling AE title, and where an entry names one the peer's
  address, must match an entry ("rejected permanent", "service user", "calling AE title not
  recognised"). pynetdicom's ``require_calling_aet`` knows titles only, so an ``EVT_REQUESTED``
  handler decides (pynetdicom's documented way to reject from a handler: ``acse.send_reject``);
  the AE-level ``require_called_aet``/``require_calling_aet`` stay set as a second line.
- every rejection is reported through :meth:`StorageEvents.on_association_rejected`.

The server is pynetdicom's threaded association server with these changes (:class:`_NodeServer`),
and SO_REUSEPORT on its socket when ``ListenerSettings.reuse_port`` says so (several receiver
processes on one port):
every accepted socket gets TCP_NODELAY before its first byte (without it each image stalls about
40 ms on the peer's delayed ACK); the TLS handshake runs in the connection's own thread,
bounded by the ACSE timeout (pynetdicom runs it in the accept loop, where one silent client holds
up every other caller; a failed handshake is reported as a rejection and never becomes an
association); each calling address holds at most ``max_associations_per_host`` connections
(more get A-ASSOCIATE-RJ "local limit exceeded" at once); and every connection runs under
:mod:`dicom_io.net.guard`: garbage, a closed connection or an A-ABORT before the A-ASSOCIATE-RQ
frees the slot at once, PDUs have length limits and deadlines, a malformed DIMSE message aborts
the association, and a data set over ``max_instance_bytes`` is dropped as it arrives and answered
0xA700 without ever being held in memory.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import socket
import socketserver
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.events import Event, EventType
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from dicom_io.net.guard import (
    ConnectionGate,
    GuardedDIMSE,
    GuardedRequestHandler,
    PduLimits,
    Slot,
    oversized_bytes,
    reject_pdu,
    unwritten_reason,
)
from dicom_io.net.network import Status, describe_status, server_ssl_context, set_tcp_nodelay, validate_ae_title

__all__ = [
    "DEFAULT_MAX_INSTANCE_BYTES",
    "SUPPORTED_TRANSFER_SYNTAXES",
    "AllowedCaller",
    "ListenerSettings",
    "StorageEvents",
    "StorageSCP",
    "TlsFiles",
]

LOGGER = logging.getLogger(__name__)

# Received data sets go to a temporary file as they arrive (see the module docstring).
_config.STORE_RECV_CHUNKED_DATASET = True

#: Transfer syntaxes accepted for every storage SOP class: the uncompressed ones, deflate, and the
#: usual compressed ones (JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE). The data is
#: stored as it arrives; decoding is the pipeline's business.
SUPPORTED_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

# A-ASSOCIATE-RJ fields (PS3.8 9.3.4): result, source, reason/diagnostic.
_REJECTED_PERMANENT = 0x01
_SOURCE_SERVICE_USER = 0x01
_NO_REASON_GIVEN = 0x01
_CALLING_AE_NOT_RECOGNISED = 0x03
_CALLED_AE_NOT_RECOGNISED = 0x07

_UNKNOWN_CALLER = ""  # calling AE reported for connections that fail before A-ASSOCIATE-RQ
_POLL_INTERVAL = 0.1  # s between checks for stop() in the accept loop


@dataclass(frozen=True)
class AllowedCaller:
    """An allow-list entry: a calling AE title, optionally only from an address or network.

    ``host``: an IP address (``"10.0.0.1"``) or network (``"10.0.0.0/24"``); ``None`` = any host.
    Host names are not accepted: resolving them at each association is neither fast nor safe.
    """

    ae_title: str
    host: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", validate_ae_title(self.ae_title, "allowed calling AE title"))
        if self.host is not None:
            _parse_network(self.host)

    def matches(self, calling_ae: str, address: str) -> bool:
        """True when the title is this entry's and the peer address is inside its host/network."""
        if calling_ae.strip() != self.ae_title:
            return False
        if self.host is None:
            return True
        peer = _parse_address(address)
        return peer is not None and peer in _parse_network(self.host)


def _parse_network(host: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(host, strict=False)
    except ValueError as exc:
        raise ValueError(
            f"allowed caller host must be an IP address or network such as 10.0.0.0/24, got {host!r}"
        ) from exc


def _parse_address(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The peer's address, an IPv4-mapped IPv6 address as plain IPv4; ``None`` if not an IP."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return parsed.ipv4_mapped
    return parsed


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for DICOM TLS (PS3.15 B.9). ``client_ca`` set: mutual TLS, every client must
    present a certificate signed by that CA."""

    certificate: Path
    private_key: Path
    client_ca: Path | None = None


#: Default largest instance accepted by C-STORE (bytes): 512 MiB.
DEFAULT_MAX_INSTANCE_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class ListenerSettings:
    """How the node listens. ``port`` 0 picks a free port (see :attr:`StorageSCP.port`);
    ``max_pdu`` 0 means no maximum is announced (a P-DATA-TF PDU is then bounded by
    ``max_instance_bytes``); an empty ``allowed_callers`` accepts any calling AE title;
    ``max_associations_per_host`` ``None`` is ``max_associations - 2`` (at least 1): one host can
    never take the last two slots."""

    ae_title: str = "PACSXAI"
    bind_address: str = "127.0.0.1"
    port: int = 11112
    max_associations: int = 10
    max_pdu: int = 0
    max_associations_per_host: int | None = None
    max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES
    acse_timeout: float = 30
    dimse_timeout: float = 60
    network_timeout: float = 60
    allowed_callers: tuple[AllowedCaller, ...] = ()
    tls: TlsFiles | None = None
    #: SO_REUSEPORT on the listening socket: several processes, each with its own listener, share
    #: one port and the kernel spreads the connections among them (Linux, BSD).
    reuse_port: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", validate_ae_title(self.ae_title, "listener AE title"))
        object.__setattr__(self, "allowed_callers", tuple(self.allowed_callers))
        _check_range("listener port", self.port, 0, 65535)
        _check_range("max_associations", self.max_associations, 1, 10_000)
        _check_range("max_pdu", self.max_pdu, 0, 2**32 - 1)
        if self.max_associations_per_host is not None:
            _check_range("max_associations_per_host", self.max_associations_per_host, 1, self.max_associations)
        _check_range("max_instance_bytes", self.max_instance_bytes, 1, 2**48)
        for name in ("acse_timeout", "dimse_timeout", "network_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        for entry in self.allowed_callers:
            if not isinstance(entry, AllowedCaller):
                raise ValueError(f"allowed_callers holds AllowedCaller entries, got {entry!r}")

    @property
    def per_host(self) -> int:
        """Connections one calling address may hold at the same time."""
        if self.max_associations_per_host is not None:
            return self.max_associations_per_host
        return max(1, self.max_associations - 2)

    def pdu_limits(self) -> PduLimits:
        p_data = self.max_pdu if self.max_pdu > 0 else min(self.max_instance_bytes + (1 << 16), 2**32 - 1)
        return PduLimits(p_data, self.max_instance_bytes, float(self.acse_timeout), float(self.network_timeout))


def _check_range(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer {low}-{high}, got {value!r}")


class StorageEvents(Protocol):
    """What the node does with what arrives; implemented by the service (spool + journal).

    Called from the association threads (several at once when several associations are open);
    for one association the calls come in order, and ``on_association_released`` comes once,
    after its last ``on_store``.
    """

    def on_store(self, encoded: bytes, *, calling_ae: str, association_id: str) -> int:
        """Keep one object: ``encoded`` is the data set as a DICOM Part 10 file (preamble, File
        Meta with the transfer syntax it arrived in, data set). Return the DIMSE status to send:
        0x0000 only once it is durably stored."""
        ...

    def on_association_released(self, association_id: str) -> None:
        """The association ended (released or aborted): no more objects will come on it."""
        ...

    def on_association_rejected(self, calling_ae: str, host: str, reason: str) -> None:
        """An association was refused (``calling_ae`` is empty when the TLS handshake failed)."""
        ...

    def on_association_accepted(self, calling_ae: str, host: str, association_id: str) -> None:
        """An association was accepted; objects on it carry ``association_id``."""
        ...

    # Optional (called only where the implementation has it):
    # def on_store_file(self, path: Path, *, calling_ae: str, association_id: str) -> int:
    #     """As on_store, with the Part 10 file the data set was written to as it arrived; the
    #     implementation may move it away (it is deleted after the call otherwise)."""
    # def on_store_refused(self, reason: str, *, calling_ae: str, association_id: str) -> None:
    #     """A C-STORE was answered 0xA700 before ``on_store`` (its data set was over the size limit)."""


@dataclass
class _AssociationState:
    """One accepted association: its id and the lock that orders its stores before its end."""

    association_id: str
    calling_ae: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    ended: bool = False


class _AssociationRegistry:
    """Association id per live acceptor association (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[Association, _AssociationState] = {}

    def open(self, assoc: Association, calling_ae: str) -> _AssociationState:
        """A new state, returned with its lock held (the caller reports the acceptance, then releases
        it): the end of the association, which takes the lock, is reported after its acceptance even
        when the connection closes at once (the end can arrive on another thread)."""
        state = _AssociationState(f"{calling_ae}-{uuid.uuid4().hex[:8]}", calling_ae)
        state.lock.acquire()
        with self._lock:
            self._states[assoc] = state
        return state

    def get(self, assoc: Association) -> _AssociationState | None:
        with self._lock:
            return self._states.get(assoc)

    def close(self, assoc: Association) -> _AssociationState | None:
        with self._lock:
            return self._states.pop(assoc, None)


@dataclass(frozen=True)
class _Listener:
    """What the event handlers need, passed to them as pynetdicom handler arguments."""

    settings: ListenerSettings
    events: StorageEvents
    associations: _AssociationRegistry


class _NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server, with TCP_NODELAY at accept, the TLS handshake
    moved from the accept loop into the connection's own thread, a limit of connections per
    calling address, and the guarded associations of :mod:`dicom_io.net.guard`."""

    # Handshake threads may still be waiting when the server stops: do not join them.
    daemon_threads = True
    block_on_close = False

    def __init__(
        self,
        *args: Any,
        handshake_timeout: float,
        on_refusal: Callable[[str, str, str], None],
        gate: ConnectionGate,
        pdu_limits: PduLimits,
        reuse_port: bool = False,
        **kwargs: Any,
    ) -> None:
        self._handshake_timeout = handshake_timeout
        self._on_refusal = on_refusal
        self._stopping = threading.Event()
        self.gate = gate
        self.pdu_limits = pdu_limits
        self._slots: dict[Any, Slot] = {}
        self._slots_lock = threading.Lock()
        self._reuse_port = reuse_port
        super().__init__(*args, request_handler=GuardedRequestHandler, **kwargs)

    def server_bind(self) -> None:
        """SO_REUSEPORT before the bind when asked (pynetdicom's own bind sets SO_REUSEADDR only)."""
        if self._reuse_port:
            cast(socket.socket, self.socket).setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection (TLS comes later, in :meth:`process_request_thread`)."""
        client, address = cast(socket.socket, self.socket).accept()
        set_tcp_nodelay(client)
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """In the connection's thread: the host's limit, the TLS handshake if configured, then the association."""
        host = str(client_address[0])
        slot = self.gate.admit(host)
        if slot is None:
            reason = (
                f"Local limit exceeded: {self.gate.per_host} connections from {host} already open "
                "(max_associations_per_host)"
            )
            LOGGER.warning("refusing connection from %s:%s: %s", host, client_address[1], reason)
            calling_ae = _UNKNOWN_CALLER
            if self.ssl_context is None:
                calling_ae = reject_pdu(request)
            else:
                self.shutdown_request(request)
            self._on_refusal(calling_ae, host, reason)
            return
        try:
            if self.ssl_context is not None:
                request = self._tls_handshake(request, client_address)
                if request is None:
                    slot.release()
                    return
            if self._stopping.is_set():
                LOGGER.info("closing connection from %s: the node is stopping", host)
                self.shutdown_request(request)
                slot.release()
                return
            with self._slots_lock:
                self._slots[request] = slot
            super().process_request_thread(request, client_address)
        except BaseException:
            slot.release()
            raise
        finally:
            with self._slots_lock:
                self._slots.pop(request, None)
        if not slot.taken:
            slot.release()

    def connection_slot(self, request: Any) -> Slot:
        """The slot admitted for ``request`` (the guarded request handler takes it over)."""
        with self._slots_lock:
            slot = self._slots.pop(request)
        slot.taken = True
        return slot

    def _tls_handshake(self, request: socket.socket, client_address: tuple[str, int]) -> ssl.SSLSocket | None:
        previous_timeout = request.gettimeout()
        try:
            request.settimeout(self._handshake_timeout)
            tls_socket = cast(ssl.SSLContext, self.ssl_context).wrap_socket(request, server_side=True)
            tls_socket.settimeout(previous_timeout)
            return tls_socket
        except (OSError, ValueError) as exc:  # ssl.SSLError and TimeoutError are OSErrors
            reason = f"TLS handshake failed: {exc}"
            LOGGER.warning("refusing connection from %s:%s: %s", client_address[0], client_address[1], reason)
            self._on_refusal(_UNKNOWN_CALLER, str(client_address[0]), reason)
            self.shutdown_request(request)
            return None

    def shutdown(self) -> None:
        """Stop the accept loop and close the listening socket."""
        self._stopping.set()
        socketserver.BaseServer.shutdown(self)  # pynetdicom's also unregisters from AE.start_server
        self.server_close()


class StorageSCP:
    """The listening node: Verification and all storage SOP classes, as :class:`ListenerSettings`
    says, with what arrives handed to ``events``.

    ``extra_handlers``: more ``(event, handler)`` or ``(event, handler, args)`` pynetdicom
    bindings (metrics, tests); they run after the node's own handlers for the same event.
    """

    def __init__(
        self,
        settings: ListenerSettings,
        events: StorageEvents,
        *,
        extra_handlers: Sequence[
            tuple[EventType, Callable[..., Any]] | tuple[EventType, Callable[..., Any], list[Any]]
        ] = (),
    ) -> None:
        self._listener = _Listener(settings, events, _AssociationRegistry())
        self._extra_handlers = list(extra_handlers)
        self._ssl_context = _tls_context(settings.tls)
        self._server: _NodeServer | None = None

    @property
    def settings(self) -> ListenerSettings:
        return self._listener.settings

    def start(self) -> None:
        """Bind and serve in a background thread (returns at once)."""
        if self._server is not None:
            raise RuntimeError(f"StorageSCP {self.settings.ae_title} is already listening on port {self.port}")
        settings = self.settings
        server = _build_ae(settings).make_server(
            (settings.bind_address, settings.port),
            ssl_context=self._ssl_context,
            evt_handlers=_handlers(self._listener) + self._extra_handlers,
            server_class=_NodeServer,
            handshake_timeout=settings.acse_timeout,
            on_refusal=functools.partial(_report_rejection, self._listener),
            gate=ConnectionGate(settings.per_host),
            pdu_limits=settings.pdu_limits(),
            reuse_port=settings.reuse_port,
        )
        serve = functools.partial(server.serve_forever, poll_interval=_POLL_INTERVAL)
        threading.Thread(target=serve, name=f"StorageSCP-{settings.ae_title}", daemon=True).start()
        self._server = server
        LOGGER.info(
            "listening as %s on %s:%d (TLS %s, %d allowed callers)",
            settings.ae_title,
            settings.bind_address,
            self.port,
            _tls_mode(settings.tls),
            len(settings.allowed_callers),
        )

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, then wait up to ``timeout`` s for open associations to end; those still
        open then are aborted (their unacknowledged objects are the sender's to resend)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        deadline = time.monotonic() + timeout
        for assoc in server.active_associations:
            assoc.join(max(0.0, deadline - time.monotonic()))
        for assoc in server.active_associations:
            LOGGER.warning("aborting association %s still open after %.0f s at stop", _peer(assoc), timeout)
            assoc.abort()
        LOGGER.info("stopped listening as %s", self.settings.ae_title)

    def open_associations(self) -> int:
        """Association slots in use now (pynetdicom's count behind "local limit exceeded")."""
        server = self._server
        return len(server.active_associations) if server is not None else 0

    def open_connections(self) -> int:
        """TCP connections open now, in any phase (TLS handshake, before the request, associated)."""
        server = self._server
        return server.gate.live() if server is not None else 0

    @property
    def port(self) -> int:
        """The TCP port bound (the chosen one when the settings say 0)."""
        if self._server is None:
            raise RuntimeError(f"StorageSCP {self.settings.ae_title} is not listening: call start() first")
        return int(self._server.server_address[1])

    def __enter__(self) -> StorageSCP:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _tls_context(tls: TlsFiles | None) -> ssl.SSLContext | None:
    if tls is None:
        return None
    return server_ssl_context(tls.certificate, tls.private_key, tls.client_ca)


def _tls_mode(tls: TlsFiles | None) -> str:
    if tls is None:
        return "off"
    return "mutual" if tls.client_ca is not None else "server certificate"


def _build_ae(settings: ListenerSettings) -> AE:
    """The pynetdicom AE: limits, timeouts, AE title checks and the supported contexts.

    Supported (acceptor) contexts are not limited to 128 the way requested ones are, so every
    storage SOP class gets the full transfer syntax list.
    """
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.max_pdu
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    ae.require_called_aet = True
    ae.require_calling_aet = sorted({entry.ae_title for entry in settings.allowed_callers})
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, list(SUPPORTED_TRANSFER_SYNTAXES))
    return ae


def _handlers(listener: _Listener) -> list[tuple[EventType, Callable[..., Any], list[Any]]]:
    return [
        (evt.EVT_REQUESTED, _handle_association_request, [listener]),
        (evt.EVT_ACCEPTED, _handle_association_accepted, [listener]),
        (evt.EVT_REJECTED, _handle_builtin_rejection, [listener]),
        (evt.EVT_C_ECHO, _handle_echo, [listener]),
        (evt.EVT_C_STORE, _handle_store, [listener]),
        (evt.EVT_RELEASED, _handle_association_end, [listener]),
        (evt.EVT_ABORTED, _handle_association_end, [listener]),
        (evt.EVT_CONN_CLOSE, _handle_association_end, [listener]),
    ]


def _peer(assoc: Association) -> str:
    """``host:port`` of the peer (no patient data: only the network address)."""
    try:
        return f"{assoc.requestor.address}:{assoc.requestor.port}"
    except (AttributeError, ValueError):
        return "unknown peer"


def _handle_association_request(event: Event, listener: _Listener) -> None:
    """EVT_REQUESTED: check the called AE title and the calling AE/host allow-list; reject with
    A-ASSOCIATE-RJ (rejected permanent, service user, reason) when one does not pass."""
    assoc = event.assoc
    primitive = assoc.requestor.primitive
    calling_ae = str(primitive.calling_ae_title).strip()
    host = str(assoc.requestor.address)
    try:
        refusal = _refusal(listener.settings, calling_ae, str(primitive.called_ae_title).strip(), host)
    except Exception as exc:  # fail closed: a bug in the check must not let a caller in
        LOGGER.exception("checking association request from %s failed; rejecting it", _peer(assoc))
        refusal = (_NO_REASON_GIVEN, f"association check failed: {exc!r}")
    if refusal is None:
        return
    diagnostic, reason = refusal
    LOGGER.warning("rejecting association from %s (calling AE %r): %s", _peer(assoc), calling_ae, reason)
    assoc.acse.send_reject(_REJECTED_PERMANENT, _SOURCE_SERVICE_USER, diagnostic)
    _report_rejection(listener, calling_ae, host, reason)
    assoc.kill()


def _refusal(settings: ListenerSettings, calling_ae: str, called_ae: str, host: str) -> tuple[int, str] | None:
    """``(A-ASSOCIATE-RJ diagnostic, reason)`` when the request must be rejected, else ``None``."""
    if called_ae != settings.ae_title:
        return _CALLED_AE_NOT_RECOGNISED, f"called AE title {called_ae!r} is not this node's {settings.ae_title!r}"
    callers = settings.allowed_callers
    if not callers or any(entry.matches(calling_ae, host) for entry in callers):
        return None
    if any(entry.ae_title == calling_ae for entry in callers):
        return _CALLING_AE_NOT_RECOGNISED, f"calling AE title {calling_ae!r} is not allowed from host {host}"
    return _CALLING_AE_NOT_RECOGNISED, f"calling AE title {calling_ae!r} is not in the allow-list"


def _handle_builtin_rejection(event: Event, listener: _Listener) -> None:
    """EVT_REJECTED: a rejection pynetdicom made itself (too many associations: rejected
    transient, "local limit exceeded"); the node's own rejections are reported where made."""
    assoc = event.assoc
    primitive = assoc.acceptor.primitive
    reason = f"{primitive.result_str}, source {primitive.source_str}: {primitive.reason_str}"
    calling_ae = str(assoc.requestor.primitive.calling_ae_title).strip()
    LOGGER.warning("rejected association from %s (calling AE %r): %s", _peer(assoc), calling_ae, reason)
    _report_rejection(listener, calling_ae, str(assoc.requestor.address), reason)


def _report_rejection(listener: _Listener, calling_ae: str, host: str, reason: str) -> None:
    try:
        listener.events.on_association_rejected(calling_ae, host, reason)
    except Exception:
        LOGGER.exception("on_association_rejected failed for calling AE %r from %s", calling_ae, host)


def _handle_association_accepted(event: Event, listener: _Listener) -> None:
    """EVT_ACCEPTED: give the association its id and report it."""
    assoc = event.assoc
    calling_ae = str(assoc.requestor.ae_title).strip()
    state = listener.associations.open(assoc, calling_ae)  # its lock held: the end waits for this report
    try:
        LOGGER.info("association %s accepted from %s", state.association_id, _peer(assoc))
        listener.events.on_association_accepted(calling_ae, str(assoc.requestor.address), state.association_id)
    except Exception:
        LOGGER.exception("on_association_accepted failed for association %s", state.association_id)
    finally:
        state.lock.release()


def _handle_echo(event: Event, listener: _Listener) -> int:
    """EVT_C_ECHO: Verification (PS3.4 Annex A) always answers Success."""
    LOGGER.debug("C-ECHO from %s", _peer(event.assoc))
    return Status.SUCCESS


def _handle_store(event: Event, listener: _Listener) -> int:
    """EVT_C_STORE: hand the encoded data set to ``on_store`` and answer with its status.

    Any failure here (no association state, association already ended, ``on_store`` raising or
    returning something that is not a status) answers 0xA700 out of resources, never Success.
    """
    sop_instance_uid = str(event.request.AffectedSOPInstanceUID)
    state = listener.associations.get(event.assoc)
    oversized = oversized_bytes(event.request)
    if oversized is not None:
        limit = listener.settings.max_instance_bytes
        reason = f"data set of {oversized} bytes is over max_instance_bytes ({limit}); its bytes were not kept"
        return _refuse(listener, state, sop_instance_uid, reason, event)
    unwritten = unwritten_reason(event.request)
    if unwritten is not None:  # a full disk while it arrived: the caller sends it again later
        return _refuse(listener, state, sop_instance_uid, unwritten, event)
    if state is None:
        LOGGER.error("C-STORE of %s from %s outside a known association", sop_instance_uid, _peer(event.assoc))
        return Status.OUT_OF_RESOURCES
    with state.lock:
        if state.ended:
            LOGGER.warning(
                "C-STORE of %s after association %s ended: not stored", sop_instance_uid, state.association_id
            )
            return Status.OUT_OF_RESOURCES
        status = _store(event, listener, state, sop_instance_uid)
    log = LOGGER.debug if status == Status.SUCCESS else LOGGER.warning
    log("C-STORE %s on association %s: %s", sop_instance_uid, state.association_id, describe_status(status))
    return status


def _refuse(
    listener: _Listener, state: _AssociationState | None, sop_instance_uid: str, reason: str, event: Event
) -> int:
    """0xA700 for a data set the guard could not keep as it arrived (over ``max_instance_bytes``,
    or its file not written), reported to ``on_store_refused``."""
    LOGGER.warning("C-STORE of %s from %s refused: %s", sop_instance_uid, _peer(event.assoc), reason)
    refused = getattr(listener.events, "on_store_refused", None)
    if refused is not None:
        try:
            refused(
                reason,
                calling_ae=state.calling_ae if state else "",
                association_id=state.association_id if state else "",
            )
        except Exception:
            LOGGER.exception("on_store_refused failed for %s", sop_instance_uid)
    return Status.OUT_OF_RESOURCES


def _store(event: Event, listener: _Listener, state: _AssociationState, sop_instance_uid: str) -> int:
    who = {"calling_ae": state.calling_ae, "association_id": state.association_id}
    try:
        path = _received_file(event)
        store_file = getattr(listener.events, "on_store_file", None)
        if path is None:
            status = listener.events.on_store(event.encoded_dataset(), **who)
        elif store_file is not None:
            status = store_file(path, **who)
        else:
            status = listener.events.on_store(path.read_bytes(), **who)
    except Exception:
        LOGGER.exception("storing %s from association %s failed", sop_instance_uid, state.association_id)
        return Status.OUT_OF_RESOURCES
    if not isinstance(status, int) or isinstance(status, bool) or not 0 <= status <= 0xFFFF:
        LOGGER.error("on_store returned %r for %s, not a DIMSE status", status, sop_instance_uid)
        return Status.OUT_OF_RESOURCES
    return int(status)


def _received_file(event: Event) -> Path | None:
    """The Part 10 file pynetdicom wrote the data set to, or ``None`` when chunked receive was
    switched off (by other code in this process): then the data set is in memory."""
    try:
        path = event.dataset_path
    except AttributeError:
        return None
    return Path(path) if path else None


def _handle_association_end(event: Event, listener: _Listener) -> None:
    """EVT_RELEASED / EVT_ABORTED / EVT_CONN_CLOSE, whichever comes first: report the end once,
    after any store in progress on that association has finished. The file of a data set cut off
    half-way is removed."""
    dimse = getattr(event.assoc, "dimse", None)
    if isinstance(dimse, GuardedDIMSE):
        dimse.discard_unfinished()
    state = listener.associations.close(event.assoc)
    if state is None:
        return
    with state.lock:
        state.ended = True
    LOGGER.info("association %s ended (%s)", state.association_id, event.event.name)
    try:
        listener.events.on_association_released(state.association_id)
    except Exception:
        LOGGER.exception("on_association_released failed for association %s", state.association_id)
