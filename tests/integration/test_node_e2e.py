"""The node end to end over real associations: DCMTK tools and a real Orthanc as peers.

Every test runs a real node (in-process, or as a ``pacs-xai serve`` subprocess where it must be
killed) on loopback ports chosen at run time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import CTImageStorage, Verification

from dicom_io.net.scu import Destination, StoreSCU
from service.node.app import Node
from service.node.config import load_config
from service.node.store import Journal
from service.synthetic.phantoms import make_phantom, write_phantom_studies
from tests.helpers import data_file, free_port, require_dcmtk, wait_for
from tests.orthanc import Orthanc

pytestmark = pytest.mark.integration

PHANTOM_ROWS, PHANTOM_COLS = 256, 240


def node_overrides(data_dir: Path, destinations: list[dict], **extra: object) -> dict:
    overrides: dict = {
        "listener": {"port": free_port(), "ae_title": "PACSXAI"},
        "storage": {"data_dir": str(data_dir)},
        "destinations": destinations,
        "assembly": {"idle_seconds": 0.3, "max_wait_seconds": 30},
        "send": {"base_delay_seconds": 0.2, "max_delay_seconds": 1.0, "max_attempts": 50},
        "explain": {"methods": ["gradcam"], "outputs": ["sc"]},
        "metrics": {"port": 0},
    }
    overrides.update(extra)
    return overrides


@pytest.fixture()
def start_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []

    def start(destinations: list[dict], **extra: object) -> Node:
        node = Node(load_config(None, node_overrides(tmp_path / f"node{len(nodes)}", destinations, **extra)))
        node.start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


class Storescp:
    """DCMTK storescp as a destination, writing what it receives into ``folder``."""

    def __init__(self, folder: Path, ae_title: str = "DEST", port: int | None = None) -> None:
        self.folder = folder
        self.port = port or free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [require_dcmtk("storescp"), "-aet", ae_title, "-od", str(folder), "+xa", str(self.port)],
            env={**os.environ, "TCP_NODELAY": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: StoreSCU("PROBE").echo(Destination(ae_title, "127.0.0.1", self.port)), 15, "storescp")

    def received(self) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(p) for p in sorted(self.folder.iterdir()) if p.is_file()]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def phantom_files(folder: Path, count: int, seed: int = 3) -> list[Path]:
    return [
        path
        for path, _ in write_phantom_studies(folder, studies=count, seed=seed, rows=PHANTOM_ROWS, cols=PHANTOM_COLS)
    ]


def test_dcmtk_peers_echo_store_and_receive_results(start_node, tmp_path: Path) -> None:
    destination = Storescp(tmp_path / "dest")
    try:
        node = start_node([{"name": "dest", "ae_title": "DEST", "host": "127.0.0.1", "port": destination.port}])
        port = str(node.port)
        echo = subprocess.run([require_dcmtk("echoscu"), "-aet", "MODALITY", "-aec", "PACSXAI", "127.0.0.1", port])
        assert echo.returncode == 0
        files = phantom_files(tmp_path / "in", 3)
        store = subprocess.run(
            [require_dcmtk("storescu"), "-aet", "MODALITY", "-aec", "PACSXAI", "127.0.0.1", port, *map(str, files)],
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        assert store.returncode == 0
        wait_for(lambda: len(destination.received()) >= 3, 60, "3 results at storescp")
        sources = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in files}
        for result in destination.received():
            assert result.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
            source = sources[result.SourceImageSequence[0].ReferencedSOPInstanceUID]
            assert result.StudyInstanceUID == source.StudyInstanceUID
        journal = Journal(Path(node.config.storage.data_dir) / "journal.sqlite")
        assert all(journal.instance_state(uid)[0] == "done" for uid in sources)
        wait_for(lambda: journal.counts().get("outbox_sent", 0) == 3, 10, "outbox rows marked sent")
        journal.close()
    finally:
        destination.stop()


def test_orthanc_routes_a_study_and_gets_every_result_kind_in_the_same_study(start_node, tmp_path: Path) -> None:
    orthanc = Orthanc(tmp_path / "orthanc")
    try:
        node = start_node(
            [{"name": "pacs", "ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}],
            allowed_callers=[{"ae_title": orthanc.ae_title, "host": "127.0.0.1"}],
            explain={"methods": ["gradcam"], "outputs": ["sc", "pm", "seg_fractional", "seg_binary", "sr"]},
        )
        orthanc.add_modality("xai", "PACSXAI", "127.0.0.1", node.port)
        source = phantom_files(tmp_path / "in", 2)[1]  # a nodule phantom
        study_id = orthanc.upload(source)["ParentStudy"]
        orthanc.send_study("xai", study_id)
        wait_for(lambda: len(orthanc.study_instances(study_id)) >= 6, 60, "5 results back in Orthanc's study")
        tags = [orthanc.tags(i["ID"]) for i in orthanc.study_instances(study_id)]
        by_class = {t["SOPClassUID"]: t for t in tags}
        uid = pydicom.uid
        assert set(by_class) == {
            pydicom.dcmread(source).SOPClassUID,
            uid.SecondaryCaptureImageStorage,
            uid.ParametricMapStorage,
            uid.SegmentationStorage,
            uid.Comprehensive3DSRStorage,
        }
        assert len([t for t in tags if t["SOPClassUID"] == uid.SegmentationStorage]) == 2
        assert {t["StudyInstanceUID"] for t in tags} == {pydicom.dcmread(source).StudyInstanceUID}
        assert "gradcam" in by_class[uid.SecondaryCaptureImageStorage]["SeriesDescription"]
    finally:
        orthanc.stop()


def test_destination_down_then_up_delivers_everything_once(start_node, tmp_path: Path) -> None:
    port = free_port()
    node = start_node([{"name": "late", "ae_title": "DEST", "host": "127.0.0.1", "port": port}])
    files = phantom_files(tmp_path / "in", 2)
    outcomes = StoreSCU("MODALITY").send(Destination("PACSXAI", "127.0.0.1", node.port), files)
    assert [o.verdict for o in outcomes] == ["delivered", "delivered"]
    journal = Journal(Path(node.config.storage.data_dir) / "journal.sqlite")
    wait_for(
        lambda: any(e.attempts >= 2 for e in journal.outbox.entries(("pending",))),
        30,
        "retries while the destination is down",
    )
    assert journal.counts().get("outbox_dead", 0) == 0
    destination = Storescp(tmp_path / "dest", port=port)
    try:
        wait_for(lambda: journal.counts().get("outbox_sent", 0) == 2, 30, "delivery after the destination came up")
        time.sleep(1.5)  # several sender passes: nothing is sent again once delivered
        assert len(destination.received()) == 2
    finally:
        destination.stop()
        journal.close()


def test_destination_that_rejects_dead_letters_at_once_with_the_reason(start_node, tmp_path: Path) -> None:
    ae = AE(ae_title="CTONLY")
    ae.add_supported_context(CTImageStorage)
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    try:
        node = start_node([{"name": "ctonly", "ae_title": "CTONLY", "host": "127.0.0.1", "port": port}])
        StoreSCU("MODALITY").send(Destination("PACSXAI", "127.0.0.1", node.port), phantom_files(tmp_path / "in", 1))
        journal = Journal(Path(node.config.storage.data_dir) / "journal.sqlite")
        wait_for(lambda: journal.counts().get("outbox_dead", 0) == 1, 30, "the dead letter")
        (dead,) = journal.outbox.entries(("dead",))
        assert dead.attempts <= 1, "a refused SOP class must not be retried"
        assert "1.2.840.10008.5.1.4.1.1.7" in dead.last_error or "Secondary Capture" in dead.last_error
        journal.close()
    finally:
        server.shutdown()


def test_unknown_calling_ae_is_rejected(start_node) -> None:
    node = start_node([], allowed_callers=[{"ae_title": "GOOD"}])
    assert StoreSCU("GOOD").echo(Destination("PACSXAI", "127.0.0.1", node.port))
    assert not StoreSCU("EVIL").echo(Destination("PACSXAI", "127.0.0.1", node.port))
    echo = subprocess.run([require_dcmtk("echoscu"), "-aet", "EVIL", "-aec", "PACSXAI", "127.0.0.1", str(node.port)])
    assert echo.returncode != 0


def test_broken_dataset_is_quarantined_and_the_node_keeps_serving(start_node, tmp_path: Path, monkeypatch) -> None:
    node = start_node([])
    good = phantom_files(tmp_path / "in", 1)[0]
    original = pydicom.dcmread(good)
    broken = tmp_path / "broken.dcm"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = original.SOPClassUID
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    payload = b"this is not a DICOM data set, only text"
    with broken.open("wb") as stream:
        stream.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(stream, meta)
        stream.write(payload)
    # pynetdicom's chunked mode sends the bytes after the File Meta as they are, undecoded.
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(original.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSXAI")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(broken)
    finally:
        assoc.release()
    assert 0xC000 <= status.Status <= 0xCFFF, f"status {status.Status:#06x}"
    (outcome,) = StoreSCU("MODALITY").send(Destination("PACSXAI", "127.0.0.1", node.port), [good])
    assert outcome.verdict == "delivered"
    journal = Journal(Path(node.config.storage.data_dir) / "journal.sqlite")
    (entry,) = journal.quarantine.entries()
    assert entry.path.read_bytes().endswith(payload), "the quarantined file must keep the bytes received"
    assert "parse" in entry.reason or "missing" in entry.reason
    wait_for(lambda: (journal.instance_state(original.SOPInstanceUID) or ("",))[0] == "done", 30, "the good instance")
    journal.close()


def test_sigkill_during_a_200_instance_send_then_restart_delivers_each_output_once(tmp_path: Path) -> None:
    """The node is killed while a 200-instance association is running; after a restart and a resend
    of what was not acknowledged, Orthanc holds exactly one result per source instance."""
    orthanc = Orthanc(tmp_path / "orthanc")
    data_dir = tmp_path / "node"
    port = free_port()
    log_path = tmp_path / "node.log"
    command = [
        sys.executable,
        "-m",
        "service.cli",
        "serve",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--destination",
        f"{orthanc.ae_title}@127.0.0.1:{orthanc.dicom_port}",
        "--method",
        "gradcam",
        "--outputs",
        "sc",
    ]
    env = {
        **os.environ,
        "PACS_XAI_ASSEMBLY__IDLE_SECONDS": "0.3",
        "PACS_XAI_LOGGING__LEVEL": "DEBUG",
        "PACS_XAI_METRICS__PORT": "0",
    }
    folder = tmp_path / "in"
    folder.mkdir()
    sources = []
    study = generate_uid()
    series = generate_uid()
    for index in range(200):
        phantom = make_phantom(
            index,
            ("normal", "nodule", "effusion")[index % 3],
            seed=9,
            rows=PHANTOM_ROWS,
            cols=PHANTOM_COLS,
            study_uid=study,
            series_uid=series,
        )
        path = folder / f"{index:03d}.dcm"
        phantom.dataset.save_as(path, enforce_file_format=True)
        sources.append(path)

    started: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log_path.open("ab"))
        started.append(process)
        wait_for(lambda: StoreSCU("PROBE").echo(Destination("PACSXAI", "127.0.0.1", port)), 60, "the node to listen")
        return process

    try:
        node = start()
        journal_path = data_dir / "journal.sqlite"
        outcomes: list = []
        sender = threading.Thread(
            target=lambda: outcomes.extend(
                StoreSCU("MODALITY", dimse_timeout=10, network_timeout=10).send(
                    Destination("PACSXAI", "127.0.0.1", port), sources
                )
            )
        )
        sender.start()

        def journaled() -> int:
            journal = Journal(journal_path)
            try:
                return journal.counts().get("instances_received", 0)
            finally:
                journal.close()

        wait_for(lambda: journal_path.exists() and journaled() >= 80, 120, "80 journaled instances")
        node.send_signal(signal.SIGKILL)
        node.wait()
        sender.join(timeout=60)
        assert not sender.is_alive(), "the sender did not notice the node's death within 60 s"
        acknowledged = {o.sop_instance_uid for o in outcomes if o.verdict == "delivered"}
        assert 80 <= len(acknowledged) < 200, f"kill came too late or too early: {len(acknowledged)} acknowledged"
        node = start()
        remaining = [
            p for p in sources if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID not in acknowledged
        ]
        resent = StoreSCU("MODALITY").send(Destination("PACSXAI", "127.0.0.1", port), remaining)
        assert all(o.verdict == "delivered" for o in resent)

        def results() -> list[str]:
            studies = orthanc.get("/studies")
            series_list = [s for st in studies for s in orthanc.get(f"/studies/{st}/series")]
            return [i for s in series_list for i in orthanc.get(f"/series/{s['ID']}")["Instances"]]

        wait_for(lambda: len(results()) >= 200, 300, "200 results in Orthanc", interval=1.0)
        time.sleep(2)
        uids = [orthanc.tags(i)["SOPInstanceUID"] for i in results()]
        assert len(uids) == len(set(uids)) == 200
        referenced = {orthanc.tags(i).get("StudyInstanceUID") for i in results()}
        assert referenced == {study}
        node.send_signal(signal.SIGTERM)
        assert node.wait(timeout=60) == 0
    finally:
        for process in started:  # a failed assertion must not leave a node running
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
        orthanc.stop()
    log_text = log_path.read_text(errors="replace")
    assert "PHANTOM" not in log_text and "PXAI" not in log_text, "patient name or ID in the node's log"
    assert "stored instance" in log_text, "the scan must have read a DEBUG log"


def test_metrics_over_http_match_a_real_send(start_node, tmp_path: Path) -> None:
    """After N instances (one of them broken) the counters and histograms read from /metrics match."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    destination = Storescp(tmp_path / "dest")
    try:
        node = start_node([{"name": "dest", "ae_title": "DEST", "host": "127.0.0.1", "port": destination.port}])
        files = phantom_files(tmp_path / "in", 4)
        ct = tmp_path / "ct.dcm"
        pydicom.dcmread(data_file("CT_small.dcm")).save_as(ct)  # the card does not apply: skipped
        outcomes = StoreSCU("MODALITY").send(Destination("PACSXAI", "127.0.0.1", node.port), [*files, ct])
        assert all(o.verdict == "delivered" for o in outcomes)
        StoreSCU("MODALITY").echo(Destination("PACSXAI", "127.0.0.1", node.port))
        url = f"http://127.0.0.1:{node.metrics_port}"

        def samples() -> dict[tuple[str, tuple], float]:
            text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
            return {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
            }

        wait_for(
            lambda: samples().get(("pacsxai_outputs_total", (("destination", "dest"), ("outcome", "sent")))) == 4,
            60,
            "4 outputs sent in the metrics",
        )
        values = samples()
        assert values[("pacsxai_instances_received_total", (("outcome", "stored"),))] == 5
        assert values[("pacsxai_associations_total", (("outcome", "accepted"),))] == 2
        assert values[("pacsxai_instances_processed_total", (("outcome", "done"),))] == 4
        assert values[("pacsxai_instances_processed_total", (("outcome", "skipped"),))] == 1
        assert values[("pacsxai_stage_seconds_count", (("stage", "spool"),))] == 5
        assert values[("pacsxai_stage_seconds_count", (("stage", "infer"),))] == 4
        assert values[("pacsxai_explain_seconds_count", (("method", "gradcam"),))] == 4
        predicted = sum(v for (name, _), v in values.items() if name == "pacsxai_predictions_total")
        assert predicted == 4
        assert values[("pacsxai_outbox_depth", (("state", "pending"),))] == 0
        assert values[("pacsxai_dead_letters", ())] == 0
        model = [labels for (name, labels), v in values.items() if name == "pacsxai_model_info" and v == 1]
        assert model and dict(model[0])["name"] == "pacs-xai-demo-chest"
        assert urllib.request.urlopen(url + "/healthz", timeout=10).status == 200
        assert urllib.request.urlopen(url + "/readyz", timeout=10).status == 200
        text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
        assert "PHANTOM" not in text and "PXAI" not in text, "patient data in metric labels"
    finally:
        destination.stop()


