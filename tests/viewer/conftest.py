"""The browser tests run only when asked for (``make test-viewer``: ``pytest -m viewer tests/viewer``).

They need OHIF (fetched with npm), nginx, orthanc-dicomweb and Chromium, and take a minute or
two; ``make test`` collects ``tests/`` and so skips them here unless ``-m`` selects ``viewer``.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.tools.viewer.stack import ViewerStack


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    expression = config.option.markexpr or ""
    if "viewer" in expression and "not viewer" not in expression:
        return
    skip = pytest.mark.skip(reason="browser test: run `make test-viewer`")
    for item in items:
        if item.get_closest_marker("viewer"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def stack() -> Iterator[ViewerStack]:
    """``pacs-xai viewer``'s stack (Orthanc, the node, OHIF behind nginx), once for every browser test."""
    folder = Path(tempfile.mkdtemp(prefix="pacs-xai-viewer-test-"))
    started = time.monotonic()
    viewer = ViewerStack(folder)
    viewer.start()
    yield viewer
    viewer.stop()
    shutil.rmtree(folder, ignore_errors=True)
    print(f"viewer stack up for {time.monotonic() - started:.0f} s")
