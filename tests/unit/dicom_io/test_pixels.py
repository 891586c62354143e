"""dicom_io.pixels on real DICOM files (pydicom's test files and pydicom-data), no committed data.

Every check is against an independent computation (the DICOM formulas written out here, the
decoded pixel array, an analytic position), so each one can fail.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_color_lut

from dicom_io.errors import DicomInputError, UnsupportedImageError
from dicom_io.pixels import (
    GridMapping,
    InputSpec,
    PreparedFrame,
    prepare_frames,
    read_dataset,
    window_to_unit,
)
from tests.helpers import REPO_ROOT, data_file

SPEC = InputSpec(rows=224, columns=224)
BT601 = np.array([0.299, 0.587, 0.114])


def linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1, written out, output range [0, 1]."""
    out = np.empty_like(x, dtype=np.float64)
    low = x <= center - 0.5 - (width - 1) / 2
    high = x > center - 0.5 + (width - 1) / 2
    mid = ~low & ~high
    out[low] = 0.0
    out[high] = 1.0
    out[mid] = (x[mid] - (center - 0.5)) / (width - 1) + 0.5
    return out


def percentile_stretch(x: np.ndarray, lo: float = 0.5, hi: float = 99.5) -> np.ndarray:
    a, b = np.percentile(x, [lo, hi])
    return np.clip((x - a) / (b - a), 0.0, 1.0)


def content_mask(mapping: GridMapping) -> np.ndarray:
    """Model-grid pixels whose centres lie inside the content box."""
    top, left, height, width = mapping.content_box
    rows = np.arange(mapping.model_shape[0]) + 0.5
    cols = np.arange(mapping.model_shape[1]) + 0.5
    in_rows = (rows >= top) & (rows <= top + height)
    in_cols = (cols >= left) & (cols <= left + width)
    return in_rows[:, None] & in_cols[None, :]


def check_frame(frame: PreparedFrame, spec: InputSpec, shape: tuple[int, int]) -> None:
    assert frame.model_input.dtype == np.float32
    assert frame.model_input.shape == (spec.channels, spec.rows, spec.columns)
    assert frame.display.dtype == np.float32
    assert frame.display.shape == shape
    for array in (frame.model_input, frame.display):
        assert np.isfinite(array).all()
        assert array.min() >= 0.0 and array.max() <= 1.0
    assert frame.mapping.source_shape == shape
    assert frame.mapping.model_shape == (spec.rows, spec.columns)


# --------------------------------------------------------------------------------------------
# CR radiographs (2k x 2k, MONOCHROME1): decoded once per module
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rg1() -> dict:
    unc = read_dataset(data_file("RG1_UNCR.dcm"))
    j2k = read_dataset(data_file("RG1_J2KR.dcm"))
    flipped = copy.deepcopy(unc)
    flipped.PhotometricInterpretation = "MONOCHROME2"
    return {
        "ds": unc,
        "unc": prepare_frames(unc, SPEC),
        "j2k": prepare_frames(j2k, SPEC),
        "flipped": prepare_frames(flipped, SPEC),
    }


def test_rg1_is_monochrome1_cr(rg1):
    ds = rg1["ds"]
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    assert len(rg1["unc"]) == 1
    check_frame(rg1["unc"][0], SPEC, (ds.Rows, ds.Columns))
    # non-square: letterboxed left/right, full height
    top, left, height, width = rg1["unc"][0].mapping.content_box
    assert top == 0.0 and height == 224.0
    assert width == pytest.approx(224 * ds.Columns / ds.Rows)
    assert left == pytest.approx((224 - width) / 2)


def test_rg1_jpeg2000_lossless_gives_identical_input(rg1):
    np.testing.assert_array_equal(rg1["unc"][0].model_input, rg1["j2k"][0].model_input)
    np.testing.assert_array_equal(rg1["unc"][0].display, rg1["j2k"][0].display)


def test_rg1_monochrome1_is_inverted_window(rg1):
    ds = rg1["ds"]
    stored = ds.pixel_array.astype(np.float64)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    expected = 1.0 - linear_window(stored, center, width)
    np.testing.assert_allclose(rg1["unc"][0].display, expected, atol=1e-5)
    # the highest stored value (most attenuation... displayed darkest in MONOCHROME1)
    display = rg1["unc"][0].display
    assert display.flat[np.argmax(stored)] < display.flat[np.argmin(stored)]


def test_rg1_monochrome1_and_2_are_complements(rg1):
    m1, m2 = rg1["unc"][0], rg1["flipped"][0]
    np.testing.assert_allclose(m1.display + m2.display, 1.0, atol=1e-6)
    mask = content_mask(m1.mapping)
    total = m1.model_input[0] + m2.model_input[0]
    np.testing.assert_allclose(total[mask], 1.0, atol=1e-5)
    assert np.all(total[~mask] == 0.0)  # padding stays 0 in both polarities
    assert (~mask).sum() > 0


