"""Forward-only graphs of a model for an inference server: the classifier, and the CAM family's
layer gradients traced into plain operations.

The CAM family (Grad-CAM, Grad-CAM++, the CAM part of guided Grad-CAM) needs, per image, the
target layer's activations ``A`` ``[B, C, h, w]`` and ``dS/dA``, the gradient of the image's own
target logit ``S`` with respect to them. :func:`layer_gradients` computes them in eager torch the
way :class:`~service.explain.hooks.LayerRecorder` does (the activation as the layer produced it,
before any in-place op downstream; the backward pass stops at the layer). :func:`trace` runs it
under ``torch.fx.experimental.proxy_tensor.make_fx``, which records the forward and the backward
(autograd decomposed into ATen operations such as ``convolution_backward``) as one graph with no
autograd left in it: a forward-only graph that a server runs and batches like any other, with a
symbolic batch size. The parameters are constants of the graph.

The graphs are saved with ``torch.export.save`` (an exported program, dynamic in the batch: code
plus constants) and need only torch, of the release that wrote them, to load, not this project:
the Triton server's own virtualenv runs them (:mod:`service.tools.triton.serve`). Load them only
from a folder this node wrote.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from service.inference.backends import load_runner
from service.inference.card import ModelCard, ModelCardError

#: File names in an exported graph folder.
CLASSIFIER_FILE, CAM_FILE, SPEC_FILE = "classifier.pt2", "layer-gradients.pt2", "spec.json"


@dataclass(frozen=True)
class GraphSpec:
    """What the server needs to bind the graphs: names, shapes (without the batch), batching."""

    card: str  # the model card's name and version, e.g. "pacs-xai-demo-chest 1.0.0"
    classifier_model: str  # Triton model name of the classifier
    cam_model: str | None  # Triton model name of the layer-gradient graph; None when the card has no target layer
    target_layer: str | None
    input_shape: tuple[int, ...]  # [C, H, W] or [C, D, H, W], normalised float32
    classes: int
    activation_shape: tuple[int, ...] | None  # [C', h, w] of the target layer
    max_batch: int
    max_queue_delay_us: int

    def save(self, folder: Path) -> None:
        (folder / SPEC_FILE).write_text(json.dumps(asdict(self), indent=2))


def layer_gradients(
    module: nn.Module, layer: nn.Module, images: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's activations and d(sum of each image's target logit)/d(activations), both ``[B, C', h, w]``.

    The layer must run exactly once per forward pass. ``targets`` is a long tensor ``[B]`` (or ``[B, 1]``).
    """
    recorded: list[torch.Tensor] = []

    def hand_on_a_leaf(_module: nn.Module, _inputs: object, output: object) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise ModelCardError(f"layer {type(layer).__name__} returns {type(output).__name__}, not one tensor")
        # The gradient is taken at a leaf holding the output as produced; downstream gets a copy,
        # so an in-place op after the layer (ReLU(inplace=True)) rewrites neither.
        leaf = output.detach().requires_grad_(True)
        recorded.append(leaf)
        return leaf.clone()

    handle = layer.register_forward_hook(hand_on_a_leaf)
    try:
        with torch.enable_grad():
            logits = module(images)
    finally:
        handle.remove()
    if len(recorded) != 1:
        raise ModelCardError(
            f"layer {type(layer).__name__} ran {len(recorded)} times in one forward pass; the served CAM graph "
            "needs a target layer that runs exactly once"
        )
    score = logits.gather(1, targets.reshape(-1, 1).long()).sum()
    (gradients,) = torch.autograd.grad(score, recorded)
    return recorded[0].detach(), gradients


def trace(function: Callable[..., object], *examples: torch.Tensor) -> torch.fx.GraphModule:
    """``function`` traced into ATen operations, batch size symbolic (examples need a batch of at least 2)."""
    return make_fx(function, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*examples)


