"""Series completion: ready on release + idle, forced by max wait, follow-ups, restore (fake clock, no sleeps)."""

from __future__ import annotations

import threading
import time

import pytest

from service.node.assembler import Assembler, SeriesKey
from tests.unit.service.node.helpers import FakeClock

CT = SeriesKey("1.2.3.1", "1.2.3.1.1")
MR = SeriesKey("1.2.3.1", "1.2.3.1.2")


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock(100.0)  # monotonic seconds


@pytest.fixture()
def assembler(clock: FakeClock) -> Assembler:
    return Assembler(idle_seconds=5.0, max_wait_seconds=60.0, clock=clock)


def test_ready_only_after_the_association_ended_and_idle_passed(assembler: Assembler, clock: FakeClock) -> None:
    assembler.instance_arrived(CT, "1.1", "assoc-A")
    clock.now += 3
    assembler.instance_arrived(CT, "1.2", "assoc-A")
    clock.now += 10
    assert assembler.take_ready() == []  # idle long enough, but the association is open
    assembler.association_ended("assoc-A")
    assert assembler.take_ready() == [(CT, ["1.1", "1.2"])]
    assert assembler.pending() == 0 and assembler.take_ready() == []


def test_idle_counts_from_the_last_arrival(assembler: Assembler, clock: FakeClock) -> None:
    assembler.instance_arrived(CT, "1.1", "assoc-A")
    assembler.association_ended("assoc-A")
    clock.now += 4.9
    assert assembler.take_ready() == []
    assembler.instance_arrived(CT, "1.2", "assoc-B")
    assembler.association_ended("assoc-B")
    clock.now += 4.9
    assert assembler.take_ready() == []
    clock.now += 0.1
    assert assembler.take_ready() == [(CT, ["1.1", "1.2"])]


def test_max_wait_forces_readiness_with_an_open_association(assembler: Assembler, clock: FakeClock) -> None:
    assembler.instance_arrived(CT, "1.1", "assoc-A")
    for _ in range(11):
        clock.now += 5.5
        assembler.instance_arrived(CT, f"1.{_ + 2}", "assoc-A")  # never idle, never released
        if clock.now - 100.0 < 60.0:
            assert assembler.take_ready() == []
    ready = assembler.take_ready()
    assert [key for key, _ in ready] == [CT] and len(ready[0][1]) == 12
    # The still-open association's next instance starts a new batch, which it holds back again.
    assembler.instance_arrived(CT, "1.99", "assoc-A")
    clock.now += 10
    assert assembler.take_ready() == []
    assembler.association_ended("assoc-A")
    assert assembler.take_ready() == [(CT, ["1.99"])]


def test_two_associations_for_one_series(assembler: Assembler, clock: FakeClock) -> None:
    assembler.instance_arrived(CT, "1.1", "assoc-A")
    assembler.instance_arrived(CT, "1.2", "assoc-B")
    assembler.association_ended("assoc-A")
    clock.now += 10
    assert assembler.take_ready() == []  # B still open
    assembler.association_ended("assoc-B")
    assert assembler.take_ready() == [(CT, ["1.1", "1.2"])]


def test_series_are_independent_and_oldest_first(assembler: Assembler, clock: FakeClock) -> None:
    assembler.instance_arrived(MR, "2.1", "assoc-A")
    clock.now += 1
    assembler.instance_arrived(CT, "1.1", "assoc-B")
    assembler.association_ended("assoc-A")
    clock.now += 5
    assert assembler.take_ready() == [(MR, ["2.1"])]
    assembler.association_ended("assoc-B")
    assert assembler.take_ready() == [(CT, ["1.1"])]


def test_follow_up_after_take_ready_is_a_new_batch(assembler: Assembler, clock: FakeClock) -> None:
    assembler.instance_arrived(CT, "1.1", "assoc-A")
    assembler.association_ended("assoc-A")
    clock.now += 5
    assert assembler.take_ready() == [(CT, ["1.1"])]
    assembler.instance_arrived(CT, "1.2", "assoc-B")
    assembler.instance_arrived(CT, "1.1", "assoc-B")  # a re-sent instance is part of the follow-up
    assembler.instance_arrived(CT, "1.2", "assoc-B")  # repeated within a batch: counted once
    assert assembler.pending() == 2
    assembler.association_ended("assoc-B")
    clock.now += 5
    assert assembler.take_ready() == [(CT, ["1.2", "1.1"])]


def test_restore_after_restart_is_ready_after_idle(assembler: Assembler, clock: FakeClock) -> None:
    assembler.restore(CT, "1.1")
    assembler.restore(CT, "1.2")
    assembler.restore(MR, "2.1", received_at_monotonic=clock.now - 10)
    assert assembler.pending() == 3
    assert assembler.take_ready() == [(MR, ["2.1"])]
    clock.now += 5
    assert assembler.take_ready() == [(CT, ["1.1", "1.2"])]


def test_restored_batch_joined_by_a_live_association_waits_for_it(assembler: Assembler, clock: FakeClock) -> None:
    assembler.restore(CT, "1.1")
    assembler.instance_arrived(CT, "1.2", "assoc-A")
    clock.now += 5
    assert assembler.take_ready() == []
    assembler.association_ended("assoc-A")
    assert assembler.take_ready() == [(CT, ["1.1", "1.2"])]


