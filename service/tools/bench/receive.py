"""``pacs-xai bench receive``: images per second into the durable spool, against DCMTK storescp.

Same machine, same run, same files, same sender (DCMTK storescu processes, TCP_NODELAY): the node's
receive path (Storage SCP -> parse -> spool -> SQLite journal -> Success) in both durability modes
(``power-loss``: fsync of every file and commit; ``process-crash``: no fsync, as storescp), then
DCMTK ``storescp`` writing the same files to a folder (storescp never fsyncs). Both over one association and over K
parallel associations. Files: CT 512² (``693_UNCR.dcm``) and CR ~2k² (``RG1_UNCR.dcm``) from
pydicom-data, copied with fresh UIDs so every instance is distinct.

With ``--receivers K`` (:func:`run_receivers_bench`): the node's receive path in one process against K
receiver processes on one port (``python -m service.node.intake``, SO_REUSEPORT), same files, same
sender, and each receiver's resident memory.

A third receiver shows what the DICOM library allows: the node's own listener (pynetdicom, same
settings, TCP_NODELAY) with an ``on_store`` that answers Success at once, nothing parsed or
stored. No receive path built on pynetdicom can be faster than this ceiling.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from dicom_io.net.network import free_port
from dicom_io.net.scp import ListenerSettings, StorageSCP
from dicom_io.net.scu import Destination, StoreSCU
from service.node.assembler import Assembler
from service.node.config import load_config, write_resolved_config
from service.node.metrics import create_metrics
from service.node.receiver import Receiver
from service.node.store import Durability, Journal, Spool
from service.tools.dcmtk import dcmtk_tool
from service.tools.progress import Progress

SOURCES = {"CT 512x512": "693_UNCR.dcm", "CR 1955x1841": "RG1_UNCR.dcm"}


@dataclass(frozen=True)
class ReceiveFigure:
    """One measured configuration."""

    images: str
    associations: int
    count: int
    #: storage.durability = power-loss (fsync before Success).
    pacs_xai_per_second: float
    #: storage.durability = process-crash (no fsync, like storescp).
    pacs_xai_no_fsync_per_second: float
    storescp_per_second: float
    #: The listener alone (pynetdicom): Success at once, nothing parsed or stored.
    pynetdicom_ceiling_per_second: float

    @property
    def ratio(self) -> float:
        return self.pacs_xai_per_second / self.storescp_per_second if self.storescp_per_second else 0.0

    @property
    def ratio_no_fsync(self) -> float:
        return self.pacs_xai_no_fsync_per_second / self.storescp_per_second if self.storescp_per_second else 0.0

    @property
    def ceiling_ratio(self) -> float:
        """The pynetdicom listener alone over storescp: the best ratio a pynetdicom node can reach."""
        return self.pynetdicom_ceiling_per_second / self.storescp_per_second if self.storescp_per_second else 0.0


def fresh_copies(source: str, count: int, folder: Path, *, study_each: bool = False) -> list[Path]:
    """``count`` copies of ``source`` (a DICOM file's path, or the name of a pydicom test file),
    each with a new SOP Instance UID: one new study and series for all, or with ``study_each`` one
    of its own for each copy (as radiographs arrive: one image, one study)."""
    from pydicom.data import get_testdata_file

    path = source if Path(source).is_file() else get_testdata_file(source)
    if path is None:
        raise FileNotFoundError(
            f"{source} is neither a file nor a pydicom test file: give a path, or install the 'demo' extra "
            "(pip install 'pacs-xai[demo]') for the sample radiographs"
        )
    template = pydicom.dcmread(path)
    template.StudyInstanceUID = generate_uid()
    template.SeriesInstanceUID = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for index in range(count):
        if study_each:
            template.StudyInstanceUID = generate_uid()
            template.SeriesInstanceUID = generate_uid()
        template.SOPInstanceUID = generate_uid()
        template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
        target = folder / f"{index:05d}.dcm"
        template.save_as(target, enforce_file_format=True)
        files.append(target)
    return files


def send_parallel(destination: Destination, files: Sequence[Path], associations: int) -> float:
    """Seconds for ``associations`` DCMTK storescu processes, one association each, to send ``files``.

    The sender runs in its own processes (C, TCP_NODELAY=1), so it neither shares the GIL with
    the node under test nor limits either receiver.
    """
    binary = dcmtk_tool("storescu")
    slices = [list(files[i::associations]) for i in range(associations)]
    command = [binary, "-aet", "BENCHSCU", "-aec", destination.ae_title, destination.host, str(destination.port)]
    env = {**os.environ, "TCP_NODELAY": "1"}
    started = time.perf_counter()
    senders = [
        subprocess.Popen([*command, *map(str, batch)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for batch in slices
    ]
    errors = [sender.communicate()[1] for sender in senders]
    elapsed = time.perf_counter() - started
    failed = [err.decode(errors="replace").strip() for sender, err in zip(senders, errors) if sender.returncode != 0]
    if failed:
        raise RuntimeError(f"storescu failed sending to {destination.ae_title}: {failed[0][-300:]}")
    return elapsed


def measure_pacs_xai(
    files: Sequence[Path], associations: int, workdir: Path, durability: Durability = "power-loss"
) -> float:
    """Images per second into the node's spool (SCP + parse + spool + journal) at ``durability``."""
    data_dir = workdir / "pacs-xai"
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    journal = Journal(data_dir / "journal.sqlite", durability=durability)
    receiver = Receiver(
        Spool(data_dir / "spool", durability=durability),
        journal,
        Assembler(idle_seconds=60, max_wait_seconds=600),
        create_metrics(),
    )
    scp = StorageSCP(ListenerSettings(ae_title="PACSXAI", port=0, max_associations=max(10, associations)), receiver)
    scp.start()
    try:
        elapsed = send_parallel(Destination("PACSXAI", "127.0.0.1", scp.port), files, associations)
    finally:
        scp.stop()
        journal.close()
    return len(files) / elapsed


@dataclass(frozen=True)
class ProcessesFigure:
    """The receive path in K receiver processes on one port (SO_REUSEPORT) against one process."""

    images: str
    associations: int
    count: int
    receivers: int
    #: One receiver (the single-process node's listener), power-loss durability.
    one_process_per_second: float
    #: ``receivers`` receiver processes (python -m service.node.intake), power-loss durability.
    processes_per_second: float
    #: Resident memory of each receiver process 3 s after the run (VmRSS), MB.
    receiver_rss_mb: tuple[float, ...]
    #: The same two with process-crash durability (no fsync): what the CPU allows.
    one_process_no_fsync_per_second: float
    processes_no_fsync_per_second: float
    #: Peak resident memory of each receiver process during the run (VmHWM), MB.
    receiver_peak_mb: tuple[float, ...] = ()

    @property
    def ratio(self) -> float:
        return self.processes_per_second / self.one_process_per_second if self.one_process_per_second else 0.0

    @property
    def ratio_no_fsync(self) -> float:
        one = self.one_process_no_fsync_per_second
        return self.processes_no_fsync_per_second / one if one else 0.0


def measure_receiver_processes(
    files: Sequence[Path], associations: int, receivers: int, workdir: Path, durability: Durability = "power-loss"
) -> tuple[float, tuple[float, ...], tuple[float, ...]]:
    """Images per second into ``receivers`` receiver processes sharing one port, and each one's
    resident memory (MB): 3 s after the run (at rest), and its peak during the run."""
    data_dir = workdir / "pacs-xai-processes"
    shutil.rmtree(data_dir, ignore_errors=True)
    config = load_config(
        None,
        {
            "listener": {"port": free_port(), "max_associations": max(10, associations)},
            "storage": {"data_dir": str(data_dir), "durability": durability},
            "logging": {"level": "WARNING"},
        },
    )
    path = write_resolved_config(config, data_dir / "config.json")
    (data_dir / "metrics").mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(data_dir / "metrics")}
    command = [sys.executable, "-m", "service.node.intake", "--config", str(path), "--name"]
    processes = [subprocess.Popen([*command, f"receiver-{n}"], env=env) for n in range(receivers)]
    try:
        destination = Destination("PACSXAI", "127.0.0.1", config.listener.port)
        deadline = time.monotonic() + 60
        while not all(_listening(p.pid, config.listener.port) for p in processes):
            if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                raise RuntimeError("the receiver processes did not all listen within 60 s")
            time.sleep(0.1)
        elapsed = send_parallel(destination, files, associations)
        peak = tuple(_status_mb(p.pid, "VmHWM") for p in processes)
        time.sleep(3.0)  # at rest
        rss = tuple(_status_mb(p.pid, "VmRSS") for p in processes)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)
    return len(files) / elapsed, rss, peak


