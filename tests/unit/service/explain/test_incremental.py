"""Incremental inference (service.explain.incremental) against the network's own forward pass on
the changed inputs, and occlusion with it against occlusion with whole passes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from service.explain.incremental import IncrementalForward
from service.explain.registry import get_explainer
from service.models.demo.network import DemoNet
from service.models.volume_demo.network import VolumeDemoNet

monai_nets = pytest.importorskip("monai.networks.nets")


class _Residual(nn.Module):
    """Residual addition, dilation, padded max and average pooling, an in-place activation layer
    and an in-place function, a scalar product and a norm over space (which the engine must run
    whole)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.max_pool = nn.MaxPool2d(3, 2, 1)
        self.avg_pool = nn.AvgPool2d(3, 2, 1)
        self.strided = nn.Conv2d(8, 8, 4, stride=3, padding=1, bias=False)
        self.group_norm = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm(self.conv1(x)))
        y = y + 0.5 * self.conv2(y)
        y = self.strided(self.avg_pool(self.max_pool(y)))
        z = nn.functional.relu(y, inplace=True)
        return self.head(self.group_norm(z).mean((2, 3)))


def _randomised(model: nn.Module) -> nn.Module:
    """Eval mode with batch-norm statistics that are not the identity."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model.eval()


def _changed_inputs(
    images: torch.Tensor, image: torch.Tensor, corner: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    changed = images[image].clone()
    for n, start in enumerate(corner.tolist()):
        box = tuple(slice(first, first + size) for first, size in zip(start, values.shape[2:]))
        changed[(n, slice(None), *box)] = values[n]
    return changed


NETWORKS = [
    pytest.param(lambda: _Residual(), (2, 40, 36), 7, id="residual-2d"),
    pytest.param(lambda: DemoNet(), (1, 224, 224), 16, id="demo-2d"),
    pytest.param(lambda: VolumeDemoNet(num_classes=2), (1, 48, 48, 48), 8, id="demo-volume"),
    pytest.param(
        lambda: monai_nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=3), (1, 64, 64), 16, id="densenet-2d"
    ),
    pytest.param(
        lambda: monai_nets.DenseNet121(
            spatial_dims=3, in_channels=1, out_channels=2, init_features=8, growth_rate=4, block_config=(2, 2, 2)
        ),
        (1, 32, 32, 32),
        8,
        id="densenet-3d",
    ),
]


@pytest.mark.parametrize(("build", "shape", "box"), NETWORKS)
def test_boxed_pass_equals_the_forward_pass_of_the_changed_inputs(build, shape, box) -> None:
    torch.manual_seed(0)
    model = _randomised(build())
    engine = IncrementalForward.trace(model)
    assert engine is not None
    images = torch.randn(2, *shape)
    grid = torch.tensor(shape[1:])
    # Boxes at both corners, in the middle and at random places, of both images.
    corner = torch.stack(
        [torch.zeros_like(grid), grid - box, (grid - box) // 2, *(torch.rand(5, len(grid)) * (grid - box + 1)).long()]
    )
    image = torch.tensor([0, 1, 1, 0, 1, 0, 1, 0])
    values = torch.randn(len(corner), shape[0], *([box] * len(grid)))
    with torch.no_grad():
        clean = engine.prepare(images)
        boxed = engine.forward(image, corner, values)
        expected = model(_changed_inputs(images, image, corner, values))
        torch.testing.assert_close(clean, model(images), rtol=1e-5, atol=1e-6)
    scale = expected.abs().max()
    torch.testing.assert_close(boxed, expected, rtol=1e-4, atol=1e-5 * float(scale))
    # The boxes did change the outputs: the test would see an engine that ignored them.
    assert not torch.allclose(boxed, clean[image], atol=1e-6 * float(scale))


def test_keeps_the_clean_values_an_in_place_layer_would_overwrite() -> None:
    model = _randomised(_Residual())
    engine = IncrementalForward.trace(model)
    assert engine is not None
    images = torch.randn(1, 2, 40, 36)
    with torch.no_grad():
        engine.prepare(images)
        first = engine.forward(torch.tensor([0]), torch.tensor([[3, 4]]), torch.zeros(1, 2, 6, 6))
        again = engine.forward(torch.tensor([0]), torch.tensor([[3, 4]]), torch.zeros(1, 2, 6, 6))
    torch.testing.assert_close(first, again, rtol=0, atol=0)


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.mean() > 0:  # control flow on values: torch.fx cannot trace it
            y = -y
        return y.mean((2, 3))


class _ReadAfterWrite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = nn.functional.relu(y, inplace=True) + y.neg()  # y is read again after the write
        return z.mean((2, 3))


def test_untraceable_networks_are_declined() -> None:
    assert IncrementalForward.trace(_DataDependent()) is None
    assert IncrementalForward.trace(_ReadAfterWrite()) is None
    assert IncrementalForward.trace(torch.jit.script(nn.Sequential(nn.Conv2d(1, 2, 3)))) is None


def test_forward_before_prepare_is_an_error() -> None:
    engine = IncrementalForward.trace(DemoNet().eval())
    assert engine is not None
    with pytest.raises(RuntimeError, match="prepare"):
        engine.forward(torch.tensor([0]), torch.tensor([[0, 0]]), torch.zeros(1, 1, 4, 4))


@pytest.mark.parametrize(
    ("build", "shape", "settings"),
    [
        pytest.param(lambda: DemoNet(), (1, 224, 224), {"window": 32, "stride": 24}, id="2d-cropped-border"),
        pytest.param(
            lambda: DemoNet(), (1, 224, 224), {"window": 48, "stride": 32, "perturbation": "blur"}, id="2d-blur"
        ),
        pytest.param(
            lambda: VolumeDemoNet(num_classes=2), (1, 48, 48, 48), {"window": 16, "stride": 12}, id="3d-cropped"
        ),
    ],
)
def test_occlusion_incremental_equals_whole_passes(build, shape, settings) -> None:
    torch.manual_seed(0)
    model = _randomised(build())
    batch = torch.randn(2, *shape)
    targets = [0, 1]
    incremental = get_explainer("occlusion", **settings).explain(model, batch, targets)
    whole = get_explainer("occlusion", incremental=False, **settings).explain(model, batch, targets)
    assert float(whole.abs().max()) > 0
    # Score drops are differences of logits: their rounding is that of the logits.
    with torch.no_grad():
        logit_scale = float(model(batch).abs().max())
    torch.testing.assert_close(incremental, whole, rtol=1e-4, atol=1e-5 * logit_scale)


def test_occlusion_asks_for_a_torch_module_only_one_it_can_run_incrementally() -> None:
    """What the node uses to hand occlusion the torch module instead of the ONNX pool."""
    check = get_explainer("occlusion").module_preference()
    assert check is not None
    assert check(DemoNet().eval()) is True
    assert check(_DataDependent()) is False and check(torch.jit.script(DemoNet().eval())) is False
    assert get_explainer("occlusion", incremental=False).module_preference() is None
    assert get_explainer("rise").module_preference() is None  # any runner serves it as well
