"""The series processor: a ready batch read from the spool, explained by the real demo model, its
outputs written to the spool and journaled per destination, each instance marked with its outcome.

Real phantoms (service.synthetic.phantoms) and pydicom test files in a real spool and journal.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from service.inference.deployed import DeployedModel
from service.inference.triton import TritonUnavailableError
from service.models import demo_card_path, shortcut_card_path, volume_card_path
from service.node.app import restore_unfinished
from service.node.assembler import Assembler, SeriesKey
from service.node.config import DestinationConfig, load_config
from service.node.metrics import STAGES, NodeMetrics
from service.node.pipeline import ExplainPipeline
from service.node.processor import SeriesProcessor
from service.node.routing import ModelRegistry, Router
from service.node.store import Journal, ReceivedInstance, Spool
from service.synthetic.phantoms import make_phantom
from service.synthetic.volumes import ct_series, make_ct_phantom
from tests.helpers import data_file
from tests.unit.service.node.helpers import ROOT_UID, FakeClock, non_image_dataset, sample

STUDY = f"{ROOT_UID}.50"
SERIES = f"{ROOT_UID}.50.1"
#: Each destination asks for some of the pipeline's output kinds (None: all of them).
DESTINATIONS = (
    DestinationConfig(name="pacs", ae_title="PACS", host="127.0.0.1", port=104, outputs=("sc",)),
    DestinationConfig(name="research", ae_title="SLICER", host="127.0.0.1", port=105, outputs=("pm", "sr")),
    DestinationConfig(name="archive", ae_title="ARCHIVE", host="127.0.0.1", port=106),
)
KINDS_PER_DESTINATION = {"pacs": ["sc"], "research": ["pm", "sr"], "archive": ["pm", "sc", "sr"]}


@pytest.fixture(scope="module")
def pipeline() -> Iterator[ExplainPipeline]:
    model = DeployedModel.from_card_path(demo_card_path())
    yield ExplainPipeline(model, ["gradcam"], ["sc", "pm", "sr"])
    model.close()


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


@pytest.fixture()
def processor(
    pipeline: ExplainPipeline, spool: Spool, journal: Journal, metrics: NodeMetrics, clock: FakeClock
) -> SeriesProcessor:
    return SeriesProcessor(pipeline, spool, journal, DESTINATIONS, metrics, clock=clock)


def _encode(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _receive(spool: Spool, journal: Journal, encoded: bytes, received_at: float) -> ReceivedInstance:
    """What the receiver does with a stored instance: spool file, then journal row."""
    ds = pydicom.dcmread(BytesIO(encoded), stop_before_pixels=True)
    path = spool.write_instance(
        encoded, study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID, sop_uid=ds.SOPInstanceUID
    )
    instance = ReceivedInstance(
        ds.SOPInstanceUID, ds.SOPClassUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, path, "MODALITY", "a", received_at
    )
    journal.record_received(instance)
    return instance


def _phantom(index: int) -> bytes:
    label = ("nodule", "normal", "effusion")[index % 3]
    return _encode(make_phantom(index, label, rows=128, cols=128, study_uid=STUDY, series_uid=SERIES).dataset)


def _outputs_by_source(journal: Journal) -> dict[str, list[tuple[str, str]]]:
    """``source SOP Instance UID -> sorted (destination, kind)`` of every outbox row."""
    rows: dict[str, list[tuple[str, str]]] = {}
    for entry in journal.outbox.entries(("pending", "sent", "dead")):
        rows.setdefault(entry.source_sop_instance_uid, []).append((entry.destination, entry.kind))
    return {source: sorted(pairs) for source, pairs in rows.items()}


def _expected_rows() -> list[tuple[str, str]]:
    return sorted((name, kind) for name, kinds in KINDS_PER_DESTINATION.items() for kind in kinds)


def _recorded_stages(metrics: NodeMetrics) -> set[str]:
    return {
        s.labels["stage"]
        for family in metrics.registry.collect()
        if family.name == "pacsxai_stage_seconds"
        for s in family.samples
        if s.name.endswith("_count") and s.value > 0
    }


def test_a_ready_batch_journals_its_outputs_for_each_destination_with_the_kinds_it_asks_for(
    processor: SeriesProcessor, spool: Spool, journal: Journal, metrics: NodeMetrics, clock: FakeClock
) -> None:
    instances = [_receive(spool, journal, _phantom(index), received_at=clock.now - 2.0) for index in range(2)]

    assert processor.process_batch(SeriesKey(STUDY, SERIES), instances) == {"done": 2, "skipped": 0, "failed": 0}

    by_source = _outputs_by_source(journal)
    assert by_source == {instance.sop_instance_uid: _expected_rows() for instance in instances}
    for entry in journal.outbox.entries(("pending",)):
        output = pydicom.dcmread(entry.path)  # one file in the spool's outbox, shared by its destinations
        assert entry.path.parent == spool.outbox_dir
        assert output.SOPInstanceUID == entry.sop_instance_uid and output.StudyInstanceUID == STUDY
        assert (entry.method, entry.state, entry.attempts) == ("gradcam", "pending", 0)
    for instance in instances:
        assert journal.instance_state(instance.sop_instance_uid) == ("done", "")
    assert journal.pending_instances() == []

    assert sample(metrics, "pacsxai_instances_processed_total", outcome="done") == 2
    assert sample(metrics, "pacsxai_series_processed_total", outcome="done") == 1
    assert sample(metrics, "pacsxai_explain_seconds_count", method="gradcam") == 2
    predicted = [s for f in metrics.registry.collect() if f.name == "pacsxai_predictions" for s in f.samples]
    assert sum(s.value for s in predicted if s.name.endswith("_total")) == 2
    assert sample(metrics, "pacsxai_stage_seconds_sum", stage="assemble_wait") == 2.0
    for stage in ("read", "prepare", "infer", "trust", "explain", "encode", "store"):
        assert sample(metrics, "pacsxai_stage_seconds_count", stage=stage) == 2, stage
    labels = {"model": "pacs-xai-demo-chest", "method": "gradcam"}
    assert sample(metrics, "pacsxai_explanation_outside_share_count", **labels) == 2
    assert 0 < sample(metrics, "pacsxai_explanation_outside_share_sum", **labels) < 2 * 0.55
    assert sample(metrics, "pacsxai_explanation_shortcut_suspected_total", **labels) == 0
    recorded = _recorded_stages(metrics)
    assert recorded <= set(STAGES), f"stages recorded but not in metrics.STAGES: {sorted(recorded - set(STAGES))}"


def test_the_sender_is_woken_after_each_commit_of_outputs_and_only_then(
    pipeline: ExplainPipeline, spool: Spool, journal: Journal, metrics: NodeMetrics, clock: FakeClock
) -> None:
    """Each instance's outputs can leave as soon as they are in the outbox: the wake-up comes once
    per instance that queued outputs, each time after its rows are pending; none for a skipped one."""
    pending_at_wake: list[int] = []

    def wake() -> None:
        pending_at_wake.append(len(journal.outbox.entries(("pending",))))

    processor = SeriesProcessor(pipeline, spool, journal, DESTINATIONS, metrics, clock=clock, outputs_queued=wake)
    instances = [_receive(spool, journal, _phantom(index), received_at=clock.now - 2.0) for index in range(2)]
    processor.process_batch(SeriesKey(STUDY, SERIES), instances)
    per_instance = len(_expected_rows())
    assert pending_at_wake == [per_instance, 2 * per_instance]

    ct = _receive(spool, journal, Path(data_file("CT_small.dcm")).read_bytes(), received_at=clock.now)
    processor.process_batch(SeriesKey(ct.study_instance_uid, ct.series_instance_uid), [ct])
    assert len(pending_at_wake) == 2, "a skipped instance queued nothing: no wake-up"


def test_an_image_outside_the_cards_applies_to_is_skipped_with_the_reason(
    processor: SeriesProcessor, spool: Spool, journal: Journal, metrics: NodeMetrics, clock: FakeClock
) -> None:
    ct = _receive(spool, journal, Path(data_file("CT_small.dcm")).read_bytes(), received_at=clock.now)
    key = SeriesKey(ct.study_instance_uid, ct.series_instance_uid)

    assert processor.process_batch(key, [ct]) == {"done": 0, "skipped": 1, "failed": 0}

    state, reason = journal.instance_state(ct.sop_instance_uid)
    assert state == "skipped" and "modality CT" in reason, reason
    assert journal.outbox.entries(("pending", "sent", "dead")) == [] and list(spool.outbox_dir.iterdir()) == []
    assert sample(metrics, "pacsxai_instances_processed_total", outcome="skipped") == 1
    assert sample(metrics, "pacsxai_series_processed_total", outcome="skipped") == 1


def test_an_unreadable_spool_file_fails_with_the_reason_and_the_rest_of_the_batch_is_processed(
    processor: SeriesProcessor, spool: Spool, journal: Journal, metrics: NodeMetrics, clock: FakeClock
) -> None:
    first, damaged, last = (_receive(spool, journal, _phantom(index), received_at=clock.now) for index in range(3))
    whole = damaged.path.read_bytes()
    damaged.path.write_bytes(whole[: len(whole) // 2])  # the disk lost the second half

    tally = processor.process_batch(SeriesKey(STUDY, SERIES), [first, damaged, last])

    assert tally == {"done": 2, "skipped": 0, "failed": 1}
    state, reason = journal.instance_state(damaged.sop_instance_uid)
    assert state == "failed" and str(damaged.path) in reason and "truncated" in reason, reason
    assert not reason.startswith("internal error"), "a damaged file is the input's fault, not a node bug"
    assert _outputs_by_source(journal) == {
        first.sop_instance_uid: _expected_rows(),
        last.sop_instance_uid: _expected_rows(),
    }
    assert (
        journal.instance_state(first.sop_instance_uid) == journal.instance_state(last.sop_instance_uid) == ("done", "")
    )
    assert sample(metrics, "pacsxai_instances_processed_total", outcome="failed") == 1
    assert sample(metrics, "pacsxai_series_processed_total", outcome="partial") == 1


def test_a_triton_server_away_leaves_the_rest_of_the_batch_received_for_later_not_failed(
    processor: SeriesProcessor,
    pipeline: ExplainPipeline,
    spool: Spool,
    journal: Journal,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Triton stopped or restarting is no fault of the instance: journaling it failed would lose its
    result. The batch stops there; what was done stays done, the rest stays ``received``."""
    first, second, third = (_receive(spool, journal, _phantom(index), received_at=clock.now) for index in range(3))
    process = ExplainPipeline.process
    calls = []

    def away_on_the_second(self: ExplainPipeline, ds: Dataset):  # noqa: ANN202
        calls.append(ds.SOPInstanceUID)
        if len(calls) == 2:
            raise TritonUnavailableError("Triton at 127.0.0.1:1 did not answer a request to x after 5 attempts")
        return process(self, ds)

    monkeypatch.setattr(ExplainPipeline, "process", away_on_the_second)
    with pytest.raises(TritonUnavailableError):
        processor.process_batch(SeriesKey(STUDY, SERIES), [first, second, third])
    assert journal.instance_state(first.sop_instance_uid) == ("done", "")
    assert journal.instance_state(second.sop_instance_uid)[0] == "received"
    assert journal.instance_state(third.sop_instance_uid)[0] == "received"

    # The server is back: the same instances, tried again, are done; nothing is journaled twice.
    rest = journal.get_instances([second.sop_instance_uid, third.sop_instance_uid])
    assert processor.process_batch(SeriesKey(STUDY, SERIES), rest) == {"done": 2, "skipped": 0, "failed": 0}
    assert _outputs_by_source(journal) == {i.sop_instance_uid: _expected_rows() for i in (first, second, third)}


