"""Volume outputs on a phantom CT series: dciodvfy gives zero errors; the multi-frame Parametric Map and
Segmentation have one frame per source slice, each frame at its slice's position with a reference to
its own source instance, in the source's Frame of Reference, holding that slice's values; every source
instance is referenced; Secondary Captures share one colour scale over the volume."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_io.pixels.volume import assemble_volume
from dicom_io.writers.volume import (
    VolumeExplanation,
    build_volume_parametric_map,
    build_volume_secondary_captures,
    build_volume_segmentation,
)
from service.synthetic.volumes import ct_series, make_ct_phantom
from tests.unit.dicom_io.writers.writer_cases import dciodvfy

SHAPE = (8, 32, 28)


def _roundtrip(ds: pydicom.Dataset) -> pydicom.Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


@pytest.fixture(scope="module")
def case() -> tuple[list[pydicom.Dataset], VolumeExplanation]:
    phantom = make_ct_phantom(1, "nodule", seed=6, shape=SHAPE, spacing=(3.0, 2.0, 2.0))
    volume = assemble_volume([_roundtrip(ds) for ds in ct_series(phantom)], min_slices=4)
    rng = np.random.default_rng(0)
    # signed map: the lesion strongly positive, noise around it
    attribution = (phantom.lesion_mask * 2.0 + rng.normal(0, 0.01, SHAPE)).astype(np.float32)
    display = np.clip((volume.values + 1000) / 1400, 0, 1).astype(np.float32)
    explanation = VolumeExplanation("gradcam", "nodule", 0.87, "pacs-xai-test-ct", "1.0.0", attribution, display)
    return list(volume.sources), explanation


def _written(obj: pydicom.Dataset, path: Path) -> pydicom.Dataset:
    obj.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


@pytest.mark.parametrize("kind", ["pm", "seg_fractional", "seg_binary"])
def test_multiframe_outputs_are_valid_and_frame_per_slice(case, kind: str, tmp_path: Path) -> None:
    sources, explanation = case
    if kind == "pm":
        obj = build_volume_parametric_map(sources, explanation)
    else:
        obj = build_volume_segmentation(sources, explanation, kind=kind.removeprefix("seg_"))
    written = _written(obj, tmp_path / f"{kind}.dcm")
    report, errors = dciodvfy(tmp_path / f"{kind}.dcm")
    assert ("ParametricMap" if kind == "pm" else "Segmentation") in report
    assert not errors, "\n".join(errors)
    assert int(written.NumberOfFrames) == len(sources)
    assert written.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert written.StudyInstanceUID == sources[0].StudyInstanceUID
    by_uid = {ds.SOPInstanceUID: k for k, ds in enumerate(sources)}
    pixels = written.pixel_array.astype(np.float64)
    referenced = set()
    for frame, item in enumerate(written.PerFrameFunctionalGroupsSequence):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = by_uid[uid]
        referenced.add(uid)
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        assert position == pytest.approx([float(v) for v in sources[k].ImagePositionPatient])
        if kind == "pm":
            # Stored over the volume's largest magnitude; the Real World Value slope gives it back.
            slope = written.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0].RealWorldValueSlope
            np.testing.assert_allclose(pixels[frame] * slope, explanation.attribution[k], rtol=1e-6, atol=1e-9)
            assert np.abs(pixels).max() == pytest.approx(1.0)
        elif kind == "seg_fractional":
            positive = np.clip(explanation.attribution, 0, None)
            expected = positive[k] / positive.max() * int(written.MaximumFractionalValue)
            np.testing.assert_allclose(pixels[frame], expected, atol=0.51)
    assert referenced == set(by_uid), "every source instance has its frame"
    series_refs = {
        item.ReferencedSOPInstanceUID
        for series in written.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    assert series_refs == set(by_uid)


def test_binary_segmentation_is_the_volume_top_region(case, tmp_path: Path) -> None:
    sources, explanation = case
    seg = build_volume_segmentation(sources, explanation, kind="binary", mass_share=0.5)
    written = _written(seg, tmp_path / "b.dcm")
    mask = written.pixel_array.astype(bool)
    inside = explanation.attribution > 1.0  # the lesion voxels
    assert mask.sum() > 0 and mask.sum() < inside.sum() + 5
    frames = {
        item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID: f
        for f, item in enumerate(written.PerFrameFunctionalGroupsSequence)
    }
    for k, ds in enumerate(sources):
        assert not np.any(mask[frames[ds.SOPInstanceUID]] & ~inside[k])


def test_outputs_are_deterministic(case) -> None:
    sources, explanation = case
    first, again = build_volume_parametric_map(sources, explanation), build_volume_parametric_map(sources, explanation)
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (again.SOPInstanceUID, again.SeriesInstanceUID)
    assert first.SeriesInstanceUID != build_volume_segmentation(sources, explanation).SeriesInstanceUID


def test_secondary_captures_per_key_slice_share_one_scale(case, tmp_path: Path) -> None:
    sources, explanation = case
    captures = build_volume_secondary_captures(sources, explanation, key_slices=2)
    mass = np.clip(explanation.attribution, 0, None).reshape(len(sources), -1).sum(axis=1)
    assert [index for index, _ in captures] == sorted(np.argsort(-mass)[:2].tolist())
    for index, sc in captures:
        path = tmp_path / f"sc{index}.dcm"
        sc.save_as(path, enforce_file_format=True)
        _, errors = dciodvfy(path)
        assert not errors, "\n".join(errors)
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == sources[index].SOPInstanceUID
    every = build_volume_secondary_captures(sources, explanation)
    assert [index for index, _ in every] == list(range(len(sources)))
    # one scale: a slice without lesion shows (almost) no heat, though its own noise peaks would fill a per-slice scale
    quiet = int(np.argmin(mass))
    rgb = every[quiet][1].pixel_array[:, : SHAPE[2]].astype(int)
    assert np.abs(rgb[..., 0] - rgb[..., 2]).mean() < 20


def test_maps_off_the_source_grid_are_refused(case) -> None:
    sources, explanation = case
    with pytest.raises(ValueError, match="draw the map back onto the source voxels"):
        build_volume_parametric_map(sources[:-1], explanation)
