"""Shared test helpers: real tools and real data files, required rather than skipped.

`make test` installs DCMTK, dicom3tools and pydicom-data, so a missing one is a broken setup and
fails the test with the fix in the message; a silent skip would hide an unchecked promise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.data import get_testdata_file

from dicom_io.net.network import free_port
from service.tools.bench import peers as bench_peers
from service.tools.dcmtk import DcmtkMissingError, dcmtk_tool

__all__ = [
    "REPO_ROOT",
    "Pki",
    "data_file",
    "free_port",
    "grad_cam_module",
    "make_pki",
    "require_dcmtk",
    "require_tool",
    "wait_for",
]

#: The source checkout the tests run in.
REPO_ROOT = Path(__file__).resolve().parents[1]


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll ``condition`` until it holds; fail the test naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def require_tool(name: str) -> str:
    """Absolute path of a command-line tool (dciodvfy, dcmj2pnm, storescu, ...)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make system-deps` (Debian packages dcmtk, dicom3tools)")
    return path


@dataclass(frozen=True)
class Pki:
    """A test CA and the server and client certificates it signed (PEM files)."""

    ca: Path
    server_certificate: Path
    server_key: Path
    client_certificate: Path
    client_key: Path


def _openssl(*args: str) -> None:
    done = subprocess.run([require_tool("openssl"), *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.fail(f"openssl {' '.join(args)} failed: {done.stderr}")


def make_pki(folder: Path, name: str = "pacs-xai test CA") -> Pki:
    """A CA called ``name`` in ``folder`` and two certificates it signs (server for
    127.0.0.1/localhost, client), EC P-256, made by openssl."""
    folder.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", str(folder / "ca.key"), "-out", str(folder / "ca.pem"), "-days", "2",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    for role, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        _openssl("req", *ec, "-keyout", str(folder / f"{role}.key"), "-out", str(folder / f"{role}.csr"),
                 "-subj", f"/CN=pacs-xai test {role}")  # fmt: skip
        extensions = folder / f"{role}.ext"
        extensions.write_text(f"subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage={usage}\n")
        _openssl("x509", "-req", "-in", str(folder / f"{role}.csr"), "-CA", str(folder / "ca.pem"),
                 "-CAkey", str(folder / "ca.key"), "-CAcreateserial", "-days", "2",
                 "-out", str(folder / f"{role}.pem"), "-extfile", str(extensions))  # fmt: skip
    return Pki(
        folder / "ca.pem", folder / "server.pem", folder / "server.key", folder / "client.pem", folder / "client.key"
    )


def require_dcmtk(name: str) -> str:
    """Absolute path of DCMTK's ``name`` (storescp, storescu, echoscu, dcmj2pnm), never pynetdicom's
    same-named console script."""
    try:
        return dcmtk_tool(name)
    except DcmtkMissingError as exc:
        pytest.fail(f"{exc} (or run `make system-deps`)")


def start_storescp(results: Path, port: int) -> subprocess.Popen:
    """DCMTK storescp as the destination "DEST" on ``port``: every copy it receives kept under
    ``results`` with a name of its own (``+uf``), any transfer syntax accepted (``+xa``)."""
    return subprocess.Popen(
        [require_dcmtk("storescp"), "-aet", "DEST", "-od", str(results), "+uf", "+xa", str(port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def data_file(name: str) -> str:
    """Path of a file from pydicom's own test data or the pydicom-data package (never downloads)."""
    path = get_testdata_file(name)
    if path is None or not os.path.isfile(path):
        pytest.fail(f"test file {name} not found: install the test extra (pip install -e '.[test]')")
    return path


#: Seed of the phantoms no model was trained on (the demo model's training uses other seeds).
HELD_OUT_SEED = 424242


def held_out_nodules(count: int) -> list:
    """``count`` held-out nodule phantoms, varied in width (448, 480, 512 columns) and in
    photometric interpretation (MONOCHROME2, MONOCHROME1): the localisation tests' cases."""
    from service.synthetic.phantoms import make_phantom

    return [
        make_phantom(
            index,
            "nodule",
            seed=HELD_OUT_SEED,
            cols=(448, 480, 512)[index % 3],
            photometric=("MONOCHROME2", "MONOCHROME1")[index % 2],
        )
        for index in range(count)
    ]


def grad_cam_module() -> Any:
    """``pytorch_grad_cam`` through the benches' torchvision shim
    (:func:`service.tools.bench.peers.pytorch_grad_cam`: torchvision's PyPI wheel does not load
    beside the CPU torch here, so the two op schemas it needs are declared first), or a skip when
    it is not installed (pip install grad-cam, the test extra). The service itself never imports
    torchvision."""
    try:
        module, _libraries = bench_peers.pytorch_grad_cam()  # cached there, with the libraries it keeps alive
    except bench_peers.PeerMissing as exc:
        pytest.skip(f"{exc}: pip install grad-cam (the test extra)")
    return module
