"""The pipeline's trust signals: the out-of-distribution verdict per frame and the shortcut verdict per
explanation reach DatasetResult, the SR and the Secondary Capture, and a flagged result is logged
once, with UIDs only. Occlusion runs on the torch module with incremental inference (the card has
ONNX weights) and writes the map of whole passes on the ONNX pool. Real models (the honest demo and
the one that cheats), real phantoms and pydicom test files."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
import yaml

from service.explain.incremental import IncrementalForward
from service.inference.card import ModelCard
from service.inference.deployed import DeployedModel
from service.models import demo_card_path, shortcut_card_path
from service.node.pipeline import DatasetResult, ExplainPipeline
from service.synthetic.phantoms import make_phantom
from service.trust.ood import OodError
from tests.helpers import HELD_OUT_SEED, data_file
from tests.nets import TinyMultiLabel, seeded, write_card

YES, NO = "373066001", "373067005"


@pytest.fixture(scope="module")
def honest() -> Iterator[DeployedModel]:
    model = DeployedModel.from_card_path(demo_card_path())
    yield model
    model.close()


@pytest.fixture(scope="module")
def cheat() -> Iterator[DeployedModel]:
    model = DeployedModel.from_card_path(shortcut_card_path())
    yield model
    model.close()


def _evaluations(result: DatasetResult) -> dict[str, str]:
    """Qualitative evaluations (concept code -> value code) of the result's one SR."""
    (report,) = [o.dataset for o in result.outputs if o.kind == "sr"]
    group = hd.sr.MeasurementReport.from_sequence([report]).get_image_measurement_groups()[0]
    return {e.name.value: e.value.value for e in group.get_qualitative_evaluations()}


def _measurements(result: DatasetResult) -> dict[str, float]:
    (report,) = [o.dataset for o in result.outputs if o.kind == "sr"]
    group = hd.sr.MeasurementReport.from_sequence([report]).get_image_measurement_groups()[0]
    return {m.name.value: m.value for m in group.get_measurements()}


def test_an_honest_result_carries_both_signals_unflagged(honest: DeployedModel, caplog) -> None:
    pipeline = ExplainPipeline(honest, ["gradcam"], ["sc", "sr"])
    phantom = make_phantom(2, "effusion", seed=HELD_OUT_SEED)
    with caplog.at_level(logging.WARNING, logger="service.node.pipeline"):
        result = pipeline.process(phantom.dataset)
    (ood,) = result.ood
    assert ood is not None and not ood.out_of_distribution and 0 < ood.distance < ood.threshold
    (verdict,) = result.verdicts
    assert (verdict.method, verdict.frame_index, verdict.ood) == ("gradcam", 0, ood)
    assert 0 < verdict.shortcut.share < 0.55 and not verdict.shortcut.suspected and not verdict.flagged
    assert (verdict.shortcut.share_threshold, verdict.shortcut.concentration_threshold) == (0.55, 1.8)
    assert _evaluations(result)["TRUST-SHORTCUT"] == NO and _evaluations(result)["TRUST-OOD"] == NO
    measured = _measurements(result)
    assert measured["TRUST-OUTSIDE"] == pytest.approx(100 * verdict.shortcut.share, abs=0.01)
    assert measured["TRUST-OOD-DIST"] == pytest.approx(ood.distance, abs=1e-3)
    assert "trust" in result.timings_ms
    assert not [r for r in caplog.records if "flagged" in r.getMessage()]


