"""A worker process of a multi-process node: takes ready series from the journal and runs them
through the pipeline (read, prepare, infer, explain, encode, store in the outbox).

Each worker loads the models and pipelines of the routes (:mod:`service.node.routing`), warms
up, then claims one ready series at a time
(:meth:`service.node.store.SeriesClaims.claim_ready`, atomic across processes) with
``workers.pipeline`` threads. Nothing signals arrivals across processes, so an idle worker looks
at the journal every ``POLL_SECONDS`` (sooner when a series will be ready sooner). Outputs
committed to the outbox ring the outbox bell (:mod:`service.node.bell`), so the sender process
sends them at once. SIGTERM: the
batch in hand is finished, then the process exits; SIGKILL: the supervisor releases its claims
and another worker takes them.

Torch's intra-op threads are ``cores // workers`` per worker (at least 1), unless
``OMP_NUM_THREADS`` says otherwise: processes, not threads, share the cores.

Run by the supervisor: ``python -m service.node.worker --config FILE --name worker-0``.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from service.inference.deployed import PoolSettings
from service.node.assembler import SeriesKey
from service.node.bell import outbox_bell
from service.node.child import run_child
from service.node.config import NodeConfig, available_cores, resolve_processes
from service.node.metrics import create_metrics
from service.node.processor import RETRY_LATER, STORE_RETRY_SECONDS, SeriesProcessor
from service.node.queue.consumer import StreamConsumer
from service.node.queue.stream import WorkQueue, default_node_name
from service.node.routing import ModelRegistry, Router, triton_settings
from service.node.store import Journal, Spool, StoreError, thread_claimant

log = logging.getLogger(__name__)

#: Longest look-again interval of an idle worker, seconds.
POLL_SECONDS = 0.02


def warm_marker(data_dir: Path, identity: str) -> Path:
    """The file a worker creates once its model is loaded and warmed up (``run/warm-<name>:<pid>``)."""
    return data_dir / "run" / f"warm-{identity}"


def torch_threads(config: NodeConfig) -> int:
    """Intra-op threads per worker: the cores shared among the worker processes."""
    _, workers = resolve_processes(config)
    return max(1, available_cores() // workers)


def serve_worker(config: NodeConfig, identity: str, stop: threading.Event) -> int:
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(torch_threads(config))
    data_dir = Path(config.storage.data_dir)
    durability = config.storage.durability
    journal = Journal(data_dir / "journal.sqlite", durability=durability)
    bell = outbox_bell(data_dir)
    metrics = create_metrics()
    models = ModelRegistry(
        device=config.model.device,
        pool=PoolSettings(config.pool.max_batch, config.pool.max_wait_ms, config.pool.max_queue),
        metrics=metrics.pool,
        triton=triton_settings(config),
    )
    try:
        router = Router.build(config, models)
        for deployed in router.models():
            card = deployed.card
            metrics.model_info.labels(card.name, card.version, deployed.forward_runner.device).set(1)
        if config.model.warm_up:
            seconds = sum(pipeline.warm_up() for pipeline in router.pipelines())
            log.info("%s warmed up in %.2f s", identity, seconds)
        warm_marker(data_dir, identity).touch()  # the supervisor's readiness: this worker takes work now
        processor = SeriesProcessor(
            router,
            Spool(data_dir / "spool", durability=durability),
            journal,
            config.destinations,
            metrics,
            outputs_queued=bell.ring,  # the sender process sends them now, not at its next look
        )
        if config.queue.redis_url:  # series come from the Redis stream, not from the journal
            loops = [
                _stream_loop(config, identity, n, journal, processor, stop) for n in range(config.workers.pipeline)
            ]
        else:  # each thread claims under its own name: a retry gives back its claims only, not its siblings'
            loops = [
                functools.partial(_claim_loop, config, thread_claimant(identity, n), journal, processor, stop)
                for n in range(config.workers.pipeline)
            ]
        threads = [threading.Thread(target=loop, name=f"{identity}-{n}") for n, loop in enumerate(loops)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        models.close()
        bell.close()
        journal.close()
    return 0


def _stream_loop(
    config: NodeConfig, identity: str, n: int, journal: Journal, processor: SeriesProcessor, stop: threading.Event
) -> Callable[[], None]:
    """One consumer of the Redis stream (:mod:`service.node.queue.consumer`), as a thread's body."""
    queue = config.queue
    stream = WorkQueue(
        str(queue.redis_url),
        stream=queue.stream,
        group=queue.group,
        spool_root=Path(config.storage.data_dir) / "spool",
        read_count=queue.read_count,
    )
    consumer = StreamConsumer(
        stream,
        journal,
        processor,
        consumer=thread_claimant(identity, n),
        node=queue.node_name or default_node_name(),
        idle_seconds=config.assembly.idle_seconds,
        max_wait_seconds=config.assembly.max_wait_seconds,
        reclaim_idle_seconds=queue.reclaim_idle_seconds,
        refresh_seconds=queue.refresh_period,
    )

    def loop() -> None:
        try:
            consumer.run(stop)
        finally:
            stream.close()

    return loop


def _claim_loop(
    config: NodeConfig, claimant: str, journal: Journal, processor: SeriesProcessor, stop: threading.Event
) -> None:
    """One pipeline thread: claim a ready series under ``claimant`` (:func:`thread_claimant`), process it."""
    idle, max_wait = config.assembly.idle_seconds, config.assembly.max_wait_seconds
    while not stop.is_set():
        try:
            ready = journal.series.claim_ready(claimant, idle_seconds=idle, max_wait_seconds=max_wait)
            ready_in = None if ready else journal.series.next_ready_in(idle_seconds=idle, max_wait_seconds=max_wait)
        except StoreError as exc:  # e.g. the journal locked longer than its busy timeout: look again later
            log.error("%s cannot claim a series: %s", claimant, exc)
            stop.wait(1.0)
            continue
        if ready is None:
            stop.wait(POLL_SECONDS if ready_in is None else min(POLL_SECONDS, max(ready_in, 0.002)))
            continue
        key = SeriesKey(ready.study_instance_uid, ready.series_instance_uid)
        try:
            processor.process_batch(key, journal.get_instances(ready.sop_instance_uids))
        except RETRY_LATER as exc:  # a full disk, Triton away: the unfinished instances stay ``received``
            log.error("%s: series %s not processed (%s); claim given back, retried later", claimant,
                      ready.series_instance_uid, exc)  # fmt: skip
            _give_back(journal, claimant, stop)


def _give_back(journal: Journal, claimant: str, stop: threading.Event) -> None:
    """Release this thread's claims after a failed store (its sibling threads' batches go on), then
    wait STORE_RETRY_SECONDS. On the full
    disk that failed the store the release can fail too: it is tried again after each wait (a claim
    kept by a live worker would hold its instances back until the worker restarts); at stop the
    supervisor releases what is left."""
    while True:
        try:
            journal.series.release(claimant)
        except StoreError as exc:
            log.error("%s cannot give its claims back yet: %s", claimant, exc)
            if stop.wait(STORE_RETRY_SECONDS):
                return
            continue
        stop.wait(STORE_RETRY_SECONDS)
        return


def main(argv: Sequence[str] | None = None) -> int:
    return run_child("worker", serve_worker, argv)


if __name__ == "__main__":
    sys.exit(main())
