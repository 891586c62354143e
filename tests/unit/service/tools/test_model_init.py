"""``model init``: cards written from an ONNX file, a torch state dict, a TorchScript file, a MONAI
bundle and a TorchXRayVision class load as the node loads them, give the source network's own logits
(checked against the network built independently: the module itself, MONAI's ConfigParser,
TorchXRayVision's class), hash every file, find the CAM layer, and export ONNX that ONNX Runtime runs
to within float32 rounding of torch. Wrong inputs are one clear error naming the value."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from service.inference.backends import load_runner
from service.inference.card import ModelCard, sha256_of
from service.tools.model_init import (
    CardSettings,
    ModelInitError,
    init_from_monai_bundle,
    init_from_onnx,
    init_from_torch,
    init_from_torchxrayvision,
)
from tests.nets import FixedSizeNet, TinyMultiLabel, seeded

CLASSES = ("a", "b", "c", "d")
SETTINGS = CardSettings(
    name="tiny", classes=CLASSES, activation="sigmoid", rows=32, columns=32, mean=(0.5,), std=(0.25,)
)


def _batch(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _logits(network: torch.nn.Module, batch: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return network(torch.from_numpy(batch)).numpy()


def _every_file_hashed(card: ModelCard) -> None:
    for runtime, entry in card.weights.items():
        assert sha256_of(card.weights_path(runtime)) == entry.sha256


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A tiny multi-label network's state dict through init --export-onnx (exported once for the module)."""
    folder = tmp_path_factory.mktemp("exported")
    network = seeded(TinyMultiLabel(4))
    checkpoint = folder / "weights.pth"
    torch.save(network.state_dict(), checkpoint)
    report = init_from_torch("tests.nets:TinyMultiLabel", checkpoint, folder / "card", SETTINGS, export_onnx=True)
    return network, report.card_path, report


def test_state_dict_card_with_onnx_export(exported) -> None:
    network, card_path, report = exported
    card = ModelCard.load(card_path)
    _every_file_hashed(card)
    assert set(card.weights) == {"torch", "onnx"}
    assert card.weights["torch"].architecture == "tests.nets:TinyMultiLabel"
    assert card.target_layer == "features"  # the last spatial block (8x8), not the pooled head
    assert card.output.activation == "sigmoid" and card.output.classes == CLASSES
    assert card.output.thresholds == dict.fromkeys(CLASSES, 0.5)
    assert card.explain.findings == "all_positive" and card.defaults.methods == ("gradcam",)
    assert (card.input.rows, card.input.columns, card.input.channels) == (32, 32, 1)
    assert card.input.mean == (0.5,) and card.input.std == (0.25,)
    # the export check ran on both inputs and is within float32 rounding
    assert set(report.export_differences) == {"random", "phantom"}
    assert max(report.export_differences.values()) < 1e-4
    batch = _batch((3, 1, 32, 32))
    expected = _logits(network, batch)
    for runtime in ("torch", "onnx"):
        np.testing.assert_allclose(load_runner(card, runtime, device="cpu").forward(batch), expected, atol=1e-4)


def test_onnx_file_card_reads_size_and_classes_from_the_graph(exported, tmp_path: Path) -> None:
    network, card_path, _ = exported
    onnx_file = card_path.parent / "model.onnx"
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [1, 32, 32]
    report = init_from_onnx(onnx_file, tmp_path / "onnx", CardSettings(name="from-onnx"))
    card = report.card
    assert set(card.weights) == {"onnx"} and card.target_layer is None
    assert card.output.classes == ("class_0", "class_1", "class_2", "class_3")  # named by output index
    assert (card.input.rows, card.input.columns) == (32, 32)
    assert card.defaults.methods == ("occlusion",)  # forward-only weights
    _every_file_hashed(card)
    batch = _batch((2, 1, 32, 32))
    np.testing.assert_allclose(load_runner(card, "onnx").forward(batch), _logits(network, batch), atol=1e-4)


def test_torchscript_file_card(tmp_path: Path) -> None:
    network = seeded(TinyMultiLabel(4))
    scripted = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(network), str(scripted))
    report = init_from_torch(None, scripted, tmp_path / "card", SETTINGS)
    card = report.card
    assert set(card.weights) == {"torchscript"} and card.target_layer is None
    assert any("forward hooks" in note for note in report.notes)
    batch = _batch((2, 1, 32, 32))
    np.testing.assert_allclose(load_runner(card, "torchscript").forward(batch), _logits(network, batch), atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("monai") is None, reason="monai not installed")
