"""Small networks the tests name as a model card's architecture (``tests.nets:...``): fast on two cores."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from torch import nn

from service.inference.card import sha256_of


class TinyMultiLabel(nn.Module):
    """Two conv blocks (the last one spatial, 8x8 at a 32² input), global pooling, a linear head:
    K logits for a multi-label (sigmoid) card. Built like the demo network: ``(num_classes, in_channels)``."""

    def __init__(self, num_classes: int = 4, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


class FixedSizeNet(nn.Module):
    """A network that takes exactly one input size (a flattening linear layer): 1x16x16 -> 3 logits."""

    def __init__(self, num_classes: int = 3, in_channels: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.head = nn.Linear(4 * 16 * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))


def seeded(network: nn.Module, seed: int = 0) -> nn.Module:
    """``network`` with parameters drawn from a seeded generator (deterministic random weights), in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return network.eval()


def write_card(folder: Path, network: nn.Module, architecture: str, **changes: object) -> Path:
    """A model card for ``network``'s state dict in ``folder`` (sigmoid over 4 classes a..d at 32²,
    target layer ``features``); ``changes`` replace top-level keys or update the sections. Returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "model.pth"
    torch.save(network.state_dict(), weights)
    raw: dict[str, object] = {
        "name": "test-multi-label",
        "version": "1",
        "weights": {"torch": {"file": "model.pth", "sha256": sha256_of(weights), "architecture": architecture}},
        "input": {"channels": 1, "rows": 32, "columns": 32, "mean": [0.5], "std": [0.25]},
        "output": {"activation": "sigmoid", "classes": ["a", "b", "c", "d"]},
        "target_layer": "features",
    }
    for key, value in changes.items():
        current = raw.get(key)
        raw[key] = {**current, **value} if isinstance(value, dict) and isinstance(current, dict) else value
    path = folder / "model.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path
