"""Play a :mod:`tests.torture.wire_cases` case against a listening node over a real socket and say
what the node did: rejected, aborted, answered a status, or closed; and how fast."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from tests.torture import pdu as P
from tests.torture.wire_cases import Case, ExpectAccept, Send


@dataclass(frozen=True)
class Outcome:
    """How one case ended, seen from the client."""

    kind: str  # rejected | aborted | failure status | success status | released | closed | still open
    statuses: tuple[int, ...]
    answer: str
    seconds: float

    @property
    def prompt(self) -> bool:
        return self.kind != "still open"


def connect(host: str, port: int, source: str | None = None, timeout: float = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if source is not None:
        sock.bind((source, 0))
    sock.settimeout(timeout)
    sock.connect((host, port))
    return sock


def play(case: Case, host: str, port: int, *, source: str | None = None, limit: float = 5.0) -> Outcome:
    """Send the case's steps, then read until the node closes (at most ``limit`` s after the last step).

    A status (or an A-ASSOCIATE-AC to a mutated request the node found acceptable) is followed by
    an A-RELEASE-RQ from the client, as a real sender would do; the node must then release and close.
    """
    started = time.monotonic()
    received: list[tuple[int, bytes]] = []
    with connect(host, port, source) as sock:
        for step in case.steps:
            if isinstance(step, ExpectAccept):
                sock.settimeout(limit)
                try:
                    got = P.read_pdu(sock)
                except (TimeoutError, OSError):
                    got = None
                if got is None:
                    return _classify(received, closed=True, started=started)
                received.append(got)
                if got[0] != P.A_ASSOCIATE_AC:
                    break
            elif isinstance(step, Send):
                try:
                    sock.sendall(step.data)
                except OSError:  # the node closed while we were sending: it reacted already
                    break
        if case.ending == "half-close":
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        closed = _read_rest(sock, received, limit)
    return _classify(received, closed=closed, started=started)


def _read_rest(sock: socket.socket, received: list[tuple[int, bytes]], limit: float) -> bool:
    deadline = time.monotonic() + limit
    released = False
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        sock.settimeout(remaining)
        try:
            got = P.read_pdu(sock)
        except TimeoutError:
            return False
        except OSError:
            return True
        if got is None:
            return True
        received.append(got)
        if got[0] in (P.P_DATA_TF, P.A_ASSOCIATE_AC) and not released:
            released = True
            try:
                sock.sendall(P.RELEASE_RQ)
            except OSError:
                return True


def _classify(received: list[tuple[int, bytes]], *, closed: bool, started: float) -> Outcome:
    types = [t for t, _ in received]
    statuses = tuple(s for t, body in received if t == P.P_DATA_TF if (s := P.dimse_status(body)) is not None)
    answer = ", ".join(P.PDU_NAMES.get(t, f"0x{t:02X}") for t in types) or "nothing"
    seconds = time.monotonic() - started
    if not closed:
        kind = "still open"
    elif P.A_ASSOCIATE_RJ in types:
        kind = "rejected"
    elif any(status != 0 for status in statuses):
        kind = "failure status"
    elif statuses:
        kind = "success status"
    elif P.A_ABORT in types:
        kind = "aborted"
    elif P.A_RELEASE_RP in types:
        kind = "accepted, released" if P.A_ASSOCIATE_AC in types else "released"
    else:
        kind = "closed"
    return Outcome(kind, statuses, answer, seconds)


def echo(host: str, port: int, *, source: str | None = None, calling: str = "VALID", timeout: float = 10.0) -> str:
    """A complete, valid C-ECHO association in raw bytes; ``"ok"`` or what went wrong."""
    try:
        with connect(host, port, source, timeout) as sock:
            sock.sendall(P.associate_rq(calling=calling))
            got = P.read_pdu(sock)
            if got is None or got[0] != P.A_ASSOCIATE_AC:
                return f"no A-ASSOCIATE-AC: {_describe(got)}"
            sock.sendall(P.p_data(P.pdv(1, 0x03, P.echo_rq())))
            got = P.read_pdu(sock)
            if got is None or got[0] != P.P_DATA_TF or P.dimse_status(got[1]) != 0:
                return f"no C-ECHO success: {_describe(got)}"
            sock.sendall(P.RELEASE_RQ)
            got = P.read_pdu(sock)
            if got is None or got[0] != P.A_RELEASE_RP:
                return f"no A-RELEASE-RP: {_describe(got)}"
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def _describe(got: tuple[int, bytes] | None) -> str:
    if got is None:
        return "connection closed"
    name = P.PDU_NAMES.get(got[0], f"0x{got[0]:02X}")
    if got[0] == P.A_ASSOCIATE_RJ and len(got[1]) >= 4:
        return f"{name} (result {got[1][1]}, source {got[1][2]}, reason {got[1][3]})"
    return name
