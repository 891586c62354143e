"""What the model expects of its input (from the model card): grid size, channels, aspect and windowing policy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["InputSpec"]


@dataclass(frozen=True)
class InputSpec:
    """What the model expects, from the model card.

    rows, columns: model grid size H x W in pixels.
    channels: 1 (grayscale; colour sources become BT.601 luminance) or 3 (RGB kept, grayscale
        replicated).
    aspect: ``letterbox`` keeps the aspect ratio, scales the longer side to fit, centres and pads
        with 0; ``stretch`` fills the grid.
    windowing: ``dicom`` uses the VOI LUT Sequence, else the first Window Center/Width, else the
        percentile fallback; ``percentile`` always stretches between the two percentiles.
    percentiles: (low, high) in percent, 0 <= low < high <= 100, of the modality values.
    """

    rows: int
    columns: int
    channels: int = 1
    aspect: Literal["letterbox", "stretch"] = "letterbox"
    windowing: Literal["dicom", "percentile"] = "dicom"
    percentiles: tuple[float, float] = (0.5, 99.5)

    def __post_init__(self) -> None:
        for name in ("rows", "columns"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(
                    f"InputSpec.{name} must be a positive integer (model input size in pixels), "
                    f"got {value!r}; fix the input size in the model card"
                )
            object.__setattr__(self, name, int(value))
        if isinstance(self.channels, bool) or self.channels not in (1, 3):
            raise ValueError(
                f"InputSpec.channels must be 1 or 3, got {self.channels!r}; fix the input channels in the model card"
            )
        object.__setattr__(self, "channels", int(self.channels))
        if self.aspect not in ("letterbox", "stretch"):
            raise ValueError(f"InputSpec.aspect must be 'letterbox' or 'stretch', got {self.aspect!r}")
        if self.windowing not in ("dicom", "percentile"):
            raise ValueError(f"InputSpec.windowing must be 'dicom' or 'percentile', got {self.windowing!r}")
        try:
            low, high = (float(v) for v in self.percentiles)
        except (TypeError, ValueError):
            raise ValueError(
                f"InputSpec.percentiles must be two numbers (low, high), got {self.percentiles!r}"
            ) from None
        if not (0.0 <= low < high <= 100.0):
            raise ValueError(f"InputSpec.percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles!r}")
        object.__setattr__(self, "percentiles", (low, high))
