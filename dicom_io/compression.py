"""Lossless compression of the objects the node sends: which transfer syntaxes, which encoder, and
the way back to uncompressed for a destination that accepts only that.

The names configured per destination (``destinations[].transfer_syntaxes``):

- ``jpeg-ls-lossless`` (1.2.840.10008.1.2.4.80, CharLS through pyjpegls),
- ``jpeg2000-lossless`` (1.2.840.10008.1.2.4.90, OpenJPEG through pylibjpeg-openjpeg),
- ``rle-lossless`` (1.2.840.10008.1.2.5, pydicom's own encoder),
- ``deflated`` (1.2.840.10008.1.2.1.99: the whole data set through zlib on the wire; the only one
  for float pixel data such as a Parametric Map).

Measured here (2 shared CPU cores, ``pacs-xai bench compression``): the Secondary Capture of a
1955x1841 radiograph is 12.65 MB uncompressed, 3.45 MB as JPEG-LS lossless, 3.66 MB as JPEG 2000
lossless, 3.26 MB deflated (zlib level 6) and 11.3 MB as RLE; JPEG-LS encodes fastest of the pixel
codecs. GDCM's RLE encoder aborts the whole process on that image (``image_len % MaxNumSegments``),
so it is never chosen; pydicom's is.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

__all__ = [
    "LOSSLESS_SYNTAXES",
    "PIXEL_ENCODERS",
    "compress_pixels",
    "lossless_syntax",
    "syntaxes_in_order",
    "uncompressed",
]

LOGGER = logging.getLogger(__name__)

#: Configuration name -> transfer syntax.
LOSSLESS_SYNTAXES: dict[str, UID] = {
    "jpeg-ls-lossless": JPEGLSLossless,
    "jpeg2000-lossless": JPEG2000Lossless,
    "rle-lossless": RLELossless,
    "deflated": DeflatedExplicitVRLittleEndian,
}

#: Pixel data codecs and the pydicom encoding plugin used for each (see the module docstring).
PIXEL_ENCODERS: dict[UID, str] = {
    JPEGLSLossless: "pyjpegls",
    JPEG2000Lossless: "pylibjpeg",
    RLELossless: "pydicom",
}


def lossless_syntax(name: str) -> UID:
    """The transfer syntax of a configuration name; ValueError naming the choices otherwise."""
    try:
        return LOSSLESS_SYNTAXES[name]
    except KeyError:
        raise ValueError(
            f"unknown lossless transfer syntax {name!r}; choose from {', '.join(LOSSLESS_SYNTAXES)}"
        ) from None


def compress_pixels(dataset: Dataset, preferences: Iterable[UID]) -> UID | None:
    """Compress ``dataset``'s Pixel Data in place with the first syntax of ``preferences`` that
    encodes it (``deflated`` is the transport's business and skipped); returns the syntax, or
    ``None`` when none applies (float pixel data, 1-bit segmentations, no codec) and the data set is
    left as it was. The SOP Instance UID is kept: lossless, it is the same instance (and the
    node's derived UIDs are deterministic)."""
    if "PixelData" not in dataset:
        return None
    for syntax in preferences:
        plugin = PIXEL_ENCODERS.get(UID(syntax))
        if plugin is None:
            continue
        try:
            dataset.compress(syntax, encoding_plugin=plugin, generate_instance_uid=False)
        except Exception as exc:  # an encoder that refuses this image: the next one, or uncompressed
            LOGGER.debug("%s cannot encode %s: %s", syntax.name, dataset.get("SOPInstanceUID", "?"), exc)
            continue
        return UID(syntax)
    return None


def uncompressed(dataset: Dataset, syntax: UID = ExplicitVRLittleEndian) -> Dataset:
    """``dataset`` with its pixel data decoded (in place) and its File Meta saying ``syntax``
    (explicit VR little endian, or deflated for the transport to zlib)."""
    if dataset.file_meta.TransferSyntaxUID.is_encapsulated:
        dataset.decompress(generate_instance_uid=False)
    dataset.file_meta.TransferSyntaxUID = syntax
    return dataset


def syntaxes_in_order(lists: Sequence[Sequence[UID]]) -> list[UID]:
    """The syntaxes of several preference lists, first appearance first, each once."""
    seen: dict[UID, None] = {}
    for preferences in lists:
        for syntax in preferences:
            seen.setdefault(syntax, None)
    return list(seen)
