"""A worker process's pipeline threads claiming ready series from the journal (no Redis): a retry
after a full disk in one thread gives back that thread's claims only. Real SQLite journal; the
processor stands in for the pipeline (tested in test_processor.py)."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence

from service.node.assembler import SeriesKey
from service.node.config import load_config
from service.node.store import Journal, ReceivedInstance, StoreError, thread_claimant
from service.node.worker import _claim_loop
from tests.unit.service.node.helpers import received_instance


class _OneHoldsOneFails:
    """The batch of series ``held`` waits (its thread keeps its claims) until told to finish; any
    other meets a full disk."""

    def __init__(self, journal: Journal, held: str) -> None:
        self.journal = journal
        self.held = held
        self.holding = threading.Event()
        self.finish = threading.Event()
        self.processed: list[str] = []

    def process_batch(self, key: SeriesKey, instances: Sequence[ReceivedInstance]) -> dict[str, int]:
        if key.series_instance_uid != self.held:
            raise StoreError("No space left on device")
        self.holding.set()
        self.finish.wait(10)
        self.processed.append(key.series_instance_uid)
        self.journal.mark_processed([i.sop_instance_uid for i in instances], "done")
        return {"done": len(instances), "skipped": 0, "failed": 0}


def test_a_full_disk_in_one_pipeline_thread_gives_back_its_claims_not_its_siblings(journal: Journal) -> None:
    config = load_config(None, {"assembly": {"idle_seconds": 0.01, "max_wait_seconds": 0.02}})
    series = [received_instance(0).series_instance_uid, f"{received_instance(0).series_instance_uid}.2"]
    for n, uid in enumerate(series):
        journal.record_received(dataclasses.replace(received_instance(n, at=10.0 + n), series_instance_uid=uid))
    processor = _OneHoldsOneFails(journal, series[0])
    stop = threading.Event()
    threads = [
        threading.Thread(target=_claim_loop, args=(config, thread_claimant("worker-0:1", n), journal, processor, stop))
        for n in range(2)
    ]
    for thread in threads:
        thread.start()
    try:
        assert processor.holding.wait(10)
        deadline = time.monotonic() + 10
        while (taken := journal.series.claim_ready("worker-1:2-0", idle_seconds=0.01, max_wait_seconds=0.02)) is None:
            assert time.monotonic() < deadline, "the failed thread never gave its series back"
            time.sleep(0.01)
        # Another worker gets the failed thread's series, never the one a sibling thread is processing.
        assert taken.series_instance_uid == series[1]
    finally:
        processor.finish.set()
        stop.set()
        for thread in threads:
            thread.join(10)
    assert processor.processed == [series[0]]
