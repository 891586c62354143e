"""Model cards: the shipped demo card loads; every kind of wrong card is a clear error at load."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from service.inference.backends import load_runner
from service.inference.card import ModelCard, ModelCardError, set_auxiliary_file, sha256_of
from service.inference.deployed import DeployedModel
from service.models import demo_card_path, shortcut_card_path, volume_card_path


@pytest.fixture()
def card_copy(tmp_path: Path) -> Path:
    """The shipped demo model's folder, copied so the test may break it."""
    folder = tmp_path / "demo"
    shutil.copytree(demo_card_path().parent, folder)
    return folder / "model.yaml"


def _edit(card_path: Path, **changes: object) -> None:
    raw = yaml.safe_load(card_path.read_text())
    raw.update(changes)
    card_path.write_text(yaml.safe_dump(raw))


def test_shipped_card_loads_and_all_runtimes_agree() -> None:
    card = ModelCard.load(demo_card_path())
    assert card.output.classes == ("normal", "nodule", "effusion")
    assert set(card.weights) == {"onnx", "torchscript", "torch"}
    for runtime in card.weights:
        assert card.weights_path(runtime).stat().st_size <= 10 * 1024 * 1024, f"{runtime} weights over 10 MB"
    batch = np.random.default_rng(0).normal(size=(3, 1, card.input.rows, card.input.columns)).astype(np.float32)
    onnx_logits = load_runner(card, "onnx").forward(batch)
    for runtime in ("torchscript", "torch"):
        np.testing.assert_allclose(load_runner(card, runtime).forward(batch), onnx_logits, rtol=1e-3, atol=1e-3)


def test_missing_weights_file_is_named(card_copy: Path) -> None:
    (card_copy.parent / "demo.onnx").unlink()
    with pytest.raises(ModelCardError, match=r"onnx weights file missing: .*demo\.onnx"):
        ModelCard.load(card_copy)


def test_sha256_mismatch_names_both_digests(card_copy: Path) -> None:
    weights = card_copy.parent / "demo.pt"
    weights.write_bytes(weights.read_bytes() + b"tampered")
    with pytest.raises(ModelCardError, match="sha256") as error:
        ModelCard.load(card_copy)
    assert sha256_of(weights) in str(error.value)


def test_class_list_that_does_not_match_the_output_size(card_copy: Path) -> None:
    raw = yaml.safe_load(card_copy.read_text())
    _edit(card_copy, output={**raw["output"], "classes": ["normal", "abnormal"]})
    card = ModelCard.load(card_copy)
    with pytest.raises(ModelCardError, match=r"returns shape \[1, 3\].*2 classes"):
        DeployedModel(card)


def test_unknown_runtime_is_named(card_copy: Path) -> None:
    raw = yaml.safe_load(card_copy.read_text())
    weights = raw["weights"]
    weights["tensorflow"] = weights.pop("onnx")
    _edit(card_copy, weights=weights)
    with pytest.raises(ModelCardError, match="tensorflow"):
        ModelCard.load(card_copy)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"input": {"rows": 0, "columns": 224}}, "input.rows"),
        ({"input": {"rows": 224, "columns": 224, "std": [0.0]}}, "std"),
        ({"output": {"classes": ["a", "a", "b"]}}, "duplicates"),
        ({"unexpected_field": 1}, "unexpected_field"),
    ],
)
def test_invalid_fields_name_where_and_what(card_copy: Path, change: dict, needle: str) -> None:
    _edit(card_copy, **change)
    with pytest.raises(ModelCardError, match=needle):
        ModelCard.load(card_copy)


def test_card_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ModelCardError, match="mapping"):
        ModelCard.load(path)


def test_applies_to_rules() -> None:
    card = ModelCard.load(demo_card_path())
    assert card.applies_to_dataset("CR", "1.2.840.10008.5.1.4.1.1.1", "CHEST") is None
    assert "modality CT" in card.applies_to_dataset("CT", "1.2.840.10008.5.1.4.1.1.2", "CHEST")
    assert "body part" in card.applies_to_dataset("DX", "1.2.840.10008.5.1.4.1.1.1.1", "HAND")