def test_flagged_results_are_counted_by_model_and_method(
    spool: Spool, journal: Journal, metrics: NodeMetrics, clock: FakeClock
) -> None:
    """The cheating model on a token-carrying nodule (shortcut suspected) and a CT forced through it
    (input out of distribution): each flag is one count, labelled with the model and method only."""
    model = DeployedModel.from_card_path(shortcut_card_path())
    try:
        pipeline = ExplainPipeline(model, ["gradcam"], ["sc"], enforce_applies_to=False)
        processor = SeriesProcessor(pipeline, spool, journal, DESTINATIONS, metrics, clock=clock)
        token = make_phantom(4, "nodule", seed=424242, token=True, study_uid=STUDY, series_uid=SERIES).dataset
        ct = pydicom.dcmread(data_file("CT_small.dcm"))
        instances = [_receive(spool, journal, _encode(ds), clock.now) for ds in (token, ct)]
        assert processor.process_batch(SeriesKey(STUDY, SERIES), instances)["done"] == 2
    finally:
        model.close()
    labels = {"model": "pacs-xai-demo-shortcut", "method": "gradcam"}
    assert sample(metrics, "pacsxai_explanation_outside_share_count", **labels) == 2
    assert sample(metrics, "pacsxai_explanation_shortcut_suspected_total", **labels) >= 1
    assert sample(metrics, "pacsxai_input_out_of_distribution_total", model="pacs-xai-demo-shortcut") == 1
    families = {f.name: f for f in metrics.registry.collect()}
    for name in ("pacsxai_explanation_outside_share", "pacsxai_explanation_shortcut_suspected"):
        for metric_sample in families[name].samples:
            assert set(metric_sample.labels) - {"le"} == {"model", "method"}
    for metric_sample in families["pacsxai_input_out_of_distribution"].samples:
        assert set(metric_sample.labels) == {"model"}