def trace_layer_gradients(module: nn.Module, layer_name: str, example: torch.Tensor) -> torch.fx.GraphModule:
    """The graph ``(images [B, ...], targets [B, 1] int64) -> (activations, gradients)`` of ``module``'s
    layer ``layer_name`` (a dotted name as in ``named_modules()``)."""
    layers = dict(module.named_modules())
    if layer_name not in layers:
        raise ModelCardError(f"target layer {layer_name!r} is not a layer of {type(module).__name__}")
    layer = layers[layer_name]
    module.eval()

    def graph(images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return layer_gradients(module, layer, images, targets)

    targets = torch.zeros(len(example), 1, dtype=torch.int64)
    return trace(graph, example, targets)


def trace_classifier(module: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """The graph ``images [B, ...] -> logits [B, K]`` of ``module`` in eval mode, without autograd."""
    module.eval()

    def graph(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(images)

    return trace(graph, example)


def model_names(card: ModelCard) -> tuple[str, str]:
    """Triton model names of a card's classifier and layer-gradient graph (Triton's allowed characters)."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", f"{card.name}-{card.version}")
    return f"{stem}-classifier", f"{stem}-layer-gradients"


def export_graphs(card: ModelCard, folder: Path, *, max_batch: int = 32, max_queue_delay_us: int = 5000) -> GraphSpec:
    """Write the card's classifier graph and (with a ``target_layer``) its layer-gradient graph to
    ``folder`` as ``torch.export`` programs with a dynamic batch dimension, and the spec beside them.

    Needs the card's eager ``torch`` weights (the graphs are traced through the eager module);
    checks each graph against the eager module on two images before writing it.
    """
    if "torch" not in card.weights:
        raise ModelCardError(
            f"model card {card.name}: the Triton tier traces the eager network, but the card ships only "
            f"{', '.join(sorted(card.weights))} weights; add torch weights (state dict + architecture)"
        )
    module = load_runner(card, "torch", device="cpu").torch_module
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    example = torch.randn(2, *card.input.shape())
    targets = torch.arange(2, dtype=torch.int64).remainder(len(card.output.classes)).reshape(2, 1)
    batch = torch.export.Dim("batch", min=1, max=max(max_batch, 2) * 64)
    classifier_name, cam_name = model_names(card)
    with torch.no_grad():
        classifier = torch.export.export(
            trace_classifier(module, example), (example,), dynamic_shapes=({0: batch},), strict=False
        )
        _check_close("classifier", classifier.module()(example), module(example))
    torch.export.save(classifier, folder / CLASSIFIER_FILE)
    activation_shape = None
    if card.target_layer:
        graph = trace_layer_gradients(module, card.target_layer, example)
        with torch.no_grad():
            exported = torch.export.export(
                graph, (example, targets), dynamic_shapes=({0: batch}, {0: batch}), strict=False
            )
            served = exported.module()(example, targets)
        eager = layer_gradients(module, dict(module.named_modules())[card.target_layer], example, targets)
        for name, got, want in zip(("activations", "gradients"), served, eager):
            _check_close(name, got, want)
        torch.export.save(exported, folder / CAM_FILE)
        activation_shape = tuple(int(size) for size in eager[0].shape[1:])
    spec = GraphSpec(
        card=f"{card.name} {card.version}",
        classifier_model=classifier_name,
        cam_model=cam_name if card.target_layer else None,
        target_layer=card.target_layer,
        input_shape=tuple(int(size) for size in card.input.shape()),
        classes=len(card.output.classes),
        activation_shape=activation_shape,
        max_batch=max_batch,
        max_queue_delay_us=max_queue_delay_us,
    )
    spec.save(folder)
    return spec


def _check_close(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """The exported graph gives the eager module's numbers (float32 round-off), else a clear error."""
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        raise ModelCardError(
            f"the exported {what} graph differs from the eager network (shapes {tuple(got.shape)} vs "
            f"{tuple(want.shape)}); the network may do something tracing cannot capture (data-dependent control flow)"
        )
