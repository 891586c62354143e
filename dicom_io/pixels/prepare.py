"""Every frame of a DICOM image as model input and display frame: the whole pixel path in one call.

Per frame: decode (:mod:`.decode`), grayscale through Modality LUT and VOI (:mod:`.voi`) or
colour to RGB / BT.601 luminance (:mod:`.colour`), then onto the model grid (:mod:`.grid`).
Grayscale frames are replicated when the model wants three channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydicom

from dicom_io.errors import DicomInputError
from dicom_io.pixels.colour import bt601_luminance, colour_to_unit_rgb
from dicom_io.pixels.decode import (
    GRAYSCALE,
    decoded_frames,
    describe_dataset,
    has_pixel_data,
    image_shape,
    number_of_frames,
    photometric_interpretation,
    sop_class_name,
)
from dicom_io.pixels.grid import GridMapping
from dicom_io.pixels.spec import InputSpec
from dicom_io.pixels.voi import window_to_unit

__all__ = ["PreparedFrame", "prepare_frames"]


@dataclass(frozen=True)
class PreparedFrame:
    """One source frame ready for the model.

    frame_index: 0-based frame number in the source (multi-frame images have several).
    model_input: float32 [C, H, W] in [0, 1], 1 = bright as displayed (MONOCHROME1 already
        inverted), before the model card's mean/std normalisation.
    display: float32 [rows, cols] in [0, 1], the windowed grayscale frame on the source grid
        (what an overlay is drawn on).
    mapping: geometry between the source grid and the model grid.
    """

    frame_index: int
    model_input: np.ndarray
    display: np.ndarray
    mapping: GridMapping


def prepare_frames(ds: pydicom.Dataset, spec: InputSpec) -> list[PreparedFrame]:
    """Every frame of a single- or multi-frame image as model input plus display frame.

    Raises DicomInputError (bad or undecodable data) or UnsupportedImageError (a form of image
    pacs-xai does not handle, such as an unknown Photometric Interpretation).
    """
    where = describe_dataset(ds)
    if not has_pixel_data(ds):
        raise DicomInputError(
            f"{where}: no Pixel Data (7FE0,0010) in this {sop_class_name(ds)} object; "
            "only image objects can be classified"
        )
    photometric = photometric_interpretation(ds, where)
    rows, cols = image_shape(ds, where)
    expected_frames = number_of_frames(ds, where)
    mapping = GridMapping.for_shapes((rows, cols), (spec.rows, spec.columns), spec.aspect)

    frames: list[PreparedFrame] = []
    for index, (array, meta) in enumerate(decoded_frames(ds, expected_frames, where)):
        if photometric in GRAYSCALE:
            if array.shape != (rows, cols):
                raise DicomInputError(
                    f"{where}: frame {index} decoded to shape {array.shape}, expected "
                    f"({rows}, {cols}) from Rows/Columns; the header does not match the pixel data"
                )
            unit = window_to_unit(ds, array, spec, frame_index=index)
            display = unit
            planes = [mapping.to_model_grid(unit)] * spec.channels
        else:
            rgb = colour_to_unit_rgb(ds, array, meta, photometric, (rows, cols), index, where)
            display = bt601_luminance(rgb)
            if spec.channels == 1:
                planes = [mapping.to_model_grid(display)]
            else:
                planes = [mapping.to_model_grid(rgb[..., c]) for c in range(3)]
        model_input = np.clip(np.stack(planes, axis=0), 0.0, 1.0).astype(np.float32, copy=False)
        display = np.clip(display, 0.0, 1.0).astype(np.float32, copy=False)
        frames.append(PreparedFrame(index, model_input, display, mapping))

    if len(frames) != expected_frames:
        raise DicomInputError(
            f"{where}: Number of Frames (0028,0008) says {expected_frames} but "
            f"{len(frames)} frame(s) were decoded; the file is damaged: resend the original"
        )
    return frames
