"""A deployed model: its card plus the runners the pipeline and the explainers need.

Predictions and forward-only explainers use ONNX Runtime when the card ships ONNX weights (the
fastest CPU path), else TorchScript, else eager torch; gradient explainers get the eager torch
module (CAM methods need its forward hooks), else the TorchScript one. A forward-only explainer
that runs faster on the eager module itself (occlusion's incremental inference, which recomputes
only the occluded window's reach in each layer, needs a network ``torch.fx`` traces) gets it
instead of the pool, when it is on the forward runner's device (:meth:`DeployedModel.model_for`).
The differentiable runner is loaded only when a gradient method, such an explainer or the
out-of-distribution signal (which hooks the eager module, :mod:`service.trust.ood`) asks for it.

With a Triton server (``triton``, :mod:`service.inference.triton`), the forward passes go to it
instead of a local runtime, and the CAM methods that need only the target layer's activations and
gradients get them from its traced graph; the local eager module is loaded only for the methods
that back-propagate to the input.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from service.inference.backends import AnyRunner, DevicePreference, gradient_runtime, load_runner
from service.inference.card import Activation, ModelCard
from service.inference.pool import InferencePool, PoolMetrics
from service.inference.triton import (
    ServedGradientModel,
    TritonLayerGradients,
    TritonRunner,
    TritonSettings,
    TritonUnavailableError,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolSettings:
    """Dynamic micro-batching of the forward passes (see :mod:`service.inference.pool`)."""

    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 1024


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one frame."""

    class_index: int
    class_name: str
    probability: float  # of class_name, 0..1
    probabilities: tuple[float, ...]  # per class of the card, same order


def _device_kind(device: str) -> str:
    """``"cuda"`` or ``"cpu"`` for a runner's device (``"CUDAExecutionProvider"``, ``"cuda:0"``,
    ``"CPUExecutionProvider"``, ``"cpu"``); any other device as named."""
    lower = device.lower()
    return "cuda" if "cuda" in lower else "cpu" if lower.startswith("cpu") else lower


def class_probabilities(activation: Activation, logits: torch.Tensor) -> torch.Tensor:
    """Probabilities 0..1 from logits ``[..., K]`` by the card's ``output.activation``: softmax over
    the classes (one finding per image) or a sigmoid per class (multi-label)."""
    return torch.softmax(logits, dim=-1) if activation == "softmax" else torch.sigmoid(logits)


class DeployedModel:
    """Card + runners, loaded once at start-up and shared by every study."""

    def __init__(
        self,
        card: ModelCard,
        *,
        device: DevicePreference = "auto",
        pool: PoolSettings | None = None,
        metrics: PoolMetrics | None = None,
        triton: TritonSettings | None = None,
    ) -> None:
        self.card = card
        self._device = device
        self.triton = triton
        self.forward_runtime = next(r for r in ("onnx", "torchscript", "torch") if r in card.weights)
        self.forward_runner: AnyRunner | TritonRunner = (
            TritonRunner(card, triton) if triton else load_runner(card, self.forward_runtime, device=device)
        )
        settings = pool or PoolSettings()
        #: Every forward-only pass (predictions, perturbation explainers) goes through this pool.
        self.pool = InferencePool(
            self.forward_runner,
            max_batch=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            metrics=metrics,
        )
        self._warm_up(settings.max_batch)

    @classmethod
    def from_card_path(cls, path: str | Path, **kwargs: object) -> DeployedModel:
        return cls(ModelCard.load(path), **kwargs)  # type: ignore[arg-type]

    def _warm_up(self, batch: int) -> None:
        """One full-size forward pass at start-up, so the first study does not pay for lazy initialisation.

        A Triton server away (restarting while a worker starts) skips it: the worker starts and its
        first batch waits for the server, instead of exiting and being restarted again and again."""
        shape = (1 if self.card.input.kind == "volume" else batch, *self.card.input.shape())
        try:
            self.forward_runner.forward(np.zeros(shape, dtype=np.float32))
        except TritonUnavailableError as exc:
            log.warning("warm-up pass skipped, the model server is away: %s", exc)

    def close(self) -> None:
        """Stop the inference pool (finishes what is queued)."""
        self.pool.close()

    @functools.cached_property
    def gradient_runner(self) -> AnyRunner:
        """A differentiable runner for methods that back-propagate: eager torch, else TorchScript."""
        runtime = gradient_runtime(self.card)
        if runtime == self.forward_runtime and self.triton is None:
            return self.forward_runner  # type: ignore[return-value]
        return load_runner(self.card, runtime, device=self._device)

    @functools.cached_property
    def served_gradients(self) -> ServedGradientModel | None:
        """With Triton and a card ``target_layer``: the model handed to gradient explainers (CAM
        methods take the served layer gradients, the others the local module)."""
        if self.triton is None or not self.card.target_layer:
            return None
        layer_gradients = TritonLayerGradients(self.card, self.triton)
        return ServedGradientModel(self.pool, layer_gradients, lambda: self.gradient_runner.torch_module)

    @functools.cached_property
    def local_module(self) -> torch.nn.Module | None:
        """The eager network on the forward runner's kind of device (CPU or CUDA), for forward-only
        explainers that run faster on it; ``None`` with Triton (the forward passes belong to the
        server), for a card without ``torch`` weights, or when it would run on another device."""
        if self.triton is not None or "torch" not in self.card.weights:
            return None
        runner = self.gradient_runner
        if _device_kind(runner.device) != _device_kind(self.forward_runner.device):
            return None
        return runner.torch_module

    def model_for(
        self, *, needs_gradients: bool, prefers_module: Callable[[torch.nn.Module], bool] | None = None
    ) -> torch.nn.Module | InferencePool | ServedGradientModel:
        """What an explainer receives as its model, the one place that chooses it: the
        differentiable module for a method that back-propagates (with Triton:
        :attr:`served_gradients`); for a forward-only method, :attr:`local_module` where the
        method's ``prefers_module`` check (its ``module_preference()``) accepts it, else the
        inference pool (forward passes batched with every other caller's)."""
        if needs_gradients:
            return self.served_gradients or self.gradient_runner.torch_module
        if prefers_module is not None and self.local_module is not None and prefers_module(self.local_module):
            return self.local_module
        return self.pool

    def normalise(self, model_inputs: np.ndarray) -> np.ndarray:
        """The card's (x - mean) / std, per channel, on ``[B, C, H, W]`` (or volume) inputs in [0, 1]."""
        return self.card.input.normalise(model_inputs)

    def predict(self, batch: np.ndarray) -> list[Prediction]:
        """Class and probability per sample of a normalised batch."""
        probabilities = class_probabilities(self.card.output.activation, torch.from_numpy(self.pool.forward(batch)))
        classes = self.card.output.classes
        result = []
        for row in probabilities.numpy():
            index = int(row.argmax())
            result.append(Prediction(index, classes[index], float(row[index]), tuple(float(p) for p in row)))
        return result
