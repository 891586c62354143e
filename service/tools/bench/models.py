"""The models and images the explainer benchmarks run on: the demo model or a DenseNet-121-sized one,
phantom nodule radiographs through the demo card's pixel pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from dicom_io.pixels import prepare_frames
from service.inference.backends import load_runner
from service.inference.card import ModelCard
from service.models import demo_card_path
from service.synthetic.phantoms import make_phantom
from service.tools.bench.densenet import TARGET_LAYER, densenet121

MODELS = ("demo", "densenet121")
#: Phantom series of the benchmark images (not the training seeds 7 and 1007).
IMAGE_SEED = 31337


@dataclass(frozen=True)
class BenchModel:
    """A model under test with its images (normalised ``[B, C, H, W]``) and per-image targets."""

    name: str
    module: nn.Module
    target_layer: str
    images: torch.Tensor
    targets: list[int]
    parameters: int
    #: The model as the node runs forward-only methods on CPU (ONNX Runtime), when the card ships it.
    onnx_runner: Any = None
    #: The model card, for the settings it provides to explainers (e.g. realtime_saliency's masker).
    card: Any = None


def phantom_images(count: int, seed: int = IMAGE_SEED) -> torch.Tensor:
    """``count`` phantom nodule radiographs through the demo card's pixel pipeline, normalised."""

    card = ModelCard.load(demo_card_path())
    frames = [
        prepare_frames(make_phantom(index, "nodule", seed=seed).dataset, card.input.spec())[0].model_input
        for index in range(count)
    ]
    mean = np.asarray(card.input.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(card.input.std, dtype=np.float32).reshape(1, -1, 1, 1)
    return torch.from_numpy(((np.stack(frames) - mean) / std).astype(np.float32))


def load_bench_model(name: str, images: torch.Tensor, device: torch.device) -> BenchModel:
    """The demo model (shipped weights, eager torch) or the seeded DenseNet-121, on ``device``.

    Targets are each image's predicted class, what the node explains.
    """
    if name == "demo":
        card = ModelCard.load(demo_card_path())
        module = load_runner(card, "torch", device="cpu").torch_module
        onnx_runner = load_runner(card, "onnx", device="cpu") if "onnx" in card.weights else None
        layer = card.target_layer
        if module is None or layer is None:
            raise ValueError(f"the demo card {demo_card_path()} must ship torch weights and a target layer")
    elif name == "densenet121":
        module, layer = densenet121(in_channels=images.shape[1]), TARGET_LAYER
        onnx_runner, card = None, None
    else:
        raise ValueError(f"unknown bench model {name!r}; choose from {', '.join(MODELS)}")
    module = module.to(device).eval()
    images = images.to(device)
    with torch.no_grad():
        targets = module(images).argmax(dim=1).tolist()
    parameters = sum(p.numel() for p in module.parameters())
    runner = onnx_runner if device.type == "cpu" else None
    return BenchModel(name, module, layer, images, targets, parameters, runner, card)
