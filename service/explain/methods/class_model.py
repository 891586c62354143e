"""Class model visualisation: the input a classifier scores highest for one class (a global method).

Simonyan et al. (2014) find ``x* = argmax_x S_c(x) - l2_weight * mean(x^2)``, ``S_c`` the class
score (logit), by gradient ascent on the input from a small random start. Yosinski et al. (2015)
and Mordvintsev et al. ("deep dream", 2015) add regularisers that keep the image from turning
into high-frequency adversarial noise; the ones here:

- L2 decay: the ``l2_weight * mean(x^2)`` penalty above (mean over pixels and channels, so the
  weight does not depend on the image size);
- jitter: every step the image is rolled by a random shift of up to ``jitter`` pixels per axis
  (wrapping around) before the forward pass, so the found pattern must work at any alignment;
- blur: every ``blur_every`` steps a Gaussian blur of ``blur_sigma`` pixels;
- optional clipping of low-norm pixels: after each step the pixels whose norm over the channels
  is below the ``clip_percentile`` percentile are set to 0;
- optional clamping to ``value_range``, the model inputs a real image can produce.

Each step is an Adam step of size ``learning_rate`` (normalised input units) on that objective
(Adam rather than plain ascent, so the step does not depend on the model's gradient scale).
``objective="logit"`` is the paper's class score; ``"log_softmax"`` maximises the target's log
probability instead, which also pushes the other classes down: use it when class logits move
together (for example a zero-sum head, where raising one class's logit can raise another's more).

Unlike the saliency explainers this takes no image and gives no map: :meth:`generate` returns a
synthetic input ``[C, H, W]`` in the model's normalised units. It needs gradients, so a torch or
TorchScript module (or a runner exposing ``torch_module``), never ONNX.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from torch import nn

from service.explain.base import ExplainerError, ModelLike, torch_module_of
from service.explain.hooks import eval_mode, module_device
from service.explain.methods.perturbation import gaussian_blur
from service.explain.scores import LOG_PROBABILITY, LOGIT, target_scores
from service.explain.settings import (
    choice,
    finite_float,
    float_in,
    non_negative_int,
    optional_interval,
    positive_float,
    positive_int,
    seed_value,
)

#: What is maximised: the target's logit (Simonyan et al.) or its log-softmax probability.
OBJECTIVES = ("logit", "log_softmax")
#: The score (:mod:`service.explain.scores`) each objective reads.
OBJECTIVE_SCORES = {"logit": LOGIT, "log_softmax": LOG_PROBABILITY}

#: ``progress(step, score)``: the 1-based step and the target's score (the objective's class term,
#: on that step's jittered image, before the step).
ProgressFn = Callable[[int, float], None]


def check_input_shape(input_shape: object) -> tuple[int, int, int]:
    """``(C, H, W)`` as three positive ints."""
    if not isinstance(input_shape, Sequence) or isinstance(input_shape, str) or len(input_shape) != 3:
        raise ExplainerError(f"input_shape must be (channels, height, width), got {input_shape!r}")
    channels, height, width = (positive_int(f"input_shape[{i}]", v) for i, v in enumerate(input_shape))
    return channels, height, width


def class_logits(model: ModelLike, image: torch.Tensor) -> torch.Tensor:
    """The model's logits ``[K]`` (float32, CPU) for one image ``[C, H, W]``, in eval mode, no gradients."""
    module = torch_module_of(model, "class model visualisation")
    if not isinstance(image, torch.Tensor) or image.ndim != 3:
        found = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ExplainerError(f"image must be a tensor [C, H, W], got {found}")
    device = module_device(module) or image.device
    with eval_mode(module), torch.no_grad():
        logits = module(image[None].to(device, torch.float32))
    if logits.ndim != 2 or logits.shape[0] != 1:
        raise ExplainerError(f"model must return logits [1, K] for one image, got shape {tuple(logits.shape)}")
    return logits[0].detach().to("cpu", torch.float32)


