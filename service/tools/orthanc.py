"""Orthanc, the open PACS, as a plain local process: the PACS of ``pacs-xai viewer`` and of the
end-to-end tests. Loopback ports chosen at start, a private storage folder, TCP_NODELAY=1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from dicom_io.net.network import free_port

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
#: Orthanc's log line when a port it was given is taken, and how many port pairs are tried.
PORT_TAKEN = "privileged or already in use"
PORT_ATTEMPTS = 4


class OrthancError(RuntimeError):
    """Orthanc (or another helper process) is missing or did not come up; the message says what to do."""


def wait_http(url: str, process: subprocess.Popen, log: Path, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise OrthancError(f"{what} exited with {process.returncode}; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    raise OrthancError(f"{what} did not answer on {url} within {timeout} s; see {log}")


def stop_process(process: subprocess.Popen | None, timeout: float = 30.0) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class OrthancProcess:
    """Orthanc as a plain process on loopback ports (DICOM, REST, optionally DICOMweb), for the
    viewer stack and the end-to-end tests; spoken to over its REST API."""

    def __init__(self, folder: Path, *, ae_title: str = "ORTHANC", dicomweb: bool = True) -> None:
        binary = shutil.which("Orthanc")
        if binary is None:
            raise OrthancError("Orthanc is not installed: apt-get install orthanc")
        if dicomweb and not DICOMWEB_PLUGIN.is_file():
            raise OrthancError("the Orthanc DICOMweb plugin is not installed: apt-get install orthanc-dicomweb")
        self.ae_title = ae_title
        folder.mkdir(parents=True, exist_ok=True)
        self.log = folder / "orthanc.log"
        ready = "/dicom-web/studies" if dicomweb else "/system"
        for attempt in range(1, PORT_ATTEMPTS + 1):
            self.dicom_port, self.http_port = free_port(), free_port()
            self.process = self._launch(binary, folder, dicomweb)
            try:
                wait_http(self.url + ready, self.process, self.log, "Orthanc")
                return
            except OrthancError:
                stop_process(self.process)
                # A port free a moment ago may be taken before Orthanc binds it (another process's
                # outgoing connection): new ports, a few times; any other failure at once.
                if attempt == PORT_ATTEMPTS or PORT_TAKEN not in self.log.read_text(errors="replace"):
                    raise

    def _launch(self, binary: str, folder: Path, dicomweb: bool) -> subprocess.Popen:
        config = {
            "Name": "pacs-xai-viewer",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomCheckCalledAet": False,
            "StableAge": 1,
            "HttpTimeout": 60,
            "DicomScuTimeout": 30,
            "Plugins": [str(DICOMWEB_PLUGIN)] if dicomweb else [],
        }
        if dicomweb:
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado"}
        (folder / "orthanc.json").write_text(json.dumps(config, indent=2))
        with self.log.open("wb") as log:
            return subprocess.Popen(
                [binary, str(folder / "orthanc.json")],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "TCP_NODELAY": "1"},
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json") -> Any:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            request.add_header("Content-Type", content_type)
        with urllib.request.urlopen(request, timeout=120) as response:
            data = response.read()
            json_answer = response.headers.get_content_type() == "application/json"
        return json.loads(data) if json_answer and data else data

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def upload(self, path: Path) -> dict[str, Any]:
        return self.request("POST", "/instances", Path(path).read_bytes(), "application/dicom")

    def add_modality(self, name: str, ae_title: str, host: str, port: int) -> None:
        self.request("PUT", f"/modalities/{name}", json.dumps({"AET": ae_title, "Host": host, "Port": port}).encode())

    def send_study(self, modality: str, study_id: str) -> None:
        body = json.dumps({"Resources": [study_id], "Synchronous": True}).encode()
        self.request("POST", f"/modalities/{modality}/store", body)

    def study_instances(self, study_id: str) -> list[dict[str, Any]]:
        return self.get(f"/studies/{study_id}/instances")

    def tags(self, instance_id: str) -> dict[str, Any]:
        return self.get(f"/instances/{instance_id}/simplified-tags")

    def stop(self) -> None:
        stop_process(self.process)
