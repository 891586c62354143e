"""Occlusion: slide a filled square (a cube in a volume) over the image and watch the target
score drop."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import ClassVar

import torch
from torch import nn

from service.explain.base import (
    CPU_TORCH_BATCH,
    Explainer,
    ExplainerError,
    ForwardFn,
    ModelLike,
    ModuleCheck,
    chunk_size_for,
    forward_function,
)
from service.explain.healthy.appearance import configured_healthy
from service.explain.hooks import eval_mode, module_device
from service.explain.incremental import IncrementalForward, boxes_of
from service.explain.methods.perturbation import HEALTHY_CARD_FILES, PERTURBATIONS, healthy_fill, replacement_images
from service.explain.methods.windows import paint_windows, window_boxes, window_mask, window_masks
from service.explain.scores import LOGIT, forward_scores, target_scores
from service.explain.settings import boolean, choice, finite_float, optional_positive_int, positive_float, positive_int


class Occlusion(Explainer):
    """Occlusion (Zeiler & Fergus, 2014) with the semantics of Captum's ``Occlusion``.

    A ``window`` x ``window`` square (a ``window``³ cube in a volume ``[B, C, D, H, W]``) through
    all channels is set to ``baseline`` (normalised input units) at every window position (see
    :func:`window_masks`, per axis); with ``perturbation="blur"`` it takes the image blurred with
    ``blur_sigma`` pixels instead, with ``perturbation="healthy"`` the image's healthy appearance
    h(x) (``healthy_model``, from the card's ``auxiliary.healthy_appearance``:
    :mod:`service.explain.healthy`). A pixel's value is the mean,
    over the windows covering it, of ``f(x)[target] - f(x_occluded)[target]``: target-logit units,
    positive where hiding the region lowers the target score. Forward passes only, so any runner
    works; the occluded inputs of the whole batch go through the model ``chunk_size`` at a time.

    With ``incremental`` (the default) a torch network that :mod:`torch.fx` can trace recomputes,
    for each occluded input, only the region of each layer the window reaches, from the clean
    pass's values (:mod:`service.explain.incremental`): the same scores, to rounding, for a
    fraction of the arithmetic. Runners and untraceable networks run whole passes. The node hands
    occlusion the deployed model's torch module when it traces (:meth:`module_preference`), else
    the forward runner's pool (ONNX Runtime, Triton).
    """

    name: ClassVar[str] = "occlusion"
    needs_gradients: ClassVar[bool] = False
    card_files: ClassVar[Mapping[str, str]] = HEALTHY_CARD_FILES

    def __init__(
        self,
        window: int = 16,
        stride: int = 8,
        baseline: float = 0.0,
        chunk_size: int | None = None,
        perturbation: str = "baseline",
        blur_sigma: float = 10.0,
        healthy_model: str | os.PathLike[str] | None = None,
        incremental: bool = True,
    ) -> None:
        self.window = positive_int("window", window)
        self.stride = positive_int("stride", stride)
        self.chunk_size = optional_positive_int("chunk_size", chunk_size)
        if self.stride > self.window:
            raise ExplainerError(
                f"stride ({self.stride}) must not exceed window ({self.window}): pixels between windows "
                "would get no attribution"
            )
        self.baseline = finite_float("baseline", baseline)
        self.perturbation = choice("perturbation", perturbation, PERTURBATIONS)
        self.blur_sigma = positive_float("blur_sigma", blur_sigma)
        self.healthy = configured_healthy(self.name, self.perturbation, healthy_model)
        self.incremental = boolean("incremental", incremental)

    def module_preference(self) -> ModuleCheck | None:
        """With ``incremental``: a network :mod:`torch.fx` traces (the node then hands occlusion
        its torch module instead of the ONNX Runtime pool: boxes beat whole passes on any runtime)."""
        if not self.incremental:
            return None
        return lambda module: IncrementalForward.trace(module) is not None

    def _explain(self, model: ModelLike, batch: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        spatial = tuple(batch.shape[2:])
        if self.window > min(spatial):
            raise ExplainerError(f"window ({self.window}) is larger than the {'x'.join(map(str, spatial))} image")
        device = module_device(model) if isinstance(model, nn.Module) else None
        inputs = batch.detach().to(device if device is not None else batch.device)
        targets = targets.to(inputs.device)
        axes = [window_masks(size, self.window, self.stride, inputs.device) for size in spatial]
        with eval_mode(model) if isinstance(model, nn.Module) else nullcontext():
            chunk = chunk_size_for(self.chunk_size, model)
            replacement = None
            if self.perturbation != "baseline":
                fill = healthy_fill(self.healthy, model)
                replacement = replacement_images(inputs, self.perturbation, self.baseline, self.blur_sigma, fill)
            forward = forward_function(model)
            engine = IncrementalForward.trace(model) if self.incremental and isinstance(model, nn.Module) else None
            if engine is None:
                clean = forward_scores(forward, inputs, targets, LOGIT, chunk)
            else:
                with torch.no_grad():
                    clean = target_scores(engine.prepare(inputs), targets, LOGIT)
            drops = self._score_drops(forward, engine, inputs, targets, clean, replacement, axes, chunk)
        total = paint_windows(drops, axes)
        # Every pixel is covered when stride <= window; the clamp only keeps the division safe.
        covering = paint_windows(torch.ones((1,) + drops.shape[1:], dtype=drops.dtype, device=drops.device), axes)
        return (total / covering.clamp_min(1)).to(batch.device)

    def _score_drops(
        self,
        forward: ForwardFn,
        engine: IncrementalForward | None,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        clean: torch.Tensor,
        replacement: torch.Tensor | None,
        axes: Sequence[torch.Tensor],
        chunk: int,
    ) -> torch.Tensor:
        """``[B, n_1, ..., n_d]``: target score ``clean`` of each image minus that with each window
        occluded (filled with ``baseline``, or from ``replacement``; ``n_k`` window positions along
        axis ``k``), the inputs going through ``forward`` (whole) or ``engine`` (the window's box
        only) ``chunk`` at a time."""
        counts = tuple(axis.shape[0] for axis in axes)
        per_image = math.prod(counts)
        drops = torch.empty(inputs.shape[0] * per_image, dtype=clean.dtype, device=inputs.device)
        for start in range(0, drops.numel(), chunk):
            stop = min(start + chunk, drops.numel())
            # Flat index k -> (image k // per_image, window k % per_image); chunks cross image borders.
            index = torch.arange(start, stop, device=inputs.device)
            image, position = index // per_image, index % per_image
            position_per_axis = torch.unravel_index(position, counts)
            if engine is None:
                mask = window_mask(axes, position_per_axis)
                fill = self.baseline if replacement is None else replacement[image]
                occluded = torch.where(mask[:, None], fill, inputs[image])
                scores = forward_scores(forward, occluded, targets[image], LOGIT)
            else:
                corner, mask = window_boxes(axes, position_per_axis, self.window)
                box = mask.shape[1:]
                fill = self.baseline if replacement is None else boxes_of(replacement, image, corner, box)
                occluded = torch.where(mask[:, None], fill, boxes_of(inputs, image, corner, box))
                with torch.no_grad():
                    # In parts on a CPU, as whole passes are (forward_function): a smaller working set.
                    part = CPU_TORCH_BATCH if inputs.device.type == "cpu" else len(image)
                    logits = torch.cat(
                        [
                            engine.forward(image[k : k + part], corner[k : k + part], occluded[k : k + part])
                            for k in range(0, len(image), part)
                        ]
                    )
                scores = target_scores(logits, targets[image], LOGIT)
            drops[start:stop] = clean[image] - scores
        return drops.view((inputs.shape[0],) + counts)
