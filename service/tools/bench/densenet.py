"""A DenseNet-121-sized classifier in plain torch, for benchmarks: the cost of a real backbone.

Same layout as DenseNet-121 (Huang et al., 2017; torchvision's ``densenet121``): a 7 x 7 stride-2
stem with 64 channels, batch norm, in-place ReLU and a 3 x 3 stride-2 max pool; four dense
blocks of (6, 12, 24, 16) layers with growth rate 32 and bottleneck width ``bn_size * growth``
(BN - ReLU - 1 x 1 conv - BN - ReLU - 3 x 3 conv, the new features concatenated to the input);
transitions (BN - ReLU - 1 x 1 conv halving the channels - 2 x 2 average pool); a final batch
norm and in-place ReLU (``features.relu5``; ``features`` as a whole, 7 x 7 x 1024 at 224², is the
CAM layer), global average pooling and a linear head. One input channel and 3 classes give about 6.96 M parameters.

Weights are random (seeded), with batch-norm running statistics set by a few forward passes in
training mode, so activations keep a sensible scale: the model measures cost, not accuracy.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

#: The layer CAM-family explainers use: the whole feature extractor (ending in the final in-place ReLU),
#: 1024 channels at 1/32 resolution.
TARGET_LAYER = "features"
#: DenseNet-121's settings.
GROWTH = 32
BLOCKS = (6, 12, 24, 16)
BN_SIZE = 4
STEM_CHANNELS = 64


class DenseLayer(nn.Module):
    """BN - ReLU - 1x1 conv (``bn_size * growth``) - BN - ReLU - 3x3 conv (``growth``), concatenated."""

    def __init__(self, in_channels: int, growth: int, bn_size: int) -> None:
        super().__init__()
        width = bn_size * growth
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, growth, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))
        return torch.cat([x, new], dim=1)


def _transition(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            norm=nn.BatchNorm2d(in_channels),
            relu=nn.ReLU(inplace=True),
            conv=nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
            pool=nn.AvgPool2d(kernel_size=2, stride=2),
        )
    )


class DenseNet121(nn.Module):
    """DenseNet-121 layout: ``[B, in_channels, H, W]`` (H, W multiples of 32) -> logits ``[B, num_classes]``."""

    def __init__(
        self,
        num_classes: int = 3,
        in_channels: int = 1,
        growth: int = GROWTH,
        blocks: tuple[int, ...] = BLOCKS,
        bn_size: int = BN_SIZE,
    ) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv0=nn.Conv2d(in_channels, STEM_CHANNELS, kernel_size=7, stride=2, padding=3, bias=False),
            norm0=nn.BatchNorm2d(STEM_CHANNELS),
            relu0=nn.ReLU(inplace=True),
            pool0=nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        channels = STEM_CHANNELS
        for index, count in enumerate(blocks, start=1):
            block = nn.Sequential()
            for layer in range(count):
                block.add_module(f"layer{layer + 1}", DenseLayer(channels + layer * growth, growth, bn_size))
            layers[f"block{index}"] = block
            channels += count * growth
            if index < len(blocks):
                layers[f"transition{index}"] = _transition(channels, channels // 2)
                channels //= 2
        layers["norm5"] = nn.BatchNorm2d(channels)
        layers["relu5"] = nn.ReLU(inplace=True)
        self.features = nn.Sequential(layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def densenet121(seed: int = 0, num_classes: int = 3, in_channels: int = 1, size: int = 64) -> DenseNet121:
    """A seeded random DenseNet-121 in eval mode, batch-norm statistics from noise images of ``size``².

    Batch norm keeps per-channel statistics, so a small calibration image (64² by default) gives
    the scale of any input size quickly.

    Kaiming-normal convolutions (torchvision's init); the running statistics come from one
    training-mode pass over 16 standard-normal images (the scale of normalised model input), drawn
    from a local generator, so the global RNG is untouched and the same seed gives the same model.
    """
    generator = torch.Generator().manual_seed(seed)
    model = DenseNet121(num_classes=num_classes, in_channels=in_channels)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
            elif isinstance(module, nn.Linear):
                bound = module.in_features**-0.5
                module.weight.copy_((torch.rand(module.weight.shape, generator=generator) * 2 - 1) * bound)
                module.bias.zero_()
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = None  # cumulative average over the calibration passes
        model.train()
        model(torch.randn(16, in_channels, size, size, generator=generator))
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    return model.eval()


def parameter_count(model: nn.Module) -> int:
    """Number of parameters (weights and biases; batch-norm buffers excluded)."""
    return sum(parameter.numel() for parameter in model.parameters())
