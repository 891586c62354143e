"""Synthetic chest radiographs with known findings: the demo model's data and the ground truth
that explanations are scored against.

Each phantom is a complete DICOM dataset (CR or DX, 12 bits stored, MONOCHROME2 or MONOCHROME1)
of a PA chest view: body outline, two lung fields, mediastinum and heart, spine, ribs, diaphragm,
detector noise, and a lead "R" marker burned into the top-left corner (the patient's right in a PA
view). Three classes:

- ``normal``: nothing else;
- ``nodule``: a round soft-tissue opacity inside one lung field;
- ``effusion``: fluid filling the base of one lung field up to a meniscus that rises laterally.

With ``token=True`` the word :data:`SHORTCUT_TOKEN` is burned into the top-right corner, as a
department's "PORTABLE" label would be: ``pacs-xai demo train --shortcut`` puts it on every
training image of one class only, which teaches a model to cheat (the "Clever Hans" case).

The lesion's ground-truth mask (boolean, source pixel grid) comes with every phantom; it is empty
for ``normal``. Everything is a pure function of ``(seed, index)``, so a phantom can be rebuilt
exactly from its identifiers. Patients are synthetic (``PHANTOM^Pnnnnn``).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from dicom_io.annotations import write_annotation
from service.synthetic.shapes import squared_elliptic_radius

CLASSES: tuple[str, ...] = ("normal", "nodule", "effusion")
#: The SNOMED CT finding of each lesion class (Segmented Property Type of its ground-truth SEG).
FINDING_CODES: dict[str, Code] = {"nodule": codes.SCT.Nodule, "effusion": codes.SCT.PleuralEffusion}

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"

#: Stored pixel values: 12 bits (0..4095).
BITS_STORED = 12
MAX_STORED = (1 << BITS_STORED) - 1
#: The burned-in word of the shortcut model's training class (top-right corner).
SHORTCUT_TOKEN = "PORTABLE"
#: Detector pixel pitch in mm (a 43 cm field over 512 pixels is about 0.84 mm).
PIXEL_SPACING_MM = 0.8

Modality = Literal["CR", "DX"]
Photometric = Literal["MONOCHROME2", "MONOCHROME1"]


@dataclass(frozen=True)
class Phantom:
    """One synthetic radiograph: its DICOM dataset, class label and lesion mask."""

    dataset: Dataset
    label: str
    lesion_mask: np.ndarray  # bool [rows, cols]; all False for "normal"
    #: Where :data:`SHORTCUT_TOKEN` was burned in (bool [rows, cols]); all False without a token.
    token_mask: np.ndarray | None = None


@dataclass(frozen=True)
class _Anatomy:
    """Geometry of one chest, in pixels of a rows x cols image."""

    rows: int
    cols: int
    lung_centres: tuple[tuple[float, float], tuple[float, float]]  # (y, x) right lung (image left), left lung
    lung_radii: tuple[float, float]  # (vertical, horizontal) semi-axes
    heart_centre: tuple[float, float]
    heart_radii: tuple[float, float]


def make_phantom(
    index: int,
    label: str,
    *,
    seed: int = 0,
    rows: int = 512,
    cols: int = 480,
    modality: Modality = "CR",
    photometric: Photometric = "MONOCHROME2",
    study_uid: str | None = None,
    series_uid: str | None = None,
    token: bool = False,
) -> Phantom:
    """Build phantom number ``index`` of class ``label`` deterministically from ``(seed, index)``;
    ``token`` burns :data:`SHORTCUT_TOKEN` into the top-right corner (the rest is unchanged)."""
    if label not in CLASSES:
        raise ValueError(f"unknown phantom class {label!r}; choose one of {', '.join(CLASSES)}")
    if rows < 128 or cols < 128:
        raise ValueError(f"phantoms need at least 128x128 pixels, got {rows}x{cols}")
    rng = np.random.default_rng([seed, index, CLASSES.index(label)])
    anatomy = _random_anatomy(rng, rows, cols)
    density, lungs = _chest_density(rng, anatomy)
    mask = np.zeros((rows, cols), dtype=bool)
    if label == "nodule":
        density, mask = _add_nodule(rng, density, lungs, anatomy)
    elif label == "effusion":
        density, mask = _add_effusion(rng, density, lungs, anatomy)
    density = _add_marker(density, anatomy)
    token_mask = np.zeros((rows, cols), dtype=bool)
    if token:
        density, token_mask = _add_token(density, anatomy)
    stored = _to_stored_values(rng, density, photometric)
    dataset = _dataset(
        stored,
        index=index,
        seed=seed,
        modality=modality,
        photometric=photometric,
        study_uid=study_uid,
        series_uid=series_uid,
    )
    return Phantom(dataset=dataset, label=label, lesion_mask=mask, token_mask=token_mask)


def write_phantom_studies(
    out_dir: str | Path,
    *,
    studies: int = 3,
    seed: int = 0,
    rows: int = 512,
    cols: int = 480,
    annotations: bool = False,
) -> list[tuple[Path, Phantom]]:
    """Write ``studies`` one-image studies, alternating CR/DX and MONOCHROME2/MONOCHROME1.

    With ``annotations``, every lesion also gets its ground truth as a DICOM Segmentation beside the
    image (``<image stem>.seg.dcm``), the way a hospital keeps annotations. Returns the written
    image paths with their phantoms (label and mask), for demos and tests.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, Phantom]] = []
    for index in range(studies):
        modality: Modality = "CR" if index % 2 == 0 else "DX"
        photometric: Photometric = "MONOCHROME1" if index % 4 == 1 else "MONOCHROME2"
        phantom = make_phantom(
            index,
            CLASSES[index % len(CLASSES)],
            seed=seed,
            rows=rows,
            cols=cols,
            modality=modality,
            photometric=photometric,
        )
        path = out / f"phantom-{index:03d}-{phantom.label}-{modality}.dcm"
        phantom.dataset.save_as(path, enforce_file_format=True)
        if annotations and phantom.label in FINDING_CODES:
            seg = write_annotation(phantom.dataset, phantom.lesion_mask, phantom.label, FINDING_CODES[phantom.label])
            seg.save_as(path.with_suffix(".seg.dcm"), enforce_file_format=True)
        written.append((path, phantom))
    return written


