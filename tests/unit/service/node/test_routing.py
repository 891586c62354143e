"""Routing rules: the matcher (each attribute kind, regular expressions, ranges), first match and
continue, the implicit rule of a config without routes, one model per card, and rule errors that
name the rule and the value.

Facts come from real datasets (phantoms, pydicom's CT test file) where the attribute reading is
what is tested; elsewhere from InstanceFacts built by hand, one attribute changed at a time.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from service.models import demo_card_path, shortcut_card_path, volume_card_path
from service.node.config import NodeConfig, RouteMatchConfig, load_config
from service.node.pipeline import ExplainPipeline
from service.node.routing import (
    DEFAULT_ROUTE,
    InstanceFacts,
    Matcher,
    ModelRegistry,
    RouteError,
    Router,
    check_rules,
    compile_rules,
    evaluate,
    read_header,
    select,
    triton_settings,
    why_not_routed,
)
from service.node.volume import VolumePipeline
from service.synthetic.phantoms import make_phantom
from tests.helpers import REPO_ROOT, data_file
from tests.unit.service.node.helpers import non_image_dataset

CR_CLASS = "1.2.840.10008.5.1.4.1.1.1"
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"

#: A chest radiograph as routing sees it; each test changes one attribute.
CHEST_CR = InstanceFacts(
    sop_instance_uid="1.2.3.4",
    series_instance_uid="1.2.3",
    modality="CR",
    body_part_examined="CHEST",
    sop_class_uid=CR_CLASS,
    series_description="Chest PA erect",
    protocol_name="THORAX PA",
    manufacturer="ACME Imaging",
    calling_ae_title="ORTHANC",
    rows=2048,
    columns=1792,
    instances=1,
)


def _match(**keys: object) -> Matcher:
    return Matcher(RouteMatchConfig(**keys))


def _config(routes: list[dict], **extra: object) -> NodeConfig:
    return load_config(None, {"routes": routes, **extra})


# --- the matcher --------------------------------------------------------------------------------

TEXT_CASES = [
    # (match key, DICOM keyword shown, pattern that takes CHEST_CR, a value it refuses)
    ("modality", "Modality", "CR|DX", "CT"),
    ("body_part_examined", "BodyPartExamined", "CHEST|THORAX", "HEAD"),
    ("sop_class_uid", "SOPClassUID", CR_CLASS, CT_CLASS),
    ("series_description", "SeriesDescription", ".*chest.*", "Abdomen AP"),
    ("protocol_name", "ProtocolName", "thorax.*", "KNEE LAT"),
    ("manufacturer", "Manufacturer", "ACME.*", "Other Corp"),
    ("calling_ae_title", "calling AE title", "ORTHANC|PACS1", "MODALITY"),
]


@pytest.mark.parametrize(("key", "keyword", "pattern", "refused"), TEXT_CASES, ids=[c[0] for c in TEXT_CASES])
def test_each_text_attribute_is_matched_and_a_mismatch_names_it_with_its_value(
    key: str, keyword: str, pattern: str, refused: str
) -> None:
    matcher = _match(**{key: pattern})
    assert matcher.first_mismatch(CHEST_CR) is None
    other = dataclasses.replace(CHEST_CR, **{key: refused})
    mismatch = matcher.first_mismatch(other)
    assert mismatch is not None and mismatch.attribute == keyword and mismatch.value == refused
    assert mismatch.describe() == f"{keyword} {refused!r} does not match {pattern!r}"


def test_expressions_match_the_whole_value_ignoring_case_and_a_list_is_any_of() -> None:
    assert _match(modality="C").first_mismatch(CHEST_CR) is not None, "a prefix is not a match"
    assert _match(modality="R").first_mismatch(CHEST_CR) is not None, "a suffix is not a match"
    assert _match(body_part_examined="chest").first_mismatch(CHEST_CR) is None
    assert _match(series_description="chest.*").first_mismatch(CHEST_CR) is None
    assert _match(modality=["DX", "CR"]).first_mismatch(CHEST_CR) is None
    assert _match(modality=["DX", "MG"]).first_mismatch(CHEST_CR).expected == "any of ['DX', 'MG']"


def test_a_uid_matches_only_itself_although_its_dots_would_match_any_character() -> None:
    # As a raw expression 1.2.840.10008.5.1.4.1.1.1 would also take ...1.111 (same length, '.' -> '1').
    lookalike = CR_CLASS[:-3] + "111"
    assert len(lookalike) == len(CR_CLASS)
    assert _match(sop_class_uid=CR_CLASS).first_mismatch(dataclasses.replace(CHEST_CR, sop_class_uid=lookalike))
    assert _match(sop_class_uid=r"1\.2\.840\.10008\.5\.1\.4\.1\.1\.1(\.1)?").first_mismatch(CHEST_CR) is None


def test_an_absent_attribute_is_empty_text_and_only_an_expression_allowing_empty_takes_it() -> None:
    no_body_part = dataclasses.replace(CHEST_CR, body_part_examined="")
    mismatch = _match(body_part_examined="CHEST").first_mismatch(no_body_part)
    assert mismatch is not None and mismatch.describe() == "BodyPartExamined absent does not match 'CHEST'"
    assert _match(body_part_examined=["CHEST", ""]).first_mismatch(no_body_part) is None


@pytest.mark.parametrize(
    ("key", "bounds", "value", "takes"),
    [
        ("rows", {"min": 2048}, 2048, True),
        ("rows", {"min": 2049}, 2048, False),
        ("columns", {"max": 1792}, 1792, True),
        ("columns", {"max": 1791}, 1792, False),
        ("instances", {"min": 20, "max": 2000}, 19, False),
        ("instances", {"min": 20, "max": 2000}, 20, True),
        ("instances", {"min": 20, "max": 2000}, 2001, False),
        ("rows", {"min": 1}, None, False),  # an object without Rows is in no bounded range
    ],
)
def test_ranges_are_inclusive_and_an_absent_count_is_outside(key: str, bounds: dict, value: int, takes: bool) -> None:
    facts = dataclasses.replace(CHEST_CR, **{key: value})
    mismatch = _match(**{key: bounds}).first_mismatch(facts)
    assert (mismatch is None) is takes
    if not takes:
        assert mismatch.value == value and mismatch.relation == "is not"


def test_every_key_must_match_and_the_first_failing_one_is_reported_in_a_fixed_order() -> None:
    matcher = _match(modality="CR", body_part_examined="HEAD", rows={"min": 4096})
    mismatch = matcher.first_mismatch(CHEST_CR)
    assert mismatch.attribute == "BodyPartExamined"  # text keys before ranges, in the documented order
    assert _match().first_mismatch(CHEST_CR) is None, "an empty match takes everything"


def test_facts_are_read_from_real_headers() -> None:
    cr = make_phantom(0, "nodule", rows=160, cols=128).dataset
    facts = InstanceFacts.from_dataset(cr, instances=3, calling_ae_title=" ORTHANC ")
    assert (facts.modality, facts.body_part_examined, facts.sop_class_uid) == ("CR", "CHEST", CR_CLASS)
    assert (facts.rows, facts.columns, facts.instances, facts.calling_ae_title) == (160, 128, 3, "ORTHANC")
    assert facts.sop_instance_uid == cr.SOPInstanceUID and facts.is_image
    ct = InstanceFacts.from_dataset(read_header(data_file("CT_small.dcm")))
    assert (ct.modality, ct.sop_class_uid, ct.rows, ct.columns) == ("CT", CT_CLASS, 128, 128)
    sr = InstanceFacts.from_dataset(non_image_dataset("1.2.840.10008.5.1.4.1.1.88.11", "SR"))
    assert sr.modality == "SR" and sr.rows is None and not sr.is_image


# --- rule order -----------------------------------------------------------------------------------


def test_the_first_rule_that_matches_wins() -> None:
    rules = compile_rules(
        _config(
            [
                {"name": "ct", "match": {"modality": "CT"}},
                {"name": "chest", "match": {"modality": "CR"}},
                {"name": "anything"},
            ]
        )
    )
    assert [rule.name for rule in select(rules, CHEST_CR)] == ["chest"]
    verdicts = evaluate(rules, CHEST_CR)
    assert [v.describe() for v in verdicts] == [
        "ct: Modality 'CR' does not match 'CT'",
        "chest: taken",
        "anything: not reached (an earlier rule took it; no continue)",
    ]


def test_continue_goes_on_to_the_later_rules() -> None:
    rules = compile_rules(
        _config(
            [
                {"name": "research-copy", "match": {"calling_ae_title": "ORTHANC"}, "continue": True},
                {"name": "ct", "match": {"modality": "CT"}},
                {"name": "chest", "match": {"modality": "CR"}},
                {"name": "anything"},
            ]
        )
    )
    assert [rule.name for rule in select(rules, CHEST_CR)] == ["research-copy", "chest"]
    assert [rule.name for rule in select(rules, dataclasses.replace(CHEST_CR, calling_ae_title="X"))] == ["chest"]


def test_an_object_without_pixels_is_taken_by_no_rule_not_even_one_that_matches_everything() -> None:
    rules = compile_rules(_config([{"name": "sr-model", "match": {"modality": "SR"}}, {"name": "anything"}]))
    sr = dataclasses.replace(CHEST_CR, modality="SR", rows=None, columns=None)
    assert select(rules, sr) == []
    assert [v.describe() for v in evaluate(rules, sr)] == [
        "sr-model: Rows absent - not an image: no rule takes an object without pixels",
        "anything: Rows absent - not an image: no rule takes an object without pixels",
    ]


def test_no_rule_taking_it_is_an_empty_selection_with_each_rules_reason_and_free_text_hidden() -> None:
    rules = compile_rules(
        _config(
            [
                {"name": "head", "match": {"series_description": ".*head.*"}},
                {"name": "big", "match": {"rows": {"min": 4096}}},
            ]
        )
    )
    verdicts = evaluate(rules, CHEST_CR)
    assert not select(rules, CHEST_CR)
    reason = why_not_routed(verdicts)
    assert (
        reason
        == "head: SeriesDescription (free text, not shown) does not match '.*head.*'; big: Rows 2048 is not >= 4096"
    )
    assert "Chest PA" not in reason


def test_without_routes_the_default_rule_is_the_cards_applies_to() -> None:
    (rule,) = compile_rules(load_config(None))
    assert rule.name == DEFAULT_ROUTE and rule.card_path == demo_card_path().resolve()
    assert rule.matcher.first_mismatch(CHEST_CR) is None
    assert rule.matcher.first_mismatch(dataclasses.replace(CHEST_CR, modality="DX", body_part_examined="chest")) is None
    assert rule.matcher.first_mismatch(dataclasses.replace(CHEST_CR, modality="CT")).attribute == "Modality"
    assert rule.matcher.first_mismatch(dataclasses.replace(CHEST_CR, body_part_examined="")).attribute == (
        "BodyPartExamined"
    )


def test_a_rule_takes_the_config_defaults_and_names_its_destinations() -> None:
    config = _config(
        [
            {"name": "a", "destinations": ["research"], "method_params": {"occlusion": {"window": 16}}},
            {"name": "b", "methods": ["gradcam"], "outputs": ["pm"]},
        ],
        destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
            {"name": "research", "ae_title": "R", "host": "127.0.0.1", "port": 105},
        ],
        explain={"methods": ["occlusion"], "outputs": ["sc"], "method_params": {"occlusion": {"stride": 8}}},
    )
    a, b = compile_rules(config)
    assert (a.methods, a.outputs, [d.name for d in a.destinations]) == (("occlusion",), ("sc",), ["research"])
    assert a.method_params == {"occlusion": {"window": 16}}, "a rule's settings replace the section's per method"
    assert (b.methods, b.outputs, [d.name for d in b.destinations]) == (("gradcam",), ("pm",), ["pacs", "research"])
    assert b.method_params == {"occlusion": {"stride": 8}}


# --- models and pipelines -------------------------------------------------------------------------


def test_each_card_loads_once_and_is_shared_by_the_rules_that_name_it(tmp_path: Path) -> None:
    config = _config(
        [
            {"name": "by-file", "match": {"modality": "CR"}, "model": str(demo_card_path()), "methods": ["gradcam"]},
            {"name": "by-folder", "match": {"modality": "DX"}, "model": str(demo_card_path().parent)},
            {"name": "other", "model": str(shortcut_card_path()), "methods": ["gradcam"]},
            {"name": "default-card", "methods": ["gradcam"]},
        ]
    )
    registry = ModelRegistry()
    try:
        router = Router.build(config, registry)
        models = [target.pipeline.model for target in router.targets]
        assert models[0] is models[1] is models[3], "one DeployedModel per card file"
        assert models[2] is not models[0] and models[2].card.name == "pacs-xai-demo-shortcut"
        assert len(registry.models()) == 2 and len(router.models()) == 2
        pipelines = [target.pipeline for target in router.targets]
        # by-folder runs the card's default methods (gradcam) and outputs: the same pipeline again.
        assert pipelines[0] is pipelines[1] is pipelines[3], "the same card, methods and outputs share one pipeline"
        assert len(router.pipelines()) == 2
        targets, _ = router.route(CHEST_CR)
        assert [t.name for t in targets] == ["by-file"]
    finally:
        registry.close()


def test_a_rule_with_a_missing_card_or_an_unknown_method_is_an_error_naming_the_rule_and_the_value(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "nowhere" / "model.yaml"
    registry = ModelRegistry()
    try:
        with pytest.raises(RouteError, match=r"routes\[1\] \(ct-head\): model card not found: .*nowhere"):
            Router.build(_config([{"name": "chest"}, {"name": "ct-head", "model": str(missing)}]), registry)
        with pytest.raises(RouteError, match=r"routes\[0\] \(chest\): .*'nonsense'"):
            Router.build(_config([{"name": "chest", "methods": ["nonsense"]}]), registry)
    finally:
        registry.close()


def test_check_rules_reports_every_problem_and_warns_about_unreachable_rules(tmp_path: Path) -> None:
    config = _config(
        [
            {"name": "everything", "methods": ["gradcam"]},
            {"name": "ct-head", "match": {"modality": "CT"}, "model": str(tmp_path / "head")},
            {
                "name": "odd",
                "match": {"modality": "CR"},
                "methods": ["occlusion"],
                "method_params": {"occlusion": {"wndow": 3}},
            },
        ]
    )
    check = check_rules(config)
    assert len(check.errors) == 2, check.errors
    assert check.errors[0].startswith("routes[1] (ct-head): model card not found") and "head" in check.errors[0]
    assert check.errors[1].startswith("routes[2] (odd): method 'occlusion'") and "'wndow'" in check.errors[1]
    assert any("routes[0] (everything): matches everything, so the later rules never run" in w for w in check.warnings)
    assert any("routes[0] (everything): takes every modality" in w for w in check.warnings)
    assert [checked.rule.name for checked in check.rules] == ["everything", "odd"]


def test_the_documented_two_model_example_loads_and_routes_as_the_guide_says(tmp_path: Path) -> None:
    guide = (REPO_ROOT / "docs" / "routing.md").read_text(encoding="utf-8")
    (example,) = re.findall(r"```yaml\n(.*?)```", guide, flags=re.DOTALL)
    path = tmp_path / "node.yaml"
    path.write_text(example)
    rules = compile_rules(load_config(path))  # explicit routes: no card is read here
    from_pacs = dataclasses.replace(CHEST_CR, calling_ae_title="PACS", body_part_examined="")
    assert [rule.name for rule in select(rules, from_pacs)] == ["chest-xray", "chest-research"]
    head = dataclasses.replace(CHEST_CR, modality="CT", series_description="Head routine", rows=512, instances=40)
    assert [rule.name for rule in select(rules, head)] == ["head-ct"]
    chest_ct = dataclasses.replace(head, series_description="CHEST ROUTINE")
    assert select(rules, chest_ct) == []
    assert [d.name for d in rules[1].destinations] == ["research"]
    assert rules[0].card_path == rules[1].card_path, "one card file, loaded once"


# --- volume cards ---------------------------------------------------------------------------------


def test_a_volume_card_gets_a_volume_pipeline_and_a_2d_card_a_frame_pipeline() -> None:
    config = _config(
        [
            {"name": "ct", "match": {"modality": "CT"}, "model": str(volume_card_path()), "key_slices": 3},
            {"name": "chest", "match": {"modality": "CR"}},
        ]
    )
    registry = ModelRegistry()
    try:
        router = Router.build(config, registry)
        ct, chest = router.targets
        assert ct.is_volume and isinstance(ct.pipeline, VolumePipeline) and ct.pipeline.key_slices == 3
        assert ct.pipeline.outputs == ("pm", "seg_fractional"), "the card's default outputs"
        assert not chest.is_volume and isinstance(chest.pipeline, ExplainPipeline)
        with pytest.raises(RouteError, match=r"routes\[0\] \(ct\): .*sr.*available"):
            Router.build(_config([{"name": "ct", "model": str(volume_card_path()), "outputs": ["sr"]}]), registry)
        with pytest.raises(RouteError, match=r"routes\[0\] \(chest\): key_slices is for volume models"):
            Router.build(_config([{"name": "chest", "key_slices": 2}]), registry)
    finally:
        registry.close()


def test_check_rules_names_what_a_volume_route_asks_for_that_volumes_do_not_have() -> None:
    config = _config(
        [
            {
                "name": "ct",
                "match": {"modality": "CT"},
                "model": str(volume_card_path()),
                "methods": ["gradcam", "lime"],
                "outputs": ["pm", "sr"],
            },
            {"name": "chest", "match": {"modality": "CR"}, "key_slices": 4},
        ]
    )
    check = check_rules(config)
    assert any(e.startswith("routes[0] (ct): lime cannot explain volumes") for e in check.errors), check.errors
    assert any(e.startswith("routes[0] (ct): output kind(s) ['sr'] not made for volumes") for e in check.errors)
    assert any(e.startswith("routes[1] (chest): key_slices is for volume models") for e in check.errors)
    assert len(check.errors) == 3, check.errors


def test_triton_settings_come_from_model_triton_url_and_leave_the_request_size_to_the_server() -> None:
    assert triton_settings(NodeConfig()) is None  # no URL: the model runs in this process
    config = NodeConfig(
        model={"triton_url": "triton:8001", "triton_timeout_seconds": 12.5}, pool={"max_batch": 48, "max_queue": 96}
    )
    settings = triton_settings(config)
    assert settings is not None
    # pool.max_batch is the in-process pool's; the server's own max_batch_size bounds each request
    assert (settings.url, settings.timeout_seconds, settings.max_batch) == ("triton:8001", 12.5, None)