# --- routing --------------------------------------------------------------------------------------

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"


def _routed_processor(
    pipeline: ExplainPipeline, routes: list[dict], spool: Spool, journal: Journal, metrics: NodeMetrics, clock
) -> SeriesProcessor:
    """A processor with ``routes`` over the three destinations, sharing the module's demo model."""
    config = load_config(None, {"routes": routes, "destinations": [d.model_dump() for d in DESTINATIONS]})
    registry = ModelRegistry()
    registry.add(demo_card_path(), pipeline.model)
    return SeriesProcessor(Router.build(config, registry), spool, journal, (), metrics, clock=clock)


@pytest.mark.parametrize(
    ("make", "reason", "journaled"),
    [
        (lambda: pydicom.dcmread(data_file("CT_small.dcm")), "no_route", "chest: Modality 'CT' does not match 'CR|DX'"),
        (lambda: non_image_dataset(BASIC_TEXT_SR, "SR"), "not_an_image", "chest: Rows absent - not an image"),
        (lambda: non_image_dataset(ENCAPSULATED_PDF, "DOC"), "not_an_image", "chest: Rows absent - not an image"),
    ],
    ids=["ct-image", "sr", "pdf"],
)
def test_a_series_no_route_takes_is_journaled_with_the_reason_deleted_and_counted(
    pipeline: ExplainPipeline,
    spool: Spool,
    journal: Journal,
    metrics: NodeMetrics,
    clock: FakeClock,
    make,
    reason: str,
    journaled: str,
) -> None:
    processor = _routed_processor(
        pipeline, [{"name": "chest", "match": {"modality": "CR|DX"}}], spool, journal, metrics, clock
    )
    instance = _receive(spool, journal, _encode(make()), received_at=clock.now)
    key = SeriesKey(instance.study_instance_uid, instance.series_instance_uid)

    assert processor.process_batch(key, [instance]) == {"done": 0, "skipped": 1, "failed": 0}

    state, why = journal.instance_state(instance.sop_instance_uid)
    assert state == "skipped" and why.startswith(f"not routed: {journaled}"), why
    assert not instance.path.exists(), "what no route takes is not kept"
    assert journal.outbox.entries(("pending", "sent", "dead")) == []
    assert sample(metrics, "pacsxai_series_unrouted_total") == 1
    assert sample(metrics, "pacsxai_instances_discarded_total", reason=reason) == 1
    assert sample(metrics, "pacsxai_instances_processed_total", outcome="skipped") == 1
    assert sample(metrics, "pacsxai_route_instances_total", route="chest", outcome="done") == 0


