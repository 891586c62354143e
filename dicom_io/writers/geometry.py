"""Where the frame of a multi-frame output (Parametric Map, Segmentation) lies in patient space.

The source frame's own geometry (Frame of Reference, Image Position and Orientation (Patient),
Pixel Spacing and Slice Thickness in mm) when it has one, else a deterministic synthetic one for
frames without (projection radiographs): its own Frame of Reference, origin (0, 0, 0), the plane
viewers give such a source, the source's spacing or a nominal 1 mm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydicom import Dataset

from dicom_io.uids import derived_frame_of_reference_uid

__all__ = [
    "NOMINAL_PIXEL_SPACING_MM",
    "NOMINAL_SLICE_THICKNESS_MM",
    "VIEWER_DEFAULT_ORIENTATION",
    "FrameGeometry",
    "drop_assumed_slice_spacing",
    "frame_functional_groups",
    "pixel_spacing",
    "source_frame_geometry",
    "synthetic_frame_geometry",
    "synthetic_geometry_note",
]

#: Pixel spacing written when the source states none (or zeros): 1 mm, nominal. The objects still
#: map pixel-for-pixel onto the referenced source frame, which is what viewers use for a projection
#: radiograph.
NOMINAL_PIXEL_SPACING_MM = 1.0

#: Slice Thickness written into a Segmentation's synthetic geometry: 1 mm, nominal (a projection has
#: no slice). A Segmentation with a Frame of Reference needs one (dciodvfy: Type 1C in Pixel
#: Measures), and highdicom 0.28.2's ``segread`` refuses Pixel Measures without it.
NOMINAL_SLICE_THICKNESS_MM = 1.0

#: Image Orientation (Patient) that viewers give an image which has none (a projection radiograph):
#: rows along +x, columns along +y. Cornerstone3D, hence OHIF 3.x, uses it (with Image Position
#: (0, 0, 0)) for the source, and overlays a Parametric Map or Segmentation only when the overlay's
#: orientation equals the source's ("... oblique to the acquisition plane of the source data are
#: not yet supported" otherwise). A synthetic geometry therefore uses the same plane.
VIEWER_DEFAULT_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@dataclass(frozen=True)
class FrameGeometry:
    """Where one frame lies in a patient coordinate system (the Plane Position/Orientation and
    Pixel Measures of a multi-frame IOD).

    ``synthetic`` marks a geometry made up for a source frame that has none (a projection
    radiograph): its own Frame of Reference UID, origin at (0, 0, 0), the orientation viewers
    assume for such a source. See :func:`synthetic_frame_geometry`.
    """

    frame_of_reference_uid: str
    image_position: tuple[float, float, float]
    image_orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]
    slice_thickness: float | None
    synthetic: bool = False


def _positive_pair(value: object) -> tuple[float, float] | None:
    """(row, column) spacing from a 2-valued DS attribute when both values are > 0, else None."""
    try:
        pair = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    if len(pair) != 2 or not all(math.isfinite(v) and v > 0 for v in pair):
        return None
    return pair  # type: ignore[return-value]


def frame_functional_groups(source: Dataset, frame_index: int) -> list[Dataset]:
    """Functional group items that apply to a frame: its per-frame item first, then the shared one."""
    groups: list[Dataset] = []
    per_frame = source.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame_index < len(per_frame):
        groups.append(per_frame[frame_index])
    shared = source.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    return groups


def _group_value(source: Dataset, frame_index: int, sequence: str, keyword: str) -> object | None:
    """``keyword`` at the top level of ``source``, else in the frame's functional ``sequence``."""
    if source.get(keyword) not in (None, ""):
        return source.get(keyword)
    for group in frame_functional_groups(source, frame_index):
        items = group.get(sequence)
        if items and items[0].get(keyword) not in (None, ""):
            return items[0].get(keyword)
    return None


def pixel_spacing(source: Dataset, frame_index: int = 0) -> tuple[float, float] | None:
    """Spacing (row, column) in mm of the source frame, ``None`` when the source does not state one.

    Pixel Spacing (top level or Pixel Measures functional group) when both values are > 0; else
    Imager Pixel Spacing (the detector plane, for CR/DX without a calibrated Pixel Spacing). A
    value of zero (e.g. "0\\\\0" in older CR files) counts as not stated.
    """
    for value in (
        _group_value(source, frame_index, "PixelMeasuresSequence", "PixelSpacing"),
        source.get("ImagerPixelSpacing"),
    ):
        pair = _positive_pair(value) if value is not None else None
        if pair is not None:
            return pair
    return None


