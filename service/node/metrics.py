"""Prometheus metrics of the node, in one explicit registry made once at start-up.

Labels carry outcomes, stages, methods, class names, model names, route names, destinations and AE titles,
never patient data. The outbox depth and dead letters are read from the journal when Prometheus scrapes
(a collector), so they are right after a restart too.

Metric names (the dashboard and the alert rules query exactly these; a test checks it):

- ``pacsxai_instances_received_total{outcome}``: stored | quarantined | refused (storage failed)
- ``pacsxai_associations_total{outcome}``: accepted | rejected
- ``pacsxai_instances_processed_total{outcome}``: done | skipped | failed
- ``pacsxai_series_processed_total{outcome}``: done | partial | skipped | failed | deferred (per ready batch;
  deferred: the store failed, e.g. a full disk, or Triton did not answer, and the batch waits to be tried again)
- ``pacsxai_series_routed_total{route}``: ready batches that a routing rule took (an instance each at least)
- ``pacsxai_series_unrouted_total``: ready batches no rule took (logged with UIDs, not kept)
- ``pacsxai_instances_discarded_total{reason}``: instances no rule took, their spool file deleted:
  not_an_image (SR, PR, KOS, RT plan/structures, waveform, PDF) | no_route (an image)
- ``pacsxai_route_instances_total{route,outcome}``: instances through a rule's pipeline: done | skipped | failed
- ``pacsxai_route_seconds{route}``: a rule's pipeline time per instance (prepare to encode); for a
  volume rule, per series
- ``pacsxai_volume_series_skipped_total{route,reason}``: series a volume rule could not explain as one
  volume, by reason (see ``service.node.volume.VOLUME_SKIP_REASONS``: gap, mixed_orientation,
  inconsistent_size, too_few_slices, incomplete, ...)
- ``pacsxai_stage_seconds{stage}``: receive, spool, assemble_wait, read, prepare, infer, trust, explain, encode,
  store, send (read: the instance from the spool; trust: the out-of-distribution and shortcut signals; store:
  outputs encoded into the spool and journaled)
- ``pacsxai_explain_seconds{method}``: explainer time per batch
- ``pacsxai_predictions_total{class_name}``: one per explained frame
- ``pacsxai_explanation_outside_share{model,method}``: histogram of the share (fraction 0..1) of each
  explanation's positive attribution outside the anatomy; its ``_count`` is the number of explanations
- ``pacsxai_explanation_shortcut_suspected_total{model,method}``: explanations flagged "shortcut suspected"
- ``pacsxai_input_out_of_distribution_total{model}``: frames flagged "input out of distribution"
- ``pacsxai_outputs_total{destination,outcome}``: sent | retry | dead
- ``pacsxai_outbox_depth{state}``: pending | dead (from the journal)
- ``pacsxai_dead_letters``: outputs in the dead letter (from the journal)
- ``pacsxai_pool_batch_size``, ``pacsxai_pool_queue_depth``: the inference pool
- ``pacsxai_model_info{name,version,device}``: 1
- ``pacsxai_last_instance_received_timestamp_seconds``

A node of several processes (:mod:`service.node.supervisor`) uses prometheus-client's
multiprocess mode: each process writes its metrics to files in ``PROMETHEUS_MULTIPROC_DIR`` (set
in its environment before it starts), and the supervisor serves :func:`multiprocess_registry`,
which sums counters and histograms over the processes, so names and labels are those of one
process and the dashboard is unchanged. The gauges say how they combine (``multiprocess_mode``:
the model info and the last arrival take the maximum, the pool queue depth the sum over live
processes); that setting is ignored by a single process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from service.inference.pool import PoolMetrics

#: Latency buckets in seconds: from 1 ms (spooling) to 2 min (a slow perturbation method).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: Every ``stage`` label of ``pacsxai_stage_seconds``, in data-flow order (the module docstring says what each times).
STAGES = (
    "receive",
    "spool",
    "assemble_wait",
    "read",
    "prepare",
    "infer",
    "trust",
    "explain",
    "encode",
    "store",
    "send",
)
#: Buckets of the share of positive attribution outside the anatomy (fraction 0..1).
SHARE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass(frozen=True)
class NodeMetrics:
    """Every metric the node exports, bound to ``registry``."""

    registry: CollectorRegistry
    instances_received: Counter
    associations: Counter
    instances_processed: Counter
    series_processed: Counter
    stage_seconds: Histogram
    explain_seconds: Histogram
    predictions: Counter
    explanation_outside_share: Histogram
    explanation_shortcut_suspected: Counter
    input_out_of_distribution: Counter
    outputs: Counter
    pool: PoolMetrics
    model_info: Gauge
    last_received: Gauge
    series_routed: Counter
    series_unrouted: Counter
    instances_discarded: Counter
    route_instances: Counter
    route_seconds: Histogram
    volume_series_skipped: Counter


def create_metrics(registry: CollectorRegistry | None = None) -> NodeMetrics:
    """Create the node's metrics in ``registry`` (a new one by default); call once per node."""
    registry = registry or CollectorRegistry()
    return NodeMetrics(
        registry=registry,
        instances_received=Counter(
            "pacsxai_instances_received", "Instances received by C-STORE, by outcome.", ["outcome"], registry=registry
        ),
        associations=Counter(
            "pacsxai_associations", "Associations requested, by outcome.", ["outcome"], registry=registry
        ),
        instances_processed=Counter(
            "pacsxai_instances_processed", "Instances through the pipeline, by outcome.", ["outcome"], registry=registry
        ),
        series_processed=Counter(
            "pacsxai_series_processed", "Ready series batches processed, by outcome.", ["outcome"], registry=registry
        ),
        stage_seconds=Histogram(
            "pacsxai_stage_seconds", "Time per stage, seconds.", ["stage"], buckets=LATENCY_BUCKETS, registry=registry
        ),
        explain_seconds=Histogram(
            "pacsxai_explain_seconds",
            "Explainer time per batch, seconds.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ),
        predictions=Counter("pacsxai_predictions", "Predicted classes.", ["class_name"], registry=registry),
        explanation_outside_share=Histogram(
            "pacsxai_explanation_outside_share",
            "Share (0..1) of each explanation's positive attribution outside the anatomy.",
            ["model", "method"],
            buckets=SHARE_BUCKETS,
            registry=registry,
        ),
        explanation_shortcut_suspected=Counter(
            "pacsxai_explanation_shortcut_suspected",
            "Explanations flagged 'shortcut suspected' (attribution concentrated outside the anatomy).",
            ["model", "method"],
            registry=registry,
        ),
        input_out_of_distribution=Counter(
            "pacsxai_input_out_of_distribution",
            "Input frames flagged 'out of distribution' (unlike the model's training data).",
            ["model"],
            registry=registry,
        ),
        outputs=Counter(
            "pacsxai_outputs",
            "Output objects per destination, by outcome.",
            ["destination", "outcome"],
            registry=registry,
        ),
        pool=PoolMetrics(
            batch_size=Histogram(
                "pacsxai_pool_batch_size",
                "Images per forward pass of the inference pool.",
                buckets=BATCH_BUCKETS,
                registry=registry,
            ),
            queue_depth=Gauge(
                "pacsxai_pool_queue_depth",
                "Requests waiting in the inference pool.",
                registry=registry,
                multiprocess_mode="livesum",
            ),
        ),
        model_info=Gauge(
            "pacsxai_model_info",
            "The deployed model.",
            ["name", "version", "device"],
            registry=registry,
            multiprocess_mode="max",
        ),
        last_received=Gauge(
            "pacsxai_last_instance_received_timestamp_seconds",
            "Unix time of the last stored instance.",
            registry=registry,
            multiprocess_mode="max",
        ),
        series_routed=Counter(
            "pacsxai_series_routed",
            "Ready series batches a routing rule took, by rule.",
            ["route"],
            registry=registry,
        ),
        series_unrouted=Counter(
            "pacsxai_series_unrouted", "Ready series batches no routing rule took (not kept).", registry=registry
        ),
        instances_discarded=Counter(
            "pacsxai_instances_discarded",
            "Instances no routing rule took, deleted from the spool, by reason (not_an_image | no_route).",
            ["reason"],
            registry=registry,
        ),
        route_instances=Counter(
            "pacsxai_route_instances",
            "Instances through a routing rule's pipeline, by rule and outcome.",
            ["route", "outcome"],
            registry=registry,
        ),
        route_seconds=Histogram(
            "pacsxai_route_seconds",
            "A routing rule's pipeline time per instance (per series for a volume rule), seconds.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ),
        volume_series_skipped=Counter(
            "pacsxai_volume_series_skipped",
            "Series a volume routing rule could not explain as one volume, by rule and reason.",
            ["route", "reason"],
            registry=registry,
        ),
    )


def multiprocess_registry(directory: Path, journal_counts: Callable[[], dict[str, int]]) -> CollectorRegistry:
    """What the supervisor of a multi-process node serves on /metrics: every process's metrics from
    ``directory`` (their ``PROMETHEUS_MULTIPROC_DIR``), combined, and the journal's gauges."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    registry.register(JournalCollector(journal_counts))
    return registry


class JournalCollector(Collector):
    """Outbox depth and dead letters, read from the journal at scrape time."""

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self._counts()
        depth = GaugeMetricFamily("pacsxai_outbox_depth", "Output objects in the outbox, by state.", labels=["state"])
        depth.add_metric(["pending"], counts.get("outbox_pending", 0))
        depth.add_metric(["dead"], counts.get("outbox_dead", 0))
        yield depth
        yield GaugeMetricFamily(
            "pacsxai_dead_letters", "Outputs in the dead letter.", value=counts.get("outbox_dead", 0)
        )
        yield GaugeMetricFamily(
            "pacsxai_instances_waiting",
            "Instances journaled and not yet processed.",
            value=counts.get("instances_received", 0),
        )
