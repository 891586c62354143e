"""The import rules of docs/architecture.md, checked with import-linter (contracts in pyproject.toml):
the layers follow the data flow (cli -> tools -> node -> trust -> explain -> inference -> synthetic,
models -> dicom_io), dicom_io never imports torch or the service, explain and trust never import DICOM."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from tests.helpers import REPO_ROOT

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def test_the_import_contracts_hold() -> None:
    done = subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    contracts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert f"Contracts: {len(contracts)} kept, 0 broken." in done.stdout


def test_every_service_package_is_in_a_layer() -> None:
    """A new top-level package under service/ must be given its place in the data flow."""
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in config["contracts"] if c["type"] == "layers"]
    named = {name.strip() for layer in layers for name in layer.split("|")}
    packages = {f"service.{p.name}" for p in (REPO_ROOT / "service").iterdir() if (p / "__init__.py").is_file()}
    assert packages <= named, f"not in any layer: {sorted(packages - named)}"
