"""The node in its own process for the torture tests, and the crash scenario they share: start
``pacs-xai serve`` (one process, or a supervisor with receiver and worker processes), a DCMTK
storescp destination that keeps every copy, phantom sources, the node's processes from /proc, the
waits and the delivery checks; then :func:`crash_scenarios`: SIGKILL between two steps, restart
(or the supervisor's), the caller re-sends what was not acknowledged, and every acknowledged
instance is explained and delivered once, with no orphan file (``test_crash.py``: one process;
``test_processes.py``: many).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from dicom_io.faults import ENV, ENV_ONCE
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
#: The crash case that kills a many-process node's supervisor from outside (its children follow it).
WHOLE_NODE = "whole node"


def phantom_sources(folder: Path, count: int, seed: int, series: int = 1) -> list[Path]:
    """``count`` phantoms of one study, spread over ``series`` series, in sending order."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series_uids = generate_uid(), [generate_uid() for _ in range(series)]
    paths = []
    for index in range(count):
        phantom = make_phantom(
            index, ("normal", "nodule", "effusion")[index % 3], seed=seed, rows=256, cols=240, study_uid=study,
            series_uid=series_uids[index * series // count],
        )  # fmt: skip
        path = folder / f"{seed}-{index}.dcm"
        phantom.dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def sop_instance_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def node_processes(data_dir: Path) -> list[int]:
    """Pids of the processes still running for the node in ``data_dir`` (the children name its
    resolved configuration on their command line; the supervisor its data folder)."""
    needle = str(data_dir).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


def wait_channels(data_dir: Path) -> str:
    """What each process of the node is waiting in (kernel wait channel), for a drain that hangs."""
    seen = []
    for pid in node_processes(data_dir):
        try:
            name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[2:3]
            seen.append(f"{pid} {name[0].decode() if name else '?'}: {Path(f'/proc/{pid}/wchan').read_text()}")
        except OSError:
            continue
    return "; ".join(seen)


class Destinations:
    """DCMTK storescp keeping every copy it receives (unique file names); with ``log`` it logs
    (``-v``) each file it stores, in the order received."""

    def __init__(self, folder: Path, *, port: int | None = None, log: Path | None = None) -> None:
        self.folder = folder
        folder.mkdir()
        self.log = log
        # A free port can be taken between free_port() and storescp's bind (scenarios run in parallel):
        # storescp then exits at once, and another port is tried. A given port is tried again a few
        # times: a node retrying its sends to it can hold it for a moment (a TCP self-connect, when the
        # kernel picks that very port as the connection's own).
        for attempt in range(5):
            if attempt and port:
                time.sleep(1.0)
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


def crash_scenarios(
    cases: Sequence[str], sources: list[Path], tmp_path: Path, processes: tuple[int, int] = (1, 1)
) -> None:
    """Every case at the same time, each its own node, destination and folder (the waits of one
    overlap the work of another): a fault point of :data:`WHEN`, or :data:`WHOLE_NODE` (many
    processes only). ``processes`` = (receivers, workers); the failure names its case."""
    node = "one-process node" if processes == (1, 1) else f"node with {processes[0]} receivers, {processes[1]} workers"
    with ThreadPoolExecutor(len(cases)) as pool:
        futures = {
            case: pool.submit(_crash_scenario, case, sources, tmp_path / case.replace(" ", "-"), processes)
            for case in cases
        }
    for case, future in futures.items():
        try:
            future.result()
        except BaseException as exc:  # name the case that failed
            raise AssertionError(f"{node}, {case}: {exc}") from exc


def _crash_scenario(case: str, sources: list[Path], tmp_path: Path, processes: tuple[int, int]) -> None:
    """One process: the fault point kills the whole node, as a power cut would, and it is started
    again. More: the fault point kills the one child that reaches it, once (``PACSXAI_FAULT_ONCE``),
    and the supervisor restarts it; or the whole node is killed from outside and started again."""
    one, whole = processes == (1, 1), case == WHOLE_NODE
    assert not (one and whole), "a fault point already kills the one-process node whole"
    tmp_path.mkdir(parents=True)
    destination = Destinations(tmp_path / "dest")
    data_dir, log, port = tmp_path / "node", tmp_path / "node.log", free_port()
    fired = tmp_path / "fired"
    started: list[subprocess.Popen] = []
    target = Destination("PACSXAI", "127.0.0.1", port)
    scu = StoreSCU("MODALITY", acse_timeout=10, dimse_timeout=10, network_timeout=10)
    try:
        fault = None if whole else f"{case}:{WHEN[case]}"
        node = serve(
            port, data_dir, destination.port, log, fault, processes=processes, env={} if one else {ENV_ONCE: str(fired)}
        )
        started.append(node)
        first = scu.send(target, sources)
        acknowledged = {o.sop_instance_uid for o in first if o.verdict == "delivered"}
        if one:
            assert node.wait(timeout=180) == -signal.SIGKILL, f"the node did not reach {case}"
        elif whole:
            # the whole node at once, while it works on what it acknowledged
            children = [pid for pid in node_processes(data_dir) if pid != node.pid]
            node.send_signal(signal.SIGKILL)
            assert node.wait(timeout=30) == -signal.SIGKILL
            wait_for(lambda: not node_processes(data_dir), 30, "the children to follow their supervisor")
            assert len(children) == sum(processes) + 1, f"children before the kill: {children}"
        else:
            wait_for(fired.exists, 180, f"a child to reach {case}")
            wait_for(lambda: "exited with status -9" in log.read_text(), 30, "the supervisor to see its child die")
            assert node.poll() is None, "the supervisor died with its child"
        if one or whole:
            node = serve(port, data_dir, destination.port, log, None, processes=processes)
            started.append(node)
        remaining = [p for p in sources if sop_instance_uid(p) not in acknowledged]
        resent_count = len(remaining)
        # many processes: a connection can reach the killed receiver's closing socket
        for _ in range(1 if one else 3):
            resent = scu.send(target, remaining)
            remaining = [p for p, o in zip(remaining, resent, strict=True) if o.verdict != "delivered"]
            if not remaining:
                break
            time.sleep(1)
        assert not remaining, [o.detail for o in resent]
        wait_for(lambda: len(destination.sources_of()) >= INSTANCES, 240, f"results for {INSTANCES} sources", 0.5)
        settle(data_dir, log, INSTANCES)
        node.send_signal(signal.SIGTERM)
        try:
            assert node.wait(timeout=120) == 0
        except subprocess.TimeoutExpired as exc:
            where, tail = wait_channels(data_dir), log.read_text()[-1500:]
            raise AssertionError(f"the node did not drain: {where}; log tail: {tail}") from exc
        wait_for(lambda: not node_processes(data_dir), 30, "every process of the node to stop")
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
        destination.stop()

    copies = check_delivered_once(destination, data_dir, INSTANCES)
    resends = sum(copies.values()) - len(copies)
    figures = {"acknowledged before the kill": len(acknowledged), "re-sent by the caller": resent_count}
    if one:
        what = f"SIGKILL at {case} (its {WHEN[case]}. arrival), restart, caller re-sends what was not acknowledged"
        expected = "every acknowledged instance explained and delivered; one result per source; no orphan file"
    else:
        if whole:
            fault = "SIGKILL of the whole node (the supervisor; the children follow it) right after the caller's send"
        else:
            fault = f"SIGKILL of the one child reaching {case} (its {WHEN[case]}. arrival); the supervisor restarts it"
        what = f"many-process node ({processes[0]} receivers, {processes[1]} workers, a sender): {fault}"
        expected = (
            "every acknowledged instance explained and delivered; one result per source; no orphan file; "
            "no process left"
        )
        figures["children restarted by the supervisor"] = len(re.findall(r"exited with status -9", log.read_text()))
    report.record(
        report.Finding(
            "crash",
            what,
            expected,
            INSTANCES,
            {**figures, "results at storescp": len(copies), "same-UID re-deliveries": resends},
            "a re-delivery carries the same SOP Instance UID and replaces the first copy at the destination"
            if resends
            else "",
            lost=0,
            duplicated=0,
        )
    )
