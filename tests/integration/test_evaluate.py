"""pacs-xai evaluate end to end on small sets: the scorecard files, every figure tagged and defined,
and the model that cheats on purpose shown up by its scorecard (no map looked at by a person)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from service.cli.main import main
from service.models import demo_card_path, shortcut_card_path
from service.tools.evaluate.labelled import phantom_set
from service.tools.evaluate.run import EvaluationSettings, evaluate
from service.tools.evaluate.scorecard import METRICS

pytestmark = pytest.mark.integration

QUICK = EvaluationSettings(methods=("gradcam",), randomisation_images=4, road_images=2, repeatability_images=2)


def test_the_command_writes_a_scorecard_whose_figures_are_all_defined(tmp_path: Path, capsys) -> None:
    code = main(
        [
            "evaluate",
            "--phantoms",
            "6",
            "--method",
            "gradcam",
            "--method",
            "rise",
            "--param",
            "rise.masks=200",
            "--randomisation-images",
            "3",
            "--road-images",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    card = json.loads((tmp_path / "scorecard.json").read_text())
    assert [row["method"] for row in card["rows"]] == ["gradcam", "rise"]
    for row in card["rows"]:
        assert set(row["figures"]) <= set(METRICS)
        assert {"hit_rate", "deletion_ratio", "road_combined", "randomisation_passes", "ms_per_image"} <= set(
            row["figures"]
        )
        for name, figure in row["figures"].items():
            assert figure["value"] is None or math.isfinite(figure["value"]), name
            assert figure["images"] >= 1, name
        assert len(row["randomisation_steps"]) == 6  # the demo model: head, block4 .. block1, stem
    assert "seed_repeatability_ssim" in card["rows"][1]["figures"]  # RISE is stochastic
    assert "path_agreement_pearson" in card["rows"][1]["figures"]  # and forward-only
    assert all(entry["co12"] for entry in card["metrics"].values())
    markdown = (tmp_path / "scorecard.md").read_text()
    assert "| gradcam |" in markdown and "## What each figure is" in markdown
    assert (tmp_path / "scorecard-pacs-xai-demo-chest.png").stat().st_size > 10_000
    assert "evaluation took" in capsys.readouterr().out


def test_the_cheating_models_scorecard_shows_it() -> None:
    """Relevance mass on its shortcut class at most half the honest model's, and no nodule hit."""
    honest = evaluate([demo_card_path()], phantom_set(12), QUICK, lambda _: None).rows[0]
    cheat = evaluate([shortcut_card_path()], phantom_set(12, token_classes={"nodule"}), QUICK, lambda _: None).rows[0]
    honest_mass = honest.per_class["nodule"]["relevance_mass_accuracy"].value
    cheat_mass = cheat.per_class["nodule"]["relevance_mass_accuracy"].value
    assert cheat_mass <= 0.5 * honest_mass, (cheat_mass, honest_mass)
    assert honest.per_class["nodule"]["hit_rate"].value >= 0.75
    assert cheat.per_class["nodule"]["hit_rate"].value <= 0.25


def test_a_wrong_setting_stops_before_any_work(tmp_path: Path, capsys) -> None:
    assert main(["evaluate", "--method", "rise", "--param", "rise.no_such=1", "--out", str(tmp_path)]) == 2
    assert "no_such" in capsys.readouterr().err
    assert not (tmp_path / "scorecard.json").exists()


@pytest.mark.slow
def test_fill_variants_side_by_side_with_the_ood_signal_on_filled_images(tmp_path: Path, capsys) -> None:
    """occlusion and occlusion:healthy as two rows; the OOD table per fill (constant, blur, h(x)); the maps."""
    args = ["evaluate", "--phantoms", "3", "--method", "occlusion", "--method", "occlusion:healthy"]
    args += ["--param", "occlusion.window=56", "--param", "occlusion.stride=56"]
    args += ["--param", "occlusion:healthy.perturbation=healthy", "--out", str(tmp_path)]
    args += ["--randomisation-images", "0", "--road-images", "0", "--repeatability-images", "0"]
    assert main(args) == 0
    card = json.loads((tmp_path / "scorecard.json").read_text())
    rows = card["rows"]
    assert [(row["method"], row["variant"]) for row in rows] == [("occlusion", None), ("occlusion", "healthy")]
    assert "perturbation" not in rows[0]["settings"] and rows[1]["settings"]["perturbation"] == "healthy"
    assert rows[0]["settings"]["window"] == rows[1]["settings"]["window"] == 56
    for row in rows:
        assert 0 <= row["figures"]["perturbed_ood_flag_rate"]["value"] <= 1
    table = card["perturbed_ood"]["pacs-xai-demo-chest"]
    assert {entry["fill"] for entry in table} == {"none", "constant 0", "blur 10 px", "healthy h(x)"}
    assert all(entry["images"] == 3 for entry in table)
    markdown = (tmp_path / "scorecard.md").read_text()
    assert "| occlusion:healthy |" in markdown and "| healthy h(x) | 25% | 3 |" in markdown
    assert (tmp_path / "maps-pacs-xai-demo-chest.png").stat().st_size > 10_000
