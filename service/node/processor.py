"""Series-level processing for the node: spool -> pipeline -> outbox, every step journaled.

For each instance of a ready batch: read it from the spool, run the
:class:`~service.node.pipeline.ExplainPipeline`, write each output object to the outbox folder and
journal one outbox row per (output, destination that wants its kind), then mark the instance
processed. Outputs are journaled before the instance is marked done, so a crash in between
reprocesses the instance on restart; its derived UIDs are deterministic, so the outbox rows are
the same rows (``Outbox.add`` is idempotent) and the destination receives replacements, never
duplicates.
"""

from __future__ import annotations

import logging
import re
import time
import traceback
from collections.abc import Callable, Sequence
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from dicom_io.errors import DicomInputError
from dicom_io.faults import fault_point
from dicom_io.pixels import read_dataset
from service.explain import ExplainerError
from service.node.assembler import SeriesKey
from service.node.config import DestinationConfig
from service.node.metrics import NodeMetrics
from service.node.pipeline import DatasetResult, ExplainPipeline
from service.node.store import Journal, ReceivedInstance, Spool, StoreError

log = logging.getLogger(__name__)

#: How pydicom names the element an encoding error happened at: "With tag (0008,0070) ...".
_TAG_IN_MESSAGE = re.compile(r"\([0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\)")


class SeriesProcessor:
    """Processes ready batches; dependencies passed in, no state between batches."""

    def __init__(
        self,
        pipeline: ExplainPipeline,
        spool: Spool,
        journal: Journal,
        destinations: Sequence[DestinationConfig],
        metrics: NodeMetrics,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._pipeline = pipeline
        self._spool = spool
        self._journal = journal
        self._destinations = tuple(destinations)
        self._metrics = metrics
        self._clock = clock

    def process_batch(self, key: SeriesKey, instances: Sequence[ReceivedInstance]) -> dict[str, int]:
        """Process one batch of a series; returns how many instances ended done/skipped/failed."""
        tally = {"done": 0, "skipped": 0, "failed": 0}
        if instances:
            waited = self._clock() - min(instance.received_at for instance in instances)
            self._metrics.stage_seconds.labels("assemble_wait").observe(max(0.0, waited))
        for instance in instances:
            outcome = self._process_instance(instance)
            tally[outcome] += 1
            self._metrics.instances_processed.labels(outcome).inc()
        self._metrics.series_processed.labels(_series_outcome(tally)).inc()
        log.info("series %s batch of %d processed: %s", key.series_instance_uid, len(instances), tally)
        return tally

    def _process_instance(self, instance: ReceivedInstance) -> str:
        uid = instance.sop_instance_uid
        try:
            with self._metrics.stage_seconds.labels("read").time():
                dataset = read_dataset(instance.path)
            fault_point("during-processing")
            result = self._pipeline.process(dataset)
        except (DicomInputError, ExplainerError) as exc:
            self._journal.mark_processed([uid], "failed", str(exc))
            log.warning("instance %s cannot be processed: %s", uid, exc)
            return "failed"
        except Exception as exc:  # a bug must not stop the node; it is journaled with its reason and logged
            # Where, not what: a library's message may quote a value of the source, and values may be
            # patient data (the torture suite found a birth date in one); the frames say where it broke.
            where = traceback.extract_tb(exc.__traceback__)[-1]
            reason = (
                f"internal error: {type(exc).__name__} in {Path(where.filename).name}:{where.lineno} ({where.name})"
            )
            self._journal.mark_processed([uid], "failed", reason)
            log.error("instance %s failed: %s\n%s", uid, reason, "".join(traceback.format_tb(exc.__traceback__)))
            return "failed"
        self._observe(result)
        if result.skipped_reason:
            self._journal.mark_processed([uid], "skipped", result.skipped_reason)
            log.info("instance %s skipped: %s", uid, result.skipped_reason)
            return "skipped"
        try:
            with self._metrics.stage_seconds.labels("store").time():
                self._store_outputs(uid, result)
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
            self._journal.mark_processed([uid], "failed", reason)
            log.exception("instance %s: %s", uid, reason)
            return "failed"
        return "done"

    def _store_outputs(self, uid: str, result: DatasetResult) -> None:
        """Encode each output into the spool, journal one outbox row per destination that takes
        its kind, then mark the source instance done."""
        for output in result.outputs:
            derived_uid = str(output.dataset.SOPInstanceUID)
            path = self._spool.write_output(encode(output.dataset), sop_uid=derived_uid)
            for destination in self._destinations:
                if destination.outputs is None or output.kind in destination.outputs:
                    self._journal.outbox.add(
                        sop_instance_uid=derived_uid,
                        source_sop_instance_uid=uid,
                        destination=destination.name,
                        path=path,
                        kind=output.kind,
                        method=output.method,
                    )
        fault_point("after-outputs-stored")
        self._journal.mark_processed([uid], "done")

    def _observe(self, result: DatasetResult) -> None:
        """Stage timings, predictions and trust signals of one processed instance into the metrics."""
        for key, milliseconds in result.timings_ms.items():
            stage, _, method = key.partition(":")
            self._metrics.stage_seconds.labels(stage).observe(milliseconds / 1000)
            if stage == "explain":
                self._metrics.explain_seconds.labels(method).observe(milliseconds / 1000)
        for prediction in result.predictions:
            self._metrics.predictions.labels(prediction.class_name).inc()
        model = self._pipeline.model.card.name
        for verdict in result.verdicts:
            self._metrics.explanation_outside_share.labels(model, verdict.method).observe(verdict.shortcut.share)
            if verdict.shortcut.suspected:
                self._metrics.explanation_shortcut_suspected.labels(model, verdict.method).inc()
        for signal in result.ood:
            if signal is not None and signal.out_of_distribution:
                self._metrics.input_out_of_distribution.labels(model).inc()


def _series_outcome(tally: dict[str, int]) -> str:
    """done (all done), skipped/failed (all of one kind), partial (a mix)."""
    kinds = [outcome for outcome, count in tally.items() if count]
    return kinds[0] if len(kinds) == 1 else ("partial" if kinds else "done")


def encode(dataset: Dataset) -> bytes:
    """A derived dataset as DICOM Part 10 bytes (File Meta included)."""
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()
