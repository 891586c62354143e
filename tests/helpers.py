"""Shared test helpers: real tools and real data files, required rather than skipped.

`make test` installs DCMTK, dicom3tools and pydicom-data, so a missing one is a broken setup and
fails the test with the fix in the message; a silent skip would hide an unchecked promise.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom.data import get_testdata_file

from dicom_io.net.network import free_port
from service.tools.bench import peers as bench_peers
from service.tools.dcmtk import DcmtkMissingError, dcmtk_tool

__all__ = ["REPO_ROOT", "data_file", "free_port", "grad_cam_module", "require_dcmtk", "require_tool", "wait_for"]

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


def require_dcmtk(name: str) -> str:
    """Absolute path of DCMTK's ``name`` (storescp, storescu, echoscu, dcmj2pnm), never pynetdicom's
    same-named console script."""
    try:
        return dcmtk_tool(name)
    except DcmtkMissingError as exc:
        pytest.fail(f"{exc} (or run `make system-deps`)")


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
