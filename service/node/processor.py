"""Series-level processing for the node: spool -> pipeline -> outbox, every step journaled.

For each instance of a ready batch: read it from the spool, run the
:class:`~service.node.pipeline.ExplainPipeline`, write each output object to the outbox folder
(its pixel data compressed losslessly in the first codec the destinations that take it list, see
:mod:`dicom_io.compression`; the sender decodes it again for a destination that refuses it),
then journal one outbox row per (output, destination that wants its kind) and the instance's
outcome in one transaction (:meth:`Journal.complete <service.node.store.Journal.complete>`). A
crash before that commit reprocesses the instance (its derived UIDs are deterministic, so its
files are the same files); after it, nothing is done twice, so a delivered result is never queued
again.

Routing (:mod:`service.node.routing`) decides per instance which rules take it, from its header,
its sender and the number of instances its series has in the journal so far: each rule that
takes it runs its own pipeline and journals outputs for its own destinations. An instance no rule
takes is journaled ``skipped`` ("not routed: ..." with each rule's first mismatch), then its spool
file is deleted (the journal row says why it is gone, and it was never promised to anyone) and it
is counted in ``pacsxai_instances_discarded_total``; a batch of which no instance was taken counts
once in ``pacsxai_series_unrouted_total``.

A rule whose card is a volume card (``input.kind: volume``) takes the series, not the instance: the
instances of the batch it takes are gathered and, once the batch has been read, go through its
:class:`~service.node.volume.VolumePipeline` as one volume. The volume's objects (multi-frame PM
and SEG, Secondary Captures per slice or per key slice) are written to the spool like any output
and journaled for the rule's destinations in ONE transaction with the outcome of every instance of
the series (:meth:`Journal.complete_series <service.node.store.Journal.complete_series>`): a crash
reprocesses the whole series or nothing. A series that cannot be one volume (a gap, mixed
orientations, inconsistent sizes, too few slices, ...; or ``incomplete``: instances of it came in
an earlier batch, e.g. a sender slower than ``assembly.max_wait_seconds``) is skipped whole: each
of its instances journaled ``skipped`` with the reason, a log line with UIDs, and
``pacsxai_volume_series_skipped_total{route,reason}``; nothing of it is sent.
"""

from __future__ import annotations

import logging
import re
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from dicom_io.compression import compress_pixels, syntaxes_in_order
from dicom_io.errors import DicomInputError
from dicom_io.faults import fault_point
from dicom_io.pixels import read_dataset
from service.explain import ExplainerError
from service.inference.triton import TritonUnavailableError
from service.node.assembler import SeriesKey
from service.node.config import DestinationConfig
from service.node.metrics import NodeMetrics
from service.node.pipeline import DatasetResult, ExplainPipeline
from service.node.routing import InstanceFacts, Router, RouteTarget, read_header, why_not_routed
from service.node.store import Journal, NewOutput, ReceivedInstance, Spool, StoreError
from service.node.volume import VOLUME_SKIP_REASONS, SeriesResult

log = logging.getLogger(__name__)

#: Pause after the store failed (a full disk) or the model server did not answer before a batch
#: is tried again, seconds.
STORE_RETRY_SECONDS = 5.0

#: What leaves a batch's unfinished instances ``received``, to be processed again after
#: :data:`STORE_RETRY_SECONDS` instead of journaled failed: the store could not be written (a full
#: disk), or the Triton server did not answer within its client's retries (stopped, restarting).
#: Nothing is wrong with those instances; a result lost to a server restarting would be a loss.
RETRY_LATER = (StoreError, TritonUnavailableError)

#: How pydicom names the element an encoding error happened at: "With tag (0008,0070) ...".
_TAG_IN_MESSAGE = re.compile(r"\([0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\)")


#: What one rule did with an instance: (done | skipped | failed, reason, the outbox rows to journal).
RouteOutcome = tuple[str, str, list[NewOutput]]


@dataclass
class _VolumeBatch:
    """The instances of a batch that volume rules take: each one's outcome waits for the volumes."""

    #: Per instance (arrival order): the instance and the outcomes of its 2D rules so far.
    waiting: dict[str, tuple[ReceivedInstance, list[RouteOutcome]]] = field(default_factory=dict)
    #: Per volume rule (rule order): the rule and the (instance, dataset) pairs it takes.
    members: dict[str, tuple[RouteTarget, list[tuple[ReceivedInstance, Dataset]]]] = field(default_factory=dict)


