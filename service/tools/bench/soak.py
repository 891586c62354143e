"""``pacs-xai bench soak``: thousands of instances over parallel associations into the node's receive
path, with its resident memory, open file descriptors and threads sampled as they arrive.

What it answers: does the node leak while it works for a long time? The node's side is the
receive path as ``pacs-xai serve`` runs it (Storage SCP with its connection guard, parse, spool,
SQLite journal, assembler), in this process; the senders are DCMTK storescu processes (one
association each), so they add nothing to what is measured. The peer in the same run is DCMTK
storescp receiving the same files from the same senders (one process, no fork: it serves the
associations one after another), sampled the same way through /proc.

Figures: resident memory, file descriptors and threads after warm-up (the first 10 % of the
instances), their highest value after it, and after the last association; the growth of resident
memory from warm-up to its peak in %; ``soak.json`` and ``soak.png`` (the three curves against
instances received).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dicom_io.net.scp import ListenerSettings, StorageSCP
from dicom_io.net.scu import Destination
from service.node.assembler import Assembler
from service.node.metrics import create_metrics
from service.node.receiver import Receiver
from service.node.store import Durability, Journal, Spool
from service.tools.bench.receive import fresh_copies, running_storescp, send_parallel
from service.tools.progress import Progress

#: The instance sent (copied with fresh UIDs): pydicom's CT 128x128 test file, 39 KiB.
SOURCE = "CT_small.dcm"
#: Samples per second.
SAMPLE_HZ = 4
#: The share of the instances after which the node counts as warmed up.
WARM_UP_SHARE = 0.1


@dataclass(frozen=True)
class Sample:
    seconds: float
    received: int
    rss_mib: float
    fds: int
    threads: int


@dataclass
class SoakFigures:
    """One receiver's run: at warm-up, the highest value after it, and after the last association."""

    receiver: str
    count: int
    associations: int
    seconds: float
    rss_warm_mib: float
    rss_peak_mib: float
    rss_end_mib: float
    fds_warm: int
    fds_peak: int
    fds_end: int
    threads_warm: int
    threads_peak: int
    threads_end: int
    samples: list[Sample] = field(default_factory=list)

    @property
    def rss_growth_percent(self) -> float:
        """Growth of resident memory from warm-up to its highest point after it."""
        return 100.0 * (self.rss_peak_mib - self.rss_warm_mib) / self.rss_warm_mib if self.rss_warm_mib else 0.0

    @property
    def per_second(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0


def process_state(pid: int | str = "self") -> tuple[float, int, int]:
    """(resident MiB, open file descriptors, threads) of a process, from /proc (Linux)."""
    rss, threads = 0.0, 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd")), threads


class _Sampler:
    """Samples ``pid`` and a received count ``SAMPLE_HZ`` times a second in a thread."""

    def __init__(self, pid: int | str, received: Callable[[], int]) -> None:
        self._pid, self._received = pid, received
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)
        self._started = time.monotonic()

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(1 / SAMPLE_HZ):
            self._sample()

    def _sample(self) -> None:
        try:
            rss, fds, threads = process_state(self._pid)
        except (FileNotFoundError, ProcessLookupError):
            return
        self.samples.append(Sample(time.monotonic() - self._started, self._received(), rss, fds, threads))


class _Counting:
    """The node's receiver, counting what it answered."""

    def __init__(self, receiver: Receiver) -> None:
        self._receiver = receiver
        self.stored = 0
        self.statuses: dict[int, int] = {}
        self._lock = threading.Lock()

    def on_store(self, encoded: bytes, *, calling_ae: str, association_id: str) -> int:
        return self._count(self._receiver.on_store(encoded, calling_ae=calling_ae, association_id=association_id))

    def on_store_file(self, path: Path, *, calling_ae: str, association_id: str) -> int:
        return self._count(self._receiver.on_store_file(path, calling_ae=calling_ae, association_id=association_id))

    def _count(self, status: int) -> int:
        with self._lock:
            self.stored += 1
            self.statuses[status] = self.statuses.get(status, 0) + 1
        return status

    def __getattr__(self, name: str) -> object:
        return getattr(self._receiver, name)


def _figures(receiver: str, count: int, associations: int, seconds: float, samples: list[Sample]) -> SoakFigures:
    warm_at = max(1, int(count * WARM_UP_SHARE))
    index = next((i for i, s in enumerate(samples) if s.received >= warm_at), 0)
    warm, after, end = samples[index], samples[index:], samples[-1]
    return SoakFigures(
        receiver,
        count,
        associations,
        seconds,
        warm.rss_mib,
        max(s.rss_mib for s in after),
        end.rss_mib,
        warm.fds,
        max(s.fds for s in after),
        end.fds,
        warm.threads,
        max(s.threads for s in after),
        end.threads,
        samples,
    )


