"""Routing in the running node: a study sent whole over one real association (a radiograph, a CT
slice, an SR, a key object selection, an encapsulated PDF) reaches the demo model only where a rule
takes it; results arrive at a DCMTK storescp only for the routed series; what no rule takes is
accepted, journaled as not routed, deleted from the spool and counted."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from dicom_io.net.scu import Destination, StoreSCU
from service.node.app import Node
from service.node.config import load_config
from service.node.store import Journal
from service.synthetic.phantoms import make_phantom
from tests.helpers import data_file, wait_for
from tests.integration.test_node_e2e import Storescp, node_overrides
from tests.unit.service.node.helpers import non_image_dataset

pytestmark = pytest.mark.integration

NON_IMAGES = {
    "sr": ("1.2.840.10008.5.1.4.1.1.88.11", "SR"),  # Basic Text SR
    "kos": ("1.2.840.10008.5.1.4.1.1.88.59", "KO"),  # Key Object Selection Document
    "pdf": ("1.2.840.10008.5.1.4.1.1.104.1", "DOC"),  # Encapsulated PDF
}


@pytest.fixture()
def destination(tmp_path: Path) -> Iterator[Storescp]:
    storescp = Storescp(tmp_path / "dest")
    yield storescp
    storescp.stop()


def _study(folder: Path) -> dict[str, Path]:
    """One study as a PACS routes it: a CR, a CT slice and three objects without pixels, each its own series."""
    folder.mkdir()
    cr = make_phantom(1, "nodule", rows=256, cols=240).dataset
    study = cr.StudyInstanceUID
    ct = pydicom.dcmread(data_file("CT_small.dcm"))
    ct.StudyInstanceUID = study
    datasets = {"cr": cr, "ct": ct}
    for name, (sop_class, modality) in NON_IMAGES.items():
        datasets[name] = non_image_dataset(sop_class, modality, study_uid=study)
    paths = {}
    for name, ds in datasets.items():
        paths[name] = folder / f"{name}.dcm"
        ds.save_as(paths[name], enforce_file_format=True)
    return paths


def test_only_the_routed_series_is_explained_and_the_rest_is_accepted_then_not_kept(
    tmp_path: Path, destination: Storescp
) -> None:
    overrides = node_overrides(
        tmp_path / "node",
        [{"name": "dest", "ae_title": "DEST", "host": "127.0.0.1", "port": destination.port}],
        routes=[
            {"name": "chest", "match": {"modality": "CR|DX", "calling_ae_title": "MODALITY"}, "outputs": ["sc"]},
            {"name": "mr-only", "match": {"modality": "MR"}},
        ],
    )
    node = Node(load_config(None, overrides))
    node.start()
    journal = Journal(Path(node.config.storage.data_dir) / "journal.sqlite")
    try:
        files = _study(tmp_path / "in")
        headers = {name: pydicom.dcmread(path, stop_before_pixels=True) for name, path in files.items()}
        outcomes = StoreSCU("MODALITY").send(Destination("PACSXAI", "127.0.0.1", node.port), list(files.values()))
        assert [o.verdict for o in outcomes] == ["delivered"] * len(files), "every storage SOP class is accepted"

        def state(name: str) -> str:
            return (journal.instance_state(headers[name].SOPInstanceUID) or ("",))[0]

        wait_for(lambda: all(state(name) not in ("", "received") for name in files), 60, "every instance processed")
        wait_for(lambda: journal.counts().get("outbox_sent", 0) == 1, 30, "the radiograph's result delivered")
        time.sleep(1.0)  # several sender passes: nothing else is on its way

        (result,) = destination.received()
        assert result.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
        assert result.SourceImageSequence[0].ReferencedSOPInstanceUID == headers["cr"].SOPInstanceUID
        assert result.StudyInstanceUID == headers["cr"].StudyInstanceUID
        assert state("cr") == "done"
        spooled = node.spool.instances_dir / headers["cr"].StudyInstanceUID
        for name in ("ct", *NON_IMAGES):
            current, reason = journal.instance_state(headers[name].SOPInstanceUID)
            assert current == "skipped" and reason.startswith("not routed: chest: "), (name, reason)
            assert "mr-only: " in reason
            assert not (spooled / headers[name].SeriesInstanceUID / f"{headers[name].SOPInstanceUID}.dcm").exists()
        assert (spooled / headers["cr"].SeriesInstanceUID / f"{headers['cr'].SOPInstanceUID}.dcm").exists()

        def count(name: str, **labels: str) -> float:
            return node.metrics.registry.get_sample_value(name, labels) or 0.0

        assert count("pacsxai_series_unrouted_total") == 4
        assert count("pacsxai_instances_discarded_total", reason="no_route") == 1
        assert count("pacsxai_instances_discarded_total", reason="not_an_image") == 3
        assert count("pacsxai_series_routed_total", route="chest") == 1
        assert count("pacsxai_route_instances_total", route="chest", outcome="done") == 1
        assert count("pacsxai_series_routed_total", route="mr-only") == 0
    finally:
        journal.close()
        node.stop()
