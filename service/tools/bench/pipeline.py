"""``pacs-xai bench pipeline``: the node end to end, against the pure compute on the same images.

All on 127.0.0.1 in one run: a sender (pynetdicom SCU), the node (demo model, the chosen
explainer, Secondary Capture output) and a receiving destination. Measured:

- latency: each image sent alone; time from the start of its C-STORE to its Secondary Capture
  acknowledged at the destination; p50 and p95;
- throughput at saturation: a burst of images over one association; results per second;
- compute: the same images through the pipeline in-process (prepare, model, explainer, encode),
  no network, no spool; the pipeline overhead is latency p50 / compute p50 - 1.

Images: the CR chest radiograph ``RG1_UNCR.dcm`` (1955 x 1841, pydicom-data) with fresh UIDs.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pydicom

from dicom_io.net.scp import ListenerSettings, StorageSCP
from dicom_io.net.scu import Destination, StoreSCU
from service.node.app import Node
from service.node.config import load_config
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
