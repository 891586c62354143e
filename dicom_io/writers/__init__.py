"""Output writers: DICOM objects that carry an explanation back to PACS.

One module per output kind — ``sc`` Secondary Capture (burned-in overlay drawn by ``overlay``),
``pm`` Parametric Map (the attribution values), ``seg`` Segmentation (fractional heatmap or binary
top region), ``sr`` Comprehensive 3D SR TID 1500 (the finding, its probability, references to the
others); ``class_model`` is the standalone Secondary Capture of a class model visualisation.

What they share, one topic a module:

- ``result``: :class:`ExplanationResult`, the one explained frame a writer is given, with its
  trust signals (:class:`ShortcutSignal`, :class:`OutOfDistributionSignal`: a warning line per
  flag burned into the Secondary Capture, measurements and yes/no evaluations in the SR), and the
  check that it fits the source;
- ``references``: the Source Image Sequence item, the patient/study attributes copied from the
  source, references fixed after highdicom, Instance Number;
- ``equipment``: the model as Contributing Equipment (IHE AI Results), the pacs-xai version;
- ``descriptions``: the disclaimer, Derivation and Series Description;
- ``orientation``: Patient Orientation, Body Part Examined and Laterality from the source;
- ``geometry``: the source frame's patient geometry, or a synthetic one for projection images;
- ``source_view``: what highdicom is given instead of the source (no person names; a
  single-frame stand-in).

Deterministic UIDs come from :mod:`dicom_io.uids`, value-length limits from :mod:`dicom_io.vr`.
"""

from dicom_io.output_kinds import OUTPUT_KINDS
from dicom_io.writers.overlay import render_overlay, save_png
from dicom_io.writers.pm import build_parametric_map
from dicom_io.writers.result import ExplanationResult, FindingStatus, OutOfDistributionSignal, ShortcutSignal
from dicom_io.writers.sc import build_secondary_capture
from dicom_io.writers.seg import build_segmentation, top_region_mask
from dicom_io.writers.sr import ReportFrame, build_findings_report, build_report

__all__ = [
    "OUTPUT_KINDS",
    "ExplanationResult",
    "FindingStatus",
    "OutOfDistributionSignal",
    "ReportFrame",
    "ShortcutSignal",
    "build_findings_report",
    "build_parametric_map",
    "build_report",
    "build_secondary_capture",
    "build_segmentation",
    "render_overlay",
    "save_png",
    "top_region_mask",
]
