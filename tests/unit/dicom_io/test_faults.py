"""Fault points: unset they do nothing; set, the process dies by SIGKILL at the n-th arrival."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_io.faults import ENV, ENV_ONCE, FAULT_POINTS, _parse, fault_point

SCRIPT = """
from dicom_io.faults import fault_point
for i in range(5):
    fault_point("mid-send")
    print(i, flush=True)
"""


def test_unset_points_do_nothing() -> None:
    for name in FAULT_POINTS:
        fault_point(name)  # this process has no PACSXAI_FAULT_POINT: it must survive


@pytest.mark.parametrize(
    ("spec", "printed"), [("mid-send", ""), ("mid-send:3", "0\n1\n"), ("after-journal", "0\n1\n2\n3\n4\n")]
)
def test_the_process_is_killed_at_the_nth_arrival_of_its_point(spec: str, printed: str) -> None:
    env = {**os.environ, ENV: spec}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout == printed
    assert done.returncode == (0 if spec == "after-journal" else -signal.SIGKILL)


def test_with_once_only_the_first_process_to_arrive_is_killed(tmp_path: Path) -> None:
    """PACSXAI_FAULT_ONCE: the first process to fire creates the file and dies; the next (a restarted
    child, or its sibling) arrives at the same point and goes on."""
    env = {**os.environ, ENV: "mid-send:2", ENV_ONCE: str(tmp_path / "fired")}
    runs = [subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60)]
    runs.append(subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60))
    assert [(r.returncode, r.stdout) for r in runs] == [(-signal.SIGKILL, "0\n"), (0, "0\n1\n2\n3\n4\n")]
    assert (tmp_path / "fired").exists()


@pytest.mark.parametrize("spec", ["nowhere", "mid-send:0", "mid-send:x"])
def test_a_wrong_setting_names_the_value_and_the_choices(spec: str) -> None:
    with pytest.raises(ValueError, match=ENV):
        _parse(spec)
