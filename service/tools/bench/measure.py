"""How the explainer benchmarks measure a call: wall time, peak memory, forward rows, the runner floor.

See :mod:`service.tools.bench.explain` for what each figure means.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from service.tools.bench.models import BenchModel

#: A warm-up call at least this long also counts as a timed call (seconds).
WARMUP_AS_SAMPLE_S = 10.0
#: Short calls are repeated until this much time is timed (seconds) or this many calls are made.
MIN_TIMED_S = 2.0
MAX_TIMED_CALLS = 25
#: Batch sizes the per-sample runner times are measured at (the better one is kept).
FORWARD_BATCHES = (16, 64)
GRADIENT_BATCHES = (8, 32)


# --- counting forward rows -----------------------------------------------------------------------------


@dataclass(frozen=True)
class InputLayer:
    """The first torch function a model applies to its input, and its weight's shape (if any)."""

    function: Callable[..., Any]
    weight_shape: tuple[int, ...] | None
    sample_shape: tuple[int, ...]


class _FirstCall(TorchFunctionMode):
    """Records the first torch function called with ``target`` as an argument."""

    def __init__(self, target: torch.Tensor) -> None:
        super().__init__()
        self.target = target
        self.found: InputLayer | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's signature)
        if self.found is None and any(arg is self.target for arg in args):
            weight = args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else None
            shape = None if weight is None else tuple(weight.shape)
            self.found = InputLayer(func, shape, tuple(self.target.shape[1:]))
        return func(*args, **(kwargs or {}))


def input_layer(model: nn.Module, sample: torch.Tensor) -> InputLayer:
    """Probe ``model`` with one sample ``[1, C, H, W]`` for its input layer."""
    probe = _FirstCall(sample)
    with probe, torch.no_grad():
        model(sample)
    if probe.found is None:
        raise ValueError(f"{type(model).__name__} applies no torch function to its input")
    return probe.found


class RowCounter(TorchFunctionMode):
    """Counts the samples passing through the input layer, with and without gradients enabled."""

    def __init__(self, layer: InputLayer) -> None:
        super().__init__()
        self.layer = layer
        self.grad_rows = 0
        self.nograd_rows = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's signature)
        if func is self.layer.function and args and self._matches(args):
            if torch.is_grad_enabled():
                self.grad_rows += int(args[0].shape[0])
            else:
                self.nograd_rows += int(args[0].shape[0])
        return func(*args, **(kwargs or {}))

    def _matches(self, args: tuple[Any, ...]) -> bool:
        first = args[0]
        if not isinstance(first, torch.Tensor) or first.ndim != len(self.layer.sample_shape) + 1:
            return False
        if self.layer.weight_shape is None:
            return tuple(first.shape[1:]) == self.layer.sample_shape
        # The layer's own weight identifies it; its input may be a box of the image (incremental
        # occlusion recomputes only the region a window reaches): a box counts as a row.
        return (
            first.shape[1] == self.layer.sample_shape[0]
            and len(args) > 1
            and isinstance(args[1], torch.Tensor)
            and tuple(args[1].shape) == self.layer.weight_shape
        )


# --- peak memory ---------------------------------------------------------------------------------------


