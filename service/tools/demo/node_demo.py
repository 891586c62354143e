"""``pacs-xai demo run``: the node's main job on the demo model, end to end on 127.0.0.1.

Starts a receiving destination (a Storage SCP that writes what it gets into
``<out>/received/``), starts the node with the demo model sending its results there, sends
phantom and real sample studies to the node with a real SCU, waits until every instance is
processed and every result delivered, prints a table of the returned objects, writes PNG
previews, and shuts everything down.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom

from dicom_io.net.network import Status
from dicom_io.net.scp import ListenerSettings, StorageSCP
from dicom_io.net.scu import Destination, StoreSCU
from dicom_io.writers import save_png
from service.node.app import Node
from service.node.config import load_config
from service.node.store import Journal
from service.synthetic.phantoms import write_phantom_studies
from service.tools.progress import Progress

#: Real sample files: a CR chest radiograph (MONOCHROME1, JPEG 2000 lossless, from pydicom-data)
#: that the demo model applies to, and a CT slice it does not apply to (reported as skipped).
REAL_SAMPLES = ("RG1_J2KR.dcm", "CT_small.dcm")
DESTINATION_AE = "DEMODEST"


class FolderDestination:
    """The demo's receiving end: writes each received object to ``folder`` and notes when it came."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.arrivals: dict[str, float] = {}
        folder.mkdir(parents=True, exist_ok=True)

    def on_store(self, encoded: bytes, *, calling_ae: str, association_id: str) -> int:
        uid = pydicom.dcmread(BytesIO(encoded), stop_before_pixels=True).SOPInstanceUID
        (self.folder / f"{uid}.dcm").write_bytes(encoded)
        self.arrivals[str(uid)] = time.monotonic()
        return Status.SUCCESS

    def on_association_accepted(self, calling_ae: str, host: str, association_id: str) -> None: ...

    def on_association_released(self, association_id: str) -> None: ...

    def on_association_rejected(self, calling_ae: str, host: str, reason: str) -> None: ...


@dataclass(frozen=True)
class ResultRow:
    source: str
    modality: str
    predicted: str
    probability: str
    method: str
    milliseconds: str


def gather_inputs(folder: Path, progress: Progress) -> list[Path]:
    """Six phantom studies plus the real samples that are installed, copied into ``folder``."""
    if folder.exists():
        shutil.rmtree(folder)
    files = [path for path, _ in write_phantom_studies(folder, studies=6)]
    for name in REAL_SAMPLES:
        source = _sample_file(name)
        if source is None:
            progress(f"note: sample {name} not found (install the 'demo' extra: pip install 'pacs-xai[demo]')")
            continue
        shutil.copy(source, folder / name)
        files.append(folder / name)
    return files


