"""Which equipment made an output: the model as Contributing Equipment (IHE AI Results) and the
pacs-xai software version."""

from __future__ import annotations

from importlib import metadata

import highdicom as hd
from pydicom import Dataset

from dicom_io.codes import PURPOSE_PROCESSING_EQUIPMENT
from dicom_io.vr import LO_MAX, ST_MAX

__all__ = ["algorithm_equipment", "pacs_xai_version", "set_capture_equipment"]


def pacs_xai_version() -> str:
    """Installed version of the pacs-xai distribution, "0.1.0" when it runs from a source tree."""
    try:
        return metadata.version("pacs-xai")
    except metadata.PackageNotFoundError:
        return "0.1.0"


def algorithm_equipment(
    model_name: str,
    model_version: str,
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
        manufacturer_model_name=model_name,
        software_versions=[model_version, f"pacs-xai {software_version}"[:LO_MAX]],
        contribution_description=contribution[:ST_MAX],
    )
    item.DeviceUID = device_uid
    return item


def set_capture_equipment(sc: Dataset, *, manufacturer: str, software_version: str) -> None:
    """SC Equipment module of a Secondary Capture pacs-xai drew: Conversion Type WSD (workstation)
    and pacs-xai as the capture device (manufacturer, model name, software version; Type 3, but
    viewers show it)."""
    sc.ConversionType = "WSD"
    sc.SecondaryCaptureDeviceManufacturer = manufacturer
    sc.SecondaryCaptureDeviceManufacturerModelName = "pacs-xai"
    sc.SecondaryCaptureDeviceSoftwareVersions = software_version
