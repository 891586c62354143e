"""Perturbation methods beyond occlusion: RISE and hierarchical perturbation (HiPe).

Both need forward passes only, so ``model`` may be a torch module or any runner (ONNX Runtime
included); the perturbed inputs of the whole batch go through :func:`forward_function`
``chunk_size`` at a time, and each chunk may mix images of the batch. Both take volumes
``[B, C, D, H, W]`` as well as images: RISE's grids and HiPe's cells are then cubes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from functools import partial
from types import MappingProxyType
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from service.explain.base import (
    Explainer,
    ExplainerError,
    ForwardFn,
    ModelLike,
    check_batch_and_targets,
    chunk_size_for,
    forward_function,
)
from service.explain.healthy.appearance import CARD_ENTRY as HEALTHY_CARD_ENTRY
from service.explain.healthy.appearance import HealthyAppearance, configured_healthy
from service.explain.hooks import eval_mode, module_device
from service.explain.methods.windows import paint_windows, window_mask
from service.explain.scores import SCORES, check_targets_on_first_image, forward_scores
from service.explain.settings import (
    boolean,
    choice,
    finite_float,
    float_in,
    optional_positive_int,
    positive_float,
    positive_int,
    seed_value,
)

#: What a perturbed region becomes: a constant (``baseline``), the Gaussian-blurred image, or the
#: image's healthy appearance h(x) (``healthy``: :mod:`service.explain.healthy`, Uzunova et al. 2019).
PERTURBATIONS = ("baseline", "blur", "healthy")
#: The model card's healthy-appearance file, for every method that takes ``perturbation="healthy"``.
HEALTHY_CARD_FILES: Mapping[str, str] = MappingProxyType({"healthy_model": HEALTHY_CARD_ENTRY})
#: h(x) of a batch (normalised units, same shape), on the runtime that matches the explained model.
HealthyFill = Callable[[torch.Tensor], torch.Tensor]


# --- forward passes -------------------------------------------------------------------------------


@contextmanager
def forward_context(model: ModelLike, batch: torch.Tensor) -> Iterator[tuple[ForwardFn, torch.device]]:
    """``(forward, device)`` for a torch module (in eval mode, restored on exit) or a runner.

    ``device`` is where the inputs should live: the module's device, else the batch's.
    """
    device = module_device(model) if isinstance(model, nn.Module) else None
    forward = forward_function(model)
    with eval_mode(model) if isinstance(model, nn.Module) else nullcontext():
        yield forward, device if device is not None else batch.device


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, C, H, W]`` (or ``[B, C, D, H, W]``) per channel (kernel
    radius 3 sigma, edges replicated)."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    spatial = tuple(images.shape[2:])
    conv = F.conv2d if len(spatial) == 2 else F.conv3d
    flat = images.reshape((-1, 1) + spatial)
    flat = F.pad(flat, (radius,) * (2 * len(spatial)), mode="replicate")
    for axis in reversed(range(len(spatial))):  # columns first, as before for images
        shape = [1, 1] + [1] * len(spatial)
        shape[2 + axis] = -1
        flat = conv(flat, kernel.view(shape))
    return flat.view(images.shape)


def healthy_fill(healthy: HealthyAppearance | None, model: ModelLike) -> HealthyFill | None:
    """h(x) on the runtime that matches ``model`` (see :meth:`HealthyAppearance.for_model`); ``None`` without a file."""
    return None if healthy is None else partial(healthy.for_model, model=model)


def replacement_images(
    inputs: torch.Tensor, perturbation: str, baseline: float, blur_sigma: float, healthy: HealthyFill | None = None
) -> torch.Tensor:
    """What perturbed pixels take: ``baseline`` everywhere, the image blurred with ``blur_sigma``, or
    (``"healthy"``) the image's healthy appearance ``healthy(inputs)``."""
    if perturbation == "blur":
        return gaussian_blur(inputs, blur_sigma)
    if perturbation == "healthy":
        if healthy is None:
            raise ExplainerError("perturbation 'healthy' needs a healthy-appearance model (the healthy_model setting)")
        return healthy(inputs)
    return torch.full_like(inputs, baseline)