def test_rg3_jpeg2000_lossless_matches_uncompressed():
    a = prepare_frames(read_dataset(data_file("RG3_UNCR.dcm")), SPEC)[0]
    b = prepare_frames(read_dataset(data_file("RG3_J2KR.dcm")), SPEC)[0]
    np.testing.assert_array_equal(a.model_input, b.model_input)
    check_frame(a, SPEC, (1760, 1760))


# --------------------------------------------------------------------------------------------
# Grayscale: modality LUT and VOI
# --------------------------------------------------------------------------------------------


def test_ct_small_shapes_and_range():
    ds = read_dataset(data_file("CT_small.dcm"))
    frames = prepare_frames(ds, SPEC)
    assert len(frames) == 1 and frames[0].frame_index == 0
    check_frame(frames[0], SPEC, (128, 128))


@pytest.mark.parametrize(
    "name", ["MR_small_jp2klossless.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_bigendian.dcm"]
)
def test_mr_small_lossless_variants_agree(name):
    reference = prepare_frames(read_dataset(data_file("MR_small.dcm")), SPEC)[0]
    variant = prepare_frames(read_dataset(data_file(name)), SPEC)[0]
    np.testing.assert_array_equal(reference.model_input, variant.model_input)


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


def test_grayscale_replicated_to_three_channels():
    ds = read_dataset(data_file("CT_small.dcm"))
    one = prepare_frames(ds, SPEC)[0].model_input
    three = prepare_frames(ds, InputSpec(224, 224, channels=3))[0].model_input
    assert three.shape == (3, 224, 224)
    for c in range(3):
        np.testing.assert_array_equal(three[c], one[0])


# --------------------------------------------------------------------------------------------
# Colour
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


def smooth_field(shape: tuple[int, int], periods: float = 2.0) -> np.ndarray:
    rows, cols = shape
    y = (np.arange(rows) + 0.5) / rows
    x = (np.arange(cols) + 0.5) / cols
    return (
        0.5
        + 0.25 * np.sin(2 * np.pi * periods * y)[:, None] * np.cos(2 * np.pi * periods * 0.7 * x)[None, :]
        + 0.2 * x[None, :]
    ).astype(np.float32)


def test_letterbox_geometry_is_centred_and_padded_with_zero():
    mapping = GridMapping.for_shapes((300, 500), (224, 224), "letterbox")
    top, left, height, width = mapping.content_box
    assert width == 224.0 and left == 0.0
    assert height == pytest.approx(300 * 224 / 500)
    assert top == pytest.approx((224 - height) / 2)
    out = mapping.to_model_grid(np.ones((300, 500), dtype=np.float32))
    assert out.dtype == np.float32 and out.shape == (224, 224)
    mask = content_mask(mapping)
    assert np.all(out[~mask] == 0.0)
    np.testing.assert_allclose(out[mask], 1.0, atol=1e-6)
    filled = np.flatnonzero(out[:, 112] > 0)
    assert filled[0] == 224 - 1 - filled[-1]  # centred: same padding above and below
    assert filled[0] > 40


def test_stretch_geometry_fills_the_grid():
    mapping = GridMapping.for_shapes((300, 500), (224, 224), "stretch")
    assert mapping.content_box == (0.0, 0.0, 224.0, 224.0)
    np.testing.assert_allclose(mapping.to_model_grid(np.ones((300, 500))), 1.0, atol=1e-6)


@pytest.mark.parametrize("aspect", ["letterbox", "stretch"])
@pytest.mark.parametrize("source", [(300, 500), (1955, 1841), (40, 90)])
def test_round_trip_source_model_source(aspect, source):
    mapping = GridMapping.for_shapes(source, (224, 224), aspect)
    field = smooth_field(source)
    back = mapping.to_source_grid(mapping.to_model_grid(field))
    assert back.dtype == np.float32 and back.shape == source
    assert np.corrcoef(field.ravel(), back.ravel())[0, 1] > 0.999
    assert np.abs(field - back).mean() < 0.005
    # the border rows and columns come back too (not blended with the letterbox padding)
    for edge in (back[0], back[-1], back[:, 0], back[:, -1]):
        assert edge.min() > 0.2
    assert np.abs(field - back).max() < 0.05


@pytest.mark.parametrize("source", [(300, 500), (40, 90), (1955, 1841)])
def test_round_trip_model_source_model(source):
    mapping = GridMapping.for_shapes(source, (224, 224), "letterbox")
    smooth = smooth_field((224, 224), periods=1.5)
    again = mapping.to_model_grid(mapping.to_source_grid(smooth))
    mask = content_mask(mapping)
    # away from the content edge (where the map is cut off), the map comes back
    inner = mask & np.roll(mask, 2, 0) & np.roll(mask, -2, 0) & np.roll(mask, 2, 1) & np.roll(mask, -2, 1)
    assert np.corrcoef(smooth[inner], again[inner])[0, 1] > 0.99
    assert np.abs(smooth[inner] - again[inner]).mean() < 0.01
    assert np.all(again[~mask] == 0.0)


