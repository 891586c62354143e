"""Volume routes in the running node: a phantom chest CT series C-STOREd over a real association to
a node whose rule sends CT to the demo volume model is explained as ONE volume; its multi-frame
Parametric Map and Segmentation and a Secondary Capture per slice reach a real DCMTK storescp, each
once, in the source's study and Frame of Reference, referencing every source slice. A series with a
gap is skipped whole with its reason and counted, nothing is sent for it, and the node goes on
serving (a radiograph to the 2D rule and the complete series after it)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ParametricMapStorage, SecondaryCaptureImageStorage, SegmentationStorage

from dicom_io.net.scu import Destination, StoreSCU
from service.models import volume_card_path
from service.node.app import Node
from service.node.config import load_config
from service.node.store import Journal
from service.synthetic.phantoms import make_phantom
from service.synthetic.volumes import make_ct_phantom, write_ct_series
from tests.helpers import wait_for
from tests.integration.test_node_e2e import Storescp, node_overrides

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::UserWarning")]

#: Slices, rows, columns of the phantom series (the card resamples it to its 48³ grid).
CT_SHAPE = (24, 64, 64)
CT_SPACING = (4.0, 6.0, 6.0)
GAP = 9  # the slice the broken copy of the series lacks


@pytest.fixture()
def destination(tmp_path: Path) -> Iterator[Storescp]:
    storescp = Storescp(tmp_path / "dest")
    yield storescp
    storescp.stop()


def _series(folder: Path, index: int, *, drop: int | None = None) -> list[Path]:
    phantom = make_ct_phantom(index, "nodule", shape=CT_SHAPE, spacing=CT_SPACING)
    paths = write_ct_series(folder, phantom)
    if drop is not None:
        paths.pop(drop).unlink()
    return paths


def test_a_ct_series_is_explained_as_one_volume_and_a_gapped_one_is_skipped_whole(
    tmp_path: Path, destination: Storescp
) -> None:
    overrides = node_overrides(
        tmp_path / "node",
        [{"name": "dest", "ae_title": "DEST", "host": "127.0.0.1", "port": destination.port}],
        routes=[
            {
                "name": "chest-ct",
                "match": {"modality": "CT"},
                "model": str(volume_card_path()),
                "methods": ["gradcam"],
                "outputs": ["pm", "seg_fractional", "sc"],
            },
            {"name": "chest-xray", "match": {"modality": "CR|DX"}, "outputs": ["sc"]},
        ],
    )
    node = Node(load_config(None, overrides))
    node.start()
    journal = Journal(Path(node.config.storage.data_dir) / "journal.sqlite")
    scu = StoreSCU("MODALITY")
    to_node = Destination("PACSXAI", "127.0.0.1", node.port)

    def count(name: str, **labels: str) -> float:
        return node.metrics.registry.get_sample_value(name, labels) or 0.0

    try:
        gapped = _series(tmp_path / "gapped", 2, drop=GAP)
        gapped_uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in gapped]
        assert [o.verdict for o in scu.send(to_node, gapped)] == ["delivered"] * len(gapped)
        wait_for(
            lambda: all((journal.instance_state(uid) or ("",))[0] == "skipped" for uid in gapped_uids),
            60,
            "the gapped series skipped",
        )
        for uid in gapped_uids:
            reason = journal.instance_state(uid)[1]
            assert "route chest-ct:" in reason and "gap" in reason, reason
        assert count("pacsxai_volume_series_skipped_total", route="chest-ct", reason="gap") == 1
        assert count("pacsxai_route_instances_total", route="chest-ct", outcome="skipped") == len(gapped)
        assert count("pacsxai_instances_processed_total", outcome="failed") == 0, "skipped, never a crash"

        # the node goes on: a radiograph to the 2D rule and the complete series to the volume rule
        cr = tmp_path / "cr.dcm"
        make_phantom(1, "nodule", rows=256, cols=240).dataset.save_as(cr, enforce_file_format=True)
        whole = _series(tmp_path / "whole", 1)
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in whole]
        assert [o.verdict for o in scu.send(to_node, [cr, *whole])] == ["delivered"] * (1 + len(whole))
        expected = 1 + 2 + len(whole)  # the radiograph's SC; the volume's PM, SEG and one SC per slice
        wait_for(lambda: journal.counts()["outbox_sent"] == expected, 120, f"{expected} results delivered")
        time.sleep(1.0)  # several sender passes: nothing else is on its way

        received = destination.received()
        assert len(received) == expected
        assert max(Counter(str(ds.SOPInstanceUID) for ds in received).values()) == 1, "each object once"
        sources = {str(h.SOPInstanceUID) for h in headers}
        study, frame_of_reference = headers[0].StudyInstanceUID, headers[0].FrameOfReferenceUID
        volume = [ds for ds in received if ds.StudyInstanceUID == study]
        by_class = Counter(str(ds.SOPClassUID) for ds in volume)
        assert by_class == {ParametricMapStorage: 1, SegmentationStorage: 1, SecondaryCaptureImageStorage: len(whole)}
        for ds in volume:
            referenced = {str(item.ReferencedSOPInstanceUID) for item in ds.SourceImageSequence}
            if ds.SOPClassUID == SecondaryCaptureImageStorage:
                assert len(referenced) == 1 and referenced <= sources, "an SC per source slice"
                continue
            assert int(ds.NumberOfFrames) == len(whole), "one frame per source slice"
            assert ds.FrameOfReferenceUID == frame_of_reference
            assert referenced == sources, "every source slice referenced"
            per_frame = {
                str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
                for item in ds.PerFrameFunctionalGroupsSequence
            }
            assert per_frame == sources
        sc_sources = [
            str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
            for ds in volume
            if ds.SOPClassUID == SecondaryCaptureImageStorage
        ]
        assert sorted(sc_sources) == sorted(sources), "one SC for each slice, none twice"
        assert all(journal.instance_state(uid) == ("done", "") for uid in sources)
        assert count("pacsxai_route_instances_total", route="chest-ct", outcome="done") == len(whole)
        assert count("pacsxai_route_instances_total", route="chest-xray", outcome="done") == 1
        assert count("pacsxai_volume_series_skipped_total", route="chest-ct", reason="gap") == 1
    finally:
        journal.close()
        node.stop()
