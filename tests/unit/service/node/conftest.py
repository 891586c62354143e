"""Fixtures the node's unit tests share: a real journal (SQLite in tmp_path), a real spool, and
the node's metrics in a registry of their own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.node.metrics import NodeMetrics, create_metrics
from service.node.store import Journal, Spool


@pytest.fixture()
def journal(tmp_path: Path) -> Iterator[Journal]:
    with Journal(tmp_path / "journal.sqlite") as opened:
        yield opened


@pytest.fixture()
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


@pytest.fixture()
def metrics() -> NodeMetrics:
    return create_metrics()
