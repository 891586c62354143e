"""Volume assembly: a CT series (any instance order, or one enhanced multi-frame object) becomes one
volume sorted along the slice normal, equal to what was written; a series that is not one regular
block of parallel slices is refused whole, with the reason; the model grid maps millimetres to
millimetres (checked on an analytic ramp) and back."""

from __future__ import annotations

import copy
import io
import random
import re

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from dicom_io.pixels.volume import VolumeError, VolumeGrid, assemble_volume, prepare_values
from service.synthetic.volumes import HU_OFFSET, ct_series, make_ct_phantom

SHAPE = (10, 24, 20)
SPACING = (2.5, 2.0, 1.5)


def _roundtrip(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


@pytest.fixture(scope="module")
def phantom_and_series() -> tuple[object, list[Dataset]]:
    phantom = make_ct_phantom(2, "nodule", seed=4, shape=SHAPE, spacing=SPACING)
    return phantom, [_roundtrip(ds) for ds in ct_series(phantom)]


def _stored_hu(hu: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(hu), -HU_OFFSET, 4095 - HU_OFFSET)


def test_any_instance_order_gives_the_written_volume(phantom_and_series) -> None:
    phantom, series = phantom_and_series
    shuffled = list(series)
    random.Random(3).shuffle(shuffled)
    volume = assemble_volume(shuffled, min_slices=4)
    np.testing.assert_array_equal(volume.values, _stored_hu(phantom.hu))
    assert volume.geometry.shape == SHAPE
    np.testing.assert_allclose(volume.geometry.spacing, SPACING)
    # sorted feet to head along the normal (0, 0, 1), whatever the instance numbers say
    z = [float(ds.ImagePositionPatient[2]) for ds in volume.sources]
    assert z == sorted(z) and volume.geometry.origin[2] == pytest.approx(z[0])
    assert [int(ds.InstanceNumber) for ds in volume.sources] == list(range(SHAPE[0], 0, -1))
    assert len(volume.instances) == SHAPE[0]
    position = tuple(float(v) for v in volume.sources[3].ImagePositionPatient)
    assert volume.geometry.slice_position(3) == pytest.approx(position)


def test_reversed_orientation_sorts_along_its_own_normal(phantom_and_series) -> None:
    """Columns running to the patient's right flip the normal to (0, 0, -1): head first."""
    _, series = phantom_and_series
    flipped = [copy.deepcopy(ds) for ds in series]
    for ds in flipped:
        ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
    volume = assemble_volume(flipped, min_slices=4)
    z = [float(ds.ImagePositionPatient[2]) for ds in volume.sources]
    assert z == sorted(z, reverse=True)


def test_enhanced_multiframe_is_read_through_its_functional_groups(phantom_and_series) -> None:
    phantom, series = phantom_and_series
    enhanced = _as_enhanced(series)
    volume = assemble_volume([_roundtrip(enhanced)], min_slices=4)
    np.testing.assert_array_equal(volume.values, _stored_hu(phantom.hu))
    assert volume.frames == tuple(reversed(range(SHAPE[0])))  # frame k holds the k-th instance (head first)
    np.testing.assert_allclose(volume.geometry.spacing, SPACING)


def _as_enhanced(series: list[Dataset]) -> Dataset:
    """The series as one multi-frame object with per-frame Plane Position and shared orientation,
    pixel measures and rescale (the geometry an Enhanced CT carries)."""
    ds = copy.deepcopy(series[0])
    ds.NumberOfFrames = len(series)
    ds.PixelData = b"".join(frame.PixelData for frame in series)
    shared = Dataset()
    orientation, measures, rescale = Dataset(), Dataset(), Dataset()
    orientation.ImageOrientationPatient = series[0].ImageOrientationPatient
    measures.PixelSpacing = series[0].PixelSpacing
    measures.SliceThickness = series[0].SliceThickness
    rescale.RescaleIntercept, rescale.RescaleSlope, rescale.RescaleType = -HU_OFFSET, 1, "HU"
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PixelValueTransformationSequence = DicomSequence([rescale])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    for frame in series:
        group, position = Dataset(), Dataset()
        position.ImagePositionPatient = frame.ImagePositionPatient
        group.PlanePositionSequence = DicomSequence([position])
        frames.append(group)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        del ds[keyword]
    del ds.RescaleIntercept, ds.RescaleSlope
    return ds


@pytest.mark.parametrize(
    ("damage", "reason", "words"),
    [
        ("gap", "gap", "gap between slices: 5.00 mm"),
        ("orientation", "mixed_orientation", "mixed orientations"),
        ("size", "inconsistent_size", "inconsistent sizes: 24x18"),
        ("spacing", "inconsistent_spacing", "inconsistent Pixel Spacing"),
        ("duplicate", "duplicate_position", "two slices at one position"),
        ("geometry", "missing_geometry", "no ImagePositionPatient"),
        ("tilt", "tilted", "not stacked along their normal"),
        ("few", "too_few_slices", "has 3 slice(s); a volume needs at least 4"),
    ],
)
def test_a_broken_series_is_refused_whole_with_its_reason(
    phantom_and_series, damage: str, reason: str, words: str
) -> None:
    _, series = phantom_and_series
    broken = [copy.deepcopy(ds) for ds in series]
    if damage == "gap":
        del broken[4]
    elif damage == "orientation":
        broken[5].ImageOrientationPatient = [1, 0, 0, 0, 0.8, -0.6]
    elif damage == "size":
        broken[5].Columns = 18
        broken[5].PixelData = np.zeros((24, 18), dtype=np.uint16).tobytes()
    elif damage == "spacing":
        broken[5].PixelSpacing = [2.0, 1.6]
    elif damage == "duplicate":
        broken[5].ImagePositionPatient = broken[6].ImagePositionPatient
    elif damage == "geometry":
        del broken[5].ImagePositionPatient
    elif damage == "tilt":
        for k, ds in enumerate(broken):
            position = [float(v) for v in ds.ImagePositionPatient]
            ds.ImagePositionPatient = [position[0], position[1] + 0.5 * k, position[2]]
    else:
        broken = broken[:3]
    with pytest.raises(VolumeError, match=re.escape(words)) as caught:
        assemble_volume(broken, min_slices=4)
    assert caught.value.reason == reason


def test_two_series_are_not_one_volume(phantom_and_series) -> None:
    _, series = phantom_and_series
    other = copy.deepcopy(series[0])
    other.SeriesInstanceUID = "1.2.3.4"
    with pytest.raises(VolumeError, match="2 series") as caught:
        assemble_volume([*series, other], min_slices=4)
    assert caught.value.reason == "mixed_series"


def test_model_grid_samples_millimetres() -> None:
    """A linear ramp in mm, resampled to another spacing, equals the ramp evaluated at the model
    voxels' centres (centre on centre); drawn back, it equals the original where the grid covers it."""
    shape, spacing = (20, 30, 40), (2.5, 2.0, 1.0)
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    ramp = (0.3 * z - 0.2 * y + 0.1 * x).astype(np.float32)
    model_shape, model_spacing = (16, 16, 16), (3.0, 3.0, 2.0)
    grid = VolumeGrid(shape, spacing, model_shape, model_spacing)
    resampled = grid.to_model(ramp, fill=0.0)
    model_axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(model_shape, model_spacing)]
    mz, my, mx = np.meshgrid(*model_axes, indexing="ij")
    expected = 0.3 * mz - 0.2 * my + 0.1 * mx
    inside = (np.abs(mz) < 20) & (np.abs(my) < 25) & (np.abs(mx) < 15)  # away from the edges (smoothing, fill)
    np.testing.assert_allclose(resampled[inside], expected[inside], atol=1e-3)
    back = grid.to_source(resampled)
    covered = (np.abs(z) < 20) & (np.abs(y) < 20) & (np.abs(x) < 12)
    np.testing.assert_allclose(back[covered], ramp[covered], atol=1e-3)


def test_prepare_values_windows_and_pads_with_zero() -> None:
    values = np.full((8, 8, 8), 400.0, dtype=np.float32)
    unit, grid = prepare_values(values, (1.0, 1.0, 1.0), (12, 12, 12), (1.0, 1.0, 1.0), (-1000.0, 400.0))
    assert grid.shape == (12, 12, 12)
    assert unit[6, 6, 6] == pytest.approx(1.0) and unit[0, 0, 0] == pytest.approx(0.0)
    assert float(unit.min()) >= 0 and float(unit.max()) <= 1