def _interpolation_matrix(size_out: int, size_in: int) -> torch.Tensor:
    """``[size_out, size_in]`` float64: linear interpolation with half-pixel centres, mirrored edges.

    Output ``o`` samples the input at ``c = (o + 0.5) * size_in / size_out - 0.5``; outside
    ``[0, size_in - 1]`` the input is mirrored about its first and last samples (scipy.ndimage's
    ``mirror`` mode, which is scikit-image's ``reflect``).
    """
    matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
    if size_in == 1:
        return matrix + 1
    coordinate = (torch.arange(size_out, dtype=torch.float64) + 0.5) * size_in / size_out - 0.5
    coordinate = coordinate.abs()  # mirror below 0
    coordinate = torch.where(coordinate > size_in - 1, 2 * (size_in - 1) - coordinate, coordinate)
    low = coordinate.floor().long().clamp(0, size_in - 2)
    fraction = coordinate - low
    matrix[torch.arange(size_out), low] = 1 - fraction
    matrix[torch.arange(size_out), low + 1] += fraction
    return matrix


# --- RISE -------------------------------------------------------------------------------------------


class RISE(Explainer):
    """RISE, randomized input sampling (Petsiuk et al., 2018).

    ``masks`` random binary grids of ``cell_size`` x ``cell_size`` cells (each cell on with
    ``probability``) are upsampled bilinearly to ``(cell_size + 1)`` cells of
    ``ceil(H / cell_size)`` x ``ceil(W / cell_size)`` pixels, shifted by a random offset below one
    cell and cropped to H x W (so the soft edges fall anywhere, as in the authors' code). Each
    masked input is ``M * x + (1 - M) * R``, ``R`` the constant ``baseline`` (normalised units),
    with ``perturbation="blur"`` the image blurred with ``blur_sigma`` pixels, or with
    ``perturbation="healthy"`` the image's healthy appearance h(x) (``healthy_model``, from the
    card's ``auxiliary.healthy_appearance``: :mod:`service.explain.healthy`); the map is
    ``sum_i score_i * M_i / (masks * probability)``, the expected score given that a pixel is
    kept. ``score="probability"`` (the paper's) uses the softmax probability of the target,
    ``"logit"`` its logit. ``centred=True`` subtracts each image's mean score over the masks
    first: in expectation the same map less a constant (``E[M_i] = probability``), but the
    Monte-Carlo noise of the mask coverage, ``mean score * (sum_i M_i / (masks * p) - 1)``, is gone
    (a control variate), which matters when the score hardly varies compared with its mean.

    A volume ``[B, C, D, H, W]`` gets ``cell_size``³ grids, upsampled and shifted the same way
    along each of its three axes. The masks depend only on ``seed`` and the image size: they are
    drawn once per call from a
    fresh generator and the same masks explain every image of the batch, so a batch equals its
    single runs. :meth:`grids` and :meth:`masks` expose them. ``masks`` forward passes per image.
    """

    name: ClassVar[str] = "rise"
    needs_gradients: ClassVar[bool] = False
    card_files: ClassVar[Mapping[str, str]] = HEALTHY_CARD_FILES

    def __init__(
        self,
        masks: int = 4000,
        cell_size: int = 7,
        probability: float = 0.5,
        seed: int = 0,
        chunk_size: int | None = None,
        baseline: float = 0.0,
        score: str = "probability",
        perturbation: str = "baseline",
        blur_sigma: float = 10.0,
        centred: bool = False,
        healthy_model: str | os.PathLike[str] | None = None,
    ) -> None:
        self.n_masks = positive_int("masks", masks)
        self.cell_size = positive_int("cell_size", cell_size)
        self.probability = float_in("probability", probability, 0.0, 1.0, include_low=False)
        self.seed = seed_value(seed)
        self.chunk_size = optional_positive_int("chunk_size", chunk_size)
        self.baseline = finite_float("baseline", baseline)
        self.score = choice("score", score, SCORES)
        self.perturbation = choice("perturbation", perturbation, PERTURBATIONS)
        self.blur_sigma = positive_float("blur_sigma", blur_sigma)
        self.centred = boolean("centred", centred)
        self.healthy = configured_healthy(self.name, self.perturbation, healthy_model)

    def grids(self, *size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The random draws for ``height`` x ``width`` images (``depth, height, width`` volumes),
        on the CPU.

        ``grids``: float ``[masks, s, s]`` (``[masks, s, s, s]``) of 0/1 (``s = cell_size``);
        ``shifts``: long ``[masks, 2]`` (``[masks, 3]``), the (row, column) offset of the crop in
        the upsampled mask, each below the cell size in pixels.
        """
        cells = self._cell_pixels(*size)
        generator = torch.Generator().manual_seed(self.seed)
        grid_shape = (self.n_masks,) + (self.cell_size,) * len(size)
        grids = (torch.rand(grid_shape, generator=generator) < self.probability).to(torch.float32)
        offsets = torch.rand(self.n_masks, len(size), generator=generator)
        shifts = torch.stack(
            [(offsets[:, k] * cell).long().clamp_max(cell - 1) for k, cell in enumerate(cells)],
            dim=1,
        )
        return grids, shifts

    def masks(self, *size: int) -> torch.Tensor:
        """All masks ``[masks, height, width]`` (``[masks, depth, height, width]``; float32, CPU):
        what :meth:`explain` multiplies in."""
        grids, shifts = self.grids(*size)
        return self._upsample(grids, shifts, size)

    def _cell_pixels(self, *size: int) -> tuple[int, ...]:
        return tuple(-(-length // self.cell_size) for length in size)

    def _upsample(self, grids: torch.Tensor, shifts: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Bilinear (trilinear) upsampling of ``grids`` to (s + 1) cells, then each mask's shifted crop.

        As the authors' ``skimage.transform.resize(grid, up_size, order=1, mode="reflect")``:
        half-pixel centres, and the grid mirrored about its edge cells outside (not clamped).
        Separable, so only the cropped rows and columns (and slices) are computed.
        """
        axes = []
        for k, (length, cell) in enumerate(zip(size, self._cell_pixels(*size))):
            matrix = _interpolation_matrix((self.cell_size + 1) * cell, self.cell_size)
            axes.append(matrix[shifts[:, k, None] + torch.arange(length)])  # [n, length, s]
        grid_axes, out_axes = "ijk"[: len(size)], "xyz"[: len(size)]
        operands = ",".join(f"n{o}{g}" for o, g in zip(out_axes, grid_axes))
        masks = torch.einsum(f"{operands},n{grid_axes}->n{out_axes}", *axes, grids.to(torch.float64))
        return masks.to(torch.float32)

    def _explain(self, model: ModelLike, batch: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n_images = batch.shape[0]
        spatial = tuple(batch.shape[2:])
        grids, shifts = self.grids(*spatial)
        chunk = chunk_size_for(self.chunk_size, model)
        with forward_context(model, batch) as (forward, device):
            inputs = batch.detach().to(device)
            targets = targets.to(device)
            check_targets_on_first_image(forward, inputs, targets)
            fill = healthy_fill(self.healthy, model)
            replacement = replacement_images(inputs, self.perturbation, self.baseline, self.blur_sigma, fill)
            difference = inputs - replacement
            # float64 sums: thousands of terms, and centring subtracts two nearly equal sums
            saliency = torch.zeros((n_images,) + spatial, dtype=torch.float64, device=device)
            coverage = torch.zeros(spatial, dtype=torch.float64, device=device)  # sum_i M_i
            score_sums = torch.zeros(n_images, dtype=torch.float64, device=device)
            total = n_images * self.n_masks
            for start in range(0, total, chunk):
                # Flat index k -> (mask k // B, image k % B): a chunk needs only its own masks upsampled.
                index = torch.arange(start, min(start + chunk, total), device=device)
                mask_index, image = index // n_images, index % n_images
                first, last = int(mask_index[0]), int(mask_index[-1]) + 1
                masks = self._upsample(grids[first:last], shifts[first:last], spatial).to(device)
                kept = masks[mask_index - first, None].to(inputs.dtype)
                # M x + (1 - M) R = R + M (x - R); a constant R needs no gathered copy
                if self.perturbation == "baseline":
                    perturbed = torch.mul(kept, difference[image]).add_(self.baseline)
                else:
                    perturbed = torch.addcmul(replacement[image], kept, difference[image])
                scores = forward_scores(forward, perturbed, targets[image], self.score).to(torch.float64)
                # scores as a [B, masks of the chunk] matrix (0 where a pair is in another chunk)
                weights = torch.zeros(n_images, last - first, dtype=torch.float64, device=device)
                weights[image, mask_index - first] = scores
                masks = masks.to(torch.float64)
                saliency += torch.einsum("bm,m...->b...", weights, masks)
                score_sums += weights.sum(dim=1)
                coverage += masks[mask_index[image == 0] - first].sum(dim=0)  # each mask meets image 0 once
            if self.centred:
                saliency -= (score_sums / self.n_masks).view((-1,) + (1,) * len(spatial)) * coverage
        return (saliency / (self.n_masks * self.probability)).to(batch.device, batch.dtype)


# --- HiPe -------------------------------------------------------------------------------------------


class HiPe(Explainer):
    """Hierarchical perturbation (Cooper et al., 2022), forward passes only.

    Level ``l`` splits each image into ``n_l x n_l`` cells (``n_1 = initial_grid``, doubling
    at each level; cell ``i`` of an axis holds the pixels ``p`` with ``floor(p * n / size) = i``)
    and considers windows of 2 x 2 cells at a stride of one cell, border windows included
    (``(n + 1)^2`` windows, as in the authors' code). A window is perturbed (set to ``baseline``,
    to a Gaussian blur of the image with ``perturbation="blur"``, or to the image's healthy
    appearance h(x) with ``perturbation="healthy"``, see :class:`RISE`) only when the saliency
    accumulated so far reaches, somewhere inside it, the mid-range threshold ``(min + max) / 2``
    of that accumulated map; every window qualifies at level 1. Each perturbed window adds
    ``ReLU(score(x) - score(x_perturbed))`` (no ReLU with ``relu=False``) to all its pixels,
    so the map sums the evidence of all levels. ``score="probability"`` (default) uses the
    softmax probability of the target, ``"logit"`` the logit (the authors' code takes the raw
    model output). Levels continue while the window side, ``2 * min(H, W) / n``, is at least
    ``min_window`` pixels and cells are at least one pixel. The default ``min(H, W) // 32`` (a
    volume's: ``min(D, H, W) // 8``, as its windows grow with the cube of the grid) gives
    56, 28, 14 and 7 pixel windows at 224², one level finer than the authors' default depth,
    down to the feature-map cell of a typical CNN (on the demo model, with the card's black as
    baseline, it found 20 of 20 held-out phantom nodules where stopping at 14 pixels found 14).

    The number of forward passes depends on the image: :meth:`explain_with_passes` returns it per
    sample (one clean pass plus one per perturbed window). A volume is split into ``n_l``³ cells
    and its windows are 2 x 2 x 2 cells (``(n + 1)^3`` windows). Each sample's threshold and windows
    are its own, so a batch equals its single runs; nothing random.
    """

    name: ClassVar[str] = "hipe"
    needs_gradients: ClassVar[bool] = False
    card_files: ClassVar[Mapping[str, str]] = HEALTHY_CARD_FILES

    def __init__(
        self,
        initial_grid: int = 8,
        min_window: int | None = None,
        perturbation: str = "baseline",
        baseline: float = 0.0,
        blur_sigma: float = 10.0,
        score: str = "probability",
        relu: bool = True,
        chunk_size: int | None = None,
        healthy_model: str | os.PathLike[str] | None = None,
    ) -> None:
        self.initial_grid = positive_int("initial_grid", initial_grid)
        if self.initial_grid < 2:
            raise ExplainerError(f"initial_grid must be at least 2 cells per side, got {initial_grid!r}")
        self.min_window = None if min_window is None else positive_int("min_window", min_window)
        self.perturbation = choice("perturbation", perturbation, PERTURBATIONS)
        self.baseline = finite_float("baseline", baseline)
        self.blur_sigma = positive_float("blur_sigma", blur_sigma)
        self.score = choice("score", score, SCORES)
        self.relu = boolean("relu", relu)
        self.chunk_size = optional_positive_int("chunk_size", chunk_size)
        self.healthy = configured_healthy(self.name, self.perturbation, healthy_model)

    def levels(self, *size: int) -> list[int]:
        """Cells per side at each level for ``height`` x ``width`` images (or ``depth, height,
        width`` volumes, whose cells and windows are boxes of the same count along each axis)."""
        side = min(size)
        if self.initial_grid > side:
            raise ExplainerError(
                f"initial_grid ({self.initial_grid}) has cells below one pixel on the {'x'.join(map(str, size))} image"
            )
        # A volume has (n + 1)³ windows a level: its default stops at 1/8 of the side (6 voxels at 48³).
        default = side // 32 if len(size) == 2 else side // 8
        min_window = self.min_window if self.min_window is not None else max(1, default)
        cells = [self.initial_grid]
        while cells[-1] * 2 <= side and 2 * side / (cells[-1] * 2) >= min_window:
            cells.append(cells[-1] * 2)
        return cells

    def explain_with_passes(
        self, model: ModelLike, batch: torch.Tensor, targets: Sequence[int]
    ) -> tuple[torch.Tensor, list[int]]:
        """The maps ``[B, H, W]`` (as :meth:`explain`) and the forward passes each sample used."""
        batch, target_tensor = check_batch_and_targets(batch, targets, volumes=self.supports_volumes, method=self.name)
        maps, passes = self._run(model, batch, target_tensor)
        return maps.detach().to(torch.float32), passes.tolist()

    def _explain(self, model: ModelLike, batch: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self._run(model, batch, targets)[0]

    def _run(self, model: ModelLike, batch: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_images = batch.shape[0]
        spatial = tuple(batch.shape[2:])
        levels = self.levels(*spatial)
        chunk = chunk_size_for(self.chunk_size, model)
        with forward_context(model, batch) as (forward, device):
            inputs = batch.detach().to(device)
            targets = targets.to(device)
            clean = forward_scores(forward, inputs, targets, self.score, chunk)
            fill = healthy_fill(self.healthy, model)
            replacement = replacement_images(inputs, self.perturbation, self.baseline, self.blur_sigma, fill)
            saliency = torch.zeros((n_images,) + spatial, dtype=clean.dtype, device=device)
            passes = torch.ones(n_images, dtype=torch.long, device=device)
            window_axes = tuple(range(1, len(spatial) + 1))
            for cells in levels:
                axes = [self._window_masks(size, cells, device) for size in spatial]
                selected = self._window_peaks(saliency, cells) >= self._thresholds(saliency)
                drops = torch.zeros((n_images,) + (cells + 1,) * len(spatial), dtype=clean.dtype, device=device)
                image, *where = selected.nonzero(as_tuple=True)
                for part in torch.arange(len(image), device=device).split(chunk):
                    b, index = image[part], [position[part] for position in where]
                    window = window_mask(axes, index)[:, None]
                    perturbed = torch.where(window, replacement[b], inputs[b])
                    drop = clean[b] - forward_scores(forward, perturbed, targets[b], self.score)
                    drops[(b, *index)] = drop.clamp_min(0) if self.relu else drop
                saliency += paint_windows(drops, axes)
                passes += selected.sum(dim=window_axes)
        return saliency.to(batch.device), passes.cpu()

    @staticmethod
    def _cell_index(size: int, cells: int, device: torch.device) -> torch.Tensor:
        """Cell of each position along an axis of ``size`` pixels split into ``cells``: ``[size]``."""
        return torch.arange(size, device=device) * cells // size

    @classmethod
    def _window_masks(cls, size: int, cells: int, device: torch.device) -> torch.Tensor:
        """Boolean ``[cells + 1, size]``: window ``w`` covers cells ``w - 1`` and ``w``."""
        cell = cls._cell_index(size, cells, device)[None, :]
        start = torch.arange(-1, cells, device=device)[:, None]
        return (cell >= start) & (cell <= start + 1)

    @classmethod
    def _window_peaks(cls, saliency: torch.Tensor, cells: int) -> torch.Tensor:
        """``[B, cells + 1, cells + 1]`` (a third axis for volumes): the largest accumulated
        saliency inside each window."""
        device = saliency.device
        spatial = tuple(saliency.shape[1:])
        cell_id = torch.zeros(spatial, dtype=torch.long, device=device)
        for k, size in enumerate(spatial):
            shape = tuple(size if j == k else 1 for j in range(len(spatial)))
            cell_id = cell_id * cells + cls._cell_index(size, cells, device).view(shape)
        peaks = torch.full((saliency.shape[0], cells ** len(spatial)), -torch.inf, dtype=saliency.dtype, device=device)
        peaks = peaks.scatter_reduce(
            1, cell_id.flatten().expand(saliency.shape[0], -1), saliency.flatten(1), reduce="amax"
        )
        peaks = F.pad(peaks.view((-1, 1) + (cells,) * len(spatial)), (1,) * (2 * len(spatial)), value=-torch.inf)
        pool = F.max_pool2d if len(spatial) == 2 else F.max_pool3d
        return pool(peaks, kernel_size=2, stride=1)[:, 0]

    @staticmethod
    def _thresholds(saliency: torch.Tensor) -> torch.Tensor:
        """Each sample's mid-range ``(min + max) / 2`` of its accumulated map, ``[B, 1, 1(, 1)]``."""
        every = tuple(range(1, saliency.ndim))
        low, high = saliency.amin(dim=every), saliency.amax(dim=every)
        return (low + (high - low) / 2).view((-1,) + (1,) * len(every))
