"""Reading a DICOM image and decoding its frames, with the header checks that decoding relies on.

:func:`read_dataset` reads a Part 10 file that must hold Pixel Data (7FE0,0010) and refuses a
truncated one. :func:`decoded_frames` decodes the stored values one frame at a time with the
pydicom 3 decoders; colour data comes back as RGB (pydicom converts YBR_FULL / YBR_FULL_422, the
JPEG 2000 plugins undo YBR_RCT / YBR_ICT). The checks read Photometric Interpretation (0028,0004)
with Samples per Pixel (0028,0002), Rows/Columns (0028,0010/0011) and Number of Frames
(0028,0008). Every failure is a DicomInputError or UnsupportedImageError that names the file
(never patient data) and the value found.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pydicom
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import JPEG2000, UID, JPEG2000Lossless
from pydicom.valuerep import DA, DT, TM

from dicom_io.errors import DicomInputError, UnsupportedImageError

__all__ = [
    "GRAYSCALE",
    "PALETTE",
    "decoded_frames",
    "describe_dataset",
    "has_pixel_data",
    "image_shape",
    "number_of_frames",
    "photometric_interpretation",
    "read_dataset",
    "sop_class_name",
]

#: Photometric Interpretations with one sample per pixel that the Modality LUT and VOI apply to.
GRAYSCALE = frozenset({"MONOCHROME1", "MONOCHROME2"})
#: One index per pixel into the Red/Green/Blue Palette Color Lookup Tables.
PALETTE = "PALETTE COLOR"
#: Three-sample interpretations whose decoders hand back RGB (or YBR_FULL[_422] that we convert).
_COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420", "YBR_PARTIAL_422"})
_SUPPORTED_TEXT = "MONOCHROME1, MONOCHROME2, PALETTE COLOR, RGB, YBR_FULL, YBR_FULL_422, YBR_RCT, YBR_ICT"
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
#: Decoding plugins tried first, fastest first, where pydicom can load several (``pacs-xai bench
#: compression``, 2 shared cores: a 1955x1841 JPEG 2000 lossless CR in 1.0 s with GDCM, 1.7 s with
#: pylibjpeg-openjpeg, 2.5 s with Pillow; the lossy one 0.47-0.53 s with all three). If the
#: preferred one fails on an image, pydicom tries every plugin in turn.
PREFERRED_DECODERS: dict[UID, tuple[str, ...]] = {
    JPEG2000Lossless: ("gdcm", "pylibjpeg", "pillow"),
    JPEG2000: ("pylibjpeg", "gdcm", "pillow"),
}


def has_pixel_data(ds: Dataset) -> bool:
    """Whether ``ds`` holds Pixel Data, Float Pixel Data or Double Float Pixel Data (an image)."""
    return any(keyword in ds for keyword in _PIXEL_KEYWORDS)


#: The UIDs every output copies or refers to (highdicom refuses them when they are not UIDs).
_IDENTIFYING_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")


#: Groups whose attributes the outputs copy from the source (identification, patient, study and series).
_COPIED_GROUPS = (0x0008, 0x0010, 0x0020)


def _check_copied_attributes(ds: Dataset, name: str) -> None:
    """The attributes the outputs copy must be what PS3.6 says they are: the VR of the data
    dictionary (a lying VR would be copied as a value the output's VR cannot hold), a date a
    calendar has, a Patient's Sex of M, F or O. Messages name the element, never its value."""
    for element in ds:
        tag = element.tag
        if tag.is_private or tag.group not in _COPIED_GROUPS:
            continue
        try:
            expected = dictionary_VR(tag)
        except KeyError:
            continue
        if element.VR not in (expected, "UN") and " or " not in expected:
            raise DicomInputError(
                f"{name}: element {tag} has VR {element.VR} where PS3.6 says {expected}; the outputs copy it: "
                "resend the original file"
            )
        values = element.value if element.VM > 1 else [element.value]
        kind = _TEMPORAL.get(element.VR)
        if kind is not None and any(value and not _is_temporal(kind, str(value)) for value in values):
            raise DicomInputError(
                f"{name}: element {tag} ({element.VR}) holds a date or time no calendar or clock has: "
                "resend the original file"
            )
    if str(ds.get("PatientSex", "") or "") not in ("", "M", "F", "O"):
        raise DicomInputError(
            f"{name}: Patient's Sex (0010,0040) is not M, F or O (PS3.3 C.7.1.1): resend the original file"
        )


_TEMPORAL = {"DA": DA, "TM": TM, "DT": DT}


def _is_temporal(kind: type, value: str) -> bool:
    """Whether pydicom (and so the writers) can read ``value`` as a DA, TM or DT (the ACR-NEMA
    forms "14:04:38" and "1994.11.05", which PS3.5 still lets a reader accept, count as read)."""
    if kind is not DT:
        value = value.replace(":", "") if kind is TM else value.replace(".", "")
    try:
        kind(value)
    except (ValueError, TypeError):
        return False
    return True


def read_every_element(ds: pydicom.Dataset, name: str) -> None:
    """Convert every element now: pydicom reads values lazily, so a lying VR or length (a UL of
    2 bytes, a PN in an unknown character set) would otherwise fail far from here, later in
    preparing or writing, as an error that names neither the file nor the element. The UIDs and
    the character set the outputs copy are checked too."""
    where: list[Any] = [None]  # the tag being converted, for the message

    def convert(dataset: Dataset) -> None:
        for key in list(dataset.keys()):
            where[0] = key
            element = dataset[key]  # converts the raw element: this is where a lie fails
            if element.VR == "SQ":
                for item in element.value:
                    convert(item)

    try:
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            convert(meta)
        convert(ds)
    except Exception as exc:  # pydicom raises many kinds on damaged values
        # The exception's text is left out: it may quote the value, and the value may be patient data.
        element_name = f"element {where[0]}" if where[0] is not None else "an element"
        raise DicomInputError(
            f"{name}: {element_name} cannot be read ({type(exc).__name__}: its VR or length does not fit its bytes); "
            "resend the original file"
        ) from exc
    _check_copied_attributes(ds, name)
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and (not isinstance(syntax, str) or not UID(syntax).is_transfer_syntax):
        raise DicomInputError(
            f"{name}: Transfer Syntax UID (0002,0010) {str(syntax)[:70]!r} is not a known transfer syntax "
            "(PS3.5 Annex A): resend the original file"
        )
    for keyword in _IDENTIFYING_UIDS:
        if keyword not in ds:
            continue
        element = ds[keyword]
        if element.VR != "UI" or not isinstance(element.value, str) or not UID(element.value).is_valid:
            raise DicomInputError(
                f"{name}: {keyword} {element.tag} is not a valid UID (VR {element.VR}); the outputs could not "
                "refer to it: resend the original file"
            )
    charsets = ds.get("SpecificCharacterSet")
    if charsets:
        for term in [charsets] if isinstance(charsets, str) else list(charsets):
            if term and term not in python_encoding:
                raise DicomInputError(
                    f"{name}: Specific Character Set (0008,0005) {term!r} is not a defined term of PS3.3 "
                    "C.12.1.1.2; the outputs could not be encoded in it: resend the original file"
                )


def read_dataset(path: str | os.PathLike) -> pydicom.Dataset:
    """Read a DICOM Part 10 file that must hold an image.

    Raises DicomInputError when the file is missing, not DICOM (no 'DICM' prefix after the
    128-byte preamble), unreadable, truncated, or has no Pixel Data. A file that only lacks the
    preamble but starts with its File Meta Information (group 0002) is accepted.
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise DicomInputError(f"{name}: no such file; check the path")
    try:
        try:
            ds = pydicom.dcmread(name)
        except InvalidDicomError:
            ds = _read_without_preamble(name)
    except DicomInputError:
        raise
    except Exception as exc:  # pydicom raises many kinds on damaged files
        raise DicomInputError(
            f"{name}: the file is truncated or unreadable as DICOM ({type(exc).__name__}: {exc}); "
            "resend the original file"
        ) from exc

    read_every_element(ds, name)
    if not has_pixel_data(ds):
        raise DicomInputError(
            f"{name}: no Pixel Data (7FE0,0010) in this {sop_class_name(ds)} object "
            f"(file size {os.path.getsize(name)} bytes): it is not an image, or the file is "
            "truncated; only image objects can be classified"
        )
    _check_native_length(ds, name)
    return ds


def _read_without_preamble(name: str) -> Dataset:
    """A file that lacks the 128-byte preamble and 'DICM' but starts with its File Meta group.

    Some writers omit the preamble; such a file is accepted when group 0002 with a Transfer
    Syntax UID is there. Anything else is not a DICOM Part 10 file.
    """
    with open(name, "rb") as handle:
        start = handle.read(2)
    ds = None
    if start == b"\x02\x00":  # (0002,xxxx) little endian: File Meta Information first
        try:
            ds = pydicom.dcmread(name, force=True)
        except Exception:
            ds = None
    if ds is None or _transfer_syntax(ds) is None:
        raise DicomInputError(
            f"{name}: not a DICOM file (no 'DICM' prefix after the 128-byte preamble and no "
            "File Meta Information); send a DICOM Part 10 file"
        )
    return ds


def _check_native_length(ds: Dataset, where: str) -> None:
    """Native (uncompressed) Pixel Data shorter than Rows x Columns x ... means truncation."""
    tsuid = _transfer_syntax(ds)
    if "PixelData" not in ds or tsuid is None or tsuid.is_encapsulated:
        return
    try:
        expected = int(get_expected_length(ds, "bytes"))
        found = len(ds.PixelData)
    except Exception:  # incomplete or malformed Image Pixel module: reported when prepared
        return
    if found < expected:
        raise DicomInputError(
            f"{where}: the file is truncated: Pixel Data holds {found} bytes, the image needs "
            f"{expected} (Rows x Columns x Samples x Bits Allocated x Frames); resend the original file"
        )


def decoded_frames(ds: Dataset, count: int, where: str) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """Decode one frame at a time, turning every decoder failure into a DicomInputError."""
    tsuid = _transfer_syntax(ds)
    if tsuid is None:
        raise DicomInputError(
            f"{where}: no Transfer Syntax UID (0002,0010) in the file meta information, so the "
            "pixel data cannot be decoded; send a DICOM Part 10 file"
        )
    ts_text = f"transfer syntax {tsuid} ({tsuid.name})" if tsuid.name != str(tsuid) else f"transfer syntax {tsuid}"
    try:
        decoder = get_decoder(tsuid)
    except Exception:
        raise UnsupportedImageError(
            f"{where}: no pixel data decoder exists for {ts_text}; have the sender transcode "
            "the image (for example to Explicit VR Little Endian 1.2.840.10008.1.2.1)"
        ) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
        raise DicomInputError(
            f"{where}: cannot decode {ts_text}: no decoding plugin is installed. Install one of: "
            f"{missing} (e.g. pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg "
            "python-gdcm), or have the sender transcode to Explicit VR Little Endian"
        )
    plugin = _preferred_plugin(tsuid, decoder.available_plugins)
    # One frame per call (Decoder.iter_array mishandles some sign corrections in pydicom 3.0).
    for index in range(count):
        try:
            try:
                array, meta = decoder.as_array(ds, index=index, as_rgb=True, decoding_plugin=plugin)
            except Exception:
                if not plugin:
                    raise
                array, meta = decoder.as_array(ds, index=index, as_rgb=True)  # every other plugin in turn
        except Exception as exc:
            raise DicomInputError(
                f"{where}: cannot decode frame {index} of {ts_text} ({type(exc).__name__}: {exc}); "
                "the compressed data may be corrupt, or a decoder for it is missing "
                "(pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg python-gdcm); "
                "resend the original or an uncompressed copy"
            ) from exc
        yield array, meta


def _preferred_plugin(tsuid: UID, available: Sequence[str]) -> str:
    """The decoding plugin tried first for ``tsuid`` ("" = pydicom's own order)."""
    for plugin in PREFERRED_DECODERS.get(tsuid, ()):
        if plugin in available:
            return plugin
    return ""


def photometric_interpretation(ds: Dataset, where: str) -> str:
    """Checked Photometric Interpretation (0028,0004) and its Samples per Pixel (0028,0002)."""
    value = ds.get("PhotometricInterpretation")
    if not value:
        raise DicomInputError(
            f"{where}: no Photometric Interpretation (0028,0004); the Image Pixel module is "
            "incomplete: fix the file at its source"
        )
    photometric = str(value).strip().upper()
    if photometric not in GRAYSCALE and photometric != PALETTE and photometric not in _COLOUR:
        raise UnsupportedImageError(
            f"{where}: Photometric Interpretation (0028,0004) '{photometric}' is not supported "
            f"(supported: {_SUPPORTED_TEXT}); convert the image before sending it"
        )
    samples = ds.get("SamplesPerPixel")
    needed = 3 if photometric in _COLOUR else 1
    if samples != needed:
        raise DicomInputError(
            f"{where}: Samples per Pixel (0028,0002) is {samples!r} but Photometric "
            f"Interpretation '{photometric}' needs {needed}; the header is inconsistent: fix "
            "the file at its source"
        )
    return photometric


def image_shape(ds: Dataset, where: str) -> tuple[int, int]:
    """Checked (Rows, Columns) (0028,0010/0011): both positive integers."""
    rows, cols = ds.get("Rows"), ds.get("Columns")
    try:
        valid = int(rows) > 0 and int(cols) > 0
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise DicomInputError(
            f"{where}: Rows (0028,0010) / Columns (0028,0011) are {rows!r} / {cols!r}; an image "
            "needs both, positive: fix the file at its source"
        )
    return int(rows), int(cols)


def number_of_frames(ds: Dataset, where: str) -> int:
    """Number of Frames (0028,0008); absent, empty or 0 means one frame (as pydicom reads it)."""
    value = ds.get("NumberOfFrames")
    if value is None or value == "":
        return 1
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise DicomInputError(
            f"{where}: Number of Frames (0028,0008) is {str(value)!r}, not a whole number; fix the file at its source"
        ) from None
    if count < 0:
        raise DicomInputError(f"{where}: Number of Frames (0028,0008) is {count}; fix the file at its source")
    return max(count, 1)


def _transfer_syntax(ds: Dataset) -> UID | None:
    """Transfer Syntax UID (0002,0010) of the file meta information, None when absent."""
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return UID(str(uid)) if uid else None


def sop_class_name(ds: Dataset) -> str:
    """The SOP Class UID with its name, e.g. "CT Image Storage (1.2.840.10008.5.1.4.1.1.2)", for messages."""
    uid = ds.get("SOPClassUID")
    if not uid:
        return "DICOM"
    name = UID(str(uid)).name
    return f"{name} ({uid})" if name != str(uid) else str(uid)


def describe_dataset(ds: Dataset) -> str:
    """How messages name a dataset: its file name, else its SOP Instance UID (never patient data)."""
    filename = getattr(ds, "filename", None)
    if isinstance(filename, str) and filename:
        return filename
    uid = ds.get("SOPInstanceUID")
    return f"SOP Instance {uid}" if uid else "dataset"