# --- auxiliary: networks trained against the model for an explainer -----------------------------


def test_shipped_card_names_the_demo_masker_with_its_digest() -> None:
    card = ModelCard.load(demo_card_path())
    entry = card.auxiliary["saliency_masker"]
    assert entry.file == "saliency-masker.pt"
    path = card.auxiliary_path("saliency_masker")
    assert path == (demo_card_path().parent / "saliency-masker.pt").resolve()
    assert entry.sha256 == sha256_of(path)


def test_missing_auxiliary_file_is_named(card_copy: Path) -> None:
    (card_copy.parent / "saliency-masker.pt").unlink()
    with pytest.raises(ModelCardError, match=r"auxiliary\.saliency_masker file missing: .*saliency-masker\.pt"):
        ModelCard.load(card_copy)


def test_auxiliary_digest_mismatch_names_both_digests(card_copy: Path) -> None:
    masker = card_copy.parent / "saliency-masker.pt"
    stated = ModelCard.load(card_copy).auxiliary["saliency_masker"].sha256
    masker.write_bytes(masker.read_bytes() + b"tampered")
    with pytest.raises(ModelCardError, match=r"sha256 of .*saliency-masker\.pt") as error:
        ModelCard.load(card_copy)
    message = str(error.value)
    assert sha256_of(masker) in message and stated in message and "auxiliary.saliency_masker" in message


@pytest.mark.parametrize(
    ("auxiliary", "needle"),
    [
        ({"healthy_vae": {"file": "vae.pt", "sha256": "0" * 64}}, r"auxiliary\.healthy_vae"),
        ({"saliency_masker": {"file": "saliency-masker.pt"}}, r"auxiliary\.saliency_masker\.sha256"),
        ({"saliency_masker": {"file": "saliency-masker.pt", "sha256": "ABC"}}, r"auxiliary\.saliency_masker\.sha256"),
        ({"saliency_masker": {"file": "x.pt", "sha256": "0" * 64, "size": 3}}, r"auxiliary\.saliency_masker\.size"),
    ],
)
def test_invalid_auxiliary_entries_name_where_and_what(card_copy: Path, auxiliary: dict, needle: str) -> None:
    _edit(card_copy, auxiliary=auxiliary)
    with pytest.raises(ModelCardError, match=needle):
        ModelCard.load(card_copy)


def test_a_card_without_auxiliary_files_loads_and_says_what_it_lacks(card_copy: Path) -> None:
    raw = yaml.safe_load(card_copy.read_text())
    del raw["auxiliary"]
    card_copy.write_text(yaml.safe_dump(raw))
    card = ModelCard.load(card_copy)
    assert card.auxiliary == {}
    with pytest.raises(ModelCardError, match=r"has no auxiliary\.saliency_masker; it has: none"):
        card.auxiliary_path("saliency_masker")


def test_set_auxiliary_file_writes_file_and_digest_and_keeps_the_rest(card_copy: Path) -> None:
    before = yaml.safe_load(card_copy.read_text())
    masker = card_copy.parent / "saliency-masker.pt"
    retrained = card_copy.parent / "masker-v2.pt"
    retrained.write_bytes(masker.read_bytes() + b"retrained")
    card = set_auxiliary_file(card_copy, "saliency_masker", retrained)
    assert card.auxiliary["saliency_masker"].file == "masker-v2.pt"
    assert card.auxiliary["saliency_masker"].sha256 == sha256_of(retrained)
    after = yaml.safe_load(card_copy.read_text())
    assert {k: v for k, v in after.items() if k != "auxiliary"} == {k: v for k, v in before.items() if k != "auxiliary"}
    assert list(after).index("auxiliary") == list(after).index("weights") + 1
    with pytest.raises(ModelCardError, match=r"not inside the folder of the model card"):
        set_auxiliary_file(card_copy, "saliency_masker", card_copy.parent.parent / "elsewhere.pt")
    with pytest.raises(ModelCardError, match="unknown auxiliary kind 'vae'"):
        set_auxiliary_file(card_copy, "vae", retrained)  # type: ignore[arg-type]
    assert ModelCard.load(card_copy).auxiliary["saliency_masker"].file == "masker-v2.pt"


