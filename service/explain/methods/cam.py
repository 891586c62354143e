"""Class activation maps: a weighted sum of a convolutional layer's feature maps.

The shared machinery lives in :class:`_CamExplainer` (hooks, forward, backward, upsampling);
each method overrides :meth:`_CamExplainer._channel_weights`, and at most wraps ``_explain`` with
a check (CAM, Score-CAM: a torch module without gradients) or a final product (guided Grad-CAM).
Images and volumes alike: the feature maps are ``[B, C, *spatial]`` with the input's number of
spatial dimensions, and the map is upsampled bilinearly (images) or trilinearly (volumes).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from service.explain.base import (
    Explainer,
    ExplainerError,
    ModelLike,
    check_target_range,
    chunk_size_for,
    forward_function,
    spatial_dims,
    torch_module_of,
)
from service.explain.hooks import (
    ForwardHook,
    LayerRecorder,
    eval_mode,
    module_device,
    resolve_module,
    this_thread_only,
)
from service.explain.methods.gradient import GuidedBackprop
from service.explain.scores import SCORES, forward_scores, target_scores
from service.explain.settings import boolean, choice, finite_float, optional_layer_name, optional_positive_int


@dataclass(frozen=True)
class CamInputs:
    """What a CAM method may use to weight the channels of the target layer.

    ``batch`` and ``targets`` are on the model's device; ``model`` is ``None`` when a model server
    computed the layer's activations and gradients. ``activations`` is the layer's output
    ``[B, C, h, w]`` (``[B, C, d, h, w]`` for volumes; detached); ``gradients`` is d(sum of each
    sample's target logit)/d(activations), same shape, or ``None`` for methods that do not back-propagate.
    """

    model: nn.Module | None
    batch: torch.Tensor
    targets: torch.Tensor
    activations: torch.Tensor
    gradients: torch.Tensor | None


class _CamExplainer(Explainer):
    """Base of the CAM family: ``map = ReLU(sum_k w_k A_k)`` upsampled to the input size.

    The base hooks the target layer, runs the model in eval mode, back-propagates the sum of each
    sample's own target logit down to that layer (so a batch equals single runs), then combines
    the channels with the weights from :meth:`_channel_weights` at feature resolution and
    upsamples bilinearly, trilinearly for volumes (``align_corners=False``, as MONAI's 3D
    ``GradCAM``). The model is left as found: modes restored,
    no hooks, no ``.grad`` written, ``requires_grad`` untouched.
    """

    needs_gradients: ClassVar[bool] = True
    #: Whether the base computes layer gradients (False for forward-only weights, e.g. Score-CAM).
    uses_layer_gradients: ClassVar[bool] = True

    def __init__(self, target_layer: str | None = None, relu: bool = True) -> None:
        self.target_layer = optional_layer_name("target_layer", target_layer)
        self.relu = boolean("relu", relu)

    @abstractmethod
    def _channel_weights(self, inputs: CamInputs) -> torch.Tensor:
        """Per-sample channel weights ``[B, C]``; the one method a CAM variant overrides."""

    def _layer(self, module: nn.Module, batch: torch.Tensor) -> tuple[nn.Module, int | None]:
        """The layer whose feature maps are weighted (``target_layer``, else the last Conv2d, Conv3d
        for volumes), and which of its calls in one forward pass (``None``: it must run exactly once)."""
        return resolve_module(module, self.target_layer, batch.ndim - 2), None

    def _explain(self, model: ModelLike, batch: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        served = getattr(model, "layer_gradients", None)
        if self.uses_layer_gradients and served is not None and served.layer == self.target_layer:
            # A model server computes the layer's activations and gradients (the traced graph of
            # service.inference.graphs); the channel weighting below is the same.
            check_target_range(targets, served.classes)
            activations, gradients = (
                torch.from_numpy(array).to(batch.device)
                for array in served(batch.detach().cpu().numpy(), targets.cpu().numpy())
            )
            return self._combine(CamInputs(None, batch.detach(), targets, activations, gradients), batch)
        module = torch_module_of(model, self.name)
        device = module_device(module)
        if device is None:
            device = batch.device
        layer, call_index = self._layer(module, batch.detach().to(device))
        # The forward pass runs without autograd up to the layer (the recorder switches it on
        # there): back-propagation only reaches the layer, so nothing below it is kept.
        with eval_mode(module), torch.inference_mode(False), torch.no_grad():
            # Copies made here are ordinary tensors even when the caller is in inference mode.
            inputs = batch.detach().to(device).clone()
            targets = targets.to(device).clone()
            activations, gradients = self._record_layer(module, layer, call_index, inputs, targets)
            return self._combine(CamInputs(module, inputs.detach(), targets, activations, gradients), batch)

    def _combine(self, inputs: CamInputs, batch: torch.Tensor) -> torch.Tensor:
        """``ReLU(sum_k w_k A_k)`` at feature resolution, upsampled to the input size of ``batch``."""
        with torch.no_grad():
            weights = self._channel_weights(inputs)
        activations = inputs.activations
        cam = (weights.view(weights.shape + (1,) * (activations.ndim - 2)) * activations).sum(dim=1, keepdim=True)
        if self.relu:
            cam = cam.clamp_min(0)
        return upsample(cam, tuple(batch.shape[2:]))[:, 0].to(batch.device)

    def _record_layer(
        self,
        module: nn.Module,
        layer: nn.Module,
        call_index: int | None,
        inputs: torch.Tensor,
        targets: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward (and backward when needed): the layer's activations and their gradients."""
        start = (call_index or 0) if self.uses_layer_gradients else None
        with LayerRecorder(layer, differentiate_from=start) as recorder:
            scores = target_scores(module(inputs), targets)
            call = recorder.only_call() if call_index is None else recorder.calls[call_index]
            if call.activation.ndim != inputs.ndim:
                wanted = "[B, C, h, w]" if inputs.ndim == 4 else "[B, C, d, h, w]"
                default = "the last Conv2d" if inputs.ndim == 4 else "the last Conv3d"
                raise ExplainerError(
                    f"{self.name} needs a layer output {wanted}; {self.target_layer or default} "
                    f"gives shape {tuple(call.activation.shape)}"
                )
            if self.uses_layer_gradients:
                recorder.backprop(scores.sum())
        return call.activation, call.gradient


class GradCAM(_CamExplainer):
    """Grad-CAM (Selvaraju et al., 2017).

    ``w_k`` is the spatial mean of d(target logit)/dA_k, and the map is ``ReLU(sum_k w_k A_k)``
    (no ReLU with ``relu=False``). Units are target-logit units per feature-map cell: for a
    global-average-pool + linear head the map before ReLU sums, at feature resolution, to the
    target logit minus its bias. Upsampling interpolates these values; it does not rescale them.
    """

    name: ClassVar[str] = "gradcam"

    def _channel_weights(self, inputs: CamInputs) -> torch.Tensor:
        if inputs.gradients is None:
            raise ExplainerError(f"{self.name} needs layer gradients")
        return inputs.gradients.mean(dim=spatial_dims(inputs.gradients))


class CAM(_CamExplainer):
    """Class activation mapping (Zhou et al., 2016), for a global-average-pool + linear head.

    ``w_k`` is the target class's row of the linear classifier, so the map before ReLU is
    ``sum_k W[c, k] A_k``; its mean over the feature map plus the class bias is the logit. Units are
    target-logit units per feature cell, ``h * w`` times the Grad-CAM map of the same layer.

    The head is checked on the data, not guessed from module names: one extra forward pass
    records every ``nn.Linear`` (or only ``classifier``, a dotted module name) and keeps the one
    whose input is the spatial mean of the target layer's output and whose output is the model's
    logits, whatever code (``AdaptiveAvgPool2d``, ``mean``, ``flatten``) sits in between. A
    subclass of ``nn.Linear`` that transforms its weight in ``forward`` (the demo model's
    zero-sum head) is handled: the weights are read off the layer as the affine map it computes.
    Anything else is an :class:`ExplainerError` naming the model's last layer. Forward passes only
    (no gradients), but hooks need an eager torch module.
    """

    name: ClassVar[str] = "cam"
    uses_layer_gradients: ClassVar[bool] = False

    def __init__(self, target_layer: str | None = None, relu: bool = True, classifier: str | None = None) -> None:
        super().__init__(target_layer=target_layer, relu=relu)
        self.classifier = optional_layer_name("classifier", classifier)

    def _explain(self, model: ModelLike, batch: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        _require_torch_module(self.name, model)
        return super()._explain(model, batch, targets)

    def _layer(self, module: nn.Module, batch: torch.Tensor) -> tuple[nn.Module, int | None]:
        """``target_layer``, else the last layer call (in execution order) whose output's spatial
        mean is the input of an ``nn.Linear``: the feature map that the head pools, found on the
        data (conv-BN-ReLU blocks pool the ReLU's output, not the last Conv2d's; a ReLU module
        reused through the network is taken at the call that feeds the pool). Falls back to the
        last Conv2d, where the head check then says what is wrong."""
        if self.target_layer is not None:
            return resolve_module(module, self.target_layer, batch.ndim - 2), None
        modules = dict(module.named_modules())
        pooled: list[tuple[str, torch.Tensor]] = []
        linear_inputs: list[torch.Tensor] = []
        handles = []
        try:
            for name, child in modules.items():
                if isinstance(child, nn.Linear):
                    handles.append(child.register_forward_hook(this_thread_only(_record_linear_input(linear_inputs))))
                elif name and not any(True for _ in child.children()):
                    handles.append(child.register_forward_hook(this_thread_only(_record_pooled(name, pooled))))
            with eval_mode(module), torch.no_grad():
                module(batch)
        finally:
            for handle in handles:
                handle.remove()
        calls_before = [sum(1 for earlier, _ in pooled[:i] if earlier == name) for i, (name, _) in enumerate(pooled)]
        for (name, means), call_index in zip(reversed(pooled), reversed(calls_before)):
            if any(_close(means, linear_input) for linear_input in linear_inputs):
                return modules[name], call_index
        return resolve_module(module, None, batch.ndim - 2), None

    def _channel_weights(self, inputs: CamInputs) -> torch.Tensor:
        linear = self._find_head(inputs)
        return _affine_weight(linear, inputs.activations.shape[1], inputs.activations)[inputs.targets]

    def _find_head(self, inputs: CamInputs) -> nn.Linear:
        modules = dict(inputs.model.named_modules())
        if self.classifier is not None:
            if self.classifier not in modules:
                raise ExplainerError(
                    f"unknown classifier {self.classifier!r} in {type(inputs.model).__name__}; name its nn.Linear layer"
                )
            if not isinstance(modules[self.classifier], nn.Linear):
                raise ExplainerError(
                    f"classifier {self.classifier!r} is a {type(modules[self.classifier]).__name__}, not an nn.Linear"
                )
            candidates = {self.classifier: modules[self.classifier]}
        else:
            candidates = {name: module for name, module in modules.items() if isinstance(module, nn.Linear)}
        calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        order: list[str] = []
        handles = []
        try:
            for name, module in modules.items():
                if name in candidates:
                    handles.append(module.register_forward_hook(this_thread_only(_record_call(name, calls))))
                if name and not any(True for _ in module.children()):
                    handles.append(module.register_forward_hook(this_thread_only(_record_order(name, order))))
            with torch.no_grad():
                logits = inputs.model(inputs.batch)
        finally:
            for handle in handles:
                handle.remove()
        pooled = inputs.activations.mean(dim=spatial_dims(inputs.activations))
        for name, layer_input, layer_output in calls:
            if _close(layer_input, pooled) and _close(layer_output, logits):
                return candidates[name]
        last = f"{type(modules[order[-1]]).__name__} {order[-1]!r}" if order else type(inputs.model).__name__
        layer = self.target_layer or "the pooled layer"
        if not calls:
            why = "no nn.Linear layer ran" if self.classifier is None else f"{self.classifier!r} did not run"
        elif not any(_close(layer_output, logits) for _, _, layer_output in calls):
            why = "no nn.Linear layer gives the logits"
        else:
            why = f"the input of the layer that gives the logits is not the global average of {layer}"
        raise ExplainerError(
            f"cam needs a global-average-pool + linear head; this model ends in {last} ({why}); use gradcam, "
            "or set target_layer to the layer whose output is pooled"
        )


def upsample(maps: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """``[N, C, *small] -> [N, C, *size]``: bilinear for images, trilinear for volumes
    (``align_corners=False``, as pytorch-grad-cam and MONAI)."""
    mode = "bilinear" if len(size) == 2 else "trilinear"
    return F.interpolate(maps, size=size, mode=mode, align_corners=False)


def _require_torch_module(method: str, model: ModelLike) -> None:
    """For CAM methods that need no gradients but hook a layer: a clear error on ONNX-only runners."""
    if not isinstance(model, nn.Module) and not isinstance(getattr(model, "torch_module", None), nn.Module):
        raise ExplainerError(
            f"{method} needs the activations of a torch module (one hooked forward pass), but the model runs "
            f"on {type(model).__name__} without one; use a torch model card, or rise / hipe / occlusion"
        )


def _record_call(name: str, calls: list[tuple[str, torch.Tensor, torch.Tensor]]) -> ForwardHook:
    def hook(module: nn.Module, args: tuple[object, ...], output: object) -> None:
        if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
            calls.append((name, args[0].detach().clone(), output.detach().clone()))

    return hook


def _record_pooled(name: str, pooled: list[tuple[str, torch.Tensor]]) -> ForwardHook:
    """Record the spatial mean ``[B, C]`` of a layer's ``[B, C, h, w]`` (or ``[B, C, d, h, w]``)
    output with more than one feature cell."""

    def hook(module: nn.Module, args: tuple[object, ...], output: object) -> None:
        if isinstance(output, torch.Tensor) and output.ndim in (4, 5) and output[0, 0].numel() > 1:
            pooled.append((name, output.detach().mean(dim=spatial_dims(output))))

    return hook


def _record_linear_input(inputs: list[torch.Tensor]) -> ForwardHook:
    def hook(module: nn.Module, args: tuple[object, ...], output: object) -> None:
        if args and isinstance(args[0], torch.Tensor) and args[0].ndim == 2:
            inputs.append(args[0].detach().clone())

    return hook


def _record_order(name: str, order: list[str]) -> ForwardHook:
    def hook(module: nn.Module, args: tuple[object, ...], output: object) -> None:
        order.append(name)

    return hook


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and equal up to float32 rounding of a few additions."""
    if a.shape != b.shape:
        return False
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(torch.allclose(a.to(b.dtype), b, rtol=1e-4, atol=1e-5 * max(scale, 1.0)))


def _affine_weight(linear: nn.Module, in_features: int, like: torch.Tensor) -> torch.Tensor:
    """The ``[K, C]`` matrix ``W`` of an affine layer ``y = W x + b``, read off its outputs."""
    with torch.no_grad():
        probes = torch.cat([torch.zeros(1, in_features), torch.eye(in_features)]).to(like.device, like.dtype)
        outputs = linear(probes)
    return (outputs[1:] - outputs[:1]).T


class GradCAMPlusPlus(_CamExplainer):
    """Grad-CAM++ (Chattopadhyay et al., 2018), with the closed form for an exponential score.

    With ``Y = exp(S)`` for the target logit ``S``, the higher derivatives of ``Y`` are powers of
    ``g = dS/dA``, and the pixel weights are
    ``alpha = g^2 / (2 g^2 + sum_ab(A_ab) g^3)`` (0 where ``g = 0``); the channel weight is
    ``w_k = sum_ij alpha_ij ReLU(g_ij)``. The common factor ``exp(S)`` is dropped, as
    pytorch-grad-cam does (it only scales each sample's map). A ``1e-6`` in the denominator
    guards against division by zero, as there.
    """

    name: ClassVar[str] = "gradcam_pp"

    def _channel_weights(self, inputs: CamInputs) -> torch.Tensor:
        if inputs.gradients is None:
            raise ExplainerError(f"{self.name} needs layer gradients")
        grads = inputs.gradients
        grads_2 = grads**2
        grads_3 = grads_2 * grads
        spatial = spatial_dims(grads)
        sum_activations = inputs.activations.sum(dim=spatial, keepdim=True)
        alpha = grads_2 / (2 * grads_2 + sum_activations * grads_3 + 1e-6)
        alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
        return (alpha * grads.clamp_min(0)).sum(dim=spatial)


class ScoreCAM(_CamExplainer):
    """Score-CAM (Wang et al., 2020): channel weights from forward passes, no gradients.

    Each channel ``A_k`` of the target layer is upsampled to the input size (bilinear,
    ``align_corners=False``) and min-max normalised to a mask ``H_k`` in [0, 1] (a constant
    channel gives an all-zero mask, never NaN); the weight is the target score of the masked input
    ``H_k * x + (1 - H_k) * baseline`` minus that of the all-baseline image (the paper's
    channel-wise increase of confidence; ``subtract_baseline=False`` drops it). The paper's
    ``x * H_k`` is ``baseline=0`` (normalised units); on radiographs, where 0 is mid-grey, a dark
    baseline (the card's value for black) avoids painting bright, lesion-like patches.
    ``score="probability"`` (the paper's) uses the softmax probability, ``"logit"`` the logit.
    ``channel_softmax=True`` turns the scores into weights with a softmax over channels, as
    pytorch-grad-cam does (the baseline score then cancels). The authors' code neither subtracts
    nor normalises (``subtract_baseline=False``): on the demo model, where the all-black image
    scores higher for "nodule" than most single-channel masks, subtracting turns most weights
    negative and the map loses the nodule (8 of 20 held-out phantoms against 19 of 20).

    The ``B * C`` masked inputs go through the model ``chunk_size`` at a time (chunks mix images).
    Only forward passes, but the activations come from one hooked forward pass, so ``model`` must
    be an eager torch module (or a runner holding one).
    """

    name: ClassVar[str] = "scorecam"
    uses_layer_gradients: ClassVar[bool] = False

    def __init__(
        self,
        target_layer: str | None = None,
        relu: bool = True,
        chunk_size: int | None = None,
        score: str = "probability",
        subtract_baseline: bool = True,
        channel_softmax: bool = False,
        baseline: float = 0.0,
    ) -> None:
        super().__init__(target_layer=target_layer, relu=relu)
        self.chunk_size = optional_positive_int("chunk_size", chunk_size)
        self.baseline = finite_float("baseline", baseline)
        self.score = choice("score", score, SCORES)
        self.subtract_baseline = boolean("subtract_baseline", subtract_baseline)
        self.channel_softmax = boolean("channel_softmax", channel_softmax)

    def _explain(self, model: ModelLike, batch: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        _require_torch_module(self.name, model)
        return super()._explain(model, batch, targets)

    def _channel_weights(self, inputs: CamInputs) -> torch.Tensor:
        forward = forward_function(inputs.model)
        chunk = chunk_size_for(self.chunk_size, inputs.model)
        batch, targets, activations = inputs.batch, inputs.targets, inputs.activations
        n_images, n_channels = activations.shape[:2]
        size = tuple(batch.shape[2:])
        scores = torch.empty(n_images * n_channels, dtype=torch.float32, device=batch.device)
        for start in range(0, scores.numel(), chunk):
            index = torch.arange(start, min(start + chunk, scores.numel()), device=batch.device)
            image, channel = index // n_channels, index % n_channels
            masks = upsample(activations[image, channel][:, None], size)
            every = tuple(range(1, masks.ndim))
            low = masks.amin(dim=every, keepdim=True)
            span = masks.amax(dim=every, keepdim=True) - low
            masks = torch.where(span > 0, (masks - low) / span.clamp_min(torch.finfo(masks.dtype).tiny), 0.0)
            scores[start : start + len(index)] = forward_scores(
                forward, masks * batch[image] + (1 - masks) * self.baseline, targets[image], self.score
            )
        scores = scores.view(n_images, n_channels)
        if self.channel_softmax:
            return torch.softmax(scores, dim=1).to(activations.dtype)
        if self.subtract_baseline:
            baseline = torch.full_like(batch, self.baseline)
            scores = scores - forward_scores(forward, baseline, targets, self.score, chunk)[:, None]
        return scores.to(activations.dtype)


class GuidedGradCAM(GradCAM):
    """Guided Grad-CAM (Selvaraju et al., 2017): guided backpropagation times Grad-CAM.

    The Grad-CAM map of this class (ReLU'd unless ``relu=False``, bilinearly upsampled) multiplies,
    pixel by pixel, the map of its :class:`~service.explain.methods.gradient.GuidedBackprop` part
    (channels summed). As the Grad-CAM factor is the same for every input channel, this equals
    Captum's ``GuidedGradCam`` (per-channel product) with its channels summed, at
    ``interpolate_mode="bilinear"``. Two backward passes; a torch module is needed.
    """

    name: ClassVar[str] = "guided_gradcam"

    def __init__(self, target_layer: str | None = None, relu: bool = True) -> None:
        super().__init__(target_layer=target_layer, relu=relu)
        self.guided_backprop = GuidedBackprop()

    def _explain(self, model: ModelLike, batch: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        cam = super()._explain(model, batch, targets)
        guided = self.guided_backprop.explain(model, batch, targets.tolist())
        return cam * guided.to(cam.device, cam.dtype)
