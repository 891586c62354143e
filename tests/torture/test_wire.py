"""Garbage on the wire: raw sockets against a running receiver (the node's Storage SCP with its real
receiver, spool and journal), thousands of generated broken conversations, and the slot-exhaustion
bug that started the issue.

After every case: the node closed the connection (abort, reject, failure status, or its own
timeout), the calling address holds no connection any more, and a valid C-ECHO association from
the same address succeeds. Across the run: the node's threads come back to where they were and
its resident memory stays bounded.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_io.net.scp import ListenerSettings, StorageSCP
from service.node.assembler import Assembler
from service.node.metrics import create_metrics
from service.node.receiver import Receiver
from service.node.store import Journal, Spool
from tests.helpers import require_dcmtk
from tests.torture import pdu as P
from tests.torture import report
from tests.torture.conftest import long_run, quiet_logs, resident_mib
from tests.torture.wire import connect, echo, play
from tests.torture.wire_cases import CATEGORIES, Case, generate

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]

LOCALHOST = "127.0.0.1"
#: Cases per CI run (at least 10,000, the issue's floor); PACSXAI_TORTURE_LONG=1 runs 200,000.
CASES = int(os.environ.get("PACSXAI_WIRE_CASES", 200_000 if long_run() else 10_000))
SEED = int(os.environ.get("PACSXAI_WIRE_SEED", 20261205))
#: Clients in parallel, each from its own loopback address (slots are counted per address). Most of
#: a case's time is waiting for the node's timeouts: 16 clients run the cases a third faster than 8
#: on 2 cores (1,500 cases: 36 s against 54 s), 32 barely faster again (33 s).
CLIENTS = int(os.environ.get("PACSXAI_WIRE_CLIENTS", 16))
#: The node's network and DIMSE timeouts in this file: short, so a case that leaves an association
#: waiting for data costs ~2 s.
TIMEOUT = 2.0
#: The ACSE timeout (the A-ASSOCIATE-RQ deadline and the Upper Layer's ARTIM timer) stays at its
#: default: a slot held until it expires (the bug this file hunts) shows as 30 s, far above any
#: scheduling delay of a loaded CI machine, so "freed at once" is a bound of HELD_LIMIT.
ACSE_TIMEOUT = 30.0
HELD_LIMIT = 10.0


@dataclass
class RunningNode:
    scp: StorageSCP
    journal: Journal

    @property
    def port(self) -> int:
        return self.scp.port


def start_node(data_dir: Path, **settings: object) -> RunningNode:
    """The node's receiving side as ``Node`` builds it: Storage SCP, receiver, spool, journal."""
    spool = Spool(data_dir / "spool", durability="process-crash")
    journal = Journal(data_dir / "journal.sqlite", durability="process-crash")
    receiver = Receiver(spool, journal, Assembler(idle_seconds=60, max_wait_seconds=600), create_metrics())
    values: dict = {"port": 0, "acse_timeout": ACSE_TIMEOUT, "network_timeout": TIMEOUT, "dimse_timeout": TIMEOUT}
    values.update(settings)
    scp = StorageSCP(ListenerSettings(**values), receiver)
    scp.start()
    return RunningNode(scp, journal)


@pytest.fixture()
def node(tmp_path: Path) -> Iterator[RunningNode]:
    running = start_node(tmp_path, max_associations=2 * CLIENTS + 2)
    yield running
    running.scp.stop()
    running.journal.close()


def wait_freed(scp: StorageSCP, host: str | None, timeout: float = 2.0, *, fail: bool = True) -> float:
    """Seconds until ``host`` (or everyone) holds no connection; past ``timeout`` the test fails
    (or, with ``fail=False``, ``inf`` is returned)."""
    started = time.monotonic()
    while scp._server is not None and scp._server.gate.live(host):
        if time.monotonic() - started > timeout:
            if not fail:
                return float("inf")
            pytest.fail(f"{scp._server.gate.live(host)} connection(s) from {host} still held after {timeout} s")
        time.sleep(0.002)
    return time.monotonic() - started


def pynetdicom_echo(port: int, calling: str = "PYNETDICOM") -> int | None:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate(LOCALHOST, port, ae_title="PACSXAI")
    if not assoc.is_established:
        return None
    status = assoc.send_c_echo()
    assoc.release()
    return int(status.Status) if "Status" in status else None


def echoscu(port: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [require_dcmtk("echoscu"), "-aet", "DCMTK", "-aec", "PACSXAI", "-to", "5", LOCALHOST, str(port)],
        capture_output=True,
        text=True,
        timeout=30,
    )


