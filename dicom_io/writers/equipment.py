"""Which equipment made an output: the model as Contributing Equipment (IHE AI Results) and the
pacs-xai software version."""

from __future__ import annotations

from importlib import metadata

import highdicom as hd

from dicom_io.codes import PURPOSE_PROCESSING_EQUIPMENT
from dicom_io.vr import LO_MAX, ST_MAX
from dicom_io.writers.result import ExplanationResult

__all__ = ["algorithm_equipment", "pacs_xai_version"]


def pacs_xai_version() -> str:
    """Installed version of the pacs-xai distribution, "0.1.0" when it runs from a source tree."""
    try:
        return metadata.version("pacs-xai")
    except metadata.PackageNotFoundError:
        return "0.1.0"


def algorithm_equipment(
    result: ExplanationResult,
    *,
    manufacturer: str,
    software_version: str,
    device_uid: str,
    contribution: str,
) -> hd.ContributingEquipment:
    """Contributing Equipment Sequence (0018,A001) item for the model, as IHE AI Results asks.

    Manufacturer's Model Name = model name; Software Versions = model version and the pacs-xai
    version; Device UID identifies the trained model. Purpose of reference: see
    :data:`dicom_io.codes.PURPOSE_PROCESSING_EQUIPMENT`.
    """
    item = hd.ContributingEquipment(
        manufacturer=manufacturer,
        purpose_of_reference=PURPOSE_PROCESSING_EQUIPMENT,
        manufacturer_model_name=result.model_name,
        software_versions=[result.model_version, f"pacs-xai {software_version}"[:LO_MAX]],
        contribution_description=contribution[:ST_MAX],
    )
    item.DeviceUID = device_uid
    return item
