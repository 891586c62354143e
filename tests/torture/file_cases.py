"""Garbage in the files: a seeded generator of mutated stored instances (PS3.10 files as the
receiver writes them), each rebuilt from ``(seed, index)``.

Mutations: a truncation anywhere, bit flips, a lying VR (an explicit VR replaced by another), a
lying length (an element's length field overwritten), pixel data shorter than Rows x Columns x
frames (the element's length made consistent, so only the image header lies), and image
attributes that contradict each other (Rows, Columns, Bits Allocated, Number of Frames, Samples
per Pixel).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from service.synthetic.phantoms import make_phantom

_VRS = (b"AE", b"AS", b"CS", b"DA", b"DS", b"FD", b"IS", b"LO", b"OB", b"OW", b"PN", b"SQ", b"UI", b"UL", b"US", b"UN")


@dataclass(frozen=True)
class FileCase:
    index: int
    mutation: str
    what: str
    data: bytes

    def reproduce(self, seed: int) -> str:
        return f"file case {self.index} of seed {seed} ({self.mutation}: {self.what})"


def base_instances(count: int = 3) -> list[bytes]:
    """Valid stored instances to mutate: chest phantoms (CR, 256 x 240) the demo model takes."""
    encoded = []
    for index in range(count):
        ds = make_phantom(index, ("normal", "nodule", "effusion")[index % 3], seed=77, rows=256, cols=240).dataset
        encoded.append(encode(ds))
    return encoded


def encode(ds: Dataset) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _element_offsets(data: bytes) -> list[int]:
    """Offsets of explicit-VR element headers (a known VR at +4), after the 132-byte preamble."""
    return [i for i in range(132, len(data) - 8, 2) if data[i + 4 : i + 6] in _VRS]


def truncate(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    cut = rng.randrange(1, len(data))
    return f"{cut} of {len(data)} bytes", data[:cut]


def bit_flips(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    raw = bytearray(data)
    flips = rng.choice((1, 4, 32, 256))
    # most flips land in the header (where they matter), some in the pixels
    header_end = min(len(raw), 2048)
    for _ in range(flips):
        position = rng.randrange(128, header_end) if rng.random() < 0.8 else rng.randrange(128, len(raw))
        raw[position] ^= 1 << rng.randrange(8)
    return f"{flips} bit flips", bytes(raw)


def lying_vr(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    raw = bytearray(data)
    offset = rng.choice(_element_offsets(data))
    new = rng.choice(_VRS)
    raw[offset + 4 : offset + 6] = new
    return f"VR at {offset} made {new.decode()}", bytes(raw)


def lying_length(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    raw = bytearray(data)
    offset = rng.choice(_element_offsets(data))
    vr = bytes(raw[offset + 4 : offset + 6])
    if vr in (b"OB", b"OW", b"SQ", b"UN"):
        raw[offset + 8 : offset + 12] = struct.pack("<L", rng.choice((0, 1, 0xFFFFFFFE, len(raw), 0x7FFFFFFF)))
    else:
        raw[offset + 6 : offset + 8] = struct.pack("<H", rng.choice((0, 1, 3, 0xFFFF, len(raw) & 0xFFFF)))
    return f"length of the {vr.decode()} element at {offset} overwritten", bytes(raw)


def short_pixels(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    from pydicom import dcmread

    ds = dcmread(BytesIO(data))
    keep = rng.choice((0, 2, len(ds.PixelData) // 2, len(ds.PixelData) - 2))
    ds.PixelData = ds.PixelData[:keep]
    ds.SOPInstanceUID = generate_uid()
    return f"{keep} of {ds.Rows * ds.Columns * 2} pixel bytes", encode(ds)


def contradicting_header(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    from pydicom import dcmread

    ds = dcmread(BytesIO(data))
    change = rng.choice(("rows", "columns", "bits", "frames", "samples", "zero", "photometric"))
    if change == "rows":
        ds.Rows = rng.choice((1, 65535, ds.Rows * 2))
    elif change == "columns":
        ds.Columns = rng.choice((1, 65535, ds.Columns + 1))
    elif change == "bits":
        ds.BitsAllocated = rng.choice((1, 7, 12, 32, 64))
    elif change == "frames":
        ds.NumberOfFrames = rng.choice((0, 2, 1000, 2**31 - 1))
    elif change == "samples":
        ds.SamplesPerPixel = rng.choice((0, 3, 4))
    elif change == "zero":
        ds.Rows = 0
    else:
        ds.PhotometricInterpretation = rng.choice(("RGB", "PALETTE COLOR", "YBR_FULL", "HSV", ""))
    ds.SOPInstanceUID = generate_uid()
    return f"{change} contradicts the pixel data", encode(ds)


MUTATIONS: dict[str, Callable[[random.Random, bytes], tuple[str, bytes]]] = {
    "truncation": truncate,
    "bit flips": bit_flips,
    "lying VR": lying_vr,
    "lying length": lying_length,
    "pixel data shorter than the image": short_pixels,
    "image attributes contradict the pixels": contradicting_header,
}


def generate(seed: int, count: int, bases: list[bytes]) -> Iterator[FileCase]:
    names = list(MUTATIONS)
    for index in range(count):
        rng = random.Random(f"{seed}:{index}")
        mutation = names[index % len(names)]
        what, data = MUTATIONS[mutation](rng, bases[rng.randrange(len(bases))])
        yield FileCase(index, mutation, what, data)
