"""service.explain.healthy.appearance: the shipped healthy-appearance model of the demo card on held-out
phantoms (a normal image comes back closer than a lesion does), torch against ONNX Runtime, the file's
checks, and the operator as the perturbation methods use it (mask 1 shows x, mask 0 shows h(x))."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dicom_io.pixels import prepare_frames
from service.explain import get_explainer
from service.explain.base import ExplainerError
from service.explain.healthy import (
    HealthyAppearance,
    HealthyAppearanceNet,
    HealthyVAE,
    configured_healthy,
    load_healthy_model,
    save_healthy_model,
)
from service.inference.card import ModelCard
from service.inference.deployed import DeployedModel
from service.models import demo_card_path
from service.node.pipeline import card_settings
from service.synthetic.phantoms import make_phantom
from tests.helpers import HELD_OUT_SEED

CARD = ModelCard.load(demo_card_path())


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def healthy() -> HealthyAppearance:
    return HealthyAppearance(CARD.auxiliary_path("healthy_appearance"))


def held_out(kind: str, count: int) -> tuple[torch.Tensor, np.ndarray]:
    """Held-out phantoms of ``kind`` (the evaluation seed, never trained on), normalised, and their lesion
    masks on the model grid."""
    inputs, masks = [], []
    for index in range(count):
        phantom = make_phantom(index, kind, seed=HELD_OUT_SEED, cols=(448, 512)[index % 2])
        frame = prepare_frames(phantom.dataset, CARD.input.spec())[0]
        inputs.append(frame.model_input)
        masks.append(frame.mapping.to_model_grid(phantom.lesion_mask.astype(np.float32)) > 0.5)
    return torch.from_numpy(CARD.input.normalise(np.stack(inputs))), np.stack(masks)


def test_normal_tissue_comes_back_lesions_do_not(healthy: HealthyAppearance) -> None:
    """Uzunova et al.'s premise on the shipped VAE: h(x) of a normal phantom is close to it, a lesion is
    replaced (its error inside the lesion many times the error of a normal image)."""
    normals, _ = held_out("normal", 4)
    normal_error = float(((healthy(normals) - normals) ** 2).mean())
    for kind in ("nodule", "effusion"):
        lesions, masks = held_out(kind, 4)
        squared = ((healthy(lesions) - lesions) ** 2)[:, 0].numpy()
        inside, outside = float(squared[masks].mean()), float(squared[~masks].mean())
        assert inside > 10 * normal_error, (kind, inside, normal_error)
        assert inside > 5 * outside, (kind, inside, outside)


def test_onnx_runtime_gives_the_torch_operator_and_batches_give_single_runs(healthy: HealthyAppearance) -> None:
    images, _ = held_out("nodule", 3)
    on_torch = healthy(images, "torch")
    torch.testing.assert_close(healthy(images, "onnx"), on_torch, rtol=0, atol=1e-4)
    singles = torch.cat([healthy(images[i : i + 1]) for i in range(3)])
    assert torch.equal(on_torch, singles)
    assert on_torch.dtype == images.dtype and on_torch.shape == images.shape


def test_another_input_grid_is_refused_with_the_sizes(healthy: HealthyAppearance) -> None:
    with pytest.raises(ExplainerError, match=r"takes 1 x 224 x 224 inputs .* got 1 x 32 x 32"):
        healthy(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ExplainerError, match=r"runtime must be 'torch' or 'onnx', got 'tpu'"):
        healthy(torch.zeros(1, 1, 224, 224), "tpu")  # type: ignore[arg-type]


def test_files_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ExplainerError, match="healthy-appearance file not found.*pacs-xai demo train-healthy"):
        HealthyAppearance(tmp_path / "missing.pt")
    other = tmp_path / "other.pt"
    torch.save({"format": "something else"}, other)
    with pytest.raises(ExplainerError, match="is not a healthy-appearance file"):
        load_healthy_model(other)
    # an export changed without its model: the sha256 recorded in the .pt catches it
    for name in ("healthy-appearance.pt", "healthy-appearance.onnx"):
        shutil.copy(CARD.folder / name, tmp_path / name)
    with (tmp_path / "healthy-appearance.onnx").open("ab") as handle:
        handle.write(b"\0")
    copied = HealthyAppearance(tmp_path / "healthy-appearance.pt")
    with pytest.raises(ExplainerError, match="the export changed without its model"):
        copied(torch.zeros(1, 1, 224, 224), "onnx")


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(3)
    operator = HealthyAppearanceNet(HealthyVAE(1, 64, 64, (4,) * 5, (4,) * 5, latent=6), 1.5).eval()
    path = save_healthy_model(tmp_path / "h.pt", operator, (0.5,), (0.25,), {"source": "test"})
    loaded, info = load_healthy_model(path)
    images = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), operator(images), rtol=0, atol=0)
    assert (info.rows, info.latent, info.detail_sigma, info.mean, info.onnx_file) == (64, 6, 1.5, (0.5,), None)
    assert info.metadata == {"source": "test"}


def test_perturbation_healthy_without_a_model_names_where_one_comes_from() -> None:
    with pytest.raises(ExplainerError, match=r"rise with perturbation 'healthy' needs .*auxiliary\.healthy_appearance"):
        get_explainer("rise", perturbation="healthy")
    assert configured_healthy("rise", "baseline", None) is None


class Recording(nn.Module):
    """The demo classifier, keeping a copy of every input it is given."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.inputs: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.inputs.append(images.detach().clone())
        return self.model(images)


@pytest.fixture()
def recording() -> Recording:
    deployed = DeployedModel.from_card_path(demo_card_path())
    try:
        return Recording(deployed.gradient_runner.torch_module)
    finally:
        deployed.close()


def test_mask_zero_shows_h_of_x(recording: Recording, healthy: HealthyAppearance) -> None:
    """Occlusion with one window over the whole image: the model sees exactly h(x) (and x, unoccluded)."""
    images, _ = held_out("nodule", 2)
    settings = {**card_settings(CARD, "occlusion"), "perturbation": "healthy", "window": 224, "stride": 224}
    # Whole passes: the recording keeps what the model is given, and an incremental pass gives its
    # layers boxes (and torch.fx's tracing would record symbolic inputs).
    get_explainer("occlusion", incremental=False, **settings).explain(recording, images, [1, 1])
    seen = torch.cat(recording.inputs)
    assert any(torch.equal(seen[i], images[0]) for i in range(len(seen)))
    assert any(torch.equal(seen[i], healthy(images)[0]) for i in range(len(seen)))


def test_healthy_perturbation_blends_x_and_h_of_x(recording: Recording, healthy: HealthyAppearance) -> None:
    """healthy_perturbation's inputs are x * m + h(x) * (1 - m): the first (mask of ones, no jitter) is x,
    every one lies between x and h(x) pixel by pixel, and some reach h(x) where the lesion is."""
    images, masks = held_out("nodule", 1)
    settings = {**card_settings(CARD, "healthy_perturbation"), "iterations": 40, "jitter": 0, "score": "logit"}
    saliency = get_explainer("healthy_perturbation", **settings).explain(recording, images, [1])
    replacement = healthy(images)
    torch.testing.assert_close(recording.inputs[0], images, rtol=0, atol=1e-6)
    low, high = torch.minimum(images, replacement), torch.maximum(images, replacement)
    for seen in recording.inputs:
        assert bool(((seen >= low - 1e-5) & (seen <= high + 1e-5)).all())
    assert float(saliency[0][torch.from_numpy(masks[0])].mean()) > float(saliency[0].mean())
