"""Proof under faults, on one machine: the whole scaled-out node at once. A real redis-server (AOF,
appendfsync always), a real Triton server (nvidia-pytriton, CPU, from .venv-triton), ``pacs-xai
serve`` with 2 receivers and 2 workers taking work from the stream and sending their forward
passes and Grad-CAM layer gradients to Triton, a real DCMTK storescp as the destination (``+uf``:
a result sent twice is two files). 40 phantom radiographs arrive over 4 concurrent associations;
while they are processed a worker is SIGKILLed holding messages, Triton is stopped for 10 s and
started again, and redis-server is killed and started again on the same data folder (its
append-only file kept: the stream and the consumer group come back as they were).

Every Parametric Map arrives exactly once with the UIDs derived from its source, every map equals
the in-process (eager torch) pipeline's map of the same image, nothing stays pending in the stream
and the journal says every instance done.
"""

from __future__ import annotations

import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
import redis
from pynetdicom import AE
from pynetdicom.presentation import StoragePresentationContexts

from dicom_io.net.scu import Destination, StoreSCU
from dicom_io.uids import derived_output_uids
from service.inference.card import ModelCard
from service.inference.deployed import DeployedModel, PoolSettings
from service.models import demo_card_path
from service.node.pipeline import ExplainPipeline
from service.tools.redis_server import RedisServer
from service.tools.triton.launch import TritonServer, triton_python
from tests.helpers import free_port, start_storescp, wait_for
from tests.integration.test_node_processes import _Node, _rows, _series
from tests.integration.test_node_queue import GROUP, STREAM, _pending_by_consumer

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        triton_python() is None,
        reason="no Triton virtualenv (.venv-triton): run `make triton-venv` (make test creates it)",
    ),
]

ASSOCIATIONS, IMAGES_PER_SERIES = 4, 5
TRITON_DOWN_SECONDS = 10.0
MAX_BATCH = 8


def _send_concurrently(pool: ThreadPoolExecutor, associations: list, series: list[list[Path]]) -> None:
    """One series on each open association, all at once; every C-STORE answered Success."""

    def send(association, paths: list[Path]) -> list[int]:  # noqa: ANN001
        return [association.send_c_store(path).Status for path in paths]

    assert all(status == 0x0000 for statuses in pool.map(send, associations, series) for status in statuses)


