"""A crash between any two steps: the node (``pacs-xai serve`` in its own process) kills itself
with SIGKILL at a fault point (``PACSXAI_FAULT_POINT``, test-only), is started again, and the
caller re-sends what was not acknowledged. Counted at a real DCMTK storescp that keeps every copy
it receives (``+uf``): every acknowledged instance is explained and delivered, each output has one
UID, no source gets two different results, and the node's data folder holds no orphan.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_io.faults import ENV, ENV_ONCE, FAULT_POINTS
from dicom_io.net.network import free_port
from dicom_io.net.scu import Destination, StoreSCU
from service.node.store import Journal
from service.node.store.outbox import OUTBOX_STATES
from service.synthetic.phantoms import make_phantom
from tests.helpers import require_dcmtk, wait_for
from tests.torture import report

INSTANCES = 6
#: Which arrival of each point kills the node (some work is done before, some after).
WHEN = {
    "after-spool-write": 3,
    "after-journal": 3,
    "during-processing": 2,
    "after-outputs-stored": 2,
    "mid-send": 2,
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("sources")
    study, series = generate_uid(), generate_uid()
    paths = []
    for index in range(INSTANCES):
        phantom = make_phantom(
            index, ("normal", "nodule", "effusion")[index % 3], seed=31, rows=256, cols=240, study_uid=study,
            series_uid=series,
        )  # fmt: skip
        path = folder / f"{index}.dcm"
        phantom.dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


class Destinations:
    """DCMTK storescp keeping every copy it receives (unique file names); with ``log`` it logs
    (``-v``) each file it stores, in the order received."""

    def __init__(self, folder: Path, *, port: int | None = None, log: Path | None = None) -> None:
        self.folder = folder
        folder.mkdir()
        self.log = log
        # A free port can be taken between free_port() and storescp's bind (scenarios run in parallel):
        # storescp then exits at once, and another port is tried.
        for _ in range(1 if port else 5):
            self.port = port or free_port()
            self.process = subprocess.Popen(
                [require_dcmtk("storescp"), *(["-v"] if log else []), "-aet", "DEST", "-od", str(folder), "+uf",
                 "+xa", str(self.port)],
                env={**os.environ, "TCP_NODELAY": "1"},
                stdout=log.open("ab") if log else subprocess.DEVNULL,
                stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
            )  # fmt: skip
            try:
                wait_for(
                    lambda: (
                        self.process.poll() is not None
                        or StoreSCU("PROBE").echo(Destination("DEST", "127.0.0.1", self.port))
                    ),
                    30,
                    "storescp",
                )
            except BaseException:
                self.process.kill()
                self.process.wait(timeout=10)
                raise
            if self.process.poll() is None:
                return
        said = log.read_text()[-1000:] if log else ""
        status = self.process.poll()
        raise AssertionError(f"storescp could not listen on port {self.port}: exit status {status}; {said}")

    def arrivals(self) -> list[str]:
        """SOP Instance UIDs in the order storescp stored them (from its ``-v`` log)."""
        assert self.log is not None, "arrivals need a log"
        paths = re.findall(r"storing DICOM file: (\S+)", self.log.read_text())
        return [str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in paths]

    def copies(self) -> Counter[str]:
        """SOP Instance UID -> copies received."""
        return Counter(
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in self.folder.iterdir()
            if p.is_file()
        )

    def sources_of(self) -> Counter[str]:
        """Source SOP Instance UID -> distinct outputs referring to it."""
        seen: dict[str, str] = {}
        for path in self.folder.iterdir():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            seen[str(ds.SOPInstanceUID)] = str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
        return Counter(seen.values())

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def serve(
    port: int,
    data_dir: Path,
    destination: int,
    log: Path,
    fault: str | None,
    *,
    processes: tuple[int, int] = (1, 1),
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """``pacs-xai serve`` in its own process, with ``processes`` = (receivers, workers); returns once
    it answers C-ECHO (or has exited)."""
    environment = {
        **os.environ,
        "PACS_XAI_ASSEMBLY__IDLE_SECONDS": "0.3",
        "PACS_XAI_METRICS__ENABLED": "false",
        "PACS_XAI_MODEL__WARM_UP": "false",
        "PACS_XAI_SEND__BASE_DELAY_SECONDS": "0.2",
        "PACS_XAI_SEND__MAX_DELAY_SECONDS": "1",
        # (1, 1): one process, and a fault point kills the whole node, as a power cut would. With more,
        # a fault point kills the child that reaches it and the supervisor restarts it
        # (tests/torture/test_processes.py).
        "PACS_XAI_LISTENER__PROCESSES": str(processes[0]),
        "PACS_XAI_WORKERS__PROCESSES": str(processes[1]),
    }
    environment.pop(ENV, None)
    environment.pop(ENV_ONCE, None)
    environment.update(env or {})
    if fault:
        environment[ENV] = fault
    command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--data-dir", str(data_dir),
               "--destination", f"DEST@127.0.0.1:{destination}", "--method", "gradcam", "--outputs", "sc"]  # fmt: skip
    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=log.open("ab"))
    wait_for(
        lambda: process.poll() is not None or StoreSCU("PROBE").echo(Destination("PACSXAI", "127.0.0.1", port)),
        180,
        "the node to listen",
    )
    return process


def settle(data_dir: Path, log: Path, instances: int, timeout: float = 180) -> None:
    """Wait until the journal has ``instances`` done and no output pending."""
    last: dict[str, int] = {}

    def settled() -> bool:
        journal = Journal(data_dir / "journal.sqlite")
        try:
            last.update(journal.counts())
        finally:
            journal.close()
        return last["instances_done"] == instances and last.get("outbox_pending", 0) == 0

    try:
        wait_for(settled, timeout, "every instance done and every output sent")
    except BaseException as exc:
        raise AssertionError(f"{exc}; journal counts: {last}; log tail: {log.read_text()[-2000:]}") from exc


def check_delivered_once(destination: Destinations, data_dir: Path, instances: int) -> Counter[str]:
    """One result per source at the destination, every instance done, no orphan or temp file;
    returns the copies received per output UID."""
    copies, per_source = destination.copies(), destination.sources_of()
    assert set(per_source.values()) == {1}, f"a source with more than one distinct result: {per_source}"
    assert len(copies) == instances
    journal = Journal(data_dir / "journal.sqlite")
    try:
        counts = journal.counts()
        journaled_outputs = {e.path.name for e in journal.outbox.entries(OUTBOX_STATES)}
    finally:
        journal.close()
    spool = data_dir / "spool"
    assert counts["instances_done"] == instances and counts["quarantined"] == 0, counts
    instance_files = list((spool / "instances").rglob("*.dcm"))
    assert len(instance_files) == instances, f"orphan instance files: {len(instance_files)} for {instances}"
    output_files = {p.name for p in (spool / "outbox").rglob("*.dcm")}
    assert output_files == {f"{uid}.dcm" for uid in copies}, "orphan or missing output files"
    assert journaled_outputs == output_files
    assert not [p for p in spool.rglob(".*") if p.is_file()], "temp files left behind"
    return copies


def test_sigkill_at_each_fault_point_then_restart_delivers_every_result_once(
    sources: list[Path], tmp_path: Path
) -> None:
    """The five scenarios run at the same time (each its own node, destination and folder): the
    waits of one overlap the work of another."""
    with ThreadPoolExecutor(len(FAULT_POINTS)) as pool:
        futures = {point: pool.submit(_scenario, point, sources, tmp_path / point) for point in FAULT_POINTS}
    for point, future in futures.items():
        try:
            future.result()
        except BaseException as exc:  # name the point that failed
            raise AssertionError(f"fault point {point}: {exc}") from exc


def _scenario(point: str, sources: list[Path], tmp_path: Path) -> None:
    tmp_path.mkdir(parents=True)
    destination = Destinations(tmp_path / "dest")
    data_dir, log, port = tmp_path / "node", tmp_path / "node.log", free_port()
    started: list[subprocess.Popen] = []
    try:
        node = serve(port, data_dir, destination.port, log, f"{point}:{WHEN[point]}")
        started.append(node)
        scu = StoreSCU("MODALITY", acse_timeout=10, dimse_timeout=10, network_timeout=10)
        first = scu.send(Destination("PACSXAI", "127.0.0.1", port), sources)
        acknowledged = {o.sop_instance_uid for o in first if o.verdict == "delivered"}
        assert node.wait(timeout=180) == -signal.SIGKILL, f"the node did not reach {point}"

        node = serve(port, data_dir, destination.port, log, None)
        started.append(node)
        remaining = [
            p for p in sources if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID not in acknowledged
        ]
        resent = scu.send(Destination("PACSXAI", "127.0.0.1", port), remaining)
        assert all(o.verdict == "delivered" for o in resent), [o.detail for o in resent]
        wait_for(lambda: len(destination.sources_of()) >= INSTANCES, 240, f"results for {INSTANCES} sources", 0.5)
        settle(data_dir, log, INSTANCES)
        node.send_signal(signal.SIGTERM)
        assert node.wait(timeout=60) == 0
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
        destination.stop()

    copies = check_delivered_once(destination, data_dir, INSTANCES)
    resends = sum(copies.values()) - len(copies)
    report.record(
        report.Finding(
            "crash",
            f"SIGKILL at {point} (its {WHEN[point]}. arrival), restart, caller re-sends what was not acknowledged",
            "every acknowledged instance explained and delivered; one result per source; no orphan file",
            INSTANCES,
            {
                "acknowledged before the kill": len(acknowledged),
                "re-sent by the caller": len(remaining),
                "results at storescp": len(copies),
                "same-UID re-deliveries": resends,
            },
            "a re-delivery carries the same SOP Instance UID and replaces the first copy at the destination"
            if resends
            else "",
            lost=0,
            duplicated=0,
        )
    )
