"""The traced graphs a model server runs: the make_fx layer-gradient graph against eager autograd,
the exported programs against the eager network, and Grad-CAM from the served graph against the
eager explainer on the contract models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from service.explain.base import TargetOutOfRange
from service.explain.methods.cam import GradCAM, GradCAMPlusPlus
from service.inference.card import ModelCard, ModelCardError
from service.inference.graphs import CAM_FILE, CLASSIFIER_FILE, export_graphs, model_names, trace_layer_gradients
from tests.nets import write_card
from tests.unit.service.explain.explainer_models import DenseNetLike, ResidualNet, build, images


class SmallConvNet(nn.Module):
    """Convolutions, an in-place ReLU after the target layer, GAP and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1))
        self.after = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(8, 5, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.after(self.features(x)).mean(dim=(2, 3)))


def eager_autograd(model: SmallConvNet, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent reference: split the network at the layer and differentiate with plain autograd."""
    activations = model.features(x).detach().requires_grad_(True)
    logits = model.head(model.after(activations.clone()).mean(dim=(2, 3)))
    (gradients,) = torch.autograd.grad(logits.gather(1, targets.view(-1, 1)).sum(), activations)
    return activations.detach(), gradients


def test_traced_layer_gradients_equal_eager_autograd_for_any_batch_size() -> None:
    torch.manual_seed(0)
    model = SmallConvNet().eval()
    graph = trace_layer_gradients(model, "features", torch.randn(2, 1, 16, 16))
    # The traced graph holds no autograd: only ATen operations, the backward ones included.
    targets_of = [node.target for node in graph.graph.nodes if node.op == "call_function"]
    assert torch.ops.aten.convolution_backward.default in targets_of
    for batch in (1, 3, 5):
        x = torch.randn(batch, 1, 16, 16)
        targets = torch.arange(batch) % 3
        with torch.no_grad():
            activations, gradients = graph(x, targets.view(-1, 1))
        want_activations, want_gradients = eager_autograd(model, x, targets)
        assert gradients.abs().max() > 1e-3  # a real signal, not zeros on both sides
        torch.testing.assert_close(activations, want_activations, rtol=0, atol=1e-6)
        torch.testing.assert_close(gradients, want_gradients, rtol=0, atol=1e-6)


def test_a_layer_run_twice_is_refused_with_its_count() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)
            self.head = nn.Linear(1, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.conv(self.conv(x)).mean(dim=(2, 3)))

    with pytest.raises(ModelCardError, match="ran 2 times"):
        trace_layer_gradients(Twice().eval(), "conv", torch.randn(2, 1, 8, 8))


class ExportedLayerGradients:
    """The served graph run in this process (what the Triton server runs), as the explainers see it."""

    def __init__(self, folder: Path, layer: str, classes: int) -> None:
        self.program = torch.export.load(str(folder / CAM_FILE)).module()
        self.layer = layer
        self.classes = classes

    def __call__(self, images: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            activations, gradients = self.program(torch.from_numpy(images), torch.from_numpy(targets).view(-1, 1))
        return activations.numpy(), gradients.numpy()


class ServedOnly:
    """A model with only the served layer gradients: no torch module to fall back on."""

    def __init__(self, layer_gradients: ExportedLayerGradients) -> None:
        self.layer_gradients = layer_gradients


def densenet_like(num_classes: int, in_channels: int) -> nn.Module:
    """The architecture named by the cards below (the card's class count and channels are the net's)."""
    return DenseNetLike()


def residual_net(num_classes: int, in_channels: int) -> nn.Module:
    return ResidualNet()


CONTRACT = {
    "densenet_inplace": (DenseNetLike, densenet_like, "layers.2"),
    "residual": (ResidualNet, residual_net, "conv2"),
}


@pytest.mark.parametrize("name", CONTRACT)
def test_cam_from_the_exported_graph_equals_the_eager_explainer(tmp_path: Path, name: str) -> None:
    cls, factory, layer = CONTRACT[name]
    network = build(cls)
    card_path = write_card(
        tmp_path / "card",
        network,
        f"{__name__}:{factory.__name__}",
        output={"activation": "softmax", "classes": ["a", "b", "c"]},
        target_layer=layer,
    )
    card = ModelCard.load(card_path)
    spec = export_graphs(card, tmp_path / "graphs", max_batch=8)
    assert spec.cam_model == model_names(card)[1] and (tmp_path / "graphs" / CLASSIFIER_FILE).is_file()
    served_model = ServedOnly(ExportedLayerGradients(tmp_path / "graphs", layer, 3))
    x, targets = images(5), [0, 1, 2, 1, 0]
    for method in (GradCAM, GradCAMPlusPlus):
        explainer = method(target_layer=layer)
        served = explainer.explain(served_model, x, targets)
        eager = explainer.explain(network, x, targets)
        assert eager.abs().max() > 0
        torch.testing.assert_close(served, eager, rtol=1e-4, atol=1e-5 * float(eager.abs().max()))
        pearson = np.corrcoef(served.flatten().numpy(), eager.flatten().numpy())[0, 1]
        assert pearson >= 0.999, method.name
    with pytest.raises(TargetOutOfRange, match=r"targets \[0, 3\]"):
        GradCAM(target_layer=layer).explain(served_model, x[:2], [0, 3])


def test_exported_classifier_equals_the_eager_network(tmp_path: Path) -> None:
    network = build(DenseNetLike)
    card = ModelCard.load(
        write_card(
            tmp_path / "card",
            network,
            f"{__name__}:densenet_like",
            output={"activation": "softmax", "classes": ["a", "b", "c"]},
            target_layer=None,
        )
    )
    spec = export_graphs(card, tmp_path / "graphs")
    assert spec.cam_model is None and not (tmp_path / "graphs" / CAM_FILE).exists()
    program = torch.export.load(str(tmp_path / "graphs" / CLASSIFIER_FILE)).module()
    x = images(7)
    with torch.no_grad():
        torch.testing.assert_close(program(x), network(x), rtol=1e-5, atol=1e-5)


def test_the_exported_graphs_move_whole_to_another_device(tmp_path: Path) -> None:
    """The server moves the programs to its GPU with ``.to(device)``: no constant may stay behind on
    the CPU where they were traced. The meta device stands in for CUDA here (same dispatch check)."""
    network = build(DenseNetLike)
    card = ModelCard.load(
        write_card(
            tmp_path / "card",
            network,
            f"{__name__}:densenet_like",
            output={"activation": "softmax", "classes": ["a", "b", "c"]},
            target_layer="layers.2",
        )
    )
    export_graphs(card, tmp_path / "graphs")
    x = torch.zeros(3, 1, 32, 32, device="meta")
    classifier = torch.export.load(str(tmp_path / "graphs" / CLASSIFIER_FILE)).module().to("meta")
    assert classifier(x).device.type == "meta"
    cam = torch.export.load(str(tmp_path / "graphs" / CAM_FILE)).module().to("meta")
    activations, gradients = cam(x, torch.zeros(3, 1, dtype=torch.int64, device="meta"))
    assert activations.device.type == gradients.device.type == "meta"
    assert activations.shape == gradients.shape == (3, 4, 32, 32)
