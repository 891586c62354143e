"""Shared cases for the output-writer tests: the five sources and a synthetic attribution map."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom

from dicom_io.writers import ExplanationResult
from service.synthetic.phantoms import make_phantom
from tests.helpers import data_file, require_tool

MODEL, VERSION, METHOD, CLASS = "demo-densenet", "1.2.0", "gradcam", "nodule"

#: Case name -> (test file, or None for a phantom DX; 0-based frame).
SOURCES = {
    "ct": ("CT_small.dcm", 0),
    "mr": ("MR_small.dcm", 0),
    "cr-2k-monochrome1-j2k": ("RG1_J2KR.dcm", 0),
    "enhanced-mr-frame-3": ("emri_small.dcm", 3),
    "phantom-dx": (None, 0),
}


def load_source(name: str | None) -> pydicom.Dataset:
    if name is None:
        return make_phantom(0, "nodule", modality="DX").dataset
    return pydicom.dcmread(data_file(name))  # pixels stay undecoded: the writers never need them


def attribution_map(rows: int, cols: int) -> np.ndarray:
    """Signed raw-scale map: a positive Gaussian blob, a weaker negative one, a small negative offset."""
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    sigma = 0.08 * min(rows, cols)
    blob = np.exp(-((yy - 0.6 * rows) ** 2 + (xx - 0.65 * cols) ** 2) / (2 * sigma**2))
    dip = np.exp(-((yy - 0.25 * rows) ** 2 + (xx - 0.3 * cols) ** 2) / (2 * (1.5 * sigma) ** 2))
    return (0.031 * blob - 0.012 * dip - 0.0007).astype(np.float32)


def make_result(
    source: pydicom.Dataset,
    frame_index: int,
    *,
    probability: float = 0.87,
    display_value: float = 0.0,
    **changes: object,
) -> ExplanationResult:
    rows, cols = int(source.Rows), int(source.Columns)
    base = ExplanationResult(
        method=METHOD,
        class_name=CLASS,
        probability=probability,
        model_name=MODEL,
        model_version=VERSION,
        frame_index=frame_index,
        attribution=attribution_map(rows, cols),
        display=np.full((rows, cols), display_value, np.float32),
    )
    return replace(base, **changes) if changes else base


def dciodvfy(path: Path) -> tuple[str, list[str]]:
    """dciodvfy's report and its Error lines."""
    run = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120)
    report = run.stdout + run.stderr
    return report, [line for line in report.splitlines() if line.startswith("Error")]
