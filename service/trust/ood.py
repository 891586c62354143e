"""The out-of-distribution signal: is this input unlike the images the model was fitted on?

Mahalanobis distance on the pooled features (Lee, Lee, Lee & Shin, "A Simple Unified Framework
for Detecting Out-of-Distribution Samples and Adversarial Attacks", NeurIPS 2018), without their
input pre-processing or layer ensemble:

- features ``x`` (a vector of D numbers per image): the input of the classifier's feature layer,
  by default the last ``nn.Linear`` of the eager torch module (for a CNN the globally pooled
  feature vector), read with a forward hook during a forward pass without gradients;
- fitted on in-distribution images (:func:`fit_statistics`): class-conditional means ``mu_c``
  (classes as the model predicts them, so any unlabelled folder of in-distribution images will
  do) and one covariance shared by the classes, ``S = sum_c sum_{i in c} (x_i - mu_c)(x_i - mu_c)^T / N``,
  shrunk towards a multiple of the identity, ``S' = (1 - a) S + a (tr(S) / D) I`` with the small
  shrinkage ``a`` (fraction, default :data:`DEFAULT_SHRINKAGE` = 0.01), which keeps it invertible
  when D is near N;
- the distance of an image: ``d(x) = min_c sqrt((x - mu_c)^T S'^-1 (x - mu_c))``, dimensionless
  (in units of the features' spread; for Gaussian features ``d^2`` would follow a chi-square law
  with D degrees of freedom);
- the threshold: a high percentile (default :data:`DEFAULT_PERCENTILE`, the 99th) of the
  distances of *held-out* in-distribution images, images the statistics were not fitted on, times
  :data:`DEFAULT_MARGIN` (1.5); an input is flagged "out of distribution" when ``d(x) > threshold``.
  Shipped demo models (64 features, 900 phantoms fitted, 300 held out): thresholds 11.5 (honest)
  and 10.4 (cheating); held-out test phantoms lie at 2-11, non-chest images at 28-132.

The statistics and the threshold are stored in a small ``.npz`` beside the model card
(:meth:`OodStatistics.save`), which the card lists as ``auxiliary.ood_statistics`` with its
sha256. The hook needs an eager ``nn.Module``: a card without ``torch`` weights (ONNX or
TorchScript only) has no OOD signal, and a card that lists statistics without ``torch`` weights
is refused when it loads (:mod:`service.inference.card`). This module knows tensors and arrays
only: no DICOM.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from service.explain.hooks import eval_mode, module_device

__all__ = [
    "DEFAULT_MARGIN",
    "DEFAULT_PERCENTILE",
    "DEFAULT_SHRINKAGE",
    "OodDetector",
    "OodError",
    "OodScore",
    "OodStatistics",
    "feature_layer",
    "fit_statistics",
    "mahalanobis_distances",
    "pooled_features",
    "threshold_from_held_out",
]

#: Shrinkage ``a`` of the shared covariance towards ``tr(S) / D * I`` (fraction 0..1).
DEFAULT_SHRINKAGE = 0.01
#: Percentile of the held-out in-distribution distances that sets the threshold.
DEFAULT_PERCENTILE = 99.0
#: Factor on that percentile: room for the held-out set's own sampling error.
DEFAULT_MARGIN = 1.5
#: Largest condition number of the shrunk covariance that is inverted.
MAX_CONDITION = 1e12
#: Images per forward pass while reading features.
FEATURE_BATCH = 32
#: Format version of the ``.npz`` written by :meth:`OodStatistics.save`.
FORMAT_VERSION = 1


class OodError(ValueError):
    """The OOD statistics or their use are wrong; the message names the value found."""


@dataclass(frozen=True)
class OodScore:
    """The out-of-distribution verdict on one input."""

    distance: float  # Mahalanobis distance to the nearest class mean (dimensionless, >= 0)
    threshold: float  # flagged above this
    out_of_distribution: bool


@dataclass(frozen=True, eq=False)
class OodStatistics:
    """Class-conditional means, shared shrunk precision and the threshold, for features of ``layer``."""

    layer: str  # dotted module name whose input is the feature vector
    means: np.ndarray  # float64 [K, D], one row per class that occurred in the fit
    precision: np.ndarray  # float64 [D, D], inverse of the shrunk shared covariance
    threshold: float  # distance above which an input is out of distribution
    shrinkage: float
    fitted_images: int
    held_out_images: int
    percentile: float
    margin: float

    def __post_init__(self) -> None:
        if self.means.ndim != 2 or self.means.shape[0] < 1 or self.means.shape[1] < 1:
            raise OodError(f"OOD means must be [classes, features], got shape {self.means.shape}")
        dim = self.means.shape[1]
        if self.precision.shape != (dim, dim):
            raise OodError(f"OOD precision must be [{dim}, {dim}] for {dim} features, got {self.precision.shape}")
        if not (np.all(np.isfinite(self.means)) and np.all(np.isfinite(self.precision))):
            raise OodError("OOD statistics hold non-finite values")
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            raise OodError(f"OOD threshold must be a positive distance, got {self.threshold!r}")

    @property
    def dimension(self) -> int:
        return int(self.means.shape[1])

    def distances(self, features: np.ndarray) -> np.ndarray:
        """:func:`mahalanobis_distances` of ``features`` [N, D] under these statistics."""
        return mahalanobis_distances(features, self.means, self.precision)

    def scores(self, features: np.ndarray, threshold: float | None = None) -> list[OodScore]:
        """One :class:`OodScore` per row of ``features``; ``threshold`` overrides the stored one."""
        limit = self.threshold if threshold is None else float(threshold)
        return [OodScore(float(d), limit, bool(d > limit)) for d in self.distances(features)]

    def save(self, path: str | Path) -> Path:
        """Write the statistics as an uncompressed ``.npz`` (no pickled objects)."""
        path = Path(path)
        with path.open("wb") as handle:
            np.savez(
                handle,
                format_version=np.int64(FORMAT_VERSION),
                layer=np.array(self.layer),
                means=self.means,
                precision=self.precision,
                threshold=np.float64(self.threshold),
                shrinkage=np.float64(self.shrinkage),
                fitted_images=np.int64(self.fitted_images),
                held_out_images=np.int64(self.held_out_images),
                percentile=np.float64(self.percentile),
                margin=np.float64(self.margin),
            )
        return path

    @classmethod
    def load(cls, path: str | Path) -> OodStatistics:
        """Read statistics written by :meth:`save`; :class:`OodError` naming what is wrong."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                version = int(data["format_version"])
                if version != FORMAT_VERSION:
                    raise OodError(f"{path}: OOD statistics format {version}, this pacs-xai reads {FORMAT_VERSION}")
                return cls(
                    layer=str(data["layer"]),
                    means=np.asarray(data["means"], dtype=np.float64),
                    precision=np.asarray(data["precision"], dtype=np.float64),
                    threshold=float(data["threshold"]),
                    shrinkage=float(data["shrinkage"]),
                    fitted_images=int(data["fitted_images"]),
                    held_out_images=int(data["held_out_images"]),
                    percentile=float(data["percentile"]),
                    margin=float(data["margin"]),
                )
        except OodError:
            raise
        except (OSError, KeyError, ValueError) as exc:
            raise OodError(f"{path}: not readable as OOD statistics: {exc}") from exc


