"""Start a Triton server (:mod:`service.tools.triton.serve`) for a model card on a loopback port.

The server runs with the Python of its own virtualenv (``make triton-venv`` writes
``.venv-triton``; ``PACSXAI_TRITON_PYTHON`` names another), because nvidia-pytriton needs NumPy < 2.
:class:`TritonServer` exports the card's graphs, starts the server as a child process, waits until
both models are ready and stops it on exit; the tests, the benches and ``pacs-xai triton serve``
use it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from service.inference.card import ModelCard
from service.inference.graphs import GraphSpec, export_graphs

SERVE_SCRIPT = Path(__file__).with_name("serve.py")
#: The Triton virtualenv the Makefile writes, beside the source tree.
DEFAULT_VENV = Path(__file__).resolve().parents[3] / ".venv-triton"


class TritonLaunchError(RuntimeError):
    """The server could not be started (no virtualenv, it exited, it never became ready)."""


def triton_python() -> Path | None:
    """The Python of the Triton virtualenv: ``PACSXAI_TRITON_PYTHON``, else ``.venv-triton``; ``None`` when absent."""
    named = os.environ.get("PACSXAI_TRITON_PYTHON")
    candidate = Path(named) if named else DEFAULT_VENV / "bin" / "python"
    return candidate if candidate.is_file() else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _descendants(pid: int) -> list[int]:
    """The live descendants of ``pid``, from ``/proc`` (the server runs on Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class TritonServer:
    """A Triton server for ``card`` as a child process on 127.0.0.1 (context manager)."""

    def __init__(
        self,
        card: ModelCard,
        workdir: Path,
        *,
        python: Path | None = None,
        grpc_port: int = 0,
        max_batch: int = 32,
        max_queue_delay_us: int = 5000,
        threads: int = 0,
        ready_timeout: float = 180.0,
    ) -> None:
        found = python or triton_python()
        if found is None:
            raise TritonLaunchError(
                f"no Triton virtualenv at {DEFAULT_VENV}: run `make triton-venv` (nvidia-pytriton, NumPy < 2), "
                "or set PACSXAI_TRITON_PYTHON to the Python of one"
            )
        self.python = found
        self.card = card
        self.workdir = workdir
        self.grpc_port = grpc_port or free_port()
        self.max_batch = max_batch
        self.max_queue_delay_us = max_queue_delay_us
        self.threads = threads
        self.ready_timeout = ready_timeout
        self.spec: GraphSpec | None = None
        self.log_path = workdir / "triton.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, *, wait: bool = True) -> TritonServer:
        """Export the graphs (once), start the server and (``wait``) wait until its models are ready."""
        if self.spec is None:
            self.spec = export_graphs(
                self.card,
                self.workdir / "graphs",
                max_batch=self.max_batch,
                max_queue_delay_us=self.max_queue_delay_us,
            )
        command = [
            str(self.python),
            str(SERVE_SCRIPT),
            str(self.workdir / "graphs"),
            "--grpc-port",
            str(self.grpc_port),
            "--http-port",
            str(free_port()),
            "--metrics-port",
            str(free_port()),
            "--threads",
            str(self.threads),
        ]
        environment = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        """Return once both models are ready; :class:`TritonLaunchError` with its log if the server
        exits or is not ready in time."""
        import tritonclient.grpc as grpcclient

        assert self.spec is not None and self._process is not None
        models = [name for name in (self.spec.classifier_model, self.spec.cam_model) if name]
        deadline = time.monotonic() + self.ready_timeout
        client = grpcclient.InferenceServerClient(url=self.url)
        try:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    raise TritonLaunchError(
                        f"the Triton server exited with status {self._process.returncode}; its log:\n{self.log_tail()}"
                    )
                try:
                    if all(client.is_model_ready(name) for name in models):
                        return
                except Exception:  # not listening yet
                    pass
                time.sleep(0.5)
        finally:
            client.close()
        self.stop()
        raise TritonLaunchError(
            f"the Triton server was not ready within {self.ready_timeout:.0f} s; its log:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.is_file():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 30.0, linger: float = 5.0) -> None:
        """SIGTERM to the server's process group, SIGKILL if it lingers; then SIGKILL to any of its
        descendants still alive after ``linger`` seconds. pytriton starts tritonserver in a session
        of its own: one stuck in its graceful shutdown (requests in flight) outlived its parent and
        kept the gRPC port, so the server could not be started again on it."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        descendants = _descendants(process.pid)
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        deadline = time.monotonic() + linger
        while (alive := [pid for pid in descendants if _alive(pid)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0  # gone, so the port is free on return
        while any(_alive(pid) for pid in alive) and time.monotonic() < deadline:
            time.sleep(0.05)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def serve_forever(server: TritonServer) -> int:
    """Run ``server`` until SIGINT or SIGTERM (``pacs-xai triton serve``)."""
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    with server:
        print(f"Triton serving {server.card.name} {server.card.version} on {server.url} (gRPC); Ctrl-C stops it")
        try:
            while not stopping and server._process is not None and server._process.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    print("Triton stopped", file=sys.stderr)
    return 0