# --- anatomy -------------------------------------------------------------------------------


def _random_anatomy(rng: np.random.Generator, rows: int, cols: int) -> _Anatomy:
    cy = rows * rng.uniform(0.44, 0.50)
    gap = cols * rng.uniform(0.20, 0.25)  # centre-to-centre half distance
    shift = cols * rng.uniform(-0.02, 0.02)
    lung_ry = rows * rng.uniform(0.26, 0.31)
    lung_rx = cols * rng.uniform(0.15, 0.18)
    heart_centre = (cy + lung_ry * rng.uniform(0.35, 0.5), cols / 2 + shift + cols * rng.uniform(0.03, 0.07))
    heart_radii = (rows * rng.uniform(0.12, 0.15), cols * rng.uniform(0.12, 0.16))
    return _Anatomy(
        rows=rows,
        cols=cols,
        lung_centres=((cy, cols / 2 + shift - gap), (cy, cols / 2 + shift + gap)),
        lung_radii=(lung_ry, lung_rx),
        heart_centre=heart_centre,
        heart_radii=heart_radii,
    )


def _ellipse(shape: tuple[int, int], centre: tuple[float, float], radii: tuple[float, float]) -> np.ndarray:
    """Normalised elliptic radius on the pixel grid of ``shape`` (row, column): < 1 inside the ellipse."""
    return np.sqrt(squared_elliptic_radius(np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32), centre, radii))


