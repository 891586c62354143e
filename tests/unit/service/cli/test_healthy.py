"""``pacs-xai demo train-healthy`` and ``pacs-xai model train-healthy``: help with an example, the
errors, and (slow) a site's folder trained into a card copy: both files beside the card, both in the
card with their sha256, the figure, and h(x) from the new files on both runtimes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from service.cli.main import build_parser, main
from service.explain.healthy import HealthyAppearance
from service.inference.card import ModelCard, sha256_of
from service.models import demo_card_path
from service.synthetic.phantoms import write_phantom_studies


@pytest.fixture()
def card_copy(tmp_path: Path) -> Path:
    """The demo card without its healthy-appearance model."""
    folder = tmp_path / "demo"
    shutil.copytree(demo_card_path().parent, folder)
    raw = yaml.safe_load((folder / "model.yaml").read_text())
    for kind in ("healthy_appearance", "healthy_appearance_onnx"):
        (folder / raw["auxiliary"].pop(kind)["file"]).unlink()
    (folder / "model.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return folder / "model.yaml"


@pytest.mark.parametrize(
    ("command", "example"),
    [
        (["demo", "train-healthy"], "pacs-xai demo train-healthy --out service/models/demo"),
        (["model", "train-healthy"], "pacs-xai model train-healthy --normals /data/normal-chests/ --card"),
    ],
)
def test_help_has_an_example(command: list[str], example: str, capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command, "--help"])
    text = capsys.readouterr().out
    assert example in text and "--figure" in text and "--epochs" in text and "--detail-sigma" in text


def test_errors_are_one_line_naming_the_value(card_copy: Path, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["model", "train-healthy", "--normals", str(empty), "--card", str(card_copy)]) == 1
    assert f"error: {empty}: no readable DICOM image below it" in capsys.readouterr().err
    few = tmp_path / "few"
    write_phantom_studies(few, studies=3, seed=5, rows=256, cols=240)
    assert main(["model", "train-healthy", "--normals", str(few), "--card", str(card_copy)]) == 1
    assert "3 readable frame(s); training needs at least 20" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "train-healthy", "--out", "x", "--epochs", "0"])
    assert "must be at least 1, got 0" in capsys.readouterr().err
    assert "healthy_appearance" not in ModelCard.load(card_copy).auxiliary


@pytest.mark.slow
def test_a_sites_folder_trains_the_cards_healthy_model(card_copy: Path, tmp_path: Path, capsys) -> None:
    normals = tmp_path / "normals"
    write_phantom_studies(normals, studies=22, seed=9, rows=256, cols=240)
    figure = tmp_path / "held-out.png"
    args = ["model", "train-healthy", "--normals", str(normals), "--card", str(card_copy), "--figure", str(figure)]
    assert main([*args, "--epochs", "1"]) == 0
    captured = capsys.readouterr()
    assert "epoch 1/1" in captured.err and "20 normal images, 2 held out" in captured.err
    assert "held-out error of h(x) on normal images" in captured.out and figure.stat().st_size > 10_000
    card = ModelCard.load(card_copy)
    files = {"healthy_appearance": "healthy-appearance.pt", "healthy_appearance_onnx": "healthy-appearance.onnx"}
    for kind, name in files.items():
        path = card.auxiliary_path(kind)
        assert path == (card_copy.parent / name).resolve()
        assert card.auxiliary[kind].sha256 == sha256_of(path)
    healthy = HealthyAppearance(card.auxiliary_path("healthy_appearance"))
    images = torch.randn(2, 1, 224, 224)
    torch.testing.assert_close(healthy(images, "onnx"), healthy(images, "torch"), rtol=0, atol=1e-4)
    assert healthy.info().metadata["training"]["epochs"] == 1
