"""Gradient family: vanilla gradient, input x gradient, integrated gradients, SmoothGrad, guided
backprop and deconvnet.

All of them work on input attributions ``[B, C, *spatial]`` (see :class:`InputAttribution`; images
``[B, C, H, W]`` or volumes ``[B, C, D, H, W]``, nothing here depends on the number of spatial
dimensions) and reduce
the channels at the end: by the largest magnitude for the vanilla gradient (Simonyan et al.), by
summation for every other method (their attributions are additive: a pixel's share is the sum of
its channels' shares). Gradients are always taken with ``torch.autograd.grad`` with respect to a
fresh copy of the input, so no ``.grad`` is written to the model's parameters, and the model runs
in eval mode (each submodule's own ``training`` flag restored afterwards).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from service.explain.base import (
    Explainer,
    ExplainerError,
    ModelLike,
    TargetOutOfRange,
    WrappedExplainer,
    check_batch_and_targets,
    torch_module_of,
)
from service.explain.hooks import eval_mode, module_device
from service.explain.scores import LOGIT, forward_scores, target_scores
from service.explain.settings import boolean, choice, finite_float, positive_int, seed_value

# --- the shared base ------------------------------------------------------------------------------


@contextmanager
def gradient_context(module: nn.Module) -> Iterator[None]:
    """Eval mode (restored on exit), gradients on, out of inference mode."""
    with eval_mode(module), torch.inference_mode(False), torch.enable_grad():
        yield


def target_gradient(module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d(each sample's own target logit)/d(input), ``[N, C, H, W]``; nothing accumulated in ``.grad``.

    Samples are independent in eval mode, so the gradient of the sum of the per-sample target
    logits holds each sample's own gradient.
    """
    leaf = inputs.detach().requires_grad_(True)
    score = target_scores(module(leaf), targets).sum()
    if not score.requires_grad:
        raise ExplainerError(
            f"the logits of {type(module).__name__} do not depend on its input through autograd "
            "(is the forward pass wrapped in torch.no_grad?)"
        )
    (gradient,) = torch.autograd.grad(score, leaf, allow_unused=True)
    return torch.zeros_like(leaf) if gradient is None else gradient


