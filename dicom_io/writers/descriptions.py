"""The words every output carries: the disclaimer, the Derivation Description (ST, at most 1024
characters) and the Series Description (LO, at most 64 characters)."""

from __future__ import annotations

from dicom_io.vr import LO_MAX, ST_MAX
from dicom_io.writers.result import ExplanationResult

__all__ = ["DISCLAIMER", "derivation_description", "series_description"]

#: Burned into every overlay and written into every description: the output is not a diagnosis.
DISCLAIMER = "NOT FOR DIAGNOSTIC USE"


def derivation_description(result: ExplanationResult, *, output: str, software_version: str) -> str:
    """Derivation Description (0008,2111, ST): method, class, model name and version, in words."""
    text = (
        f"{output} of the {result.method} attribution map for class '{result.class_name}' "
        f"(probability {float(result.probability):.3f}), model {result.model_name} version "
        f"{result.model_version}, source frame {result.frame_index + 1}, pacs-xai {software_version}. "
        f"{DISCLAIMER}."
    )
    return text[:ST_MAX]


def series_description(result: ExplanationResult, *, tag: str = "") -> str:
    """Series Description (0008,103E, LO), e.g. "XAI gradcam nodule"; cut to 64 characters."""
    words = ["XAI", result.method, result.class_name] + ([tag] if tag else [])
    return " ".join(words)[:LO_MAX]