def test_storage_failure_answers_out_of_resources_never_success(start_node, tmp_path: Path) -> None:
    node = start_node([])
    good, blocked = phantom_files(tmp_path / "in", 2)
    study = pydicom.dcmread(blocked, stop_before_pixels=True).StudyInstanceUID
    # A regular file where the study's spool folder must go: the spool write fails (even for root).
    (node.spool.instances_dir / study).write_bytes(b"in the way")
    outcomes = StoreSCU("MODALITY").send(Destination("PACSXAI", "127.0.0.1", node.port), [blocked, good])
    assert outcomes[0].status == 0xA700 and outcomes[0].verdict == "retry"
    assert outcomes[1].verdict == "delivered"
    journal = Journal(Path(node.config.storage.data_dir) / "journal.sqlite")
    assert journal.instance_state(outcomes[0].sop_instance_uid) is None, "nothing journaled for the refused instance"
    journal.close()


def test_follow_up_instances_and_resends_never_duplicate_outputs(start_node, tmp_path: Path) -> None:
    node = start_node([{"name": "dest", "ae_title": "DEST", "host": "127.0.0.1", "port": free_port()}])
    study, series = generate_uid(), generate_uid()
    paths = []
    for index in range(2):
        phantom = make_phantom(
            index, "nodule", seed=21, rows=PHANTOM_ROWS, cols=PHANTOM_COLS, study_uid=study, series_uid=series
        )
        paths.append(tmp_path / f"{index}.dcm")
        phantom.dataset.save_as(paths[-1], enforce_file_format=True)
    destination = Destination("PACSXAI", "127.0.0.1", node.port)
    journal = Journal(Path(node.config.storage.data_dir) / "journal.sqlite")

    def states() -> list[str]:
        return [(journal.instance_state(pydicom.dcmread(p).SOPInstanceUID) or ("",))[0] for p in paths]

    StoreSCU("MODALITY").send(destination, paths[:1])
    wait_for(lambda: states()[0] == "done", 30, "the first instance processed")
    StoreSCU("MODALITY").send(destination, paths[1:])  # same series, after it was processed
    wait_for(lambda: states() == ["done", "done"], 30, "the follow-up processed")
    StoreSCU("MODALITY").send(destination, paths[:1])  # a resend of the first
    wait_for(lambda: journal.counts()["instances_received"] == 0 and states() == ["done", "done"], 30, "the resend")
    rows = journal.outbox.entries(("pending", "dead", "sent"))
    assert len(rows) == 2 and len({row.sop_instance_uid for row in rows}) == 2
    journal.close()