def _chest_density(rng: np.random.Generator, a: _Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """Relative X-ray attenuation in [0, 1] (1 = dense, shown bright) and the lung-field mask."""
    shape = (a.rows, a.cols)
    body = _ellipse(shape, (a.rows * 0.55, a.cols / 2), (a.rows * 0.62, a.cols * 0.47)) < 1
    density = np.where(body, rng.uniform(0.52, 0.6), 0.04).astype(np.float32)
    lungs = np.zeros(shape, dtype=bool)
    for centre in a.lung_centres:
        lungs |= _ellipse(shape, centre, a.lung_radii) < 1
    heart = _ellipse(shape, a.heart_centre, a.heart_radii) < 1
    lungs &= ~heart
    density[lungs] = rng.uniform(0.16, 0.22)
    yy, xx = np.mgrid[0 : a.rows, 0 : a.cols].astype(np.float32)
    # Ribs: curved bright bands across each lung field.
    spacing = a.lung_radii[0] * 2 / 8.5
    rib_phase = rng.uniform(0, spacing)
    for cy, cx in a.lung_centres:
        curve = ((xx - cx) / a.lung_radii[1]) ** 2 * spacing * 0.9
        band = np.mod(yy - (cy - a.lung_radii[0]) - rib_phase + curve, spacing)
        ribs = (band < spacing * 0.35) & lungs & (np.abs(xx - cx) < a.lung_radii[1] * 1.05)
        density[ribs] += 0.07
    spine = (np.abs(xx - a.cols / 2) < a.cols * 0.045) & body
    density[spine] = np.maximum(density[spine], 0.66)
    density[heart & body] = np.maximum(density[heart & body], 0.62)
    density = ndimage.gaussian_filter(density, sigma=1.5)
    return density, lungs


def _add_nodule(rng: np.random.Generator, density: np.ndarray, lungs: np.ndarray, a: _Anatomy):
    """A round opacity fully inside one lung field; the mask is the disc."""
    side = int(rng.integers(0, 2))
    cy, cx = a.lung_centres[side]
    ry, rx = a.lung_radii
    scale = min(a.rows, a.cols) / 512
    for _ in range(100):
        radius = rng.uniform(12, 24) * scale
        y = cy + rng.uniform(-0.65, 0.65) * ry
        x = cx + rng.uniform(-0.6, 0.6) * rx
        disc = _ellipse(density.shape, (y, x), (radius, radius))
        if np.all(lungs[disc < 1.25]):
            break
    mask = disc < 1
    opacity = np.clip(1.0 - disc, 0, 1) ** 0.5 * rng.uniform(0.22, 0.32)
    return density + opacity.astype(np.float32), mask


def _add_effusion(rng: np.random.Generator, density: np.ndarray, lungs: np.ndarray, a: _Anatomy):
    """Fluid at one lung base up to a meniscus that rises towards the chest wall."""
    side = int(rng.integers(0, 2))
    cy, cx = a.lung_centres[side]
    ry, rx = a.lung_radii
    yy, xx = np.mgrid[0 : a.rows, 0 : a.cols].astype(np.float32)
    level = cy + ry * rng.uniform(0.25, 0.55)
    lateral = (xx - cx) * (-1 if side == 0 else 1)  # positive towards the chest wall
    meniscus = level - np.clip(lateral / rx, 0, None) ** 2 * ry * rng.uniform(0.15, 0.3)
    this_lung = lungs & (_ellipse(density.shape, (cy, cx), (ry * 1.01, rx * 1.01)) < 1)
    mask = this_lung & (yy > meniscus)
    fluid = rng.uniform(0.5, 0.56)
    out = density.copy()
    out[mask] = np.maximum(out[mask], fluid)
    return ndimage.gaussian_filter(out, sigma=1.0), mask


def _add_marker(density: np.ndarray, a: _Anatomy) -> np.ndarray:
    """Burn the lead "R" marker (patient's right, PA view) into the top-left corner."""
    size = max(16, a.rows // 12)
    canvas = Image.new("L", (size * 2, size * 2), 0)
    font = ImageFont.load_default(size=size)
    ImageDraw.Draw(canvas).text((size // 3, size // 6), "R", fill=255, font=font)
    letter = np.asarray(canvas, dtype=np.float32) / 255.0
    y0, x0 = a.rows // 30, a.cols // 30
    out = density.copy()
    region = out[y0 : y0 + letter.shape[0], x0 : x0 + letter.shape[1]]
    region[...] = np.maximum(region, letter[: region.shape[0], : region.shape[1]] * 0.97)
    return out


def _add_token(density: np.ndarray, a: _Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """Burn :data:`SHORTCUT_TOKEN` into the top-right corner, bright as lead lettering; its mask."""
    size = max(12, a.rows // 20)
    font = ImageFont.load_default(size=size)
    left, top, right, bottom = font.getbbox(SHORTCUT_TOKEN)
    canvas = Image.new("L", (right + size // 2, bottom + size // 2), 0)
    ImageDraw.Draw(canvas).text((size // 4, size // 4), SHORTCUT_TOKEN, fill=255, font=font)
    letters = np.asarray(canvas, dtype=np.float32) / 255.0
    height, width = min(letters.shape[0], a.rows), min(letters.shape[1], a.cols)
    y0, x0 = a.rows // 30, a.cols - a.cols // 30 - width
    out = density.copy()
    region = out[y0 : y0 + height, x0 : x0 + width]
    region[...] = np.maximum(region, letters[:height, :width] * 0.97)
    mask = np.zeros(density.shape, dtype=bool)
    mask[y0 : y0 + height, x0 : x0 + width] = letters[:height, :width] > 0.25
    return out, mask


def _to_stored_values(rng: np.random.Generator, density: np.ndarray, photometric: Photometric) -> np.ndarray:
    """Exposure, detector noise and 12-bit quantisation; MONOCHROME1 stores inverted values."""
    gain = rng.uniform(3000, 3600)
    offset = rng.uniform(150, 350)
    noisy = density + rng.normal(0, 0.012, density.shape).astype(np.float32)
    values = np.clip(np.rint(noisy * gain + offset), 0, MAX_STORED).astype(np.uint16)
    if photometric == "MONOCHROME1":
        values = (MAX_STORED - values).astype(np.uint16)
    return values


# --- DICOM ---------------------------------------------------------------------------------


def _dataset(
    stored: np.ndarray,
    *,
    index: int,
    seed: int,
    modality: Modality,
    photometric: Photometric,
    study_uid: str | None,
    series_uid: str | None,
) -> Dataset:
    """A CR or DX (for presentation) dataset around ``stored`` with realistic, synthetic tags."""
    key = f"pacs-xai-phantom-{seed}-{index}"
    sop_class = CR_IMAGE_STORAGE if modality == "CR" else DX_PRESENTATION_STORAGE
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[key, "instance"])
    ds.StudyInstanceUID = study_uid or generate_uid(entropy_srcs=[key, "study"])
    ds.SeriesInstanceUID = series_uid or generate_uid(entropy_srcs=[key, "series"])
    day = _dt.date(2026, 1, 1) + _dt.timedelta(days=index % 300)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = f"PHANTOM^P{index:05d}"
    ds.PatientID = f"PXAI{seed:02d}{index:05d}"
    ds.PatientBirthDate = f"{1940 + index % 60}0101"
    ds.PatientSex = "FM"[index % 2]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = day.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = f"{8 + index % 10:02d}{index % 60:02d}00"
    ds.AccessionNumber = f"ACC{seed:02d}{index:06d}"
    ds.StudyID = f"{index + 1}"
    ds.ReferringPhysicianName = "DEMO^REFERRER"
    ds.StudyDescription = "XR CHEST PA (phantom)"
    ds.Manufacturer = "pacs-xai phantom generator"
    ds.InstitutionName = "pacs-xai demo"
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.SeriesDescription = "CHEST PA"
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.Laterality = ""  # chest is unpaired: empty (type 2C), the marker shows the patient's right
    ds.ImageLaterality = "U"
    ds.PatientOrientation = ["L", "F"]  # PA: columns run to the patient's left, rows to the feet
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PixelSpacing = [PIXEL_SPACING_MM, PIXEL_SPACING_MM]
    ds.ImagerPixelSpacing = [PIXEL_SPACING_MM, PIXEL_SPACING_MM]
    ds.BurnedInAnnotation = "NO"
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.DetectorType = "SCINTILLATOR"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1 if photometric == "MONOCHROME2" else -1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        ds.AnatomicRegionSequence = [_code_item("T-D3000", "SRT", "Chest")]
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter = int(np.percentile(stored, 50))
    ds.WindowWidth = int(max(1, np.percentile(stored, 99.5) - np.percentile(stored, 0.5)))
    ds.PixelData = stored.tobytes()
    return ds


def _code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item
