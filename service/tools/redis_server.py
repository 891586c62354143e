"""redis-server as a plain local process: the work queue of the tests (and of a one-box trial of
``queue.redis_url``). A loopback port chosen at start, a private folder, and the durability the
node asks of Redis: AOF with ``appendfsync always``, no RDB snapshots."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from dicom_io.net.network import free_port
from service.tools.orthanc import OrthancError, stop_process

#: What the node expects of its Redis: every write in the append-only file, fsynced before the reply.
DURABLE_ARGUMENTS = ("--appendonly", "yes", "--appendfsync", "always", "--save", "")


class RedisServer:
    """redis-server on ``127.0.0.1:<free port>`` with its data in ``folder``; :meth:`start`,
    :meth:`kill` (SIGKILL), :meth:`wipe` (delete its data: a Redis that comes back empty), :meth:`stop`."""

    def __init__(self, folder: Path, *, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise OrthancError("redis-server is not installed: apt-get install redis-server")
        self.binary = binary
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log = self.folder / "redis.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> RedisServer:
        command = [
            self.binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.folder),
            *DURABLE_ARGUMENTS,
            "--logfile", str(self.log),
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise OrthancError(f"redis-server exited with {self.process.returncode}; see {self.log}")
            if self.ping():
                return self
            time.sleep(0.05)
        raise OrthancError(f"redis-server did not answer on port {self.port} within {timeout} s; see {self.log}")

    def ping(self) -> bool:
        """Whether it answers PING (plain RESP over a socket: no client library needed)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: what a crash or a lost machine does."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def wipe(self) -> None:
        """Delete the append-only files and snapshots (a stopped server comes back empty)."""
        for path in self.folder.iterdir():
            if path.name != self.log.name:
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    def stop(self) -> None:
        stop_process(self.process)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
