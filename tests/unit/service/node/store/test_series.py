"""Series assembly and worker claims in the journal (several processes): readiness, one claim per
instance even when workers race on separate connections, release of a dead worker's claims, the
end of a dead receiver's associations. Real SQLite files in tmp_path; time from a clock under the
test's control.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

from service.node.store import Journal, NewOutput, thread_claimant
from tests.unit.service.node.helpers import ROOT_UID, FakeClock, received_instance

IDLE, MAX_WAIT = 5.0, 300.0


def _open(path: Path, clock: FakeClock) -> Journal:
    return Journal(path, clock=clock, durability="process-crash")


def _series_uid(name: str) -> str:
    """A UID per series name (UIDs are digits)."""
    return f"{ROOT_UID}.2." + "".join(str(ord(ch)) for ch in name)


def _instance(n: int, series: str, association: str, at: float):
    return dataclasses.replace(
        received_instance(n, association=association, at=at), series_instance_uid=_series_uid(series)
    )


def _claim(journal: Journal, worker: str):
    return journal.series.claim_ready(worker, idle_seconds=IDLE, max_wait_seconds=MAX_WAIT)


def test_a_series_over_two_associations_waits_for_both_then_is_claimed_whole(tmp_path: Path) -> None:
    clock = FakeClock(1000.0)
    # two receivers = two connections to one file
    receiver_a, receiver_b = _open(tmp_path / "j.sqlite", clock), _open(tmp_path / "j.sqlite", clock)
    worker = _open(tmp_path / "j.sqlite", clock)
    receiver_a.series.association_opened("A", "receiver-0:1")
    receiver_b.series.association_opened("B", "receiver-1:2")
    receiver_a.record_received(_instance(1, "x", "A", 1000.0))
    receiver_b.record_received(_instance(2, "x", "B", 1001.0))
    receiver_a.series.association_ended("A")
    clock.now = 1100.0  # long idle, but B is still open: not ready
    assert _claim(worker, "worker-0:3") is None
    assert worker.series.next_ready_in(idle_seconds=IDLE, max_wait_seconds=MAX_WAIT) == 1000.0 + MAX_WAIT - 1100.0
    receiver_b.series.association_ended("B")
    assert _claim(worker, "worker-0:3") is not None  # ended, and idle for 99 s
    assert worker.series.claimed_by("worker-0:3") == [f"{ROOT_UID}.3.1", f"{ROOT_UID}.3.2"]
    assert _claim(worker, "worker-1:4") is None, "a claimed series must not be claimed again"
    for journal in (receiver_a, receiver_b, worker):
        journal.close()


def test_idle_time_and_max_wait_decide_readiness(tmp_path: Path) -> None:
    clock = FakeClock(2000.0)
    journal = _open(tmp_path / "k.sqlite", clock)
    journal.series.association_opened("open-forever", "receiver-0:1")
    journal.record_received(_instance(1, "slow", "open-forever", 2000.0))
    journal.record_received(_instance(2, "quiet", "gone", 2000.0))  # an association with no row counts as ended
    clock.now = 2000.0 + IDLE - 0.1
    assert _claim(journal, "w:1") is None
    clock.now = 2000.0 + IDLE
    quiet = _claim(journal, "w:1")
    assert quiet is not None and quiet.series_instance_uid == _series_uid("quiet")
    assert _claim(journal, "w:1") is None
    clock.now = 2000.0 + MAX_WAIT  # the open association cannot hold its series back longer
    slow = _claim(journal, "w:1")
    assert slow is not None and slow.sop_instance_uids == (f"{ROOT_UID}.3.1",)
    journal.close()


def test_an_open_association_that_moved_on_to_another_series_holds_the_first_no_longer(tmp_path: Path) -> None:
    """As in memory (:mod:`service.node.assembler`): one association forwarding two series; the
    first is ready idle seconds after its last instance, the second waits while it is open; an
    association that has not moved on still holds its series."""
    clock = FakeClock(3000.0)
    journal = _open(tmp_path / "m.sqlite", clock)
    journal.series.association_opened("A", "receiver-0:1")
    journal.series.association_opened("B", "receiver-0:1")
    journal.record_received(_instance(1, "first", "A", 3000.0))
    journal.record_received(_instance(2, "first", "A", 3000.5))
    journal.record_received(_instance(3, "second", "A", 3001.0))
    journal.record_received(_instance(4, "held", "B", 3000.0))
    journal.record_received(_instance(5, "held", "A", 3000.2))  # A sent "held" too, then moved on
    clock.now = 3000.5 + IDLE - 0.1
    assert _claim(journal, "w:1") is None
    clock.now = 3000.5 + IDLE
    first = _claim(journal, "w:1")
    assert first is not None and first.sop_instance_uids == (f"{ROOT_UID}.3.1", f"{ROOT_UID}.3.2")
    clock.now = 3100.0
    assert _claim(journal, "w:1") is None, "A is on 'second' now, and B still sends 'held'"
    journal.series.association_ended("B")
    held = _claim(journal, "w:1")
    assert held is not None and held.series_instance_uid == _series_uid("held")
    assert _claim(journal, "w:1") is None
    journal.series.association_ended("A")
    second = _claim(journal, "w:1")
    assert second is not None and second.sop_instance_uids == (f"{ROOT_UID}.3.3",)
    journal.close()


def test_the_oldest_ready_series_is_claimed_first_and_later_arrivals_form_a_follow_up(tmp_path: Path) -> None:
    clock = FakeClock(100.0)
    journal = _open(tmp_path / "j.sqlite", clock)
    journal.record_received(_instance(1, "new", "a", 50.0))
    journal.record_received(_instance(2, "old", "a", 10.0))
    first = _claim(journal, "w:1")
    assert first is not None and first.series_instance_uid == _series_uid("old")
    journal.record_received(_instance(3, "old", "b", 99.0))  # arrives while "old" is being processed
    clock.now = 200.0
    assert _claim(journal, "w:1").series_instance_uid == _series_uid("new")
    follow_up = _claim(journal, "w:2")
    assert follow_up is not None and follow_up.sop_instance_uids == (f"{ROOT_UID}.3.3",)
    journal.close()


def test_a_dead_workers_claims_are_released_and_completed_instances_are_not(tmp_path: Path) -> None:
    clock = FakeClock(100.0)
    journal = _open(tmp_path / "j.sqlite", clock)
    for n in (1, 2, 3):
        journal.record_received(_instance(n, "s", "a", 10.0 + n))
    claimed = _claim(journal, "worker-0:77")
    assert claimed is not None and len(claimed.sop_instance_uids) == 3
    output = NewOutput(f"{ROOT_UID}.9.1", f"{ROOT_UID}.3.1", "PACS", Path("/o/1.dcm"), "sc", "gradcam")
    journal.complete(f"{ROOT_UID}.3.1", [output])
    journal.mark_processed([f"{ROOT_UID}.3.2"], "failed", "cannot decode")
    assert journal.series.claimed_by("worker-0:77") == [f"{ROOT_UID}.3.3"]
    assert journal.series.release("worker-0:77") == 1  # the supervisor saw worker-0 die
    again = _claim(journal, "worker-1:78")
    assert again is not None and again.sop_instance_uids == (f"{ROOT_UID}.3.3",)
    assert [e.sop_instance_uid for e in journal.outbox.entries(("pending",))] == [f"{ROOT_UID}.9.1"]
    journal.close()


def test_a_thread_gives_back_only_its_own_claims_and_the_process_gives_back_all_of_its_threads(
    tmp_path: Path,
) -> None:
    """workers.pipeline > 1: a full disk in one thread must not free what a sibling thread is processing."""
    journal = _open(tmp_path / "j.sqlite", FakeClock(100.0))
    for n, series in enumerate(("a", "b", "c", "d")):
        journal.record_received(_instance(n, series, "x", 10.0 + n))
    claimants = [thread_claimant("worker-0:7", 0), thread_claimant("worker-0:7", 1), thread_claimant("worker-0:77", 0)]
    for claimant in (*claimants, "worker-0:7"):
        assert _claim(journal, claimant) is not None
    assert journal.series.release(claimants[1]) == 1  # thread 1: a full disk
    assert [journal.series.claimed_by(c) for c in claimants] == [[f"{ROOT_UID}.3.0"], [], [f"{ROOT_UID}.3.2"]]
    assert journal.series.release("worker-0:7") == 2  # the process died: its threads' claims and its own
    assert journal.series.claimed_by(claimants[0]) == [] and journal.series.claimed_by("worker-0:7") == []
    assert journal.series.claimed_by(claimants[2]) == [f"{ROOT_UID}.3.2"]  # worker-0:77 is another process
    journal.close()


def test_a_dead_receivers_open_associations_end_and_its_series_becomes_ready(tmp_path: Path) -> None:
    clock = FakeClock(100.0)
    journal = _open(tmp_path / "j.sqlite", clock)
    journal.series.association_opened("A", "receiver-0:5")
    journal.series.association_opened("B", "receiver-1:6")
    journal.record_received(_instance(1, "s", "A", 100.0))
    clock.now = 200.0
    assert _claim(journal, "w:1") is None
    assert journal.series.end_associations_of("receiver-0:5") == 1
    assert journal.series.end_associations_of("receiver-0:5") == 0
    assert _claim(journal, "w:1") is not None
    assert journal.series.end_all_associations() == 1  # B, at the next start-up
    journal.close()


def test_workers_racing_on_separate_connections_never_claim_the_same_instance(tmp_path: Path) -> None:
    clock = FakeClock(10_000.0)
    path = tmp_path / "j.sqlite"
    setup = _open(path, clock)
    for n in range(60):
        setup.record_received(_instance(n, f"s{n % 20}", "a", 1.0 + n))
    workers = [_open(path, clock) for _ in range(4)]
    taken: dict[str, list[tuple[str, ...]]] = {}
    start = threading.Barrier(len(workers))

    def work(index: int, journal: Journal) -> None:
        start.wait()
        mine = taken.setdefault(f"w{index}", [])
        while (ready := _claim(journal, f"w{index}:1")) is not None:
            mine.append(ready.sop_instance_uids)

    threads = [threading.Thread(target=work, args=item) for item in enumerate(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    claimed = [uid for batches in taken.values() for batch in batches for uid in batch]
    assert len(claimed) == 60 and len(set(claimed)) == 60, "every instance claimed exactly once"
    assert sum(len(batches) for batches in taken.values()) == 20, "one claim per series"
    for journal in (setup, *workers):
        journal.close()


def test_claim_series_takes_every_unclaimed_waiting_instance_of_one_series_whatever_its_readiness(
    tmp_path: Path,
) -> None:
    """The queue's workers decide readiness themselves; the journal still keeps two from one instance."""
    clock = FakeClock(1_000.0)
    with _open(tmp_path / "j.sqlite", clock) as journal:
        journal.series.association_opened("open", "receiver-0:1")  # still open: claim_ready would wait
        a = [_instance(n, "a", "open", 1_000.0 + n) for n in range(3)]
        b = _instance(9, "b", "open", 1_000.0)
        for instance in [*a, b]:
            journal.record_received(instance)
        journal.mark_processed([a[1].sop_instance_uid], "done")
        study, series = a[0].study_instance_uid, a[0].series_instance_uid
        assert _claim(journal, "worker-0:1") is None
        assert journal.series.claim_series("worker-0:1", study, series) == (
            a[0].sop_instance_uid,
            a[2].sop_instance_uid,
        )
        assert journal.series.claim_series("worker-1:2", study, series) == ()  # claimed already
        assert journal.series.claimed_by("worker-0:1") == [a[0].sop_instance_uid, a[2].sop_instance_uid]
