"""Optimisation family: meaningful perturbation and extremal perturbation.

Both learn a mask ``m`` in ``[0, 1]`` per image by gradient descent through the model: ``m = 1``
keeps a pixel, ``m = 0`` replaces it by a perturbation ``R`` (the image blurred with a Gaussian
of ``blur_sigma`` pixels, the constant ``baseline`` in normalised input units, or the image's
healthy appearance h(x), :mod:`service.explain.healthy`), so the model sees
``x * m + R * (1 - m)``. ``healthy_perturbation`` is meaningful perturbation with ``R = h(x)``
(Uzunova et al. 2019). They need gradients with respect to the input, hence a torch
module: gradients are taken with ``torch.autograd.grad`` with respect to the mask parameters
only, so no parameter of the model receives a ``.grad`` and no weight gradient is computed.

Batch-first: the ``B`` masks of a batch are optimised together. Every loss term is per sample,
so the gradient of their sum holds each sample's own gradient, and the optimisers (Adam, SGD
with momentum) update each element on its own: a batch gives its single runs. Jitter (a random
shift of the perturbed input by up to ``jitter`` pixels per iteration, edges replicated) is drawn
once per call from ``seed`` and is the same for every image of the batch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from service.explain.base import (
    Explainer,
    ExplainerError,
    ModelLike,
    check_batch_and_targets,
    check_logits,
    torch_module_of,
)
from service.explain.healthy.appearance import HealthyAppearance, configured_healthy
from service.explain.hooks import module_device
from service.explain.methods.gradient import gradient_context
from service.explain.methods.perturbation import HEALTHY_CARD_FILES, PERTURBATIONS, healthy_fill, replacement_images
from service.explain.scores import SCORES, target_scores
from service.explain.settings import (
    choice,
    finite_float,
    fractions,
    non_negative_int,
    positive_float,
    positive_int,
    seed_value,
)

#: Inverse temperature of the smooth max that pools the extremal mask's grid points (TorchRay's value).
SMOOTH_MAX_COLDNESS = 20.0
#: Mask values closer than this are ranked in a seeded random order by the area regulariser.
TIE_BREAK = 1e-4


# --- shared pieces --------------------------------------------------------------------------------


def jitter_shifts(iterations: int, jitter: int, seed: int) -> list[tuple[int, int]]:
    """The (row, column) shift of each iteration, each in ``[-jitter, jitter]``, from ``seed``."""
    if jitter == 0:
        return [(0, 0)] * iterations
    generator = torch.Generator().manual_seed(seed)
    shifts = torch.randint(-jitter, jitter + 1, (iterations, 2), generator=generator)
    return [(int(dy), int(dx)) for dy, dx in shifts]


def shift_images(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``images`` moved by ``dy`` rows and ``dx`` columns (``out[u] = in[u - shift]``), edges replicated."""
    if dy == 0 and dx == 0:
        return images
    pad = max(abs(dy), abs(dx))
    height, width = images.shape[-2:]
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    return padded[..., pad - dy : pad - dy + height, pad - dx : pad - dx + width]


def differentiable_scores(logits: torch.Tensor, targets: torch.Tensor, score: str) -> torch.Tensor:
    """Each row's :func:`~service.explain.scores.target_scores` ``[N]``; an error when they carry no gradient."""
    scores = target_scores(logits, targets, score)
    if not scores.requires_grad:
        raise ExplainerError(
            "the logits of the model do not depend on its input through autograd "
            "(is the forward pass wrapped in torch.no_grad?)"
        )
    return scores


@dataclass
class Adam:
    """Adam (Kingma & Ba, 2015) on one tensor, parameters clamped to ``[0, 1]`` after each step.

    Element-wise, so the masks of a batch move exactly as in single runs. Written out rather than
    ``torch.optim.Adam``, whose first step imports ``torch._dynamo`` (seconds) and which works
    through ``.grad``.
    """

    parameter: torch.Tensor
    learning_rate: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    steps: int = field(default=0, init=False)
    first: torch.Tensor = field(init=False)
    second: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.first = torch.zeros_like(self.parameter, requires_grad=False)
        self.second = torch.zeros_like(self.parameter, requires_grad=False)

    def minimise(self, loss: torch.Tensor) -> None:
        """One step down the gradient of ``loss`` with respect to the parameter alone."""
        (gradient,) = torch.autograd.grad(loss, self.parameter)
        beta1, beta2 = self.betas
        self.steps += 1
        with torch.no_grad():
            self.first.mul_(beta1).add_(gradient, alpha=1 - beta1)
            self.second.mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
            first = self.first / (1 - beta1**self.steps)
            second = self.second / (1 - beta2**self.steps)
            self.parameter.sub_(self.learning_rate * first / (second.sqrt() + self.eps))
            self.parameter.clamp_(0, 1)