class ClassModelVisualisation:
    """Class model visualisation (Simonyan et al., 2014) with deep-dream regularisers; see the module doc."""

    name: ClassVar[str] = "class-model"
    needs_gradients: ClassVar[bool] = True

    def __init__(
        self,
        iterations: int = 200,
        learning_rate: float = 0.05,
        l2_weight: float = 1.0,
        blur_every: int = 4,
        blur_sigma: float = 0.5,
        jitter: int = 2,
        seed: int = 0,
        noise_std: float = 0.1,
        clip_percentile: float = 0.0,
        objective: str = "logit",
        value_range: tuple[float, float] | None = None,
        progress_every: int = 10,
    ) -> None:
        self.iterations = positive_int("iterations", iterations)
        self.learning_rate = positive_float("learning_rate", learning_rate)
        self.l2_weight = finite_float("l2_weight", l2_weight, minimum=0.0)
        # 0 switches a regulariser off.
        self.blur_every = non_negative_int("blur_every", blur_every)
        self.blur_sigma = positive_float("blur_sigma", blur_sigma)
        self.jitter = non_negative_int("jitter", jitter)
        self.seed = seed_value(seed)
        self.noise_std = finite_float("noise_std", noise_std, minimum=0.0)
        self.clip_percentile = float_in("clip_percentile", clip_percentile, 0.0, 100.0, include_high=False)
        self.objective = choice("objective", objective, OBJECTIVES)
        self.value_range = optional_interval("value_range", value_range)
        self.progress_every = positive_int("progress_every", progress_every)

    def settings_text(self) -> str:
        """The settings in one line (for provenance text and derived UIDs)."""
        return (
            f"objective={self.objective} iterations={self.iterations} learning_rate={self.learning_rate:g} "
            f"l2_weight={self.l2_weight:g} blur_every={self.blur_every} blur_sigma={self.blur_sigma:g} "
            f"jitter={self.jitter} clip_percentile={self.clip_percentile:g} noise_std={self.noise_std:g} "
            f"value_range={self.value_range} seed={self.seed}"
        )

    def start_image(self, input_shape: Sequence[int]) -> torch.Tensor:
        """The seeded starting noise ``[C, H, W]`` (float32, CPU): normal with std ``noise_std``."""
        shape = check_input_shape(input_shape)
        return self._start(shape, torch.Generator().manual_seed(self.seed))

    def _start(self, shape: tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(shape, generator=generator, dtype=torch.float32) * self.noise_std
        return noise if self.value_range is None else noise.clamp(*self.value_range)

    def generate(
        self,
        model: ModelLike,
        target: int,
        input_shape: Sequence[int],
        progress: ProgressFn | None = None,
    ) -> torch.Tensor:
        """The optimised input ``[C, H, W]`` (float32, on the model's device) for class ``target``.

        ``progress(step, score)`` is called every ``progress_every`` steps and at the last one.
        The model comes back as found: training flags, ``requires_grad`` and ``.grad`` untouched.
        """
        module = torch_module_of(model, "class model visualisation")
        if isinstance(target, bool) or not isinstance(target, numbers.Integral) or target < 0:
            raise ExplainerError(f"target must be a class index >= 0, got {target!r}")
        shape = check_input_shape(input_shape)
        generator = torch.Generator().manual_seed(self.seed)  # CPU: same draws on every device
        device = module_device(module) or torch.device("cpu")
        image = self._start(shape, generator)[None].to(device).requires_grad_(True)
        parameters = list(module.parameters())
        requires_grad = [p.requires_grad for p in parameters]
        try:
            for parameter in parameters:  # gradients only for the image: faster, nothing accumulates
                parameter.requires_grad_(False)
            with eval_mode(module):
                self._optimise(module, image, int(target), generator, progress)
        finally:
            for parameter, flag in zip(parameters, requires_grad):
                parameter.requires_grad_(flag)
        result = image.detach()[0]
        if not torch.isfinite(result).all():
            raise ExplainerError(
                f"class model optimisation diverged (non-finite pixels); lower learning_rate {self.learning_rate:g}"
            )
        return result

    def _optimise(
        self,
        module: nn.Module,
        image: torch.Tensor,
        target: int,
        generator: torch.Generator,
        progress: ProgressFn | None,
    ) -> None:
        """``iterations`` regularised Adam ascent steps on ``image`` ``[1, C, H, W]``, in place."""
        target_tensor = torch.tensor([target], device=image.device)
        optimiser = torch.optim.Adam([image], lr=self.learning_rate)
        for step in range(1, self.iterations + 1):
            shift = torch.randint(-self.jitter, self.jitter + 1, (2,), generator=generator).tolist()
            logits = module(torch.roll(image, shifts=shift, dims=(2, 3)) if self.jitter else image)
            score = target_scores(logits, target_tensor, OBJECTIVE_SCORES[self.objective])[0]
            objective = score - self.l2_weight * image.pow(2).mean()
            (gradient,) = torch.autograd.grad(objective, image)
            image.grad = -gradient  # Adam minimises
            optimiser.step()
            image.grad = None
            with torch.no_grad():
                self._regularise(image, step)
            if progress is not None and (step % self.progress_every == 0 or step == self.iterations):
                progress(step, float(score.detach()))

    def _regularise(self, image: torch.Tensor, step: int) -> None:
        """Blur (every ``blur_every`` steps), low-norm clipping and clamping, in place on ``[1, C, H, W]``."""
        if self.blur_every and step % self.blur_every == 0:
            image.copy_(gaussian_blur(image, self.blur_sigma))
        if self.clip_percentile:
            norms = image.norm(dim=1, keepdim=True)
            threshold = torch.quantile(norms.flatten().float(), self.clip_percentile / 100)
            image.mul_((norms >= threshold).to(image.dtype))
        if self.value_range is not None:
            image.clamp_(*self.value_range)
