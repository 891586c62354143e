"""Surrogate models over superpixels: LIME and KernelSHAP, forward passes only.

Both switch superpixels off (set them to ``baseline``, normalised input units) in random
coalitions, score each perturbed image with the model, fit a weighted linear model of the score
on the binary coalition vectors, and paint each superpixel with its fitted weight (the intercept
is not painted). ``model`` may be a torch module or any runner; the perturbed inputs of the whole
batch go through the model ``chunk_size`` at a time.

Superpixels come from SLIC (``skimage.segmentation.slic``) on each image rescaled to [0, 1]
(min-max per image and channel, so the settings do not depend on the model card's
normalisation), in intensity-only mode (``channel_axis=None``) for one-channel images. SLIC's
k-means in (intensity, position) space takes a target count (``n_segments``), so the number of
features, and with it the samples a fit needs, is under control, which Felzenszwalb's graph
segmentation (a scale, not a count) does not offer. ``compactness`` trades intensity against
position: for [0, 1] intensities 0.01 to 1 is the useful range; the default 0.3 gives, on the
phantom chest radiographs at 224², about 50 compact regions whose edges follow the lung,
mediastinum and spine borders (0.1 gives irregular strips along the ribs, 1 a near-regular
grid). ``smoothing`` is SLIC's Gaussian pre-smoothing ``sigma`` in pixels, which keeps quantum
noise from fragmenting regions. :meth:`_Surrogate.segment` exposes the superpixels;
``explain(..., feature_mask=...)`` uses given features instead (``[H, W]`` for the whole batch
or ``[B, H, W]``, any integer ids).

Randomness comes from a fresh ``torch.Generator`` seeded with ``seed`` for every sample, so a
sample's result does not depend on the rest of the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
from skimage.segmentation import slic

from service.explain.base import Explainer, ExplainerError, ModelLike, check_batch_and_targets, chunk_size_for
from service.explain.methods.perturbation import forward_context
from service.explain.scores import SCORES, check_targets_on_first_image, forward_scores
from service.explain.settings import (
    choice,
    finite_float,
    optional_positive_int,
    positive_float,
    positive_int,
    seed_value,
)


class _Surrogate(Explainer):
    """Shared machinery: superpixels, perturbed forward passes, painting back."""

    needs_gradients: ClassVar[bool] = False
    #: SLIC superpixels and the painting back are written for images.
    supports_volumes: ClassVar[bool] = False

    def __init__(
        self,
        samples: int,
        seed: int,
        n_segments: int,
        compactness: float,
        smoothing: float,
        baseline: float,
        score: str,
        chunk_size: int | None,
    ) -> None:
        self.samples = positive_int("samples", samples)
        self.seed = seed_value(seed)
        self.n_segments = positive_int("n_segments", n_segments)
        self.compactness = positive_float("compactness", compactness)
        self.smoothing = finite_float("smoothing", smoothing, minimum=0.0)
        self.baseline = finite_float("baseline", baseline)
        self.score = choice("score", score, SCORES)
        self.chunk_size = optional_positive_int("chunk_size", chunk_size)

    # --- what a method defines -------------------------------------------------------------------

    def coalitions(self, n_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The coalitions one sample is scored on and their regression weights.

        Returns ``(z, weights)``: float64 ``[S, M]`` of 0/1 (1 = superpixel kept) and ``[S]``,
        on the CPU, deterministic from ``seed`` and ``n_features``.
        """
        raise NotImplementedError

    def _fit(self, z: torch.Tensor, weights: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Per-feature attributions ``[M]`` (float64) from one sample's coalitions and scores."""
        raise NotImplementedError

    # --- explain ------------------------------------------------------------------------------------

    def explain(
        self,
        model: ModelLike,
        batch: torch.Tensor,
        targets: Sequence[int],
        *,
        feature_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Signed maps ``[B, H, W]``; ``feature_mask`` replaces the superpixels when given."""
        batch, target_tensor = check_batch_and_targets(batch, targets, method=self.name)
        segments = self.segment(batch) if feature_mask is None else _check_feature_mask(feature_mask, batch)
        return self._run(model, batch, target_tensor, segments).detach().to(torch.float32)

    def _explain(self, model: ModelLike, batch: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self._run(model, batch, targets, self.segment(batch))

    def segment(self, batch: torch.Tensor) -> torch.Tensor:
        """SLIC superpixels of each image, long ``[B, H, W]`` with ids ``0..M_b - 1``."""
        if not isinstance(batch, torch.Tensor) or batch.ndim != 4:
            raise ExplainerError(f"batch must be a torch.Tensor [B, C, H, W], got {getattr(batch, 'shape', batch)!r}")
        images = batch.detach().to("cpu", torch.float64).numpy()
        labels = []
        for image in images:
            low = image.min(axis=(1, 2), keepdims=True)
            span = image.max(axis=(1, 2), keepdims=True) - low
            scaled = np.where(span > 0, (image - low) / np.where(span > 0, span, 1.0), 0.0)
            if scaled.shape[0] == 1:
                segments = slic(
                    scaled[0],
                    n_segments=self.n_segments,
                    compactness=self.compactness,
                    sigma=self.smoothing,
                    channel_axis=None,
                    start_label=0,
                )
            else:
                segments = slic(
                    np.moveaxis(scaled, 0, -1),
                    n_segments=self.n_segments,
                    compactness=self.compactness,
                    sigma=self.smoothing,
                    channel_axis=-1,
                    convert2lab=False,
                    start_label=0,
                )
            labels.append(torch.from_numpy(np.asarray(segments, dtype=np.int64)))
        return torch.stack(labels).to(batch.device)

    def _run(
        self, model: ModelLike, batch: torch.Tensor, targets: torch.Tensor, segments: torch.Tensor
    ) -> torch.Tensor:
        n_images, _, height, width = batch.shape
        # Contiguous feature ids per sample: features[b] is [H * W] in 0..M_b - 1.
        features, counts = [], []
        for mask in segments.reshape(n_images, -1).cpu():
            _, inverse = torch.unique(mask, return_inverse=True)
            features.append(inverse)
            counts.append(int(inverse.max()) + 1)
        drawn = [self.coalitions(count) for count in counts]
        rows = [len(z) for z, _ in drawn]
        # Padded [B, S_max, M_max] coalitions; flat (image, row) pairs go through the model in chunks.
        kept = torch.zeros(n_images, max(rows), max(counts), dtype=torch.bool)
        for index, (z, _) in enumerate(drawn):
            kept[index, : z.shape[0], : z.shape[1]] = z > 0.5
        chunk = chunk_size_for(self.chunk_size, model)
        with forward_context(model, batch) as (forward, device):
            inputs = batch.detach().to(device)
            targets = targets.to(device)
            check_targets_on_first_image(forward, inputs, targets)
            kept = kept.to(device)
            pixel_feature = torch.stack(features).to(device)
            image = torch.repeat_interleave(torch.arange(n_images, device=device), torch.tensor(rows, device=device))
            row = torch.cat([torch.arange(count, device=device) for count in rows])
            scores = torch.empty(len(image), dtype=torch.float64, device=device)
            for part in torch.arange(len(image), device=device).split(chunk):
                b = image[part]
                keep = torch.gather(kept[b, row[part]], 1, pixel_feature[b]).view(len(part), 1, height, width)
                perturbed = torch.where(keep, inputs[b], self.baseline)
                scores[part] = forward_scores(forward, perturbed, targets[b], self.score).to(torch.float64)
        maps = []
        offsets = [0, *np.cumsum(rows).tolist()]
        for index, (z, weights) in enumerate(drawn):
            coefficients = self._fit(z, weights, scores[offsets[index] : offsets[index + 1]].cpu())
            maps.append(coefficients[features[index]].view(height, width))
        return torch.stack(maps).to(batch.device, batch.dtype)


def _check_feature_mask(feature_mask: object, batch: torch.Tensor) -> torch.Tensor:
    """A given feature mask as long ``[B, H, W]`` on the batch's device."""
    n_images, _, height, width = batch.shape
    if not isinstance(feature_mask, torch.Tensor) or feature_mask.is_floating_point() or feature_mask.is_complex():
        raise ExplainerError(
            f"feature_mask must be an integer torch.Tensor [H, W] or [B, H, W], got {type(feature_mask).__name__}"
            + (f" of dtype {feature_mask.dtype}" if isinstance(feature_mask, torch.Tensor) else "")
        )
    if tuple(feature_mask.shape) == (height, width):
        feature_mask = feature_mask.expand(n_images, height, width)
    if tuple(feature_mask.shape) != (n_images, height, width):
        raise ExplainerError(
            f"feature_mask must be [H, W] = {(height, width)} or [B, H, W] = {(n_images, height, width)}, "
            f"got shape {tuple(feature_mask.shape)}"
        )
    return feature_mask.to(batch.device, torch.long)


def _weighted_least_squares(
    x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, ridge: float = 0.0
) -> torch.Tensor:
    """``argmin_b sum_i w_i (y_i - x_i b)^2 + ridge |b|^2`` in float64 (minimum-norm when not unique)."""
    root = weights.sqrt()[:, None]
    design, target = root * x, root[:, 0] * y
    if ridge > 0:
        design = torch.cat([design, math.sqrt(ridge) * torch.eye(x.shape[1], dtype=x.dtype)])
        target = torch.cat([target, torch.zeros(x.shape[1], dtype=y.dtype)])
    return torch.linalg.lstsq(design, target[:, None], driver="gelsd").solution[:, 0]


class Lime(_Surrogate):
    """LIME (Ribeiro et al., 2016) over superpixels, with the settings of the ``lime`` package.

    ``samples`` coalitions, each superpixel kept with probability 1/2, the first one the whole
    image; weights ``exp(-d^2 / (2 kernel_width^2))`` (``lime``'s ``sqrt(exp(-d^2 / width^2))``)
    of the cosine distance ``d`` between the coalition and the all-ones vector (1 for the empty
    one); a weighted ridge regression with intercept (``alpha``, not applied to the intercept, as
    scikit-learn's ``Ridge`` with sample weights), solved in float64. ``score="probability"``
    (``lime``'s) explains the softmax probability of the target, ``"logit"`` the logit.
    """

    name: ClassVar[str] = "lime"

    def __init__(
        self,
        samples: int = 1000,
        kernel_width: float = 0.25,
        alpha: float = 1.0,
        seed: int = 0,
        n_segments: int = 50,
        compactness: float = 0.3,
        smoothing: float = 1.0,
        baseline: float = 0.0,
        score: str = "probability",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(samples, seed, n_segments, compactness, smoothing, baseline, score, chunk_size)
        self.kernel_width = positive_float("kernel_width", kernel_width)
        self.alpha = finite_float("alpha", alpha, minimum=0.0)

    def coalitions(self, n_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        z = (torch.rand(self.samples, n_features, generator=generator, dtype=torch.float64) < 0.5).to(torch.float64)
        z[0] = 1
        kept = z.sum(dim=1)
        distance = torch.where(kept > 0, 1 - kept / (kept.clamp_min(1).sqrt() * math.sqrt(n_features)), 1.0)
        return z, torch.exp(-(distance**2) / (2 * self.kernel_width**2))

    def _fit(self, z: torch.Tensor, weights: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        total = weights.sum()
        z_mean = (weights[:, None] * z).sum(dim=0) / total
        y_mean = (weights * scores).sum() / total
        return _weighted_least_squares(z - z_mean, scores - y_mean, weights, self.alpha)


class KernelShap(_Surrogate):
    """KernelSHAP (Lundberg & Lee, 2017) over superpixels.

    The attributions ``phi`` minimise ``sum_z pi(z) (f(z) - f(0) - z . phi)^2`` under the efficiency
    constraint ``sum(phi) = f(1) - f(0)`` (all superpixels kept minus all switched off), enforced
    exactly by eliminating one unknown as SHAP's ``KernelExplainer`` does (Captum approximates it
    with large weights on the two end points). With ``M`` superpixels and
    ``samples >= 2^M - 2`` every coalition is enumerated with its Shapley kernel weight
    ``pi = (M - 1) / (C(M, |z|) |z| (M - |z|))``, and the result is the exact Shapley values.
    Otherwise ``samples`` coalitions are drawn as Captum does: a size ``k`` with probability
    proportional to ``(M - 1) / (k (M - k))``, then a uniform subset of that size, each with
    weight 1 (the sampling carries the kernel). Two more forward passes score the end points.
    """

    name: ClassVar[str] = "kernel_shap"

    def __init__(
        self,
        samples: int = 1000,
        seed: int = 0,
        n_segments: int = 50,
        compactness: float = 0.3,
        smoothing: float = 1.0,
        baseline: float = 0.0,
        score: str = "logit",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(samples, seed, n_segments, compactness, smoothing, baseline, score, chunk_size)

    def coalitions(self, n_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        """End points first (all kept, none kept; weight 0), then the regression coalitions."""
        ends = torch.stack([torch.ones(n_features), torch.zeros(n_features)]).to(torch.float64)
        if n_features == 1:
            return ends, torch.zeros(2, dtype=torch.float64)
        if n_features < 62 and 2**n_features - 2 <= self.samples:
            codes = torch.arange(1, 2**n_features - 1)
            z = ((codes[:, None] >> torch.arange(n_features)) & 1).to(torch.float64)
            size = z.sum(dim=1)
            weights = (n_features - 1) / (
                torch.tensor([math.comb(n_features, int(k)) for k in size], dtype=torch.float64)
                * size
                * (n_features - size)
            )
        else:
            generator = torch.Generator().manual_seed(self.seed)
            sizes = torch.arange(1, n_features, dtype=torch.float64)
            size = torch.multinomial(1 / (sizes * (n_features - sizes)), self.samples, True, generator=generator) + 1
            order = torch.rand(self.samples, n_features, generator=generator).argsort(dim=1)
            z = (order < size[:, None]).to(torch.float64)
            weights = torch.ones(self.samples, dtype=torch.float64)
        return torch.cat([ends, z]), torch.cat([torch.zeros(2, dtype=torch.float64), weights])

    def _fit(self, z: torch.Tensor, weights: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        full, empty = scores[0], scores[1]
        total = full - empty
        if z.shape[1] == 1:
            return total.reshape(1)
        z, weights, y = z[2:], weights[2:], scores[2:] - empty
        # phi_last = total - sum(phi_rest): y - z_last * total = (z_rest - z_last) . phi_rest
        last = z[:, -1:]
        rest = _weighted_least_squares(z[:, :-1] - last, y - last[:, 0] * total, weights)
        return torch.cat([rest, (total - rest.sum()).reshape(1)])
