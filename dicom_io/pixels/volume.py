"""A CT or MR series as one volume: slices sorted along their normal, geometry checked, resampled.

PS3.3 C.7.6.2 (Image Plane): each slice's Image Position (Patient) is the centre of its first
pixel in mm, Image Orientation (Patient) the direction cosines of its rows and columns, Pixel
Spacing the distance between rows and between columns. The slice normal is ``row x column``; the
slices of a volume are sorted by their position along it (never by Instance Number, which
scanners number either way). Enhanced multi-frame CT and MR (PS3.3 C.7.6.16) carry the same
geometry per frame in the Plane Position, Plane Orientation and Pixel Measures functional groups,
and are handled the same way, frame by frame.

A series that is not one regular block of parallel slices cannot be explained as a volume, and is
refused whole with a :class:`VolumeError` naming what was found (``reason`` is a short code for
metrics): too few slices, a slice without geometry, mixed orientations, different sizes or pixel
spacings, two slices at one position, a gap (a step between neighbours that differs from the
others), slices not stacked along their normal (gantry tilt). Nothing is ever half-processed.

:class:`VolumeGrid` maps the volume onto a model's voxel grid (linear interpolation at the
model's spacing, centred, padded with a fill value) and draws model-grid maps back onto the
source slices, its exact geometric inverse. The modality values (for CT, Hounsfield units) are
kept; windowing belongs to the model card. Never imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage

from dicom_io.errors import DicomInputError
from dicom_io.pixels.decode import decoded_frames, describe_dataset, image_shape, number_of_frames
from dicom_io.pixels.voi import modality_values

__all__ = [
    "Volume",
    "VolumeError",
    "VolumeGeometry",
    "VolumeGrid",
    "assemble_volume",
    "prepare_values",
    "prepare_volume",
    "volume_slices",
]

#: Fewest slices a volume may have, unless the caller asks for another bound.
MIN_SLICES = 8
#: Two orientations are the same when their direction cosines differ by less than this.
ORIENTATION_TOLERANCE = 1e-3
#: A step between neighbouring slices is regular when it differs from the median step by less than
#: this fraction of it (or 0.01 mm): a missing slice doubles the step, and is a gap.
STEP_TOLERANCE = 0.02


class VolumeError(DicomInputError):
    """A series cannot be assembled into one volume; ``reason`` is a short code for metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class VolumeGeometry:
    """Where the voxels of a volume ``[slices, rows, columns]`` are, in patient coordinates (mm)."""

    #: Centre of voxel (0, 0, 0): the Image Position (Patient) of the first slice.
    origin: tuple[float, float, float]
    #: Image Orientation (Patient): direction of increasing column index, then of increasing row index.
    orientation: tuple[float, float, float, float, float, float]
    #: (between slices along the normal, between rows, between columns), mm.
    spacing: tuple[float, float, float]
    #: (slices, rows, columns).
    shape: tuple[int, int, int]

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal ``row x column``: the direction of increasing slice index."""
        row, column = np.asarray(self.orientation[:3]), np.asarray(self.orientation[3:])
        return np.cross(row, column)

    def slice_position(self, index: int) -> tuple[float, float, float]:
        """Image Position (Patient) of slice ``index``, mm."""
        position = np.asarray(self.origin) + index * self.spacing[0] * self.normal
        return (float(position[0]), float(position[1]), float(position[2]))


@dataclass(frozen=True)
class Volume:
    """The modality values of a series as one volume, with where each slice came from."""

    #: float32 ``[slices, rows, columns]``, modality values (CT: Hounsfield units).
    values: np.ndarray
    geometry: VolumeGeometry
    #: The source dataset of each slice, in slice order (an enhanced object appears once per frame).
    sources: tuple[Dataset, ...]
    #: The 0-based frame of each slice in its source (0 for single-frame images).
    frames: tuple[int, ...]

    @property
    def instances(self) -> tuple[Dataset, ...]:
        """The distinct source datasets, in slice order of their first slice."""
        seen: dict[int, Dataset] = {}
        for source in self.sources:
            seen.setdefault(id(source), source)
        return tuple(seen.values())


@dataclass(frozen=True)
class _Slice:
    source: Dataset
    frame: int
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    shape: tuple[int, int]


def volume_slices(datasets: Sequence[Dataset]) -> int:
    """How many slices ``datasets`` hold (frames of an enhanced object counted one by one)."""
    return sum(number_of_frames(ds, describe_dataset(ds)) for ds in datasets)


def assemble_volume(datasets: Sequence[Dataset], *, min_slices: int = MIN_SLICES) -> Volume:
    """The series ``datasets`` (any order; single-frame slices, or enhanced multi-frame objects) as
    one volume sorted along the slice normal, or a :class:`VolumeError` saying why it is not one."""
    if not datasets:
        raise VolumeError("too_few_slices", "no instances to assemble into a volume")
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) > 1:
        raise VolumeError(
            "mixed_series", f"the instances belong to {len(series)} series; assemble one series at a time"
        )
    slices = [item for ds in datasets for item in _slices_of(ds)]
    if len(slices) < min_slices:
        raise VolumeError(
            "too_few_slices",
            f"series {series.pop()} has {len(slices)} slice(s); a volume needs at least {min_slices}",
        )
    first = slices[0]
    for item in slices[1:]:
        if not np.allclose(item.orientation, first.orientation, atol=ORIENTATION_TOLERANCE):
            raise VolumeError(
                "mixed_orientation",
                f"mixed orientations: Image Orientation (Patient) {_numbers(item.orientation)} in "
                f"{_where(item)} against {_numbers(first.orientation)} in {_where(first)}",
            )
        if item.shape != first.shape:
            raise VolumeError(
                "inconsistent_size",
                f"inconsistent sizes: {item.shape[0]}x{item.shape[1]} pixels in {_where(item)} against "
                f"{first.shape[0]}x{first.shape[1]} in {_where(first)}",
            )
        if not np.allclose(item.pixel_spacing, first.pixel_spacing, rtol=1e-3):
            raise VolumeError(
                "inconsistent_spacing",
                f"inconsistent Pixel Spacing: {_numbers(item.pixel_spacing)} mm in {_where(item)} against "
                f"{_numbers(first.pixel_spacing)} mm in {_where(first)}",
            )
    row, column = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row, column)
    distances = np.array([float(item.position @ normal) for item in slices])
    order = np.argsort(distances, kind="stable")
    slices = [slices[i] for i in order]
    distances = distances[order]
    steps = np.diff(distances)
    if np.any(steps < 1e-3):
        k = int(np.argmin(steps))
        raise VolumeError(
            "duplicate_position",
            f"two slices at one position ({distances[k]:.2f} mm along the normal): {_where(slices[k])} and "
            f"{_where(slices[k + 1])}",
        )
    step = float(np.median(steps))
    irregular = np.abs(steps - step) > max(STEP_TOLERANCE * step, 0.01)
    if np.any(irregular):
        k = int(np.argmax(irregular))
        raise VolumeError(
            "gap",
            f"gap between slices: {steps[k]:.2f} mm between {_where(slices[k])} and {_where(slices[k + 1])} "
            f"where the others are {step:.2f} mm apart; resend the complete series",
        )
    origin = slices[0].position
    for k, item in enumerate(slices):
        offset = item.position - origin - (distances[k] - distances[0]) * normal
        if np.linalg.norm(offset) > max(0.05 * step, 0.05):
            raise VolumeError(
                "tilted",
                f"the slices are not stacked along their normal ({np.linalg.norm(offset):.2f} mm sideways at "
                f"{_where(item)}; gantry tilt?); resample the series to a regular grid first",
            )
    values = np.stack([_modality_frame(item) for item in slices]).astype(np.float32)
    geometry = VolumeGeometry(
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        orientation=tuple(float(v) for v in first.orientation),  # type: ignore[arg-type]
        spacing=(step, first.pixel_spacing[0], first.pixel_spacing[1]),
        shape=(len(slices), first.shape[0], first.shape[1]),
    )
    return Volume(
        values=values,
        geometry=geometry,
        sources=tuple(item.source for item in slices),
        frames=tuple(item.frame for item in slices),
    )


def _slices_of(ds: Dataset) -> list[_Slice]:
    """The slices of one dataset with their geometry: one for a single-frame image, one per frame
    of an enhanced multi-frame object (its functional groups)."""
    where = describe_dataset(ds)
    shape = image_shape(ds, where)
    frames = number_of_frames(ds, where)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame:
        shared = (ds.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
        slices = []
        for index in range(frames):
            group = per_frame[index] if index < len(per_frame) else Dataset()
            position = _from_groups(group, shared, "PlanePositionSequence", "ImagePositionPatient", where, index)
            orientation = _from_groups(
                group, shared, "PlaneOrientationSequence", "ImageOrientationPatient", where, index
            )
            spacing = _from_groups(group, shared, "PixelMeasuresSequence", "PixelSpacing", where, index)
            slices.append(_slice(ds, index, position, orientation, spacing, shape, where))
        return slices
    if frames != 1:
        raise VolumeError(
            "missing_geometry",
            f"{where} has {frames} frames but no per-frame functional groups: the position of each frame is unknown",
        )
    keywords = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
    values = [ds.get(keyword) for keyword in keywords]
    missing = [keyword for keyword, value in zip(keywords, values) if value is None]
    if missing:
        raise VolumeError(
            "missing_geometry", f"{where} has no {', '.join(missing)}: its place in the volume is unknown"
        )
    return [_slice(ds, 0, *values, shape, where)]


def _from_groups(group: Dataset, shared: Dataset, sequence: str, keyword: str, where: str, frame: int) -> object:
    for source in (group, shared):
        items = source.get(sequence)
        if items and keyword in items[0]:
            return items[0][keyword].value
    raise VolumeError(
        "missing_geometry", f"{where} frame {frame + 1}: no {keyword} in a {sequence} (per-frame or shared)"
    )


def _slice(
    ds: Dataset, frame: int, position: object, orientation: object, spacing: object, shape: tuple[int, int], where: str
) -> _Slice:
    try:
        position_array = np.asarray([float(v) for v in position], dtype=np.float64)  # type: ignore[union-attr]
        orientation_array = np.asarray([float(v) for v in orientation], dtype=np.float64)  # type: ignore[union-attr]
        spacing_values = tuple(float(v) for v in spacing)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise VolumeError("missing_geometry", f"{where}: the plane geometry is not numeric") from None
    if position_array.shape != (3,) or orientation_array.shape != (6,) or len(spacing_values) != 2:
        raise VolumeError(
            "missing_geometry",
            f"{where}: Image Position needs 3 values, Image Orientation 6 and Pixel Spacing 2; found "
            f"{len(position_array)}, {len(orientation_array)} and {len(spacing_values)}",
        )
    if min(spacing_values) <= 0:
        raise VolumeError("missing_geometry", f"{where}: Pixel Spacing {list(spacing_values)} must be positive")
    row, column = orientation_array[:3], orientation_array[3:]
    if abs(np.linalg.norm(row) - 1) > 0.01 or abs(np.linalg.norm(column) - 1) > 0.01 or abs(row @ column) > 0.01:
        raise VolumeError(
            "missing_geometry",
            f"{where}: Image Orientation (Patient) {_numbers(orientation_array)} is not two orthogonal unit vectors",
        )
    return _Slice(ds, frame, position_array, orientation_array, (spacing_values[0], spacing_values[1]), shape)


def _modality_frame(item: _Slice) -> np.ndarray:
    """Decode frame ``item.frame`` of its source and apply the modality LUT of that frame."""
    where = describe_dataset(item.source)
    frame = None
    for index, (array, _meta) in enumerate(decoded_frames(item.source, item.frame + 1, where)):
        if index == item.frame:
            frame = array
    assert frame is not None
    if frame.ndim != 2:
        raise VolumeError("not_grayscale", f"{where}: a volume needs grayscale slices, got shape {frame.shape}")
    return modality_values(item.source, frame, frame_index=item.frame)


def _where(item: _Slice) -> str:
    uid = str(item.source.get("SOPInstanceUID", "?"))
    return f"instance {uid}" + (f" frame {item.frame + 1}" if item.frame else "")


def _numbers(values: Sequence[float] | np.ndarray) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in values) + "]"


# --- the model's grid ------------------------------------------------------------------------------


@dataclass(frozen=True)
class VolumeGrid:
    """Linear map between a volume's voxels and a model's voxel grid ``shape`` at ``spacing`` (mm,
    (slice, row, column)), centre on centre: model voxel ``m`` samples source voxel
    ``scale * m + offset`` per axis, where ``scale`` is model spacing / source spacing."""

    source_shape: tuple[int, int, int]
    source_spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @classmethod
    def for_volume(cls, volume: Volume, shape: Sequence[int], spacing: Sequence[float]) -> VolumeGrid:
        if len(shape) != 3 or len(spacing) != 3 or min(shape) < 1 or min(spacing) <= 0:
            raise ValueError(f"a model grid needs 3 positive sizes and spacings, got {list(shape)} at {list(spacing)}")
        return cls(
            volume.geometry.shape,
            volume.geometry.spacing,
            (int(shape[0]), int(shape[1]), int(shape[2])),
            (float(spacing[0]), float(spacing[1]), float(spacing[2])),
        )

    @property
    def scale(self) -> np.ndarray:
        return np.asarray(self.spacing) / np.asarray(self.source_spacing)

    @property
    def offset(self) -> np.ndarray:
        centre_source = (np.asarray(self.source_shape) - 1) / 2
        centre_model = (np.asarray(self.shape) - 1) / 2
        return centre_source - self.scale * centre_model

    def to_model(self, values: np.ndarray, fill: float) -> np.ndarray:
        """The volume's values on the model grid (float32), ``fill`` outside the volume. Shrinking
        an axis smooths it first (Gaussian, sigma ``(scale - 1) / 2`` source voxels) against aliasing."""
        values = np.asarray(values, dtype=np.float32)
        sigma = np.clip((self.scale - 1) / 2, 0, None)
        if np.any(sigma > 0):
            values = ndimage.gaussian_filter(values, sigma=sigma, mode="nearest")
        return ndimage.affine_transform(
            values, self.scale, offset=self.offset, output_shape=self.shape, order=1, mode="constant", cval=fill
        ).astype(np.float32)

    def to_source(self, values: np.ndarray) -> np.ndarray:
        """A model-grid map ``[d, h, w]`` drawn back onto the source voxels (float32; 0 where the
        model grid does not reach), the inverse geometry of :meth:`to_model`."""
        values = np.asarray(values, dtype=np.float32)
        if values.shape != self.shape:
            raise ValueError(f"map has shape {values.shape}, the model grid is {self.shape}")
        inverse = 1 / self.scale
        return ndimage.affine_transform(
            values,
            inverse,
            offset=-self.offset * inverse,
            output_shape=self.source_shape,
            order=1,
            mode="constant",
            cval=0.0,
        ).astype(np.float32)


def prepare_values(
    values: np.ndarray,
    source_spacing: Sequence[float],
    shape: Sequence[int],
    spacing: Sequence[float],
    window: tuple[float, float],
) -> tuple[np.ndarray, VolumeGrid]:
    """Modality values ``[slices, rows, columns]`` at ``source_spacing`` -> model input in [0, 1]
    on the grid ``shape`` at ``spacing`` (padding takes ``window[0]``, i.e. 0), and that grid."""
    if len(source_spacing) != 3:
        raise ValueError(f"source spacing needs 3 values (slices, rows, columns), got {list(source_spacing)}")
    grid = VolumeGrid(
        tuple(int(n) for n in values.shape),  # type: ignore[arg-type]
        (float(source_spacing[0]), float(source_spacing[1]), float(source_spacing[2])),
        (int(shape[0]), int(shape[1]), int(shape[2])),
        (float(spacing[0]), float(spacing[1]), float(spacing[2])),
    )
    low, high = window
    resampled = grid.to_model(values, fill=low)
    return np.clip((resampled - low) / (high - low), 0.0, 1.0).astype(np.float32), grid


def prepare_volume(
    volume: Volume, shape: Sequence[int], spacing: Sequence[float], window: tuple[float, float]
) -> tuple[np.ndarray, VolumeGrid]:
    """:func:`prepare_values` of an assembled volume: model input ``[d, h, w]`` in [0, 1] and its grid."""
    return prepare_values(volume.values, volume.geometry.spacing, shape, spacing, window)
