"""Lossless compression of the node's results: every pixel codec gives back the exact pixels,
keeps the SOP Instance UID, and passes dciodvfy; data it cannot encode is left alone. Real
encoders (CharLS, OpenJPEG, pydicom's RLE), a real Secondary Capture from the node's writer.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from dicom_io.compression import LOSSLESS_SYNTAXES, compress_pixels, lossless_syntax, uncompressed
from dicom_io.writers import build_parametric_map, build_secondary_capture
from tests.unit.dicom_io.writers.writer_cases import dciodvfy, load_source, make_result


def _secondary_capture() -> Dataset:
    source = load_source("MR_small.dcm")
    return build_secondary_capture(source, make_result(source, 0))


def _round_trip(dataset: Dataset) -> Dataset:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


@pytest.mark.parametrize("syntax", [JPEGLSLossless, JPEG2000Lossless, RLELossless], ids=lambda uid: uid.name)
def test_each_codec_is_lossless_keeps_the_instance_and_passes_dciodvfy(syntax, tmp_path: Path) -> None:
    original = _round_trip(_secondary_capture())
    compressed = _round_trip(_secondary_capture())
    assert compress_pixels(compressed, [syntax]) == syntax
    path = tmp_path / "sc.dcm"
    compressed.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == syntax
    assert back.SOPInstanceUID == original.SOPInstanceUID, "lossless: the same instance, the same UID"
    assert np.array_equal(back.pixel_array, original.pixel_array)
    assert back.get("LossyImageCompression", "00") == "00"
    report, errors = dciodvfy(path)
    assert "SCImage" in report  # dciodvfy recognised the IOD
    assert errors == [], errors


def test_the_first_codec_that_encodes_wins_and_float_data_is_left_alone() -> None:
    sc = _secondary_capture()
    assert compress_pixels(sc, [DeflatedExplicitVRLittleEndian, JPEGLSLossless, RLELossless]) == JPEGLSLossless
    source = load_source("MR_small.dcm")
    pm = build_parametric_map(source, make_result(source, 0))
    before = pm.FloatPixelData
    assert compress_pixels(pm, [JPEGLSLossless, JPEG2000Lossless, RLELossless]) is None
    assert pm.FloatPixelData == before


def test_uncompressed_decodes_in_place_and_keeps_the_uid() -> None:
    sc = _round_trip(_secondary_capture())
    pixels = sc.pixel_array.copy()
    compress_pixels(sc, [JPEGLSLossless])
    sent = uncompressed(_round_trip(sc))
    assert sent.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert sent.SOPInstanceUID == sc.SOPInstanceUID
    assert np.array_equal(sent.pixel_array, pixels)
    assert uncompressed(_round_trip(sc), DeflatedExplicitVRLittleEndian).file_meta.TransferSyntaxUID.is_deflated


def test_names_map_to_syntaxes_and_an_unknown_name_says_the_choices() -> None:
    assert lossless_syntax("jpeg-ls-lossless") == JPEGLSLossless
    with pytest.raises(ValueError, match="jpeg-ls-lossless, jpeg2000-lossless, rle-lossless, deflated"):
        lossless_syntax("jpeg-lossy")
    assert set(LOSSLESS_SYNTAXES) == {"jpeg-ls-lossless", "jpeg2000-lossless", "rle-lossless", "deflated"}
