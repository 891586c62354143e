"""A real Orthanc (Debian package) as the PACS in end-to-end tests, on loopback ports.

The product's :class:`service.tools.orthanc.OrthancProcess` (the one ``pacs-xai viewer`` runs), without
the DICOMweb plugin; a missing or failing Orthanc fails the test with what to install.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from service.tools.orthanc import OrthancError, OrthancProcess


class Orthanc(OrthancProcess):
    """Orthanc for a test: plain DICOM + REST, started in ``folder``."""

    def __init__(self, folder: Path, *, ae_title: str = "ORTHANC") -> None:
        try:
            super().__init__(folder, ae_title=ae_title, dicomweb=False)
        except OrthancError as exc:
            pytest.fail(f"{exc} (or run `make system-deps`)")
