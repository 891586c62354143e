"""The phantom generator: deterministic, valid DICOM, lesions where the masks say."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from service.synthetic.phantoms import CLASSES, MAX_STORED, make_phantom, write_phantom_studies


def test_same_seed_and_index_give_identical_phantoms() -> None:
    first = make_phantom(3, "nodule", seed=11)
    second = make_phantom(3, "nodule", seed=11)
    assert first.dataset.SOPInstanceUID == second.dataset.SOPInstanceUID
    assert np.array_equal(first.dataset.pixel_array, second.dataset.pixel_array)
    assert np.array_equal(first.lesion_mask, second.lesion_mask)
    other = make_phantom(4, "nodule", seed=11)
    assert other.dataset.SOPInstanceUID != first.dataset.SOPInstanceUID
    assert not np.array_equal(other.dataset.pixel_array, first.dataset.pixel_array)


@pytest.mark.parametrize("label", CLASSES)
def test_masks_match_the_class(label: str) -> None:
    phantom = make_phantom(0, label, seed=1)
    area = int(phantom.lesion_mask.sum())
    if label == "normal":
        assert area == 0
    else:
        assert area > 200, f"{label} lesion too small: {area} pixels"


def test_lesions_are_denser_than_the_lung_around_them() -> None:
    """A nodule brightens its disc: the lesion is what the model must find, not noise."""
    for index in range(5):
        nodule = make_phantom(index, "nodule", seed=2)
        pixels = nodule.dataset.pixel_array.astype(float)
        mask = nodule.lesion_mask
        ring = _ring_around(mask, 6)
        assert pixels[mask].mean() > pixels[ring].mean() + 300, "nodule not visibly denser than its surroundings"


def _ring_around(mask: np.ndarray, width: int) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=width) & ~ndimage.binary_dilation(mask, iterations=2)


def test_monochrome1_stores_inverted_values() -> None:
    mono2 = make_phantom(5, "effusion", seed=3, photometric="MONOCHROME2").dataset.pixel_array.astype(int)
    mono1 = make_phantom(5, "effusion", seed=3, photometric="MONOCHROME1").dataset.pixel_array.astype(int)
    assert np.array_equal(mono1, MAX_STORED - mono2)


def test_written_studies_are_readable_dicom_with_realistic_tags(tmp_path) -> None:
    written = write_phantom_studies(tmp_path, studies=4, seed=0, rows=256, cols=240)
    assert {phantom.dataset.Modality for _, phantom in written} == {"CR", "DX"}
    assert {phantom.dataset.PhotometricInterpretation for _, phantom in written} == {"MONOCHROME1", "MONOCHROME2"}
    for path, _ in written:
        ds = pydicom.dcmread(path)
        assert ds.BitsStored == 12 and ds.pixel_array.max() <= MAX_STORED
        assert ds.Rows == 256 and ds.Columns == 240
        assert ds.PatientName.family_name == "PHANTOM"
        assert float(ds.PixelSpacing[0]) > 0 and float(ds.WindowWidth) > 0
        assert ds.BodyPartExamined == "CHEST" and ds.ViewPosition == "PA"
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID


def test_laterality_marker_is_burned_into_the_top_left_corner() -> None:
    phantom = make_phantom(0, "normal", seed=0)
    pixels = phantom.dataset.pixel_array.astype(float)
    rows, cols = pixels.shape
    corner = pixels[: rows // 8, : cols // 8]
    opposite = pixels[: rows // 8, -cols // 8 :]
    assert corner.max() > np.percentile(pixels, 99), "no bright marker in the top-left corner"
    assert opposite.max() < corner.max() - 1000


def test_unknown_class_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="pneumonia"):
        make_phantom(0, "pneumonia")


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_the_token_changes_only_its_top_right_corner_and_is_bright(photometric: str) -> None:
    plain = make_phantom(5, "effusion", seed=2, photometric=photometric)
    marked = make_phantom(5, "effusion", seed=2, photometric=photometric, token=True)
    assert plain.token_mask is not None and not plain.token_mask.any()
    changed = plain.dataset.pixel_array != marked.dataset.pixel_array
    rows, cols = changed.shape
    ys, xs = np.nonzero(changed)
    assert ys.max() < rows * 0.15 and xs.min() > cols * 0.5, "the token belongs in the top-right corner"
    assert changed[marked.token_mask].mean() > 0.9 and not changed[~_dilated(marked.token_mask)].any()
    assert np.array_equal(plain.lesion_mask, marked.lesion_mask)
    # Bright as displayed: denser in MONOCHROME2 (higher values), the inverse in MONOCHROME1.
    difference = marked.dataset.pixel_array.astype(int) - plain.dataset.pixel_array.astype(int)
    assert (difference[changed] > 0).all() if photometric == "MONOCHROME2" else (difference[changed] < 0).all()


def _dilated(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=2)
