"""A CT series and its 3D explanation in OHIF: the multi-frame binary SEG drawn over the CT slices.

The phantom CT series and what ``pacs-xai explain`` writes for it with the demo volume card
(:mod:`tests.volume_study`) are stored in the viewer stack's Orthanc by C-STORE, as the node sends
them. OHIF opens the study with the CT and the SEG, the SEG in the viewport: it builds the CT
volume and hydrates the segmentation on it. The screenshot's viewport is sampled back onto the
CT's 96 x 96 pixel grid (the image's extent found in the screenshot), so the check is geometric:

- the red overlay covers one frame of the SEG as written (intersection over union), and
- the grey under it is the CT slice that frame belongs to (correlation with the phantom's slice),
- and the same CT slice opened alone (``initialSOPInstanceUID``) has no red and differs from the
  overlaid view only where the segment is.

The multi-frame Parametric Map is opened the same way. OHIF 3.13 draws a map as if its values were
in [0, 1] (x100, window 0-100), whatever its windows and mappings say; the demo model's raw
Grad-CAM values reach about 0.002, and stored raw the map showed no visible tint (found here). The
writer now stores the attribution over its largest magnitude, with that magnitude as the Real World
Value slope: the map's colour lies where one of its frames is high.

Screenshots: ``test-artifacts/viewer/ohif-volume-*.png``.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from dicom_io.net.network import Status
from service.tools.viewer.stack import ViewerStack, ohif_link
from tests.viewer.browser import ARTIFACTS, coloured_fraction, screenshot, warm_fraction
from tests.volume_study import VolumeStudy, explain_ct_phantom, send_to

pytestmark = [pytest.mark.viewer, pytest.mark.filterwarnings("ignore::UserWarning")]

#: CT display window of the phantom series (Window Center -600, Width 1500): HU range shown grey.
CT_WINDOW = (-1350.0, 150.0)


@pytest.fixture(scope="module")
def volume(stack: ViewerStack, tmp_path_factory: pytest.TempPathFactory) -> VolumeStudy:
    assert stack.orthanc is not None
    study = explain_ct_phantom(tmp_path_factory.mktemp("volume"))
    outcomes = send_to(study, stack.orthanc.ae_title, stack.orthanc.dicom_port)
    assert all(o.status == Status.SUCCESS for o in outcomes), [(o.status, o.detail) for o in outcomes]
    return study


def longest_run(flags: np.ndarray) -> tuple[int, int]:
    """``(first, last)`` index of the longest run of True in ``flags``."""
    padded = np.concatenate([[0], flags.astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(padded))
    starts, ends = edges[::2], edges[1::2]
    assert starts.size, "no image in the viewport"
    best = int(np.argmax(ends - starts))
    return int(starts[best]), int(ends[best]) - 1


def image_grid(viewport: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The viewport sampled at the centres of the displayed image's ``shape`` pixels: ``[rows, cols, 3]``.

    The image's extent is the widest band of columns (then rows) that are not black (the CT's
    air is grey in its window) in most rows; text overlays and the slice scroll bar are narrower.
    """
    lit = viewport.max(axis=2) > 15
    left, right = longest_run(lit.mean(axis=0) > 0.6)
    top, bottom = longest_run(lit[:, left : right + 1].mean(axis=1) > 0.6)
    y = top + (np.arange(shape[0]) + 0.5) * (bottom + 1 - top) / shape[0]
    x = left + (np.arange(shape[1]) + 0.5) * (right + 1 - left) / shape[1]
    return viewport[y.astype(int)[:, None], x.astype(int)[None, :]]


def red(grid: np.ndarray) -> np.ndarray:
    r, g, b = grid[..., 0], grid[..., 1], grid[..., 2]
    return (r - b > 60) & (r > 100) & (g < r - 30)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def slice_index(study: VolumeStudy, sop_instance_uid: str) -> int:
    """The phantom's slice (feet first) of a source instance (instances are numbered head first)."""
    [number] = [
        int(ds.InstanceNumber)
        for path in study.files["source"]
        if (ds := pydicom.dcmread(path, stop_before_pixels=True)).SOPInstanceUID == sop_instance_uid
    ]
    return study.phantom.hu.shape[0] - number


def correlation(grid: np.ndarray, hu: np.ndarray, where: np.ndarray) -> float:
    grey = grid.mean(axis=2)[where]
    return float(np.corrcoef(grey, np.clip(hu, *CT_WINDOW)[where])[0, 1])


