"""dicom_io.pixels.voi: Modality LUT, VOI LUT, window and percentile fallback, against the DICOM formulas
written out, on real DICOM files.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from dicom_io.errors import UnsupportedImageError
from dicom_io.pixels import InputSpec, prepare_frames, read_dataset, window_to_unit
from tests.helpers import data_file
from tests.unit.dicom_io.pixels.pixel_cases import SPEC, check_frame, linear_window, percentile_stretch


def test_ct_window_matches_dicom_linear_formula():
    ds = read_dataset(data_file("CT_small.dcm"))
    ds.WindowCenter = [40, 300]  # first value is used
    ds.WindowWidth = [400, 1500]
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = linear_window(hu, 40.0, 400.0)
    assert 0.05 < expected.mean() < 0.95 and (expected == 0).any() and (expected == 1).any()
    display = prepare_frames(ds, SPEC)[0].display
    np.testing.assert_allclose(display, expected, atol=1e-6)
    np.testing.assert_allclose(window_to_unit(ds, ds.pixel_array, SPEC), expected, atol=1e-6)


@pytest.mark.parametrize("function", ["SIGMOID", "LINEAR_EXACT"])
def test_ct_voi_lut_function(function):
    ds = read_dataset(data_file("CT_small.dcm"))
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 40, 400, function
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    if function == "SIGMOID":  # PS3.3 C.11.2.1.3.1
        expected = 1.0 / (1.0 + np.exp(-4.0 * (hu - 40.0) / 400.0))
    else:  # PS3.3 C.11.2.1.3.2
        expected = np.clip((hu - 40.0) / 400.0 + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(window_to_unit(ds, ds.pixel_array, SPEC), expected, atol=1e-6)


def test_percentile_fallback_without_window():
    ds = read_dataset(data_file("CT_small.dcm"))
    assert "WindowCenter" not in ds  # CT_small carries no window
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(prepare_frames(ds, SPEC)[0].display, percentile_stretch(hu), atol=1e-6)
    spec = InputSpec(224, 224, percentiles=(5.0, 95.0))
    np.testing.assert_allclose(window_to_unit(ds, ds.pixel_array, spec), percentile_stretch(hu, 5.0, 95.0), atol=1e-6)


def test_percentile_policy_ignores_the_dicom_window():
    ds = read_dataset(data_file("MR_small.dcm"))
    assert "WindowCenter" in ds
    stored = ds.pixel_array.astype(np.float64)
    dicom = window_to_unit(ds, ds.pixel_array, SPEC)
    np.testing.assert_allclose(dicom, linear_window(stored, float(ds.WindowCenter), float(ds.WindowWidth)), atol=1e-6)
    forced = window_to_unit(ds, ds.pixel_array, InputSpec(224, 224, windowing="percentile"))
    np.testing.assert_allclose(forced, percentile_stretch(stored), atol=1e-6)
    assert np.abs(forced - dicom).max() > 0.1
    del ds.WindowCenter, ds.WindowWidth
    np.testing.assert_allclose(window_to_unit(ds, ds.pixel_array, SPEC), forced, atol=1e-6)


@pytest.mark.parametrize("windowing", ["dicom", "percentile"])
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_flat_frame_gives_zeros(windowing, photometric):
    ds = read_dataset(data_file("CT_small.dcm"))
    ds.PixelData = np.full((ds.Rows, ds.Columns), 100, dtype="<i2").tobytes()
    ds.PhotometricInterpretation = photometric
    frame = prepare_frames(ds, InputSpec(64, 48, windowing=windowing))[0]
    assert np.all(frame.display == 0.0) and np.all(frame.model_input == 0.0)


def test_voi_lut_sequence_is_applied():
    ds = read_dataset(data_file("vlut_04.dcm"))
    item = ds.VOILUTSequence[0]
    entries, first, _ = item.LUTDescriptor
    lut = np.asarray(item.LUTData, dtype=np.float64)
    assert len(lut) == entries
    index = np.clip(ds.pixel_array.astype(np.int64) - first, 0, entries - 1)
    expected = (lut[index] - lut.min()) / (lut.max() - lut.min())
    np.testing.assert_allclose(prepare_frames(ds, SPEC)[0].display, expected, atol=1e-6)


def test_modality_lut_sequence_is_applied():
    ds = read_dataset(data_file("mlut_18.dcm"))
    item = ds.ModalityLUTSequence[0]
    entries, first, _ = item.LUTDescriptor
    lut = np.asarray(item.LUTData, dtype=np.float64)
    index = np.clip(ds.pixel_array.astype(np.int64) - first, 0, entries - 1)
    expected = percentile_stretch(lut[index])
    np.testing.assert_allclose(prepare_frames(ds, SPEC)[0].display, expected, atol=1e-6)
    # a window is in modality-LUT output units, not stored units
    ds.WindowCenter, ds.WindowWidth = 1000, 1000
    windowed = linear_window(lut[index], 1000.0, 1000.0)
    np.testing.assert_allclose(prepare_frames(ds, SPEC)[0].display, windowed, atol=1e-6)
    assert np.abs(windowed - linear_window(ds.pixel_array.astype(np.float64), 1000.0, 1000.0)).max() > 0.5


def _functional(ds, index: int, keyword: str):
    """The first item of a functional group macro for a frame: per-frame, else shared."""
    for groups in (ds.PerFrameFunctionalGroupsSequence[index], ds.SharedFunctionalGroupsSequence[0]):
        if keyword in groups:
            return groups[keyword][0]
    raise KeyError(keyword)


def test_enhanced_ct_uses_functional_groups():
    ds = read_dataset(data_file("eCT_Supplemental.dcm"))
    assert "WindowCenter" not in ds and "RescaleSlope" not in ds  # only in the functional groups
    # give frame 1 its own window in the per-frame group; frame 0 keeps the shared one
    override = pydicom.Dataset()
    override.WindowCenter, override.WindowWidth = 400, 2000
    ds.PerFrameFunctionalGroupsSequence[1].FrameVOILUTSequence = [override]
    frames = prepare_frames(ds, SPEC)
    assert len(frames) == int(ds.NumberOfFrames) == 2
    stored = ds.pixel_array
    windows = []
    for i, frame in enumerate(frames):
        pvt = _functional(ds, i, "PixelValueTransformationSequence")
        voi = _functional(ds, i, "FrameVOILUTSequence")
        windows.append(float(voi.WindowCenter))
        values = stored[i] * float(pvt.RescaleSlope) + float(pvt.RescaleIntercept)
        expected = linear_window(values, float(voi.WindowCenter), float(voi.WindowWidth))
        assert frame.frame_index == i
        np.testing.assert_allclose(frame.display, expected, atol=1e-6)
    assert windows == [49.0, 400.0]


@pytest.mark.parametrize("name", ["emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm"])
def test_multiframe_grayscale_every_frame(name):
    ds = read_dataset(data_file(name))
    frames = prepare_frames(ds, SPEC)
    assert len(frames) == int(ds.NumberOfFrames) == 10
    assert [f.frame_index for f in frames] == list(range(10))
    stored = ds.pixel_array.astype(np.float64)
    for i in (0, 7):
        check_frame(frames[i], SPEC, (ds.Rows, ds.Columns))
        np.testing.assert_allclose(frames[i].display, percentile_stretch(stored[i]), atol=1e-6)
    assert not np.array_equal(frames[0].display, frames[7].display)


def test_window_to_unit_refuses_colour():
    ds = read_dataset(data_file("US1_UNCR.dcm"))
    with pytest.raises(UnsupportedImageError, match="RGB"):
        window_to_unit(ds, ds.pixel_array, SPEC)
