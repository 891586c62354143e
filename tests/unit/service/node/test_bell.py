"""The outbox bell: a ring from another process wakes the listener; the bell of another data
folder does not; a ring nobody hears is dropped quietly; a name has one listener at a time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from service.node.bell import Bell
from tests.helpers import REPO_ROOT


@pytest.fixture()
def listening(tmp_path: Path):
    bell = Bell(tmp_path / "node-a", "outbox")
    bell.listen()
    yield bell
    bell.close()


def _ring_from_another_process(data_dir: Path) -> None:
    bell = f"Bell(Path({str(data_dir)!r}), 'outbox')"
    code = f"from pathlib import Path; from service.node.bell import Bell; {bell}.ring()"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=60)


def test_a_ring_from_another_process_wakes_the_listener_once(listening: Bell, tmp_path: Path) -> None:
    assert listening.wait(0.01) is False
    _ring_from_another_process(tmp_path / "node-a")
    _ring_from_another_process(tmp_path / "node-a")
    assert listening.wait(30) is True
    assert listening.wait(0.01) is False, "every ring waiting is taken by one wait"


def test_another_nodes_bell_does_not_wake_this_one(listening: Bell, tmp_path: Path) -> None:
    _ring_from_another_process(tmp_path / "node-b")
    assert listening.wait(0.2) is False


def test_a_ring_nobody_hears_is_dropped_and_a_name_has_one_listener(listening: Bell, tmp_path: Path) -> None:
    Bell(tmp_path / "nobody", "outbox").ring()  # no listener: no error
    second = Bell(tmp_path / "node-a", "outbox")
    with pytest.raises(OSError):
        second.listen()
    second.close()
    with pytest.raises(RuntimeError, match="listen"):
        Bell(tmp_path / "node-c", "outbox").wait(0.01)
