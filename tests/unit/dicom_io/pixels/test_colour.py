"""dicom_io.pixels.colour: RGB, YBR and PALETTE COLOR frames to [0, 1] RGB and BT.601 luminance, on real
DICOM files, against pydicom's own conversion.
"""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.pixels import apply_color_lut

from dicom_io.pixels import InputSpec, prepare_frames, read_dataset
from tests.helpers import data_file
from tests.unit.dicom_io.pixels.pixel_cases import BT601, SPEC, check_frame


def test_rgb_to_grayscale_is_bt601_luminance():
    ds = read_dataset(data_file("US1_UNCR.dcm"))
    assert ds.PhotometricInterpretation == "RGB"
    rgb = ds.pixel_array.astype(np.float64) / 255.0
    frame = prepare_frames(ds, SPEC)[0]
    check_frame(frame, SPEC, (480, 640))
    np.testing.assert_allclose(frame.display, rgb @ BT601, atol=1e-6)


def test_rgb_kept_with_three_channels():
    ds = read_dataset(data_file("US1_UNCR.dcm"))
    rgb = ds.pixel_array.astype(np.float64) / 255.0
    # same size, stretch: the geometry is the identity, so the channels can be compared exactly
    spec = InputSpec(480, 640, channels=3, aspect="stretch")
    frame = prepare_frames(ds, spec)[0]
    check_frame(frame, spec, (480, 640))
    for c in range(3):
        np.testing.assert_allclose(frame.model_input[c], rgb[..., c], atol=1e-5)
    assert np.abs(frame.model_input[0] - frame.model_input[2]).max() > 0.2  # colour survived


def test_ybr_rct_jpeg2000_lossless_matches_rgb():
    a = prepare_frames(read_dataset(data_file("US1_UNCR.dcm")), InputSpec(224, 224, channels=3))[0]
    ds = read_dataset(data_file("US1_J2KR.dcm"))
    assert ds.PhotometricInterpretation == "YBR_RCT"
    b = prepare_frames(ds, InputSpec(224, 224, channels=3))[0]
    np.testing.assert_array_equal(a.model_input, b.model_input)


def test_ybr_full_422_multiframe_jpeg():
    ds = read_dataset(data_file("examples_ybr_color.dcm"))
    assert ds.PhotometricInterpretation == "YBR_FULL_422"
    frames = prepare_frames(ds, SPEC)
    assert len(frames) == int(ds.NumberOfFrames) == 30
    rgb = ds.pixel_array[12].astype(np.float64) / 255.0  # pydicom converts to RGB
    check_frame(frames[12], SPEC, (240, 320))
    np.testing.assert_allclose(frames[12].display, rgb @ BT601, atol=1e-6)


@pytest.mark.parametrize("name", ["SC_ybr_full_uncompressed.dcm", "SC_ybr_full_422_uncompressed.dcm"])
def test_uncompressed_ybr_matches_its_rgb_conversion(name):
    ds = read_dataset(data_file(name))
    rgb = ds.pixel_array.astype(np.float64) / 255.0  # pydicom's YBR -> RGB
    frame = prepare_frames(ds, SPEC)[0]
    np.testing.assert_allclose(frame.display, rgb @ BT601, atol=1e-6)


def test_palette_color_goes_through_its_lut():
    ds = read_dataset(data_file("examples_palette.dcm"))
    assert ds.PhotometricInterpretation == "PALETTE COLOR"
    bits = int(ds.RedPaletteColorLookupTableDescriptor[2])  # 8 or 16 bits per LUT entry
    rgb = apply_color_lut(ds.pixel_array, ds).astype(np.float64) / (2**bits - 1)
    frame = prepare_frames(ds, SPEC)[0]
    check_frame(frame, SPEC, (ds.Rows, ds.Columns))
    np.testing.assert_allclose(frame.display, rgb @ BT601, atol=1e-5)
    # not the raw indices
    assert np.abs(frame.display - ds.pixel_array / 255.0).max() > 0.1


def test_sixteen_bit_rgb_scaled_by_bit_depth():
    ds = read_dataset(data_file("SC_rgb_16bit.dcm"))
    rgb = ds.pixel_array.astype(np.float64) / (2 ** int(ds.BitsStored) - 1)
    np.testing.assert_allclose(prepare_frames(ds, SPEC)[0].display, rgb @ BT601, atol=1e-5)
