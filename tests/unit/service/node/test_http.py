"""The node's HTTP endpoints over real HTTP on 127.0.0.1: /metrics, /healthz, /readyz."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from service.node.http import HealthServer
from service.node.metrics import NodeMetrics, create_metrics


class Readiness:
    """A readiness check whose answer the test sets."""

    def __init__(self) -> None:
        self.answer = (True, "ready")

    def __call__(self) -> tuple[bool, str]:
        return self.answer


@dataclass(frozen=True)
class Served:
    """One HealthServer for the module (stopping one waits for its 0.5 s poll), with what it serves."""

    url: str
    metrics: NodeMetrics
    readiness: Readiness


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    metrics, readiness = create_metrics(), Readiness()
    server = HealthServer(metrics.registry, readiness, bind="127.0.0.1", port=0)
    server.start()
    yield Served(f"http://127.0.0.1:{server.port}", metrics, readiness)
    server.stop()


def _get(url: str) -> tuple[int, str, str]:
    """``(status, content type, body)`` of a GET, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["Content-Type"], error.read().decode()


def test_metrics_exposes_the_registry_in_the_prometheus_text_format(served: Served) -> None:
    metrics = served.metrics
    metrics.instances_received.labels("stored").inc(3)
    metrics.stage_seconds.labels("spool").observe(0.002)
    status, content_type, body = _get(served.url + "/metrics")
    assert (status, content_type) == (200, CONTENT_TYPE_LATEST)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }
    assert samples[("pacsxai_instances_received_total", (("outcome", "stored"),))] == 3
    assert samples[("pacsxai_stage_seconds_count", (("stage", "spool"),))] == 1
    # Every family of the registry is there, not only those with values.
    assert {family.name for family in metrics.registry.collect()} <= {
        family.name for family in text_string_to_metric_families(body)
    }


def test_healthz_answers_200_while_serving_whatever_readiness_says(served: Served) -> None:
    served.readiness.answer = (False, "stopping")
    assert _get(served.url + "/healthz") == (200, "text/plain", "ok\n")
    assert _get(served.url + "/healthz?probe=kubelet")[0] == 200


def test_readyz_answers_200_when_ready_and_503_with_the_reason_when_not(served: Served) -> None:
    readiness = served.readiness
    readiness.answer = (True, "ready: model pacs-xai-demo-chest on cpu")
    assert _get(served.url + "/readyz") == (200, "text/plain", "ready: model pacs-xai-demo-chest on cpu\n")
    readiness.answer = (False, "spool not writable: [Errno 28] No space left on device")
    assert _get(served.url + "/readyz") == (
        503,
        "text/plain",
        "spool not writable: [Errno 28] No space left on device\n",
    )
    readiness.answer = (True, "ready again")
    assert _get(served.url + "/readyz")[0] == 200


def test_an_unknown_path_is_404_naming_the_endpoints(served: Served) -> None:
    status, _, body = _get(served.url + "/metrics/extra")
    assert status == 404 and "/metrics" in body and "/healthz" in body and "/readyz" in body
