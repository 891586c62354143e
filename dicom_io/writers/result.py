"""What the writers are given: one explained frame (:class:`ExplanationResult`) with the signals of
whether it can be believed (:class:`ShortcutSignal`, :class:`OutOfDistributionSignal`, computed by
``service.trust``), and the checks that a source dataset and a result fit together before any
output is derived from them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pydicom import Dataset

from dicom_io.vr import LO_MAX
from dicom_io.writers.references import number_of_frames

__all__ = ["ExplanationResult", "FindingStatus", "OutOfDistributionSignal", "ShortcutSignal", "check_inputs"]

_REQUIRED_SOURCE_KEYWORDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Rows",
    "Columns",
)


@dataclass(frozen=True)
class ShortcutSignal:
    """How much of the explanation's positive attribution lies outside the anatomy, and the verdict.

    ``suspected`` is True when ``share >= share_threshold`` and ``concentration >= concentration_threshold``.
    """

    share: float  # fraction 0..1 of the positive attribution inside the region outside the anatomy
    concentration: float  # share / area fraction of that region (ratio >= 0)
    suspected: bool
    share_threshold: float  # fraction 0..1, from the model card
    concentration_threshold: float  # ratio, from the model card

    def __post_init__(self) -> None:
        for name in ("share", "share_threshold"):
            _check_number(f"ShortcutSignal.{name}", getattr(self, name), 0.0, 1.0)
        for name in ("concentration", "concentration_threshold"):
            _check_number(f"ShortcutSignal.{name}", getattr(self, name), 0.0, math.inf)
        if not isinstance(self.suspected, (bool, np.bool_)):
            raise ValueError(f"ShortcutSignal.suspected must be a bool, got {self.suspected!r}")
        object.__setattr__(self, "suspected", bool(self.suspected))

    @property
    def share_percent(self) -> float:
        """The share in percent, 0..100."""
        return 100.0 * float(self.share)


@dataclass(frozen=True)
class OutOfDistributionSignal:
    """Whether the input is unlike the model's training data: a feature distance and its threshold."""

    distance: float  # Mahalanobis distance of the pooled features to the nearest class mean (dimensionless)
    threshold: float  # flagged above it
    out_of_distribution: bool

    def __post_init__(self) -> None:
        _check_number("OutOfDistributionSignal.distance", self.distance, 0.0, math.inf)
        _check_number("OutOfDistributionSignal.threshold", self.threshold, 0.0, math.inf)
        if not isinstance(self.out_of_distribution, (bool, np.bool_)):
            raise ValueError(
                f"OutOfDistributionSignal.out_of_distribution must be a bool, got {self.out_of_distribution!r}"
            )
        object.__setattr__(self, "out_of_distribution", bool(self.out_of_distribution))


