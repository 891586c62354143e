"""A real Orthanc (Debian package) as the PACS in end-to-end tests, on loopback ports.

Started as a plain process with a temporary storage folder and TCP_NODELAY=1; spoken to over
its REST API with the standard library only.
"""

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

import pytest

from tests.helpers import free_port


class Orthanc:
    """One Orthanc process; ``dicom_port``/``http_port`` are free loopback ports chosen at start."""

    def __init__(self, folder: Path, *, ae_title: str = "ORTHANC") -> None:
        binary = shutil.which("Orthanc")
        if binary is None:
            pytest.fail("Orthanc is not installed: run `make system-deps` (Debian package orthanc)")
        self.ae_title = ae_title
        self.dicom_port = free_port()
        self.http_port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "pacs-xai-test",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "DicomAet": ae_title,
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
            "Plugins": [],
        }
        self._config_path = folder / "orthanc.json"
        self._config_path.write_text(json.dumps(config))
        self._log = (folder / "orthanc.log").open("wb")
        self._process = subprocess.Popen(
            [binary, str(self._config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        self._wait_until_up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _wait_until_up(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                pytest.fail(f"Orthanc exited with {self._process.returncode}; see {self._log.name}")
            try:
                self.get("/system")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        pytest.fail(f"Orthanc did not answer on {self.url} within {timeout} s")

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json") -> Any:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            request.add_header("Content-Type", content_type)
        with urllib.request.urlopen(request, timeout=120) as response:
            data = response.read()
        if response.headers.get_content_type() == "application/json" and data:
            return json.loads(data)
        return data

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def upload(self, path: Path | str) -> dict[str, Any]:
        """POST /instances; returns Orthanc's answer (ID, ParentStudy, ...)."""
        return self.request("POST", "/instances", Path(path).read_bytes(), "application/dicom")

    def add_modality(self, name: str, ae_title: str, host: str, port: int) -> None:
        self.request("PUT", f"/modalities/{name}", json.dumps({"AET": ae_title, "Host": host, "Port": port}).encode())

    def send_study(self, modality: str, study_id: str) -> None:
        """Route a study to a modality (C-STORE from Orthanc), synchronously."""
        body = json.dumps({"Resources": [study_id], "Synchronous": True}).encode()
        self.request("POST", f"/modalities/{modality}/store", body)

    def study_instances(self, study_id: str) -> list[dict[str, Any]]:
        return self.get(f"/studies/{study_id}/instances")

    def tags(self, instance_id: str) -> dict[str, Any]:
        return self.get(f"/instances/{instance_id}/simplified-tags")

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()
