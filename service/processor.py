"""Series-level processing for the node: spool -> pipeline -> outbox, every step journaled.

For each instance of a ready batch: read it from the spool, run the
:class:`~service.pipeline.ExplainPipeline`, write each output object to the outbox folder and
journal one outbox row per (output, destination that wants its kind), then mark the instance
processed. Outputs are journaled before the instance is marked done, so a crash in between
reprocesses the instance on restart; its derived UIDs are deterministic, so the outbox rows are
the same rows (``add_output`` is idempotent) and the destination receives replacements, never
duplicates.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from io import BytesIO

import pydicom
from pydicom.dataset import Dataset

from dicom_io.errors import DicomInputError
from dicom_io.pixels import read_dataset
from service.assembler import SeriesKey
from service.config import DestinationConfig
from service.explain import ExplainerError
from service.pipeline import ExplainPipeline
from service.store import Journal, ReceivedInstance, Spool

log = logging.getLogger(__name__)


class SeriesProcessor:
    """Processes ready batches; dependencies passed in, no state between batches."""

    def __init__(
        self,
        pipeline: ExplainPipeline,
        spool: Spool,
        journal: Journal,
        destinations: Sequence[DestinationConfig],
    ) -> None:
        self._pipeline = pipeline
        self._spool = spool
        self._journal = journal
        self._destinations = tuple(destinations)

    def process_batch(self, key: SeriesKey, instances: Sequence[ReceivedInstance]) -> dict[str, int]:
        """Process one batch of a series; returns how many instances ended done/skipped/failed."""
        tally = {"done": 0, "skipped": 0, "failed": 0}
        for instance in instances:
            outcome = self._process_instance(instance)
            tally[outcome] += 1
        log.info("series %s batch of %d processed: %s", key.series_instance_uid, len(instances), tally)
        return tally

    def _process_instance(self, instance: ReceivedInstance) -> str:
        uid = instance.sop_instance_uid
        try:
            result = self._pipeline.process(read_dataset(instance.path))
        except (DicomInputError, ExplainerError) as exc:
            self._journal.mark_processed([uid], "failed", str(exc))
            log.warning("instance %s cannot be processed: %s", uid, exc)
            return "failed"
        except Exception as exc:  # a bug must not stop the node; it is journaled with its reason and logged
            self._journal.mark_processed([uid], "failed", f"internal error: {type(exc).__name__}: {exc}")
            log.exception("instance %s failed with an internal error", uid)
            return "failed"
        if result.skipped_reason:
            self._journal.mark_processed([uid], "skipped", result.skipped_reason)
            log.info("instance %s skipped: %s", uid, result.skipped_reason)
            return "skipped"
        for output in result.outputs:
            derived_uid = str(output.dataset.SOPInstanceUID)
            path = self._spool.write_output(encode(output.dataset), sop_uid=derived_uid)
            for destination in self._destinations:
                if destination.outputs is None or output.kind in destination.outputs:
                    self._journal.add_output(
                        sop_instance_uid=derived_uid,
                        source_sop_instance_uid=uid,
                        destination=destination.name,
                        path=path,
                        kind=output.kind,
                        method=output.method,
                    )
        self._journal.mark_processed([uid], "done")
        return "done"


def encode(dataset: Dataset) -> bytes:
    """A derived dataset as DICOM Part 10 bytes (File Meta included)."""
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()