def _listening(pid: int, port: int) -> bool:
    """Whether process ``pid`` has a TCP socket listening on ``port`` (from /proc, Linux)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                return True
    return False


def _status_mb(pid: int, field: str) -> float:
    """A memory figure of /proc/<pid>/status (VmRSS, VmHWM), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def run_receivers_bench(
    count: int,
    associations: int,
    receivers: Sequence[int],
    out_dir: Path,
    progress: Progress,
    sources: dict[str, str] = SOURCES,
    rounds: int = 3,
) -> list[ProcessesFigure]:
    """One receiver process against K, same files, same sender, same run, in ``rounds`` alternating
    rounds (medians); ``receive-processes.json`` and ``receive-processes.png``."""
    figures = []
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pacs-xai-bench-") as temp:
        workdir = Path(temp)
        for label, source in sources.items():
            files = fresh_copies(source, count, workdir / "input" / source)
            for k in receivers:
                rates: dict[str, list[float]] = {"one": [], "several": [], "one_no_fsync": [], "several_no_fsync": []}
                rss: tuple[float, ...] = ()
                peak: tuple[float, ...] = ()
                for round_index in range(rounds):  # alternating, so a change of machine load weighs on both
                    progress(f"{label}, round {round_index + 1}/{rounds}: 1 process, then {k} receiver processes")
                    rates["one"].append(measure_pacs_xai(files, associations, workdir, "power-loss"))
                    several, rss, peak = measure_receiver_processes(files, associations, k, workdir)
                    rates["several"].append(several)
                    rates["one_no_fsync"].append(measure_pacs_xai(files, associations, workdir, "process-crash"))
                    rates["several_no_fsync"].append(
                        measure_receiver_processes(files, associations, k, workdir, "process-crash")[0]
                    )
                one, several, one_no_fsync, several_no_fsync = (
                    statistics.median(rates[key]) for key in ("one", "several", "one_no_fsync", "several_no_fsync")
                )
                figure = ProcessesFigure(
                    label,
                    associations,
                    count,
                    k,
                    round(one, 1),
                    round(several, 1),
                    rss,
                    round(one_no_fsync, 1),
                    round(several_no_fsync, 1),
                    peak,
                )
                progress(
                    f"{label}: 1 process {one:.0f}/s, {k} processes {several:.0f}/s ({figure.ratio:.2f}x); no fsync "
                    f"{one_no_fsync:.0f}/s vs {several_no_fsync:.0f}/s ({figure.ratio_no_fsync:.2f}x); "
                    f"receiver RSS at rest {', '.join(f'{mb:.0f}' for mb in rss)} MB, "
                    f"peak {', '.join(f'{mb:.0f}' for mb in peak)} MB"
                )
                figures.append(figure)
    (out_dir / "receive-processes.json").write_text(
        json.dumps(
            [{**asdict(f), "ratio": round(f.ratio, 3), "ratio_no_fsync": round(f.ratio_no_fsync, 3)} for f in figures],
            indent=2,
        )
    )
    plot_processes(figures, out_dir / "receive-processes.png")
    return figures


