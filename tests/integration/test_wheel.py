"""The built wheel runs on its own: installed into a fresh virtualenv outside the source tree,
``pacs-xai explain`` explains a phantom with the default model, and ``pacs-xai serve`` answers
DCMTK's echoscu. The wheel's dependencies come from the test environment (a ``.pth`` line), so
nothing is downloaded; pacs-xai itself comes only from the wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pydicom
import pytest

from service.synthetic.phantoms import write_phantom_studies
from tests.helpers import REPO_ROOT, free_port, require_dcmtk

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv holding the wheel built from this checkout; returns its ``bin`` folder."""
    work = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"), "."],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = (work / "dist").glob("pacs_xai-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for packaged in ("model.yaml", "demo.onnx", "demo.pt", "demo.pth", "saliency-masker.pt", "ood-statistics.npz"):
        assert f"service/models/demo/{packaged}" in names, f"the wheel lacks the default model's {packaged}"
    assert not any(name.startswith("tests/") for name in names), "tests must not be installed"
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)]
    subprocess.run(install, check=True, timeout=300)
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # The dependencies (torch, pydicom, ...) of the test environment, appended after the venv's own.
    Path(purelib, "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


def _environment() -> dict[str, str]:
    """The caller's environment without anything that would put the source tree on sys.path."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def test_the_package_comes_from_the_wheel_not_the_checkout(installed: Path, tmp_path: Path) -> None:
    code = "import service, service.models as m; print(service.__file__); print(m.demo_card_path())"
    done = subprocess.run(
        [str(installed / "python"), "-c", code], cwd=tmp_path, env=_environment(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    package, card = done.stdout.split()
    assert Path(package).is_relative_to(installed.parent) and Path(card).is_relative_to(installed.parent)


def test_explain_a_phantom_with_the_default_model(installed: Path, tmp_path: Path) -> None:
    ((source, _),) = write_phantom_studies(tmp_path / "in", studies=1, seed=5, rows=320, cols=320)
    done = subprocess.run(
        [str(installed / "pacs-xai"), "explain", str(source), "--method", "gradcam", "--out", str(tmp_path / "out")],
        cwd=tmp_path,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (written,) = (tmp_path / "out").glob("*.dcm")
    result = pydicom.dcmread(written)
    assert result.SourceImageSequence[0].ReferencedSOPInstanceUID == pydicom.dcmread(source).SOPInstanceUID
    assert result.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert "gradcam" in done.stdout, done.stdout


def test_serve_answers_dcmtk_echoscu(installed: Path, tmp_path: Path) -> None:
    port = free_port()
    serve = [
        str(installed / "pacs-xai"),
        "serve",
        "--port",
        str(port),
        "--data-dir",
        str(tmp_path / "var"),
    ]
    node = subprocess.Popen(
        serve,
        cwd=tmp_path,
        env={**_environment(), "PACS_XAI_METRICS__PORT": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        echo = [require_dcmtk("echoscu"), "-aet", "MODALITY", "-aec", "PACSXAI", "127.0.0.1", str(port)]
        deadline = time.monotonic() + 120
        while subprocess.run(echo, capture_output=True).returncode != 0:
            assert node.poll() is None, f"pacs-xai serve exited with {node.returncode}: {node.stderr.read()}"
            assert time.monotonic() < deadline, "pacs-xai serve did not answer C-ECHO within 120 s"
            time.sleep(0.5)
    finally:
        node.terminate()
        node.wait(timeout=60)
    assert node.returncode == 0, node.stderr.read()