def test_send_command_and_outbox_commands(start_node, tmp_path: Path, capsys) -> None:
    from service.cli.main import main

    port = free_port()  # nobody listens: results wait in the outbox
    node = start_node(
        [{"name": "away", "ae_title": "DEST", "host": "127.0.0.1", "port": port}],
        send={"base_delay_seconds": 0.1, "max_delay_seconds": 0.2, "max_attempts": 2},
    )
    files = phantom_files(tmp_path / "in", 2)
    assert main(["send", *map(str, files), "--to", f"PACSXAI@127.0.0.1:{node.port}", "--aet", "MODALITY"]) == 0
    assert "sent 2 of 2" in capsys.readouterr().out
    data_dir = node.config.storage.data_dir
    journal = Journal(Path(data_dir) / "journal.sqlite")
    wait_for(lambda: journal.counts()["outbox_dead"] == 2, 60, "both results in the dead letter")
    journal.close()
    assert main(["outbox", "list", "--data-dir", str(data_dir)]) == 0
    listing = capsys.readouterr().out
    assert listing.count("dead ") == 2 and "gave up after 2 attempts" in listing
    assert main(["outbox", "retry", "--data-dir", str(data_dir)]) == 0
    assert "2 dead result(s) back to pending" in capsys.readouterr().out
    assert main(["send", str(files[0]), "--to", f"PACSXAI@127.0.0.1:{free_port()}"]) == 1
    assert "retry" in capsys.readouterr().err


def test_each_destination_gets_the_output_kinds_it_asks_for(start_node, tmp_path: Path) -> None:
    node = start_node(
        [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port(), "outputs": ["sc"]},
            {
                "name": "research",
                "ae_title": "SLICER",
                "host": "127.0.0.1",
                "port": free_port(),
                "outputs": ["pm", "seg_binary"],
            },
        ],
        explain={"methods": ["gradcam"], "outputs": ["sc", "pm", "seg_binary"]},
    )
    StoreSCU("MODALITY").send(Destination("PACSXAI", "127.0.0.1", node.port), phantom_files(tmp_path / "in", 1))
    journal = Journal(Path(node.config.storage.data_dir) / "journal.sqlite")
    wait_for(lambda: len(journal.outbox.entries(("pending", "dead", "sent"))) == 3, 30, "three outbox rows")
    rows = journal.outbox.entries(("pending", "dead", "sent"))
    journal.close()
    assert sorted((row.destination, row.kind) for row in rows) == [
        ("pacs", "sc"),
        ("research", "pm"),
        ("research", "seg_binary"),
    ]