def test_monai_bundle_card_matches_the_network_monai_builds(tmp_path: Path) -> None:
    from monai.bundle import ConfigParser

    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    config = {
        "classes": 3,
        "network_def": {
            "_target_": "DenseNet",
            "spatial_dims": 2,
            "in_channels": 1,
            "out_channels": "@classes",
            "init_features": 8,
            "growth_rate": 4,
            "block_config": [2, 2],
        },
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "Resized", "keys": "image", "spatial_size": [48, 48]},
                {"_target_": "ScaleIntensityd", "keys": "image", "minv": -1.0, "maxv": 1.0},
            ],
        },
    }
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    metadata = {
        "network_data_format": {
            "inputs": {"image": {"num_channels": 1, "spatial_shape": ["*", "*"]}},
            "outputs": {"pred": {"num_channels": 3, "channel_def": {"0": "normal", "1": "nodule", "2": "effusion"}}},
        }
    }
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata))
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    reference = seeded(parser.get_parsed_content("network_def"))
    torch.save(reference.state_dict(), bundle / "models" / "model.pt")

    report = init_from_monai_bundle(bundle, tmp_path / "card", CardSettings(name="bundle"))
    card = report.card
    assert card.output.classes == ("normal", "nodule", "effusion")
    assert card.weights["torch"].architecture == "monai.networks.nets.densenet:DenseNet"
    assert card.weights["torch"].arguments["out_channels"] == 3  # the "@classes" reference resolved
    assert (card.input.rows, card.input.columns) == (48, 48)  # from Resized
    low, high = card.input.value_range()
    assert (low, high) == pytest.approx((-1.0, 1.0))  # ScaleIntensityd(minv=-1, maxv=1) as (x - mean) / std
    assert card.target_layer is not None
    batch = _batch((2, 1, 48, 48))
    np.testing.assert_allclose(load_runner(card, "torch").forward(batch), _logits(reference, batch), atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("torchxrayvision") is None, reason="torchxrayvision not installed")
def test_torchxrayvision_card_keeps_its_input_scaling_pathologies_and_operating_points(tmp_path: Path) -> None:
    from service.inference.architecture import import_architecture

    xrv = import_architecture("torchxrayvision")
    reference = xrv.models.DenseNet(weights=None).eval()
    state = reference.state_dict()
    operating = torch.linspace(0.1, 0.9, 18)
    state["op_threshs"] = operating  # as a pretrained checkpoint carries them
    checkpoint = tmp_path / "xrv.pth"
    torch.save(state, checkpoint)
    report = init_from_torchxrayvision("DenseNet", tmp_path / "card", CardSettings(), checkpoint=checkpoint)
    card = report.card
    assert card.output.classes == tuple(xrv.datasets.default_pathologies)
    assert card.output.activation == "sigmoid" and card.explain.findings == "all_positive"
    assert [card.output.threshold(name) for name in card.output.classes] == pytest.approx(operating.tolist())
    assert (card.input.rows, card.input.columns, card.input.channels) == (224, 224, 1)
    assert card.input.value_range() == pytest.approx((-1024.0, 1024.0))  # [0, 1] pixels -> xrv's range
    assert card.target_layer == "features"
    batch = _batch((1, 1, 224, 224)) * 500
    np.testing.assert_allclose(load_runner(card, "torch").forward(batch), _logits(reference, batch), atol=1e-3)


def test_class_count_that_does_not_match_the_outputs(tmp_path: Path) -> None:
    network = seeded(TinyMultiLabel(4))
    scripted = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(network), str(scripted))
    with pytest.raises(ModelInitError, match=r"3 class names \['a', 'b', 'c'\] for a network with 4 outputs"):
        init_from_torch(None, scripted, tmp_path / "card", CardSettings(classes=("a", "b", "c"), rows=32, columns=32))
    assert not (tmp_path / "card" / "model.yaml").exists()


def test_input_size_the_network_refuses(tmp_path: Path) -> None:
    checkpoint = tmp_path / "fixed.pth"
    torch.save(seeded(FixedSizeNet(3)).state_dict(), checkpoint)
    settings = CardSettings(classes=("a", "b", "c"), rows=20, columns=20)
    with pytest.raises(ModelInitError, match=r"refuses an input of shape \[1, 1, 20, 20\] \(--size 20x20"):
        init_from_torch("tests.nets:FixedSizeNet", checkpoint, tmp_path / "card", settings)


def test_state_dict_of_another_network_and_missing_files(tmp_path: Path) -> None:
    checkpoint = tmp_path / "fixed.pth"
    torch.save(seeded(FixedSizeNet(3)).state_dict(), checkpoint)
    with pytest.raises(ModelInitError, match=r"does not fit TinyMultiLabel"):
        init_from_torch("tests.nets:TinyMultiLabel", checkpoint, tmp_path / "card", SETTINGS)
    with pytest.raises(ModelInitError, match=r"checkpoint not found: .*absent.pth"):
        init_from_torch("tests.nets:TinyMultiLabel", tmp_path / "absent.pth", tmp_path / "card", SETTINGS)
    with pytest.raises(ModelInitError, match=r"input size is unknown"):
        init_from_torch("tests.nets:TinyMultiLabel", checkpoint, tmp_path / "card", CardSettings(classes=CLASSES))
