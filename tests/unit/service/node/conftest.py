"""Fixtures the node's unit tests share: a real journal (SQLite in tmp_path)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.node.store import Journal


@pytest.fixture()
def journal(tmp_path: Path) -> Iterator[Journal]:
    with Journal(tmp_path / "journal.sqlite") as opened:
        yield opened
