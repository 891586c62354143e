"""The explainer contract shared by every saliency method.

- One class per method; settings in the constructor, validated there with messages that name
  the value found.
- ``explain(model, batch, targets)``: ``batch`` is float32 ``[B, C, H, W]`` (normalised model
  input), or ``[B, C, D, H, W]`` for a volume model (CT, MR series), ``targets`` holds one class
  index per sample; the result is a signed float32 ``[B, H, W]`` (``[B, D, H, W]``) map at input
  resolution, raw scale (normalising and colour belong to the writers). The spatial dimensions
  are inferred from the input; a method that only works on images has ``supports_volumes =
  False`` and refuses a volume with a clear error.
- Batch-first: a batch with per-sample targets gives the same maps as B single runs.
- ``model`` may always be a plain ``torch.nn.Module`` returning logits. Methods that need only
  forward passes (``needs_gradients = False``) also take any :class:`~service.inference.runner.Runner`,
  an ONNX Runtime model included.
- No state kept between calls; hooks are released on every path.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

import numpy as np
import torch

from service.inference.runner import Runner

ModelLike = torch.nn.Module | Runner
ForwardFn = Callable[[torch.Tensor], torch.Tensor]
#: Whether a forward-only explainer runs faster on this torch module than on the forward runner.
ModuleCheck = Callable[[torch.nn.Module], bool]


class ExplainerError(ValueError):
    """An explainer cannot run with these settings, on this model, or on this input."""


class TargetOutOfRange(ExplainerError):
    """A target is not one of the model's classes; ``targets`` and ``classes`` are what was found.

    Methods that run the model on inputs derived from the batch (integration steps, noisy copies)
    catch it and raise it again with the caller's own targets.
    """

    def __init__(self, targets: Sequence[int], classes: int) -> None:
        super().__init__(f"targets {list(targets)} out of range for a model with {classes} classes")
        self.targets = list(targets)
        self.classes = classes


class Explainer(ABC):
    """Base class of all saliency methods."""

    #: Registry name, e.g. ``"gradcam"``.
    name: ClassVar[str]
    #: True when the method back-propagates (needs a torch module, not only a runner).
    needs_gradients: ClassVar[bool]
    #: Wrapper methods: constructor setting that takes another explainer instance -> what it accepts
    #: (see :class:`WrappedExplainer`; the registry builds the instance from a configuration).
    wraps: ClassVar[Mapping[str, WrappedExplainer]] = MappingProxyType({})
    #: Constructor setting that takes a file trained against the model -> the model card's
    #: ``auxiliary`` entry that provides it (filled in by the node's pipeline when not set).
    card_files: ClassVar[Mapping[str, str]] = MappingProxyType({})
    #: True when the method takes volumes ``[B, C, D, H, W]`` as well as images (its spatial
    #: operations are written for any number of spatial dimensions).
    supports_volumes: ClassVar[bool] = True

    def module_preference(self) -> ModuleCheck | None:
        """For a forward-only method that runs faster on a torch module than through any runner
        (occlusion's incremental inference): a check of the module it would get; ``None`` (the
        default) when any runner serves it as well. The deployed model asks it once per explainer
        where it picks the explainer's model
        (:meth:`~service.inference.deployed.DeployedModel.model_for`)."""
        return None

    def explain(self, model: ModelLike, batch: torch.Tensor, targets: Sequence[int]) -> torch.Tensor:
        """Signed attribution maps ``[B, H, W]`` (``[B, D, H, W]`` for volumes, float32) for
        ``targets`` on ``batch``."""
        batch, target_tensor = check_batch_and_targets(batch, targets, volumes=self.supports_volumes, method=self.name)
        maps = self._explain(model, batch, target_tensor)
        return maps.detach().to(torch.float32)

    @abstractmethod
    def _explain(self, model: ModelLike, batch: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Method-specific work on a checked batch; ``targets`` is a long tensor ``[B]``."""


@dataclass(frozen=True)
class WrappedExplainer:
    """A constructor setting of a wrapper method that takes another explainer *instance*, as
    Captum's ``NoiseTunnel`` takes an attribution method (e.g. SmoothGrad's ``base``).

    A configuration cannot hold an instance, so it names the method instead: ``<setting>`` is its
    registry name (``default`` when left out) and ``<setting>_params`` its own settings;
    :func:`service.explain.registry.get_explainer` builds the instance.
    """

    #: Registry name of the method wrapped when the configuration names none.
    default: str
    #: The explainers that can be wrapped: instances of this class that are no wrappers themselves.
    accepts: type[Explainer]
    #: What ``accepts`` means, for error messages: "a method that attributes to the input pixels".
    description: str


