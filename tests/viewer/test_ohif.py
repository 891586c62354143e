"""pacs-xai's results opened in OHIF (served by nginx, data from Orthanc's DICOMweb) in headless Chromium.

The stack is ``pacs-xai viewer``'s own (``ViewerStack``): the demo phantom studies go through
Orthanc to the node, the results come back into Orthanc, and OHIF is opened at one series each.
The assertions are image statistics on the viewport of the screenshot, not checksums. The
screenshots are kept in ``test-artifacts/viewer/``.
"""

from __future__ import annotations

import numpy as np
import pytest

from service.tools.viewer.stack import StudyResults, ViewerStack, ohif_link
from tests.viewer.browser import ARTIFACTS, screenshot, tinted_fraction, warm_fraction

pytestmark = pytest.mark.viewer


@pytest.fixture(scope="module")
def nodule(stack: ViewerStack) -> StudyResults:
    """The nodule phantom (the second demo study) with its five results back in Orthanc."""
    study = stack.send_demo_studies(2)[1]
    assert "nodule" in study.name
    assert study.kinds() == {"source", "sc", "pm", "seg_binary", "seg_fractional", "sr"}, study.series
    return study


@pytest.fixture(scope="module")
def views(stack: ViewerStack, nodule: StudyResults) -> dict[str, np.ndarray]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shots = {}
    source = nodule.by_kind("source").series_uid
    for series in nodule.series:
        url = ohif_link(stack.url, nodule.study_uid, series.series_uid)
        if series.kind in ("pm", "seg_binary", "seg_fractional"):
            # Overlays need their referenced image loaded: both series, the result in the viewport.
            url = url.replace(series.series_uid, f"{source},{series.series_uid}")
            url += f"&initialSeriesInstanceUID={series.series_uid}"
        shots[series.kind] = screenshot(url, ARTIFACTS / f"ohif-{series.kind}.png")
    return shots


def test_secondary_capture_shows_the_heatmap_colours_the_plain_source_has_not(views) -> None:
    assert warm_fraction(views["sc"]) > 0.01, warm_fraction(views["sc"])
    assert warm_fraction(views["source"]) < 0.001, warm_fraction(views["source"])


def test_parametric_map_is_drawn_over_the_source(views) -> None:
    """OHIF overlays the map on its source in a colour map (rainbow_2, opacity rising with the value).

    OHIF 3.13 scales every Parametric Map as if its values were in [0, 1] (values x100, window
    0-100, fixed in its PMAP viewport); the raw Grad-CAM values here are far below 1, so the map
    shows as a faint tint over the source, not a saturated heatmap. A map that does not load (the
    "Loading Parametric Map..." bar over the source) has no tint; neither has the grey source.
    """
    pm = views["pm"].max(axis=2)
    assert (pm > 40).mean() > 0.05 and pm.std() > 10, ((pm > 40).mean(), pm.std())
    assert tinted_fraction(views["pm"]) > 0.005, tinted_fraction(views["pm"])
    assert tinted_fraction(views["source"]) < 0.002, tinted_fraction(views["source"])


def test_binary_segmentation_is_drawn_over_the_source(views) -> None:
    seg, source = views["seg_binary"], views["source"]
    assert (seg.max(axis=2) > 40).mean() > 0.05, "the source image under the SEG is not rendered"
    changed = (np.abs(seg - source).max(axis=2) > 40).mean()
    assert changed > 0.002, changed
    # The segment in its Recommended Display CIELab colour (red), which the grey source has not.
    assert warm_fraction(seg) > 0.01, warm_fraction(seg)
    assert warm_fraction(source) < 0.001, warm_fraction(source)


def test_fractional_segmentation_is_listed_but_ohif_draws_no_overlay(views) -> None:
    """OHIF 3.x does not render FRACTIONAL segmentations (OHIF/Viewers#1346, open).

    Its SEG loader throws "Fractional segmentations are not yet supported": the source is drawn
    under a "Loading SEG..." bar that never ends, and the segment's orange is nowhere, while the
    binary SEG of the same map, through the same viewer, is drawn (test above).
    """
    frac = views["seg_fractional"]
    assert (frac.max(axis=2) > 40).mean() > 0.05, "the source image under the SEG is not rendered"
    assert warm_fraction(frac) < 0.001, warm_fraction(frac)
    # No faint overlay either (the loading bar and the LOAD button alone give about 0.002).
    assert tinted_fraction(frac) < 0.005, tinted_fraction(frac)


def test_structured_report_is_not_shown_by_ohif(views) -> None:
    """OHIF 3.x displays TID 1500 measurements with spatial coordinates (SCOORD) only.

    pacs-xai's SR has none (image-level findings): OHIF logs "Measurement is not rehydratable" and
    its viewer route fails ("Cannot read properties of undefined (reading 'ReferencedSOPSequence')"),
    leaving an empty viewport.
    """
    assert (views["sr"].max(axis=2) > 40).mean() < 0.01
