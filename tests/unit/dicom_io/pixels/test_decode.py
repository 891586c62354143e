"""dicom_io.pixels.decode: reading and decoding refuses damaged, truncated and unsupported files with a
message that names the file and the value found, never patient data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate

from dicom_io.errors import DicomInputError, UnsupportedImageError
from dicom_io.pixels import prepare_frames, read_dataset
from tests.helpers import data_file
from tests.unit.dicom_io.pixels.pixel_cases import SPEC


def assert_no_patient_data(message: str) -> None:
    ct = pydicom.dcmread(data_file("CT_small.dcm"), stop_before_pixels=True)
    for value in (str(ct.PatientName), str(ct.PatientID)):
        assert value not in message


def test_not_a_dicom_file(tmp_path: Path):
    path = tmp_path / "notes.txt"
    path.write_text("this is not DICOM\n" * 20)
    with pytest.raises(DicomInputError, match="not a DICOM file") as info:
        read_dataset(path)
    assert "notes.txt" in str(info.value)


def test_file_without_preamble_but_with_meta_is_read(tmp_path: Path):
    data = Path(data_file("CT_small.dcm")).read_bytes()
    assert data[128:132] == b"DICM"
    path = tmp_path / "no_preamble.dcm"
    path.write_bytes(data[132:])  # starts with the (0002,xxxx) File Meta Information
    frame = prepare_frames(read_dataset(path), SPEC)[0]
    reference = prepare_frames(read_dataset(data_file("CT_small.dcm")), SPEC)[0]
    np.testing.assert_array_equal(frame.model_input, reference.model_input)


def test_missing_file(tmp_path: Path):
    with pytest.raises(DicomInputError, match="no such file"):
        read_dataset(tmp_path / "absent.dcm")


def test_truncated_file(tmp_path: Path):
    data = Path(data_file("CT_small.dcm")).read_bytes()
    path = tmp_path / "half.dcm"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DicomInputError, match="truncated") as info:
        read_dataset(path)
    assert "half.dcm" in str(info.value)
    assert_no_patient_data(str(info.value))


def test_truncated_compressed_file(tmp_path: Path):
    data = Path(data_file("MR_small_jp2klossless.dcm")).read_bytes()
    path = tmp_path / "half_j2k.dcm"
    path.write_bytes(data[: int(len(data) * 0.8)])
    with pytest.raises(DicomInputError, match="truncated"):
        read_dataset(path)


def test_dataset_without_pixel_data(tmp_path: Path):
    ds = pydicom.dcmread(data_file("CT_small.dcm"))
    del ds.PixelData
    path = tmp_path / "nopixels.dcm"
    ds.save_as(path)
    with pytest.raises(DicomInputError, match=r"no Pixel Data \(7FE0,0010\)") as info:
        read_dataset(path)
    assert "CT Image Storage" in str(info.value)
    assert_no_patient_data(str(info.value))
    with pytest.raises(DicomInputError, match="no Pixel Data"):
        prepare_frames(ds, SPEC)


@pytest.mark.parametrize("value", ["CMYK", "ARGB", "HSV", "MADE_UP"])
def test_unsupported_photometric_interpretation(tmp_path: Path, value):
    ds = pydicom.dcmread(data_file("CT_small.dcm"))
    ds.PhotometricInterpretation = value
    path = tmp_path / "edited.dcm"
    ds.save_as(path)
    with pytest.raises(UnsupportedImageError, match=value) as info:
        prepare_frames(read_dataset(path), SPEC)
    assert "Photometric Interpretation" in str(info.value)
    assert_no_patient_data(str(info.value))


def test_samples_per_pixel_inconsistent():
    ds = read_dataset(data_file("CT_small.dcm"))
    ds.SamplesPerPixel = 3
    with pytest.raises(DicomInputError, match=r"Samples per Pixel \(0028,0002\) is 3") as info:
        prepare_frames(ds, SPEC)
    assert "MONOCHROME2" in str(info.value)
    rgb = read_dataset(data_file("US1_UNCR.dcm"))
    rgb.SamplesPerPixel = 1
    with pytest.raises(DicomInputError, match="Samples per Pixel"):
        prepare_frames(rgb, SPEC)


def test_corrupt_compressed_data_names_the_transfer_syntax():
    ds = read_dataset(data_file("MR_small_jp2klossless.dcm"))
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(64)])
    with pytest.raises(DicomInputError, match=r"1\.2\.840\.10008\.1\.2\.4\.90") as info:
        prepare_frames(ds, SPEC)
    assert "frame 0" in str(info.value) and "install" in str(info.value)


def test_transfer_syntax_without_decoder_is_unsupported():
    ds = read_dataset(data_file("MR_small_jp2klossless.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: pydicom has no decoder
    with pytest.raises(UnsupportedImageError, match=r"1\.2\.840\.10008\.1\.2\.4\.100"):
        prepare_frames(ds, SPEC)


def test_bad_number_of_frames():
    ds = read_dataset(data_file("CT_small.dcm"))
    ds.NumberOfFrames = 3  # the pixel data holds one frame
    with pytest.raises(DicomInputError):
        prepare_frames(ds, SPEC)


def _explicit_element_offset(data: bytes, tag: tuple[int, int]) -> int:
    return data.index(bytes([tag[0] & 0xFF, tag[0] >> 8, tag[1] & 0xFF, tag[1] >> 8]), 132)


def test_a_lying_vr_is_reported_at_read_time_naming_the_element(tmp_path: Path):
    """pydicom converts values lazily: a VR that does not fit its bytes must fail here, named,
    not later in a writer (the torture suite found it as an internal error)."""
    data = bytearray(Path(data_file("CT_small.dcm")).read_bytes())
    offset = _explicit_element_offset(bytes(data), (0x0008, 0x0060))  # Modality, CS of 2 bytes
    data[offset + 4 : offset + 6] = b"UL"
    path = tmp_path / "lying.dcm"
    path.write_bytes(bytes(data))
    with pytest.raises(DicomInputError, match=r"element \(0008,0060\) cannot be read") as info:
        read_dataset(path)
    assert_no_patient_data(str(info.value))


def test_a_uid_that_is_not_a_uid_and_an_unknown_character_set_are_refused(tmp_path: Path):
    ds = pydicom.dcmread(data_file("CT_small.dcm"))
    ds.SpecificCharacterSet = "DAO_IR 100"
    ds.save_as(tmp_path / "charset.dcm")
    with pytest.raises(DicomInputError, match="'DAO_IR 100' is not a defined term"):
        read_dataset(tmp_path / "charset.dcm")
    ds = pydicom.dcmread(data_file("CT_small.dcm"))
    ds.SeriesInstanceUID = "1.2.3.abc"
    ds.save_as(tmp_path / "uid.dcm")
    with pytest.raises(DicomInputError, match=r"SeriesInstanceUID \(0020,000E\) is not a valid UID"):
        read_dataset(tmp_path / "uid.dcm")


def test_a_transfer_syntax_uid_with_a_lying_vr_is_refused_at_read_time(tmp_path: Path):
    data = bytearray(Path(data_file("CT_small.dcm")).read_bytes())
    offset = _explicit_element_offset(bytes(data), (0x0002, 0x0010))
    data[offset + 4 : offset + 6] = b"UL"
    (tmp_path / "ts.dcm").write_bytes(bytes(data))
    with pytest.raises(DicomInputError, match=r"Transfer Syntax UID \(0002,0010\) .* is not a known transfer syntax"):
        read_dataset(tmp_path / "ts.dcm")


@pytest.mark.parametrize(
    ("keyword", "value", "message"),
    [
        ("PatientBirthDate", "19230231", r"\(0010,0030\) \(DA\) holds a date or time no calendar"),
        ("StudyTime", "996000", r"\(0008,0030\) \(TM\) holds a date or time"),
        ("PatientSex", "X", r"Patient's Sex \(0010,0040\) is not M, F or O"),
    ],
)
def test_copied_attributes_the_writers_cannot_hold_are_refused_without_their_value(
    tmp_path: Path, keyword: str, value: str, message: str
):
    ds = pydicom.dcmread(data_file("CT_small.dcm"))
    setattr(ds, keyword, value)
    ds.save_as(tmp_path / "bad.dcm")
    with pytest.raises(DicomInputError, match=message) as info:
        read_dataset(tmp_path / "bad.dcm")
    assert value not in str(info.value)


def test_legacy_acr_nema_times_and_dates_are_still_read(tmp_path: Path):
    ds = pydicom.dcmread(data_file("CT_small.dcm"))
    ds.StudyTime, ds.StudyDate = "14:04:38", "1994.11.05"
    ds.save_as(tmp_path / "legacy.dcm")
    assert read_dataset(tmp_path / "legacy.dcm").StudyTime == "14:04:38"


def test_a_copied_attribute_with_a_lying_vr_is_refused(tmp_path: Path):
    data = bytearray(Path(data_file("CT_small.dcm")).read_bytes())
    offset = _explicit_element_offset(bytes(data), (0x0008, 0x0070))  # Manufacturer, LO
    data[offset + 4 : offset + 6] = b"PN"
    (tmp_path / "pn.dcm").write_bytes(bytes(data))
    with pytest.raises(DicomInputError, match=r"\(0008,0070\) has VR PN where PS3.6 says LO"):
        read_dataset(tmp_path / "pn.dcm")