def _internal_error(exc: Exception) -> str:
    """The journal's reason for an unexpected error: where, not what. A library's message may quote
    a value of the source, and values may be patient data (the torture suite found a birth date in
    one); the innermost frame says where it broke."""
    where = traceback.extract_tb(exc.__traceback__)[-1]
    return f"internal error: {type(exc).__name__} in {Path(where.filename).name}:{where.lineno} ({where.name})"


class SeriesProcessor:
    """Processes ready batches; dependencies passed in, no state between batches."""

    def __init__(
        self,
        router: Router | ExplainPipeline,
        spool: Spool,
        journal: Journal,
        destinations: Sequence[DestinationConfig],
        metrics: NodeMetrics,
        *,
        clock: Callable[[], float] = time.time,
        outputs_queued: Callable[[], None] = lambda: None,
    ) -> None:
        """``router`` decides what takes each instance; a bare pipeline is one rule that takes
        everything and sends to ``destinations`` (with routing, each rule names its own).
        ``outputs_queued`` is called each time outputs were committed to the outbox (it wakes
        the sender: a thread's event, or the outbox bell of a sender process)."""
        self._router = router if isinstance(router, Router) else Router.single(router, destinations)
        self._spool = spool
        self._journal = journal
        self._metrics = metrics
        self._clock = clock
        self._outputs_queued = outputs_queued

    def process_batch(self, key: SeriesKey, instances: Sequence[ReceivedInstance]) -> dict[str, int]:
        """Process one batch of a series; returns how many instances ended done/skipped/failed."""
        tally = {"done": 0, "skipped": 0, "failed": 0}
        if instances:
            waited = self._clock() - min(instance.received_at for instance in instances)
            self._metrics.stage_seconds.labels("assemble_wait").observe(max(0.0, waited))
        routes_taken: dict[str, int] = {}
        in_series = len(instances)
        if instances and self._router.reads_instance_count:  # the series so far, earlier batches included
            in_series = max(in_series, self._journal.series_instance_count(key.series_instance_uid))
        volumes = _VolumeBatch()
        outcomes = [self._process_instance(instance, in_series, routes_taken, volumes) for instance in instances]
        if volumes.waiting:
            outcomes.extend(self._finish_volumes(key, len(instances), volumes))
        for outcome in outcomes:
            if outcome is not None:  # None: waited for a volume (its outcome came from there), or re-sent
                tally[outcome] += 1
                self._metrics.instances_processed.labels(outcome).inc()
        self._metrics.series_processed.labels(_series_outcome(tally)).inc()
        for route in routes_taken:
            self._metrics.series_routed.labels(route).inc()
        if instances and not routes_taken:
            self._metrics.series_unrouted.inc()
            log.info(
                "series %s of study %s: no route takes its %d instance(s); not kept",
                key.series_instance_uid,
                key.study_instance_uid,
                len(instances),
            )
        log.info("series %s batch of %d processed: %s", key.series_instance_uid, len(instances), tally)
        return tally

    def _process_instance(
        self, instance: ReceivedInstance, in_series: int, routes_taken: dict[str, int], volumes: _VolumeBatch
    ) -> str | None:
        """Route one instance and run its 2D rules; its outcome (journaled), or None when a volume
        rule takes it too (then its outcome is journaled with its series', see :meth:`_finish_volumes`)
        or when a copy re-sent meanwhile left it for that copy (nothing recorded, nothing counted)."""
        uid = instance.sop_instance_uid
        try:
            started = time.perf_counter()
            facts = InstanceFacts.from_dataset(
                read_header(instance.path), instances=in_series, calling_ae_title=instance.calling_ae
            )
            targets, verdicts = self._router.route(facts)
            if not targets:
                return self._discard(instance, facts, why_not_routed(verdicts))
            dataset = read_dataset(instance.path)
            self._metrics.stage_seconds.labels("read").observe(time.perf_counter() - started)
            fault_point("during-processing")
        except DicomInputError as exc:
            self._journal.mark_processed([uid], "failed", str(exc), received_before=instance.received_at)
            log.warning("instance %s cannot be processed: %s", uid, exc)
            return "failed"
        except Exception as exc:  # a bug must not stop the node; it is journaled with its reason and logged
            reason = _internal_error(exc)
            self._journal.mark_processed([uid], "failed", reason, received_before=instance.received_at)
            log.error("instance %s failed: %s\n%s", uid, reason, "".join(traceback.format_tb(exc.__traceback__)))
            return "failed"
        outcomes = [self._run_route(target, instance, dataset) for target in targets if not target.is_volume]
        for target in targets:
            routes_taken[target.name] = routes_taken.get(target.name, 0) + 1
            if target.is_volume:
                volumes.members.setdefault(target.name, (target, []))[1].append((instance, dataset))
                volumes.waiting[uid] = (instance, outcomes)
        if uid in volumes.waiting:
            return None
        state, reason, queued = _combined(outcomes)
        if state == "failed":  # the routes that did succeed still send their results
            if not self._journal.complete(uid, queued, "failed", reason, received_before=instance.received_at):
                return None  # re-sent meanwhile: its newer copy's batch counts it
            self._wake_sender(queued)
            return "failed"
        if state == "skipped":
            self._journal.mark_processed([uid], "skipped", reason, received_before=instance.received_at)
            log.info("instance %s skipped: %s", uid, reason)
            return "skipped"
        if not self._journal.complete(uid, queued, received_before=instance.received_at):
            return None  # re-sent meanwhile: its newer copy's batch counts it
        fault_point("after-outputs-stored")
        self._wake_sender(queued)
        return "done"

    def _wake_sender(self, queued: Sequence[NewOutput]) -> None:
        if queued:
            self._outputs_queued()

    def _finish_volumes(self, key: SeriesKey, batch_size: int, volumes: _VolumeBatch) -> list[str]:
        """Run each volume rule on the instances it takes, then journal the outcome of every waiting
        instance and every output in one transaction; the outcomes, in arrival order."""
        earlier = self._journal.series_instance_count(key.series_instance_uid) - batch_size
        queued: list[NewOutput] = []
        for target, members in volumes.members.values():
            state, reason, outputs = self._run_volume_route(key, target, members, earlier)
            queued.extend(outputs)
            for instance, _ in members:
                volumes.waiting[instance.sop_instance_uid][1].append((state, reason, []))
        rows, read = [], {}
        for uid, (instance, outcomes) in volumes.waiting.items():
            state, reason, outputs = _combined(outcomes)
            queued.extend(outputs)
            rows.append((uid, state, reason))
            read[uid] = instance.received_at
        if not self._journal.complete_series(rows, queued, received_before=read):  # type: ignore[arg-type]
            return []  # a slice re-sent meanwhile: the series is taken again whole, and counted then
        fault_point("after-outputs-stored")
        self._wake_sender(queued)
        return [state for _, state, _ in rows]

    def _run_volume_route(
        self, key: SeriesKey, target: RouteTarget, members: list[tuple[ReceivedInstance, Dataset]], earlier: int
    ) -> RouteOutcome:
        """One volume rule's pipeline on the instances of the series it takes, its outputs in the
        spool: (done | skipped | failed, reason, the outbox rows to journal)."""
        series = key.series_instance_uid
        named = "" if len(self._router.targets) == 1 else f"route {target.name}: "
        count = len(members)
        if earlier > 0:
            reason = (
                f"series {series} came in more than one batch ({earlier} instance(s) before these {count}); "
                "a volume is explained from one whole series: resend the whole series (and raise "
                "assembly.max_wait_seconds if its sender is slow)"
            )
            return self._volume_skipped(target, SeriesResult(series, "", count, reason, "incomplete"), named)
        try:
            with self._metrics.route_seconds.labels(target.name).time():
                result = target.pipeline.process([dataset for _, dataset in members])
        except TritonUnavailableError:
            raise  # the model server is away, the series is fine: processed again later
        except Exception as exc:  # a bug must not stop the node; each instance is journaled failed with the reason
            known = isinstance(exc, DicomInputError | ExplainerError)
            reason = str(exc) if known else _internal_error(exc)
            log.log(
                logging.WARNING if known else logging.ERROR,
                "series %s (%d instances) failed in volume route %s: %s%s",
                series,
                count,
                target.name,
                reason,
                "" if known else "\n" + "".join(traceback.format_tb(exc.__traceback__)),
            )
            self._metrics.route_instances.labels(target.name, "failed").inc(count)
            return "failed", f"{named}{reason}", []
        assert isinstance(result, SeriesResult)
        if result.skipped_reason:
            return self._volume_skipped(target, result, named)
        self._observe_volume(result)
        try:
            with self._metrics.stage_seconds.labels("store").time():
                queued = self._store_outputs(members[0][0].sop_instance_uid, target, result)
        except StoreError:
            raise
        except Exception as exc:  # an attribute copied from a damaged source that cannot be encoded
            where = _TAG_IN_MESSAGE.search(str(exc))
            reason = (
                f"the volume's outputs could not be encoded from this series ({type(exc).__name__}"
                f"{f' at element {where.group(0)}' if where else ''}): resend the original files"
            )
            log.error("series %s: %s", series, reason)
            self._metrics.route_instances.labels(target.name, "failed").inc(count)
            return "failed", f"{named}{reason}", []
        self._metrics.route_instances.labels(target.name, "done").inc(count)
        log.info(
            "series %s explained as one volume of %d instances by route %s: %d output object(s)",
            series,
            count,
            target.name,
            len(result.outputs),
        )
        return "done", "", queued

    def _volume_skipped(self, target: RouteTarget, result: SeriesResult, named: str) -> RouteOutcome:
        """A series a volume rule cannot explain: counted by reason, logged (UIDs only), skipped whole."""
        code = result.skip_code if result.skip_code in VOLUME_SKIP_REASONS else "other"
        self._metrics.volume_series_skipped.labels(target.name, code).inc()
        self._metrics.route_instances.labels(target.name, "skipped").inc(result.instances)
        log.warning(
            "series %s (%d instances) not explained by volume route %s (%s): %s",
            result.series_instance_uid,
            result.instances,
            target.name,
            code,
            result.skipped_reason,
        )
        return "skipped", f"{named}{result.skipped_reason}", []

    def _run_route(self, target: RouteTarget, instance: ReceivedInstance, dataset: Dataset) -> RouteOutcome:
        """One rule's pipeline on one instance, its outputs in the spool: (done | skipped | failed,
        reason, the outbox rows to journal)."""
        uid = instance.sop_instance_uid
        named = "" if len(self._router.targets) == 1 else f"route {target.name}: "
        try:
            with self._metrics.route_seconds.labels(target.name).time():
                result = target.pipeline.process(dataset)
        except TritonUnavailableError:
            raise  # the model server is away, the instance is fine: processed again later
        except (DicomInputError, ExplainerError) as exc:
            log.warning("instance %s cannot be processed by route %s: %s", uid, target.name, exc)
            self._metrics.route_instances.labels(target.name, "failed").inc()
            return "failed", f"{named}{exc}", []
        except Exception as exc:  # a bug must not stop the node; it is journaled with its reason and logged
            reason = _internal_error(exc)
            log.error(
                "instance %s failed in route %s: %s\n%s",
                uid,
                target.name,
                reason,
                "".join(traceback.format_tb(exc.__traceback__)),
            )
            self._metrics.route_instances.labels(target.name, "failed").inc()
            return "failed", f"{named}{reason}", []
        self._observe(target, result)
        if result.skipped_reason:
            self._metrics.route_instances.labels(target.name, "skipped").inc()
            return "skipped", f"{named}{result.skipped_reason}", []
        try:
            with self._metrics.stage_seconds.labels("store").time():
                queued = self._store_outputs(uid, target, result)
        except StoreError:
            raise
        except Exception as exc:  # an attribute copied from a damaged source that cannot be encoded
            # The exception's text is left out (it may quote a value); pydicom names the element's tag.
            where = _TAG_IN_MESSAGE.search(str(exc))
            element = f" at element {where.group(0)}" if where else ""
            reason = (
                f"the outputs could not be encoded from this source ({type(exc).__name__}{element}): "
                "an attribute of the source has a value its VR does not allow; resend the original file"
            )
            log.error("instance %s: %s", uid, reason)
            self._metrics.route_instances.labels(target.name, "failed").inc()
            return "failed", f"{named}{reason}", []
        self._metrics.route_instances.labels(target.name, "done").inc()
        return "done", "", queued

    def _discard(self, instance: ReceivedInstance, facts: InstanceFacts, why: str) -> str:
        """No rule takes the instance: journal it skipped with the reason, then delete its spool file.

        The journal row is written first, so a crash in between leaves a file no row needs (harmless)
        rather than a row whose instance is gone. A copy re-sent meanwhile keeps its row ``received``
        (``received_before``) and its file.
        """
        uid = instance.sop_instance_uid
        self._journal.mark_processed([uid], "skipped", f"not routed: {why}", received_before=instance.received_at)
        reason = "no_route" if facts.is_image else "not_an_image"
        self._metrics.instances_discarded.labels(reason).inc()
        state = self._journal.instance_state(uid)
        if state is not None and state[0] == "skipped":
            try:
                instance.path.unlink(missing_ok=True)
            except OSError as exc:  # the row already says it is not kept; the file is only wasted space
                log.warning(
                    "instance %s not routed; its spool file %s could not be deleted: %s", uid, instance.path, exc
                )
        log.debug("instance %s (SOP class %s) not routed: %s", uid, facts.sop_class_uid, why)
        return "skipped"

    def _store_outputs(self, uid: str, target: RouteTarget, result: DatasetResult | SeriesResult) -> list[NewOutput]:
        """Encode each output into the spool (pixel data compressed losslessly in the first codec
        the route's destinations that take it list) and return one outbox row per such destination
        (``uid``: the source instance the rows name; a volume's first instance in the batch)."""
        queued = []
        for output in result.outputs:
            derived_uid = str(output.dataset.SOPInstanceUID)
            takers = [d for d in target.destinations if d.outputs is None or output.kind in d.outputs]
            compress_pixels(output.dataset, syntaxes_in_order([d.syntaxes() for d in takers]))
            path = self._spool.write_output(encode(output.dataset), sop_uid=derived_uid)
            for destination in takers:
                queued.append(NewOutput(derived_uid, uid, destination.name, path, output.kind, output.method))
        return queued

    def _observe_volume(self, result: SeriesResult) -> None:
        """Stage timings and the prediction of one explained volume into the metrics."""
        for key, milliseconds in result.timings_ms.items():
            stage, _, method = key.partition(":")
            self._metrics.stage_seconds.labels(stage).observe(milliseconds / 1000)
            if stage == "explain":
                self._metrics.explain_seconds.labels(method).observe(milliseconds / 1000)
        if result.prediction is not None:
            self._metrics.predictions.labels(result.prediction.class_name).inc()

    def _observe(self, target: RouteTarget, result: DatasetResult) -> None:
        """Stage timings, predictions and trust signals of one processed instance into the metrics."""
        for key, milliseconds in result.timings_ms.items():
            stage, _, method = key.partition(":")
            self._metrics.stage_seconds.labels(stage).observe(milliseconds / 1000)
            if stage == "explain":
                self._metrics.explain_seconds.labels(method).observe(milliseconds / 1000)
        for prediction in result.predictions:
            self._metrics.predictions.labels(prediction.class_name).inc()
        model = target.pipeline.model.card.name
        for verdict in result.verdicts:
            self._metrics.explanation_outside_share.labels(model, verdict.method).observe(verdict.shortcut.share)
            if verdict.shortcut.suspected:
                self._metrics.explanation_shortcut_suspected.labels(model, verdict.method).inc()
        for signal in result.ood:
            if signal is not None and signal.out_of_distribution:
                self._metrics.input_out_of_distribution.labels(model).inc()


def _combined(outcomes: Sequence[RouteOutcome]) -> RouteOutcome:
    """An instance's outcome from its rules': failed when one failed (the others' outputs still
    go), skipped when every one skipped, else done; the reasons joined, every output row."""
    queued = [output for _, _, outputs in outcomes for output in outputs]
    failed = [reason for outcome, reason, _ in outcomes if outcome == "failed"]
    if failed:
        return "failed", "; ".join(failed), queued
    if all(outcome == "skipped" for outcome, _, _ in outcomes):
        return "skipped", "; ".join(reason for _, reason, _ in outcomes), queued
    return "done", "", queued


def _series_outcome(tally: dict[str, int]) -> str:
    """done (all done), skipped/failed (all of one kind), partial (a mix)."""
    kinds = [outcome for outcome, count in tally.items() if count]
    return kinds[0] if len(kinds) == 1 else ("partial" if kinds else "done")


def encode(dataset: Dataset) -> bytes:
    """A derived dataset as DICOM Part 10 bytes (File Meta included)."""
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()
