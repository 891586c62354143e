"""Is the heatmap faithful to the model? Perturb the pixels it ranks and watch the target probability.

Pixels are ranked by their attribution (signed, highest first; ties in row-major order) and every
channel of a pixel is perturbed together. Probabilities are the target class's softmax (or, for a
multi-label model, sigmoid) probability, 0..1. Batches are ``[B, C, H, W]`` model inputs
(normalised as the model card says) with maps ``[B, H, W]`` on the same grid and one target per
sample. Forward passes go ``chunk_size`` perturbed images at a time through any model: a
``torch.nn.Module`` or a :class:`~service.inference.runner.Runner` (an ONNX model, the inference
pool), through :func:`service.explain.base.forward_function`.

Deletion and insertion (Petsiuk et al., "RISE", BMVC 2018):

- :func:`deletion_curve`: the ``k`` most relevant pixels replaced by a baseline, for
  ``k = 0, s, 2s, ..., N`` (``s = pixels_per_step``, the last step clipped at ``N = H * W``).
  The baseline is a constant of the model input, by default 0 (the card's mean after
  normalisation: mid-grey for the demo model), or ``"blur"``: the image blurred as for insertion.
- :func:`insertion_curve`: starts from the Gaussian-blurred image (sigma 5 px, 11 x 11 taps as in
  RISE's code, but reflected at the border where RISE pads with zeros) and puts back the ``k`` most
  relevant pixels of the original.
- AUC: the trapezoid rule over the fraction of pixels perturbed (0..1), so AUC is in probability
  units (0..1); deletion wants it low, insertion high. :func:`deletion` and :func:`insertion` also
  run the same curve with a random pixel order (one permutation of the pixels from ``seed``, the
  same for every sample, so a batch equals its single runs) and give the ratio AUC / random AUC:
  below 1 is better than chance for deletion, above 1 for insertion.

The curve's points after the first (``k >= s``) are Quantus' ``PixelFlipping`` with
``features_in_step = s`` and ``perturb_baseline`` the same constant (Quantus has no ``k = 0`` point).

ROAD (Rong et al., "A Consistent and Efficient Evaluation Strategy for Attribution Methods", ICML
2022), :func:`road`: at each removal percentage ``q`` (default 10, 20, ..., 90) the pixels are
removed and filled by noisy linear imputation (:func:`noisy_linear_imputation`): each removed
pixel is the weighted mean of its in-image 8-neighbours (edges 1/6, diagonals 1/12; weights of
neighbours outside the image dropped), solved for all removed pixels at once as one sparse linear
system, plus Gaussian noise of standard deviation 0.01 (model-input units). MoRF removes the
``round(q% of N)`` pixels ranked first, LeRF those ranked last (the ranking above). The scores
follow pytorch-grad-cam's ``metrics/road.py``: ``morf`` and ``lerf`` are the mean over the
percentages of (probability after imputation - probability of the unperturbed image), and
``combined = (lerf - morf) / 2`` (``ROADCombined``): higher is more faithful. The noise is drawn
from ``seed``, the order and the percentage, the same for every sample (a batch equals its single
runs). pytorch-grad-cam instead removes every pixel at or beyond the map's percentile: the same
pixels on a map without ties (up to one pixel of interpolation), but on a map with a tied floor
(the zeros of a ReLU'd CAM) it removes the whole floor at once, up to every pixel of the image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse import coo_matrix
from scipy.sparse.linalg import spsolve

from service.explain.base import ModelLike, chunk_size_for, forward_function
from service.trust.checks import Array, TrustMetricError, as_numpy, class_indices, map_batch

__all__ = [
    "BLUR_SIGMA_PX",
    "ROAD_NOISE_STD",
    "ROAD_PERCENTAGES",
    "CausalScores",
    "PerturbationCurve",
    "RoadScores",
    "deletion",
    "deletion_curve",
    "gaussian_blur",
    "insertion",
    "insertion_curve",
    "noisy_linear_imputation",
    "road",
    "target_probabilities",
]

Activation = Literal["softmax", "sigmoid"]

#: Standard deviation of the insertion blur, pixels (RISE: an 11 x 11 kernel with sigma 5).
BLUR_SIGMA_PX = 5.0
#: ROAD's removal percentages and imputation noise (model-input units), as in the paper and pytorch-grad-cam.
ROAD_PERCENTAGES: tuple[int, ...] = (10, 20, 30, 40, 50, 60, 70, 80, 90)
ROAD_NOISE_STD = 0.01
#: ROAD's imputation weights of the 8 neighbours (row offset, column offset, weight): they sum to 1.
ROAD_NEIGHBOUR_WEIGHTS: tuple[tuple[int, int, float], ...] = (
    (0, 1, 1 / 6),
    (0, -1, 1 / 6),
    (1, 0, 1 / 6),
    (-1, 0, 1 / 6),
    (1, 1, 1 / 12),
    (1, -1, 1 / 12),
    (-1, 1, 1 / 12),
    (-1, -1, 1 / 12),
)


# --- deletion and insertion -------------------------------------------------------------------


@dataclass(frozen=True)
class PerturbationCurve:
    """Target probability ``[B, S + 1]`` after perturbing the fraction ``fractions[s]`` (0..1) of the pixels."""

    kind: Literal["deletion", "insertion"]
    fractions: np.ndarray
    probabilities: np.ndarray

    @property
    def auc(self) -> np.ndarray:
        """Area under each sample's curve ``[B]`` (trapezoid rule over the fraction of pixels; probability units)."""
        return np.trapezoid(self.probabilities, self.fractions, axis=1)


