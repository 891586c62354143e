"""``pacs-xai bench throughput``: images per second of batched Grad-CAM, ours against pytorch-grad-cam.

Issue #6's GPU figure: Grad-CAM on a DenseNet-121-sized model (or the demo model) at 224², whole
batches of ``B`` images per call, measured end to end as the node needs it: the batch starts in
host memory, the maps come back to host memory (``[B, H, W]`` float32). For each batch size:

- one warm-up call (peak memory measured on it, as ``bench explain`` does: CUDA
  ``max_memory_allocated`` above the allocation before the call, CPU peak RSS above the RSS
  before), then timed calls until ``images`` images went through (at least ``MIN_CALLS`` calls);
  images/s = images / seconds, with the device synchronised before the clock stops;
- the peer, pytorch-grad-cam's ``GradCAM`` on the same module and layer with the same batch and
  per-image targets, measured the same way in the same run; its maps (min-max scaled per image by
  the library) are compared with ours by the Pearson correlation per image, so both sides are seen
  to compute the same thing.

cuDNN's autotuner (``torch.backends.cudnn.benchmark``) is on for both, as in the node's CUDA torch
runner; it is restored afterwards. Images are phantom nodule radiographs through the demo card's
pixel pipeline, repeated to fill a batch (pixel content does not change the cost). Writes
``throughput.json`` and ``throughput.png``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.explain.base import Explainer
from service.explain.hooks import resolve_module
from service.explain.registry import get_explainer
from service.tools.bench.measure import PeakMemory, device_description, synchronise
from service.tools.bench.models import MODELS, BenchModel, load_bench_model, phantom_images
from service.tools.bench.peers import PeerMissing, import_peer, pytorch_grad_cam
from service.tools.progress import Progress

#: Issue #6: batched Grad-CAM on a DenseNet-121-sized model, images per second on one GPU.
GPU_GOAL_IMAGES_PER_S = 1000.0
#: Timed calls per batch size at least, whatever ``images`` says.
MIN_CALLS = 3
#: Distinct phantom images generated; a batch repeats them.
DISTINCT_IMAGES = 16
DEFAULT_BATCHES = {"cuda": (32, 64, 128, 256), "cpu": (4, 16)}
DEFAULT_IMAGES = {"cuda": 2048, "cpu": 32}


@contextlib.contextmanager
def cudnn_autotuner(enabled: bool) -> Iterator[None]:
    """``torch.backends.cudnn.benchmark`` set for the block, the earlier value restored after."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def time_batches(call: Callable[[], Any], device: torch.device, batch: int, images: int) -> dict[str, Any]:
    """Warm-up call with peak memory, then timed calls until ``images`` images (>= ``MIN_CALLS`` calls)."""
    memory = PeakMemory(device)
    with memory:
        started = time.perf_counter()
        call()
        synchronise(device)
        warmup_s = time.perf_counter() - started
    calls = max(MIN_CALLS, -(-images // batch))
    started = time.perf_counter()
    for _ in range(calls):
        call()
    synchronise(device)
    seconds = time.perf_counter() - started
    return {
        "status": "ok",
        "batch": batch,
        "calls": calls,
        "images": calls * batch,
        "seconds": seconds,
        "images_per_s": calls * batch / seconds,
        "ms_per_batch": seconds / calls * 1e3,
        "warmup_s": warmup_s,
        "peak_mb": None if memory.peak_bytes is None else memory.peak_bytes / 2**20,
        "memory_missing": memory.missing,
    }


def _pearson_per_image(ours: np.ndarray, theirs: np.ndarray) -> list[float]:
    values = []
    for a, b in zip(ours.reshape(len(ours), -1), theirs.reshape(len(theirs), -1), strict=True):
        if a.std() == 0 or b.std() == 0:
            values.append(float("nan"))
        else:
            values.append(float(np.corrcoef(a, b)[0, 1]))
    return values


def _peer_call(
    module: torch.nn.Module, layer: str, batch: torch.Tensor, targets: Sequence[int]
) -> tuple[Callable[[], np.ndarray], Callable[[], None]]:
    """pytorch-grad-cam GradCAM on the same layer: ``(call, release)``; ``PeerMissing`` when absent."""
    grad_cam, _ = pytorch_grad_cam()
    model_targets = import_peer("pytorch_grad_cam.utils.model_targets", "pytorch-grad-cam")
    cam = grad_cam.GradCAM(model=module, target_layers=[resolve_module(module, layer)])
    cam.batch_size = len(batch)
    outputs = [model_targets.ClassifierOutputTarget(t) for t in targets]

    def call() -> np.ndarray:
        with contextlib.redirect_stderr(io.StringIO()):
            return cam(input_tensor=batch, targets=outputs)

    return call, cam.activations_and_grads.release


def measure_batch(
    explainer: Explainer, bench: BenchModel, batch: torch.Tensor, targets: list[int], device: torch.device, images: int
) -> dict[str, Any]:
    """One batch size: ours, then the peer, then how well their maps agree."""
    maps: dict[str, np.ndarray] = {}
    row: dict[str, Any] = {"batch": len(batch)}

    def ours() -> None:
        maps["ours"] = explainer.explain(bench.module, batch, targets).numpy()

    row["pacs-xai"] = _timed_or_oom(ours, device, len(batch), images)
    try:
        call, release = _peer_call(bench.module, bench.target_layer, batch, targets)
    except PeerMissing as exc:
        row["pytorch-grad-cam"] = {"status": str(exc)}
    else:

        def peer() -> None:
            maps["peer"] = call()

        try:
            row["pytorch-grad-cam"] = _timed_or_oom(peer, device, len(batch), images)
        finally:
            release()
            bench.module.zero_grad(set_to_none=True)  # the peer back-propagates into the weights
    if "ours" in maps and "peer" in maps:
        correlations = _pearson_per_image(maps["ours"][:DISTINCT_IMAGES], maps["peer"][:DISTINCT_IMAGES])
        row["pearson_min"] = float(np.nanmin(correlations))
    return row


def _timed_or_oom(call: Callable[[], Any], device: torch.device, batch: int, images: int) -> dict[str, Any]:
    """:func:`time_batches`, or the out-of-memory error as the status; the cache emptied after."""
    try:
        return time_batches(call, device, batch, images)
    except torch.OutOfMemoryError as exc:
        return {"status": f"out of memory: {str(exc).splitlines()[0]}"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_throughput_bench(
    model_name: str,
    batches: Sequence[int] | None,
    images: int | None,
    out: Path,
    progress: Progress,
    device: str | None = None,
) -> dict[str, Any]:
    """Measure ours and the peer at each batch size; write ``throughput.json`` and ``.png`` under ``out``."""
    if model_name not in MODELS:
        raise ValueError(f"unknown bench model {model_name!r}; choose from {', '.join(MODELS)}")
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batches = list(batches or DEFAULT_BATCHES[target.type])
    images = images or DEFAULT_IMAGES[target.type]
    if any(size < 1 for size in batches) or images < 1:
        raise ValueError(f"batch sizes and images must be >= 1, got batches {batches} and images {images}")
    progress(f"bench throughput on {device_description(target)}: gradcam on {model_name}, batches {batches}")
    distinct = phantom_images(DISTINCT_IMAGES)
    bench = load_bench_model(model_name, distinct, target)
    explainer = get_explainer("gradcam", target_layer=bench.target_layer)
    figures: dict[str, Any] = {
        "device": device_description(target),
        "torch": torch.__version__,
        "model": model_name,
        "parameters": bench.parameters,
        "input": list(distinct.shape[1:]),
        "target_layer": bench.target_layer,
        "cudnn_benchmark": target.type == "cuda",
        "memory": "cuda max_memory_allocated above the allocation before the call"
        if target.type == "cuda"
        else "peak RSS above RSS before the call",
        "settings": {"batches": batches, "images": images},
        "rows": [],
    }
    with cudnn_autotuner(target.type == "cuda"):
        for size in batches:
            repeat = -(-size // DISTINCT_IMAGES)
            batch = distinct.repeat(repeat, 1, 1, 1)[:size].contiguous()
            if target.type == "cuda":
                batch = batch.pin_memory()
            row = measure_batch(explainer, bench, batch, (bench.targets * repeat)[:size], target, images)
            figures["rows"].append(row)
            progress(_row_line(row))
    figures["goal"] = goal(figures, target)
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(figures, indent=2))
    plot_figures(figures, out / "throughput.png")
    return figures


def _rate(entry: Mapping[str, Any]) -> str:
    return f"{entry['images_per_s']:.0f} img/s" if entry.get("status") == "ok" else str(entry.get("status"))


def _row_line(row: Mapping[str, Any]) -> str:
    ours, peer = row["pacs-xai"], row.get("pytorch-grad-cam", {})
    line = f"batch {row['batch']}: pacs-xai {_rate(ours)}, pytorch-grad-cam {_rate(peer)}"
    if ours.get("status") == "ok" and peer.get("status") == "ok":
        line += f" (ours {ours['images_per_s'] / peer['images_per_s']:.2f}x)"
    if "pearson_min" in row:
        line += f", maps agree: Pearson >= {row['pearson_min']:.4f}"
    return line


def goal(figures: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Issue #6: >= 1,000 images/s on one GPU; on a CPU the figure is recorded, the goal not judged."""
    rates = [row["pacs-xai"]["images_per_s"] for row in figures["rows"] if row["pacs-xai"].get("status") == "ok"]
    best = max(rates, default=0.0)
    return {
        "goal": f"batched Grad-CAM >= {GPU_GOAL_IMAGES_PER_S:.0f} images/s on one GPU ({figures['model']})",
        "measured": f"{best:.0f} images/s (best batch)",
        "met": None if device.type != "cuda" else best >= GPU_GOAL_IMAGES_PER_S,
    }


def print_figures(figures: Mapping[str, Any]) -> None:
    print(
        f"bench throughput on {figures['device']}, torch {figures['torch']}: gradcam on {figures['model']} "
        f"({figures['parameters'] / 1e6:.2f} M parameters, input {'x'.join(map(str, figures['input']))}), "
        f"maps returned to host memory; memory: {figures['memory']}"
    )
    print(
        f"  {'batch':>5} {'implementation':18} {'img/s':>8} {'ms/batch':>9} {'peak MB':>8} {'ours x':>6} {'Pearson':>8}"
    )
    for row in figures["rows"]:
        ours = row["pacs-xai"]
        for name in ("pacs-xai", "pytorch-grad-cam"):
            entry = row.get(name, {"status": "not run"})
            if entry.get("status") != "ok":
                print(f"  {row['batch']:>5} {name:18} {entry.get('status')}")
                continue
            peak = "-" if entry["peak_mb"] is None else f"{entry['peak_mb']:.0f}"
            ratio = ""
            if name != "pacs-xai" and ours.get("status") == "ok":
                ratio = f"{ours['images_per_s'] / entry['images_per_s']:.2f}"
            pearson = f"{row['pearson_min']:.4f}" if name != "pacs-xai" and "pearson_min" in row else ""
            print(
                f"  {row['batch']:>5} {name:18} {entry['images_per_s']:>8.0f} {entry['ms_per_batch']:>9.1f} "
                f"{peak:>8} {ratio:>6} {pearson:>8}".rstrip()
            )
    status = {True: "met", False: "NOT met", None: "not judged (no GPU)"}[figures["goal"]["met"]]
    print(f"\ngoal (issue #6): [{status}] {figures['goal']['goal']}: {figures['goal']['measured']}")


def _nice_step(rough: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten that is >= ``rough`` (axis ticks)."""
    power = 10 ** math.floor(math.log10(rough)) if rough > 0 else 1.0
    return next(factor * power for factor in (1, 2, 5, 10) if factor * power >= rough)


def plot_figures(figures: Mapping[str, Any], path: Path) -> None:
    """Images/s against batch size (Pillow): ours, the peer, and the GPU goal line."""
    from PIL import Image, ImageDraw, ImageFont

    series = {
        name: [
            (row["batch"], row[name]["images_per_s"])
            for row in figures["rows"]
            if row.get(name, {}).get("status") == "ok"
        ]
        for name in ("pacs-xai", "pytorch-grad-cam")
    }
    values = [rate for points in series.values() for _, rate in points] + [GPU_GOAL_IMAGES_PER_S]
    tick = _nice_step(max(values) * 1.15 / 5)
    top = tick * math.ceil(max(values) * 1.15 / tick)
    batches = [row["batch"] for row in figures["rows"]] or [1]
    left, right, upper, lower, width, height = 70, 190, 40, 50, 720, 420
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    draw.text((10, 10), f"batched Grad-CAM, images/s, {figures['model']}, {figures['device']}", fill="black", font=font)
    span_x, span_y = width - left - right, height - upper - lower

    def x_of(index: int) -> int:
        return left + (span_x * index // max(1, len(batches) - 1) if len(batches) > 1 else span_x // 2)

    def y_of(rate: float) -> int:
        return upper + int(span_y * (1 - rate / top))

    draw.line((left, upper, left, height - lower), fill="black")
    draw.line((left, height - lower, width - right, height - lower), fill="black")
    for index, size in enumerate(batches):
        draw.text((x_of(index) - 8, height - lower + 6), str(size), fill="black", font=font)
    draw.text((left + span_x // 2 - 30, height - 22), "batch size", fill="black", font=font)
    for step in range(round(top / tick) + 1):
        rate = tick * step
        draw.line((left - 4, y_of(rate), left, y_of(rate)), fill="black")
        draw.text((8, y_of(rate) - 6), f"{rate:,.0f}", fill="black", font=font)
    goal_y = y_of(GPU_GOAL_IMAGES_PER_S)
    draw.line((left, goal_y, width - right, goal_y), fill=(200, 0, 0))
    draw.text((width - right + 6, goal_y - 6), "GPU goal", fill=(200, 0, 0), font=font)
    colours = {"pacs-xai": (220, 90, 30), "pytorch-grad-cam": (60, 150, 80)}
    for legend, (name, points) in enumerate(series.items()):
        coords = [(x_of(batches.index(size)), y_of(rate)) for size, rate in points]
        if len(coords) > 1:
            draw.line(coords, fill=colours[name], width=3)
        for x, y in coords:
            draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=colours[name])
        draw.text((width - right + 6, upper + 20 * legend + 30), name, fill=colours[name], font=font)
    image.save(path)