@dataclass(frozen=True, eq=False)
class OodDetector:
    """Statistics bound to a model: :meth:`score` reads a batch's features and judges each image."""

    statistics: OodStatistics
    threshold: float

    @classmethod
    def for_module(
        cls, statistics: OodStatistics, module: nn.Module, layer: str | None, threshold: float | None = None
    ) -> OodDetector:
        """Check that ``statistics`` were fitted on this ``module``'s feature ``layer`` (the card's
        ``trust.ood.layer``; ``None``: the last ``nn.Linear``) with one forward pass of a zero image of
        ``module``'s input; ``threshold`` overrides the calibrated one."""
        name, _ = feature_layer(module, layer)
        if name != statistics.layer:
            raise OodError(
                f"the OOD statistics were fitted on the input of layer {statistics.layer!r}, but the card's feature "
                f"layer is {name!r}; recalibrate (pacs-xai model calibrate) or set trust.ood.layer"
            )
        limit = statistics.threshold if threshold is None else float(threshold)
        if not (math.isfinite(limit) and limit > 0):
            raise OodError(f"OOD threshold must be a positive distance, got {threshold!r}")
        return cls(statistics, limit)

    def check_dimension(self, module: nn.Module, probe: np.ndarray) -> None:
        """One forward pass of ``probe`` [1, C, H, W]: the feature vector must have the statistics' length."""
        found = pooled_features(module, probe, self.statistics.layer).shape[1]
        if found != self.statistics.dimension:
            raise OodError(
                f"layer {self.statistics.layer!r} gives {found} features, the OOD statistics hold "
                f"{self.statistics.dimension}: they belong to another model; recalibrate (pacs-xai model calibrate)"
            )

    def score(self, module: nn.Module, batch: np.ndarray | torch.Tensor) -> list[OodScore]:
        """One :class:`OodScore` per image of a normalised batch ``[N, C, H, W]``."""
        features = pooled_features(module, batch, self.statistics.layer)
        return self.statistics.scores(features, self.threshold)


