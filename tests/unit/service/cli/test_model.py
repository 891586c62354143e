"""``pacs-xai model calibrate``: fits the OOD statistics of a card copy, writes them beside it, updates
the card's auxiliary entry (the rest of the card unchanged) and prints what it measured.
``model init`` writes a card that loads and prints the export check; ``model check`` runs it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from service.cli.main import build_parser, main
from service.inference.card import ModelCard, sha256_of
from service.models import demo_card_path
from service.synthetic.phantoms import write_phantom_studies
from service.trust.ood import OodStatistics
from tests.nets import TinyMultiLabel, seeded


@pytest.fixture()
def card_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "demo"
    shutil.copytree(demo_card_path().parent, folder)
    (folder / "ood-statistics.npz").unlink()
    raw = yaml.safe_load((folder / "model.yaml").read_text())
    del raw["auxiliary"]["ood_statistics"]
    (folder / "model.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return folder / "model.yaml"


def test_help_has_an_example(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["model", "calibrate", "--help"])
    text = capsys.readouterr().out
    assert "pacs-xai model calibrate service/models/demo/model.yaml --phantoms 900" in text
    assert "--images DIR" in text and "--token-class" in text


@pytest.mark.slow
def test_calibrate_on_phantoms_updates_the_card(card_copy: Path, capsys) -> None:
    before = yaml.safe_load(card_copy.read_text())
    assert main(["model", "calibrate", str(card_copy.parent), "--phantoms", "60"]) == 0
    captured = capsys.readouterr()
    assert "fitting on 60 phantoms (seed 7), threshold from 60 (seed 1007)" in captured.err
    assert "fit features: 60 images" in captured.err and "held-out features: 60 images" in captured.err
    assert "feature layer: 'classifier' (64 features, 3 class means)" in captured.out
    card = ModelCard.load(card_copy)
    path = card.auxiliary_path("ood_statistics")
    assert path == (card_copy.parent / "ood-statistics.npz").resolve()
    assert card.auxiliary["ood_statistics"].sha256 == sha256_of(path)
    stats = OodStatistics.load(path)
    assert (stats.layer, stats.fitted_images, stats.held_out_images, stats.margin) == ("classifier", 60, 60, 1.5)
    assert f"threshold: {stats.threshold:.2f}" in captured.out
    after = yaml.safe_load(card_copy.read_text())
    assert {k: v for k, v in after.items() if k != "auxiliary"} == {k: v for k, v in before.items() if k != "auxiliary"}


def test_calibrate_on_a_folder_holds_out_every_fourth_frame(card_copy: Path, tmp_path: Path, capsys) -> None:
    images = tmp_path / "images"
    write_phantom_studies(images, studies=24, seed=11, rows=256, cols=240)
    (images / "notes.txt").write_text("not DICOM")
    assert main(["model", "calibrate", str(card_copy), "--images", str(images), "--shrinkage", "0.1"]) == 0
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "notes.txt" in captured.err
    assert "24 frames" in captured.err and "fitting on 18, threshold from 6" in captured.err
    stats = OodStatistics.load(card_copy.parent / "ood-statistics.npz")
    assert (stats.fitted_images, stats.held_out_images, stats.shrinkage) == (18, 6, 0.1)
    assert np.all(np.isfinite(stats.precision))


def test_calibrate_errors_are_one_line_naming_the_value(card_copy: Path, tmp_path: Path, capsys) -> None:
    assert main(["model", "calibrate", str(card_copy), "--phantoms", "12"]) == 1
    assert "error: fit on at least 30 phantoms, got 12" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["model", "calibrate", str(card_copy), "--images", str(empty)]) == 1
    assert "0 readable frame(s); calibration needs at least 20" in capsys.readouterr().err
    assert main(["model", "calibrate", str(card_copy), "--images", str(empty), "--token-class", "nodule"]) == 2
    assert "--token-class goes with --phantoms" in capsys.readouterr().err
    raw = yaml.safe_load(card_copy.read_text())
    del raw["weights"]["torch"]
    card_copy.write_text(yaml.safe_dump(raw))
    assert main(["model", "calibrate", str(card_copy), "--phantoms", "60"]) == 1
    assert "the card needs 'torch' weights" in capsys.readouterr().err
    assert not (card_copy.parent / "ood-statistics.npz").exists()


# --- model init and model check --------------------------------------------------------------------------


def test_init_and_check_help_have_examples(capsys) -> None:
    for command in ("init", "check"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["model", command, "--help"])
        assert f"pacs-xai model {command} " in capsys.readouterr().out


def test_init_a_torch_network_with_onnx_export_then_check_it(tmp_path: Path, capsys) -> None:
    checkpoint = tmp_path / "tiny.pth"
    torch.save(seeded(TinyMultiLabel(3)).state_dict(), checkpoint)
    card = tmp_path / "card"
    arguments = ["model", "init", str(card), "--torch", "tests.nets:TinyMultiLabel", "--checkpoint", str(checkpoint)]
    arguments += ["--classes", "x,y,z", "--activation", "sigmoid", "--threshold", "0.4", "--size", "32"]
    assert main([*arguments, "--export-onnx"]) == 0
    printed = capsys.readouterr().out
    assert "target layer: features" in printed
    assert "ONNX export vs torch, random input: max abs difference" in printed
    assert "ONNX export vs torch, phantom input: max abs difference" in printed
    loaded = ModelCard.load(card)
    assert loaded.output.thresholds == {"x": 0.4, "y": 0.4, "z": 0.4} and set(loaded.weights) == {"torch", "onnx"}
    assert main(arguments) == 2  # the card exists: not overwritten without --force
    assert "exists; give --force" in capsys.readouterr().err

    assert main(["model", "check", str(card), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "device: forward onnx on CPUExecutionProvider; gradients on cpu" in printed
    assert "method gradcam:" in printed and "threshold" in printed
    for name in ("x", "y", "z"):
        assert any(line.strip().startswith(name) for line in printed.splitlines())


def test_init_and_check_errors_are_one_line_naming_the_value(tmp_path: Path, capsys) -> None:
    code = main(["model", "init", str(tmp_path / "c"), "--onnx", str(tmp_path / "absent.onnx")])
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"error: ONNX file not found: {tmp_path / 'absent.onnx'}"]
    assert main(["model", "check", str(tmp_path / "nothing.yaml")]) == 2
    assert "model card not found" in capsys.readouterr().err