# ------------------------------------------------------------------------ the slot-exhaustion bug


def test_twenty_broken_connections_leave_every_slot_free_and_the_next_caller_is_served(tmp_path: Path) -> None:
    """The issue's first finding: 20 garbage or mutated-request connections used to hold their
    slots for the ACSE timeout (30 s of "local limit exceeded" for everyone). With the default
    limits (10 associations, ACSE timeout 30 s) each broken connection must end at once."""
    running = start_node(tmp_path, acse_timeout=30, network_timeout=60, dimse_timeout=60)
    try:
        garbage = [b"\x00" * 20, b"GET / HTTP/1.1\r\n\r\n", P.ABORT, P.pdu(0x01, b"\xff" * 40)]
        mutated = P.associate_rq()[:6] + b"\x00\x02" + P.associate_rq()[8:]  # protocol version 2
        closes: list[float] = []
        for index in range(20):
            data = garbage[index % len(garbage)] if index % 2 else mutated
            with connect(LOCALHOST, running.port) as sock:
                sock.sendall(data)
                answer = P.read_until_closed(sock, timeout=5)
            assert answer.closed, f"connection {index} ({data[:12]!r}) still open: {answer.describe()}"
            closes.append(answer.seconds)
        freed = wait_freed(running.scp, None)
        started = time.monotonic()
        assert pynetdicom_echo(running.port) == 0x0000
        result = echoscu(running.port)
        assert result.returncode == 0, f"DCMTK echoscu after 20 broken connections: {result.stderr or result.stdout}"
        served = time.monotonic() - started
    finally:
        running.scp.stop()
        running.journal.close()
    assert max(closes) < 1.0, f"a broken connection took {max(closes):.2f} s to close (ACSE timeout 30 s)"
    report.record(
        report.Finding(
            "wire",
            "20 malformed connections in a row (garbage, mutated A-ASSOCIATE-RQ), ACSE timeout 30 s",
            "each broken connection is closed at once; the next caller (pynetdicom, DCMTK echoscu) is served",
            20,
            {"closed within 1 s": 20, "valid echoes after": 2},
            "before the fix every slot was held until the ACSE timeout: 29 s of A-ASSOCIATE-RJ "
            f"'local limit exceeded' to everyone. Now: slowest close {max(closes) * 1000:.0f} ms, all slots "
            f"free {freed * 1000:.0f} ms later, both echoes served in {served:.2f} s.",
        )
    )


def test_one_host_cannot_take_every_slot(tmp_path: Path) -> None:
    """max_associations 6 leaves a host at most 4 connections: its fifth is refused with
    A-ASSOCIATE-RJ "local limit exceeded" at once, while another address still gets in."""
    running = start_node(tmp_path, max_associations=6, acse_timeout=30, network_timeout=30)
    held = []
    try:
        for _ in range(4):
            sock = connect(LOCALHOST, running.port, "127.0.0.2")
            sock.sendall(P.associate_rq())
            assert P.read_pdu(sock)[0] == P.A_ASSOCIATE_AC
            held.append(sock)
        with connect(LOCALHOST, running.port, "127.0.0.2") as extra:
            extra.sendall(P.associate_rq())
            answer = P.read_until_closed(extra, timeout=5)
        assert answer.types == (P.A_ASSOCIATE_RJ,), answer.describe()
        result, source, reason = answer.pdus[0][1][1:4]
        assert (result, source, reason) == (2, 3, 2), (
            "expected rejected-transient, provider (presentation), local limit"
        )
        assert echo(LOCALHOST, running.port, source="127.0.0.3") == "ok"
    finally:
        for sock in held:
            sock.close()
        running.scp.stop()
        running.journal.close()
    report.record(
        report.Finding(
            "wire",
            "one calling address opens more connections than its share",
            "at most max_associations - 2 per address; the rest get A-ASSOCIATE-RJ at once; others still get in",
            5,
            {"accepted": 4, "rejected (local limit exceeded)": 1, "other address served": 1},
            "",
        )
    )


# ---------------------------------------------------------------------------------- the fuzzer


@dataclass(frozen=True)
class Verdict:
    case: Case
    kind: str
    answer: str
    seconds: float
    freed: float
    echo: str


def run_case(node: RunningNode, case: Case, source: str) -> Verdict:
    outcome = play(case, LOCALHOST, node.port, source=source, limit=TIMEOUT * 3 + 2)
    freed = wait_freed(node.scp, source, timeout=ACSE_TIMEOUT + 5, fail=False) if outcome.prompt else float("nan")
    after = echo(LOCALHOST, node.port, source=source) if outcome.prompt else "not tried"
    return Verdict(case, outcome.kind, outcome.answer, outcome.seconds, freed, after)