def feature_layer(module: nn.Module, name: str | None = None) -> tuple[str, nn.Module]:
    """(name, submodule) whose input is the feature vector: ``name`` (dotted, as in
    ``named_modules()``), or the last ``nn.Linear`` in registration order when ``None``."""
    if isinstance(module, torch.jit.ScriptModule):
        raise OodError(
            "the OOD features are read with a forward hook, which TorchScript modules do not take; "
            "the model card needs 'torch' weights (an eager nn.Module)"
        )
    modules = dict(module.named_modules())
    if name is None:
        linear = [key for key, sub in modules.items() if isinstance(sub, nn.Linear)]
        if not linear:
            raise OodError(
                f"{type(module).__name__} has no nn.Linear layer to read features from; name the layer "
                "in the card's trust.ood.layer"
            )
        return linear[-1], modules[linear[-1]]
    if name not in modules or not name:
        shown = ", ".join(repr(key) for key in list(modules)[-8:] if key)
        raise OodError(f"unknown OOD feature layer {name!r} in {type(module).__name__}; layers include: {shown}")
    return name, modules[name]


def pooled_features(module: nn.Module, batch: torch.Tensor | np.ndarray, layer: str | None = None) -> np.ndarray:
    """Features float64 ``[N, D]``: the input of ``layer`` (:func:`feature_layer`) for each image of a
    normalised batch ``[N, C, H, W]``, flattened per image; forward passes of :data:`FEATURE_BATCH`
    images without gradients, the module's modes restored afterwards. Only this thread's passes are
    recorded (the module is shared with the node's other threads)."""
    _, target = feature_layer(module, layer)
    inputs = torch.as_tensor(np.asarray(batch, dtype=np.float32) if isinstance(batch, np.ndarray) else batch)
    if inputs.ndim != 4 or inputs.shape[0] == 0:
        raise OodError(f"pooled_features takes a non-empty [N, C, H, W] batch, got shape {tuple(inputs.shape)}")
    owner = threading.get_ident()
    recorded: list[torch.Tensor] = []

    def record(_module: nn.Module, args: tuple[object, ...]) -> None:
        if threading.get_ident() == owner and args and isinstance(args[0], torch.Tensor):
            recorded.append(args[0].detach().flatten(1).double().cpu())

    device = module_device(module) or torch.device("cpu")
    handle = target.register_forward_pre_hook(record)
    try:
        with torch.no_grad(), eval_mode(module):
            for start in range(0, inputs.shape[0], FEATURE_BATCH):
                chunk = inputs[start : start + FEATURE_BATCH].to(device)
                before = len(recorded)
                module(chunk)
                if len(recorded) != before + 1:
                    raise OodError(
                        f"the OOD feature layer ran {len(recorded) - before} times in one forward pass; "
                        "name a layer that runs once (trust.ood.layer)"
                    )
    finally:
        handle.remove()
    return torch.cat(recorded).numpy()


