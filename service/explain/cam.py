"""Class activation maps: a weighted sum of a convolutional layer's feature maps.

The shared machinery lives in :class:`_CamExplainer` (hooks, forward, backward, upsampling);
each method overrides only :meth:`_CamExplainer._channel_weights`.
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
    check_logits,
    torch_module_of,
)
from service.explain.hooks import LayerRecorder, eval_mode, module_device, resolve_module


@dataclass(frozen=True)
class CamInputs:
    """What a CAM method may use to weight the channels of the target layer.

    ``batch`` and ``targets`` are on the model's device. ``activations`` is the layer's output
    ``[B, C, h, w]`` (detached); ``gradients`` is d(sum of each sample's target logit)/d(activations),
    same shape, or ``None`` for methods that do not back-propagate.
    """

    model: nn.Module
    batch: torch.Tensor
    targets: torch.Tensor
    activations: torch.Tensor
    gradients: torch.Tensor | None


class _CamExplainer(Explainer):
    """Base of the CAM family: ``map = ReLU(sum_k w_k A_k)`` upsampled to the input size.

    The base hooks the target layer, runs the model in eval mode, back-propagates the sum of each
    sample's own target logit down to that layer (so a batch equals single runs), then combines
    the channels with the weights from :meth:`_channel_weights` at feature resolution and
    upsamples bilinearly (``align_corners=False``). The model is left as found: modes restored,
    no hooks, no ``.grad`` written, ``requires_grad`` untouched.
    """

    needs_gradients: ClassVar[bool] = True
    #: Whether the base computes layer gradients (False for forward-only weights, e.g. Score-CAM).
    uses_layer_gradients: ClassVar[bool] = True

    def __init__(self, target_layer: str | None = None, relu: bool = True) -> None:
        if target_layer is not None and (not isinstance(target_layer, str) or not target_layer):
            raise ExplainerError(f"target_layer must be a non-empty layer name or None, got {target_layer!r}")
        if not isinstance(relu, bool):
            raise ExplainerError(f"relu must be True or False, got {relu!r}")
        self.target_layer = target_layer
        self.relu = relu

    @abstractmethod
    def _channel_weights(self, inputs: CamInputs) -> torch.Tensor:
        """Per-sample channel weights ``[B, C]``; the one method a CAM variant overrides."""

    def _explain(self, model: ModelLike, batch: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        module = torch_module_of(model, self.name)
        layer = resolve_module(module, self.target_layer)
        device = module_device(module)
        if device is None:
            device = batch.device
        with eval_mode(module), torch.inference_mode(False), torch.set_grad_enabled(self.uses_layer_gradients):
            # Copies made here are ordinary tensors even when the caller is in inference mode.
            inputs = batch.detach().to(device).clone().requires_grad_(self.uses_layer_gradients)
            targets = targets.to(device).clone()
            activations, gradients = self._record_layer(module, layer, inputs, targets)
            weights = self._channel_weights(CamInputs(module, inputs.detach(), targets, activations, gradients))
        cam = (weights[:, :, None, None] * activations).sum(dim=1, keepdim=True)
        if self.relu:
            cam = cam.clamp_min(0)
        cam = F.interpolate(cam, size=tuple(batch.shape[-2:]), mode="bilinear", align_corners=False)
        return cam[:, 0].to(batch.device)

    def _record_layer(
        self, module: nn.Module, layer: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward (and backward when needed): the layer's activations and their gradients."""
        with LayerRecorder(layer) as recorder:
            logits = module(inputs)
            check_logits(logits, targets)
            call = recorder.only_call()
            if call.activation.ndim != 4:
                raise ExplainerError(
                    f"{self.name} needs a layer output [B, C, h, w]; {self.target_layer or 'the last Conv2d'} "
                    f"gives shape {tuple(call.activation.shape)}"
                )
            if self.uses_layer_gradients:
                recorder.backprop(logits.gather(1, targets[:, None]).sum())
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
        return inputs.gradients.mean(dim=(2, 3))
