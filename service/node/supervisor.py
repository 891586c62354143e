"""The node in several processes on one box: receivers, workers and a sender, started, watched,
restarted and drained by one supervisor, which also serves the HTTP endpoints.

``pacs-xai serve`` runs this when ``listener.processes`` or ``workers.processes`` (resolved from
the cores when ``auto``) is more than 1; with both 1 it runs the single-process
:class:`~service.node.app.Node` as before. The processes:

- ``listener.processes`` receivers (:mod:`service.node.intake`), each its own pynetdicom AE on the
  same port (SO_REUSEPORT: the kernel spreads connections among them), no torch;
- ``workers.processes`` workers (:mod:`service.node.worker`), each with the model, claiming ready
  series from the journal;
- one sender (:mod:`service.node.delivery`), delivering the outbox.

They share only the spool and the journal (SQLite in WAL mode; every write waits for the lock up to
its busy timeout). Start-up: stale temp files removed, claims and open associations of the
previous run released (no child runs yet), the port resolved and held (a socket bound with
SO_REUSEPORT, never listening, so a restarted receiver gets the same port), then the children.

A child that exits while the node runs is restarted (after 0.5 s, doubling up to 30 s while it
keeps failing at once); what it held is released first: the open associations of a receiver end,
the claims of a worker go back to the journal. SIGKILL of any child therefore loses nothing.
Stop (SIGTERM): receivers first (no new associations, open ones finish), then workers (the batch
in hand finishes), then the sender (a last pass); what is left waits in the journal.

Metrics: every child writes to ``<data_dir>/run/metrics`` (prometheus-client multiprocess mode,
``PROMETHEUS_MULTIPROC_DIR``); the supervisor's ``/metrics`` combines them
(:func:`~service.node.metrics.multiprocess_registry`), so the names and labels are those of one
process. ``/readyz`` is ready when every child runs and every worker has loaded and warmed up its
model (it creates ``run/warm-<name>:<pid>``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import multiprocess

from service.node.bell import outbox_bell
from service.node.child import SUPERVISOR_PID_ENV
from service.node.config import NodeConfig, write_resolved_config
from service.node.http import HealthServer
from service.node.metrics import multiprocess_registry
from service.node.queue.refill import Refiller
from service.node.queue.stream import QueueCollector, WorkQueue, default_node_name
from service.node.store import Journal, Spool

log = logging.getLogger(__name__)

#: Seconds between looks at the children.
WATCH_SECONDS = 0.2
#: Restart delay after a child exits: first, and at most (doubling while it keeps failing at once).
RESTART_DELAY_SECONDS = (0.5, 30.0)
#: A child that ran this long counts as healthy: its next failure restarts after the first delay.
HEALTHY_AFTER_SECONDS = 60.0
#: Seconds each kind of child gets to finish after SIGTERM before it is killed.
DRAIN_SECONDS = {"intake": 60.0, "worker": 300.0, "delivery": 60.0}
#: With the queue, the spool is shared: temp files younger than this may be another machine's writes.
SHARED_SPOOL_TEMP_AGE_SECONDS = 3600.0


@dataclass
class Child:
    """One slot (``receiver-0``, ``worker-1``, ``sender``) and the process now in it."""

    name: str
    module: str  # intake | worker | delivery
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    restart_at: float = 0.0

    @property
    def identity(self) -> str:
        """``name:pid``: what the journal's associations and claims name the process by."""
        return f"{self.name}:{self.process.pid}" if self.process else self.name

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Supervisor:
    """Starts, watches, restarts and drains the processes of one node. Call :meth:`start`,
    :meth:`watch` repeatedly (or :meth:`run`), then :meth:`stop`, all from one thread: children
    die with the thread that started them (PR_SET_PDEATHSIG)."""

    def __init__(self, config: NodeConfig, receivers: int, workers: int, *, python: str = sys.executable) -> None:
        queued = config.queue.redis_url is not None  # a box of only receivers or only workers shares through Redis
        if (receivers < 1 or workers < 1) and not (queued and receivers + workers >= 1):
            raise ValueError(f"a node needs at least one receiver and one worker, got {receivers} and {workers}")
        self.config = config
        self._python = python
        data_dir = Path(config.storage.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = data_dir / "run"
        self.metrics_dir = self.run_dir / "metrics"
        self.spool = Spool(data_dir / "spool", durability=config.storage.durability)
        self.journal = Journal(data_dir / "journal.sqlite", durability=config.storage.durability)
        # A box of only workers has no sender: its results go to the receiving node's journal (queue).
        self.children = (
            [Child(f"receiver-{n}", "intake") for n in range(receivers)]
            + [Child(f"worker-{n}", "worker") for n in range(workers)]
            + ([Child("sender", "delivery")] if receivers else [])
        )
        self._port_holder: socket.socket | None = None
        self._stopping = threading.Event()
        self.http: HealthServer | None = None
        self.refiller: Refiller | None = None

    @property
    def port(self) -> int:
        """The DICOM port every receiver listens on."""
        if self._port_holder is None:
            raise RuntimeError("the supervisor has not started: no port yet")
        return int(self._port_holder.getsockname()[1])

    @property
    def metrics_port(self) -> int | None:
        return self.http.port if self.http else None

    def start(self) -> None:
        """Clean up after the previous run, hold the port, start every child and the HTTP endpoints."""
        # A spool shared with other machines (the queue): only what no live writer can still own.
        self.spool.remove_stale_temp_files(SHARED_SPOOL_TEMP_AGE_SECONDS if self.config.queue.redis_url else 0.0)
        released = self.journal.series.release_all()
        ended = self.journal.series.end_all_associations()
        if released or ended:
            log.info("released %d claim(s) and %d association(s) left by the previous run", released, ended)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.metrics_dir.mkdir(parents=True)
        listener = self.config.listener
        receivers = sum(child.module == "intake" for child in self.children)
        if receivers:
            self._port_holder = socket.socket(socket.AF_INET6 if ":" in listener.bind_address else socket.AF_INET)
            self._port_holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            self._port_holder.bind((listener.bind_address, listener.port))
        self._config_path = write_resolved_config(
            self.config,
            self.run_dir / "config.json",
            listener={"port": self.port if receivers else listener.port, "processes": receivers},
            workers={"processes": sum(child.module == "worker" for child in self.children)},
        )
        queue = self.config.queue
        if queue.redis_url and receivers:  # this box's journal feeds the stream: refill it before any child runs
            stream = WorkQueue(queue.redis_url, stream=queue.stream, group=queue.group, spool_root=self.spool.root)
            self.refiller = Refiller(
                self.journal,
                stream,
                queue.node_name or default_node_name(),
                Path(self.config.storage.data_dir),
                check_seconds=queue.check_seconds,
                outputs_queued=outbox_bell(Path(self.config.storage.data_dir)).ring,
            )
            self.refiller.check()
            self.refiller.start()
        for child in self.children:
            self._spawn(child)
        if self.config.metrics.enabled:
            registry = multiprocess_registry(self.metrics_dir, self.journal.counts)
            if queue.redis_url:
                registry.register(
                    QueueCollector(
                        WorkQueue(queue.redis_url, stream=queue.stream, group=queue.group, spool_root=self.spool.root)
                    )
                )
            metrics = self.config.metrics
            self.http = HealthServer(registry, self.readiness, bind=metrics.bind_address, port=metrics.port)
            self.http.start()
        log.info(
            "node %s on %s:%d in %d receiver and %d worker process(es)%s",
            listener.ae_title,
            listener.bind_address,
            self.port if receivers else 0,
            receivers,
            sum(child.module == "worker" for child in self.children),
            " and a sender" if receivers else " (results to the receiving nodes through the queue)",
        )

    def readiness(self) -> tuple[bool, str]:
        if self._stopping.is_set():
            return False, "stopping"
        down = [child.name for child in self.children if not child.running()]
        if down:
            return False, f"not running: {', '.join(down)}"
        cold = [
            c.name for c in self.children if c.module == "worker" and not (self.run_dir / f"warm-{c.identity}").exists()
        ]
        if cold:
            return False, f"loading the model: {', '.join(cold)}"
        return True, f"ready: {len(self.children)} processes running"

    def watch(self) -> None:
        """Restart every child that exited (after releasing what it held), when its delay has passed."""
        now = time.monotonic()
        for child in self.children:
            if child.process is None:
                if now >= child.restart_at and not self._stopping.is_set():
                    self._spawn(child)
                continue
            status = child.process.poll()
            if status is None or self._stopping.is_set():
                continue
            self._release(child)
            ran = now - child.started_at
            first, longest = RESTART_DELAY_SECONDS
            delay = first if ran >= HEALTHY_AFTER_SECONDS else min(longest, first * 2 ** min(child.restarts, 10))
            child.restarts += 1
            child.process = None
            child.restart_at = now + delay
            log.error("%s exited with status %s after %.1f s; restarting in %.1f s", child.name, status, ran, delay)

    def run(self, stop: threading.Event) -> None:
        """:meth:`start`, :meth:`watch` until ``stop`` is set, then :meth:`stop`."""
        self.start()
        try:
            while not stop.wait(WATCH_SECONDS):
                self.watch()
        finally:
            self.stop()

    def stop(self) -> None:
        """Drain: receivers, then workers, then the sender, each given DRAIN_SECONDS after SIGTERM."""
        self._stopping.set()
        for module in ("intake", "worker", "delivery"):
            group = [child for child in self.children if child.module == module and child.running()]
            for child in group:
                child.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + DRAIN_SECONDS[module]
            for child in group:
                try:
                    child.process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.error("%s did not stop within %.0f s: killing it", child.name, DRAIN_SECONDS[module])
                    child.process.kill()
                    child.process.wait()
                self._release(child)
        if self.http:
            self.http.stop()
        if self.refiller is not None:
            self.refiller.stop()
        if self._port_holder is not None:
            self._port_holder.close()
        self.journal.close()
        log.info("node stopped")

    def _spawn(self, child: Child) -> None:
        env = {
            **os.environ,
            "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
            SUPERVISOR_PID_ENV: str(os.getpid()),
        }
        command = [self._python, "-m", f"service.node.{child.module}", "--config", str(self._config_path)]
        # A session of its own: Ctrl-C at a terminal reaches the supervisor only, which drains in order.
        child.process = subprocess.Popen([*command, "--name", child.name], env=env, start_new_session=True)
        child.started_at = time.monotonic()

    def _release(self, child: Child) -> None:
        """What a child that ended held goes back to the journal; its live gauges are dropped."""
        if child.process is None:
            return
        pid = child.process.pid
        identity = f"{child.name}:{pid}"
        with contextlib.suppress(Exception):
            multiprocess.mark_process_dead(pid, str(self.metrics_dir))
        (self.run_dir / f"warm-{identity}").unlink(missing_ok=True)
        if child.module == "intake":
            if self.refiller is not None and child.process.returncode != 0:  # it may have died unpublished
                self.refiller.request_refill()
            ended = self.journal.series.end_associations_of(identity)
            if ended:
                log.warning("%s left %d association(s) open: ended", identity, ended)
        elif child.module == "worker":
            released = self.journal.series.release(identity)
            if released:
                log.warning("%s held %d claimed instance(s): released for another worker", identity, released)