def test_a_copy_resent_while_its_first_copy_was_found_unrouted_keeps_its_file(
    pipeline: ExplainPipeline, spool: Spool, journal: Journal, metrics: NodeMetrics, clock: FakeClock
) -> None:
    """The journal row is the authority: a newer copy (received after the batch was read) stays
    ``received`` for its follow-up, and its file stays in the spool."""
    processor = _routed_processor(
        pipeline, [{"name": "chest", "match": {"modality": "CR"}}], spool, journal, metrics, clock
    )
    encoded = _encode(non_image_dataset(BASIC_TEXT_SR, "SR"))
    first = _receive(spool, journal, encoded, received_at=clock.now)
    _receive(spool, journal, encoded, received_at=clock.now + 1)  # the re-sent copy, same path

    processor.process_batch(SeriesKey(first.study_instance_uid, first.series_instance_uid), [first])

    assert journal.instance_state(first.sop_instance_uid) == ("received", "")
    assert first.path.exists()


def test_a_copy_resent_while_its_first_copy_was_explained_stays_received_without_the_old_outputs(
    pipeline: ExplainPipeline, spool: Spool, journal: Journal, metrics: NodeMetrics, clock: FakeClock
) -> None:
    """The batch read the first copy; a second copy arrived before the outputs' commit: the outcome
    and outputs belong to the old copy, so neither is journaled (the follow-up explains the new one),
    nothing is counted as processed and the sender is not woken."""
    wakes: list[int] = []
    processor = SeriesProcessor(
        pipeline, spool, journal, DESTINATIONS, metrics, clock=clock, outputs_queued=lambda: wakes.append(1)
    )
    encoded = _phantom(0)
    first = _receive(spool, journal, encoded, received_at=clock.now)
    _receive(spool, journal, encoded, received_at=clock.now + 1)

    assert processor.process_batch(SeriesKey(STUDY, SERIES), [first]) == {"done": 0, "skipped": 0, "failed": 0}

    assert journal.instance_state(first.sop_instance_uid) == ("received", "")
    assert journal.outbox.entries(("pending",)) == []
    assert wakes == [] and sample(metrics, "pacsxai_instances_processed_total", outcome="done") == 0


