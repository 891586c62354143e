"""The many-process node (``pacs-xai serve`` with 2 receiver and 2 worker processes, a sender and
their supervisor) under the torture suite's faults:

- SIGKILL at each fault point in the one child that reaches it (``PACSXAI_FAULT_ONCE``: once per
  node; the supervisor restarts the child), and SIGKILL of the whole node (the supervisor; its
  children follow it by PR_SET_PDEATHSIG), then a restart: counted at a real DCMTK storescp;
- a few hundred cases of garbage on the wire against its receivers;
- its data folder's disk filling up while the destination is down: 0xA700, deferral, recovery, and
  the outbox's order kept at the destination.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dicom_io.faults import FAULT_POINTS
from dicom_io.net.network import free_port
from dicom_io.net.scu import Destination, StoreSCU
from service.node.store import Journal
from tests.helpers import wait_for
from tests.torture import report
from tests.torture.conftest import long_run, quiet_logs
from tests.torture.node import (
    INSTANCES,
    WHOLE_NODE,
    Destinations,
    crash_scenarios,
    node_processes,
    phantom_sources,
    serve,
    settle,
    sop_instance_uid,
)
from tests.torture.wire import echo, play
from tests.torture.wire_cases import generate

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]

PROCESSES = (2, 2)
#: Wire cases against the many-process node per CI run (the 10,000 run against one receiver, test_wire.py).
WIRE_CASES = int(os.environ.get("PACSXAI_PROCESSES_WIRE_CASES", 5_000 if long_run() else 300))
WIRE_SEED = 20261206


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return phantom_sources(tmp_path_factory.mktemp("sources"), INSTANCES, seed=37)


# ----------------------------------------------------------------------- a crash between two steps


def test_sigkill_of_one_child_at_each_fault_point_or_of_the_whole_node_delivers_every_result_once(
    sources: list[Path], tmp_path: Path
) -> None:
    """Six scenarios at the same time (each its own node, destination and folder): the five fault
    points, each killing the one child that reaches it, and SIGKILL of the supervisor."""
    crash_scenarios([*FAULT_POINTS, WHOLE_NODE], sources, tmp_path, PROCESSES)


# ----------------------------------------------------------------------------- garbage on the wire


def test_garbage_on_the_wire_against_the_receiver_processes(tmp_path: Path) -> None:
    """A few hundred generated cases (the same generator as test_wire.py) against 2 receiver
    processes on one port: each ends promptly, a valid echo follows it, no receiver dies, and every
    association the receivers journaled is ended afterwards."""
    log, port = tmp_path / "node.log", free_port()
    timeouts = {
        "PACS_XAI_LISTENER__NETWORK_TIMEOUT": "2",
        "PACS_XAI_LISTENER__DIMSE_TIMEOUT": "2",
        "PACS_XAI_LISTENER__MAX_ASSOCIATIONS": "20",
    }
    node = serve(port, tmp_path / "node", 9, log, None, processes=PROCESSES, env=timeouts)
    sources = [f"127.0.0.{60 + i}" for i in range(8)]
    cases = list(generate(WIRE_SEED, WIRE_CASES))
    try:
        pids = node_processes(tmp_path / "node")
        receivers = [pid for pid in pids if b"intake" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(receivers) == PROCESSES[0], receivers

        def run(index: int) -> tuple[str, str, float]:
            source = sources[index % len(sources)]
            outcome = play(cases[index], "127.0.0.1", port, source=source, limit=8)
            after = echo("127.0.0.1", port, source=source) if outcome.prompt else "not tried"
            return outcome.kind, after, outcome.seconds

        with quiet_logs(), ThreadPoolExecutor(len(sources)) as pool:
            verdicts = list(pool.map(run, range(len(cases))))
        stuck = [cases[i].reproduce(WIRE_SEED) for i, v in enumerate(verdicts) if v[0] == "still open"]
        assert not stuck, stuck[:10]
        no_echo = [(cases[i].reproduce(WIRE_SEED), v[1]) for i, v in enumerate(verdicts) if v[1] != "ok"]
        assert not no_echo, no_echo[:10]
        assert node.poll() is None
        assert "exited with status" not in log.read_text(), "a receiver died: " + log.read_text()[-2000:]
        alive = [pid for pid in receivers if Path(f"/proc/{pid}").exists()]
        assert alive == receivers, "a receiver process was replaced"

        def open_associations() -> list[tuple[str, str, float]]:
            journal = Journal(tmp_path / "node" / "journal.sqlite")
            try:
                with journal._connection.transaction(write=False) as db:
                    return db.execute(
                        "SELECT association_id, owner, opened_at FROM associations WHERE ended_at IS NULL"
                    ).fetchall()
            finally:
                journal.close()

        try:
            wait_for(lambda: not open_associations(), 15, "every journaled association to end")
        except BaseException as exc:
            raise AssertionError(f"{exc}: still open in the journal: {open_associations()}") from exc
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=120)
    outcomes = Counter(v[0] for v in verdicts)
    report.record(
        report.Finding(
            "wire",
            f"{len(cases)} generated cases against the many-process node (2 receiver processes on one port, "
            f"{len(sources)} clients in parallel)",
            "each case closed promptly; a valid echo follows; no receiver dies; every association ended",
            len(cases),
            {**report.tally(outcomes), "valid echo after the case": len(cases) - len(no_echo)},
            f"slowest case {max(v[2] for v in verdicts):.2f} s. Found and fixed: a connection closed right after "
            "its acceptance was journaled as open after its end (the end arrives on another thread) and stayed "
            "open until a restart; the acceptance is now reported under the association's lock",
        )
    )


# -------------------------------------------------------------------------------------- full disk


def test_full_disk_with_the_destination_down_keeps_the_outbox_order(small_disk: Path) -> None:
    """The many-process node on a 16 MiB tmpfs, its destination down: outputs of two series wait in
    the outbox (retrying, with jittered backoff); then the disk fills while a third series arrives
    (0xA700 for what does not fit; what was acknowledged waits, deferred); space returns, the caller
    re-sends what was refused, the destination comes up. Everything is delivered, and a real DCMTK
    storescp receives each output in the order the outbox queued it."""
    data_dir, log, port = small_disk / "node", small_disk.parent / "node.log", free_port()
    before = phantom_sources(small_disk.parent / "before", 6, seed=41, series=2)
    during = phantom_sources(small_disk.parent / "during", 6, seed=43, series=1)
    # The destination's port, bound but not listening until storescp takes it: connections are refused
    # meanwhile, and no outgoing connection of this busy machine can take it as its ephemeral port.
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    dest_port = holder.getsockname()[1]
    filler = small_disk / "filler"
    patient = {"PACS_XAI_SEND__MAX_ATTEMPTS": "100000"}  # the outage must not dead-letter the outputs
    node = serve(port, data_dir, dest_port, log, None, processes=PROCESSES, env=patient)
    destination = None
    target = Destination("PACSXAI", "127.0.0.1", port)
    scu = StoreSCU("MODALITY", acse_timeout=10, dimse_timeout=10, network_timeout=10)
    try:
        assert all(o.verdict == "delivered" for o in scu.send(target, before))

        def outbox(states: tuple[str, ...] = ("pending",)) -> list:
            journal = Journal(data_dir / "journal.sqlite")
            try:
                return journal.outbox.entries(states)
            finally:
                journal.close()

        wait_for(lambda: len(outbox()) == len(before), 180, "the first outputs to wait in the outbox")
        wait_for(lambda: all(e.attempts >= 1 for e in outbox()), 30, "a failed send of each")
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        filler.write_bytes(b"\0" * max(0, free - 400 * 1024))
        first = scu.send(target, during)
        acknowledged = [p for p, o in zip(during, first, strict=True) if o.verdict == "delivered"]
        refused = [(p, o) for p, o in zip(during, first, strict=True) if o.verdict != "delivered"]
        assert refused, "the disk never filled"
        assert all("0xA700" in o.detail or "A700" in o.detail.upper() for _, o in refused), [
            o.detail for _, o in refused
        ]
        time.sleep(3)  # the sender and the workers meet the full disk
        filler.unlink()
        again = scu.send(target, [p for p, _ in refused])
        assert all(o.verdict == "delivered" for o in again), [o.detail for o in again]
        wait_for(lambda: len(outbox()) == len(before) + len(during), 180, "every output queued once space returned")
        holder.close()
        destination = Destinations(small_disk.parent / "dest", port=dest_port, log=small_disk.parent / "dest.log")
        settle(data_dir, log, len(before) + len(during), timeout=240)
        queued = [e.sop_instance_uid for e in outbox(("sent",))]
        arrived = destination.arrivals()
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=120)
        holder.close()
        if destination is not None:
            destination.stop()
    first_arrivals = list(dict.fromkeys(arrived))
    assert sorted(first_arrivals) == sorted(queued), "delivered and queued differ"
    assert first_arrivals == queued, f"out of order at the destination:\n{first_arrivals}\nqueued:\n{queued}"
    journal = Journal(data_dir / "journal.sqlite")
    try:
        by_uid = {e.sop_instance_uid: e.source_sop_instance_uid for e in journal.outbox.entries(("sent",))}
        counts = journal.counts()
    finally:
        journal.close()
    early = {sop_instance_uid(p) for p in before}
    positions = [by_uid[uid] in early for uid in first_arrivals]
    assert positions == sorted(positions, reverse=True), "an output of the later series overtook an earlier one"
    assert counts["instances_done"] == len(before) + len(during) and counts["quarantined"] == 0, counts
    report.record(
        report.Finding(
            "exhaustion",
            "many-process node: destination down, outputs of 2 series waiting; the disk fills while a 3rd series "
            "arrives; space returns, then the destination",
            "0xA700 for what cannot be kept; the node recovers without a restart; every output delivered, "
            "in the order the outbox queued it (per destination)",
            len(before) + len(during) + len(refused),
            {
                "acknowledged before the disk filled": len(before),
                "acknowledged on the full disk": len(acknowledged),
                "refused (0xA700), re-sent": len(refused),
                "outputs delivered in queue order": len(first_arrivals),
                "re-deliveries (same UID)": len(arrived) - len(first_arrivals),
            },
            "before the fix the outbox sent the outputs by their own jittered retry time, so after an outage "
            "later outputs overtook earlier ones; now a destination's queue leaves in order, the head's "
            "backoff holding back the rest. The same test found a full disk ending the sender process (and "
            "the single-process node's send thread; now it logs, waits 1 s and goes on) and a worker whose claim "
            "release failed on the full disk holding its series until a restart (now the release is retried)",
            lost=0,
            duplicated=0,
        )
    )
