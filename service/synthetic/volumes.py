"""Synthetic chest CT volumes with known findings: the demo volume model's data and ground truth.

Each phantom is an axial chest CT in Hounsfield units: air outside an elliptic body (soft tissue,
with subcutaneous fat), two lungs (aerated parenchyma with a few vessels), a heart between them,
a vertebral body and the table, and scanner noise. Two classes:

- ``normal``: nothing else;
- ``nodule``: a round dense (calcified, 500 to 900 HU) lesion of radius 7 to 12 mm inside one
  lung, with its 3D ground-truth mask (boolean ``[slices, rows, columns]``, on the phantom's own voxel grid).

:func:`ct_series` writes a phantom as a CT series, one CT Image Storage instance per slice with
the Image Plane module (Image Position/Orientation (Patient), Pixel Spacing, Slice Thickness,
Spacing Between Slices) and the CT Image module's Rescale Slope/Intercept (stored value - 1024 =
HU), the way a scanner does; instance numbers run from head to feet while positions rise from
feet to head, so a reader has to sort by position. Everything is a pure function of ``(seed,
index)``; patients are synthetic (``PHANTOM^Cnnnnn``).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from service.synthetic.shapes import squared_elliptic_radius

VOLUME_CLASSES: tuple[str, ...] = ("normal", "nodule")
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
#: Stored value = HU + this (Rescale Intercept -1024, slope 1), 12 bits stored.
HU_OFFSET = 1024
#: The phantom's native grid: (slices, rows, columns) and spacing (mm between slices, rows, columns).
NATIVE_SHAPE: tuple[int, int, int] = (48, 96, 96)
NATIVE_SPACING: tuple[float, float, float] = (2.5, 2.0, 2.0)

AIR, FAT, SOFT_TISSUE, LUNG, BONE, BLOOD = -1000.0, -90.0, 40.0, -840.0, 650.0, 45.0
#: A dense (calcified) nodule: as bright as bone in a lung window, far brighter than vessels.
NODULE_HU = (500.0, 900.0)


@dataclass(frozen=True)
class CtPhantom:
    """One synthetic chest CT: HU volume, class label and lesion mask on the same voxel grid."""

    hu: np.ndarray  # float32 [slices, rows, columns], Hounsfield units
    label: str
    lesion_mask: np.ndarray  # bool [slices, rows, columns]; all False for "normal"
    lungs: np.ndarray  # bool [slices, rows, columns]
    spacing: tuple[float, float, float]
    index: int
    seed: int


def make_ct_phantom(
    index: int,
    label: str,
    *,
    seed: int = 0,
    shape: tuple[int, int, int] = NATIVE_SHAPE,
    spacing: tuple[float, float, float] = NATIVE_SPACING,
) -> CtPhantom:
    """Build CT phantom number ``index`` of class ``label`` deterministically from ``(seed, index)``.

    Sizes are in mm, so another ``shape``/``spacing`` gives the same anatomy sampled differently.
    """
    if label not in VOLUME_CLASSES:
        raise ValueError(f"unknown CT phantom class {label!r}; choose one of {', '.join(VOLUME_CLASSES)}")
    if min(shape) < 8:
        raise ValueError(f"CT phantoms need at least 8 voxels per axis, got {shape}")
    rng = np.random.default_rng([seed, index, VOLUME_CLASSES.index(label), 3])
    z, y, x = _coordinates(shape, spacing)  # mm from the volume's centre
    half_y = shape[1] * spacing[1] / 2
    half_x = shape[2] * spacing[2] / 2
    body_ry, body_rx = half_y * rng.uniform(0.62, 0.72), half_x * rng.uniform(0.80, 0.88)
    body_cy = rng.uniform(-4, 4)
    y_body = y - body_cy  # mm from the body's centre, positive towards the back (rows)
    body = squared_elliptic_radius((y_body, x), (0.0, 0.0), (body_ry, body_rx))
    hu = np.full(shape, AIR, dtype=np.float32)
    hu[body < 1] = FAT
    hu[body < 0.82] = SOFT_TISSUE
    # lungs: two ellipsoids that taper towards the apex (top slices) and the diaphragm
    length = shape[0] * spacing[0]
    lungs = np.zeros(shape, dtype=bool)
    lung_rx, lung_ry = body_rx * rng.uniform(0.30, 0.36), body_ry * rng.uniform(0.62, 0.72)
    lung_rz = length * rng.uniform(0.42, 0.5)
    lung_cz = rng.uniform(-0.05, 0.05) * length
    for side in (-1, 1):
        cx = side * body_rx * rng.uniform(0.42, 0.48)
        lungs |= squared_elliptic_radius((x, y_body, z), (cx, -4.0, lung_cz), (lung_rx, lung_ry, lung_rz)) < 1
    heart_centre = (body_rx * 0.1, -(body_ry * 0.2), -(length * 0.15))
    heart_radii = (body_rx * 0.28, body_ry * 0.38, length * 0.3)
    heart = squared_elliptic_radius((x, y_body, z), heart_centre, heart_radii) < 1
    lungs &= ~heart
    hu[lungs] = LUNG + rng.normal(0, 25, size=int(lungs.sum())).astype(np.float32)
    hu[heart & (body < 0.82)] = BLOOD
    spine = squared_elliptic_radius((x, y_body), (0.0, body_ry * 0.62), (body_rx * 0.14, body_ry * 0.16)) < 1
    hu[spine] = BONE
    table = (y > body_cy + body_ry + 6) & (y < body_cy + body_ry + 12) & (np.abs(x) < half_x * 0.95)
    hu[table] = 200.0
    # vessels: a few bright tubes running through the lungs along z
    for _ in range(int(rng.integers(6, 10))):
        vx, vy = rng.uniform(-body_rx * 0.7, body_rx * 0.7), body_cy + rng.uniform(-lung_ry * 0.7, lung_ry * 0.7)
        radius = rng.uniform(1.5, 3.0)
        tube = ((x - vx) ** 2 + (y - vy) ** 2 < radius**2) & lungs
        hu[tube] = BLOOD
    mask = np.zeros(shape, dtype=bool)
    if label == "nodule":
        mask = _nodule(rng, hu, lungs, (z, y, x))
    hu = ndimage.gaussian_filter(hu, sigma=0.6) + rng.normal(0, 12, size=shape).astype(np.float32)
    return CtPhantom(
        hu=hu.astype(np.float32),
        label=label,
        lesion_mask=mask,
        lungs=lungs,
        spacing=spacing,
        index=index,
        seed=seed,
    )


def _coordinates(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> tuple[np.ndarray, ...]:
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    return tuple(a.astype(np.float32) for a in np.meshgrid(*axes, indexing="ij"))


def _nodule(rng: np.random.Generator, hu: np.ndarray, lungs: np.ndarray, grid: tuple[np.ndarray, ...]) -> np.ndarray:
    """A soft-tissue sphere fully inside a lung (eroded by its radius); writes it into ``hu``."""
    z, y, x = grid
    radius = rng.uniform(7.0, 12.0)
    inside = np.argwhere(lungs)
    for _ in range(200):
        cz, cy, cx = inside[int(rng.integers(len(inside)))]
        centre = (z[cz, cy, cx], y[cz, cy, cx], x[cz, cy, cx])
        distance = np.sqrt((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2)
        sphere = distance < radius
        if np.all(lungs[distance < radius + 2.0]):
            break
    hu[sphere] = rng.uniform(*NODULE_HU)
    return sphere


# --- DICOM ------------------------------------------------------------------------------------------


def ct_series(phantom: CtPhantom, *, study_uid: str | None = None, series_uid: str | None = None) -> list[Dataset]:
    """The phantom as a CT series, one dataset per slice, in instance-number order (head first)."""
    key = f"pacs-xai-ct-phantom-{phantom.seed}-{phantom.index}"
    study_uid = study_uid or generate_uid(entropy_srcs=[key, "study"])
    series_uid = series_uid or generate_uid(entropy_srcs=[key, "series"])
    frame_of_reference = generate_uid(entropy_srcs=[key, "frame-of-reference"])
    slices, rows, columns = phantom.hu.shape
    dz, dy, dx = phantom.spacing
    stored = np.clip(np.rint(phantom.hu + HU_OFFSET), 0, 4095).astype(np.uint16)
    # Patient coordinates (LPS): columns run to the patient's left (+x), rows to posterior (+y),
    # slice k (feet to head) at z = z0 + k * dz.
    x0, y0, z0 = -(columns - 1) / 2 * dx, -(rows - 1) / 2 * dy, -(slices - 1) / 2 * dz
    datasets = []
    for k in reversed(range(slices)):  # head first, as scanners number them
        ds = _ct_dataset(phantom, key, k)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_of_reference
        ds.InstanceNumber = slices - k
        ds.ImagePositionPatient = [round(x0, 4), round(y0, 4), round(z0 + k * dz, 4)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = round(z0 + k * dz, 4)
        ds.PixelSpacing = [dy, dx]
        ds.SliceThickness = dz
        ds.SpacingBetweenSlices = dz
        ds.Rows, ds.Columns = rows, columns
        ds.PixelData = stored[k].tobytes()
        datasets.append(ds)
    return datasets


def write_ct_series(out_dir: str | Path, phantom: CtPhantom, **uids: str) -> list[Path]:
    """Write :func:`ct_series` into ``out_dir`` (``slice-NNN.dcm`` by instance number); the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in ct_series(phantom, **uids):
        path = out / f"slice-{int(ds.InstanceNumber):03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _ct_dataset(phantom: CtPhantom, key: str, k: int) -> Dataset:
    index = phantom.index
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[key, "instance", str(k)])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    day = _dt.date(2026, 2, 1) + _dt.timedelta(days=index % 300)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = f"PHANTOM^C{index:05d}"
    ds.PatientID = f"PXCT{phantom.seed:02d}{index:05d}"
    ds.PatientBirthDate = f"{1945 + index % 50}0101"
    ds.PatientSex = "MF"[index % 2]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = day.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = f"{9 + index % 9:02d}{index % 60:02d}00"
    ds.AccessionNumber = f"ACT{phantom.seed:02d}{index:06d}"
    ds.StudyID = f"{index + 1}"
    ds.ReferringPhysicianName = "DEMO^REFERRER"
    ds.StudyDescription = "CT CHEST (phantom)"
    ds.Manufacturer = "pacs-xai phantom generator"
    ds.InstitutionName = "pacs-xai demo"
    ds.Modality = "CT"
    ds.SeriesNumber = 2
    ds.SeriesDescription = "CHEST AXIAL"
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "FFS"
    ds.PositionReferenceIndicator = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.AcquisitionNumber = 1
    ds.KVP = 120
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -HU_OFFSET
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = -600
    ds.WindowWidth = 1500
    ds.BurnedInAnnotation = "NO"
    return ds