@dataclass(frozen=True)
class CausalScores:
    """A deletion or insertion curve in the map's pixel order and in a seeded random order."""

    curve: PerturbationCurve
    random_curve: PerturbationCurve

    @property
    def auc(self) -> np.ndarray:
        return self.curve.auc

    @property
    def random_auc(self) -> np.ndarray:
        return self.random_curve.auc

    @property
    def ratio(self) -> np.ndarray:
        """AUC / random-order AUC ``[B]``: below 1 beats chance for deletion, above 1 for insertion."""
        random_auc = self.random_auc
        if (random_auc <= 0).any():
            raise TrustMetricError(f"random-order AUC must be > 0 for a ratio, got {random_auc.tolist()}")
        return self.auc / random_auc


def deletion_curve(
    model: ModelLike,
    batch: torch.Tensor,
    maps: Array,
    targets: Sequence[int],
    *,
    baseline: float | Literal["blur"] = 0.0,
    pixels_per_step: int | None = None,
    activation: Activation = "softmax",
    chunk_size: int | None = None,
) -> PerturbationCurve:
    """Target probability as the most relevant pixels are replaced by ``baseline`` (RISE's deletion)."""
    batch, ranks, target_array = _prepare(batch, maps, targets)
    end = gaussian_blur(batch) if baseline == "blur" else torch.full_like(batch, _baseline_value(baseline))
    return _curve("deletion", model, batch, end, ranks, target_array, pixels_per_step, activation, chunk_size)


def insertion_curve(
    model: ModelLike,
    batch: torch.Tensor,
    maps: Array,
    targets: Sequence[int],
    *,
    blur_sigma: float = BLUR_SIGMA_PX,
    pixels_per_step: int | None = None,
    activation: Activation = "softmax",
    chunk_size: int | None = None,
) -> PerturbationCurve:
    """Target probability as the most relevant pixels are put back into the blurred image (RISE's insertion)."""
    batch, ranks, target_array = _prepare(batch, maps, targets)
    blurred = gaussian_blur(batch, blur_sigma)
    return _curve("insertion", model, blurred, batch, ranks, target_array, pixels_per_step, activation, chunk_size)


def deletion(
    model: ModelLike,
    batch: torch.Tensor,
    maps: Array,
    targets: Sequence[int],
    *,
    baseline: float | Literal["blur"] = 0.0,
    pixels_per_step: int | None = None,
    seed: int = 0,
    activation: Activation = "softmax",
    chunk_size: int | None = None,
) -> CausalScores:
    """The deletion curve in the map's order and in a random order drawn from ``seed``."""
    curves = [
        deletion_curve(
            model,
            batch,
            order_maps,
            targets,
            baseline=baseline,
            pixels_per_step=pixels_per_step,
            activation=activation,
            chunk_size=chunk_size,
        )
        for order_maps in (maps, _random_order_maps(batch, seed))
    ]
    return CausalScores(*curves)