def soak_pacs_xai(files: list[Path], associations: int, workdir: Path, durability: Durability) -> SoakFigures:
    """The node's receive path in this process, sampled while ``files`` arrive."""
    data_dir = workdir / "pacs-xai"
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    journal = Journal(data_dir / "journal.sqlite", durability=durability)
    receiver = _Counting(
        Receiver(
            Spool(data_dir / "spool", durability=durability),
            journal,
            Assembler(idle_seconds=60, max_wait_seconds=600),
            create_metrics(),
        )
    )
    settings = ListenerSettings(ae_title="PACSXAI", port=0, max_associations=max(10, associations + 2))
    scp = StorageSCP(settings, receiver)  # type: ignore[arg-type]
    scp.start()
    try:
        with _Sampler("self", lambda: receiver.stored) as sampler:
            seconds = send_parallel(Destination("PACSXAI", "127.0.0.1", scp.port), files, associations)
        if receiver.statuses != {0: len(files)}:
            raise RuntimeError(f"the node answered {receiver.statuses} (status: count), not Success for all")
    finally:
        scp.stop()
        journal.close()
    return _figures("pacs-xai", len(files), associations, seconds, sampler.samples)


def soak_storescp(files: list[Path], associations: int, workdir: Path) -> SoakFigures:
    """DCMTK storescp (one process, no fork) receiving the same files from the same senders."""
    folder = workdir / "storescp"
    with running_storescp(folder, fork=False) as (destination, process):
        with _Sampler(process.pid, lambda: sum(1 for _ in os.scandir(folder))) as sampler:
            seconds = send_parallel(destination, files, associations)
    return _figures("storescp", len(files), associations, seconds, sampler.samples)


def run_soak_bench(
    count: int,
    associations: int,
    out_dir: Path,
    progress: Progress,
    *,
    durability: Durability = "power-loss",
    peer: bool = True,
) -> list[SoakFigures]:
    """Soak the node (and storescp, with ``peer``); write ``soak.json`` and ``soak.png`` to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pacs-xai-soak-") as tmp:
        workdir = Path(tmp)
        progress(f"writing {count} copies of {SOURCE} with fresh UIDs")
        files = fresh_copies(SOURCE, count, workdir / "files")
        progress(f"pacs-xai: {count} instances over {associations} associations")
        figures = [soak_pacs_xai(files, associations, workdir, durability)]
        if peer:
            progress(f"storescp: the same {count} instances from the same senders")
            figures.append(soak_storescp(files, associations, workdir))
    (out_dir / "soak.json").write_text(
        json.dumps([{**asdict(f), "rss_growth_percent": f.rss_growth_percent} for f in figures], indent=1)
    )
    plot_figures(figures, out_dir / "soak.png")
    return figures


def plot_figures(figures: list[SoakFigures], path: Path) -> None:
    """Three panels (PIL): resident MiB, open fds, threads against instances received."""
    from PIL import Image, ImageDraw, ImageFont

    width, panel, left = 900, 210, 70
    image = Image.new("RGB", (width, 40 + 3 * panel), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    count = max(f.count for f in figures)
    draw.text((10, 10), f"soak: {count} instances over {figures[0].associations} associations", fill="black", font=font)
    colours = {"pacs-xai": (220, 90, 30), "storescp": (60, 90, 180)}
    panels = (
        ("resident memory, MiB", lambda s: s.rss_mib),
        ("open file descriptors", lambda s: s.fds),
        ("threads", lambda s: s.threads),
    )
    for index, (title, value) in enumerate(panels):
        top, bottom = 40 + index * panel + 20, 40 + (index + 1) * panel - 25
        values = [value(s) for f in figures for s in f.samples] or [0]
        high = max(values) * 1.1 or 1
        draw.text((left, top - 18), title, fill="black", font=font)
        draw.rectangle((left, top, width - 20, bottom), outline=(180, 180, 180))
        draw.text((5, top), f"{high:.0f}", fill="black", font=font)
        draw.text((5, bottom - 12), "0", fill="black", font=font)
        for f in figures:
            points = [
                (left + (width - 20 - left) * s.received / count, bottom - (bottom - top) * value(s) / high)
                for s in f.samples
            ]
            if len(points) > 1:
                draw.line(points, fill=colours.get(f.receiver, (0, 0, 0)), width=2)
            last = points[-1] if points else (left, bottom)
            draw.text((last[0] - 60, last[1] - 14), f.receiver, fill=colours.get(f.receiver, (0, 0, 0)), font=font)
        draw.text((width - 180, bottom + 4), "instances received ->", fill="black", font=font)
    image.save(path)


def print_figures(figures: list[SoakFigures]) -> None:
    print(
        f"{'receiver':10} {'count':>6} {'assoc':>5} {'img/s':>7} {'RSS MiB warm/peak/end':>23} {'growth %':>9} "
        f"{'fds warm/peak/end':>18} {'threads warm/peak/end':>22}"
    )
    for f in figures:
        rss = f"{f.rss_warm_mib:.0f}/{f.rss_peak_mib:.0f}/{f.rss_end_mib:.0f}"
        fds = f"{f.fds_warm}/{f.fds_peak}/{f.fds_end}"
        threads = f"{f.threads_warm}/{f.threads_peak}/{f.threads_end}"
        print(
            f"{f.receiver:10} {f.count:>6} {f.associations:>5} {f.per_second:>7.1f} {rss:>23} "
            f"{f.rss_growth_percent:>9.1f} {fds:>18} {threads:>22}"
        )
    print("\nwarm: after the first 10 % of the instances; peak: the highest value after warm-up; end: all sent")
