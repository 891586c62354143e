"""The output kinds a site can choose (config ``outputs:``, ``pacs-xai explain --outputs``).

A module of its own, without the writers, so what only validates a configuration (a receiver
process) does not load highdicom and the drawing code.
"""

from __future__ import annotations

__all__ = ["OUTPUT_KINDS"]

#: Secondary Capture, Parametric Map, Segmentation (fractional, binary), Structured Report.
OUTPUT_KINDS: tuple[str, ...] = ("sc", "pm", "seg_fractional", "seg_binary", "sr")
