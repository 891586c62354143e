"""The demo classifier: a compact CNN ending in global average pooling and one linear layer.

Because the last convolutional block feeds a GAP and a single linear layer, Class Activation
Mapping applies exactly, and Grad-CAM at ``features.block4`` reduces to it. Input: one channel,
224 x 224, normalised as the model card says; output: logits for (normal, nodule, effusion).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

#: The layer whose activations CAM-family explainers use (named in the model card).
TARGET_LAYER = "features.block4"


#: Convolution and batch norm of a block, by the number of spatial dimensions.
_LAYERS: dict[int, tuple[type[nn.Module], type[nn.Module]]] = {
    2: (nn.Conv2d, nn.BatchNorm2d),
    3: (nn.Conv3d, nn.BatchNorm3d),
}


def conv_block(in_channels: int, out_channels: int, stride: int = 1, *, dimensions: int = 2) -> nn.Sequential:
    """The demo networks' block: a 3-wide convolution without bias (``0.weight``), batch norm
    (``1.*``) and ReLU, over 2 (images) or 3 (volumes) spatial dimensions."""
    if dimensions not in _LAYERS:
        raise ValueError(f"a block has 2 or 3 spatial dimensions, not {dimensions!r}")
    conv, norm = _LAYERS[dimensions]
    return nn.Sequential(
        conv(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        norm(out_channels),
        nn.ReLU(inplace=True),
    )


class ZeroSumLinear(nn.Linear):
    """A linear classifier whose class weights (and biases) sum to zero over the classes.

    Softmax is blind to a vector added to every class's weights, so an ordinary head may carry an
    arbitrary class-independent part, and the CAM of any class then lights up whatever all images
    share (the laterality marker, the collimation edges). Removing the mean over classes keeps the
    probabilities' expressiveness and makes each class map contrastive: evidence for this class
    rather than for the average class.
    """

    def centred_weight(self) -> torch.Tensor:
        """Class weights ``[K, C]`` with the mean over classes removed."""
        return self.weight - self.weight.mean(dim=0, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.centred_weight(), self.bias - self.bias.mean())


class DemoNet(nn.Module):
    """224² in, 28² x 64 feature map at ``features.block4``, GAP, linear -> class logits."""

    def __init__(self, num_classes: int = 3, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                stem=conv_block(in_channels, 16, stride=2),  # 112²
                block1=conv_block(16, 16),
                pool1=nn.MaxPool2d(2),  # 56²
                block2=conv_block(16, 32),
                pool2=nn.MaxPool2d(2),  # 28²
                block3=conv_block(32, 64),
                block4=conv_block(64, 64),
            )
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = ZeroSumLinear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))

    @torch.jit.ignore
    def logits_and_cams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, K]`` and the class activation maps ``[B, K, 28, 28]`` whose mean they are (+ bias)."""
        features = self.features(x)
        cams = torch.einsum("kc,bchw->bkhw", self.classifier.centred_weight(), features)
        return self.classifier(torch.flatten(self.pool(features), 1)), cams
