"""Loading a card's weights: a wrong card is one clear error naming the value (the output size
against the class list, an input size the network refuses, a target layer that does not exist), and
a card's architecture arguments build the network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from service.inference.backends import load_runner
from service.inference.card import ModelCard, ModelCardError, sha256_of
from tests.nets import FixedSizeNet, TinyMultiLabel, seeded, write_card


def _card(folder: Path, network: torch.nn.Module, architecture: str, **changes: object) -> Path:
    return write_card(folder, network, architecture, **changes)


def _load(path: Path) -> None:
    card = ModelCard.load(path)
    load_runner(card, "torch", device="cpu")


def test_a_good_card_loads_and_gives_the_networks_logits(tmp_path: Path) -> None:
    network = seeded(TinyMultiLabel(4))
    card = ModelCard.load(_card(tmp_path, network, "tests.nets:TinyMultiLabel"))
    runner = load_runner(card, "torch", device="cpu")
    batch = np.random.default_rng(0).normal(size=(2, 1, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = network(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(runner.forward(batch), expected, rtol=1e-5, atol=1e-6)


def test_class_count_against_output_size(tmp_path: Path) -> None:
    path = _card(tmp_path, seeded(TinyMultiLabel(4)), "tests.nets:TinyMultiLabel", output={"classes": ["a", "b"]})
    with pytest.raises(ModelCardError) as error:
        _load(path)
    # built with num_classes=2, the 4-class weights do not fit: the error names the file
    assert "model.pth" in str(error.value) and "classifier" in str(error.value)


def test_output_size_named_when_arguments_fix_the_network(tmp_path: Path) -> None:
    path = _card(
        tmp_path,
        seeded(TinyMultiLabel(4)),
        "tests.nets:TinyMultiLabel",
        weights=None,
        output={"classes": ["a", "b", "c"]},
    )
    raw = yaml.safe_load(path.read_text())
    raw["weights"] = {
        "torch": {
            "file": "model.pth",
            "sha256": sha256_of(tmp_path / "model.pth"),
            "architecture": "tests.nets:TinyMultiLabel",
            "arguments": {"num_classes": 4, "in_channels": 1},
        }
    }
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ModelCardError) as error:
        _load(path)
    assert "returns shape [1, 4]" in str(error.value) and "lists 3 classes" in str(error.value)


def test_input_size_the_network_refuses(tmp_path: Path) -> None:
    path = _card(
        tmp_path,
        seeded(FixedSizeNet(4)),
        "tests.nets:FixedSizeNet",
        input={"rows": 24, "columns": 24},
        target_layer="conv",
    )
    with pytest.raises(ModelCardError) as error:
        _load(path)
    message = str(error.value)
    assert "refuses an input of shape [1, 1, 24, 24]" in message and "input.rows 24" in message


def test_target_layer_that_does_not_exist(tmp_path: Path) -> None:
    path = _card(tmp_path, seeded(TinyMultiLabel(4)), "tests.nets:TinyMultiLabel", target_layer="features.block9")
    with pytest.raises(ModelCardError) as error:
        _load(path)
    assert "target_layer 'features.block9' is not a layer of TinyMultiLabel" in str(error.value)
    assert "'classifier'" in str(error.value)  # the layers nearest the output are listed


@pytest.mark.parametrize(
    ("architecture", "needle"),
    [
        ("tests.no_such_module:Net", "cannot import 'tests.no_such_module'"),
        ("tests.nets:NoSuchNet", "has no 'NoSuchNet'"),
        ("tests.nets:seeded", "cannot be built"),
    ],
)
def test_architecture_that_cannot_be_built_is_named(tmp_path: Path, architecture: str, needle: str) -> None:
    path = _card(tmp_path, seeded(TinyMultiLabel(4)), architecture)
    with pytest.raises(ModelCardError) as error:
        _load(path)
    assert architecture in str(error.value) and needle in str(error.value)
