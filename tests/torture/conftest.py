"""The torture tier: every test here is marked ``torture``; at the end of the session the findings
are written as the reliability report when ``PACSXAI_RELIABILITY_REPORT`` names a file."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.torture import report

_STARTED = time.monotonic()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.torture)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    target = os.environ.get(report.ENV_REPORT)
    if not target or not report.findings():
        return
    report.write(Path(target), seconds=time.monotonic() - _STARTED, failed=session.testsfailed)


def long_run() -> bool:
    """``PACSXAI_TORTURE_LONG=1``: the larger budgets (hours), not for CI."""
    return os.environ.get("PACSXAI_TORTURE_LONG", "") not in ("", "0")


@contextlib.contextmanager
def quiet_logs(level: int = logging.CRITICAL) -> Iterator[None]:
    """The libraries' and the node's log records above ``level`` only, for runs of thousands of
    cases (the records would be kept in memory by pytest's log capture)."""
    names = ("pynetdicom", "pydicom", "dicom_io", "service")
    saved = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        for name, value in saved.items():
            logging.getLogger(name).setLevel(value)


def resident_mib(pid: int | None = None) -> float:
    """Resident memory (VmRSS) of this process or ``pid``, MiB (Linux /proc)."""
    status = Path(f"/proc/{pid or 'self'}/status").read_text()
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc status")


@pytest.fixture()
def small_disk(tmp_path: Path):
    """A 16 MiB tmpfs made for the test (the container runs as root; a loop device would do too); the
    test fills all but about 600 KiB of it. (The journal's WAL grows by some 20 KiB an instance until its
    checkpoint, so a disk of a few MiB would fill again as soon as the refused instances came back.)"""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)
