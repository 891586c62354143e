"""``pacs-xai demo run``: the node's main job on the two demo models, end to end on 127.0.0.1.

Starts a receiving destination (a Storage SCP that writes what it gets into
``<out>/received/``), starts the node with two routing rules, radiographs (CR, DX) to the 2D demo
model and CT series to the demo volume model (explained as one volume: multi-frame Parametric Map
and Segmentation, a Secondary Capture for each key slice), sends phantom radiographs, real sample
files and phantom chest CT series to the node with a real SCU, waits until every instance is
processed and every result delivered, prints one table row per source series (route, model,
finding and probability, objects delivered, time to the last of them), writes PNG previews of the
Secondary Captures, and shuts everything down.
"""

from __future__ import annotations

import re
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom

from dicom_io.net.network import Status
from dicom_io.net.scp import ListenerSettings, StorageSCP
from dicom_io.net.scu import Destination, StoreSCU
from dicom_io.writers import save_png
from service.models import demo_card_path, volume_card_path
from service.node.app import Node
from service.node.config import NodeConfig, load_config
from service.node.routing import InstanceFacts, compile_rules, select
from service.node.store import Journal
from service.node.volume import volume_methods
from service.synthetic.phantoms import write_phantom_studies
from service.synthetic.volumes import make_ct_phantom, write_ct_series
from service.tools.progress import Progress

#: Real sample files: a CR chest radiograph (MONOCHROME1, JPEG 2000 lossless, from pydicom-data)
#: for the 2D rule, and a single CT slice, which the CT rule takes but cannot make a volume of
#: (reported as skipped: too few slices).
REAL_SAMPLES = ("RG1_J2KR.dcm", "CT_small.dcm")
#: Phantom chest CT series (class, index) for the volume rule.
CT_PHANTOMS = (("nodule", 0), ("normal", 1))
#: Secondary Captures of a volume: the slices with the most positive attribution.
KEY_SLICES = 3
DESTINATION_AE = "DEMODEST"
#: Short names of the SOP classes the demo's table counts.
_KINDS = {
    pydicom.uid.SecondaryCaptureImageStorage: "sc",
    pydicom.uid.ParametricMapStorage: "pm",
    pydicom.uid.SegmentationStorage: "seg",
}


def demo_routes(methods: Sequence[str]) -> list[dict]:
    """The demo's routing rules: CR/DX to the 2D demo model, CT to the volume model (with the
    ``methods`` that take volumes, Grad-CAM where none does)."""
    in_3d = [method for method in methods if method in volume_methods()] or ["gradcam"]
    return [
        {
            "name": "chest-xray",
            "match": {"modality": "CR|DX"},
            "model": str(demo_card_path()),
            "methods": list(methods),
            "outputs": ["sc"],
        },
        {
            "name": "chest-ct",
            "match": {"modality": "CT"},
            "model": str(volume_card_path()),
            "methods": in_3d,
            "outputs": ["pm", "seg_fractional", "sc"],
            "key_slices": KEY_SLICES,
        },
    ]


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

    def on_store_file(self, path: Path, *, calling_ae: str, association_id: str) -> int:
        """The object as the file the listener received it into: moved here (copied across filesystems)."""
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        shutil.move(path, self.folder / f"{uid}.dcm")
        self.arrivals[str(uid)] = time.monotonic()
        return Status.SUCCESS

    def on_association_accepted(self, calling_ae: str, host: str, association_id: str) -> None: ...

    def on_association_released(self, association_id: str) -> None: ...

    def on_association_rejected(self, calling_ae: str, host: str, reason: str) -> None: ...


@dataclass(frozen=True)
class SeriesRow:
    """One source series in the demo's table."""

    series: str
    modality: str
    route: str
    model: str
    finding: str
    delivered: str
    seconds: str


def gather_inputs(folder: Path, progress: Progress) -> list[Path]:
    """Six phantom radiograph studies, the real samples that are installed and the phantom chest
    CT series (one folder each), written into ``folder``."""
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
    for label, index in CT_PHANTOMS:
        files.extend(write_ct_series(folder / f"ct-{label}", make_ct_phantom(index, label)))
    return files


