"""The explainers on volumes ``[B, C, D, H, W]``, against independent implementations and axioms.

- Grad-CAM and CAM against MONAI's 3D ``GradCAM`` and ``CAM`` (the reference the issue names), on
  a small 3D residual network and on MONAI's own 3D DenseNet; Grad-CAM and Grad-CAM++ against
  pytorch-grad-cam's 3D path.
- Occlusion against MONAI's ``OcclusionSensitivity`` at matched window, stride and fill: MONAI
  averages the occluded score over the windows covering a voxel, ours the score drop, so ours is
  the clean score minus MONAI's.
- Integrated gradients against Captum's (which is dimension-agnostic), completeness of IG,
  DeepLIFT and LRP in 3D.
- RISE and HiPe: a model whose score is the mean of a known box of voxels must put the map's
  mass in that box; RISE's 3D masks have the keep probability as their mean.

The shared contract (shapes, batch == singles, model left as found) runs in 3D in
``test_explainer_contract.py`` (its ``volume`` shape).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients as CaptumIG
from monai.networks.nets import DenseNet
from monai.visualize import CAM as MonaiCAM
from monai.visualize import GradCAM as MonaiGradCAM
from monai.visualize import OcclusionSensitivity
from torch import nn

from service.explain.base import ExplainerError
from service.explain.registry import get_explainer
from tests.helpers import grad_cam_module
from tests.unit.service.explain.explainer_models import VolumeNet, build, volumes

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TARGETS = [0, 2, 1]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def raw(maps: torch.Tensor) -> torch.Tensor:
    return maps


def monai_densenet() -> nn.Module:
    """MONAI's 3D DenseNet (DenseNet121's layout, two small blocks), seeded, in eval mode."""
    torch.manual_seed(0)
    model = DenseNet(spatial_dims=3, in_channels=1, out_channels=3, init_features=8, growth_rate=4, block_config=(2, 2))
    for module in model.modules():
        if isinstance(module, nn.BatchNorm3d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


# --- CAM family against MONAI ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("network", "layer"),
    [("volume_net", "conv2"), ("monai_densenet", "class_layers.relu"), ("monai_densenet", "features.denseblock2")],
)
def test_gradcam_3d_agrees_with_monai(network: str, layer: str) -> None:
    model = build(VolumeNet) if network == "volume_net" else monai_densenet()
    x = volumes(3, size=16)
    maps = get_explainer("gradcam", target_layer=layer).explain(model, x, TARGETS)
    assert maps.shape == (3, 16, 16, 16)
    # MONAI's default post-processing rescales each map to [1, 0] (inverted, for display); the
    # matched setting keeps its raw upsampled map.
    reference = MonaiGradCAM(nn_module=model, target_layers=layer, postprocessing=raw)
    compared = 0
    for i, target in enumerate(TARGETS):
        expected = reference(x[i : i + 1], class_idx=target)[0, 0]
        if float(expected.max()) == 0:  # no positive evidence: both rectified maps are zero
            assert float(maps[i].abs().max()) <= 1e-6
            continue
        assert pearson(maps[i], expected) >= 0.99, (network, i)
        torch.testing.assert_close(maps[i], expected, rtol=1e-4, atol=1e-4 * float(expected.max()))
        compared += 1
    assert compared >= 2, "too few maps with evidence to compare"


class FullResolutionNet(nn.Module):
    """3D convolutions without striding: the CAM layer has the input's size, so no upsampling
    (trilinear here, a cubic spline in pytorch-grad-cam) differs between implementations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv3d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(h.mean(dim=(2, 3, 4)))


@pytest.mark.parametrize(("ours", "theirs"), [("gradcam", "GradCAM"), ("gradcam_pp", "GradCAMPlusPlus")])
def test_gradcam_3d_agrees_with_pytorch_grad_cam(ours: str, theirs: str) -> None:
    """Grad-CAM++ follows pytorch-grad-cam's closed form (MONAI's ``GradCAMpp`` sums ``A g^3`` over
    space instead, a different estimator), checked here on volumes as it is on images."""
    model = build(FullResolutionNet)
    x = volumes(3, size=12)
    maps = get_explainer(ours, target_layer="conv2").explain(model, x, TARGETS)
    module = grad_cam_module()
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = getattr(module, theirs)(model, [model.conv2])
    try:
        expected = torch.from_numpy(cam(x, [ClassifierOutputTarget(t) for t in TARGETS]))
    finally:
        cam.activations_and_grads.release()
    for i in range(3):
        assert pearson(maps[i], expected[i]) >= 0.999, (ours, i)


def test_cam_3d_agrees_with_monai() -> None:
    model = build(VolumeNet)
    x = volumes(3, size=16)
    # MONAI's CAM applies the head to every feature cell of the layer the head pools.
    maps = get_explainer("cam", target_layer="pool", relu=False).explain(model, x, TARGETS)  # MONAI: no ReLU
    reference = MonaiCAM(nn_module=model, target_layers="pool", fc_layers="fc", postprocessing=raw)
    for i, target in enumerate(TARGETS):
        expected = reference(x[i : i + 1], class_idx=torch.tensor([target]))[0, 0]
        assert pearson(maps[i], expected) >= 0.99


def test_gradcam_3d_default_layer_is_last_conv3d() -> None:
    model = build(VolumeNet)
    x = volumes(1, size=16)
    default = get_explainer("gradcam").explain(model, x, [1])
    named = get_explainer("gradcam", target_layer="conv2").explain(model, x, [1])
    torch.testing.assert_close(default, named)