@pytest.mark.parametrize("source", [(300, 500), (40, 90), (1955, 1841)])
@pytest.mark.parametrize("point", [(100, 120), (70, 30), (150, 200)])
def test_model_point_lands_on_the_analytic_source_position(source, point):
    mapping = GridMapping.for_shapes(source, (224, 224), "letterbox")
    top, left, height, width = mapping.content_box
    y, x = point
    if not content_mask(mapping)[y, x]:
        pytest.skip("point in the padding for this source shape")
    delta = np.zeros((224, 224), dtype=np.float32)
    delta[y, x] = 1.0
    on_source = mapping.to_source_grid(delta)
    peak = np.unravel_index(np.argmax(on_source), on_source.shape)
    # centre of model pixel (y + 0.5) -> continuous source coordinate -> pixel index
    expected_y = (y + 0.5 - top) * source[0] / height - 0.5
    expected_x = (x + 0.5 - left) * source[1] / width - 0.5
    assert abs(peak[0] - expected_y) <= 1.0 and abs(peak[1] - expected_x) <= 1.0
    assert on_source.max() > 0


def test_source_point_lands_on_the_analytic_model_position():
    source = (60, 90)
    mapping = GridMapping.for_shapes(source, (224, 224), "letterbox")
    top, left, height, width = mapping.content_box
    image = np.zeros(source, dtype=np.float32)
    image[20, 70] = 1.0
    on_model = mapping.to_model_grid(image)
    peak = np.unravel_index(np.argmax(on_model), on_model.shape)
    expected_y = top + (20 + 0.5) * height / source[0] - 0.5
    expected_x = left + (70 + 0.5) * width / source[1] - 0.5
    assert abs(peak[0] - expected_y) <= 1.0 and abs(peak[1] - expected_x) <= 1.0


def test_mapping_rejects_wrong_shapes():
    mapping = GridMapping.for_shapes((30, 40), (16, 16))
    with pytest.raises(ValueError, match=r"\(30, 40\)"):
        mapping.to_model_grid(np.zeros((40, 30)))
    with pytest.raises(ValueError, match=r"\(16, 16\)"):
        mapping.to_source_grid(np.zeros((30, 40)))


def test_prepared_model_input_follows_the_mapping():
    ds = read_dataset(data_file("US1_UNCR.dcm"))  # 480 x 640: letterboxed top and bottom
    frame = prepare_frames(ds, SPEC)[0]
    np.testing.assert_allclose(frame.model_input[0], frame.mapping.to_model_grid(frame.display), atol=1e-6)
    assert frame.mapping.content_box[0] == pytest.approx(28.0)
    assert np.all(frame.model_input[:, :27, :] == 0) and np.all(frame.model_input[:, 197:, :] == 0)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


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


def test_window_to_unit_refuses_colour():
    ds = read_dataset(data_file("US1_UNCR.dcm"))
    with pytest.raises(UnsupportedImageError, match="RGB"):
        window_to_unit(ds, ds.pixel_array, SPEC)


@pytest.mark.parametrize(
    "kwargs, text",
    [
        ({"rows": 0, "columns": 224}, "rows"),
        ({"rows": 224, "columns": -3}, "columns"),
        ({"rows": 224, "columns": 224, "channels": 2}, "channels"),
        ({"rows": 224, "columns": 224, "aspect": "crop"}, "crop"),
        ({"rows": 224, "columns": 224, "windowing": "auto"}, "auto"),
        ({"rows": 224, "columns": 224, "percentiles": (99.0, 1.0)}, "percentiles"),
        ({"rows": 224, "columns": 224, "percentiles": (-1.0, 50.0)}, "percentiles"),
    ],
)
def test_input_spec_validation(kwargs, text):
    with pytest.raises(ValueError, match=text):
        InputSpec(**kwargs)


def test_no_torch_import():
    code = "import sys, dicom_io.pixels; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------------------------
# Nothing crashes: every file of pydicom's test data either prepares or gives DicomInputError
# --------------------------------------------------------------------------------------------


def _all_test_files() -> list[str]:
    folders = {os.path.dirname(get_testdata_file("CT_small.dcm"))}
    extra = get_testdata_file("RG1_UNCR.dcm")
    if extra:
        folders.add(os.path.dirname(extra))
    skip = {
        "RG1_UNCR.dcm",
        "RG1_J2KR.dcm",
        "RG1_UNCI.dcm",
        "RG1_J2KI.dcm",
        "RG3_UNCR.dcm",
        "RG3_J2KR.dcm",
        "RG3_UNCI.dcm",
        "RG3_J2KI.dcm",
        "color3d_jpeg_baseline.dcm",
    }  # slow
    return sorted(
        os.path.join(folder, name)
        for folder in folders
        for name in os.listdir(folder)
        if name.endswith(".dcm") and name not in skip
    )


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_test_file_prepares_or_fails_cleanly():
    spec = InputSpec(32, 32)
    prepared = refused = 0
    for path in _all_test_files():
        try:
            frames = prepare_frames(read_dataset(path), spec)
        except DicomInputError as exc:
            assert os.path.basename(path) in str(exc)
            refused += 1
            continue
        assert frames and all(np.isfinite(f.model_input).all() for f in frames), path
        assert all(0.0 <= f.model_input.min() and f.model_input.max() <= 1.0 for f in frames), path
        prepared += 1
    assert prepared > 50 and refused > 5
