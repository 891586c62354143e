"""The words every output carries: the disclaimer, the Derivation Description (ST, at most 1024
characters) and the Series Description (LO, at most 64 characters)."""

from __future__ import annotations

from collections.abc import Sequence

from dicom_io.vr import LO_MAX, ST_MAX
from dicom_io.writers.result import ExplanationResult

__all__ = ["DISCLAIMER", "derivation_description", "series_description"]

#: Burned into every overlay and written into every description: the output is not a diagnosis.
DISCLAIMER = "NOT FOR DIAGNOSTIC USE"


def derivation_description(
    result: ExplanationResult,
    *,
    output: str,
    software_version: str,
    findings: Sequence[ExplanationResult] | None = None,
) -> str:
    """Derivation Description (0008,2111, ST): method, class, model name and version, in words;
    every finding with its probability where an object shows several (``findings``)."""
    if findings:
        classes = ", ".join(f"'{f.class_name}' (probability {float(f.probability):.3f})" for f in findings)
        subject = f"maps for the findings {classes}"
    else:
        subject = f"map for class '{result.class_name}' (probability {float(result.probability):.3f})"
    text = (
        f"{output} of the {result.method} attribution {subject}, model {result.model_name} version "
        f"{result.model_version}, source frame {result.frame_index + 1}, pacs-xai {software_version}. "
        f"{DISCLAIMER}."
    )
    return text[:ST_MAX]


def series_description(result: ExplanationResult, *, tag: str = "", findings: bool = False) -> str:
    """Series Description (0008,103E, LO), e.g. "XAI gradcam nodule"; cut to 64 characters. An
    object of several findings of a multi-label model (its SEG, its SR) says "findings" instead of
    one class: its series holds every frame's, whichever findings each one has."""
    words = ["XAI", result.method, "findings" if findings else result.class_name] + ([tag] if tag else [])
    return " ".join(words)[:LO_MAX]
