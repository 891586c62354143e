"""DICOM Upper Layer PDUs and DIMSE command sets built byte by byte (PS3.8 9.3, PS3.7 9/E), for
raw-socket tests: a well-formed client to compare against, and the parts the wire fuzzer breaks.

Nothing here uses pynetdicom: a test that sends these bytes checks the node against the standard,
not against the library the node is built on.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.10.1188.99"

# PDU types (PS3.8 9.3.1)
A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF = 0x01, 0x02, 0x03, 0x04
A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x05, 0x06, 0x07
PDU_NAMES = {
    A_ASSOCIATE_RQ: "A-ASSOCIATE-RQ",
    A_ASSOCIATE_AC: "A-ASSOCIATE-AC",
    A_ASSOCIATE_RJ: "A-ASSOCIATE-RJ",
    P_DATA_TF: "P-DATA-TF",
    A_RELEASE_RQ: "A-RELEASE-RQ",
    A_RELEASE_RP: "A-RELEASE-RP",
    A_ABORT: "A-ABORT",
}


def pdu(pdu_type: int, body: bytes, *, length: int | None = None) -> bytes:
    """Type, reserved byte, 4-byte big-endian length (``length`` overrides the true one), body."""
    return struct.pack(">BBL", pdu_type, 0, len(body) if length is None else length) + body


def item(item_type: int, body: bytes, *, length: int | None = None) -> bytes:
    """A variable item or sub-item: type, reserved, 2-byte big-endian length, body."""
    return struct.pack(">BBH", item_type, 0, len(body) if length is None else length) + body


def _ae(title: str) -> bytes:
    return title.encode("ascii").ljust(16, b" ")[:16]


def presentation_context(context_id: int, abstract_syntax: str, transfer_syntaxes: tuple[str, ...]) -> bytes:
    body = bytes([context_id, 0, 0, 0]) + item(0x30, abstract_syntax.encode())
    body += b"".join(item(0x40, ts.encode()) for ts in transfer_syntaxes)
    return item(0x20, body)


def user_information(max_length: int = 16384, implementation_uid: str = IMPLEMENTATION_UID) -> bytes:
    return item(0x50, item(0x51, struct.pack(">L", max_length)) + item(0x52, implementation_uid.encode()))


def associate_rq(
    called: str = "PACSXAI",
    calling: str = "FUZZ",
    contexts: tuple[tuple[int, str, tuple[str, ...]], ...] = ((1, VERIFICATION, (IMPLICIT_LE,)),),
    *,
    max_length: int = 16384,
) -> bytes:
    """An A-ASSOCIATE-RQ proposing ``contexts`` (id, abstract syntax, transfer syntaxes)."""
    body = struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + bytes(32)
    body += item(0x10, APPLICATION_CONTEXT.encode())
    body += b"".join(presentation_context(*context) for context in contexts)
    body += user_information(max_length)
    return pdu(A_ASSOCIATE_RQ, body)


def pdv(context_id: int, control: int, fragment: bytes, *, length: int | None = None) -> bytes:
    """One presentation data value item: length (context id + control + fragment), id, control header."""
    return struct.pack(">LBB", len(fragment) + 2 if length is None else length, context_id, control) + fragment


def p_data(*pdvs: bytes) -> bytes:
    return pdu(P_DATA_TF, b"".join(pdvs))


RELEASE_RQ = pdu(A_RELEASE_RQ, bytes(4))
ABORT = pdu(A_ABORT, bytes([0, 0, 0, 0]))


# ----------------------------------------------------------------------------------- DIMSE (PS3.7)


def element(group: int, elem: int, value: bytes, *, length: int | None = None) -> bytes:
    """An implicit VR little endian element (the command set's encoding, PS3.7 6.3.1)."""
    return struct.pack("<HHL", group, elem, len(value) if length is None else length) + value


def _ui(uid: str) -> bytes:
    raw = uid.encode()
    return raw + b"\0" if len(raw) % 2 else raw


def command_set(elements: list[bytes]) -> bytes:
    """``elements`` (group 0000, in order) behind their Command Group Length (0000,0000)."""
    body = b"".join(elements)
    return element(0, 0, struct.pack("<L", len(body))) + body


def echo_rq(message_id: int = 1) -> bytes:
    return command_set(
        [
            element(0, 0x0002, _ui(VERIFICATION)),
            element(0, 0x0100, struct.pack("<H", 0x0030)),
            element(0, 0x0110, struct.pack("<H", message_id)),
            element(0, 0x0800, struct.pack("<H", 0x0101)),
        ]
    )


def store_rq(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    return command_set(
        [
            element(0, 0x0002, _ui(sop_class)),
            element(0, 0x0100, struct.pack("<H", 0x0001)),
            element(0, 0x0110, struct.pack("<H", message_id)),
            element(0, 0x0700, struct.pack("<H", 0)),
            element(0, 0x0800, struct.pack("<H", 0x0000)),
            element(0, 0x1000, _ui(sop_instance)),
        ]
    )


# ----------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Answer:
    """What the node sent back before it closed the connection (or ``timeout`` passed)."""

    pdus: tuple[tuple[int, bytes], ...]  # (type, body) of each complete PDU received
    closed: bool  # the node closed the connection
    seconds: float

    @property
    def types(self) -> tuple[int, ...]:
        return tuple(t for t, _ in self.pdus)

    def describe(self) -> str:
        names = ", ".join(PDU_NAMES.get(t, f"0x{t:02X}") for t in self.types) or "nothing"
        return f"{names}; {'closed' if self.closed else 'still open'} after {self.seconds:.2f} s"


def read_pdu(sock: socket.socket) -> tuple[int, bytes] | None:
    """One complete PDU, or ``None`` when the connection closed first."""
    header = _read_exactly(sock, 6)
    if header is None:
        return None
    pdu_type, _, length = struct.unpack(">BBL", header)
    body = _read_exactly(sock, length)
    return None if body is None else (pdu_type, body)


def _read_exactly(sock: socket.socket, count: int) -> bytes | None:
    chunks, got = [], 0
    while got < count:
        chunk = sock.recv(min(65536, count - got))
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_until_closed(sock: socket.socket, timeout: float) -> Answer:
    """Every PDU the node sends until it closes the connection, waiting at most ``timeout`` s."""
    started = time.monotonic()
    pdus: list[tuple[int, bytes]] = []
    closed = False
    sock.settimeout(timeout)
    try:
        while True:
            got = read_pdu(sock)
            if got is None:
                closed = True
                break
            pdus.append(got)
            sock.settimeout(max(0.01, timeout - (time.monotonic() - started)))
    except TimeoutError:
        pass
    except OSError:  # reset by the peer: closed too
        closed = True
    return Answer(tuple(pdus), closed, time.monotonic() - started)


def dimse_status(p_data_body: bytes) -> int | None:
    """The Status (0000,0900) of the command set in a P-DATA-TF body (one PDV), if any."""
    offset = 0
    while offset + 6 <= len(p_data_body):
        (length,) = struct.unpack(">L", p_data_body[offset : offset + 4])
        control = p_data_body[offset + 5]
        fragment = p_data_body[offset + 6 : offset + 4 + length]
        offset += 4 + length
        if control & 1:
            position = 0
            while position + 8 <= len(fragment):
                group, elem, size = struct.unpack("<HHL", fragment[position : position + 8])
                if (group, elem) == (0, 0x0900):
                    return struct.unpack("<H", fragment[position + 8 : position + 10])[0]
                position += 8 + size
    return None
