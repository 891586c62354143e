"""A crash between any two steps: the node (``pacs-xai serve`` in its own process) kills itself
with SIGKILL at a fault point (``PACSXAI_FAULT_POINT``, test-only), is started again, and the
caller re-sends what was not acknowledged. Counted at a real DCMTK storescp that keeps every copy
it receives (``+uf``): every acknowledged instance is explained and delivered, each output has one
UID, no source gets two different results, and the node's data folder holds no orphan.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_io.faults import FAULT_POINTS
from tests.torture.node import INSTANCES, crash_scenarios, phantom_sources


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return phantom_sources(tmp_path_factory.mktemp("sources"), INSTANCES, seed=31)


def test_sigkill_at_each_fault_point_then_restart_delivers_every_result_once(
    sources: list[Path], tmp_path: Path
) -> None:
    """The five scenarios run at the same time (each its own node, destination and folder): the
    waits of one overlap the work of another."""
    crash_scenarios(FAULT_POINTS, sources, tmp_path)
