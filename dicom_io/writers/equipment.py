"""Which equipment made an output: the model as Contributing Equipment (IHE AI Results) and the
pacs-xai software version."""

from __future__ import annotations

from importlib import metadata

import highdicom as hd
from pydicom import Dataset

from dicom_io.codes import PURPOSE_PROCESSING_EQUIPMENT
from dicom_io.vr import LO_MAX, ST_MAX

__all__ = [
    "algorithm_equipment",
    "device_arguments",
    "enhanced_device_arguments",
    "pacs_xai_version",
    "set_capture_equipment",
]


def pacs_xai_version() -> str:
    """Installed version of the pacs-xai distribution, "0.1.0" when it runs from a source tree."""
    try:
        return metadata.version("pacs-xai")
    except metadata.PackageNotFoundError:
        return "0.1.0"


def device_arguments(manufacturer: str, software_version: str) -> dict[str, str]:
    """highdicom's arguments naming pacs-xai as the device that wrote an object (General
    Equipment): Manufacturer, Manufacturer's Model Name "pacs-xai", Software Versions."""
    return {"manufacturer": manufacturer, "manufacturer_model_name": "pacs-xai", "software_versions": software_version}


def enhanced_device_arguments(
    manufacturer: str, software_version: str, device_serial_number: str | None
) -> dict[str, str]:
    """:func:`device_arguments` and the Device Serial Number that Enhanced General Equipment makes
    Type 1 (Parametric Map, Segmentation): this installation's, or the software version."""
    return {
        **device_arguments(manufacturer, software_version),
        "device_serial_number": device_serial_number or software_version,
    }


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