def insertion(
    model: ModelLike,
    batch: torch.Tensor,
    maps: Array,
    targets: Sequence[int],
    *,
    blur_sigma: float = BLUR_SIGMA_PX,
    pixels_per_step: int | None = None,
    seed: int = 0,
    activation: Activation = "softmax",
    chunk_size: int | None = None,
) -> CausalScores:
    """The insertion curve in the map's order and in a random order drawn from ``seed``."""
    curves = [
        insertion_curve(
            model,
            batch,
            order_maps,
            targets,
            blur_sigma=blur_sigma,
            pixels_per_step=pixels_per_step,
            activation=activation,
            chunk_size=chunk_size,
        )
        for order_maps in (maps, _random_order_maps(batch, seed))
    ]
    return CausalScores(*curves)


def gaussian_blur(batch: torch.Tensor, sigma: float = BLUR_SIGMA_PX) -> torch.Tensor:
    """Each channel blurred by a normalised Gaussian of ``sigma`` px (taps out to ``ceil(sigma)``, border reflected)."""
    if not math.isfinite(sigma) or sigma <= 0:
        raise TrustMetricError(f"blur sigma must be a number of pixels > 0, got {sigma!r}")
    radius = math.ceil(sigma)
    if radius >= min(batch.shape[-2:]):
        raise TrustMetricError(f"blur radius {radius} px needs images larger than {tuple(batch.shape[-2:])}")
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-(offsets**2) / (2 * sigma**2))
    taps = (taps / taps.sum()).to(device=batch.device, dtype=batch.dtype)
    channels = batch.shape[1]
    padded = F.pad(batch, (radius, radius, radius, radius), mode="reflect")
    rows = F.conv2d(padded, taps.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(rows, taps.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)


def target_probabilities(
    model: ModelLike,
    inputs: torch.Tensor,
    targets: np.ndarray,
    *,
    activation: Activation = "softmax",
    chunk_size: int | None = None,
) -> np.ndarray:
    """Probability (0..1, float64 ``[N]``) of each input's target class, ``chunk_size`` inputs per forward pass."""
    if activation not in ("softmax", "sigmoid"):
        raise TrustMetricError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
    forward = forward_function(model)
    size = chunk_size_for(chunk_size, model)
    result = []
    for first in range(0, inputs.shape[0], size):
        logits = forward(inputs[first : first + size]).detach().double()
        if logits.ndim != 2:
            raise TrustMetricError(f"model must return logits [N, K], got shape {tuple(logits.shape)}")
        chosen = torch.as_tensor(targets[first : first + size], device=logits.device)
        if int(chosen.max()) >= logits.shape[1]:
            wrong = sorted(set(chosen[chosen >= logits.shape[1]].tolist()))
            raise TrustMetricError(f"targets {wrong} out of range for a model with {logits.shape[1]} classes")
        scores = torch.softmax(logits, dim=1) if activation == "softmax" else torch.sigmoid(logits)
        result.append(scores.gather(1, chosen[:, None])[:, 0].cpu().numpy())
    return np.concatenate(result)


def _prepare(batch: torch.Tensor, maps: Array, targets: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Checked batch, each pixel's rank in its map's order ``[B, H, W]`` (0 = most relevant), targets."""
    if not isinstance(batch, torch.Tensor) or batch.ndim != 4 or not batch.is_floating_point():
        shape = tuple(batch.shape) if hasattr(batch, "shape") else type(batch).__name__
        raise TrustMetricError(f"batch must be a float tensor [B, C, H, W], got {shape}")
    values = map_batch(maps, "maps")
    if values.shape != (batch.shape[0], *batch.shape[2:]):
        raise TrustMetricError(
            f"maps must be [B, H, W] = {(batch.shape[0], *batch.shape[2:])} for a batch of shape "
            f"{tuple(batch.shape)}, got {values.shape}"
        )
    flat = values.reshape(len(values), -1)
    order = np.argsort(-flat, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(flat.shape[1])[None].repeat(len(flat), 0), axis=1)
    rank_tensor = torch.from_numpy(ranks.reshape(values.shape)).to(batch.device)
    return batch.detach(), rank_tensor, class_indices(targets, batch.shape[0])


def _random_order_maps(batch: torch.Tensor, seed: int) -> np.ndarray:
    """Maps whose descending order is one random permutation of the pixels (the same for every sample)."""
    _check_seed(seed)
    height, width = batch.shape[-2:]
    permutation = np.random.default_rng(seed).permutation(height * width)
    scores = np.empty(height * width)
    scores[permutation] = np.arange(height * width, 0, -1)  # permutation[0] is removed first
    return np.broadcast_to(scores.reshape(height, width), (batch.shape[0], height, width))


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise TrustMetricError(f"seed must be an integer >= 0, got {seed!r}")


def _baseline_value(baseline: float | str) -> float:
    if isinstance(baseline, bool) or not isinstance(baseline, int | float) or not math.isfinite(baseline):
        raise TrustMetricError(f"baseline must be a finite number (model-input units) or 'blur', got {baseline!r}")
    return float(baseline)


def _curve(
    kind: Literal["deletion", "insertion"],
    model: ModelLike,
    start: torch.Tensor,
    end: torch.Tensor,
    ranks: torch.Tensor,
    targets: np.ndarray,
    pixels_per_step: int | None,
    activation: Activation,
    chunk_size: int | None,
) -> PerturbationCurve:
    """Step ``s`` shows ``end`` at the ``k_s`` lowest-ranked pixels and ``start`` elsewhere."""
    count, pixels = start.shape[0], ranks[0].numel()
    step = pixels_per_step if pixels_per_step is not None else math.ceil(pixels / 100)
    if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= pixels:
        raise TrustMetricError(f"pixels_per_step must be an integer in 1..{pixels}, got {pixels_per_step!r}")
    perturbed = np.minimum(np.arange(math.ceil(pixels / step) + 1) * step, pixels)
    size = chunk_size_for(chunk_size, model)
    # Rows in step-major order: row r is sample r % count at step r // count.
    rows = len(perturbed) * count
    probabilities = np.empty(rows)
    for first in range(0, rows, size):
        index = torch.arange(first, min(first + size, rows), device=start.device)
        samples, steps = index % count, index // count
        limit = torch.as_tensor(perturbed, device=start.device)[steps]
        swapped = (ranks[samples] < limit[:, None, None])[:, None]
        images = torch.where(swapped, end[samples], start[samples])
        probabilities[first : first + len(index)] = target_probabilities(
            model, images, targets[samples.cpu().numpy()], activation=activation, chunk_size=size
        )
    return PerturbationCurve(kind, perturbed / pixels, probabilities.reshape(len(perturbed), count).T.copy())


# --- ROAD -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoadScores:
    """Target probabilities after ROAD's imputation at each removal percentage, and the scores."""

    percentages: tuple[int, ...]
    original: np.ndarray  # [B], unperturbed
    morf_probabilities: np.ndarray  # [B, P], most relevant removed first
    lerf_probabilities: np.ndarray  # [B, P], least relevant removed first

    @property
    def morf(self) -> np.ndarray:
        """Mean change of the target probability ``[B]`` when the most relevant pixels go (lower is better)."""
        return (self.morf_probabilities - self.original[:, None]).mean(axis=1)

    @property
    def lerf(self) -> np.ndarray:
        """Mean change of the target probability ``[B]`` when the least relevant pixels go (higher is better)."""
        return (self.lerf_probabilities - self.original[:, None]).mean(axis=1)

    @property
    def combined(self) -> np.ndarray:
        """``(lerf - morf) / 2`` ``[B]``, pytorch-grad-cam's ``ROADCombined`` (higher is more faithful)."""
        return (self.lerf - self.morf) / 2


def road(
    model: ModelLike,
    batch: torch.Tensor,
    maps: Array,
    targets: Sequence[int],
    *,
    percentages: Sequence[int] = ROAD_PERCENTAGES,
    noise_std: float = ROAD_NOISE_STD,
    seed: int = 0,
    activation: Activation = "softmax",
    chunk_size: int | None = None,
) -> RoadScores:
    """ROAD's MoRF and LeRF probabilities at each removal percentage, with noisy linear imputation."""
    batch, ranks, target_array = _prepare(batch, maps, targets)
    chosen = tuple(percentages)
    if not chosen or any(isinstance(q, bool) or not isinstance(q, int) or not 0 < q < 100 for q in chosen):
        raise TrustMetricError(f"percentages must be integers in 1..99, got {list(percentages)!r}")
    if not math.isfinite(noise_std) or noise_std < 0:
        raise TrustMetricError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
    _check_seed(seed)
    images = as_numpy(batch).astype(np.float64)
    ranks = as_numpy(ranks).reshape(len(images), -1)
    pixels = ranks.shape[1]
    imputed = np.empty((2, len(chosen), *images.shape))
    for order, most_relevant_first in enumerate((True, False)):
        for position, percentage in enumerate(chosen):
            count = round(percentage / 100 * pixels)
            for sample in range(len(images)):
                removed = ranks[sample] < count if most_relevant_first else ranks[sample] >= pixels - count
                keep = ~removed.reshape(images.shape[2:])
                rng = np.random.default_rng([seed, order, percentage])
                imputed[order, position, sample] = noisy_linear_imputation(images[sample], keep, noise_std, rng)
    flat = torch.from_numpy(imputed.reshape(-1, *images.shape[1:])).to(device=batch.device, dtype=batch.dtype)
    flat_targets = np.tile(target_array, 2 * len(chosen))
    after = target_probabilities(model, flat, flat_targets, activation=activation, chunk_size=chunk_size)
    after = after.reshape(2, len(chosen), len(images))
    original = target_probabilities(model, batch, target_array, activation=activation, chunk_size=chunk_size)
    return RoadScores(chosen, original, after[0].T.copy(), after[1].T.copy())


def noisy_linear_imputation(
    image: np.ndarray, keep: np.ndarray, noise_std: float = ROAD_NOISE_STD, rng: np.random.Generator | None = None
) -> np.ndarray:
    """``image`` ``[C, H, W]`` with the pixels where ``keep`` is False filled by ROAD's noisy linear imputation.

    Every removed pixel ``i`` satisfies ``x_i = sum_j w_ij x_j / sum_j w_ij`` over its in-image
    neighbours ``j`` (kept ones with their values, removed ones as unknowns), the same for each
    channel; then ``noise_std`` times standard normal noise from ``rng`` is added to the removed pixels.
    """
    values = np.asarray(image, dtype=np.float64)
    keep = np.asarray(keep, dtype=bool)
    if values.ndim != 3 or keep.shape != values.shape[1:]:
        raise TrustMetricError(f"need an image [C, H, W] and a keep mask [H, W], got {values.shape} and {keep.shape}")
    if not keep.any():
        raise TrustMetricError("noisy linear imputation needs at least one kept pixel, got none")
    height, width = keep.shape
    missing = np.flatnonzero(~keep.ravel())
    if missing.size == 0:
        return values.copy()
    unknown_index = np.full(height * width, -1)
    unknown_index[missing] = np.arange(missing.size)
    flat_values = values.reshape(values.shape[0], -1)
    row, col = np.divmod(missing, width)
    diagonal = np.zeros(missing.size)
    right_hand_side = np.zeros((missing.size, values.shape[0]))
    system_rows, system_cols, system_values = [], [], []
    for row_offset, col_offset, weight in ROAD_NEIGHBOUR_WEIGHTS:
        r, c = row + row_offset, col + col_offset
        inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
        equations = np.flatnonzero(inside)
        neighbours = r[inside] * width + c[inside]
        diagonal[equations] += weight
        known = keep.ravel()[neighbours]
        right_hand_side[equations[known]] += weight * flat_values[:, neighbours[known]].T
        system_rows.append(equations[~known])
        system_cols.append(unknown_index[neighbours[~known]])
        system_values.append(np.full(int((~known).sum()), -weight))
    rows_all = np.concatenate([np.arange(missing.size), *system_rows])
    cols_all = np.concatenate([np.arange(missing.size), *system_cols])
    entries = np.concatenate([diagonal, *system_values])
    matrix = coo_matrix((entries, (rows_all, cols_all)), shape=(missing.size, missing.size)).tocsc()
    solution = np.asarray(spsolve(matrix, right_hand_side)).reshape(missing.size, -1)
    generator = rng if rng is not None else np.random.default_rng(0)
    noise = noise_std * generator.standard_normal(solution.shape) if noise_std > 0 else 0.0
    result = flat_values.copy()
    result[:, missing] = (solution + noise).T
    return result.reshape(values.shape)
