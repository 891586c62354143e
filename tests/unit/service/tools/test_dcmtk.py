"""DCMTK's tools are found by what they are, not by their name on PATH."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from service.tools import dcmtk
from service.tools.dcmtk import DcmtkMissingError, dcmtk_tool, is_dcmtk
from tests.helpers import require_dcmtk

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _fresh_cache():
    dcmtk_tool.cache_clear()
    yield
    dcmtk_tool.cache_clear()


@pytest.mark.parametrize("name", ["storescp", "storescu", "echoscu"])
def test_pynetdicoms_script_first_on_path_is_passed_over(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    shadow = VENV_BIN / name
    assert shadow.is_file(), f"pynetdicom installs {shadow}; this test needs it to shadow DCMTK's"
    assert not is_dcmtk(shadow)
    monkeypatch.setenv("PATH", f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
    found = dcmtk_tool(name)
    assert found == require_dcmtk(name)
    assert Path(found).parent != VENV_BIN and is_dcmtk(Path(found))


def test_only_a_same_named_other_program_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(VENV_BIN))
    monkeypatch.setattr(dcmtk, "DEBIAN_BIN", tmp_path)
    with pytest.raises(DcmtkMissingError, match=rf"found only {VENV_BIN / 'storescp'}.*apt-get install dcmtk"):
        dcmtk_tool("storescp")