def test_continue_runs_every_route_that_takes_an_instance_each_to_its_own_destinations(
    pipeline: ExplainPipeline, spool: Spool, journal: Journal, metrics: NodeMetrics, clock: FakeClock
) -> None:
    routes = [
        {
            "name": "research",
            "match": {"modality": "CR"},
            "outputs": ["pm"],
            "destinations": ["research"],
            "continue": True,
        },
        {"name": "chest", "match": {"modality": "CR|DX"}, "outputs": ["sc"], "destinations": ["pacs"]},
        {"name": "never", "outputs": ["sr"], "destinations": ["archive"]},
    ]
    processor = _routed_processor(pipeline, routes, spool, journal, metrics, clock)
    cr = _receive(spool, journal, _phantom(0), received_at=clock.now)
    sr = _receive(
        spool, journal, _encode(non_image_dataset(BASIC_TEXT_SR, "SR", study_uid=STUDY, series_uid=SERIES)), clock.now
    )

    assert processor.process_batch(SeriesKey(STUDY, SERIES), [cr, sr]) == {"done": 1, "skipped": 1, "failed": 0}

    assert _outputs_by_source(journal) == {cr.sop_instance_uid: [("pacs", "sc"), ("research", "pm")]}
    assert journal.instance_state(cr.sop_instance_uid) == ("done", "") and cr.path.exists()
    assert journal.instance_state(sr.sop_instance_uid)[0] == "skipped" and not sr.path.exists()
    assert "never" in journal.instance_state(sr.sop_instance_uid)[1], "the SR went past every rule"
    for route in ("research", "chest"):
        assert sample(metrics, "pacsxai_series_routed_total", route=route) == 1
        assert sample(metrics, "pacsxai_route_instances_total", route=route, outcome="done") == 1
        assert sample(metrics, "pacsxai_route_seconds_count", route=route) == 1
    assert sample(metrics, "pacsxai_series_routed_total", route="never") == 0
    assert sample(metrics, "pacsxai_series_unrouted_total") == 0, "the series was routed; only the SR was not"
    assert sample(metrics, "pacsxai_instances_discarded_total", reason="not_an_image") == 1


def test_a_rule_on_the_instance_count_reads_the_whole_series_so_far_not_only_the_batch(
    pipeline: ExplainPipeline, spool: Spool, journal: Journal, metrics: NodeMetrics, clock: FakeClock
) -> None:
    """A follow-up batch of one instance belongs to a series of three: a rule asking for at least
    three takes it; with two instances journaled, nothing is taken."""
    routes = [{"name": "series-of-3", "match": {"instances": {"min": 3}}, "outputs": ["sc"], "destinations": ["pacs"]}]
    processor = _routed_processor(pipeline, routes, spool, journal, metrics, clock)
    first, second = (_receive(spool, journal, _phantom(index), received_at=clock.now) for index in range(2))
    assert processor.process_batch(SeriesKey(STUDY, SERIES), [second]) == {"done": 0, "skipped": 1, "failed": 0}
    assert "instances in the series 2 is not >= 3" in journal.instance_state(second.sop_instance_uid)[1]
    third = _receive(spool, journal, _phantom(2), received_at=clock.now)
    assert processor.process_batch(SeriesKey(STUDY, SERIES), [third]) == {"done": 1, "skipped": 0, "failed": 0}
    assert _outputs_by_source(journal) == {third.sop_instance_uid: [("pacs", "sc")]}


# --- volume routes ----------------------------------------------------------------------------------

