"""The node's metrics: a registry per node, and the journal's state read at scrape time. Real journal."""

from __future__ import annotations

from service.node.metrics import STAGES, JournalCollector, create_metrics
from service.node.store import Journal
from tests.unit.service.node.helpers import ROOT_UID, add_output, received_instance, sample


def test_each_node_has_its_own_registry() -> None:
    first, second = create_metrics(), create_metrics()  # no "duplicated timeseries" error
    first.instances_received.labels("stored").inc()
    assert sample(first, "pacsxai_instances_received_total", outcome="stored") == 1
    assert sample(second, "pacsxai_instances_received_total", outcome="stored") == 0


def test_every_stage_takes_a_histogram_series() -> None:
    metrics = create_metrics()
    for stage in STAGES:
        metrics.stage_seconds.labels(stage).observe(0.01)
    assert len(set(STAGES)) == len(STAGES)
    for stage in STAGES:
        assert sample(metrics, "pacsxai_stage_seconds_count", stage=stage) == 1


def test_outbox_depth_dead_letters_and_waiting_instances_are_read_from_the_journal_at_scrape_time(
    journal: Journal,
) -> None:
    metrics = create_metrics()
    metrics.registry.register(JournalCollector(journal.counts))
    for n in (1, 2):
        journal.record_received(received_instance(n))
    journal.mark_processed([f"{ROOT_UID}.3.1"], "done")
    pending, dead, sent = (add_output(journal, n) for n in (1, 2, 3))
    journal.outbox.mark_dead(dead, "PACS", error="refused")
    journal.outbox.mark_sent(sent, "PACS")

    assert sample(metrics, "pacsxai_outbox_depth", state="pending") == 1
    assert sample(metrics, "pacsxai_outbox_depth", state="dead") == 1
    assert sample(metrics, "pacsxai_dead_letters") == 1
    assert sample(metrics, "pacsxai_instances_waiting") == 1

    journal.outbox.retry_dead()  # the next scrape sees the journal as it is now
    assert sample(metrics, "pacsxai_outbox_depth", state="pending") == 2
    assert sample(metrics, "pacsxai_dead_letters") == 0