@pytest.mark.parametrize(
    ("idle", "max_wait", "message"),
    [
        (0, 10, "idle_seconds.*0"),
        (-1, 10, "-1"),
        (10, 5, r"max_wait_seconds \(5\).*idle_seconds \(10\)"),
        (float("nan"), 10, "nan"),
        (1, float("inf"), "inf"),
    ],
)
def test_settings_are_validated(idle: float, max_wait: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Assembler(idle_seconds=idle, max_wait_seconds=max_wait)


def test_thread_safe_arrivals(assembler: Assembler, clock: FakeClock) -> None:
    def arrive(thread: int) -> None:
        for k in range(200):
            assembler.instance_arrived(CT, f"{thread}.{k}", f"assoc-{thread}")
        assembler.association_ended(f"assoc-{thread}")

    threads = [threading.Thread(target=arrive, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    clock.now += 5
    ((key, uids),) = assembler.take_ready()
    assert key == CT and len(uids) == 800 == len(set(uids))


# --- waiting for a ready series (real clock; bounds are loose: they tell a wake-up from a timeout) --


def _waiter(assembler: Assembler, timeout: float) -> tuple[threading.Thread, dict[str, object]]:
    out: dict[str, object] = {}

    def wait() -> None:
        started = time.monotonic()
        out["ready"] = assembler.wait_ready(timeout=timeout)
        out["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=wait)
    thread.start()
    return thread, out


def test_wait_ready_wakes_when_a_series_becomes_ready() -> None:
    """A waiting processing thread gets the series once its association ended and the idle time
    passed, not at the end of its long timeout."""
    assembler = Assembler(idle_seconds=0.2, max_wait_seconds=60.0)
    thread, out = _waiter(assembler, timeout=30)
    time.sleep(0.1)  # the waiter is asleep on an empty assembler
    assembler.instance_arrived(CT, "1.1", "assoc-1")
    assembler.association_ended("assoc-1")
    thread.join(timeout=30)
    assert out["ready"] == [(CT, ["1.1"])]
    assert 0.2 <= out["seconds"] < 10  # after the idle time, long before the timeout


def test_wait_ready_respects_an_open_association_until_max_wait() -> None:
    assembler = Assembler(idle_seconds=0.05, max_wait_seconds=0.5)
    assembler.instance_arrived(CT, "1.1", "assoc-1")  # never released
    started = time.monotonic()
    assert assembler.wait_ready(timeout=30) == [(CT, ["1.1"])]
    assert 0.4 <= time.monotonic() - started < 10


def test_wait_ready_returns_empty_on_timeout_and_on_wake() -> None:
    assembler = Assembler(idle_seconds=0.05, max_wait_seconds=60.0)
    started = time.monotonic()
    assert assembler.wait_ready(timeout=0.2) == []
    assert time.monotonic() - started >= 0.2
    thread, out = _waiter(assembler, timeout=30)
    time.sleep(0.1)
    assembler.wake()
    thread.join(timeout=30)
    assert out["ready"] == [] and out["seconds"] < 10


def test_an_open_association_that_moved_on_to_another_series_holds_the_first_no_longer(
    assembler: Assembler, clock: FakeClock
) -> None:
    """A PACS forwarding many series over one association: each is ready idle_seconds after its
    last instance once the association sends another series; the series it sends now waits."""
    assembler.instance_arrived(CT, "1.1", "assoc-A")
    assembler.instance_arrived(CT, "1.2", "assoc-A")
    clock.now += 1
    assembler.instance_arrived(MR, "2.1", "assoc-A")
    clock.now += 3.9
    assert assembler.take_ready() == [], "idle counts from the series' last instance"
    clock.now += 0.1
    assert assembler.take_ready() == [(CT, ["1.1", "1.2"])]
    clock.now += 30
    assert assembler.take_ready() == [], "the series the open association sends now is held"
    assembler.association_ended("assoc-A")
    assert assembler.take_ready() == [(MR, ["2.1"])]


def test_series_interleaved_within_idle_seconds_are_held_while_the_interleaving_goes_on(
    assembler: Assembler, clock: FakeClock
) -> None:
    for n in range(6):
        assembler.instance_arrived((CT, MR)[n % 2], f"{n % 2 + 1}.{n}", "assoc-A")
        clock.now += 1
        assert assembler.take_ready() == []
    clock.now += 4  # the sender paused: CT (moved on from, idle 5 s) is ready; MR, sent last, is held
    assert assembler.take_ready() == [(CT, ["1.0", "1.2", "1.4"])]
    assembler.association_ended("assoc-A")
    assert assembler.take_ready() == [(MR, ["2.1", "2.3", "2.5"])]


def test_another_association_still_sending_the_series_holds_it(assembler: Assembler, clock: FakeClock) -> None:
    assembler.instance_arrived(CT, "1.1", "assoc-A")
    assembler.instance_arrived(CT, "1.2", "assoc-B")
    assembler.instance_arrived(MR, "2.1", "assoc-A")  # A moved on; B has not
    clock.now += 10
    assert assembler.take_ready() == []
    assembler.association_ended("assoc-B")
    assert [key for key, _ in assembler.take_ready()] == [CT]