# --- trust: the shortcut and out-of-distribution signals -----------------------------------------


def test_shipped_cards_state_their_trust_settings_and_ood_statistics() -> None:
    for path in (demo_card_path(), shortcut_card_path()):
        card = ModelCard.load(path)
        assert (card.trust.shortcut.share, card.trust.shortcut.concentration) == (0.55, 1.8)
        assert card.trust.shortcut.edge_band == 0.08 and card.trust.ood.layer == "classifier"
        assert card.auxiliary["ood_statistics"].file == "ood-statistics.npz"
        assert card.auxiliary["ood_statistics"].sha256 == sha256_of(card.auxiliary_path("ood_statistics"))


def test_trust_defaults_apply_when_the_section_is_absent(card_copy: Path) -> None:
    raw = yaml.safe_load(card_copy.read_text())
    del raw["trust"]
    card_copy.write_text(yaml.safe_dump(raw))
    trust = ModelCard.load(card_copy).trust
    assert (trust.shortcut.share, trust.shortcut.concentration, trust.shortcut.edge_band) == (0.55, 1.8, 0.08)
    assert trust.ood.layer is None and trust.ood.distance is None
    _edit(card_copy, trust={"ood": {"distance": 12.5}})
    trust = ModelCard.load(card_copy).trust
    assert trust.ood.distance == 12.5 and trust.shortcut.share == 0.55


@pytest.mark.parametrize(
    ("trust", "needle"),
    [
        ({"shortcut": {"share": 1.5}}, r"trust\.shortcut\.share: Input should be less than or equal to 1"),
        ({"shortcut": {"share": "0.5"}}, r"trust\.shortcut\.share: Input should be a valid number \(found '0.5'\)"),
        ({"shortcut": {"edge_band": 0.5}}, r"trust\.shortcut\.edge_band"),
        ({"shortcut": {"concentration": -1}}, r"trust\.shortcut\.concentration"),
        ({"shortcut": {"quota": 3}}, r"trust\.shortcut\.quota: Extra inputs are not permitted"),
        ({"ood": {"distance": 0}}, r"trust\.ood\.distance: Input should be greater than 0"),
        ({"ood": {"layer": "1bad name"}}, r"trust\.ood\.layer"),
        ({"energy": {}}, r"trust\.energy"),
    ],
)
def test_invalid_trust_settings_name_where_and_what(card_copy: Path, trust: dict, needle: str) -> None:
    _edit(card_copy, trust=trust)
    with pytest.raises(ModelCardError, match=needle):
        ModelCard.load(card_copy)


def test_ood_statistics_need_torch_weights(card_copy: Path) -> None:
    raw = yaml.safe_load(card_copy.read_text())
    del raw["weights"]["torch"]
    card_copy.write_text(yaml.safe_dump(raw))
    with pytest.raises(ModelCardError, match=r"auxiliary\.ood_statistics needs weights\.torch.*only onnx, torchscript"):
        ModelCard.load(card_copy)
    del raw["auxiliary"]["ood_statistics"]
    card_copy.write_text(yaml.safe_dump(raw))
    assert "ood_statistics" not in ModelCard.load(card_copy).auxiliary  # without statistics: no OOD signal, loads


# --- multi-label: thresholds and which findings are explained ---------------------------------------------


def _multi_label(card_copy: Path, **explain: object) -> ModelCard:
    raw = yaml.safe_load(card_copy.read_text())
    raw["output"] = {**raw["output"], "activation": "sigmoid", "thresholds": {"nodule": 0.3, "effusion": 0.7}}
    raw["explain"] = explain
    card_copy.write_text(yaml.safe_dump(raw))
    return ModelCard.load(card_copy)


