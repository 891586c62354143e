"""Wiring of the running node: listener, assembler, processing worker and sender.

Threads: pynetdicom serves associations on its own threads and only spools + journals there
(fast, I/O-bound). One processing thread per ``workers.pipeline`` takes ready series from the
assembler and runs the model and explainers (torch and ONNX Runtime release the GIL in their
kernels). One sender thread delivers the outbox. All state that matters is in the journal, so
``start`` after any crash resumes: journaled-but-unprocessed instances are handed back to the
assembler, pending outputs are sent.

``stop`` drains: the listener stops accepting, the series being processed finish, the sender
makes a last pass; what is left waits in the journal for the next start.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from pathlib import Path

from dicom_io.net.scp import StorageSCP
from dicom_io.net.scu import StoreSCU
from service.inference.deployed import DeployedModel, PoolSettings
from service.node.assembler import Assembler, SeriesKey
from service.node.config import NodeConfig
from service.node.http import HealthServer
from service.node.intake import listener_settings
from service.node.metrics import JournalCollector, create_metrics
from service.node.processor import RETRY_LATER, STORE_RETRY_SECONDS, SeriesProcessor
from service.node.receiver import Receiver
from service.node.routing import ModelRegistry, Router, default_card_path, triton_settings
from service.node.sender import OutboxSender
from service.node.store import Journal, Spool, StoreError

log = logging.getLogger(__name__)

#: Longest wait of a processing thread for a ready series; the assembler wakes it sooner, when a
#: series becomes ready, and at stop.
PROCESS_WAIT_SECONDS = 1.0
#: Seconds between outbox passes when nothing woke the sender (retries that came due).
SEND_POLL_SECONDS = 0.5


class Node:
    """One pacs-xai node. ``start()``, then ``stop()`` (also used by the SIGTERM handler)."""

    def __init__(self, config: NodeConfig, model: DeployedModel | None = None) -> None:
        self.config = config
        data_dir = Path(config.storage.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        durability = config.storage.durability
        self.spool = Spool(data_dir / "spool", durability=durability)
        self.journal = Journal(data_dir / "journal.sqlite", durability=durability)
        self.metrics = create_metrics()
        #: Each model card once, shared by the routes that name it (``model``: for the default card).
        self.models = ModelRegistry(
            device=config.model.device,
            pool=PoolSettings(config.pool.max_batch, config.pool.max_wait_ms, config.pool.max_queue),
            metrics=self.metrics.pool,
            triton=triton_settings(config),
        )
        if model is not None:
            self.models.add(default_card_path(config), model)
        try:
            self.router = Router.build(config, self.models)
        except BaseException:
            self.models.close()
            raise
        #: The first route's pipeline and model (the only ones without ``routes``).
        self.pipeline = self.router.pipelines()[0]
        self.model = self.pipeline.model
        self.assembler = Assembler(
            idle_seconds=config.assembly.idle_seconds, max_wait_seconds=config.assembly.max_wait_seconds
        )
        self.metrics.registry.register(JournalCollector(self.journal.counts))
        for deployed in self.router.models():
            card = deployed.card
            self.metrics.model_info.labels(card.name, card.version, deployed.forward_runner.device).set(1)
        self._outputs_ready = threading.Event()  # set when processing journaled new outputs
        self.processor = SeriesProcessor(
            self.router,
            self.spool,
            self.journal,
            config.destinations,
            self.metrics,
            outputs_queued=self._outputs_ready.set,
        )
        self.sender = OutboxSender(
            self.journal,
            StoreSCU(config.send.calling_ae_title or config.listener.ae_title),
            {d.name: d.to_destination() for d in config.destinations},
            config.send,
            self.metrics,
        )
        self.scp = StorageSCP(
            listener_settings(config), Receiver(self.spool, self.journal, self.assembler, self.metrics)
        )
        self.http = (
            HealthServer(
                self.metrics.registry, self.readiness, bind=config.metrics.bind_address, port=config.metrics.port
            )
            if config.metrics.enabled
            else None
        )
        self._stopping = threading.Event()
        #: Set once the start-up warm-up has run (or failed, or is switched off).
        self.warmed_up = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        """The DICOM port actually bound (useful with port 0)."""
        return self.scp.port

    def readiness(self) -> tuple[bool, str]:
        """Ready when the model is loaded, the spool writable and the listener running."""
        if self._stopping.is_set():
            return False, "stopping"
        probe = self.spool.root / ".readyz-probe"
        try:
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            return False, f"spool not writable: {exc}"
        models = ", ".join(f"{m.card.name} {m.card.version} on {m.forward_runner.device}" for m in self.router.models())
        return True, f"ready: model {models}"

    @property
    def metrics_port(self) -> int | None:
        """The HTTP port of /metrics, /healthz, /readyz (None when disabled)."""
        return self.http.port if self.http else None

    def start(self) -> None:
        """Resume from the journal, then listen, process and send."""
        self.spool.remove_stale_temp_files()
        restored = self.journal.pending_instances()
        for instance in restored:
            self.assembler.restore(
                SeriesKey(instance.study_instance_uid, instance.series_instance_uid), instance.sop_instance_uid
            )
        if restored:
            log.info("resuming %d journaled instance(s) not yet processed", len(restored))
        if self.http:
            self.http.start()
        self.scp.start()
        for index in range(self.config.workers.pipeline):
            self._spawn(f"pacs-xai-process-{index}", self._process_loop)
        self._spawn("pacs-xai-send", self._send_loop)
        if self.config.model.warm_up:
            self._spawn("pacs-xai-warm-up", self._warm_up)
        else:
            self.warmed_up.set()
        log.info(
            "node %s listening on %s:%d, model %s %s on %s; routes: %s",
            self.config.listener.ae_title,
            self.config.listener.bind_address,
            self.port,
            self.model.card.name,
            self.model.card.version,
            self.model.forward_runner.device,
            ", ".join(f"{t.name} -> {t.pipeline.model.card.name}" for t in self.router.targets),
        )

    def stop(self) -> None:
        """Graceful stop: no new associations, finish the batch in hand, last send pass."""
        self.scp.stop()
        self._stopping.set()
        self.assembler.wake()
        self._outputs_ready.set()
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        if self.http:
            self.http.stop()
        self.models.close()
        self.journal.close()
        log.info("node stopped")

    def _spawn(self, name: str, target) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _warm_up(self) -> None:
        """The pipeline's dry run (see ExplainPipeline.warm_up); studies arriving meanwhile are served."""
        try:
            seconds = sum(pipeline.warm_up() for pipeline in self.router.pipelines())
        except Exception:  # a failed dry run must not stop the node; the first real study will tell more
            log.exception("warm-up failed; the first study will pay for the initialisation instead")
            return
        finally:
            self.warmed_up.set()
        log.info("warm-up done in %.2f s: every method and output ran once on a synthetic image", seconds)

    def _process_loop(self) -> None:
        while not self._stopping.is_set():
            for key, sop_uids in self.assembler.wait_ready(timeout=PROCESS_WAIT_SECONDS):
                try:
                    self.processor.process_batch(key, self.journal.get_instances(sop_uids))
                except RETRY_LATER as exc:  # a full disk, Triton away: what is not done stays ``received``
                    self._defer(key, sop_uids, exc)
                else:  # a copy re-sent during the batch left its instance (a volume: its series) received
                    restore_unfinished(self.assembler, self.journal, key, sop_uids)

    def _defer(self, key: SeriesKey, sop_uids: list[str], exc: Exception) -> None:
        """The spool or journal could not be written (a full disk), or the Triton server did not
        answer: the batch's unfinished instances rejoin the assembler and the loop waits, so the
        node recovers by itself when space returns or the server is back."""
        self.metrics.series_processed.labels("deferred").inc()
        log.error(
            "series %s: %d instance(s) not processed (%s); retried in %.0f s",
            key.series_instance_uid,
            len(sop_uids),
            exc,
            STORE_RETRY_SECONDS,
        )
        restore_unfinished(self.assembler, self.journal, key, sop_uids)
        self._stopping.wait(STORE_RETRY_SECONDS)

    def _send_loop(self) -> None:
        while True:
            stopping = self._stopping.is_set()
            self._outputs_ready.clear()
            tally = self.sender.send_pass(self._stopping.wait)
            if stopping:
                return
            if not any(tally.values()):
                self._outputs_ready.wait(SEND_POLL_SECONDS)


def restore_unfinished(assembler: Assembler, journal: Journal, key: SeriesKey, sop_uids: Iterable[str]) -> int:
    """Put back into the assembler each instance of a processed batch that the journal still says
    is ``received``: deferred by a full disk or an absent Triton, or left for a copy re-sent while
    it was processed (a volume is then left whole, and taken again with that copy). A journal that
    cannot be read counts as ``received``. Returns how many were put back."""
    restored = 0
    for uid in sop_uids:
        try:
            state = journal.instance_state(uid)
        except StoreError:
            state = ("received", "")
        if state is not None and state[0] == "received":
            assembler.restore(key, uid)
            restored += 1
    return restored