def test_cam_3d_layer_with_2d_output_is_a_clear_error() -> None:
    with pytest.raises(ExplainerError, match=r"\[B, C, d, h, w\]"):
        get_explainer("gradcam", target_layer="fc").explain(build(VolumeNet), volumes(1, size=16), [0])


# --- occlusion against MONAI -----------------------------------------------------------------------


@pytest.mark.parametrize("network", ["volume_net", "monai_densenet"])
def test_occlusion_3d_agrees_with_monai(network: str) -> None:
    model = build(VolumeNet) if network == "volume_net" else monai_densenet()
    x = volumes(2, size=16)
    window, stride, fill = 8, 4, -0.5  # (16 - 8) / 4 is whole: no window crosses the border
    maps = get_explainer("occlusion", window=window, stride=stride, baseline=fill).explain(model, x, [2, 1])
    monai = OcclusionSensitivity(
        model, mask_size=window, n_batch=8, verbose=False, mode=fill, overlap=1 - stride / window, activate=False
    )
    for i, target in enumerate([2, 1]):
        occluded, _ = monai(x[i : i + 1])
        with torch.no_grad():
            clean = model(x[i : i + 1])[0, target]
        expected = clean - occluded[0, target]  # MONAI's map: [1, classes, D, H, W]
        assert pearson(maps[i], expected) >= 0.99
        torch.testing.assert_close(maps[i], expected.to(maps.dtype), rtol=0, atol=1e-4 * float(expected.abs().max()))


# --- gradient and propagation methods --------------------------------------------------------------


def test_integrated_gradients_3d_matches_captum() -> None:
    model = build(VolumeNet)
    x = volumes(2, size=16)
    ours = get_explainer("integrated_gradients", steps=16, method="gausslegendre").explain(model, x, [0, 2])
    captum = CaptumIG(model).attribute(x, target=[0, 2], n_steps=16, method="gausslegendre").sum(dim=1)
    torch.testing.assert_close(ours, captum.float(), rtol=0, atol=1e-4 * float(captum.abs().max()))


@pytest.mark.parametrize("method", ["integrated_gradients", "deeplift"])
def test_completeness_in_3d(method: str) -> None:
    model = build(VolumeNet)
    x = volumes(3, size=16)
    maps, delta = get_explainer(method).explain_with_delta(model, x, TARGETS)
    assert maps.shape == (3, 16, 16, 16)
    with torch.no_grad():
        scale = float((model(x) - model(torch.zeros_like(x))).abs().max())
    assert float(delta.max()) <= 1e-3 * scale


def test_lrp_conserves_relevance_in_3d_without_biases() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.MaxPool3d(2),
        nn.Conv3d(4, 4, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(4, 3, bias=False),
    ).eval()
    x = volumes(2, size=16)
    maps, delta = get_explainer("lrp").explain_with_delta(model, x, [0, 1])
    with torch.no_grad():
        logits = model(x)
    assert float(delta.max()) <= 1e-4 * float(logits.abs().max())
    assert maps.shape == (2, 16, 16, 16)


# --- perturbation methods ----------------------------------------------------------------------------


class BoxModel(nn.Module):
    """Class 0's logit is the mean of the voxels in a fixed box, class 1's minus that."""

    def __init__(self, box: tuple[slice, slice, slice]) -> None:
        super().__init__()
        self.box = box

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inside = x[(slice(None), 0, *self.box)].flatten(1).mean(dim=1)
        return torch.stack([inside, -inside], dim=1)


BOX = (slice(2, 8), slice(8, 14), slice(4, 10))


@pytest.mark.parametrize(
    ("method", "settings"),
    [
        ("occlusion", {"window": 4, "stride": 2}),
        ("rise", {"masks": 400, "cell_size": 4, "score": "logit", "centred": True, "seed": 1}),
        ("hipe", {"initial_grid": 2, "score": "logit", "min_window": 4}),
    ],
)
def test_perturbation_maps_find_the_box(method: str, settings: dict[str, object]) -> None:
    x = torch.ones(1, 1, 16, 16, 16)  # every voxel counts the same: only the box matters
    maps = get_explainer(method, **settings).explain(BoxModel(BOX), x, [0])[0]
    inside = torch.zeros(16, 16, 16, dtype=torch.bool)
    inside[BOX] = True
    # HiPe's windows are two cells wide, so some evidence spills next to the box.
    assert float(maps[inside].mean()) > 2 * max(float(maps[~inside].mean()), 1e-9)
    peak = np.unravel_index(int(maps.argmax()), maps.shape)
    assert bool(inside[peak]), peak


def test_rise_volume_masks_keep_the_probability() -> None:
    rise = get_explainer("rise", masks=200, cell_size=4, probability=0.3, seed=2)
    masks = rise.masks(12, 16, 20)
    assert masks.shape == (200, 12, 16, 20)
    assert float(masks.min()) >= 0 and float(masks.max()) <= 1
    assert abs(float(masks.mean()) - 0.3) < 0.03


def test_image_only_methods_refuse_volumes() -> None:
    x = volumes(1, size=16)
    for method in ("lime", "kernel_shap", "meaningful_perturbation", "extremal_perturbation"):
        with pytest.raises(ExplainerError, match=f"{method} works on images"):
            get_explainer(method).explain(build(VolumeNet), x, [0])