@dataclass
class MomentumSGD:
    """SGD with momentum and dampening (TorchRay's optimiser for extremal perturbation) on one
    tensor, parameters clamped to ``[0, 1]`` after each step.

    ``v <- g`` at the first step, then ``v <- momentum v + (1 - dampening) g``; ``p <- p - lr v``
    (``torch.optim.SGD``'s rule). Element-wise, so a batch moves as its single runs. Unlike Adam,
    the step keeps the gradient's size, so pixels whose evidence slows their fall overtake the rest
    in the area ranking.
    """

    parameter: torch.Tensor
    learning_rate: float
    momentum: float = 0.9
    dampening: float = 0.9
    velocity: torch.Tensor | None = field(default=None, init=False)

    def minimise(self, loss: torch.Tensor) -> None:
        """One step down the gradient of ``loss`` with respect to the parameter alone."""
        (gradient,) = torch.autograd.grad(loss, self.parameter)
        with torch.no_grad():
            if self.velocity is None:
                self.velocity = gradient.clone()
            else:
                self.velocity.mul_(self.momentum).add_(gradient, alpha=1 - self.dampening)
            self.parameter.sub_(self.learning_rate * self.velocity)
            self.parameter.clamp_(0, 1)


class _MaskOptimisation(Explainer):
    """What both methods share: settings of the perturbation and the jitter, and the set-up."""

    needs_gradients: ClassVar[bool] = True
    card_files: ClassVar[Mapping[str, str]] = HEALTHY_CARD_FILES
    #: The smooth masks and the blur are written for images.
    supports_volumes: ClassVar[bool] = False
    perturbation: str
    baseline: float
    blur_sigma: float
    healthy: HealthyAppearance | None

    def _prepare(self, model: ModelLike, batch: torch.Tensor) -> tuple[nn.Module, torch.device]:
        module = torch_module_of(model, self.name)
        device = module_device(module)
        return module, batch.device if device is None else device

    def _replacement(self, inputs: torch.Tensor, module: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            fill = healthy_fill(self.healthy, module)
            return replacement_images(inputs, self.perturbation, self.baseline, self.blur_sigma, fill)


# --- meaningful perturbation ---------------------------------------------------------------------


class MeaningfulPerturbation(_MaskOptimisation):
    """Meaningful perturbation, deletion game (Fong & Vedaldi, ICCV 2017).

    A ``mask_size`` x ``mask_size`` mask, initialised to 1 (keep everything) and upsampled
    bilinearly to the image, is learnt with Adam (``iterations`` steps of ``learning_rate``,
    clamped to ``[0, 1]`` after each) to minimise, per image,

        area_weight * mean((1 - m) ** area_exponent) + tv_weight * TV_beta(m) + score(perturbed input)

    where ``TV_beta(m)`` is the mean of ``|m(u + e) - m(u)| ** tv_beta`` over vertical and
    horizontal neighbours of the coarse mask (means, so the weights do not depend on
    ``mask_size``), and the score is the target's softmax probability (``score="probability"``,
    the paper's) or its logit. The smallest, smoothest deletion that destroys the score wins.
    The map is ``1 - m`` upsampled to ``[H, W]``: 1 where deleting the pixel matters, 0 where
    the pixel was kept. Perturbed pixels blend towards the image blurred with ``blur_sigma``
    pixels (the paper's sigma_0 = 10 at 224 px; a blend with one blurred image rather than a
    spatially varying blur), towards the constant ``baseline``, or (``perturbation="healthy"``,
    see :class:`HealthyPerturbation`) towards the image's healthy appearance h(x) from
    ``healthy_model``. Each iteration shifts the
    perturbed input by up to ``jitter`` pixels (the paper's 4), drawn from ``seed``.

    With a saturated probability (a confident model, ``p`` very close to 1) the score's gradient
    is too small to beat the area term at a mask of ones, nothing is deleted and the map is 0:
    use ``score="logit"`` there (``area_weight`` is then in logit units).
    """

    name: ClassVar[str] = "meaningful_perturbation"

    def __init__(
        self,
        iterations: int = 300,
        learning_rate: float = 0.1,
        area_weight: float = 0.05,
        area_exponent: float = 1.0,
        tv_weight: float = 0.2,
        tv_beta: float = 3.0,
        mask_size: int = 28,
        perturbation: str = "blur",
        blur_sigma: float = 10.0,
        baseline: float = 0.0,
        score: str = "probability",
        jitter: int = 4,
        seed: int = 0,
        healthy_model: str | os.PathLike[str] | None = None,
    ) -> None:
        self.iterations = positive_int("iterations", iterations)
        self.learning_rate = positive_float("learning_rate", learning_rate)
        self.area_weight = finite_float("area_weight", area_weight, minimum=0.0)
        # Exponents >= 1 keep the gradients finite at 0.
        self.area_exponent = finite_float("area_exponent", area_exponent, minimum=1.0)
        self.tv_weight = finite_float("tv_weight", tv_weight, minimum=0.0)
        self.tv_beta = finite_float("tv_beta", tv_beta, minimum=1.0)
        self.mask_size = positive_int("mask_size", mask_size)
        self.perturbation = choice("perturbation", perturbation, PERTURBATIONS)
        self.blur_sigma = positive_float("blur_sigma", blur_sigma)
        self.baseline = finite_float("baseline", baseline)
        self.score = choice("score", score, SCORES)
        self.jitter = non_negative_int("jitter", jitter)
        self.seed = seed_value(seed)
        self.healthy = configured_healthy(self.name, self.perturbation, healthy_model)

    def _explain(self, model: ModelLike, batch: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        module, device = self._prepare(model, batch)
        n_images, _, height, width = batch.shape
        shifts = jitter_shifts(self.iterations, self.jitter, self.seed)
        with gradient_context(module):
            inputs = batch.detach().to(device).clone()
            targets = targets.to(device).clone()  # an ordinary tensor even if the caller is in inference mode
            replacement = self._replacement(inputs, module)
            difference = inputs - replacement
            mask = torch.ones(n_images, 1, self.mask_size, self.mask_size, dtype=inputs.dtype, device=device)
            mask.requires_grad_(True)
            optimiser = Adam(mask, self.learning_rate)
            for dy, dx in shifts:
                kept = self._upsample(mask, height, width)
                perturbed = shift_images(replacement + kept * difference, dy, dx)
                scores = differentiable_scores(module(perturbed), targets, self.score)
                loss = self.area_weight * (1 - mask).pow(self.area_exponent).mean(dim=(1, 2, 3))
                loss = loss + self.tv_weight * self._total_variation(mask) + scores
                optimiser.minimise(loss.sum())
            with torch.no_grad():
                saliency = 1 - self._upsample(mask, height, width)[:, 0]
        return saliency.to(batch.device)

    @staticmethod
    def _upsample(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False)

    def _total_variation(self, mask: torch.Tensor) -> torch.Tensor:
        """Per sample ``[B]``: mean ``|difference| ** tv_beta`` of vertical plus horizontal neighbours."""
        if self.mask_size == 1:
            return torch.zeros(mask.shape[0], dtype=mask.dtype, device=mask.device)
        rows = (mask[:, :, 1:, :] - mask[:, :, :-1, :]).abs().pow(self.tv_beta).mean(dim=(1, 2, 3))
        cols = (mask[:, :, :, 1:] - mask[:, :, :, :-1]).abs().pow(self.tv_beta).mean(dim=(1, 2, 3))
        return rows + cols


class HealthyPerturbation(MeaningfulPerturbation):
    """Meaningful perturbation with healthy-tissue replacement (Uzunova, Ehrhardt, Kepp & Handels,
    SPIE Medical Imaging 2019).

    :class:`MeaningfulPerturbation`'s deletion game, every setting and default the same, with the
    perturbed input ``x * m + h(x) * (1 - m)``: a deleted region shows the image's healthy
    appearance h(x), the reconstruction of a variational autoencoder trained on normal images
    only (:mod:`service.explain.healthy`), instead of a blur or a constant, which are implausible
    in a radiograph and out of the classifier's distribution. ``healthy_model`` is that model's
    file; the node takes it from the model card's ``auxiliary.healthy_appearance``. It needs the
    card's input grid: another image size is refused with the sizes in the message.
    """

    name: ClassVar[str] = "healthy_perturbation"

    def __init__(
        self,
        iterations: int = 300,
        learning_rate: float = 0.1,
        area_weight: float = 0.05,
        area_exponent: float = 1.0,
        tv_weight: float = 0.2,
        tv_beta: float = 3.0,
        mask_size: int = 28,
        score: str = "probability",
        jitter: int = 4,
        seed: int = 0,
        healthy_model: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(
            iterations=iterations,
            learning_rate=learning_rate,
            area_weight=area_weight,
            area_exponent=area_exponent,
            tv_weight=tv_weight,
            tv_beta=tv_beta,
            mask_size=mask_size,
            perturbation="healthy",
            score=score,
            jitter=jitter,
            seed=seed,
            healthy_model=healthy_model,
        )


# --- extremal perturbation -----------------------------------------------------------------------


def smooth_max(values: torch.Tensor, dim: int) -> torch.Tensor:
    """``sum_k v_k softmax(c v)_k`` along ``dim`` (``c`` = :data:`SMOOTH_MAX_COLDNESS`): a
    differentiable max that passes gradient to every near-maximal element."""
    return (values * torch.softmax(SMOOTH_MAX_COLDNESS * values, dim=dim)).sum(dim=dim)


def grid_weights(size: int, cells: int, margin: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    """``[size, cells + 2 margin]``: ``exp(-d^2 / (2 sigma^2))``, ``d`` the distance (in grid steps)
    from each pixel centre to each grid point. Grid points sit at the centres of ``cells`` equal
    cells across the image, plus ``margin`` more outside each edge."""
    pixel = (torch.arange(size, dtype=like.dtype, device=like.device) + 0.5) * cells / size - 0.5
    point = torch.arange(-margin, cells + margin, dtype=like.dtype, device=like.device)
    return torch.exp(-((pixel[:, None] - point[None, :]) ** 2) / (2 * sigma**2))


def mirrored_index(cells: int, margin: int, device: torch.device) -> torch.Tensor:
    """``[cells + 2 margin]``: the grid index each padded grid point copies, mirrored about the
    image edge (point ``-1`` copies ``0``, ``-2`` copies ``1``, ...; repeated for wide margins)."""
    index = torch.arange(-margin, cells + margin, device=device) % (2 * cells)
    return torch.where(index < cells, index, 2 * cells - 1 - index)


def ranked_values(values: torch.Tensor, tie_breaker: torch.Tensor) -> torch.Tensor:
    """``values`` sorted ascending along the last dimension, differentiable (a gather).

    Values closer than ``TIE_BREAK`` are ordered by ``tie_breaker`` rather than by position: equal
    parameters give a periodic mask full of exact ties, and ``sort`` would rank the last rows of the
    image highest, which the area regulariser then keeps.
    """
    order = (values.detach() + tie_breaker).argsort(dim=-1)
    return values.gather(-1, order)


@dataclass
class SmoothMasks:
    """Smooth masks ``[..., H, W]`` in ``[0, 1]`` from grid parameters ``[..., h, w]`` in ``[0, 1]``.

    ``m(u) = min(1, smax_k g(u - u_k) p_k / s)``: the paper's smooth max-convolution of the grid
    with a Gaussian ``g`` of ``sigma`` grid steps, computed separably (along columns, then rows):
    exact for the hard max (``g`` factorises and its weights, >= 0, come out of the inner max), a
    close approximation for the smooth max, at ``O(H W h)`` memory per mask instead of
    ``O(H W h w)``. The grid is extended by ``ceil(sigma)`` points beyond each edge that mirror the
    inner ones (no parameters of their own), so a border pixel pools the same neighbourhood as an
    inner one: with equal parameters the mask is the same periodic pattern everywhere. (Without
    them the corners pool least, come out highest at the start, and the area regulariser, which
    rewards whatever ranks highest, keeps the corners.) ``s`` is the largest value an all-ones grid
    gives, so a fully kept region is 1 rather than the smooth max's diluted ~0.95 (hence the min).
    """

    height: int
    width: int
    cells: int
    sigma: float
    like: torch.Tensor = field(repr=False)
    rows: torch.Tensor = field(init=False, repr=False)
    cols: torch.Tensor = field(init=False, repr=False)
    index: torch.Tensor = field(init=False, repr=False)
    scale: float = field(init=False)

    def __post_init__(self) -> None:
        margin = math.ceil(self.sigma)
        self.rows = grid_weights(self.height, self.cells, margin, self.sigma, self.like)
        self.cols = grid_weights(self.width, self.cells, margin, self.sigma, self.like)
        self.index = mirrored_index(self.cells, margin, self.like.device)
        self.scale = 1.0
        with torch.no_grad():
            ones = torch.ones(self.cells, self.cells, dtype=self.like.dtype, device=self.like.device)
            self.scale = float(self._pooled(ones).max())

    def __call__(self, parameters: torch.Tensor) -> torch.Tensor:
        return (self._pooled(parameters) / self.scale).clamp(max=1)

    def _pooled(self, parameters: torch.Tensor) -> torch.Tensor:
        padded = parameters[..., self.index, :][..., self.index]
        along_cols = smooth_max(padded[..., :, None, :] * self.cols, dim=-1)  # [..., h, W]
        return smooth_max(along_cols[..., None, :, :] * self.rows[:, :, None], dim=-2)  # [..., H, W]


class ExtremalPerturbation(_MaskOptimisation):
    """Extremal perturbation, preservation game (Fong, Patrick & Vedaldi, ICCV 2019).

    For each area fraction ``a`` in ``areas``, a smooth mask is learnt that keeps about ``a`` of
    the image and maximises the target score of ``x * m + R * (1 - m)``.

    - Smooth masks (see :class:`SmoothMasks`): a ``mask_size`` x ``mask_size`` grid of parameters
      ``p`` in ``[0, 1]``, initialised to 1, pooled by the paper's smooth max of Gaussian-weighted
      grid points, ``m(u) = smax_k g_sigma(u - u_k) p_k``, so a mask is a union of smooth blobs.
      ``sigma`` is in grid steps; TorchRay's 7 px step and 21 px sigma at 224 px are
      ``mask_size=32``, ``sigma=3``.
    - Area: the paper's ranking regulariser ``lambda_t * mean((sort(vec m) - r_a) ** 2)``, ``r_a``
      holding ``floor((1 - a) N)`` zeros then ones (``N = H W``), with
      ``lambda_t = regulariser_weight * regulariser_growth ** t``: TorchRay's 300, grown by its
      total factor of 16 (1.0035 over 800 iterations) over the default 300 iterations.
    - Optimiser: SGD with momentum 0.9 and dampening 0.9, ``learning_rate`` 0.01, parameters
      clamped to ``[0, 1]`` (TorchRay's), on ``-score + regulariser`` summed over all masks of
      the batch. Not Adam: Adam's per-element normalisation makes every falling parameter fall at
      the same speed, so the evidence no longer decides which pixels the area ranking keeps.
    - Score: the target logit (``"logit"``, TorchRay's default reward) or its softmax probability.
      The regulariser weight is in score units: with a model whose target logit moves by much
      less than about 1 between kept and perturbed, lower ``regulariser_weight``.
    - Each iteration shifts the perturbed input by up to ``jitter`` pixels drawn from ``seed``
      (in place of TorchRay's horizontal flips, which would mirror laterality); ``seed`` also
      orders exact ties in the area ranking (see :func:`ranked_values`).
    - Perturbed pixels blend towards the image blurred with ``blur_sigma`` pixels (TorchRay's
      strongest blur, 20 px at 224 px; one blurred image rather than its blur pyramid), the
      constant ``baseline``, or the image's healthy appearance h(x) (``perturbation="healthy"``).

    The map is the mean over ``areas`` of the final masks, ``[H, W]`` in ``[0, 1]`` (the paper
    sums them; the mean keeps the ranking and the unit range). :meth:`masks` returns each area's
    mask. Every image and area is an independent problem, so a batch equals its single runs.
    """

    name: ClassVar[str] = "extremal_perturbation"

    def __init__(
        self,
        areas: float | Sequence[float] = (0.1,),
        iterations: int = 300,
        learning_rate: float = 0.01,
        mask_size: int = 32,
        sigma: float = 3.0,
        perturbation: str = "blur",
        blur_sigma: float = 20.0,
        baseline: float = 0.0,
        regulariser_weight: float = 300.0,
        regulariser_growth: float = 1.0093,
        score: str = "logit",
        jitter: int = 4,
        seed: int = 0,
        healthy_model: str | os.PathLike[str] | None = None,
    ) -> None:
        self.areas = fractions("areas", areas)
        self.iterations = positive_int("iterations", iterations)
        self.learning_rate = positive_float("learning_rate", learning_rate)
        self.mask_size = positive_int("mask_size", mask_size)
        self.sigma = positive_float("sigma", sigma)
        self.perturbation = choice("perturbation", perturbation, PERTURBATIONS)
        self.blur_sigma = positive_float("blur_sigma", blur_sigma)
        self.baseline = finite_float("baseline", baseline)
        self.regulariser_weight = positive_float("regulariser_weight", regulariser_weight)
        self.regulariser_growth = finite_float("regulariser_growth", regulariser_growth, minimum=1.0)
        self.score = choice("score", score, SCORES)
        self.jitter = non_negative_int("jitter", jitter)
        self.seed = seed_value(seed)
        self.healthy = configured_healthy(self.name, self.perturbation, healthy_model)

    def masks(self, model: ModelLike, batch: torch.Tensor, targets: Sequence[int]) -> torch.Tensor:
        """Each area's final mask, float32 ``[B, len(areas), H, W]`` in ``[0, 1]`` (1 = kept)."""
        batch, target_tensor = check_batch_and_targets(batch, targets)
        return self._masks(model, batch, target_tensor).detach().to(torch.float32)

    def _explain(self, model: ModelLike, batch: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self._masks(model, batch, targets).mean(dim=1)

    def _masks(self, model: ModelLike, batch: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        module, device = self._prepare(model, batch)
        n_images, channels, height, width = batch.shape
        n_areas = len(self.areas)
        shifts = jitter_shifts(self.iterations, self.jitter, self.seed)
        with gradient_context(module):
            inputs = batch.detach().to(device).clone()
            targets = targets.to(device).clone()  # an ordinary tensor even if the caller is in inference mode
            mask_targets = targets.repeat_interleave(n_areas)
            replacement = self._replacement(inputs, module)
            difference = (inputs - replacement)[:, None]
            replacement = replacement[:, None]
            smooth_masks = SmoothMasks(height, width, self.mask_size, self.sigma, inputs)
            reference = self._reference(height * width, inputs)
            tie_breaker = self._tie_breaker(height * width, inputs)
            shape = (n_images, n_areas, self.mask_size, self.mask_size)
            parameters = torch.ones(shape, dtype=inputs.dtype, device=device).requires_grad_(True)
            optimiser = MomentumSGD(parameters, self.learning_rate)
            weight = self.regulariser_weight
            for dy, dx in shifts:
                masks = smooth_masks(parameters)  # [B, A, H, W]
                perturbed = replacement + masks[:, :, None] * difference
                perturbed = shift_images(perturbed.reshape(-1, channels, height, width), dy, dx)
                logits = module(perturbed)
                check_logits(logits[::n_areas], targets)  # errors name the caller's targets, once each
                scores = differentiable_scores(logits, mask_targets, self.score)
                ranked = ranked_values(masks.flatten(2), tie_breaker)
                regulariser = ((ranked - reference) ** 2).mean(dim=2)
                optimiser.minimise((weight * regulariser).sum() - scores.sum())
                weight *= self.regulariser_growth
            with torch.no_grad():
                masks = smooth_masks(parameters)
        return masks.to(batch.device)

    def _tie_breaker(self, pixels: int, like: torch.Tensor) -> torch.Tensor:
        """``[N]`` values in ``[0, TIE_BREAK)`` from ``seed``: the order among (nearly) equal mask values."""
        generator = torch.Generator().manual_seed(self.seed)
        return (TIE_BREAK * torch.rand(pixels, generator=generator, dtype=torch.float64)).to(like.device, like.dtype)

    def _reference(self, pixels: int, like: torch.Tensor) -> torch.Tensor:
        """``[A, N]``: for each area ``a``, ``floor((1 - a) N)`` zeros then ones (sorted target mask)."""
        reference = torch.ones(len(self.areas), pixels, dtype=like.dtype, device=like.device)
        for row, area in enumerate(self.areas):
            reference[row, : math.floor(pixels * (1 - area))] = 0
        return reference