def plot_processes(figures: Sequence[ProcessesFigure], path: Path) -> None:
    """A bar chart (PIL): images/s into one process and into K receiver processes, with and without
    fsync, and each receiver's peak resident memory."""
    from PIL import Image, ImageDraw, ImageFont

    width, row = 900, 130
    image = Image.new("RGB", (width, 60 + row * len(figures)), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    draw.text((10, 10), "receive, one process against K receiver processes, images/s", fill="black", font=font)
    top = max([max(f.processes_no_fsync_per_second, f.processes_per_second, 1.0) for f in figures] + [1.0])
    for i, figure in enumerate(figures):
        y = 45 + i * row
        draw.text((10, y + 8), f"{figure.images}", fill="black", font=font)
        draw.text((10, y + 28), f"{figure.associations} assoc, K = {figure.receivers}", fill="black", font=font)
        draw.text(
            (10, y + 48), f"peak {', '.join(f'{mb:.0f}' for mb in figure.receiver_peak_mb)} MB", fill="black", font=font
        )
        bars = (
            ("1 process (fsync)", figure.one_process_per_second, (60, 90, 180)),
            (f"{figure.receivers} processes (fsync) {figure.ratio:.2f}x", figure.processes_per_second, (220, 90, 30)),
            ("1 process (no fsync)", figure.one_process_no_fsync_per_second, (130, 150, 210)),
            (
                f"{figure.receivers} processes (no fsync) {figure.ratio_no_fsync:.2f}x",
                figure.processes_no_fsync_per_second,
                (240, 160, 60),
            ),
        )
        for j, (name, value, colour) in enumerate(bars):
            x0, bar_y = 260, y + j * 26
            draw.rectangle((x0, bar_y, x0 + int(420 * value / top), bar_y + 20), fill=colour)
            draw.text((x0 + int(420 * value / top) + 6, bar_y + 2), f"{name} {value:.0f}", fill="black", font=font)
    image.save(path)


def print_processes(figures: Sequence[ProcessesFigure]) -> None:
    print(
        f"{'images':14} {'assoc':>5} {'count':>6} {'receivers':>9} {'1 process/s':>12} "
        f"{'K processes/s':>14} {'ratio':>6} {'no fsync: 1/s':>14} {'K/s':>7} {'ratio':>6}  RSS at rest / peak MB"
    )
    for f in figures:
        print(
            f"{f.images:14} {f.associations:>5} {f.count:>6} {f.receivers:>9} {f.one_process_per_second:>12.1f} "
            f"{f.processes_per_second:>14.1f} {f.ratio:>6.2f} {f.one_process_no_fsync_per_second:>14.1f} "
            f"{f.processes_no_fsync_per_second:>7.1f} {f.ratio_no_fsync:>6.2f}  "
            f"{', '.join(f'{mb:.0f}' for mb in f.receiver_rss_mb)} / "
            f"{', '.join(f'{mb:.0f}' for mb in f.receiver_peak_mb)}"
        )


class AnswerAtOnce:
    """Storage events that keep nothing: Success for every object, at once."""

    def on_store(self, encoded: bytes, *, calling_ae: str, association_id: str) -> int:
        return 0x0000

    def on_store_file(self, path: Path, *, calling_ae: str, association_id: str) -> int:
        """The file is not read (the listener deletes it)."""
        return 0x0000

    def on_association_released(self, association_id: str) -> None:
        """Nothing to do."""

    def on_association_rejected(self, calling_ae: str, host: str, reason: str) -> None:
        """Nothing to do."""

    def on_association_accepted(self, calling_ae: str, host: str, association_id: str) -> None:
        """Nothing to do."""


def measure_pynetdicom_ceiling(files: Sequence[Path], associations: int) -> float:
    """Images per second into the node's listener when storing costs nothing (see the module docstring)."""
    settings = ListenerSettings(ae_title="PACSXAI", port=0, max_associations=max(10, associations))
    with StorageSCP(settings, AnswerAtOnce()) as scp:
        elapsed = send_parallel(Destination("PACSXAI", "127.0.0.1", scp.port), files, associations)
    return len(files) / elapsed


@contextlib.contextmanager
def running_storescp(folder: Path, *, fork: bool) -> Iterator[tuple[Destination, subprocess.Popen]]:
    """DCMTK storescp writing into a fresh ``folder`` (``--fork``: one process per association),
    listening on a free port of 127.0.0.1 before this yields; terminated on exit."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    port = free_port()
    command = [dcmtk_tool("storescp"), "-aet", "STORESCP", "-od", str(folder), "+xa"]
    process = subprocess.Popen(
        [*command, *(["--fork"] if fork else []), str(port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        destination = Destination("STORESCP", "127.0.0.1", port)
        deadline = time.monotonic() + 15
        while not StoreSCU("BENCHSCU").echo(destination):
            if time.monotonic() > deadline:
                raise RuntimeError("storescp did not start listening within 15 s")
            time.sleep(0.1)
        yield destination, process
    finally:
        process.terminate()
        process.wait(timeout=10)


def measure_storescp(files: Sequence[Path], associations: int, workdir: Path) -> float:
    """Images per second into DCMTK storescp (files written to a folder), same sender."""
    with running_storescp(workdir / "storescp", fork=associations > 1) as (destination, _):
        elapsed = send_parallel(destination, files, associations)
    return len(files) / elapsed


def run_receive_bench(
    count: int, associations: Sequence[int], out_dir: Path, progress: Progress, sources: dict[str, str] = SOURCES
) -> list[ReceiveFigure]:
    """Measure every (image kind, association count); write ``receive.json`` and ``receive.png``."""
    figures = []
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pacs-xai-bench-") as temp:
        workdir = Path(temp)
        for label, source in sources.items():
            progress(f"{label}: writing {count} copies with fresh UIDs")
            files = fresh_copies(source, count, workdir / "input" / source)
            for k in associations:
                progress(f"{label}: {count} images over {k} association(s) -> pacs-xai (fsync)")
                ours = measure_pacs_xai(files, k, workdir, "power-loss")
                progress(f"{label}: {count} images over {k} association(s) -> pacs-xai (no fsync)")
                ours_no_fsync = measure_pacs_xai(files, k, workdir, "process-crash")
                progress(f"{label}: {count} images over {k} association(s) -> storescp")
                theirs = measure_storescp(files, k, workdir)
                progress(f"{label}: {count} images over {k} association(s) -> pynetdicom listener storing nothing")
                ceiling = measure_pynetdicom_ceiling(files, k)
                figure = ReceiveFigure(
                    label, k, count, round(ours, 1), round(ours_no_fsync, 1), round(theirs, 1), round(ceiling, 1)
                )
                progress(
                    f"{label}, {k} association(s): pacs-xai {ours:.0f}/s (fsync), {ours_no_fsync:.0f}/s (no fsync), "
                    f"storescp {theirs:.0f}/s, ratios {figure.ratio:.2f} / {figure.ratio_no_fsync:.2f}; "
                    f"pynetdicom storing nothing {ceiling:.0f}/s ({figure.ceiling_ratio:.2f} of storescp)"
                )
                figures.append(figure)
    (out_dir / "receive.json").write_text(
        json.dumps(
            [
                {
                    **asdict(f),
                    "ratio": round(f.ratio, 3),
                    "ratio_no_fsync": round(f.ratio_no_fsync, 3),
                    "ceiling_ratio": round(f.ceiling_ratio, 3),
                }
                for f in figures
            ],
            indent=2,
        )
    )
    plot_figures(figures, out_dir / "receive.png")
    return figures


def plot_figures(figures: Sequence[ReceiveFigure], path: Path) -> None:
    """A bar chart (PIL): images/s of pacs-xai and storescp per configuration."""
    from PIL import Image, ImageDraw, ImageFont

    width, row = 900, 108
    image = Image.new("RGB", (width, 60 + row * len(figures)), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    draw.text((10, 10), "receive into the spool, images/s (same sender, same files)", fill="black", font=font)
    top = max(
        [f.storescp_per_second for f in figures]
        + [f.pacs_xai_no_fsync_per_second for f in figures]
        + [f.pynetdicom_ceiling_per_second for f in figures]
        + [1.0]
    )
    for i, figure in enumerate(figures):
        y = 45 + i * row
        draw.text((10, y + 8), f"{figure.images}, {figure.associations} assoc", fill="black", font=font)
        for j, (name, value, colour) in enumerate(
            (
                ("pacs-xai (fsync)", figure.pacs_xai_per_second, (220, 90, 30)),
                ("pacs-xai (no fsync)", figure.pacs_xai_no_fsync_per_second, (240, 160, 60)),
                ("storescp (no fsync)", figure.storescp_per_second, (60, 90, 180)),
                ("pynetdicom storing nothing", figure.pynetdicom_ceiling_per_second, (150, 150, 150)),
            )
        ):
            x0, bar_y = 230, y + j * 24
            draw.rectangle((x0, bar_y, x0 + int(500 * value / top), bar_y + 18), fill=colour)
            draw.text((x0 + int(500 * value / top) + 6, bar_y + 1), f"{name} {value:.0f}", fill="black", font=font)
    image.save(path)


def print_figures(figures: Sequence[ReceiveFigure]) -> None:
    print(
        f"{'images':14} {'assoc':>5} {'count':>6} {'fsync/s':>9} {'no-fsync/s':>11} {'storescp/s':>11} "
        f"{'ratio':>6} {'ratio no-fsync':>15} {'pynetdicom ceiling/s':>21} {'ceiling ratio':>14}"
    )
    for f in figures:
        print(
            f"{f.images:14} {f.associations:>5} {f.count:>6} {f.pacs_xai_per_second:>9.1f} "
            f"{f.pacs_xai_no_fsync_per_second:>11.1f} {f.storescp_per_second:>11.1f} {f.ratio:>6.2f} "
            f"{f.ratio_no_fsync:>15.2f} {f.pynetdicom_ceiling_per_second:>21.1f} {f.ceiling_ratio:>14.2f}"
        )
    print(
        "\nceiling: the node's pynetdicom listener answering Success at once, nothing parsed or stored; "
        "no pynetdicom-based receive path can beat it."
    )