def test_occlusion_runs_incrementally_on_the_torch_module_and_writes_the_map_of_whole_onnx_passes(
    honest: DeployedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "onnx" in honest.card.weights and honest.forward_runner.device == "CPUExecutionProvider"
    boxes: list[tuple[int, ...]] = []
    boxed_pass = IncrementalForward.forward

    def recorded(self: IncrementalForward, image: Any, start: Any, values: Any) -> Any:
        boxes.append(tuple(values.shape[2:]))
        return boxed_pass(self, image, start, values)

    monkeypatch.setattr(IncrementalForward, "forward", recorded)
    pool_rows: list[int] = []
    pool_pass = honest.pool.forward

    def counted(batch: np.ndarray) -> np.ndarray:
        pool_rows.append(len(batch))
        return pool_pass(batch)

    monkeypatch.setattr(honest.pool, "forward", counted)
    window = {"window": 56, "stride": 28}
    phantom = make_phantom(3, "nodule", seed=HELD_OUT_SEED).dataset
    results = {}
    for incremental in (True, False):
        boxes.clear()
        pool_rows.clear()
        params = {"occlusion": {**window, "incremental": incremental}}
        results[incremental] = ExplainPipeline(honest, ["occlusion"], ["pm"], method_params=params).process(phantom)
        frames = len(results[incremental].predictions)
        if incremental:
            # The occluded inputs went through the traced torch module as cropped boxes; the pool
            # (ONNX Runtime) ran only the predictions.
            rows = honest.card.input.rows
            assert boxes and all(max(box) < rows for box in boxes)
            assert sum(pool_rows) == frames
        else:  # whole passes of every occluded input on the ONNX pool
            assert not boxes and sum(pool_rows) > frames
    (incremental_map,), (whole_map,) = (
        [o.dataset.pixel_array for o in results[key].outputs if o.kind == "pm"] for key in (True, False)
    )
    assert np.abs(whole_map).max() > 0
    np.testing.assert_allclose(incremental_map, whole_map, rtol=1e-4, atol=1e-4 * float(np.abs(whole_map).max()))
    # A check that declines the module (an untraceable network) leaves the explainer on the pool.
    assert honest.model_for(needs_gradients=False, prefers_module=lambda module: False) is honest.pool


def test_a_cheating_explanation_is_flagged_burned_in_reported_and_logged_with_uids_only(
    cheat: DeployedModel, honest: DeployedModel, caplog
) -> None:
    phantom = make_phantom(4, "nodule", seed=HELD_OUT_SEED, token=True)
    pipeline = ExplainPipeline(cheat, ["gradcam"], ["sc", "sr"])
    with caplog.at_level(logging.WARNING, logger="service.node.pipeline"):
        result = pipeline.process(phantom.dataset)
    (verdict,) = result.verdicts
    assert verdict.shortcut.suspected and verdict.shortcut.share >= 0.55 and verdict.shortcut.concentration >= 1.8
    assert not verdict.ood.out_of_distribution, "the token is in the cheating model's own training data"
    assert _evaluations(result)["TRUST-SHORTCUT"] == YES
    # The same image explained by the honest model: the same pixels, no warning line.
    calm = ExplainPipeline(honest, ["gradcam"], ["sc"]).process(phantom.dataset)
    assert not calm.verdicts[0].shortcut.suspected
    flagged_sc = next(o.dataset for o in result.outputs if o.kind == "sc").pixel_array
    calm_sc = next(o.dataset for o in calm.outputs if o.kind == "sc").pixel_array
    warning = (flagged_sc[..., 0] > 230) & (flagged_sc[..., 1] > 80) & (flagged_sc[..., 1] < 140)
    warning &= (flagged_sc[..., 2] > 30) & (flagged_sc[..., 2] < 90)
    calm_warning = (calm_sc[..., 0] > 230) & (calm_sc[..., 1] > 80) & (calm_sc[..., 1] < 140)
    calm_warning &= (calm_sc[..., 2] > 30) & (calm_sc[..., 2] < 90)
    text_block = np.zeros(warning.shape, dtype=bool)
    text_block[: warning.shape[0] // 3, : int(phantom.dataset.Columns)] = True
    assert (warning & text_block).sum() > 50 and not (calm_warning & text_block).any()

    (line,) = [r.getMessage() for r in caplog.records if "flagged" in r.getMessage()]
    assert "explanation shortcut suspected" in line and "method gradcam" in line
    assert str(phantom.dataset.SOPInstanceUID) in line
    for output in result.outputs:
        assert str(output.dataset.SOPInstanceUID) in line
    for private in (str(phantom.dataset.PatientName), str(phantom.dataset.PatientID), "PHANTOM", "PXAI"):
        assert private not in line


@pytest.mark.parametrize("name", ["CT_small.dcm", "RG3_UNCR.dcm"])
def test_a_non_chest_image_forced_through_is_out_of_distribution(name: str, honest: DeployedModel, caplog) -> None:
    import pydicom

    pipeline = ExplainPipeline(honest, ["gradcam"], ["sc", "sr"], enforce_applies_to=False)
    with caplog.at_level(logging.WARNING, logger="service.node.pipeline"):
        result = pipeline.process(pydicom.dcmread(data_file(name)))
    (ood,) = result.ood
    assert ood.out_of_distribution and ood.distance > 2 * ood.threshold
    assert _evaluations(result)["TRUST-OOD"] == YES
    (line,) = [r.getMessage() for r in caplog.records if "flagged" in r.getMessage()]
    assert "input out of distribution" in line


def test_a_shutter_counts_as_outside_the_anatomy(honest: DeployedModel) -> None:
    phantom = make_phantom(5, "nodule", seed=HELD_OUT_SEED, modality="DX")
    pipeline = ExplainPipeline(honest, ["gradcam"], ["sc"])
    plain = pipeline.process(phantom.dataset).verdicts[0].shortcut
    shuttered = phantom.dataset.copy()
    shuttered.ShutterShape = "CIRCULAR"  # a small visible disc at the top: the lungs and the nodule are hidden
    shuttered.CenterOfCircularShutter = [40, 240]
    shuttered.RadiusOfCircularShutter = 30
    hidden = pipeline.process(shuttered).verdicts[0].shortcut
    assert plain.share < 0.55 and hidden.share > 0.95


def _card_without_statistics(tmp_path: Path, **trust: object) -> Path:
    folder = tmp_path / "demo"
    shutil.copytree(demo_card_path().parent, folder)
    raw = yaml.safe_load((folder / "model.yaml").read_text())
    del raw["auxiliary"]["ood_statistics"]
    raw["trust"] = {**raw["trust"], **trust}
    (folder / "model.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return folder / "model.yaml"


def test_a_card_without_statistics_has_no_ood_signal_and_says_so(tmp_path: Path, caplog) -> None:
    model = DeployedModel.from_card_path(_card_without_statistics(tmp_path))
    try:
        with caplog.at_level(logging.WARNING, logger="service.node.pipeline"):
            pipeline = ExplainPipeline(model, ["gradcam"], ["sr"])
        assert pipeline.ood_detector is None
        assert any("no auxiliary.ood_statistics" in r.getMessage() for r in caplog.records)
        result = pipeline.process(make_phantom(1, "normal", seed=HELD_OUT_SEED).dataset)
        assert result.ood == [None] and result.verdicts[0].ood is None
        evaluations = _evaluations(result)
        assert "TRUST-OOD" not in evaluations and "TRUST-SHORTCUT" in evaluations
    finally:
        model.close()


def test_statistics_of_another_layer_stop_the_pipeline_at_start(tmp_path: Path) -> None:
    card_path = demo_card_path()
    folder = tmp_path / "demo"
    shutil.copytree(card_path.parent, folder)
    raw = yaml.safe_load((folder / "model.yaml").read_text())
    raw["trust"]["ood"]["layer"] = "features.block4"
    (folder / "model.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    model = DeployedModel(ModelCard.load(folder))
    try:
        with pytest.raises(OodError, match="fitted on the input of layer 'classifier'.*'features.block4'"):
            ExplainPipeline(model, ["gradcam"], ["sc"])
    finally:
        model.close()


def test_the_cards_thresholds_are_the_pipelines(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    shutil.copytree(demo_card_path().parent, folder)
    raw = yaml.safe_load((folder / "model.yaml").read_text())
    raw["trust"] = {"shortcut": {"share": 0.0, "concentration": 0.0}, "ood": {"distance": 0.001}}
    (folder / "model.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    model = DeployedModel.from_card_path(folder)
    try:
        result = ExplainPipeline(model, ["gradcam"], ["sc"]).process(make_phantom(1, "normal").dataset)
        (verdict,) = result.verdicts
        assert verdict.shortcut.suspected and verdict.ood.out_of_distribution and verdict.ood.threshold == 0.001
    finally:
        model.close()


def test_the_warm_up_computes_the_signals_but_logs_no_flag(honest: DeployedModel, caplog) -> None:
    """The warm-up's 1024² phantom is out of the demo model's distribution (it saw 512-row phantoms
    only); it must not put a "result flagged" line in the log at every start."""
    pipeline = ExplainPipeline(honest, ["gradcam"], ["sc"])
    with caplog.at_level(logging.WARNING, logger="service.node.pipeline"):
        pipeline.warm_up()
    assert not [r for r in caplog.records if "flagged" in r.getMessage()]


# --- a multi-label card: every explained finding its own objects, one batched explainer pass ---------------

MULTI_OUTPUTS = ("sc", "pm", "seg_fractional", "seg_binary", "sr")


def _multi_label_model(folder: Path, **explain: object) -> DeployedModel:
    card = write_card(folder, seeded(TinyMultiLabel(4), seed=3), "tests.nets:TinyMultiLabel", explain=explain)
    return DeployedModel.from_card_path(card, device="cpu")


def test_each_named_finding_gets_its_own_sc_and_pm_and_a_segment(tmp_path: Path) -> None:
    model = _multi_label_model(tmp_path / "card", findings=["c", "a"])
    try:
        phantom = make_phantom(1, "nodule", modality="DX")
        result = ExplainPipeline(model, ["gradcam"], MULTI_OUTPUTS, enforce_applies_to=False).process(phantom.dataset)
    finally:
        model.close()
    kinds = [(o.kind, o.finding) for o in result.outputs]
    assert kinds == [
        ("sc", "c"), ("pm", "c"), ("sc", "a"), ("pm", "a"),
        ("seg_fractional", None), ("seg_binary", None), ("sr", None),
    ]  # fmt: skip
    uids = [o.dataset.SOPInstanceUID for o in result.outputs]
    assert len(set(uids)) == len(uids)
    series = {o.dataset.SeriesDescription for o in result.outputs}
    assert {"XAI gradcam c", "XAI gradcam a", "XAI gradcam c map", "XAI gradcam a map"} <= series
    assert [v.finding for v in result.verdicts] == ["c", "a"]
    for output in result.outputs:
        if output.kind.startswith("seg"):
            assert len(output.dataset.SegmentSequence) == 2
    (report,) = [o.dataset for o in result.outputs if o.kind == "sr"]
    groups = hd.sr.MeasurementReport.from_sequence([report]).get_image_measurement_groups()
    assert [g.tracking_identifier for g in groups] == [f"test-multi-label {name}" for name in "abcd"]


def test_batched_findings_equal_one_pass_per_finding(tmp_path: Path) -> None:
    """The image repeated once per finding, each with its own target, in one explainer call: each
    finding's map is the map a pass of its own gives (the batch-first contract), not another's."""
    model = _multi_label_model(tmp_path / "card", findings=["c", "a", "d"])
    try:
        phantom = make_phantom(1, "nodule", modality="DX")
        batched = ExplainPipeline(model, ["gradcam"], ["pm"], enforce_applies_to=False).process(phantom.dataset)
        maps = {o.finding: o.dataset.pixel_array for o in batched.outputs}
        for name in ("a", "d"):
            single = _multi_label_model(tmp_path / name, findings=[name])
            try:
                (output,) = (
                    ExplainPipeline(single, ["gradcam"], ["pm"], enforce_applies_to=False)
                    .process(phantom.dataset)
                    .outputs
                )
            finally:
                single.close()
            np.testing.assert_allclose(maps[name], output.dataset.pixel_array, rtol=1e-4, atol=1e-6)
        assert not np.allclose(maps["a"], maps["d"])  # each finding its own map
    finally:
        model.close()


def test_all_positive_explains_exactly_the_classes_at_their_thresholds(tmp_path: Path) -> None:
    probe = _multi_label_model(tmp_path / "probe")
    phantom = make_phantom(1, "nodule", modality="DX")
    try:
        probabilities = (
            ExplainPipeline(probe, ["gradcam"], ["sc"], enforce_applies_to=False)
            .process(phantom.dataset)
            .predictions[0]
            .probabilities
        )
    finally:
        probe.close()
    # thresholds just below two classes and just above the other two
    order = np.argsort(probabilities)
    names = "abcd"
    thresholds = {names[i]: float(np.clip(probabilities[i] + (0.01 if rank < 2 else -0.01), 0.001, 0.999))
                  for rank, i in enumerate(order)}  # fmt: skip
    card = write_card(
        tmp_path / "card",
        seeded(TinyMultiLabel(4), seed=3),
        "tests.nets:TinyMultiLabel",
        output={"thresholds": thresholds},
        explain={"findings": "all_positive"},
    )
    model = DeployedModel.from_card_path(card, device="cpu")
    try:
        result = ExplainPipeline(model, ["gradcam"], ["sc", "sr"], enforce_applies_to=False).process(phantom.dataset)
    finally:
        model.close()
    present = {names[i] for i in order[2:]}
    assert {o.finding for o in result.outputs if o.kind == "sc"} == present
    (report,) = [o.dataset for o in result.outputs if o.kind == "sr"]
    groups = hd.sr.MeasurementReport.from_sequence([report]).get_image_measurement_groups()
    presence = {
        g.tracking_identifier.split()[-1]: {e.name.value: e.value.value for e in g.get_qualitative_evaluations()}[
            "121052"
        ]
        for g in groups
    }
    assert presence == {name: ("52101004" if name in present else "272519000") for name in names}
