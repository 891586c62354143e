"""``pacs-xai bench pipeline``: the node end to end, against the pure compute on the same images.

All on 127.0.0.1 in one run: a sender (pynetdicom SCU), the node (demo model, the chosen
explainer, Secondary Capture output) and a receiving destination. Measured:

- latency: each image sent alone; time from the start of its C-STORE to its Secondary Capture
  acknowledged at the destination; p50 and p95;
- throughput at saturation: a burst of images over one association; results per second;
- compute: the same images through the pipeline in-process (prepare, model, explainer, encode),
  no network, no spool; the pipeline overhead is latency p50 / compute p50 - 1.

With ``--processes`` (:func:`run_processes_bench`): the single-process node and the node in several
processes (receivers + workers + sender, :mod:`service.node.supervisor`), one after the other in the
same run on copies of the same image: latency p50/p95 and burst throughput of each, and the ratios.

Images: the CR chest radiograph ``RG1_UNCR.dcm`` (1955 x 1841, pydicom-data) with fresh UIDs.
"""

from __future__ import annotations

import json
import signal
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pydicom

from dicom_io.net.scp import ListenerSettings, StorageSCP
from dicom_io.net.scu import Destination, StoreSCU
from service.node.app import Node
from service.node.config import available_cores, load_config
from service.node.supervisor import Supervisor
from service.tools.bench.receive import AnswerAtOnce, fresh_copies
from service.tools.demo.node_demo import FolderDestination
from service.tools.progress import Progress

SOURCE = "RG1_UNCR.dcm"
TRANSFER_REPEATS = 7


