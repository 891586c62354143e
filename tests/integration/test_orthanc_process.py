"""The Orthanc launcher (:mod:`service.tools.orthanc`) with the real Orthanc: a port taken between
choosing it and Orthanc binding it (another process's connection) costs a retry on new ports,
not a failed viewer stack or test; any other start failure is raised at once."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_io.net.network import free_port
from service.tools import orthanc as launcher
from tests.orthanc import Orthanc

pytestmark = pytest.mark.integration


@pytest.fixture()
def taken_port() -> Iterator[int]:
    """The local port of an open outgoing connection: bound, not listening (as in the race)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        with socket.create_connection(server.getsockname()) as client:
            with server.accept()[0]:
                yield int(client.getsockname()[1])


def test_a_taken_port_is_retried_on_new_ports(monkeypatch, tmp_path: Path, taken_port: int) -> None:
    ports = iter([free_port(), taken_port])  # the first start's HTTP port is taken

    def next_port(host: str = "127.0.0.1") -> int:
        return next(ports, None) or free_port(host)

    monkeypatch.setattr(launcher, "free_port", next_port)
    pacs = Orthanc(tmp_path / "orthanc")
    try:
        assert pacs.http_port != taken_port
        assert pacs.get("/system")["DicomAet"] == pacs.ae_title
    finally:
        pacs.stop()


def test_other_start_failures_are_not_retried(monkeypatch, tmp_path: Path) -> None:
    starts = []
    original = launcher.OrthancProcess._launch

    def launch(self, binary: str, folder: Path, dicomweb: bool):
        starts.append(self.http_port)
        (folder / "storage").write_text("a file where Orthanc wants its storage folder")
        return original(self, binary, folder, dicomweb)

    monkeypatch.setattr(launcher.OrthancProcess, "_launch", launch)
    with pytest.raises(launcher.OrthancError, match="Orthanc exited"):
        launcher.OrthancProcess(tmp_path / "orthanc", dicomweb=False)
    assert len(starts) == 1
