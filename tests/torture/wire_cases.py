"""Garbage on the wire: a seeded generator of broken DICOM Upper Layer conversations.

Why a generator of our own and not hypothesis: every case is a real TCP connection to a running
node, so the budget is spent on sockets, not on search; the cases follow the grammar of PS3.8
(which part of which PDU is broken is the point), every category gets an exact share of the
budget, and case ``i`` of seed ``s`` is rebuilt from those two numbers alone (a failure prints
them). Shrinking would not help much either: a case is a handful of bytes already.

A case is a list of steps: bytes to send, "read the A-ASSOCIATE-AC" (a valid association first,
so the garbage lands in the established state), and how it ends: ``hold`` (the connection stays
open: the node must notice the garbage and close it by itself) or ``half-close`` (the client
stops sending, as when a truncated PDU is all there is).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO

import numpy as np
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import generate_uid

from tests.torture import pdu as P

STORE_CONTEXTS = (
    (1, P.VERIFICATION, (P.IMPLICIT_LE,)),
    (3, P.SECONDARY_CAPTURE, (P.IMPLICIT_LE,)),
    (5, P.SECONDARY_CAPTURE, (P.EXPLICIT_LE,)),
    (7, P.SECONDARY_CAPTURE, (P.EXPLICIT_BE,)),
)
#: Context ids the node accepts in :data:`STORE_CONTEXTS`: Verification, SC in three syntaxes.
ECHO_ID, IMPLICIT_ID, EXPLICIT_ID, BIG_ENDIAN_ID = 1, 3, 5, 7


@dataclass(frozen=True)
class Send:
    data: bytes


@dataclass(frozen=True)
class ExpectAccept:
    """Read one PDU; the case goes on only if it is an A-ASSOCIATE-AC."""


Step = Send | ExpectAccept


@dataclass(frozen=True)
class Case:
    index: int
    category: str
    what: str
    steps: tuple[Step, ...]
    ending: str  # "hold" or "half-close"

    def reproduce(self, seed: int) -> str:
        return f"case {self.index} of seed {seed} ({self.category}: {self.what})"


def small_dataset(sop_instance_uid: str | None = None, *, rows: int = 8, cols: int = 8) -> Dataset:
    """A Secondary Capture with the four UIDs and a tiny image: what a valid C-STORE carries."""
    ds = Dataset()
    ds.SOPClassUID = P.SECONDARY_CAPTURE
    ds.SOPInstanceUID = sop_instance_uid or generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.PatientName = "WIRE^FUZZ"
    ds.PatientID = "WIRE-0"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.arange(rows * cols, dtype=np.uint8).tobytes()
    return ds


def encode_dataset(ds: Dataset, *, implicit: bool, little: bool = True) -> bytes:
    """The data set alone (no preamble, no File Meta), as a C-STORE carries it."""
    buffer = BytesIO()
    dcmwrite(buffer, ds, implicit_vr=implicit, little_endian=little)
    return buffer.getvalue()


def nested_sequences(depth: int) -> bytes:
    """Explicit VR LE elements: a sequence nested ``depth`` levels deep (undefined lengths)."""
    open_sq = struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF) + struct.pack(
        "<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF
    )
    close_sq = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return open_sq * depth + close_sq * depth


def associate(rng: random.Random, calling: str = "FUZZ") -> list[Step]:
    return [Send(P.associate_rq(calling=calling, contexts=STORE_CONTEXTS)), ExpectAccept()]


def store(context_id: int, dataset: bytes, sop_instance_uid: str, *, message_id: int = 1) -> bytes:
    command = P.store_rq(P.SECONDARY_CAPTURE, sop_instance_uid, message_id)
    return P.p_data(P.pdv(context_id, 0x03, command)) + P.p_data(P.pdv(context_id, 0x02, dataset))


def _flip(rng: random.Random, data: bytes, flips: int) -> bytes:
    raw = bytearray(data)
    for _ in range(flips):
        position = rng.randrange(len(raw))
        raw[position] ^= 1 << rng.randrange(8)
    return bytes(raw)


def _overwrite(rng: random.Random, data: bytes) -> bytes:
    raw = bytearray(data)
    position = rng.randrange(len(raw))
    width = rng.choice((1, 2, 4))
    raw[position : position + width] = rng.choice((b"\xff" * width, b"\x00" * width, rng.randbytes(width)))
    return bytes(raw[: len(data)])


# ---------------------------------------------------------------------------------- the categories


def random_bytes(rng: random.Random) -> tuple[str, list[Step], str]:
    size = rng.choice((1, 5, 6, 7, 64, 1000, 20000))
    data = rng.randbytes(size)
    # Fewer than 6 bytes are not even a PDU header: only the client's close (or the ACSE timeout) ends them.
    ending = "half-close" if size < 6 else rng.choice(("hold", "half-close"))
    return f"{size} random bytes", [Send(data)], ending


def truncated_pdu(rng: random.Random) -> tuple[str, list[Step], str]:
    whole = rng.choice(
        (
            P.associate_rq(contexts=STORE_CONTEXTS),
            P.RELEASE_RQ,
            P.ABORT,
            P.p_data(P.pdv(1, 0x03, P.echo_rq())),
        )
    )
    cut = rng.randrange(1, len(whole))
    return f"{cut} of {len(whole)} bytes of a PDU", [Send(whole[:cut])], "half-close"


def truncated_after_association(rng: random.Random) -> tuple[str, list[Step], str]:
    whole = rng.choice(
        (P.p_data(P.pdv(ECHO_ID, 0x03, P.echo_rq())), P.RELEASE_RQ, store(IMPLICIT_ID, b"\0" * 64, "1.2.3"))
    )
    cut = rng.randrange(1, len(whole))
    return f"association, then {cut} of {len(whole)} bytes", [*associate(rng), Send(whole[:cut])], "half-close"


def unknown_pdu_type(rng: random.Random) -> tuple[str, list[Step], str]:
    pdu_type = rng.choice([0x00, *range(0x08, 0x100)])
    body = rng.randbytes(rng.choice((0, 4, 100)))
    steps: list[Step] = [] if rng.random() < 0.5 else associate(rng)
    where = "after association" if steps else "first"
    return f"PDU type 0x{pdu_type:02X} {where}", [*steps, Send(P.pdu(pdu_type, body))], "hold"


def length_beyond_data(rng: random.Random) -> tuple[str, list[Step], str]:
    body = P.associate_rq(contexts=STORE_CONTEXTS)[6:]
    claimed = len(body) + rng.randrange(1, 100_000)
    pdu_type = rng.choice((P.A_ASSOCIATE_RQ, P.P_DATA_TF, P.A_RELEASE_RQ))
    steps: list[Step] = associate(rng) if pdu_type != P.A_ASSOCIATE_RQ else []
    return (
        f"{P.PDU_NAMES[pdu_type]} claiming {claimed} bytes, {len(body)} sent",
        [*steps, Send(P.pdu(pdu_type, body, length=claimed))],
        "half-close",
    )


def huge_length(rng: random.Random) -> tuple[str, list[Step], str]:
    claimed = rng.choice((0xFFFFFFFF, 0xFFFFFFF0, 0x80000000, 1 << 30))
    pdu_type = rng.choice((P.A_ASSOCIATE_RQ, P.P_DATA_TF))
    steps: list[Step] = associate(rng) if pdu_type == P.P_DATA_TF else []
    return (
        f"{P.PDU_NAMES[pdu_type]} claiming {claimed} bytes",
        [*steps, Send(P.pdu(pdu_type, rng.randbytes(rng.choice((0, 16, 4096))), length=claimed))],
        "hold",
    )


def p_data_without_association(rng: random.Random) -> tuple[str, list[Step], str]:
    kind = rng.choice(("echo", "store", "release", "abort-then-data"))
    if kind == "echo":
        data = P.p_data(P.pdv(1, 0x03, P.echo_rq()))
    elif kind == "store":
        data = store(3, encode_dataset(small_dataset(), implicit=True), generate_uid())
    elif kind == "release":
        data = P.RELEASE_RQ
    else:
        data = P.ABORT + P.p_data(P.pdv(1, 0x03, P.echo_rq()))
    return f"{kind} before any A-ASSOCIATE-RQ", [Send(data)], "hold"


def invalid_context_id(rng: random.Random) -> tuple[str, list[Step], str]:
    context_id = rng.choice((0, 2, 9, 11, 255, 128))
    kind = rng.choice(("echo", "store"))
    if kind == "echo":
        data = P.p_data(P.pdv(context_id, 0x03, P.echo_rq()))
    else:
        data = store(context_id, encode_dataset(small_dataset(), implicit=True), generate_uid())
    return f"{kind} on presentation context {context_id}", [*associate(rng), Send(data)], "hold"


def malformed_command(rng: random.Random) -> tuple[str, list[Step], str]:
    good = P.echo_rq() if rng.random() < 0.5 else P.store_rq(P.SECONDARY_CAPTURE, generate_uid())
    mutation = rng.choice(("flip", "overwrite", "truncate", "unknown-field", "bad-group-length", "no-last", "junk"))
    if mutation == "flip":
        command = _flip(rng, good, rng.randint(1, 4))
    elif mutation == "overwrite":
        command = _overwrite(rng, good)
    elif mutation == "truncate":
        command = good[: rng.randrange(0, len(good))]
    elif mutation == "unknown-field":
        command = P.command_set(
            [
                P.element(0, 0x0002, b"1.2.840.10008.1.1\0"),
                P.element(0, 0x0100, struct.pack("<H", rng.choice((0x0000, 0x0FFF, 0x7777, 0xFFFF)))),
                P.element(0, 0x0110, struct.pack("<H", 1)),
                P.element(0, 0x0800, struct.pack("<H", 0x0101)),
            ]
        )
    elif mutation == "bad-group-length":
        command = P.element(0, 0, struct.pack("<L", rng.choice((0, 3, 0xFFFFFFFF)))) + good[12:]
    elif mutation == "no-last":
        command = good  # sent as a non-last command fragment, then something else
    else:
        command = rng.randbytes(rng.choice((0, 1, 8, 200)))
    control = 0x01 if mutation == "no-last" else 0x03
    tail = P.p_data(P.pdv(ECHO_ID, 0x02, b"\0" * 8)) if mutation == "no-last" else b""
    data = P.p_data(P.pdv(rng.choice((ECHO_ID, IMPLICIT_ID)), control, command)) + tail
    return f"command set: {mutation}", [*associate(rng), Send(data)], "hold"


def contradicting_encoding(rng: random.Random) -> tuple[str, list[Step], str]:
    uid = generate_uid()
    ds = small_dataset(uid)
    contradiction = rng.choice(("explicit-on-implicit", "implicit-on-explicit", "little-on-big", "big-on-little"))
    context, data = {
        "explicit-on-implicit": (IMPLICIT_ID, encode_dataset(ds, implicit=False)),
        "implicit-on-explicit": (EXPLICIT_ID, encode_dataset(ds, implicit=True)),
        "little-on-big": (BIG_ENDIAN_ID, encode_dataset(ds, implicit=False)),
        "big-on-little": (EXPLICIT_ID, encode_dataset(ds, implicit=False, little=False)),
    }[contradiction]
    if rng.random() < 0.3:
        data = _flip(rng, data, rng.randint(1, 8))
    return f"data set {contradiction}", [*associate(rng), Send(store(context, data, uid))], "hold"


def element_past_end(rng: random.Random) -> tuple[str, list[Step], str]:
    uid = generate_uid()
    data = bytearray(encode_dataset(small_dataset(uid), implicit=False))
    # Explicit VR LE: point at an element header and make its length run past the end.
    offsets = [i for i in range(0, len(data) - 8, 2) if data[i + 4 : i + 6] in (b"UI", b"CS", b"PN", b"LO", b"US")]
    offset = rng.choice(offsets)
    data[offset + 6 : offset + 8] = struct.pack("<H", rng.choice((0xFFFE, 0x7FFF, len(data))))
    if rng.random() < 0.5:
        data += struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, rng.choice((0x7FFFFFF0, 0xFFFFFFF0, 1 << 20)))
    return (
        f"element at {offset} with a length past the end",
        [*associate(rng), Send(store(EXPLICIT_ID, bytes(data), uid))],
        "hold",
    )


def deep_sequences(rng: random.Random) -> tuple[str, list[Step], str]:
    uid = generate_uid()
    depth = rng.choice((200, 1000, 5000, 20000))
    head = encode_dataset(small_dataset(uid), implicit=False)
    data = head + nested_sequences(depth)
    return f"sequences nested {depth} deep", [*associate(rng), Send(store(EXPLICIT_ID, data, uid))], "hold"


def mutated_associate_rq(rng: random.Random) -> tuple[str, list[Step], str]:
    good = P.associate_rq(contexts=STORE_CONTEXTS)
    mutation = rng.choice(("flip", "overwrite", "item-length", "version", "many-contexts", "empty-ae", "truncate-item"))
    if mutation == "flip":
        data = good[:6] + _flip(rng, good[6:], rng.randint(1, 6))
    elif mutation == "overwrite":
        data = good[:6] + _overwrite(rng, good[6:])
    elif mutation == "item-length":
        raw = bytearray(good)
        offsets = [
            i
            for i in range(74, len(raw) - 4)
            if raw[i] in (0x10, 0x20, 0x30, 0x40, 0x50, 0x51, 0x52) and raw[i + 1] == 0
        ]
        offset = rng.choice(offsets)
        raw[offset + 2 : offset + 4] = struct.pack(">H", rng.choice((0, 1, 0xFFFF, 0x8000)))
        data = bytes(raw)
    elif mutation == "version":
        data = good[:6] + struct.pack(">H", rng.choice((0, 2, 0xFFFF))) + good[8:]
    elif mutation == "many-contexts":
        contexts = tuple(
            (1 + 2 * (i % 128), P.SECONDARY_CAPTURE, (P.IMPLICIT_LE,)) for i in range(rng.choice((129, 300)))
        )
        data = P.associate_rq(contexts=contexts)
    elif mutation == "empty-ae":
        data = good[:10] + b" " * 16 + good[26:]
    else:
        cut = rng.randrange(75, len(good) - 1)
        data = P.pdu(P.A_ASSOCIATE_RQ, good[6:cut])
    return f"A-ASSOCIATE-RQ: {mutation}", [Send(data)], "hold"


#: Every category with its generator; the budget is shared out evenly between them.
CATEGORIES: dict[str, Callable[[random.Random], tuple[str, list[Step], str]]] = {
    "random bytes": random_bytes,
    "truncated PDU": truncated_pdu,
    "truncated PDU after association": truncated_after_association,
    "unknown PDU type": unknown_pdu_type,
    "length larger than the data": length_beyond_data,
    "4 GB length claim": huge_length,
    "P-DATA before or without association": p_data_without_association,
    "invalid presentation context ID": invalid_context_id,
    "malformed DIMSE command set": malformed_command,
    "encoding contradicts the transfer syntax": contradicting_encoding,
    "element length past the end": element_past_end,
    "deeply nested sequences": deep_sequences,
    "mutated A-ASSOCIATE-RQ": mutated_associate_rq,
}


def generate(seed: int, count: int) -> Iterator[Case]:
    """``count`` cases, categories in turn, each rebuilt from ``(seed, index)`` alone."""
    names = list(CATEGORIES)
    for index in range(count):
        category = names[index % len(names)]
        rng = random.Random(f"{seed}:{index}")
        what, steps, ending = CATEGORIES[category](rng)
        yield Case(index, category, what, tuple(steps), ending)