def test_default_explains_the_top_class_as_before(card_copy: Path) -> None:
    card = ModelCard.load(card_copy)
    assert not card.explain.per_finding()
    assert card.findings_to_explain([0.2, 0.5, 0.3]) == [1]
    assert card.output.threshold("normal") == 0.5  # no thresholds listed: the default


def test_all_positive_takes_each_class_at_its_own_threshold_highest_first(card_copy: Path) -> None:
    card = _multi_label(card_copy, findings="all_positive")
    assert card.explain.per_finding()
    # normal 0.45 < 0.5 (default); nodule 0.35 >= 0.3; effusion 0.69 < 0.7
    assert card.findings_to_explain([0.45, 0.35, 0.69]) == [1]
    assert card.findings_to_explain([0.9, 0.35, 0.7]) == [0, 2, 1]
    assert card.findings_to_explain([0.1, 0.1, 0.1]) == []
    assert card.is_present(2, 0.7) and not card.is_present(2, 0.699)


def test_top_k_and_named_findings(card_copy: Path) -> None:
    assert _multi_label(card_copy, findings="top_k", top_k=2).findings_to_explain([0.1, 0.3, 0.2]) == [1, 2]
    named = _multi_label(card_copy, findings=["effusion", "normal"])
    assert named.findings_to_explain([0.0, 0.9, 0.0]) == [2, 0]  # named ones whatever their probability


@pytest.mark.parametrize(
    ("output", "explain", "needle"),
    [
        ({"thresholds": {"mass": 0.4}}, {}, "output.thresholds names ['mass']"),
        ({"thresholds": {"nodule": 1.5}}, {}, "probabilities in (0, 1)"),
        ({}, {"findings": ["nodule", "mass"]}, "explain.findings names ['mass']"),
        ({}, {"findings": "every"}, "explain.findings"),
        ({}, {"top_k": 0}, "explain.top_k"),
    ],
)
def test_wrong_multi_label_settings_name_the_value(card_copy: Path, output: dict, explain: dict, needle: str) -> None:
    raw = yaml.safe_load(card_copy.read_text())
    raw["output"] = {**raw["output"], **output}
    raw["explain"] = explain
    card_copy.write_text(yaml.safe_dump(raw))
    with pytest.raises(ModelCardError) as error:
        ModelCard.load(card_copy)
    assert needle in str(error.value)


# --- volume cards (input.kind: volume) ----------------------------------------------------------------


def test_shipped_volume_card_loads_as_a_volume_model() -> None:
    card = ModelCard.load(volume_card_path())
    assert card.input.kind == "volume"
    assert card.input.shape() == (1, card.input.slices, card.input.rows, card.input.columns)
    deployed = DeployedModel(card)
    try:
        batch = np.zeros((1, *card.input.shape()), dtype=np.float32)
        assert len(deployed.predict(batch)) == 1
    finally:
        deployed.close()


@pytest.mark.parametrize(
    ("input_section", "needle"),
    [
        ({"kind": "volume", "rows": 48, "columns": 48, "slices": 48, "spacing": [2, 2, 2]}, "needs input.window"),
        ({"rows": 224, "columns": 224, "slices": 32}, "apply to input.kind: volume only"),
        (
            {"kind": "volume", "rows": 8, "columns": 8, "slices": 8, "spacing": [2, 0, 2], "window": [0, 1]},
            "spacing must be positive",
        ),
        (
            {"kind": "volume", "rows": 8, "columns": 8, "slices": 8, "spacing": [2, 2, 2], "window": [400, -1000]},
            "low < high",
        ),
    ],
)
def test_invalid_volume_inputs_name_what(card_copy: Path, input_section: dict, needle: str) -> None:
    _edit(card_copy, input=input_section)
    with pytest.raises(ModelCardError, match=needle):
        ModelCard.load(card_copy)
