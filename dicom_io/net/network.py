"""What the receiving (``scp``) and sending (``scu``) sides of the node share.

- :func:`set_tcp_nodelay`: switch Nagle's algorithm off on a DICOM socket. DIMSE messages are a
  small command PDU followed by data PDUs; with Nagle on, the peer's delayed ACK stalls each
  C-STORE by about 40 ms (11-23 images/s instead of hundreds).
- :func:`server_ssl_context` / :func:`client_ssl_context`: TLS for DICOM (PS3.15 Annex B,
  BCP 195: TLS 1.2 or newer) built from PEM file paths.
- :class:`Status` and :func:`classify_store_status`: the DIMSE status codes of the Storage
  Service Class (PS3.4 Annex B.2.3) and the general ones (PS3.7 Annex C), and what a C-STORE
  response status means for an object in the outbox: delivered, retry later, or dead-letter.
- :func:`validate_ae_title`: the AE VR rules (PS3.5 6.2), for every title the node is given.
"""

from __future__ import annotations

import enum
import socket
import ssl
from pathlib import Path
from typing import Literal

from dicom_io.vr import AE_MAX

__all__ = [
    "TLS12_CIPHERS",
    "StoreVerdict",
    "Status",
    "classify_store_status",
    "client_ssl_context",
    "describe_status",
    "server_ssl_context",
    "set_tcp_nodelay",
    "validate_ae_title",
]

StoreVerdict = Literal["delivered", "retry", "reject"]

# PS3.5 6.2: an AE title is at most AE_MAX (16) characters of the default repertoire, no backslash
# and no control characters; leading and trailing spaces are not significant.


class Status(enum.IntEnum):
    """DIMSE status codes the node sends or interprets (PS3.4 B.2.3, PS3.7 Annex C)."""

    SUCCESS = 0x0000
    #: Warning (PS3.7 Annex C): requested optional attributes are not supported.
    WARNING_OPTIONAL_ATTRIBUTES = 0x0001
    #: Warning (PS3.7 Annex C): attribute list error.
    WARNING_ATTRIBUTE_LIST = 0x0107
    #: Warning (PS3.7 Annex C): attribute value out of range.
    WARNING_VALUE_OUT_OF_RANGE = 0x0116
    #: Warning (PS3.4 B.2.3): coercion of data elements.
    WARNING_COERCION = 0xB000
    #: Warning (PS3.4 B.2.3): data set does not match SOP class.
    WARNING_DATASET_MISMATCH = 0xB007
    #: Warning (PS3.4 B.2.3): elements discarded.
    WARNING_ELEMENTS_DISCARDED = 0xB006
    #: Failure (PS3.4 B.2.3, 0xA7xx): refused, out of resources. Transient: try again later.
    OUT_OF_RESOURCES = 0xA700
    #: Failure (PS3.4 B.2.3, 0xA9xx): data set does not match SOP class.
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    #: Failure (PS3.4 B.2.3, 0xCxxx): cannot understand.
    CANNOT_UNDERSTAND = 0xC000
    #: Failure (PS3.7 Annex C): processing failure.
    PROCESSING_FAILURE = 0x0110
    #: Failure (PS3.7 Annex C): duplicate SOP instance.
    DUPLICATE_SOP_INSTANCE = 0x0111
    #: Failure (PS3.7 Annex C): SOP class not supported.
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    #: Failure (PS3.7 Annex C): refused, not authorized.
    NOT_AUTHORIZED = 0x0124
    #: Failure (PS3.7 Annex C): resource limitation. Transient, like out of resources.
    RESOURCE_LIMITATION = 0x0213


_WARNINGS = frozenset(
    {Status.WARNING_OPTIONAL_ATTRIBUTES, Status.WARNING_ATTRIBUTE_LIST, Status.WARNING_VALUE_OUT_OF_RANGE}
)


def _is_warning(status: int) -> bool:
    return status in _WARNINGS or 0xB000 <= status <= 0xBFFF


def _is_transient_failure(status: int) -> bool:
    return 0xA700 <= status <= 0xA7FF or status == Status.RESOURCE_LIMITATION


