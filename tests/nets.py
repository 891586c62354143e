"""Small networks the tests name as a model card's architecture (``tests.nets:...``): fast on two cores."""

from __future__ import annotations

import torch
from torch import nn


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
