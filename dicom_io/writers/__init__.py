"""Output writers: DICOM objects that carry an explanation back to PACS.

One module per output kind (``sc`` Secondary Capture now; Parametric Map, Segmentation and
SR TID 1500 follow), sharing :mod:`dicom_io.writers.provenance` (source references, copied
patient/study attributes, Contributing Equipment) and :mod:`dicom_io.uids` (deterministic UIDs).
"""

from dicom_io.writers.overlay import render_overlay, save_png
from dicom_io.writers.provenance import ExplanationResult
from dicom_io.writers.sc import build_secondary_capture

__all__ = ["ExplanationResult", "build_secondary_capture", "render_overlay", "save_png"]
