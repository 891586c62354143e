"""Architectures named by a card: the CAM target layer found by one forward pass is the last
spatial feature block (checked against the demo card's hand-chosen layer and a known network), and
a model library that imports torchvision loads through the shim."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from service.inference.architecture import build_module, cam_target_layer, import_architecture, spatial_layers
from service.inference.card import ModelCard
from service.models import demo_card_path
from tests.nets import TinyMultiLabel, seeded


def _output_of(module: torch.nn.Module, name: str, example: torch.Tensor) -> torch.Tensor:
    layer = dict(module.named_modules())[name]
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, output: seen.append(output.detach().clone()))
    try:
        with torch.no_grad():
            module(example)
    finally:
        handle.remove()
    return seen[-1]


def test_found_layer_is_the_demo_cards_own_target_layer() -> None:
    card = ModelCard.load(demo_card_path())
    module = build_module(
        str(card.weights["torch"].architecture), num_classes=len(card.output.classes), in_channels=1
    ).eval()
    example = torch.randn(1, 1, card.input.rows, card.input.columns, generator=torch.Generator().manual_seed(0))
    found = cam_target_layer(module, example)
    # the hand-chosen layer of the shipped card: the block, not the "features" Sequential that ends with it
    assert found == card.target_layer == "features.block4"
    torch.testing.assert_close(_output_of(module, "features", example), _output_of(module, found, example))


def test_found_layer_is_the_last_spatial_output_and_pooled_outputs_do_not_count() -> None:
    module = seeded(TinyMultiLabel(3))
    layers = spatial_layers(module, torch.zeros(1, 1, 32, 32))
    assert layers[-1] == ("features", (1, 16, 8, 8))
    assert all(name != "pool" for name, _ in layers)  # 1x1 after pooling: not spatial
    assert cam_target_layer(module, torch.zeros(1, 1, 32, 32)) == "features"


def test_a_network_without_spatial_layers_has_no_target() -> None:
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    assert cam_target_layer(module, torch.zeros(1, 1, 4, 4)) is None


@pytest.mark.skipif(importlib.util.find_spec("torchxrayvision") is None, reason="torchxrayvision not installed")
def test_torchxrayvision_loads_through_the_torchvision_shim_and_its_last_block_is_found() -> None:
    xrv = import_architecture("torchxrayvision")
    module = xrv.models.DenseNet(weights=None).eval()
    assert cam_target_layer(module, torch.zeros(1, 1, 224, 224)) == "features"  # ends with norm5, 7x7
    assert _output_of(module, "features", torch.zeros(1, 1, 224, 224)).shape == (1, 1024, 7, 7)
