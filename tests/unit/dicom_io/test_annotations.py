"""Ground-truth SEGs: what a hospital keeps, read back mask for mask, and checked by dciodvfy."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from dicom_io.annotations import is_segmentation, read_annotations, write_annotation
from dicom_io.errors import DicomInputError
from service.synthetic.phantoms import make_phantom
from tests.helpers import data_file, require_tool


@pytest.mark.parametrize(("label", "finding"), [("nodule", codes.SCT.Nodule), ("effusion", codes.SCT.PleuralEffusion)])
def test_a_written_annotation_reads_back_as_the_same_mask(label: str, finding, tmp_path: Path) -> None:
    phantom = make_phantom(2, label, seed=5, rows=256, cols=224)
    seg = write_annotation(phantom.dataset, phantom.lesion_mask, label, finding)
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    stored = pydicom.dcmread(path)
    assert is_segmentation(stored) and not is_segmentation(phantom.dataset)
    (region,) = read_annotations(stored)
    assert region.sop_instance_uid == phantom.dataset.SOPInstanceUID
    assert region.label == label
    assert np.array_equal(region.mask, phantom.lesion_mask)
    run = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120)
    errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
    assert not errors, errors


def test_the_region_carries_the_label_and_the_finding() -> None:
    phantom = make_phantom(0, "nodule", seed=1, rows=160, cols=160)
    seg = write_annotation(phantom.dataset, phantom.lesion_mask, "Lesion 1", codes.SCT.Nodule)
    (region,) = read_annotations(seg)
    assert (region.label, region.finding) == ("Lesion 1", "Nodule")


def test_a_one_pixel_segment_is_kept_exactly_and_a_wrong_mask_is_refused() -> None:
    phantom = make_phantom(1, "nodule", seed=1, rows=160, cols=160)
    dot = np.zeros_like(phantom.lesion_mask)
    dot[150, 7] = True
    (region,) = read_annotations(write_annotation(phantom.dataset, dot, "nodule", codes.SCT.Nodule))
    assert np.array_equal(region.mask, dot)
    with pytest.raises(ValueError, match="mask must be bool 160 x 160"):
        write_annotation(phantom.dataset, phantom.lesion_mask[:10], "nodule", codes.SCT.Nodule)


def test_an_image_is_not_an_annotation() -> None:
    with pytest.raises(DicomInputError, match="is not Segmentation"):
        read_annotations(pydicom.dcmread(data_file("CT_small.dcm")))