def _status_kib(field_name: str) -> int:
    match = re.search(rf"^{field_name}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"/proc/self/status has no {field_name}")
    return int(match.group(1))


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def cpu_peak_supported() -> str | None:
    """``None`` when the CPU peak can be measured here, else the reason it cannot."""
    clear_refs = Path("/proc/self/clear_refs")
    if not clear_refs.exists() or not os.access(clear_refs, os.W_OK):
        return "no writable /proc/self/clear_refs (Linux only) to reset the peak resident size"
    return None


class PeakMemory:
    """Context manager: ``peak_bytes`` above the memory in use on entry (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes: int | None = None
        self.missing: str | None = None
        self._base = 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self.missing = cpu_peak_supported()
        if self.missing is None:
            libc = _libc()
            if libc is not None and hasattr(libc, "malloc_trim"):
                libc.malloc_trim(0)
            self._base = _status_kib("VmRSS") * 1024
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self.missing is None:
            self.peak_bytes = max(0, _status_kib("VmHWM") * 1024 - self._base)


# --- measuring one call --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """How many timed calls: at least ``repeats``; short calls repeated until ``min_seconds`` are
    timed or ``max_calls`` made."""

    repeats: int
    min_seconds: float = MIN_TIMED_S
    max_calls: int = MAX_TIMED_CALLS


@dataclass
class Measurement:
    """Timed calls (seconds), peak memory and forward rows of the warm-up call, its output."""

    seconds: list[float]
    peak_bytes: int | None
    memory_missing: str | None
    grad_rows: int
    nograd_rows: int
    first_output: Any = field(repr=False)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def rows(self) -> int:
        return self.grad_rows + self.nograd_rows


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    call: Callable[[], Any],
    device: torch.device,
    layer: InputLayer,
    timing: Timing,
    first: Callable[[], Any] | None = None,
) -> Measurement:
    """Warm-up call (``first`` when given: the same work with extra output) with memory and rows,
    then timed calls as ``timing`` says, so a median of sub-second calls is not one scheduler hiccup."""
    memory, counter = PeakMemory(device), RowCounter(layer)
    with memory:
        with counter:
            started = time.perf_counter()
            output = (first or call)()
            synchronise(device)
            elapsed = time.perf_counter() - started
    seconds = [elapsed] if elapsed >= WARMUP_AS_SAMPLE_S else []
    while len(seconds) < timing.repeats or (sum(seconds) < timing.min_seconds and len(seconds) < timing.max_calls):
        started = time.perf_counter()
        call()
        synchronise(device)
        seconds.append(time.perf_counter() - started)
    return Measurement(
        seconds, memory.peak_bytes, memory.missing, counter.grad_rows, counter.nograd_rows, first_output=output
    )


# --- runner floor ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunnerTimes:
    """Seconds per sample of a plain forward pass and of forward + backward to the input, each at
    the batch size where it was fastest."""

    forward_s: float
    forward_batch: int
    gradient_s: float
    gradient_batch: int
    #: Seconds per sample of the ONNX runner (the node's forward path), where the model has one.
    onnx_forward_s: float | None = None

    def floor_s(self, grad_rows: int, nograd_rows: int) -> float:
        return nograd_rows * self.forward_s + grad_rows * self.gradient_s


def _batch_of(bench: BenchModel, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = (torch.arange(size) % bench.images.shape[0]).to(bench.images.device)
    return bench.images[index], torch.tensor(bench.targets, device=bench.images.device)[index]


def _per_sample(run: Callable[[int], None], sizes: Sequence[int], device: torch.device) -> tuple[float, int]:
    """Best median seconds per sample over ``sizes`` (each: up to 3 runs, or 5 s, after an untimed
    run at that size: a GPU picks its kernels and grows its allocator on a new shape)."""
    best: tuple[float, int] | None = None
    for size in sizes:
        run(size)
        synchronise(device)
        times: list[float] = []
        while len(times) < 3 and sum(times) < 5.0:
            started = time.perf_counter()
            run(size)
            synchronise(device)
            times.append(time.perf_counter() - started)
        per_sample = statistics.median(times) / size
        if best is None or per_sample < best[0]:
            best = (per_sample, size)
    assert best is not None
    return best


def forward_time(bench: BenchModel, device: torch.device) -> tuple[float, int]:
    """Seconds per sample of ``bench.module`` without gradients, and the batch size it was best at."""

    def forward(size: int) -> None:
        inputs, _ = _batch_of(bench, size)
        with torch.no_grad():
            bench.module(inputs)

    return _per_sample(forward, FORWARD_BATCHES, device)


def onnx_forward_time(bench: BenchModel) -> tuple[float, int]:
    """Seconds per sample of the ONNX runner (the node's forward path), and its best batch size."""

    def forward(size: int) -> None:
        inputs, _ = _batch_of(bench, size)
        bench.onnx_runner.forward(np.ascontiguousarray(inputs.cpu().numpy(), dtype=np.float32))

    return _per_sample(forward, FORWARD_BATCHES, torch.device("cpu"))


def gradient_time(bench: BenchModel, device: torch.device) -> tuple[float, int]:
    """Seconds per sample of a forward pass and the gradient of the target logit to the input."""

    def gradient(size: int) -> None:
        inputs, targets = _batch_of(bench, size)
        inputs = inputs.clone().requires_grad_(True)
        logits = bench.module(inputs)
        torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), inputs)

    return _per_sample(gradient, GRADIENT_BATCHES, device)


def add_floor(record: dict[str, Any], runner: RunnerTimes) -> None:
    """Put the floor of ``record``'s forward rows, and time / floor, into the record."""
    if record["status"] != "ok":
        return
    images = len(record["targets"])
    floor_s = runner.floor_s(record["grad_rows"], record["nograd_rows"]) / images
    record["floor_s_per_image"] = floor_s
    record["floor_ratio"] = record["time_s_per_image"] / floor_s if floor_s > 0 else None
    if "onnx_time_s_per_image" in record and runner.onnx_forward_s:
        onnx_floor_s = runner.onnx_forward_s * record["nograd_rows"] / images
        record["onnx_floor_s_per_image"] = onnx_floor_s
        record["onnx_floor_ratio"] = record["onnx_time_s_per_image"] / onnx_floor_s if onnx_floor_s > 0 else None


def device_description(device: torch.device) -> str:
    """The device in words: GPU name, or CPU model and torch's thread count."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        if match:
            name = match.group(1).strip()
    return f"cpu ({name}, {torch.get_num_threads()} threads, {os.cpu_count()} cores)"
