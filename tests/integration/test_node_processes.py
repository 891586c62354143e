"""The node in several processes (``pacs-xai serve`` with 2 receivers and 2 workers), with real
associations, a real DCMTK storescp as the destination and SIGKILL of a worker mid-run; and a
receiver process on its own, checked for what it loads.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.presentation import StoragePresentationContexts

from dicom_io.net.scu import Destination, StoreSCU
from service.node.config import load_config, write_resolved_config
from service.synthetic.phantoms import make_phantom
from tests.helpers import free_port, start_storescp, wait_for

pytestmark = pytest.mark.integration

ROWS, COLS = 256, 240


def _series(folder: Path, count: int, seed: int) -> list[Path]:
    """``count`` phantom radiographs of one new series, written to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for index in range(count):
        phantom = make_phantom(index, ("normal", "nodule")[index % 2], seed=seed, rows=ROWS, cols=COLS)
        phantom.dataset.StudyInstanceUID, phantom.dataset.SeriesInstanceUID = study, series
        path = folder / f"{seed}-{index}.dcm"
        phantom.dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _rows(journal: Path, sql: str, *args: object) -> list[tuple]:
    with sqlite3.connect(journal, timeout=30) as db:
        return db.execute(sql, args).fetchall()


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_a_receiver_process_stores_and_loads_neither_torch_nor_onnxruntime(tmp_path: Path) -> None:
    config = load_config(None, {"listener": {"port": free_port()}, "storage": {"data_dir": str(tmp_path / "node")}})
    path = write_resolved_config(config, tmp_path / "config.json")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    process = subprocess.Popen(
        [sys.executable, "-m", "service.node.intake", "--config", str(path), "--name", "receiver-0"], env=env
    )
    try:
        node = Destination("PACSXAI", "127.0.0.1", config.listener.port)
        wait_for(lambda: StoreSCU("PROBE").echo(node), 30, "the receiver to listen")
        (source,) = _series(tmp_path / "in", 1, seed=1)
        (outcome,) = StoreSCU("MODALITY").send(node, [source])
        assert outcome.verdict == "delivered"
        journal = tmp_path / "node" / "journal.sqlite"
        assert _rows(journal, "SELECT state FROM instances") == [("received",)]
        assert _rows(journal, "SELECT owner FROM associations WHERE ended_at IS NOT NULL")[0][0].startswith(
            "receiver-0:"
        )
        loaded = _maps(process.pid)
        assert "pydicom" in loaded or "libpython" in loaded or ".so" in loaded  # the map is readable
        assert "libtorch" not in loaded and "torch/_C" not in loaded, "a receiver must not load torch"
        assert "onnxruntime" not in loaded, "a receiver must not load ONNX Runtime"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


class _Node:
    """``pacs-xai serve`` in a subprocess, its log in a file."""

    def __init__(
        self, tmp_path: Path, destination_port: int, extra_env: dict[str, str] | None = None, *, outputs: str = "sc"
    ) -> None:
        self.port = free_port()
        self.data_dir = tmp_path / "node"
        self.journal = self.data_dir / "journal.sqlite"
        self.log = tmp_path / "node.log"
        env = {
            **os.environ,
            "PACS_XAI_LISTENER__PROCESSES": "2",
            "PACS_XAI_WORKERS__PROCESSES": "2",
            "PACS_XAI_ASSEMBLY__IDLE_SECONDS": "0.4",
            "PACS_XAI_MODEL__WARM_UP": "false",
            "PACS_XAI_METRICS__PORT": "0",
            "PACS_XAI_SEND__BASE_DELAY_SECONDS": "0.2",
            "OMP_NUM_THREADS": "1",
            **(extra_env or {}),
        }
        command = [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port)]
        command += ["--data-dir", str(self.data_dir), "--destination", f"DEST@127.0.0.1:{destination_port}"]
        command += ["--method", "gradcam", "--outputs", outputs]
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=self.log.open("ab"))
        self.address = Destination("PACSXAI", "127.0.0.1", self.port)
        wait_for(lambda: StoreSCU("PROBE").echo(self.address), 60, "the node to listen")

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def pids(self, name: str) -> list[int]:
        found = subprocess.run(["pgrep", "-f", "--", f"--name {name}$"], capture_output=True, text=True).stdout
        return [int(pid) for pid in found.split()]