def run_node_demo(out_dir: Path, methods: Sequence[str], progress: Progress, timeout: float = 300.0) -> int:
    """The whole demo; returns the exit code (0 when every instance was delivered to the node)."""

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
            "routes": demo_routes(methods),
            "assembly": {"idle_seconds": 0.5, "max_wait_seconds": 60},
            "metrics": {"port": 0},
        },
    )
    if (out_dir / "var").exists():
        shutil.rmtree(out_dir / "var")
    node = Node(config)
    node.start()
    models = {target.name: target.pipeline.model.card.name for target in node.router.targets}
    device = node.model.forward_runner.device
    routes = ", ".join(f"{route} -> {model}" for route, model in models.items())
    progress(f"node {config.listener.ae_title} on 127.0.0.1:{node.port} ({device}), routes {routes}")
    progress(f"destination on port {receiver.port}")
    try:
        sent_at = time.monotonic()
        outcomes = StoreSCU("DEMOSCU").send(Destination(config.listener.ae_title, "127.0.0.1", node.port), files)
        failed = [o for o in outcomes if o.verdict != "delivered"]
        progress(f"sent {len(outcomes) - len(failed)} of {len(files)} instance(s) to the node")
        _wait_until_settled(node, progress, timeout)
    finally:
        node.stop()
        receiver.stop()
    journal = Journal(Path(config.storage.data_dir) / "journal.sqlite")
    try:
        rows = series_rows(files, received, destination.arrivals, sent_at, config, models, journal)
    finally:
        journal.close()
    previews = out_dir / "previews"
    shutil.rmtree(previews, ignore_errors=True)
    previews.mkdir()
    sources = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    for path in sorted(received.glob("*.dcm")):
        result = pydicom.dcmread(path)
        if result.SOPClassUID != pydicom.uid.SecondaryCaptureImageStorage:
            continue  # the multi-frame PM and SEG are for viewers, not PNGs
        source = sources.get(str(result.SourceImageSequence[0].ReferencedSOPInstanceUID))
        method = str(result.SeriesDescription).split()[1]  # "XAI <method> <class>"
        name = f"{source.parent.name}_{source.stem}_{method}" if source else path.stem
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


def series_rows(
    files: Sequence[Path],
    received: Path,
    arrivals: dict[str, float],
    sent_at: float,
    config: NodeConfig,
    models: dict[str, str],
    journal: Journal,
) -> list[SeriesRow]:
    """One row per source series: the rules that took it (as the node's router decides), their
    models, each explained finding with its probability (from the returned objects' descriptions),
    the objects delivered by kind and the seconds from sending to the last of them; or what the
    journal says where nothing came back (skipped, failed, not routed)."""
    headers = {f: pydicom.dcmread(f, stop_before_pixels=True) for f in files}
    series: dict[str, list[Path]] = {}
    for path, ds in headers.items():
        series.setdefault(str(ds.SeriesInstanceUID), []).append(path)
    source_series = {str(ds.SOPInstanceUID): str(ds.SeriesInstanceUID) for ds in headers.values()}
    returned: dict[str, list[pydicom.Dataset]] = {}
    for path in sorted(received.glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        uid = source_series.get(str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID))
        if uid is not None:
            returned.setdefault(uid, []).append(ds)
    rules = compile_rules(config)
    rows = []
    for uid, paths in series.items():
        first = headers[paths[0]]
        facts = InstanceFacts.from_dataset(first, instances=len(paths))
        routes = [rule.name for rule in select(rules, facts)]
        objects = returned.get(uid, [])
        if objects:
            kinds = Counter(_KINDS.get(str(ds.SOPClassUID), "other") for ds in objects)
            delivered = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
            last = max(arrivals.get(str(ds.SOPInstanceUID), sent_at) for ds in objects)
            seconds = f"{last - sent_at:.1f}"
            finding = _findings(objects)
        else:
            states = [journal.instance_state(str(headers[p].SOPInstanceUID)) or ("?", "") for p in paths]
            outcome, reason = states[0]
            finding = f"{outcome}: {_short(reason)}"
            delivered, seconds = "0", ""
        name = paths[0].name if len(paths) == 1 else f"{paths[0].parent.name}/ ({len(paths)} slices)"
        rows.append(
            SeriesRow(
                name,
                str(first.get("Modality", "")),
                ", ".join(routes) or "-",
                ", ".join(models.get(route, "?") for route in routes) or "-",
                finding,
                delivered,
                seconds,
            )
        )
    return sorted(rows, key=lambda row: (row.route, row.series))


def _findings(objects: Sequence[pydicom.Dataset]) -> str:
    """``nodule 0.973`` per explained class, from the objects' descriptions ("XAI <method> <class>",
    "... probability 0.973 ...")."""
    found: dict[str, str] = {}
    for ds in objects:
        words = str(ds.get("SeriesDescription", "")).split()
        probability = re.search(r"probability ([0-9.]+)", str(ds.get("DerivationDescription", "")))
        if len(words) > 2:
            found.setdefault(words[2], probability[1] if probability else "?")
    return ", ".join(f"{name} {probability}" for name, probability in found.items()) or "?"


def _short(reason: str, limit: int = 60) -> str:
    """The journal's reason in one short phrase: the route prefix and the UIDs left out."""
    reason = re.sub(r"^(not routed: |route [^:]+: )", "", reason)
    reason = re.sub(r"series [0-9.]+ ", "series ", reason)
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def _print_table(rows: list[SeriesRow]) -> None:
    header = SeriesRow("source series", "modality", "route", "model", "finding (probability)", "delivered", "s")
    table = [header, *rows]
    names = list(SeriesRow.__dataclass_fields__)
    widths = [max(len(getattr(row, name)) for row in table) for name in names]
    for row in table:
        print("  ".join(getattr(row, name).ljust(width) for name, width in zip(names, widths)).rstrip())


def _sample_file(name: str) -> str | None:
    from pydicom.data import get_testdata_file

    try:
        return get_testdata_file(name)
    except (ValueError, OSError):
        return None
