"""The demo volume classifier: a compact 3D CNN ending in global average pooling and one linear layer.

Input: one channel, 48³ voxels of 2.5 x 4 x 4 mm (slices, rows, columns) of a chest CT windowed to
[-1000, 400] HU and normalised as the card says; output: logits for (normal, nodule). The CAM
layer ``features.block4`` is 12³ (a cell of 10 x 16 x 16 mm). The head takes the global *maximum*
of each feature channel, not its average: a nodule fills a few of the 1728 cells, and a maximum
says "somewhere in the volume" without diluting it a thousandfold, so the model learns in minutes
on 2 cores. Grad-CAM, occlusion and the other methods apply; CAM (which needs an average-pooled
head) refuses the model with its reason.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from service.models.demo.network import ZeroSumLinear, conv_block

#: The layer whose activations CAM-family explainers use (named in the model card).
TARGET_LAYER = "features.block4"


class VolumeDemoNet(nn.Module):
    """48³ in, 12³ x 16 feature map at ``features.block4``, global max, linear -> class logits."""

    def __init__(self, num_classes: int = 2, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                stem=conv_block(in_channels, 8, stride=2, dimensions=3),  # 24³
                block1=conv_block(8, 8, dimensions=3),
                pool1=nn.MaxPool3d(2),  # 12³
                block2=conv_block(8, 16, dimensions=3),
                block3=conv_block(16, 16, dimensions=3),
                block4=conv_block(16, 16, dimensions=3),
            )
        )
        self.pool = nn.AdaptiveMaxPool3d(1)
        self.classifier = ZeroSumLinear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))