def _holder(client: redis.Redis) -> str | None:
    """A worker's consumer that holds messages (read, not acknowledged), if any."""
    return next((n for n, c in _pending_by_consumer(client).items() if n.startswith("worker-") and c), None)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_every_map_arrives_once_and_right_through_a_killed_worker_a_restarted_redis_and_a_stopped_triton(
    tmp_path: Path,
) -> None:
    card = ModelCard.load(demo_card_path())
    results = tmp_path / "dest"
    results.mkdir()
    storescp_port = free_port()
    storescp = start_storescp(results, storescp_port)
    triton = TritonServer(card, tmp_path / "triton", max_batch=MAX_BATCH, threads=1).start(wait=False)
    server = RedisServer(tmp_path / "redis").start()
    client = redis.Redis.from_url(server.url)
    node = None
    try:
        wait_for(lambda: StoreSCU("PROBE").echo(Destination("DEST", "127.0.0.1", storescp_port)), 15, "storescp")
        triton.wait_ready()
        node = _Node(
            tmp_path,
            storescp_port,
            {
                "PACS_XAI_QUEUE__REDIS_URL": server.url,
                "PACS_XAI_QUEUE__RECLAIM_IDLE_SECONDS": "3",
                "PACS_XAI_QUEUE__CHECK_SECONDS": "0.5",
                "PACS_XAI_MODEL__TRITON_URL": triton.url,
                "PACS_XAI_MODEL__TRITON_TIMEOUT_SECONDS": "30",
                "PACS_XAI_POOL__MAX_BATCH": str(MAX_BATCH),  # the server batches at most this many
            },
            outputs="pm",
        )
        # Per association two series of 5: the first before the faults, the second while Triton is away.
        halves = [
            [_series(tmp_path / "in", IMAGES_PER_SERIES, seed=100 + 2 * a + h) for a in range(ASSOCIATIONS)]
            for h in (0, 1)
        ]
        sources = [pydicom.dcmread(path) for half in halves for series in half for path in series]
        assert len(sources) == 40
        ae = AE("MODALITY")
        ae.requested_contexts = StoragePresentationContexts[:100]
        associations = [ae.associate("127.0.0.1", node.port, ae_title="PACSXAI") for _ in range(ASSOCIATIONS)]
        assert all(a.is_established for a in associations)
        with ThreadPoolExecutor(ASSOCIATIONS) as senders:
            _send_concurrently(senders, associations, halves[0])
            wait_for(lambda: any(results.iterdir()), 120, "the first result at storescp")

            # Triton away for 10 s; the second halves arrive meanwhile (the receivers need no model).
            triton.stop()
            down_at = time.monotonic()
            _send_concurrently(senders, associations, halves[1])
        for association in associations:
            association.release()

        # A worker SIGKILLed while it holds messages (read, waiting for Triton, not acknowledged).
        wait_for(lambda: _holder(client) is not None, 60, "a worker to hold messages")
        holder = _holder(client)
        os.kill(int(holder.split(":")[1].split("-")[0]), signal.SIGKILL)

        # redis-server killed and started again on its own append-only file (appendfsync always).
        server.kill()
        time.sleep(1.0)
        server.start()

        time.sleep(max(0.0, TRITON_DOWN_SECONDS - (time.monotonic() - down_at)))
        arrived_while_down = len(list(results.iterdir()))
        assert 0 < arrived_while_down <= len(sources) // 2, "the faults came in the middle of the work"
        triton.start(wait=False)

        wait_for(lambda: len(list(results.iterdir())) >= len(sources), 180, f"{len(sources)} results at storescp")
        wait_for(lambda: client.exists(STREAM) and client.xlen(STREAM) == 0, 30, "the stream to drain")
        time.sleep(1.0)  # anything sent twice would arrive now

        arrived = [pydicom.dcmread(p) for p in results.iterdir()]
        uids = [ds.SOPInstanceUID for ds in arrived]
        assert len(uids) == len(set(uids)) == len(sources), "every result exactly once"
        explained = SimpleNamespace(method="gradcam", model_name=card.name, model_version=card.version, frame_index=0)
        expected = {derived_output_uids(source, explained, "pm"): source for source in sources}
        by_uids = {(ds.SeriesInstanceUID, ds.SOPInstanceUID): ds for ds in arrived}
        assert set(by_uids) == set(expected), "the derived UIDs of each source's map"
        assert _rows(node.journal, "SELECT state, COUNT(*) FROM instances GROUP BY state") == [("done", len(sources))]
        assert sum(_pending_by_consumer(client).values()) == 0
        assert client.xpending(STREAM, GROUP)["pending"] == 0

        # Each delivered map against the in-process pipeline's (the eager demo model, same explainer).
        local = DeployedModel(card, device="cpu", pool=PoolSettings(max_batch=MAX_BATCH))
        try:
            pipeline = ExplainPipeline(local, ["gradcam"], ["pm"])
            for key, source in expected.items():
                (want,) = [o.dataset for o in pipeline.process(source).outputs if o.kind == "pm"]
                assert (want.SeriesInstanceUID, want.SOPInstanceUID) == key
                got, want_map = by_uids[key].pixel_array, want.pixel_array
                assert np.abs(want_map).max() > 0
                assert _pearson(got, want_map) >= 0.999, f"map of {source.SOPInstanceUID}"
        finally:
            local.close()

        log = node.text()
        assert re.search(rf"{holder.split(':')[0]} exited with status -9 .* restarting", log)
        assert "Triton at" in log and "did not answer" in log, "a series met Triton down"
        assert "failed" not in {state for (state,) in _rows(node.journal, "SELECT state FROM instances")}

        node.process.send_signal(signal.SIGTERM)
        assert node.process.wait(timeout=60) == 0
    finally:
        if node is not None and node.process.poll() is None:
            node.process.kill()
        client.close()
        server.stop()
        triton.stop()
        storescp.terminate()
        storescp.wait(timeout=10)