def source_frame_geometry(source: Dataset, frame_index: int = 0) -> FrameGeometry | None:
    """The source frame's own patient geometry, ``None`` unless it is complete.

    Complete means a Frame of Reference UID, Image Position and Image Orientation (Patient) for
    the frame (top level for single-frame images, functional groups for multi-frame ones) and a
    Pixel Spacing > 0. Projection radiographs (no Frame of Reference) and multi-frame images
    without plane positions (e.g. pydicom's emri_small.dcm) have none.
    """
    frame_of_reference = source.get("FrameOfReferenceUID")
    position = _group_value(source, frame_index, "PlanePositionSequence", "ImagePositionPatient")
    orientation = _group_value(source, frame_index, "PlaneOrientationSequence", "ImageOrientationPatient")
    spacing = _positive_pair(_group_value(source, frame_index, "PixelMeasuresSequence", "PixelSpacing"))
    if not frame_of_reference or position is None or orientation is None or spacing is None:
        return None
    try:
        ipp = tuple(float(v) for v in position)  # type: ignore[union-attr]
        iop = tuple(float(v) for v in orientation)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    if len(ipp) != 3 or len(iop) != 6:
        return None
    thickness = _group_value(source, frame_index, "PixelMeasuresSequence", "SliceThickness")
    try:
        slice_thickness = float(thickness) if thickness not in (None, "") else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        slice_thickness = None
    return FrameGeometry(str(frame_of_reference), ipp, iop, spacing, slice_thickness)  # type: ignore[arg-type]


def synthetic_frame_geometry(
    source: Dataset, frame_index: int = 0, *, slice_thickness: float | None = None
) -> FrameGeometry:
    """A patient geometry for a source frame that has none (projection radiographs, bare frames).

    - Frame of Reference: :func:`dicom_io.uids.derived_frame_of_reference_uid` of the source
      frame (never the source's own, since nothing here is positioned in it); Position Reference
      Indicator stays empty.
    - Image Position (Patient): (0, 0, 0), nominal.
    - Image Orientation (Patient): :data:`VIEWER_DEFAULT_ORIENTATION` (1\\\\0\\\\0\\\\0\\\\1\\\\0), the plane viewers
      put a source without one in, so that the output lies on the source there. Not the directions
      of the source's Patient Orientation (e.g. "L\\\\F" would give 1\\\\0\\\\0\\\\0\\\\0\\\\-1): OHIF 3.x
      refuses to overlay a map whose plane differs from the one it gives the source. The
      anatomical directions stay in the output's Patient Orientation, copied from the source.
    - Pixel Spacing: :func:`pixel_spacing` of the source, else :data:`NOMINAL_PIXEL_SPACING_MM`.
    - Slice Thickness: ``slice_thickness`` (default none: a projection has no slice; a
      Segmentation passes :data:`NOMINAL_SLICE_THICKNESS_MM`).
    """
    spacing = pixel_spacing(source, frame_index) or (NOMINAL_PIXEL_SPACING_MM, NOMINAL_PIXEL_SPACING_MM)
    return FrameGeometry(
        frame_of_reference_uid=derived_frame_of_reference_uid(str(source.SOPInstanceUID), frame_index),
        image_position=(0.0, 0.0, 0.0),
        image_orientation=VIEWER_DEFAULT_ORIENTATION,
        pixel_spacing=spacing,
        slice_thickness=slice_thickness,
        synthetic=True,
    )


def synthetic_geometry_note(geometry: FrameGeometry, own: str) -> str:
    """Image Comments (0020,4000) of an output whose geometry is synthetic, saying so.

    ``own`` names what is the output's own, e.g. "this map's Frame of Reference, position and
    orientation"; the text adds the pixel spacing in mm and that the output still lies pixel for
    pixel on the referenced source frame.
    """
    spacing = "\\".join(f"{value:g}" for value in geometry.pixel_spacing)
    return (
        "The source frame has no patient geometry (projection image or frame without plane position): "
        f"{own} are its own and nominal (pixel spacing {spacing}); "
        "it is aligned pixel for pixel with the referenced source frame."
    )


def drop_assumed_slice_spacing(obj: Dataset) -> None:
    """Remove the Spacing Between Slices that highdicom assumes (1 mm) for a single-frame output.

    An output of one source frame has one plane: there is no spacing between slices to state
    (the source's own value, if any, describes the source's stack, not this object).
    """
    for group in obj.get("SharedFunctionalGroupsSequence") or []:
        for measures in group.get("PixelMeasuresSequence") or []:
            if "SpacingBetweenSlices" in measures:
                del measures.SpacingBetweenSlices