def run_node_demo(out_dir: Path, methods: Sequence[str], progress: Progress, timeout: float = 300.0) -> int:
    """The whole demo; returns the exit code (0 when every applicable image came back explained)."""

    files = gather_inputs(out_dir / "input", progress)
    received = out_dir / "received"
    if received.exists():
        shutil.rmtree(received)
    destination = FolderDestination(received)
    receiver = StorageSCP(ListenerSettings(ae_title=DESTINATION_AE, port=0), destination)
    receiver.start()
    config = load_config(
        None,
        {
            "listener": {"port": 0},
            "storage": {"data_dir": str(out_dir / "var")},
            "destinations": [{"name": "demo", "ae_title": DESTINATION_AE, "host": "127.0.0.1", "port": receiver.port}],
            "explain": {"methods": list(methods), "outputs": ["sc"]},
            "assembly": {"idle_seconds": 0.5, "max_wait_seconds": 60},
            "metrics": {"port": 0},
        },
    )
    if (out_dir / "var").exists():
        shutil.rmtree(out_dir / "var")
    node = Node(config)
    node.start()
    progress(
        f"node {config.listener.ae_title} on 127.0.0.1:{node.port}, model {node.model.card.name} "
        f"{node.model.card.version} on {node.model.forward_runner.device}; destination on port {receiver.port}"
    )
    try:
        sent_at = time.monotonic()
        outcomes = StoreSCU("DEMOSCU").send(Destination(config.listener.ae_title, "127.0.0.1", node.port), files)
        failed = [o for o in outcomes if o.verdict != "delivered"]
        progress(f"sent {len(outcomes) - len(failed)} of {len(files)} instance(s) to the node")
        _wait_until_settled(node, progress, timeout)
    finally:
        node.stop()
        receiver.stop()
    rows = _rows(files, received, destination.arrivals, sent_at, Path(config.storage.data_dir) / "journal.sqlite")
    previews = out_dir / "previews"
    shutil.rmtree(previews, ignore_errors=True)
    previews.mkdir()
    sources = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    for path in sorted(received.glob("*.dcm")):
        result = pydicom.dcmread(path)
        source = sources.get(str(result.SourceImageSequence[0].ReferencedSOPInstanceUID))
        method = str(result.SeriesDescription).split()[1]  # "XAI <method> <class>"
        name = f"{source.stem}_{method}" if source else path.stem
        save_png(result.pixel_array, previews / f"{name}.png")
    _print_table(rows)
    print(f"\nreturned objects: {received.resolve()}/\nPNG previews:     {previews.resolve()}/")
    return 1 if failed else 0


def _wait_until_settled(node, progress: Progress, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        counts = node.journal.counts()
        state = f"waiting: {counts['instances_received']} to process, {counts['outbox_pending']} to send"
        if state != last:
            progress(state)
            last = state
        if counts["instances_received"] == 0 and counts["outbox_pending"] == 0 and node.assembler.pending() == 0:
            return
        time.sleep(0.2)
    progress(f"gave up waiting after {timeout:.0f} s; the node's journal in var/ says what is left")


def _rows(
    files: list[Path], received: Path, arrivals: dict[str, float], sent_at: float, journal_path: Path
) -> list[ResultRow]:

    headers = {f: pydicom.dcmread(f, stop_before_pixels=True) for f in files}
    sources = {str(ds.SOPInstanceUID): f for f, ds in headers.items()}
    rows = []
    for path in sorted(received.glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        source = sources.get(str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID))
        words = str(ds.SeriesDescription).split()  # "XAI <method> <class>"
        probability = re.search(r"probability ([0-9.]+)", str(ds.get("DerivationDescription", "")))
        latency = (arrivals.get(str(ds.SOPInstanceUID), sent_at) - sent_at) * 1000
        modality = str(headers[source].get("Modality", "")) if source else "?"
        rows.append(
            ResultRow(
                source.name if source else "?",
                modality,
                words[2] if len(words) > 2 else "?",
                probability[1] if probability else "?",
                words[1] if len(words) > 1 else "?",
                f"{latency:.0f}",
            )
        )
    journal = Journal(journal_path)
    try:
        for uid, path in sources.items():
            state = journal.instance_state(uid)
            if state and state[0] in ("skipped", "failed"):
                rows.append(
                    ResultRow(path.name, str(headers[path].get("Modality", "")), state[0], "", state[1][:60], "")
                )
    finally:
        journal.close()
    return sorted(rows, key=lambda row: (row.source, row.method))


def _print_table(rows: list[ResultRow]) -> None:
    header = ResultRow("source file", "modality", "predicted", "probability", "method", "ms to result")
    table = [header, *rows]
    names = list(ResultRow.__dataclass_fields__)
    widths = [max(len(getattr(row, name)) for row in table) for name in names]
    for row in table:
        print("  ".join(getattr(row, name).ljust(width) for name, width in zip(names, widths)).rstrip())


def _sample_file(name: str) -> str | None:
    from pydicom.data import get_testdata_file

    try:
        return get_testdata_file(name)
    except (ValueError, OSError):
        return None