def target_logits(module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Each input's target logit ``[N]`` (float64), no gradients, ``chunk`` inputs per pass: what
    the attributions of a method with a completeness axiom add up to."""
    with torch.no_grad():
        return forward_scores(module, inputs, targets, LOGIT, chunk).double()


class InputAttribution(Explainer):
    """Base of the methods that attribute to every input element, ``[B, C, H, W]``.

    ``_attribute`` is the method proper (on the model's device, eval mode, gradients on, a long
    ``targets`` tensor); ``_reduce_channels`` turns its result into the ``[B, H, W]`` map.
    :class:`SmoothGrad` wraps any subclass through these two methods. Subclasses that satisfy a
    completeness axiom also implement ``_reference`` and get :meth:`explain_with_delta`. The model
    runs on inputs derived from the batch (steps, noisy copies), so an out-of-range target found
    there is reported again with the caller's targets.
    """

    needs_gradients: ClassVar[bool] = True

    def _explain(self, model: ModelLike, batch: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        maps, _ = self._run(model, batch, targets, with_delta=False)
        return maps

    def explain_with_delta(
        self, model: ModelLike, batch: torch.Tensor, targets: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The maps of :meth:`explain` and each sample's completeness error ``[B]`` (float32).

        The error is ``|sum of the sample's attributions - reference|``, where the reference is
        what the method's axiom says the attributions add up to (``f(x) - f(baseline)`` for
        integrated gradients and DeepLIFT, ``f(x)`` for LRP; target-logit units).
        """
        if type(self)._reference is InputAttribution._reference:
            raise ExplainerError(f"{self.name} satisfies no completeness axiom, so it has no completeness error")
        batch, target_tensor = check_batch_and_targets(batch, targets, volumes=self.supports_volumes, method=self.name)
        maps, delta = self._run(model, batch, target_tensor, with_delta=True)
        assert delta is not None
        return maps.detach().to(torch.float32), delta.to(torch.float32)

    def _run(
        self, model: ModelLike, batch: torch.Tensor, targets: torch.Tensor, *, with_delta: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        module = torch_module_of(model, self.name)
        self._check_module(module)
        device = module_device(module)
        device = batch.device if device is None else device
        with gradient_context(module):
            # Copies made here are ordinary tensors even when the caller is in inference mode.
            inputs = batch.detach().to(device).clone()
            targets = targets.to(device).clone()
            try:
                attributions = self._attribute(module, inputs, targets)
            except TargetOutOfRange as exc:
                raise TargetOutOfRange(targets.tolist(), exc.classes) from None
            delta = None
            if with_delta:
                reference = self._reference(module, inputs, targets)
                delta = (attributions.double().flatten(1).sum(dim=1) - reference).abs().to(batch.device)
        return self._reduce_channels(attributions).to(device=batch.device, dtype=torch.float32), delta

    def _check_module(self, module: nn.Module) -> None:
        """Reject models the method cannot handle (default: accept any differentiable module)."""

    @abstractmethod
    def _attribute(self, module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Attributions ``[N, C, H, W]`` of each input to its own target logit."""

    def _reduce_channels(self, attributions: torch.Tensor) -> torch.Tensor:
        """``[N, C, *spatial] -> [N, *spatial]``; the default sums the channels' shares."""
        return attributions.sum(dim=1)

    def _reference(self, module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """What each sample's attributions should add up to, ``[N]`` float64 (methods with an axiom)."""
        raise NotImplementedError


def max_abs_channel(attributions: torch.Tensor) -> torch.Tensor:
    """Per pixel (voxel), the channel value of largest magnitude (sign kept): ``[N, C, *spatial] -> [N, *spatial]``."""
    index = attributions.abs().argmax(dim=1, keepdim=True)
    return attributions.gather(1, index)[:, 0]


# --- vanilla gradient, input x gradient ----------------------------------------------------------


class Saliency(InputAttribution):
    """Vanilla gradient (Simonyan et al., 2014): d(target logit)/d(input).

    ``absolute=True`` (the paper's map) takes ``|gradient|``; the channels are then reduced to the
    value of largest magnitude per pixel (the paper's max over colour channels; with
    ``absolute=False`` the sign of that channel is kept). Units: target logit per normalised
    input unit.
    """

    name: ClassVar[str] = "saliency"

    def __init__(self, absolute: bool = True) -> None:
        self.absolute = boolean("absolute", absolute)

    def _attribute(self, module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        gradient = target_gradient(module, inputs, targets)
        return gradient.abs() if self.absolute else gradient

    def _reduce_channels(self, attributions: torch.Tensor) -> torch.Tensor:
        return max_abs_channel(attributions)


class InputXGradient(InputAttribution):
    """Input x gradient (Shrikumar et al., 2016), summed over channels: target-logit units.

    It is integrated gradients with a zero baseline and one step at ``alpha = 1``.
    """

    name: ClassVar[str] = "input_x_gradient"

    def _attribute(self, module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return inputs * target_gradient(module, inputs, targets)


# --- integrated gradients -----------------------------------------------------------------------

IG_METHODS = ("gausslegendre", "riemann_trapezoid", "riemann_middle", "riemann_left", "riemann_right")


def quadrature(method: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes ``alpha`` in [0, 1] and weights (summing to 1) of the path integral, float64 ``[steps]``.

    ``riemann_trapezoid`` is the composite trapezoid rule on ``steps`` equally spaced nodes
    including both ends (weights ``1/(steps-1)``, halved at the ends). Captum's variant uses
    weights ``1/steps`` there, which sum to ``(steps-1)/steps``: its attributions are ours times
    that factor.
    """
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return torch.from_numpy(0.5 * (nodes + 1.0)), torch.from_numpy(0.5 * weights)
    index = torch.arange(steps, dtype=torch.float64)
    if method == "riemann_trapezoid":
        weights = torch.full((steps,), 1.0 / (steps - 1), dtype=torch.float64)
        weights[0] /= 2
        weights[-1] /= 2
        return index / (steps - 1), weights
    offset = {"riemann_left": 0.0, "riemann_middle": 0.5, "riemann_right": 1.0}[method]
    return (index + offset) / steps, torch.full((steps,), 1.0 / steps, dtype=torch.float64)


class IntegratedGradients(InputAttribution):
    """Integrated gradients (Sundararajan et al., 2017) from a constant baseline.

    ``attr = (x - x0) * integral_0^1 grad f(x0 + a (x - x0)) da``, the integral by ``method``
    with ``steps`` nodes (:func:`quadrature`). ``baseline`` is a constant in normalised input
    units (``0.0`` is the dataset mean for a mean/std-normalised model). The (sample, step) pairs
    of the whole batch are flattened and sent through the model ``internal_batch_size`` at a
    time, so memory is bounded by that many inputs whatever ``steps`` and the batch size are;
    gradients are accumulated in float64. Completeness: the attributions add up to
    ``f(x) - f(x0)`` up to the quadrature error, reported by :meth:`explain_with_delta`.
    """

    name: ClassVar[str] = "integrated_gradients"

    def __init__(
        self,
        steps: int = 64,
        baseline: float = 0.0,
        method: str = "gausslegendre",
        internal_batch_size: int = 32,
    ) -> None:
        self.steps = positive_int("steps", steps)
        self.baseline = finite_float("baseline", baseline)
        self.method = choice("method", method, IG_METHODS)
        self.internal_batch_size = positive_int("internal_batch_size", internal_batch_size)
        if self.method == "riemann_trapezoid" and self.steps < 2:
            raise ExplainerError(f"steps must be >= 2 for riemann_trapezoid, got {self.steps}")

    def _attribute(self, module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        alphas, weights = quadrature(self.method, self.steps)
        alphas = alphas.to(inputs.device)
        weights = weights.to(inputs.device)
        delta = inputs - self.baseline
        total = torch.zeros(inputs.shape, dtype=torch.float64, device=inputs.device)
        rows = inputs.shape[0] * self.steps
        for start in range(0, rows, self.internal_batch_size):
            # Flat row k -> (sample k // steps, step k % steps); chunks cross sample borders.
            index = torch.arange(start, min(start + self.internal_batch_size, rows), device=inputs.device)
            sample, step = index // self.steps, index % self.steps
            shape = (-1,) + (1,) * (inputs.ndim - 1)
            points = self.baseline + alphas[step].to(inputs.dtype).view(shape) * delta[sample]
            gradient = target_gradient(module, points, targets[sample])
            total.index_add_(0, sample, gradient.double() * weights[step].view(shape))
        return delta.double() * total

    def _reference(self, module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        both = torch.cat([inputs, torch.full_like(inputs, self.baseline)])
        scores = target_logits(module, both, targets.repeat(2), self.internal_batch_size)
        return scores[: inputs.shape[0]] - scores[inputs.shape[0] :]


# --- SmoothGrad -----------------------------------------------------------------------------------

SMOOTHGRAD_VARIANTS = ("smoothgrad", "smoothgrad_sq", "vargrad")


def smoothgrad_noise(seed: int, draw: int, shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """The standard normal noise of draw number ``draw`` for ``seed``, one sample's ``shape``.

    Drawn on the CPU from a generator seeded by ``numpy.random.SeedSequence([seed, draw])``, so it
    is the same on every device and independent of the batch size and of the chunking.
    """
    state = np.random.SeedSequence([seed, draw]).generate_state(1, dtype=np.uint64)[0]
    generator = torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.randn(tuple(shape), generator=generator).to(device)


class SmoothGrad(InputAttribution):
    """SmoothGrad (Smilkov et al., 2017) around any input-attribution method.

    ``base`` is the wrapped explainer instance, as Captum's ``NoiseTunnel`` takes one (a node
    configuration names it instead, ``base: integrated_gradients`` with ``base_params``, and the
    registry builds it; :attr:`wraps`). For each sample the base method runs on ``samples`` noisy
    copies ``x + sigma * n_s``, where ``sigma = noise_level * (max(x) - min(x))``
    (the sample's own range, as in the paper) and ``n_s`` is the standard normal noise of draw
    ``s`` (:func:`smoothgrad_noise`, from ``(seed, s)``). The same draws are used for every sample
    of a batch, which is what makes a batch equal its single runs: noise keyed on the position in
    the batch would differ between a batch and a single run. The attributions are averaged
    (``smoothgrad``), their squares averaged (``smoothgrad_sq``), or their variance taken
    (``vargrad``) before the base method's channel reduction. Noisy copies go to the base
    ``internal_batch_size`` at a time (at least one draw of the whole batch per pass).
    """

    name: ClassVar[str] = "smoothgrad"
    wraps: ClassVar[Mapping[str, WrappedExplainer]] = MappingProxyType(
        {
            "base": WrappedExplainer(
                default="saliency", accepts=InputAttribution, description="a method that attributes to the input pixels"
            )
        }
    )

    def __init__(
        self,
        base: InputAttribution,
        samples: int = 25,
        noise_level: float = 0.15,
        variant: str = "smoothgrad",
        seed: int = 0,
        internal_batch_size: int = 32,
    ) -> None:
        if not isinstance(base, InputAttribution) or isinstance(base, SmoothGrad):
            raise ExplainerError(
                "base must be an explainer that attributes to the input pixels (Saliency(), IntegratedGradients(), "
                f"DeepLift(), ...; not SmoothGrad), got {base!r}"
            )
        self.base_explainer = base
        self.samples = positive_int("samples", samples)
        self.noise_level = finite_float("noise_level", noise_level, minimum=0.0)
        self.variant = choice("variant", variant, SMOOTHGRAD_VARIANTS)
        self.seed = seed_value(seed)
        self.internal_batch_size = positive_int("internal_batch_size", internal_batch_size)

    def _check_module(self, module: nn.Module) -> None:
        self.base_explainer._check_module(module)

    def noise_std(self, inputs: torch.Tensor) -> torch.Tensor:
        """Per-sample noise standard deviation ``[N]``: ``noise_level`` times the sample's range."""
        flat = inputs.detach().flatten(1)
        return self.noise_level * (flat.max(dim=1).values - flat.min(dim=1).values)

    def _attribute(self, module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        count = inputs.shape[0]
        sigma = self.noise_std(inputs).view((-1, 1) + (1,) * (inputs.ndim - 1))
        per_pass = max(1, self.internal_batch_size // count)
        total = torch.zeros(inputs.shape, dtype=torch.float64, device=inputs.device)
        total_sq = torch.zeros_like(total)
        for first in range(0, self.samples, per_pass):
            draws = range(first, min(first + per_pass, self.samples))
            noise = torch.stack([smoothgrad_noise(self.seed, d, inputs.shape[1:], inputs.device) for d in draws])
            # Row b * len(draws) + j is sample b with draw j.
            noisy = (inputs[:, None] + sigma * noise[None].to(inputs.dtype)).flatten(0, 1)
            attributions = self.base_explainer._attribute(module, noisy, targets.repeat_interleave(len(draws)))
            attributions = attributions.double().view((count, len(draws)) + tuple(inputs.shape[1:]))
            total += attributions.sum(dim=1)
            total_sq += attributions.square().sum(dim=1)
        mean, mean_sq = total / self.samples, total_sq / self.samples
        if self.variant == "smoothgrad":
            return mean
        if self.variant == "smoothgrad_sq":
            return mean_sq
        return mean_sq - mean.square()

    def _reduce_channels(self, attributions: torch.Tensor) -> torch.Tensor:
        return self.base_explainer._reduce_channels(attributions)


# --- guided backprop, deconvnet -------------------------------------------------------------------


class _ModifiedReLU(torch.autograd.Function):
    """ReLU forward; backward ``relu(grad)`` (deconvnet), times ``[x > 0]`` when ``guided``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, guided: bool, inplace: bool) -> torch.Tensor:
        if inplace:
            ctx.mark_dirty(x)
            output = x.clamp_(min=0)
        else:
            output = x.clamp(min=0)
        ctx.guided = guided
        if guided:
            ctx.save_for_backward(output)  # output > 0 exactly where input > 0
        return output

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad.clamp(min=0)
        if ctx.guided:
            (output,) = ctx.saved_tensors
            grad = grad * (output > 0).to(grad.dtype)
        return grad, None, None


#: ReLU entry points that reach ``__torch_function__``: ``nn.ReLU`` calls ``F.relu``.
_RELU = {F.relu, torch.relu, torch.Tensor.relu}
_RELU_INPLACE = {torch.relu_, F.relu_, torch.Tensor.relu_}


class ModifiedReLUMode(TorchFunctionMode):
    """While active (in this thread), every ReLU runs as :class:`_ModifiedReLU`.

    A torch-function mode sees each call of ``F.relu``/``torch.relu``/``Tensor.relu`` and their
    in-place forms, whoever makes it: an ``nn.ReLU`` module (which calls ``F.relu``, with
    ``inplace`` as it is set), the same module called several times (each call is separate), or a
    functional call inside ``forward``. Nothing is attached to the model, so nothing can be left
    behind; the mode is popped when the ``with`` block ends, exceptions included. Torch-function
    modes are thread-local: other threads running the same model are unaffected. TorchScript code
    bypasses Python dispatch, so scripted modules are refused by the explainers.
    """

    def __init__(self, guided: bool) -> None:
        super().__init__()
        self.guided = guided

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        if func in _RELU or func in _RELU_INPLACE:
            x = args[0] if args else kwargs.pop("input")
            inplace = func in _RELU_INPLACE or bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))
            return _ModifiedReLU.apply(x, self.guided, inplace)
        return func(*args, **kwargs)


class _ModifiedReLUExplainer(InputAttribution):
    guided: ClassVar[bool]

    def _check_module(self, module: nn.Module) -> None:
        for name, sub in module.named_modules():
            if isinstance(sub, torch.jit.ScriptModule):
                where = f"submodule {name!r} is" if name else "the model is"
                raise ExplainerError(
                    f"{self.name} overrides ReLU gradients through Python dispatch, but {where} TorchScript, "
                    "which bypasses it; use the eager torch model (torch weights in the model card)"
                )

    def _attribute(self, module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        leaf = inputs.detach().requires_grad_(True)
        with ModifiedReLUMode(self.guided):
            logits = module(leaf)
        score = target_scores(logits, targets).sum()
        if not score.requires_grad:
            raise ExplainerError(f"the logits of {type(module).__name__} do not depend on its input through autograd")
        (gradient,) = torch.autograd.grad(score, leaf, allow_unused=True)
        return torch.zeros_like(leaf) if gradient is None else gradient


class GuidedBackprop(_ModifiedReLUExplainer):
    """Guided backpropagation (Springenberg et al., 2015).

    The gradient, except that every ReLU passes back only positive gradients at positive inputs:
    ``grad_in = relu(grad_out) * [x > 0]``. The override covers ``nn.ReLU`` (in-place or not,
    reused or not) and functional ``torch.relu``/``F.relu``/``Tensor.relu`` through
    :class:`ModifiedReLUMode`; other activations keep their gradients. Channels are summed.
    """

    name: ClassVar[str] = "guided_backprop"
    guided: ClassVar[bool] = True


class Deconvnet(_ModifiedReLUExplainer):
    """Deconvnet (Zeiler & Fergus, 2014) as a modified gradient: every ReLU passes back
    ``relu(grad_out)`` whatever its input was. Same ReLU coverage as :class:`GuidedBackprop`.
    """

    name: ClassVar[str] = "deconvnet"
    guided: ClassVar[bool] = False