def classify_store_status(status: int) -> StoreVerdict:
    """What a C-STORE response status means for the object that was sent.

    ``"delivered"``: success (0x0000) or a warning (0x0001, 0x0107, 0x0116, 0xB000-0xBFFF), the
    destination keeps the object. ``"retry"``: out of resources (0xA700-0xA7FF) or resource
    limitation (0x0213), the destination may take it later. ``"reject"``: every other status is a
    failure that sending the same bytes again will not change (cannot understand, does not match
    SOP class, SOP class not supported, ...); the object goes to the dead letter.
    """
    if not isinstance(status, int) or isinstance(status, bool) or not 0 <= status <= 0xFFFF:
        raise ValueError(f"a DIMSE status is an integer 0x0000-0xFFFF, got {status!r}")
    if status == Status.SUCCESS or _is_warning(status):
        return "delivered"
    if _is_transient_failure(status):
        return "retry"
    return "reject"


def describe_status(status: int) -> str:
    """``"0xA700 (out of resources)"``: a status for logs and outcome details."""
    try:
        name = Status(status).name.lower().replace("_", " ")
    except ValueError:
        name = _range_name(status)
    return f"0x{status:04X} ({name})"


def _range_name(status: int) -> str:
    if 0xA700 <= status <= 0xA7FF:
        return "out of resources"
    if 0xA900 <= status <= 0xA9FF:
        return "data set does not match SOP class"
    if 0xC000 <= status <= 0xCFFF:
        return "cannot understand"
    if 0xB000 <= status <= 0xBFFF:
        return "warning"
    return "unknown status"


def set_tcp_nodelay(sock: socket.socket) -> None:
    """Switch Nagle's algorithm off (TCP_NODELAY=1) on a connected TCP socket, TLS or not.

    ``ssl.SSLSocket`` passes socket options to the TCP socket underneath, so the same call serves
    both. Raises ``OSError`` (from the operating system) if the socket is not a TCP socket.
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _require_file(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist or is not a file")
    return path


#: TLS 1.2 cipher suites allowed (RFC 9325 / BCP 195 4.2): forward secrecy (ECDHE, DHE) and AEAD
#: (AES-GCM, ChaCha20-Poly1305) only; CBC, SHA-1 MACs, static RSA key exchange are left out.
#: TLS 1.3 suites are all AEAD with forward secrecy and stay as OpenSSL has them.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!PSK:!SRP"


def _restrict(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    return context


def server_ssl_context(certificate: Path, private_key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """TLS context for the listening side (PS3.15 B.9, BCP 195: TLS 1.2 or newer, and for TLS 1.2
    only the forward-secret AEAD suites of :data:`TLS12_CIPHERS`).

    ``certificate``/``private_key``: the node's PEM certificate (chain) and key. With
    ``client_ca`` (PEM), the client must present a certificate signed by that CA (mutual TLS,
    ``CERT_REQUIRED``); without it, clients are not asked for one.
    """
    context = _restrict(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.load_cert_chain(
        _require_file(certificate, "TLS certificate"), _require_file(private_key, "TLS private key")
    )
    if client_ca is not None:
        context.load_verify_locations(cafile=_require_file(client_ca, "TLS client CA"))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_ssl_context(ca: Path, certificate: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """TLS context for the connecting side: the peer's certificate must chain to ``ca`` (PEM) and
    name the host that is dialled (checked hostname). ``certificate`` and ``key`` (both or
    neither) are this node's own, for peers that require mutual TLS."""
    if (certificate is None) != (key is None):
        raise ValueError(
            f"a TLS client certificate needs its key and vice versa, got certificate={certificate!s} key={key!s}"
        )
    context = _restrict(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    context.load_verify_locations(cafile=_require_file(ca, "TLS CA"))
    if certificate is not None and key is not None:
        context.load_cert_chain(_require_file(certificate, "TLS certificate"), _require_file(key, "TLS private key"))
    return context


def validate_ae_title(value: str, what: str = "AE title") -> str:
    """The AE title without its insignificant spaces; ``ValueError`` naming the value otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {value!r}")
    title = value.strip()
    if not title:
        raise ValueError(f"{what} must not be empty or only spaces, got {value!r}")
    if len(title) > AE_MAX:
        raise ValueError(f"{what} is at most {AE_MAX} characters, got {value!r} ({len(title)})")
    if "\\" in title or any(ord(ch) < 0x20 or ord(ch) > 0x7E for ch in title):
        raise ValueError(f"{what} allows printable ASCII without backslash, got {value!r}")
    return title


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (bind to port 0, read it, close).

    For local peers started next (tests, benchmarks, the viewer stack); another process may take
    it in between, so use it at once.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