def _check_number(name: str, value: object, low: float, high: float) -> None:
    """A finite real number in [low, high] (high may be infinite)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(float(value)) or not low <= float(value) <= high:
        raise ValueError(f"{name} must be a finite number in [{low:g}, {high:g}], got {value!r}")


@dataclass(frozen=True)
class FindingStatus:
    """One class of a multi-label model on one frame: its probability, threshold and whether it is present."""

    class_name: str
    probability: float  # 0..1
    threshold: float  # 0..1, from the model card; present when probability >= threshold
    explained: bool = False  # the frame's outputs include an explanation of this finding

    def __post_init__(self) -> None:
        if not isinstance(self.class_name, str) or not self.class_name.strip():
            raise ValueError(f"FindingStatus.class_name must be a non-empty string, got {self.class_name!r}")
        _check_number("FindingStatus.probability", self.probability, 0.0, 1.0)
        _check_number("FindingStatus.threshold", self.threshold, 0.0, 1.0)

    @property
    def present(self) -> bool:
        return float(self.probability) >= float(self.threshold)


@dataclass(frozen=True, eq=False)
class ExplanationResult:
    """One explained frame, everything an output writer needs besides the source dataset."""

    method: str  # explainer registry name, e.g. "gradcam", "occlusion"
    class_name: str  # predicted/explained class, e.g. "nodule"
    probability: float  # model output probability of class_name, 0..1
    model_name: str
    model_version: str
    frame_index: int  # 0-based source frame
    attribution: np.ndarray  # float32 [rows, cols] on the SOURCE pixel grid, signed, raw scale
    display: np.ndarray  # float32 [rows, cols] in [0, 1]: the windowed grayscale source frame (1 = bright)
    #: The shortcut signal of this explanation; None where it was not computed.
    shortcut: ShortcutSignal | None = None
    #: The out-of-distribution signal of the input frame; None where the model card has no OOD statistics.
    ood: OutOfDistributionSignal | None = None
    #: True where the model explains several findings per frame (multi-label): this finding's
    #: Secondary Capture and Parametric Map get a series and UIDs of their own (the class in the hash).
    per_finding: bool = False

    @property
    def uid_finding(self) -> str | None:
        """The finding that joins the derived UIDs of this result's own objects, or None."""
        return self.class_name if self.per_finding else None

    def __post_init__(self) -> None:
        for name in ("method", "class_name", "model_name", "model_version"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"ExplanationResult.{name} must be a non-empty string, got {value!r}")
        for name in ("model_name", "model_version"):
            if len(getattr(self, name)) > LO_MAX:
                raise ValueError(
                    f"ExplanationResult.{name} {getattr(self, name)!r} is longer than {LO_MAX} characters "
                    "(DICOM LO, it becomes Manufacturer's Model Name / Software Versions)"
                )
        _check_probability(self.probability)
        index = self.frame_index
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"ExplanationResult.frame_index must be an integer >= 0, got {index!r}")
        object.__setattr__(self, "frame_index", int(index))  # numpy integers become plain int
        if self.shortcut is not None and not isinstance(self.shortcut, ShortcutSignal):
            raise ValueError(f"ExplanationResult.shortcut must be a ShortcutSignal or None, got {self.shortcut!r}")
        if self.ood is not None and not isinstance(self.ood, OutOfDistributionSignal):
            raise ValueError(f"ExplanationResult.ood must be an OutOfDistributionSignal or None, got {self.ood!r}")
        _check_map("attribution", self.attribution)
        _check_map("display", self.display)
        if self.attribution.shape != self.display.shape:
            raise ValueError(
                f"attribution shape {self.attribution.shape} differs from display shape {self.display.shape}; "
                "both must be on the source pixel grid"
            )


def _check_probability(probability: float) -> None:
    """Probability must be a real number in [0, 1]."""
    try:
        value = float(probability)
    except (TypeError, ValueError):
        raise ValueError(f"ExplanationResult.probability must be a number, got {probability!r}") from None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"ExplanationResult.probability must be in [0, 1], got {probability!r}")


def _check_map(name: str, array: np.ndarray) -> None:
    """A 2-D, non-empty, finite real array."""
    if not isinstance(array, np.ndarray):
        raise ValueError(f"ExplanationResult.{name} must be a numpy array, got {type(array).__name__}")
    if array.ndim != 2 or 0 in array.shape:
        raise ValueError(
            f"ExplanationResult.{name} must be a non-empty 2-D [rows, cols] array, got shape {array.shape}"
        )
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"ExplanationResult.{name} must hold real numbers, got dtype {array.dtype}")
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise ValueError(f"ExplanationResult.{name} has {bad} non-finite (NaN/inf) values")


def check_inputs(source: Dataset, result: ExplanationResult) -> None:
    """Refuse what no output can be made from, with ValueError naming what was found.

    ``source`` must be a pydicom Dataset with the UIDs an output references and Rows/Columns,
    ``result`` an :class:`ExplanationResult` of one of its frames with maps on its pixel grid.
    """
    if not isinstance(source, Dataset):
        raise ValueError(f"source must be a pydicom Dataset, got {type(source).__name__}")
    if not isinstance(result, ExplanationResult):
        raise ValueError(f"result must be an ExplanationResult, got {type(result).__name__}")
    missing = [kw for kw in _REQUIRED_SOURCE_KEYWORDS if source.get(kw) in (None, "")]
    if missing:
        raise ValueError(f"source dataset lacks {', '.join(missing)}; cannot derive an object from it")
    frames = number_of_frames(source)
    if result.frame_index >= frames:
        raise ValueError(f"frame_index {result.frame_index} is out of range for a source with {frames} frame(s)")
    grid = (int(source.Rows), int(source.Columns))
    if result.attribution.shape != grid:
        raise ValueError(
            f"attribution shape {result.attribution.shape} does not match the source grid "
            f"Rows x Columns = {grid}; map it back to the source pixel grid first"
        )
