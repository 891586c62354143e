"""A real Orthanc takes a CT series and its 3D explanation into one study.

The phantom CT series (48 slices) and what ``pacs-xai explain`` writes for it with the demo volume
card (multi-frame Parametric Map, binary and fractional Segmentation, key-slice Secondary
Captures) are sent by C-STORE as the node sends them (results deflated on the wire). Orthanc's
REST API is then asked what it kept: one study, one series per output, the instance counts, the
SOP classes, the frames it finds in the multi-frame objects, and that every source instance the
SEG and the PM reference is an instance of the CT series it holds.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from dicom_io.net.network import Status
from tests.orthanc import Orthanc
from tests.volume_study import (
    KEY_SLICES,
    PARAMETRIC_MAP,
    SECONDARY_CAPTURE,
    SEGMENTATION,
    VolumeStudy,
    explain_ct_phantom,
    send_to,
)

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> VolumeStudy:
    return explain_ct_phantom(tmp_path_factory.mktemp("volume"))


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory, study: VolumeStudy) -> Iterator[Orthanc]:
    pacs = Orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        outcomes = send_to(study, pacs.ae_title, pacs.dicom_port)
        refused = [(o.sop_instance_uid, o.status, o.detail) for o in outcomes if o.status != Status.SUCCESS]
        assert not refused, f"Orthanc did not store: {refused}"
        yield pacs
    finally:
        pacs.stop()


def _series_by_uid(orthanc: Orthanc) -> dict[str, dict]:
    return {s["MainDicomTags"]["SeriesInstanceUID"]: s for s in orthanc.get("/series?expand")}


def test_every_object_is_in_the_study_of_the_ct(orthanc: Orthanc, study: VolumeStudy) -> None:
    studies = orthanc.get("/studies?expand")
    assert [s["MainDicomTags"]["StudyInstanceUID"] for s in studies] == [study.study_uid]
    series = _series_by_uid(orthanc)
    expected = {study.series_uid(kind): len(paths) for kind, paths in study.files.items()}
    assert set(study.files) == {"source", "pm", "seg_binary", "seg_fractional", "sc"}
    assert len(studies[0]["Series"]) == len(expected) == 5
    assert {uid: len(s["Instances"]) for uid, s in series.items()} == expected
    assert expected[study.series_uid("source")] == study.phantom.hu.shape[0]
    assert expected[study.series_uid("sc")] == KEY_SLICES


@pytest.mark.parametrize("kind", ["pm", "seg_binary", "seg_fractional"])
def test_orthanc_reads_one_frame_per_slice_and_the_references(orthanc: Orthanc, study: VolumeStudy, kind: str) -> None:
    slices = study.phantom.hu.shape[0]
    [instance] = _series_by_uid(orthanc)[study.series_uid(kind)]["Instances"]
    assert orthanc.get(f"/instances/{instance}/metadata/SopClassUid").decode() == (
        PARAMETRIC_MAP if kind == "pm" else SEGMENTATION
    )
    tags = orthanc.get(f"/instances/{instance}/tags?simplify")
    assert int(tags["NumberOfFrames"]) == slices
    # Orthanc's own count, from the pixel data it stored (not the header).
    assert len(orthanc.get(f"/instances/{instance}/frames")) == slices
    if kind != "pm":  # (Orthanc does not decode Float Pixel Data: no frame of the PM to compare)
        assert tags["SegmentationType"] == kind.removeprefix("seg_").upper()
        # The frame Orthanc serves is the frame written: bit-packed (binary) or one byte a pixel.
        [written] = study.read(kind)
        frames = written.pixel_array
        k = int(frames.reshape(slices, -1).sum(axis=1).argmax())
        raw = orthanc.get(f"/instances/{instance}/frames/{k}/raw")
        expected = np.packbits(frames[k].ravel(), bitorder="little") if kind == "seg_binary" else frames[k].ravel()
        assert frames[k].any() and raw == expected.astype(np.uint8).tobytes()
    ct = _series_by_uid(orthanc)[study.series_uid("source")]
    held = {orthanc.tags(i)["SOPInstanceUID"] for i in ct["Instances"]}
    [referenced_series] = tags["ReferencedSeriesSequence"]
    assert referenced_series["SeriesInstanceUID"] == study.series_uid("source")
    assert {item["ReferencedSOPInstanceUID"] for item in referenced_series["ReferencedInstanceSequence"]} == held
    per_frame = [
        item["DerivationImageSequence"][0]["SourceImageSequence"][0]["ReferencedSOPInstanceUID"]
        for item in tags["PerFrameFunctionalGroupsSequence"]
    ]
    assert sorted(per_frame) == sorted(held)  # one frame per source slice, each slice once
    assert tags["FrameOfReferenceUID"] == orthanc.tags(ct["Instances"][0])["FrameOfReferenceUID"]


def test_secondary_captures_are_the_key_slices_of_the_ct(orthanc: Orthanc, study: VolumeStudy) -> None:
    series = _series_by_uid(orthanc)
    ct = {orthanc.tags(i)["SOPInstanceUID"] for i in series[study.series_uid("source")]["Instances"]}
    for instance in series[study.series_uid("sc")]["Instances"]:
        assert orthanc.get(f"/instances/{instance}/metadata/SopClassUid").decode() == SECONDARY_CAPTURE
        tags = orthanc.get(f"/instances/{instance}/tags?simplify")
        source = tags["SourceImageSequence"][0]["ReferencedSOPInstanceUID"]
        assert source in ct
        # Orthanc decodes the stored frame: the source slice's rows (the colour bar widens it).
        png = orthanc.get(f"/instances/{instance}/frames/0/preview")
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert int(tags["Rows"]) == study.phantom.hu.shape[1]
        assert int(tags["Columns"]) >= study.phantom.hu.shape[2]
