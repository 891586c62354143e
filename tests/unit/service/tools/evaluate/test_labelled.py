"""The labelled sets of pacs-xai evaluate: built-in phantoms, and a hospital-style folder of images
with ground-truth SEGs, which must come out the same for the same phantoms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from dicom_io.annotations import write_annotation
from service.synthetic.phantoms import make_phantom, write_phantom_studies
from service.tools.evaluate.labelled import folder_set, phantom_set

CLASSES = ("normal", "nodule", "effusion")


def test_the_phantom_set_cycles_the_classes_and_masks_only_lesions() -> None:
    labelled = phantom_set(7)
    assert [image.label for image in labelled.images] == ["nodule", "effusion", "normal"] * 2 + ["nodule"]
    assert len(labelled.lesions) == 5
    assert all(image.mask is None for image in labelled.images if image.label == "normal")
    assert all(image.mask.any() for image in labelled.lesions)
    with_token = phantom_set(3, token_classes={"nodule"})
    assert with_token.images[0].token_mask.any() and not with_token.images[1].token_mask.any()


def test_a_folder_with_ground_truth_segs_gives_the_phantoms_labels_and_masks(tmp_path: Path) -> None:
    written = write_phantom_studies(tmp_path, studies=6, seed=3, rows=192, cols=160, annotations=True)
    labelled = folder_set(tmp_path, CLASSES)
    assert not labelled.skipped
    by_name = {image.name: image for image in labelled.images}
    for path, phantom in written:
        image = by_name[path.name]
        assert image.label == phantom.label
        if phantom.label == "normal":
            assert image.mask is None
        else:
            assert np.array_equal(image.mask, phantom.lesion_mask)


def test_segment_names_map_to_classes_and_what_cannot_be_scored_is_named(tmp_path: Path) -> None:
    nodule = make_phantom(0, "nodule", seed=4, rows=160, cols=160)
    effusion = make_phantom(1, "effusion", seed=4, rows=160, cols=160)
    nodule.dataset.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    effusion.dataset.save_as(tmp_path / "b.dcm", enforce_file_format=True)
    seg_a = write_annotation(nodule.dataset, nodule.lesion_mask, "Lesion 1", codes.SCT.Nodule)  # finding matches
    seg_b = write_annotation(effusion.dataset, effusion.lesion_mask, "Fluid", codes.SCT.PleuralEffusion)
    seg_a.save_as(tmp_path / "a.seg.dcm", enforce_file_format=True)
    seg_b.save_as(tmp_path / "b.seg.dcm", enforce_file_format=True)
    (tmp_path / "notes.txt").write_text("not DICOM")
    labelled = folder_set(tmp_path, CLASSES)
    assert {image.name: image.label for image in labelled.images} == {"a.dcm": "nodule"}
    assert any("'Fluid' (Pleural effusion) is no model class" in reason for reason in labelled.skipped)
    assert any(reason.startswith("notes.txt:") for reason in labelled.skipped)
    assert "b.dcm: annotated with a finding that is no model class, so not scored as normal" in labelled.skipped
    mapped = folder_set(tmp_path, CLASSES, label_map={"pleural effusion": "effusion"})
    assert {image.name: image.label for image in mapped.images} == {"a.dcm": "nodule", "b.dcm": "effusion"}


def test_a_seg_without_its_image_is_named(tmp_path: Path) -> None:
    phantom = make_phantom(0, "nodule", seed=4, rows=160, cols=160)
    write_annotation(phantom.dataset, phantom.lesion_mask, "nodule", codes.SCT.Nodule).save_as(
        tmp_path / "orphan.seg.dcm", enforce_file_format=True
    )
    labelled = folder_set(tmp_path, CLASSES)
    assert labelled.images == ()
    assert labelled.skipped == (f"SEG references image {phantom.dataset.SOPInstanceUID}, which is not in the folder",)
    assert pydicom.dcmread(tmp_path / "orphan.seg.dcm").Modality == "SEG"


def test_no_phantoms_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least 1 image"):
        phantom_set(0)
