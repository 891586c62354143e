"""Fixtures of the trust-metric tests: Quantus on NumPy 2.4, a small CNN, images with structure, and
the demo model on held-out phantoms."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import pytest
import torch
from torch import nn

from tests.unit.service.explain.explainer_models import build

#: Side of the small test images, pixels.
SIZE = 32


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for these tests, restored afterwards. Their models are small and gain nothing
    from more; with two threads on a shared 2-core machine whose other core is busy, torch's threads
    wait on each other: the deletion tests took 18 s instead of 0.15 s while another test run held a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def quantus(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Quantus 0.6.0, which calls ``np.trapz`` (removed in NumPy 2.4): aliased here, for the test only."""
    monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)
    try:
        import quantus
    except ImportError as exc:
        pytest.fail(f"Quantus is not installed ({exc}): pip install --no-deps quantus==0.6.0 (see the Makefile)")
    return quantus


def conv_block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class SmallNet(nn.Module):
    """The demo network's shape at 32 x 32: named conv-bn-ReLU blocks, GAP, a linear head."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                stem=conv_block(1, 8, stride=2),
                block1=conv_block(8, 8),
                pool=nn.MaxPool2d(2),
                block2=conv_block(8, 16),
            )
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def small_net(classes: int = 3, seed: int = 0) -> SmallNet:
    """A seeded :class:`SmallNet` in eval mode with non-trivial batch-norm statistics (the explainer
    tests' :func:`build`) and a stronger head."""
    model = build(SmallNet, classes, seed=seed)
    with torch.no_grad():
        nn.init.normal_(model.classifier.weight, std=2.0)
    return model


def blob_images(count: int = 4, seed: int = 1, size: int = SIZE) -> torch.Tensor:
    """Noise plus three bright or dark Gaussian blobs per image ``[count, 1, size, size]``."""
    generator = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size * 1.0), torch.arange(size * 1.0), indexing="ij")
    batch = 0.3 * torch.randn(count, 1, size, size, generator=generator)
    for image in batch:
        for _ in range(3):
            cy, cx = (torch.rand(2, generator=generator) * (size - 8) + 4).tolist()
            sign = 1.0 if torch.rand(1, generator=generator).item() > 0.5 else -1.0
            image[0] += sign * 2.0 * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 18.0)
    return batch


class RegionModel(nn.Module):
    """Class 0's logit is 1.5 x the mean of a 4 x 4 region (rows and columns 12..15), class 1's its negative."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        evidence = 1.5 * x[:, 0, 12:16, 12:16].mean(dim=(1, 2))
        return torch.stack([evidence, -evidence, torch.zeros_like(evidence)], dim=1)


def region_images(count: int = 2) -> torch.Tensor:
    """Faint noise and a bright region where :class:`RegionModel` looks (small enough for the blur to wipe)."""
    images = 0.1 * torch.randn(count, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    images[:, 0, 12:16, 12:16] += 3.0
    return images


@dataclass(frozen=True)
class DemoCase:
    """The demo model on held-out phantoms: its torch module, normalised inputs, label targets."""

    module: nn.Module
    batch: torch.Tensor
    targets: list[int]
    target_layer: str


@pytest.fixture(scope="module")
def demo_case() -> DemoCase:
    """12 held-out phantoms (6 nodules, 6 effusions, seed 424242) through the demo card's pixel path."""
    from dicom_io.pixels import prepare_frames
    from service.inference.deployed import DeployedModel
    from service.models import demo_card_path
    from service.synthetic.phantoms import make_phantom
    from tests.helpers import HELD_OUT_SEED

    model = DeployedModel.from_card_path(demo_card_path())
    try:
        card = model.card
        phantoms = [make_phantom(i, label, seed=HELD_OUT_SEED) for i in range(6) for label in ("nodule", "effusion")]
        frames = [prepare_frames(p.dataset, card.input.spec())[0] for p in phantoms]
        batch = torch.from_numpy(model.normalise(np.stack([frame.model_input for frame in frames])))
        targets = [card.output.classes.index(p.label) for p in phantoms]
        module = model.model_for(needs_gradients=True)
        assert isinstance(module, nn.Module)
        return DemoCase(module, batch, targets, card.target_layer)
    finally:
        model.close()
