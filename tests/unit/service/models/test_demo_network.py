"""The demo networks' one block builder: a bias-free 3-wide convolution, batch norm and ReLU in 2D
(the radiograph model) or 3D (the volume model), computed as torch's functional layers compute them,
with the parameter names the shipped weights carry (both load strictly)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from service.models import demo_card_path, volume_card_path
from service.models.demo.network import DemoNet, conv_block
from service.models.volume_demo.network import VolumeDemoNet


@pytest.mark.parametrize(("dimensions", "convolution"), [(2, F.conv2d), (3, F.conv3d)])
@pytest.mark.parametrize("stride", [1, 2])
def test_a_block_is_convolution_batch_norm_and_relu_in_2d_or_3d(dimensions: int, convolution, stride: int) -> None:
    torch.manual_seed(0)
    block = conv_block(2, 3, stride, dimensions=dimensions).eval()
    norm = block[1]
    norm.running_mean.uniform_(-1, 1)
    norm.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 2, *[8] * dimensions)
    expected = F.relu(
        F.batch_norm(
            convolution(x, block[0].weight, None, stride, 1),
            norm.running_mean,
            norm.running_var,
            norm.weight,
            norm.bias,
            eps=norm.eps,
        )
    )
    assert block[0].bias is None and block[0].weight.shape == (3, 2, *[3] * dimensions)
    assert torch.allclose(block(x), expected, atol=1e-6)
    assert block(x).shape == (2, 3, *[8 // stride] * dimensions)


def test_a_block_of_another_dimension_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match="2 or 3 spatial dimensions, not 1"):
        conv_block(1, 1, dimensions=1)


def test_the_shipped_weights_load_strictly_into_both_networks() -> None:
    demo = torch.load(demo_card_path().parent / "demo.pth", weights_only=True)
    volume = torch.load(volume_card_path().parent / "volume.pth", weights_only=True)
    DemoNet(num_classes=3).load_state_dict(demo, strict=True)
    VolumeDemoNet(num_classes=2).load_state_dict(volume, strict=True)