#: A CT phantom small enough to explain in well under a second (the card resamples it to 48³).
CT_SHAPE = (20, 40, 40)
CT_SPACING = (5.0, 8.0, 8.0)
VOLUME_ROUTES = [
    {
        "name": "ct-volume",
        "match": {"modality": "CT"},
        "model": str(volume_card_path()),
        "methods": ["gradcam"],
        "outputs": ["pm", "seg_fractional", "sc"],
        "key_slices": 2,
        "destinations": ["research", "pacs"],
    },
    {"name": "chest", "match": {"modality": "CR|DX"}, "outputs": ["sc"], "destinations": ["pacs"]},
]


@pytest.fixture(scope="module")
def volume_model() -> Iterator[DeployedModel]:
    model = DeployedModel.from_card_path(volume_card_path())
    yield model
    model.close()


def _volume_processor(
    pipeline: ExplainPipeline, volume_model: DeployedModel, spool: Spool, journal: Journal, metrics, clock
) -> SeriesProcessor:
    config = load_config(None, {"routes": VOLUME_ROUTES, "destinations": [d.model_dump() for d in DESTINATIONS]})
    registry = ModelRegistry()
    registry.add(demo_card_path(), pipeline.model)
    registry.add(volume_card_path(), volume_model)
    return SeriesProcessor(Router.build(config, registry), spool, journal, (), metrics, clock=clock)


def _ct_batch(spool: Spool, journal: Journal, clock: FakeClock, *, drop: int | None = None) -> list[ReceivedInstance]:
    """A phantom chest CT series received into the spool and journal (slice ``drop`` left out: a gap)."""
    phantom = make_ct_phantom(1, "nodule", shape=CT_SHAPE, spacing=CT_SPACING)
    datasets = ct_series(phantom, study_uid=STUDY, series_uid=f"{SERIES}.{drop or 0}")
    return [_receive(spool, journal, _encode(ds), clock.now) for k, ds in enumerate(datasets) if k != drop]


def test_a_volume_route_explains_the_series_once_and_journals_every_instance_with_its_outputs(
    pipeline: ExplainPipeline,
    volume_model: DeployedModel,
    spool: Spool,
    journal: Journal,
    metrics: NodeMetrics,
    clock: FakeClock,
) -> None:
    processor = _volume_processor(pipeline, volume_model, spool, journal, metrics, clock)
    instances = _ct_batch(spool, journal, clock)
    key = SeriesKey(STUDY, instances[0].series_instance_uid)

    assert processor.process_batch(key, instances) == {"done": CT_SHAPE[0], "skipped": 0, "failed": 0}

    entries = journal.outbox.entries(("pending",))
    # research asks for pm and sr, pacs for sc: the SEG goes nowhere, so it is not queued
    assert sorted((e.destination, e.kind) for e in entries) == [("pacs", "sc"), ("pacs", "sc"), ("research", "pm")]
    assert {e.source_sop_instance_uid for e in entries} == {instances[0].sop_instance_uid}
    sources = {instance.sop_instance_uid for instance in instances}
    pm = pydicom.dcmread(next(e.path for e in entries if e.kind == "pm"))
    assert int(pm.NumberOfFrames) == CT_SHAPE[0] and pm.StudyInstanceUID == STUDY
    assert {item.ReferencedSOPInstanceUID for item in pm.SourceImageSequence} == sources
    for instance in instances:
        assert journal.instance_state(instance.sop_instance_uid) == ("done", "")
    assert sample(metrics, "pacsxai_route_instances_total", route="ct-volume", outcome="done") == CT_SHAPE[0]
    assert sample(metrics, "pacsxai_route_seconds_count", route="ct-volume") == 1, "one volume, one pass"
    assert sample(metrics, "pacsxai_series_processed_total", outcome="done") == 1
    assert sample(metrics, "pacsxai_explain_seconds_count", method="gradcam") == 1

    # processed again (a resend of the whole series): the same objects, queued once per destination
    for instance in instances:
        journal.record_received(instance)
    processor.process_batch(key, instances)
    assert sorted(e.sop_instance_uid for e in journal.outbox.entries(("pending",))) == sorted(
        e.sop_instance_uid for e in entries
    )


