"""Output writers: DICOM objects that carry an explanation back to PACS.

One module per output kind — ``sc`` Secondary Capture (burned-in overlay), ``pm`` Parametric Map
(the attribution values), ``seg`` Segmentation (fractional heatmap or binary top region), ``sr``
Comprehensive 3D SR TID 1500 (the finding, its probability, references to the others) — sharing
:mod:`dicom_io.writers.provenance` (source references, copied patient/study attributes,
Contributing Equipment, geometry) and :mod:`dicom_io.uids` (deterministic UIDs).
"""

from dicom_io.writers.overlay import render_overlay, save_png
from dicom_io.writers.pm import build_parametric_map
from dicom_io.writers.provenance import ExplanationResult
from dicom_io.writers.sc import build_secondary_capture
from dicom_io.writers.seg import build_segmentation, top_region_mask
from dicom_io.writers.sr import build_report

#: The output kinds a site can choose (config ``outputs:``, ``pacs-xai explain --outputs``).
OUTPUT_KINDS: tuple[str, ...] = ("sc", "pm", "seg_fractional", "seg_binary", "sr")

__all__ = [
    "OUTPUT_KINDS",
    "ExplanationResult",
    "build_parametric_map",
    "build_report",
    "build_secondary_capture",
    "build_segmentation",
    "render_overlay",
    "save_png",
    "top_region_mask",
]