@pytest.fixture(scope="module")
def seg_view(stack: ViewerStack, volume: VolumeStudy) -> dict:
    """OHIF on the CT and the binary SEG, the SEG in the viewport; and the matching CT slice alone."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    ct_uid, seg_uid = volume.series_uid("source"), volume.series_uid("seg_binary")
    url = ohif_link(stack.url, volume.study_uid, f"{ct_uid},{seg_uid}") + f"&initialSeriesInstanceUID={seg_uid}"
    overlaid = screenshot(url, ARTIFACTS / "ohif-volume-seg.png")
    [seg] = volume.read("seg_binary")
    masks = seg.pixel_array.astype(bool)
    shape = masks.shape[1:]
    grid = image_grid(overlaid, shape)
    shown = red(grid)
    scores = [iou(shown, mask) for mask in masks]
    frame = int(np.argmax(scores))
    item = seg.PerFrameFunctionalGroupsSequence[frame]
    source_uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
    alone_url = ohif_link(stack.url, volume.study_uid, ct_uid) + f"&initialSOPInstanceUID={source_uid}"
    alone = screenshot(alone_url, ARTIFACTS / "ohif-volume-ct.png")
    return {
        "overlaid": overlaid,
        "grid": grid,
        "shown": shown,
        "mask": masks[frame],
        "iou": scores[frame],
        "source_uid": source_uid,
        "alone": alone,
        "alone_grid": image_grid(alone, shape),
    }


def test_the_ct_is_rendered_under_the_segmentation(seg_view: dict) -> None:
    assert (seg_view["overlaid"].max(axis=2) > 40).mean() > 0.2, "no CT image in the viewport"


def test_the_red_overlay_is_a_frame_of_the_seg_in_its_place(seg_view: dict) -> None:
    mask = seg_view["mask"]
    assert mask.sum() >= 20, "the overlaid frame is (nearly) empty"
    assert seg_view["iou"] > 0.6, seg_view["iou"]


def test_the_overlay_lies_on_the_ct_slice_its_frame_belongs_to(seg_view: dict, volume: VolumeStudy) -> None:
    hu = volume.phantom.hu
    k = slice_index(volume, seg_view["source_uid"])
    outside = ~ndimage.binary_dilation(seg_view["mask"], iterations=2)
    here = correlation(seg_view["grid"], hu[k], outside)
    assert here > 0.9, here
    # and not a slice a few centimetres away (the lungs and vessels change along the body axis)
    for other in (k - 8, k + 8):
        if 0 <= other < len(hu):
            assert correlation(seg_view["grid"], hu[other], outside) < here


def test_the_same_ct_slice_alone_differs_only_where_the_segment_is(seg_view: dict, volume: VolumeStudy) -> None:
    alone, grid, mask = seg_view["alone_grid"], seg_view["grid"], seg_view["mask"]
    hu = volume.phantom.hu[slice_index(volume, seg_view["source_uid"])]
    assert correlation(alone, hu, np.ones_like(mask)) > 0.9, "OHIF did not open the CT at the SEG frame's slice"
    assert warm_fraction(seg_view["alone"]) < 0.001
    changed = np.abs(grid - alone).max(axis=2) > 40
    near = ndimage.binary_dilation(mask, iterations=1)
    assert changed[mask].mean() > 0.8, changed[mask].mean()
    assert changed[~near].mean() < 0.01, changed[~near].mean()


@pytest.fixture(scope="module")
def pm_views(stack: ViewerStack, volume: VolumeStudy) -> dict:
    """OHIF on the CT and the Parametric Map as written."""
    [pm] = volume.read("pm")
    ct_uid, uid = volume.series_uid("source"), str(pm.SeriesInstanceUID)
    url = ohif_link(stack.url, volume.study_uid, f"{ct_uid},{uid}") + f"&initialSeriesInstanceUID={uid}"
    return {"frames": pm.pixel_array.astype(np.float32), "pm": screenshot(url, ARTIFACTS / "ohif-volume-pm.png")}


def test_the_parametric_map_as_written_is_drawn_where_the_map_is(pm_views: dict) -> None:
    view, frames = pm_views["pm"], pm_views["frames"]
    assert (view.max(axis=2) > 40).mean() > 0.2, "no CT image under the map"
    assert coloured_fraction(view) > 0.02, coloured_fraction(view)
    grid = image_grid(view, frames.shape[1:])
    colour = (grid.max(axis=2) - grid.min(axis=2)).astype(np.float64).ravel()
    best = max(float(np.corrcoef(colour, frame.ravel())[0, 1]) for frame in frames if frame.any())
    assert best > 0.9, best