def test_ten_thousand_broken_conversations(node: RunningNode) -> None:
    """Every generated case ends promptly, frees its slot, and a valid association follows."""
    assert CASES >= 10_000 or os.environ.get("PACSXAI_WIRE_CASES"), "the issue asks for at least 10,000 cases per run"
    threads_before = threading.active_count()
    cases = list(generate(SEED, CASES))
    sources = [f"127.0.0.{10 + i}" for i in range(CLIENTS)]
    started = time.monotonic()
    verdicts: list[Verdict] = []
    with quiet_logs():
        # warm-up: the first few hundred cases allocate what the node keeps (threads' stacks, caches)
        with ThreadPoolExecutor(CLIENTS) as pool:
            warm = len(cases) // 20
            verdicts += pool.map(lambda i: run_case(node, cases[i], sources[i % CLIENTS]), range(warm))
            rss_warm = resident_mib()
            verdicts += pool.map(lambda i: run_case(node, cases[i], sources[i % CLIENTS]), range(warm, len(cases)))
    seconds = time.monotonic() - started
    rss_end = resident_mib()

    stuck = [v for v in verdicts if v.kind == "still open"]
    assert not stuck, "\n".join(f"{v.case.reproduce(SEED)}: {v.answer}, still open" for v in stuck[:10])
    slow = [v for v in verdicts if v.seconds > TIMEOUT * 2 + 1]
    assert not slow, "\n".join(f"{v.case.reproduce(SEED)}: {v.answer} after {v.seconds:.2f} s" for v in slow[:10])
    held = [v for v in verdicts if v.freed >= HELD_LIMIT]
    assert not held, "\n".join(
        f"{v.case.reproduce(SEED)}: slot held {v.freed:.2f} s after the close" for v in held[:10]
    )
    no_echo = [v for v in verdicts if v.echo != "ok"]
    assert not no_echo, "\n".join(f"{v.case.reproduce(SEED)}: echo after it: {v.echo}" for v in no_echo[:10])
    assert pynetdicom_echo(node.port) == 0x0000
    assert echoscu(node.port).returncode == 0
    deadline = time.monotonic() + 5
    while threading.active_count() > threads_before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= threads_before + 1, (
        f"{threading.active_count()} threads, {threads_before} before"
    )
    assert rss_end - rss_warm < 64, f"resident memory grew {rss_end - rss_warm:.0f} MiB after warm-up"

    by_category: dict[str, Counter[str]] = {name: Counter() for name in CATEGORIES}
    for v in verdicts:
        by_category[v.case.category][v.kind] += 1
    for name, outcomes in by_category.items():
        freed = sorted(v.freed for v in verdicts if v.case.category == name)
        report.record(
            report.Finding(
                "wire",
                name,
                "closed by abort, reject, status or the node's own timeout; slot freed; a valid echo follows",
                sum(outcomes.values()),
                report.tally(outcomes),
                f"slot free after the client saw the close: median {_ms(freed, 0.5)}, 99th percentile "
                f"{_ms(freed, 0.99)}, at most {_ms(freed, 1.0)}",
            )
        )
    worst = max(v.freed for v in verdicts)
    report.record(
        report.Finding(
            "wire",
            f"all {len(verdicts)} generated cases ({CLIENTS} clients in parallel, ACSE timeout {ACSE_TIMEOUT:.0f} s, "
            f"network timeout {TIMEOUT:.0f} s)",
            "the node keeps running, threads back to their count, memory bounded",
            len(verdicts),
            {"valid echo after the case": len(verdicts) - len(no_echo)},
            f"{seconds:.0f} s in all; slot free at most {worst * 1000:.0f} ms after the client saw the close; "
            f"resident memory {rss_warm:.0f} MiB after warm-up, {rss_end:.0f} MiB at the end; "
            f"threads {threading.active_count()} (before: {threads_before}). Found and fixed: an unknown PDU "
            "type or a first PDU other than A-ASSOCIATE-RQ left the connection open until the peer closed "
            "it; a DIMSE message that was not a valid request was ignored and its association left waiting.",
        )
    )


def _ms(values: list[float], quantile: float) -> str:
    """The ``quantile`` of sorted ``values`` (seconds) in ms."""
    return f"{values[min(len(values) - 1, int(quantile * len(values)))] * 1000:.0f} ms"
