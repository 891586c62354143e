"""dicom_io.pixels.prepare: whole images to model input, on real DICOM files (pydicom's test files and
pydicom-data, no committed data): CR radiographs, lossless variants, channels, every test file.

Every check is against an independent computation (the DICOM formulas written out, the decoded
pixel array, an analytic position), so each one can fail.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from dicom_io.errors import DicomInputError
from dicom_io.pixels import InputSpec, prepare_frames, read_dataset
from tests.helpers import REPO_ROOT, data_file
from tests.unit.dicom_io.pixels.pixel_cases import SPEC, check_frame, content_mask, linear_window


# CR radiographs (2k x 2k, MONOCHROME1): decoded once per module
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


def test_grayscale_replicated_to_three_channels():
    ds = read_dataset(data_file("CT_small.dcm"))
    one = prepare_frames(ds, SPEC)[0].model_input
    three = prepare_frames(ds, InputSpec(224, 224, channels=3))[0].model_input
    assert three.shape == (3, 224, 224)
    for c in range(3):
        np.testing.assert_array_equal(three[c], one[0])


def test_no_torch_import():
    code = "import sys, dicom_io.pixels; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# Nothing crashes: every file of pydicom's test data either prepares or gives DicomInputError
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
