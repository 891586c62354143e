"""``pacs-xai triton``: help with examples, a clear error for a missing card, the export's files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.cli.main import main
from tests.nets import FixedSizeNet, seeded, write_card


def test_help_shows_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["triton", "export", "--help"])
    assert "pacs-xai triton export" in capsys.readouterr().out


def test_a_missing_card_is_an_error_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["triton", "export", str(tmp_path / "absent.yaml"), "--out", str(tmp_path / "out")]) == 1
    assert "absent.yaml" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_export_writes_the_graphs_and_their_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    card = write_card(
        tmp_path / "card",
        seeded(FixedSizeNet(num_classes=4)),
        "tests.nets:FixedSizeNet",
        target_layer="conv",
        input={"rows": 16, "columns": 16},
    )
    assert main(["triton", "export", str(card), "--out", str(tmp_path / "out"), "--max-batch", "4"]) == 0
    spec = json.loads((tmp_path / "out" / "spec.json").read_text())
    assert spec["max_batch"] == 4 and spec["target_layer"] == "conv" and spec["classes"] == 4
    assert spec["activation_shape"] == [4, 16, 16]
    assert {path.name for path in (tmp_path / "out").iterdir()} == {
        "spec.json",
        "classifier.pt2",
        "layer-gradients.pt2",
    }
    assert spec["cam_model"] in capsys.readouterr().out