def test_a_volume_whose_slice_was_resent_during_its_processing_leaves_the_whole_series_received(
    pipeline: ExplainPipeline,
    volume_model: DeployedModel,
    spool: Spool,
    journal: Journal,
    metrics: NodeMetrics,
    clock: FakeClock,
) -> None:
    processor = _volume_processor(pipeline, volume_model, spool, journal, metrics, clock)
    instances = _ct_batch(spool, journal, clock)
    resent = instances[1]
    journal.record_received(dataclasses.replace(resent, received_at=resent.received_at + 1))

    processor.process_batch(SeriesKey(STUDY, instances[0].series_instance_uid), instances)

    assert {journal.instance_state(i.sop_instance_uid) for i in instances} == {("received", "")}
    assert journal.outbox.entries(("pending",)) == []


def test_the_single_process_node_takes_such_a_volume_again_whole_with_the_resent_copy(
    pipeline: ExplainPipeline,
    volume_model: DeployedModel,
    spool: Spool,
    journal: Journal,
    metrics: NodeMetrics,
    clock: FakeClock,
) -> None:
    """As the node's processing loop does (service/node/app.py): the batch is taken from the
    assembler, a slice is re-sent while it runs (journal, then the assembler, as the receiver
    does), and what is still received after the batch is put back: the next batch is the whole
    series, explained once; before, the re-sent slice came alone and the rest waited for ever."""
    processor = _volume_processor(pipeline, volume_model, spool, journal, metrics, clock)
    assembler = Assembler(idle_seconds=1.0, max_wait_seconds=100.0, clock=clock)
    instances = _ct_batch(spool, journal, clock)
    key = SeriesKey(STUDY, instances[0].series_instance_uid)
    for instance in instances:
        assembler.instance_arrived(key, instance.sop_instance_uid, "assoc-1")
    assembler.association_ended("assoc-1")
    clock.now += 2
    ((taken, uids),) = assembler.take_ready()
    batch = journal.get_instances(uids)
    resent = dataclasses.replace(instances[1], received_at=clock.now, association_id="assoc-2")
    journal.record_received(resent)
    assembler.instance_arrived(key, resent.sop_instance_uid, "assoc-2")
    assembler.association_ended("assoc-2")
    processor.process_batch(taken, batch)

    assert restore_unfinished(assembler, journal, taken, uids) == len(instances)
    clock.now += 2
    ((again, again_uids),) = assembler.take_ready()
    assert sorted(again_uids) == sorted(i.sop_instance_uid for i in instances)
    processor.process_batch(again, journal.get_instances(again_uids))
    assert {journal.instance_state(i.sop_instance_uid)[0] for i in instances} == {"done"}
    assert restore_unfinished(assembler, journal, again, again_uids) == 0 and assembler.pending() == 0


@pytest.mark.parametrize("split", [False, True], ids=["gap", "incomplete"])
def test_a_series_that_cannot_be_one_volume_is_skipped_whole_with_its_reason_and_counted(
    pipeline: ExplainPipeline,
    volume_model: DeployedModel,
    spool: Spool,
    journal: Journal,
    metrics: NodeMetrics,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
    split: bool,
) -> None:
    """A gap in the slices, or a series whose first instances came in an earlier batch: every
    instance skipped (not failed) with the reason, nothing queued, the reason counted."""
    processor = _volume_processor(pipeline, volume_model, spool, journal, metrics, clock)
    instances = _ct_batch(spool, journal, clock, drop=None if split else 7)
    batch = instances[5:] if split else instances
    if split:
        journal.mark_processed([i.sop_instance_uid for i in instances[:5]], "done")
    key = SeriesKey(STUDY, instances[0].series_instance_uid)

    with caplog.at_level(logging.WARNING, logger="service.node.processor"):
        assert processor.process_batch(key, batch) == {"done": 0, "skipped": len(batch), "failed": 0}

    reason = "incomplete" if split else "gap"
    words = "came in more than one batch" if split else "gap"
    for instance in batch:
        state, why = journal.instance_state(instance.sop_instance_uid)
        assert state == "skipped" and words in why and "route ct-volume" in why, why
    assert journal.outbox.entries(("pending", "sent", "dead")) == []
    assert sample(metrics, "pacsxai_volume_series_skipped_total", route="ct-volume", reason=reason) == 1
    assert sample(metrics, "pacsxai_route_instances_total", route="ct-volume", outcome="skipped") == len(batch)
    logged = [r.getMessage() for r in caplog.records if "volume route ct-volume" in r.getMessage()]
    assert len(logged) == 1 and key.series_instance_uid in logged[0] and "PHANTOM" not in logged[0]