def _open_on_two_receivers(node: _Node) -> list:
    """Two associations that two different receiver processes serve (SO_REUSEPORT spreads by hash)."""
    ae = AE("MODALITY")
    ae.requested_contexts = StoragePresentationContexts[:100]
    kept: dict[str, object] = {}
    for _ in range(30):
        assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSXAI")
        assert assoc.is_established
        wait_for(
            lambda: len(_rows(node.journal, "SELECT 1 FROM associations WHERE ended_at IS NULL")) > len(kept),
            10,
            "the association's journal row",
        )
        owners = _rows(node.journal, "SELECT owner FROM associations WHERE ended_at IS NULL ORDER BY opened_at")
        owner = owners[-1][0].split(":")[0]
        if owner in kept:
            assoc.release()
            wait_for(
                lambda: len(_rows(node.journal, "SELECT 1 FROM associations WHERE ended_at IS NULL")) == len(kept),
                10,
                "the association's end",
            )
            continue
        kept[owner] = assoc
        if len(kept) == 2:
            return list(kept.values())
    pytest.fail("30 associations all reached one receiver process")


def test_two_receivers_two_workers_a_split_series_and_a_killed_worker_lose_nothing(tmp_path: Path) -> None:
    results = tmp_path / "dest"
    results.mkdir()
    storescp_port = free_port()
    storescp = start_storescp(results, storescp_port)
    node = None
    try:
        wait_for(lambda: StoreSCU("PROBE").echo(Destination("DEST", "127.0.0.1", storescp_port)), 15, "storescp")
        node = _Node(tmp_path, storescp_port)

        # One series over two associations on two receiver processes: processed as one batch,
        # and not before both associations ended.
        split = _series(tmp_path / "split", 6, seed=5)
        first, second = _open_on_two_receivers(node)
        for index, path in enumerate(split):
            status = (first, second)[index % 2].send_c_store(path)
            assert status.Status == 0x0000
        first.release()
        time.sleep(1.2)  # three idle periods: the second association still holds the series back
        assert _rows(node.journal, "SELECT COUNT(*) FROM instances WHERE state = 'done'") == [(0,)]
        second.release()

        # Ten more series over one association while a worker is killed with work in hand.
        more = [path for seed in range(10, 20) for path in _series(tmp_path / "more", 2, seed=seed)]
        outcomes = StoreSCU("MODALITY").send(node.address, more)
        assert all(outcome.verdict == "delivered" for outcome in outcomes)
        wait_for(
            lambda: _rows(node.journal, "SELECT COUNT(*) FROM claims WHERE worker LIKE 'worker-0:%'")[0][0] > 0,
            60,
            "worker-0 to claim a series",
        )
        claimants = _rows(node.journal, "SELECT DISTINCT worker FROM claims WHERE worker LIKE 'worker-0:%'")
        (victim,) = {int(row[0].split(":")[1].split("-")[0]) for row in claimants}  # worker-0:<pid>-<thread>
        assert node.pids("worker-0") == [victim]
        os.kill(victim, signal.SIGKILL)

        sources = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in [*split, *more]}
        wait_for(lambda: len(list(results.iterdir())) >= len(sources), 120, f"{len(sources)} results at storescp")
        time.sleep(1.0)  # anything sent twice would arrive now
        arrived = [pydicom.dcmread(p, stop_before_pixels=True) for p in results.iterdir()]
        uids = [ds.SOPInstanceUID for ds in arrived]
        assert len(uids) == len(set(uids)) == len(sources), "every result exactly once"
        assert {ds.SourceImageSequence[0].ReferencedSOPInstanceUID for ds in arrived} == sources

        log = node.text()
        split_series = pydicom.dcmread(split[0], stop_before_pixels=True).SeriesInstanceUID
        assert f"series {split_series} batch of 6 processed" in log, "the split series assembled as one"
        assert re.search(r"worker-0 exited with status -9 .* restarting", log)
        wait_for(lambda: len(node.pids("worker-0")) == 1 and node.pids("worker-0") != [victim], 30, "a new worker-0")
        owners = {row[0].split(":")[0] for row in _rows(node.journal, "SELECT owner FROM associations")}
        assert {"receiver-0", "receiver-1"} <= owners

        metrics_port = int(re.search(r"metrics and health on port (\d+)", log).group(1))
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        stored = re.search(r'^pacsxai_instances_received_total\{outcome="stored"\} (\S+)$', text, re.M)
        assert stored is not None and float(stored.group(1)) == len(sources), "counts summed over the receivers"

        children = [
            pid for name in ("receiver-0", "receiver-1", "worker-0", "worker-1", "sender") for pid in node.pids(name)
        ]
        node.process.send_signal(signal.SIGTERM)
        assert node.process.wait(timeout=60) == 0
        assert not [pid for pid in children if Path(f"/proc/{pid}").exists()], "SIGTERM drains every process"
    finally:
        if node is not None and node.process.poll() is None:
            node.process.kill()
        storescp.terminate()
        storescp.wait(timeout=10)