def fit_statistics(
    features: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    held_out_features: np.ndarray,
    *,
    layer: str,
    shrinkage: float = DEFAULT_SHRINKAGE,
    percentile: float = DEFAULT_PERCENTILE,
    margin: float = DEFAULT_MARGIN,
) -> OodStatistics:
    """Fit means and shared shrunk covariance on ``features`` [N, D] with class ``labels`` [N];
    the threshold from the distances of ``held_out_features`` [M, D] (in-distribution images not
    in the fit): :func:`threshold_from_held_out`."""
    x = _checked_features(features, "features")
    held_out = _checked_features(held_out_features, "held_out_features")
    y = np.asarray(labels)
    if y.shape != (x.shape[0],):
        raise OodError(f"labels must be one per feature row ({x.shape[0]}), got shape {y.shape}")
    if held_out.shape[1] != x.shape[1]:
        raise OodError(f"held-out features have {held_out.shape[1]} columns, the fit features {x.shape[1]}")
    if not 0.0 <= shrinkage <= 1.0:
        raise OodError(f"shrinkage must be a fraction in [0, 1], got {shrinkage!r}")
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(axis=0) for c in classes])
    centred = x - means[np.searchsorted(classes, y)]
    covariance = centred.T @ centred / x.shape[0]
    dim = x.shape[1]
    shrunk = (1.0 - shrinkage) * covariance + shrinkage * (np.trace(covariance) / dim) * np.eye(dim)
    condition = float(np.linalg.cond(shrunk))
    if not math.isfinite(condition) or condition > MAX_CONDITION:
        raise OodError(
            f"the shared covariance of {dim} features from {x.shape[0]} images is singular (condition number "
            f"{condition:.3g}); raise the shrinkage ({shrinkage}) or fit on more images"
        )
    precision = np.linalg.inv(shrunk)
    precision = (precision + precision.T) / 2.0
    distances = mahalanobis_distances(held_out, means, precision)
    return OodStatistics(
        layer=layer,
        means=means,
        precision=precision,
        threshold=threshold_from_held_out(distances, percentile, margin),
        shrinkage=float(shrinkage),
        fitted_images=int(x.shape[0]),
        held_out_images=int(held_out.shape[0]),
        percentile=float(percentile),
        margin=float(margin),
    )


def threshold_from_held_out(
    distances: np.ndarray, percentile: float = DEFAULT_PERCENTILE, margin: float = DEFAULT_MARGIN
) -> float:
    """``margin`` times the ``percentile`` (linear interpolation) of held-out in-distribution distances."""
    values = np.asarray(distances, dtype=np.float64)
    if values.ndim != 1 or values.size == 0 or not np.all(np.isfinite(values)):
        raise OodError(f"need a non-empty 1-D array of finite held-out distances, got shape {values.shape}")
    if not 0.0 < percentile <= 100.0:
        raise OodError(f"percentile must be in (0, 100], got {percentile!r}")
    if not margin >= 1.0:
        raise OodError(f"margin must be >= 1, got {margin!r}")
    return float(np.percentile(values, percentile)) * float(margin)


def mahalanobis_distances(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """``min_c sqrt((x - mu_c)^T P (x - mu_c))`` per row of ``features`` [N, D]: float64 [N]."""
    x = _checked_features(features, "features")
    if x.shape[1] != means.shape[1]:
        raise OodError(f"features have {x.shape[1]} columns, the OOD statistics {means.shape[1]}")
    differences = x[:, None, :] - means[None, :, :]  # [N, K, D]
    squared = np.einsum("nkd,de,nke->nk", differences, precision, differences)
    return np.sqrt(np.clip(squared.min(axis=1), 0.0, None))


def _checked_features(features: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise OodError(f"{name} must be a non-empty [N, D] array, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise OodError(f"{name} hold {int(np.count_nonzero(~np.isfinite(array)))} non-finite values")
    return array