def check_batch_and_targets(
    batch: torch.Tensor, targets: Sequence[int], *, volumes: bool = False, method: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes and types of an explainer's input; return the batch and a long target tensor.

    Images ``[B, C, H, W]`` always; volumes ``[B, C, D, H, W]`` where ``volumes`` is true (a
    method that declares :attr:`Explainer.supports_volumes`), else an error naming ``method``.
    """
    if not isinstance(batch, torch.Tensor):
        raise ExplainerError(f"batch must be a torch.Tensor [B, C, H, W], got {type(batch).__name__}")
    if batch.ndim == 5 and not volumes:
        raise ExplainerError(
            f"{method or 'this method'} works on images [B, C, H, W] only, got a volume {tuple(batch.shape)}; "
            "choose a method that supports volumes (gradient, CAM, propagation, occlusion, RISE, HiPe)"
        )
    if batch.ndim not in (4, 5):
        raise ExplainerError(
            f"batch must have 4 dimensions [B, C, H, W] (or 5, [B, C, D, H, W], for a volume), "
            f"got shape {tuple(batch.shape)}"
        )
    if not batch.is_floating_point():
        raise ExplainerError(f"batch must be floating point, got dtype {batch.dtype}")
    target_tensor = torch.as_tensor(list(targets), dtype=torch.long, device=batch.device)
    if target_tensor.ndim != 1 or target_tensor.numel() != batch.shape[0]:
        raise ExplainerError(
            f"need one target per sample: batch has {batch.shape[0]} samples, got {target_tensor.numel()} targets"
        )
    if (target_tensor < 0).any():
        raise ExplainerError(f"targets must be class indices >= 0, got {target_tensor.tolist()}")
    return batch, target_tensor


def check_target_range(targets: torch.Tensor, classes: int) -> None:
    """Every target is a class index below ``classes``; else :class:`TargetOutOfRange` naming all targets."""
    if targets.numel() and int(targets.max()) >= classes:
        raise TargetOutOfRange(targets.tolist(), classes)


def check_logits(logits: torch.Tensor, targets: torch.Tensor) -> None:
    """Check that ``logits`` is ``[B, K]`` for the ``B`` targets and every target is below ``K``."""
    if logits.ndim != 2 or logits.shape[0] != targets.numel():
        raise ExplainerError(
            f"model must return logits [B, K] with B = {targets.numel()}, got shape {tuple(logits.shape)}"
        )
    check_target_range(targets, logits.shape[1])


def torch_module_of(model: ModelLike, method: str) -> torch.nn.Module:
    """The differentiable module behind ``model``; a clear error when there is none (ONNX)."""
    if isinstance(model, torch.nn.Module):
        return model
    module = getattr(model, "torch_module", None)
    if isinstance(module, torch.nn.Module):
        return module
    raise ExplainerError(
        f"{method} needs gradients, but the model runs on {type(model).__name__} without a torch module; "
        "use a TorchScript/torch model card, or a forward-only method such as occlusion"
    )


#: Perturbed inputs per forward pass of a forward-only method whose ``chunk_size`` is ``None`` (the
#: default), a bound on what is held at once: 64 where the model computes on a CPU, 256 on a GPU,
#: which is only busy with large passes (``pacs-xai bench explain`` on an H100, occlusion on a
#: DenseNet-121-sized model: 0.196 s/image in passes of 64, 0.160 s at 256, its forward-pass floor).
CHUNK_SIZE_CPU, CHUNK_SIZE_GPU = 64, 256

#: Largest batch an eager torch module runs at once on the CPU. On a CPU, eager torch runs a CNN
#: fastest per sample at about 16 (``pacs-xai bench explain`` on the demo model: RISE, HiPe,
#: occlusion, LIME and KernelSHAP at 1.6-2.0x their forward-pass floor with passes of 64, 0.8-1.04x
#: with 16), so a CPU chunk is split here. ONNX Runtime and GPUs take the whole chunk.
CPU_TORCH_BATCH = 16


def on_gpu(model: ModelLike) -> bool:
    """True when ``model`` computes on a CUDA device: a module's first parameter or buffer, or a
    runner's device (``"cuda:0"``, ``"CUDAExecutionProvider"``)."""
    if isinstance(model, torch.nn.Module):
        first = next(itertools.chain(model.parameters(), model.buffers()), None)
        return first is not None and first.device.type == "cuda"
    return "cuda" in str(getattr(model, "device", "")).lower()


def spatial_dims(batch: torch.Tensor) -> tuple[int, ...]:
    """The spatial dimensions of a batch ``[B, C, *spatial]``: ``(2, 3)`` for images,
    ``(2, 3, 4)`` for volumes (for reductions such as ``mean(dim=spatial_dims(x))``)."""
    return tuple(range(2, batch.ndim))


def chunk_size_for(chunk_size: int | None, model: ModelLike) -> int:
    """``chunk_size`` when set, else :data:`CHUNK_SIZE_GPU` or :data:`CHUNK_SIZE_CPU` for ``model``."""
    if chunk_size is not None:
        return chunk_size
    return CHUNK_SIZE_GPU if on_gpu(model) else CHUNK_SIZE_CPU


def forward_function(model: ModelLike) -> ForwardFn:
    """A no-grad forward pass ``[N, C, *spatial] -> logits [N, K]`` for a torch module or a runner."""
    if isinstance(model, torch.nn.Module):

        def forward_torch(inputs: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                if inputs.device.type == "cpu" and inputs.shape[0] > CPU_TORCH_BATCH:
                    return torch.cat([model(part) for part in inputs.split(CPU_TORCH_BATCH)])
                return model(inputs)

        return forward_torch
    if isinstance(model, Runner):

        def forward_runner(inputs: torch.Tensor) -> torch.Tensor:
            logits = model.forward(np.ascontiguousarray(inputs.detach().cpu().numpy(), dtype=np.float32))
            return torch.from_numpy(np.asarray(logits)).to(inputs.device)

        return forward_runner
    raise ExplainerError(f"model must be a torch.nn.Module or a Runner, got {type(model).__name__}")
