"""Small models and images shared by the explainer tests.

- :class:`DenseNetLike`: densely connected blocks (concatenation) with in-place ReLUs.
- :class:`ResidualNet`: a ResNet basic block whose ReLU is one module called three times, distinct
  modules, functional ``torch.relu``, or Captum's ``Addition_Module`` for the residual sum.

- :class:`VolumeNet`: the same shapes in 3D (``Conv3d``, ``BatchNorm3d``, a residual block with a
  reused ReLU, max pooling) for volumes ``[B, 1, D, H, W]`` (:func:`volumes`).

Every model ends in global average pooling and a linear head over 3 classes, so the CAM family
applies to all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from captum.attr._utils.custom_modules import Addition_Module
from torch import nn

#: Side of the square test images, pixels.
SIZE = 32
#: Side of the cubic test volumes, voxels.
VOLUME_SIZE = 16


def conv_bn_relu(cin: int, cout: int, *, inplace: bool = False, norm: bool = True, bias: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=bias)]
    if norm:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU(inplace=inplace))
    return nn.Sequential(*layers)


class DenseNetLike(nn.Module):
    """A stem, three densely connected conv-bn-ReLU(in-place) layers, each reading the concatenation
    of everything before it, an average-pool transition, GAP and a linear head."""

    def __init__(self, inplace: bool = True, norm: bool = True, bias: bool = True) -> None:
        super().__init__()
        self.stem = conv_bn_relu(1, 8, inplace=inplace, norm=norm, bias=bias)
        self.layers = nn.ModuleList(conv_bn_relu(8 + 4 * i, 4, inplace=inplace, norm=norm, bias=bias) for i in range(3))
        self.transition = nn.AvgPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(20, 3, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        out = self.transition(torch.cat(features, 1))
        return self.fc(torch.flatten(self.gap(out), 1))


class ResidualNet(nn.Module):
    """A stem and a ResNet basic block (``relu(bn(conv(relu(bn(conv(h))))) + h)``), GAP, linear.

    ``relu``: ``"reused"`` (one nn.ReLU called three times), ``"modules"`` (three distinct ones),
    ``"functional"`` (``torch.relu``, ``F.relu`` and ``Tensor.relu`` in forward), ``"captum"``
    (distinct modules and the residual sum as Captum's ``Addition_Module``, which Captum's LRP
    needs to split the relevance of a sum instead of copying it to both addends).
    """

    def __init__(self, relu: str = "reused", norm: bool = True, bias: bool = True) -> None:
        super().__init__()
        self.style = relu
        self.stem = nn.Conv2d(1, 8, 3, padding=1, stride=2, bias=bias)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=bias)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=bias)
        self.bn0, self.bn1, self.bn2 = (nn.BatchNorm2d(8) if norm else None for _ in range(3))
        self.relu = nn.ReLU()
        self.relus = nn.ModuleList(nn.ReLU() for _ in range(3))
        self.add = Addition_Module()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3, bias=bias)

    def act(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if self.style == "reused":
            return self.relu(x)
        if self.style in ("modules", "captum"):
            return self.relus[i](x)
        return (torch.relu, F.relu, lambda t: t.relu())[i](x)

    @staticmethod
    def norm(batchnorm: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        return x if batchnorm is None else batchnorm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.norm(self.bn0, self.stem(x)), 0)
        branch = self.norm(self.bn2, self.conv2(self.act(self.norm(self.bn1, self.conv1(h)), 1)))
        out = self.act(self.add(branch, h) if self.style == "captum" else branch + h, 2)
        return self.fc(torch.flatten(self.gap(out), 1))


class VolumeNet(nn.Module):
    """A 3D stem (stride 2), a residual block whose one ReLU module runs three times, max pooling,
    GAP and a linear head: the volume counterpart of :class:`ResidualNet`."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv3d(1, 6, 3, padding=1, stride=2)
        self.bn0, self.bn1, self.bn2 = (nn.BatchNorm3d(6) for _ in range(3))
        self.conv1 = nn.Conv3d(6, 6, 3, padding=1)
        self.conv2 = nn.Conv3d(6, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool3d(2)
        self.gap = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn0(self.stem(x)))
        branch = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(h)))))
        out = self.pool(self.relu(branch + h))
        return self.fc(torch.flatten(self.gap(out), 1))


class Boom(nn.Module):
    """Identity that raises while ``armed``: an exception in the middle of the forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.armed:
            raise RuntimeError("boom")
        return x


def build(cls: Callable[..., nn.Module], *args: Any, seed: int = 0, **kwargs: Any) -> nn.Module:
    """A seeded model in eval mode with non-trivial batch-norm statistics and a strong head."""
    torch.manual_seed(seed)
    model = cls(*args, **kwargs)
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm2d, nn.BatchNorm3d)):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.1, 0.1)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=1.0)
    return model.eval()


def images(n: int = 4, seed: int = 1, size: int = SIZE, *, margin: int = 4, sigma: float = 3.0) -> torch.Tensor:
    """Noise plus three bright or dark Gaussian blobs (``sigma`` pixels, centres at least ``margin``
    from the border) per image, so maps have spatial structure."""
    generator = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size * 1.0), torch.arange(size * 1.0), indexing="ij")
    batch = 0.3 * torch.randn(n, 1, size, size, generator=generator)
    for image in batch:
        for _ in range(3):
            cy, cx = (torch.rand(2, generator=generator) * (size - 2 * margin) + margin).tolist()
            sign = 1.0 if torch.rand(1, generator=generator).item() > 0.5 else -1.0
            image[0] += sign * 2.0 * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    return batch


def volumes(n: int = 3, seed: int = 1, size: int = VOLUME_SIZE, *, sigma: float = 2.0) -> torch.Tensor:
    """Volumes ``[n, 1, size, size, size]``: noise plus three bright or dark Gaussian blobs each."""
    generator = torch.Generator().manual_seed(seed)
    axis = torch.arange(size * 1.0)
    zz, yy, xx = torch.meshgrid(axis, axis, axis, indexing="ij")
    batch = 0.3 * torch.randn(n, 1, size, size, size, generator=generator)
    for volume in batch:
        for _ in range(3):
            cz, cy, cx = (torch.rand(3, generator=generator) * (size - 6) + 3).tolist()
            sign = 1.0 if torch.rand(1, generator=generator).item() > 0.5 else -1.0
            distance = (zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2
            volume[0] += sign * 2.0 * torch.exp(-distance / (2 * sigma**2))
    return batch


def function_modes() -> int:
    """Depth of torch's function-mode stack: explainers that override ops must pop what they push."""
    return torch._C._len_torch_function_stack()


class ModuleRunner:
    """A runner over a torch module's no-grad forward that hides the module: forward-only access,
    numpy in and out (like ONNX Runtime); ``calls`` records the batch size of every forward."""

    def __init__(self, model: nn.Module) -> None:
        self.module = model
        self.calls: list[int] = []

    @property
    def device(self) -> str:
        return "cpu"

    @property
    def torch_module(self) -> None:
        return None

    def forward(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(len(batch))
        with torch.no_grad():
            return self.module(torch.from_numpy(batch)).numpy()