@dataclass(frozen=True)
class PipelineFigures:
    method: str
    images: int
    latency_p50_s: float
    latency_p95_s: float
    compute_p50_s: float
    overhead_ratio: float
    throughput_per_s: float
    idle_seconds: float
    device: str
    #: Mean seconds per observation of each node stage during the latency phase (the node's own
    #: ``pacsxai_stage_seconds``), so the overhead can be read stage by stage.
    stage_means_s: dict[str, float]
    #: The two C-STOREs every result needs, with the same SCU to a pynetdicom listener that
    #: stores nothing (median of TRANSFER_REPEATS, one association each): the image in, the
    #: Secondary Capture out. No pynetdicom node can answer faster than compute + these + the wait.
    transfer_in_s: float
    transfer_out_s: float

    @property
    def transfer_ratio(self) -> float:
        """The two transfers as a share of the compute time: the overhead no node design can remove."""
        return (self.transfer_in_s + self.transfer_out_s) / self.compute_p50_s

    @property
    def overhead_beyond_transfers(self) -> float:
        """What the node adds beyond compute, the two transfers and the assembly idle wait."""
        spent = self.compute_p50_s + self.transfer_in_s + self.transfer_out_s + self.idle_seconds
        return self.latency_p50_s / spent - 1


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def run_pipeline_bench(
    method: str, latency_images: int, burst_images: int, out_dir: Path, progress: Progress, source: str = SOURCE
) -> PipelineFigures:

    idle = 0.05
    with tempfile.TemporaryDirectory(prefix="pacs-xai-bench-") as temp:
        work = Path(temp)
        progress(f"writing {latency_images + burst_images} copies of {source} with fresh UIDs")
        files = fresh_copies(source, latency_images + burst_images, work / "input")
        destination = FolderDestination(work / "received")
        receiver = StorageSCP(ListenerSettings(ae_title="BENCHDEST", port=0), destination)
        receiver.start()
        config = load_config(
            None,
            {
                "listener": {"port": 0},
                "storage": {"data_dir": str(work / "node")},
                "destinations": [{"name": "dest", "ae_title": "BENCHDEST", "host": "127.0.0.1", "port": receiver.port}],
                "explain": {"methods": [method], "outputs": ["sc"]},
                "assembly": {"idle_seconds": idle, "max_wait_seconds": 60},
                "send": {"base_delay_seconds": 0.05, "max_delay_seconds": 0.5},
                "metrics": {"enabled": False},
            },
        )
        node = Node(config)
        node.start()
        node.warmed_up.wait(120)  # steady state: the first study's lazy initialisation is the warm-up's
        node_address = Destination(config.listener.ae_title, "127.0.0.1", node.port)
        scu = StoreSCU("BENCHSCU")
        try:
            latencies = []
            stages_before = _stage_totals(node)
            for index, path in enumerate(files[:latency_images]):
                expected = len(destination.arrivals) + 1
                started = time.monotonic()
                scu.send(node_address, [path])
                _wait(lambda n=expected: len(destination.arrivals) >= n, 120)
                latencies.append(max(destination.arrivals.values()) - started)
                progress(f"latency {index + 1}/{latency_images}: {latencies[-1]:.3f} s")
            stage_means = _stage_means(stages_before, _stage_totals(node))
            burst = files[latency_images:]
            before = len(destination.arrivals)
            started = time.monotonic()
            scu.send(node_address, burst)
            _wait(lambda: len(destination.arrivals) >= before + len(burst), 600)
            throughput = len(burst) / (max(destination.arrivals.values()) - started)
            progress(f"burst of {len(burst)}: {throughput:.2f} results/s")
            compute = _compute_times(node, files[:latency_images], progress)
            transfer_in = _transfer_time(scu, files[0])
            transfer_out = _transfer_time(scu, next(destination.folder.glob("*.dcm")))
            progress(f"C-STORE to a listener storing nothing: image {transfer_in:.3f} s, result {transfer_out:.3f} s")
        finally:
            node.stop()
            receiver.stop()
    p50 = statistics.median(latencies)
    compute_p50 = statistics.median(compute)
    figures = PipelineFigures(
        method=method,
        images=latency_images,
        latency_p50_s=round(p50, 4),
        latency_p95_s=round(percentile(latencies, 95), 4),
        compute_p50_s=round(compute_p50, 4),
        overhead_ratio=round(p50 / compute_p50 - 1, 3),
        throughput_per_s=round(throughput, 3),
        idle_seconds=idle,
        device=node.model.forward_runner.device,
        stage_means_s=stage_means,
        transfer_in_s=round(transfer_in, 4),
        transfer_out_s=round(transfer_out, 4),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    derived = {
        "transfer_ratio": round(figures.transfer_ratio, 3),
        "overhead_beyond_transfers": round(figures.overhead_beyond_transfers, 3),
    }
    (out_dir / f"pipeline-{method}.json").write_text(json.dumps({**asdict(figures), **derived}, indent=2))
    return figures


def _compute_times(node, files: list[Path], progress: Progress) -> list[float]:
    """Pure compute per image: the node's own pipeline in-process on the same files (read beforehand)."""
    datasets = [pydicom.dcmread(path) for path in files]
    times = []
    for ds in datasets:
        started = time.perf_counter()
        node.pipeline.process(ds)
        times.append(time.perf_counter() - started)
    progress(f"compute p50 {statistics.median(times):.3f} s over {len(times)} images")
    return times


def _transfer_time(scu: StoreSCU, path: Path) -> float:
    """Median seconds of one C-STORE of ``path`` (its own association) to a listener storing nothing."""

    with StorageSCP(ListenerSettings(ae_title="NOTHING", port=0), AnswerAtOnce()) as listener:
        target = Destination("NOTHING", "127.0.0.1", listener.port)
        times = []
        for _ in range(TRANSFER_REPEATS):
            started = time.perf_counter()
            outcome = scu.send(target, [path])[0]
            times.append(time.perf_counter() - started)
            if outcome.verdict != "delivered":
                raise RuntimeError(f"the transfer probe could not send {path.name}: {outcome.detail}")
    return statistics.median(times)


def _stage_totals(node) -> dict[str, tuple[float, float]]:
    """(sum of seconds, count) per stage label of the node's ``pacsxai_stage_seconds``."""
    totals: dict[str, list[float]] = {}
    for metric in node.metrics.registry.collect():
        if metric.name != "pacsxai_stage_seconds":
            continue
        for sample in metric.samples:
            stage = sample.labels.get("stage")
            if sample.name.endswith("_sum"):
                totals.setdefault(stage, [0.0, 0.0])[0] = sample.value
            elif sample.name.endswith("_count"):
                totals.setdefault(stage, [0.0, 0.0])[1] = sample.value
    return {stage: (total, count) for stage, (total, count) in totals.items()}


def _stage_means(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    means = {}
    for stage, (total, count) in after.items():
        old_total, old_count = before.get(stage, (0.0, 0.0))
        if count > old_count:
            means[stage] = round((total - old_total) / (count - old_count), 4)
    return means


def _wait(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no result within {timeout:.0f} s; see the node's journal")
        time.sleep(0.005)


def print_figures(f: PipelineFigures) -> None:
    print(f"method {f.method} on {f.device}, {f.images} CR 1955x1841 images (assembly idle {f.idle_seconds} s)")
    print(f"  latency C-STORE -> SC at destination: p50 {f.latency_p50_s:.3f} s, p95 {f.latency_p95_s:.3f} s")
    print(f"  pure compute (pipeline in-process):   p50 {f.compute_p50_s:.3f} s")
    print(f"  pipeline overhead:                    {f.overhead_ratio:.1%}")
    print(
        f"  of which the two C-STOREs (pynetdicom to a listener storing nothing): image in {f.transfer_in_s:.3f} s "
        f"+ result out {f.transfer_out_s:.3f} s = {f.transfer_ratio:.1%} of compute"
    )
    print(f"  beyond compute, transfers and the {f.idle_seconds} s assembly wait: {f.overhead_beyond_transfers:.1%}")
    print(f"  throughput at saturation:             {f.throughput_per_s:.2f} images/s")
    print("  node stages, mean seconds per observation (latency phase):")
    for stage, seconds in f.stage_means_s.items():
        print(f"    {stage:14} {seconds:.4f}")


# --- one process against several (``--processes``) -------------------------------------------


@dataclass(frozen=True)
class VariantFigures:
    """One way of running the node, measured on the same images as the other."""

    receivers: int
    workers: int
    latency_p50_s: float
    latency_p95_s: float
    throughput_per_s: float


@dataclass(frozen=True)
class ProcessesFigures:
    """The single-process node against the node in several processes, same run, same images."""

    method: str
    images: int
    burst: int
    cores: int
    single: VariantFigures
    multi: VariantFigures

    @property
    def throughput_ratio(self) -> float:
        return self.multi.throughput_per_s / self.single.throughput_per_s

    @property
    def latency_p50_ratio(self) -> float:
        return self.multi.latency_p50_s / self.single.latency_p50_s


def run_processes_bench(
    method: str,
    latency_images: int,
    burst_images: int,
    receivers: int,
    workers: int,
    out_dir: Path,
    progress: Progress,
    source: str = SOURCE,
    rounds: int = 3,
) -> ProcessesFigures:
    """The node as one process (``listener.processes`` = ``workers.processes`` = 1) and in
    ``receivers`` + ``workers`` processes, both started once, then measured in ``rounds``
    alternating rounds on copies of the same image (the other node frozen with SIGSTOP, or idle,
    meanwhile), so a machine whose load changes during the run weighs on both alike. Per round
    and node: ``latency_images`` sent one by one, then a burst of ``burst_images`` (over
    ``min(4, receivers)`` associations for the multi-process node, so every receiver can take part,
    and one for the single process). Every image is a study of its own: a worker takes a whole
    series, so the images of one series never run on two workers at once."""
    idle = 0.05
    per_variant = rounds * (latency_images + burst_images)
    with tempfile.TemporaryDirectory(prefix="pacs-xai-bench-") as temp:
        work = Path(temp)
        progress(f"writing {2 * per_variant} copies of {source} with fresh UIDs")
        # One study per image (a radiograph is a study of its own): one series is one worker's work.
        files = fresh_copies(source, 2 * per_variant, work / "input", study_each=True)
        destination = FolderDestination(work / "received")
        receiver = StorageSCP(ListenerSettings(ae_title="BENCHDEST", port=0), destination)
        receiver.start()
        overrides = {
            "destinations": [{"name": "dest", "ae_title": "BENCHDEST", "host": "127.0.0.1", "port": receiver.port}],
            "explain": {"methods": [method], "outputs": ["sc"]},
            "assembly": {"idle_seconds": idle, "max_wait_seconds": 60},
            "send": {"base_delay_seconds": 0.05, "max_delay_seconds": 0.5},
            "metrics": {"enabled": False},
        }
        node = Node(
            load_config(None, {**overrides, "storage": {"data_dir": str(work / "single")}, "listener": {"port": 0}})
        )
        multi_config = load_config(
            None,
            {
                **overrides,
                "storage": {"data_dir": str(work / "multi")},
                "listener": {"port": 0, "processes": receivers},
                "workers": {"processes": workers},
            },
        )
        supervisor = Supervisor(multi_config, receivers, workers)
        measured: dict[str, tuple[list[float], float, int]] = {"single": ([], 0.0, 0), "multi": ([], 0.0, 0)}
        try:
            node.start()
            supervisor.start()
            progress("waiting for both nodes to load and warm up their models")
            node.warmed_up.wait(300)
            _wait(lambda: supervisor.readiness()[0], 300)
            chunks = iter(
                files[i : i + latency_images + burst_images]
                for i in range(0, len(files), latency_images + burst_images)
            )
            for round_index in range(rounds):
                for name in ("single", "multi"):
                    chunk = next(chunks)
                    _freeze(supervisor, name == "single")
                    port, associations = (node.port, 1) if name == "single" else (supervisor.port, min(4, receivers))
                    progress(f"round {round_index + 1}/{rounds}, {name}")
                    latencies, burst_seconds = _variant(
                        port, destination, chunk, latency_images, associations, progress
                    )
                    old_latencies, old_seconds, old_count = measured[name]
                    measured[name] = (old_latencies + latencies, old_seconds + burst_seconds, old_count + burst_images)
        finally:
            _freeze(supervisor, False)
            supervisor.stop()
            node.stop()
            receiver.stop()

    def summary(name: str, r: int, w: int) -> VariantFigures:
        latencies, seconds, count = measured[name]
        return VariantFigures(
            r, w, round(statistics.median(latencies), 4), round(percentile(latencies, 95), 4), round(count / seconds, 3)
        )

    figures = ProcessesFigures(
        method,
        latency_images * rounds,
        burst_images * rounds,
        available_cores(),
        summary("single", 1, 1),
        summary("multi", receivers, workers),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    derived = {
        "throughput_ratio": round(figures.throughput_ratio, 3),
        "latency_p50_ratio": round(figures.latency_p50_ratio, 3),
        "rounds": rounds,
    }
    (out_dir / f"pipeline-processes-{method}.json").write_text(json.dumps({**asdict(figures), **derived}, indent=2))
    plot_processes(figures, out_dir / f"pipeline-processes-{method}.png")
    return figures


def _freeze(supervisor: Supervisor, frozen: bool) -> None:
    """SIGSTOP (or SIGCONT) every process of the multi-process node: frozen, it takes no CPU."""
    for child in supervisor.children:
        if child.process is not None and child.process.poll() is None:
            child.process.send_signal(signal.SIGSTOP if frozen else signal.SIGCONT)


def _variant(
    port: int,
    destination: FolderDestination,
    files: list[Path],
    latency_images: int,
    associations: int,
    progress: Progress,
) -> tuple[list[float], float]:
    """Latencies of the first ``latency_images`` sent one by one; seconds for the rest as a burst."""
    node_address = Destination("PACSXAI", "127.0.0.1", port)
    scu = StoreSCU("BENCHSCU")
    latencies = []
    for index, path in enumerate(files[:latency_images]):
        expected = len(destination.arrivals) + 1
        started = time.monotonic()
        scu.send(node_address, [path])
        _wait(lambda n=expected: len(destination.arrivals) >= n, 300)
        latencies.append(max(destination.arrivals.values()) - started)
        progress(f"  latency {index + 1}/{latency_images}: {latencies[-1]:.3f} s")
    burst = files[latency_images:]
    before = len(destination.arrivals)
    started = time.monotonic()
    senders = [
        threading.Thread(target=scu.send, args=(node_address, burst[i::associations])) for i in range(associations)
    ]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    _wait(lambda: len(destination.arrivals) >= before + len(burst), 1800)
    seconds = max(destination.arrivals.values()) - started
    progress(f"  burst of {len(burst)} over {associations} association(s): {len(burst) / seconds:.2f} results/s")
    return latencies, seconds


def plot_processes(figures: ProcessesFigures, path: Path) -> None:
    """Two bar pairs (PIL): throughput and latency p50, one process against several."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (820, 260), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    draw.text(
        (10, 10),
        f"bench pipeline, {figures.method}, {figures.cores} cores: one process vs several",
        fill="black",
        font=font,
    )
    rows = (
        ("throughput, results/s", figures.single.throughput_per_s, figures.multi.throughput_per_s),
        ("latency p50, s", figures.single.latency_p50_s, figures.multi.latency_p50_s),
    )
    multi_name = f"{figures.multi.receivers} receivers + {figures.multi.workers} workers"
    for i, (label, one, several) in enumerate(rows):
        y = 45 + i * 100
        draw.text((10, y + 20), label, fill="black", font=font)
        top = max(one, several, 1e-9)
        for j, (name, value, colour) in enumerate(
            (("1 process", one, (60, 90, 180)), (multi_name, several, (220, 90, 30)))
        ):
            bar_y = y + j * 30
            draw.rectangle((220, bar_y, 220 + int(400 * value / top), bar_y + 22), fill=colour)
            draw.text((226 + int(400 * value / top), bar_y + 3), f"{name} {value:.2f}", fill="black", font=font)
    image.save(path)


def print_processes(f: ProcessesFigures) -> None:
    print(f"method {f.method}, {f.images} images one by one + {f.burst} in bursts, {f.cores} cores")
    for name, v in (("1 process", f.single), (f"{f.multi.receivers} receivers + {f.multi.workers} workers", f.multi)):
        print(
            f"  {name:28} latency p50 {v.latency_p50_s:.3f} s, p95 {v.latency_p95_s:.3f} s, "
            f"throughput {v.throughput_per_s:.2f} results/s"
        )
    print(f"  throughput ratio {f.throughput_ratio:.2f}x, latency p50 ratio {f.latency_p50_ratio:.2f}")
