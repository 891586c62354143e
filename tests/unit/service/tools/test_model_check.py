"""``model check``: loads the card as the node does, runs each method on a phantom (or a given file),
reports the network's own probabilities, the device, each method's objects, a method that cannot
work with the card (and still runs the others), and the warnings raised meanwhile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import yaml

from dicom_io.pixels import prepare_frames
from service.inference.card import ModelCard, ModelCardError, sha256_of
from service.synthetic.phantoms import make_phantom
from service.tools.model_check import check_model
from tests.nets import TinyMultiLabel, seeded, write_card


@pytest.fixture()
def card(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    network = seeded(TinyMultiLabel(4), seed=3)
    path = write_card(tmp_path / "card", network, "tests.nets:TinyMultiLabel", explain={"findings": ["b", "d"]})
    return path, network


def test_reports_the_networks_probabilities_and_each_methods_objects(card, tmp_path: Path) -> None:
    path, network = card
    sample = tmp_path / "sample.dcm"
    phantom = make_phantom(4, "effusion", modality="DX").dataset
    pydicom.dcmwrite(sample, phantom, enforce_file_format=True)
    report = check_model(path, sample=sample, methods=["gradcam", "occlusion"], device="cpu")
    # independent: the network itself on the card's input of the sample
    section = ModelCard.load(path).input
    batch = section.normalise(np.stack([f.model_input for f in prepare_frames(phantom, section.spec())]))
    with torch.no_grad():
        expected = torch.sigmoid(network(torch.from_numpy(batch))).numpy()[0]
    np.testing.assert_allclose(report.predictions[0].probabilities, expected, rtol=1e-5, atol=1e-6)
    assert report.forward_device == "cpu" and report.gradient_device == "cpu"
    assert report.explained == ["b", "d"] and not report.failed
    for method in report.methods:
        assert method.error is None and method.milliseconds > 0
        assert method.outputs == ["sc b", "sc d"]
    assert any("no auxiliary.ood_statistics" in warning for warning in report.warnings)


def test_a_method_the_card_cannot_serve_is_reported_and_the_others_run(card, tmp_path: Path) -> None:
    path, _ = card
    raw = yaml.safe_load(path.read_text())
    # an ONNX-only copy: gradients are impossible, occlusion works
    onnx_path = path.parent / "model.onnx"
    network = seeded(TinyMultiLabel(4), seed=3)
    torch.onnx.export(
        network, (torch.zeros(1, 1, 32, 32),), str(onnx_path), dynamo=False, input_names=["image"],  # fast, tiny
        dynamic_axes={"image": {0: "batch"}},
    )  # fmt: skip
    raw["weights"] = {"onnx": {"file": "model.onnx", "sha256": sha256_of(onnx_path)}}
    raw.pop("target_layer")
    path.write_text(yaml.safe_dump(raw))
    report = check_model(path, methods=["gradcam", "occlusion"], device="cpu")
    gradcam, occlusion = report.methods
    assert gradcam.error is not None and "back-propagate" in gradcam.error
    assert occlusion.error is None and occlusion.outputs == ["sc b", "sc d"]
    assert report.failed and report.gradient_device is None


def test_a_wrong_card_is_the_cards_error(card) -> None:
    path, _ = card
    (path.parent / "model.pth").write_bytes(b"changed")
    with pytest.raises(ModelCardError, match="sha256 of .*model.pth"):
        check_model(path)
