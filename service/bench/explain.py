"""``pacs-xai bench explain``: every explainer's cost against Captum / pytorch-grad-cam / MONAI.

For each (model, registered method), in one run on one device:

- wall time per image: the median of ``repeats`` timed calls (more for sub-second calls, see
  :func:`measure`) on a batch of ``images`` phantom nodule radiographs (224², the demo card's
  pixel pipeline), after one warm-up call; a warm-up call of 10 s or more also counts as a timed
  call (lazy initialisation is then below 1 %);
- peak memory of a call above what was in use before it. CUDA: ``torch.cuda.max_memory_allocated``
  minus the allocation before the call. CPU: the kernel's peak resident set size (``VmHWM``,
  reset by writing 5 to ``/proc/self/clear_refs``) minus the resident size just before the call,
  after ``malloc_trim(0)`` has handed freed heap pages back to the kernel, so memory the allocator
  kept from earlier calls is counted again when reused. Exact (no sampling); taken on the
  warm-up call. Linux only; elsewhere the memory column says why it is missing;
- forward rows: the samples that went through the model's input layer (found by a probe: the
  first torch function applied to the input), counted with a ``TorchFunctionMode`` on the warm-up
  call, split into rows run with gradients enabled and rows without. Counting at the input layer
  sees every path (module calls, ``torch.fx`` graphs run node by node, peers' hooks);
- the floor: ``rows without gradients x per-sample forward time + rows with gradients x
  per-sample forward+backward time``, both measured on the same model at the better of two batch
  sizes; ``time / floor`` is how close a method gets to the model's own cost;
- the peers that implement the method, at matched settings (taken from our explainer's own
  settings), measured the same way; Captum's occlusion at several ``perturbations_per_eval``
  values, the best reported. A peer that is not installed is reported so, one that fails with its
  error.

Then HiPe against RISE (4,000 masks by default) on a few phantom nodules with the demo model:
forward passes and the deletion AUC (pixels removed in decreasing saliency order in 20 steps,
set to the methods' baseline, area under the target probability curve; lower is better), with a
random ordering as reference. Everything goes to ``explain.json`` and a bar chart ``explain.png``
(Pillow, log time axis).

All methods, ours and the peers', get the eager torch module (the node gives forward-only methods
its ONNX pool instead), so the comparison is between implementations on the same model.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import importlib
import inspect
import io
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from service.explain.base import Explainer, ExplainerError
from service.explain.hooks import resolve_module
from service.explain.occlusion import window_masks
from service.explain.registry import available_explainers, explainer_class, get_explainer

Progress = Callable[[str], None]
MODELS = ("demo", "densenet121")
#: A warm-up call at least this long also counts as a timed call (seconds).
WARMUP_AS_SAMPLE_S = 10.0
#: Short calls are repeated until this much time is timed (seconds) or this many calls are made.
MIN_TIMED_S = 2.0
MAX_TIMED_CALLS = 25
#: Batch sizes the per-sample runner times are measured at (the better one is kept).
FORWARD_BATCHES = (16, 64)
GRADIENT_BATCHES = (8, 32)
#: Captum occlusion is tried at these ``perturbations_per_eval`` values; the fastest is reported.
CAPTUM_OCCLUSION_BATCHES = (16, 64, 256)
#: Captum integrated gradients' internal batch in the issue's reference measurement.
CAPTUM_IG_INTERNAL_BATCH = 50
DELETION_STEPS = 20
#: Phantom series of the benchmark images (not the training seeds 7 and 1007).
IMAGE_SEED = 31337
#: Goals of issue #4.
IG_SPEEDUP_GOAL, IG_MEMORY_GOAL = 2.0, 0.25
OCCLUSION_SPEEDUP_GOAL = 1.5
FLOOR_GOAL = 1.10
#: Forward rows per image from which a forward-only method counts as a perturbation method.
PERTURBATION_MIN_ROWS = 10
PASS_RATIO_GOAL = 10.0
#: "Comparable deletion AUC": HiPe's at most this factor above RISE's (lower AUC is better).
AUC_TOLERANCE = 1.10


# --- models and images ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchModel:
    """A model under test with its images (normalised ``[B, C, H, W]``) and per-image targets."""

    name: str
    module: nn.Module
    target_layer: str
    images: torch.Tensor
    targets: list[int]
    parameters: int
    #: The model as the node runs forward-only methods on CPU (ONNX Runtime), when the card ships it.
    onnx_runner: Any = None


def phantom_images(count: int, seed: int = IMAGE_SEED) -> torch.Tensor:
    """``count`` phantom nodule radiographs through the demo card's pixel pipeline, normalised."""
    from dicom_io.pixels import prepare_frames
    from service.demo import demo_card_path
    from service.demo.phantoms import make_phantom
    from service.inference.card import ModelCard

    card = ModelCard.load(demo_card_path())
    frames = [
        prepare_frames(make_phantom(index, "nodule", seed=seed).dataset, card.input.spec())[0].model_input
        for index in range(count)
    ]
    mean = np.asarray(card.input.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(card.input.std, dtype=np.float32).reshape(1, -1, 1, 1)
    return torch.from_numpy(((np.stack(frames) - mean) / std).astype(np.float32))


def load_bench_model(name: str, images: torch.Tensor, device: torch.device) -> BenchModel:
    """The demo model (shipped weights, eager torch) or the seeded DenseNet-121, on ``device``.

    Targets are each image's predicted class, what the node explains.
    """
    if name == "demo":
        from service.demo import demo_card_path
        from service.inference.card import ModelCard
        from service.inference.runners import load_runner

        card = ModelCard.load(demo_card_path())
        module = load_runner(card, "torch", device="cpu").torch_module
        onnx_runner = load_runner(card, "onnx", device="cpu") if "onnx" in card.weights else None
        layer = card.target_layer
        if module is None or layer is None:
            raise ValueError(f"the demo card {demo_card_path()} must ship torch weights and a target layer")
    elif name == "densenet121":
        from service.bench.densenet import TARGET_LAYER, densenet121

        module, layer = densenet121(in_channels=images.shape[1]), TARGET_LAYER
        onnx_runner = None
    else:
        raise ValueError(f"unknown bench model {name!r}; choose from {', '.join(MODELS)}")
    module = module.to(device).eval()
    images = images.to(device)
    with torch.no_grad():
        targets = module(images).argmax(dim=1).tolist()
    parameters = sum(p.numel() for p in module.parameters())
    runner = onnx_runner if device.type == "cpu" else None
    return BenchModel(name, module, layer, images, targets, parameters, runner)


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
        if tuple(first.shape[1:]) != self.layer.sample_shape:
            return False
        if self.layer.weight_shape is None:
            return True
        return len(args) > 1 and isinstance(args[1], torch.Tensor) and tuple(args[1].shape) == self.layer.weight_shape


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


def _synchronise(device: torch.device) -> None:
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
            _synchronise(device)
            elapsed = time.perf_counter() - started
    seconds = [elapsed] if elapsed >= WARMUP_AS_SAMPLE_S else []
    while len(seconds) < timing.repeats or (sum(seconds) < timing.min_seconds and len(seconds) < timing.max_calls):
        started = time.perf_counter()
        call()
        _synchronise(device)
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
        _synchronise(device)
        times: list[float] = []
        while len(times) < 3 and sum(times) < 5.0:
            started = time.perf_counter()
            run(size)
            _synchronise(device)
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


# --- peers -------------------------------------------------------------------------------------------------


class PeerMissing(Exception):
    """The peer library is not installed."""


@dataclass(frozen=True)
class PeerCase:
    """One peer implementation of a method; ``variants`` map a label to a builder of ``(call, close)``."""

    library: str
    name: str
    settings: dict[str, Any]
    variants: dict[str, Callable[[], tuple[Callable[[], Any], Callable[[], None]]]]


def _import(module: str, library: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise PeerMissing(f"{library} is not installed ({exc})") from exc


def _no_close() -> None:
    """Nothing to release."""


@cache
def _pytorch_grad_cam() -> tuple[ModuleType, tuple[torch.library.Library, ...]]:
    """``pytorch_grad_cam``, with the shim the tests use (tests/service/test_explainers_perturbation.py).

    It imports torchvision, whose PyPI wheel is built for a CUDA torch: its C++ ops do not load
    beside a CPU torch, and ``torchvision/_meta_registrations.py`` then fails on
    ``register_fake("torchvision::nms")``. Only in that case the two op schemas it registers fake
    kernels for (``nms`` and ``qnms``, as in torchvision's C++ sources) are declared and the import
    retried, so the pure-Python parts load; nothing here calls those ops. The libraries are returned
    (and cached) because a definition lives only as long as its library object. A copy, not an
    import: product code does not import the tests.
    """
    libraries: list[torch.library.Library] = []
    try:
        import torchvision  # noqa: F401
    except ImportError as exc:
        raise PeerMissing(f"pytorch-grad-cam is not installed (torchvision: {exc})") from exc
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]  # the failed import left half-initialised modules behind
        for op in ("nms", "qnms"):
            library = torch.library.Library("torchvision", "FRAGMENT")
            library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            libraries.append(library)
    return _import("pytorch_grad_cam", "pytorch-grad-cam"), tuple(libraries)


def _layer_of(explainer: Explainer, bench: BenchModel) -> nn.Module:
    return resolve_module(bench.module, getattr(explainer, "target_layer", None) or bench.target_layer)


def _captum_case(
    name: str,
    settings: dict[str, Any],
    make: Callable[[ModuleType, torch.Tensor], Callable[[], Any]],
    bench: BenchModel,
) -> PeerCase:
    """A Captum peer: ``make(captum.attr, inputs)`` returns the call."""

    def build() -> tuple[Callable[[], Any], Callable[[], None]]:
        attr = _import("captum.attr", "captum")
        return make(attr, bench.images.clone()), _no_close

    return PeerCase("captum", name, settings, {"": build})


def _captum_simple(class_name: str, **settings: Any) -> Callable[[Explainer, BenchModel], list[PeerCase]]:
    def cases(explainer: Explainer, bench: BenchModel) -> list[PeerCase]:
        def make(attr: ModuleType, x: torch.Tensor) -> Callable[[], Any]:
            method = getattr(attr, class_name)(bench.module)
            return lambda: method.attribute(x, target=bench.targets, **settings)

        return [_captum_case(class_name, settings, make, bench)]

    return cases


def _captum_ig(explainer: Any, bench: BenchModel) -> list[PeerCase]:
    settings = {
        "n_steps": explainer.steps,
        "method": explainer.method,
        "internal_batch_size": CAPTUM_IG_INTERNAL_BATCH,
        "baselines": explainer.baseline,
    }
    return _captum_simple("IntegratedGradients", **settings)(explainer, bench)


def _captum_deeplift(explainer: Any, bench: BenchModel) -> list[PeerCase]:
    return _captum_simple("DeepLift", baselines=explainer.baseline)(explainer, bench)


#: SmoothGrad bases Captum's NoiseTunnel can wrap: our name -> (Captum class, its settings from ours).
_NOISE_TUNNEL_BASES: dict[str, tuple[str, Callable[[Any], dict[str, Any]]]] = {
    "saliency": ("Saliency", lambda base: {"abs": base.absolute}),
    "input_x_gradient": ("InputXGradient", lambda base: {}),
    "guided_backprop": ("GuidedBackprop", lambda base: {}),
    "deconvnet": ("Deconvolution", lambda base: {}),
    "integrated_gradients": (
        "IntegratedGradients",
        lambda base: {"n_steps": base.steps, "method": base.method, "internal_batch_size": CAPTUM_IG_INTERNAL_BATCH},
    ),
}


def _captum_smoothgrad(explainer: Any, bench: BenchModel) -> list[PeerCase]:
    if explainer.base not in _NOISE_TUNNEL_BASES:
        return []
    class_name, base_settings = _NOISE_TUNNEL_BASES[explainer.base]
    settings = {
        "base": class_name,
        **base_settings(explainer.base_explainer),
        "nt_type": explainer.variant,
        "nt_samples": explainer.samples,
        # Captum takes one standard deviation per input tensor, ours is per sample: the batch mean.
        "stdevs": float(explainer.noise_std(bench.images).mean()),
        "nt_samples_batch_size": max(1, explainer.internal_batch_size // bench.images.shape[0]),
    }

    def make(attr: ModuleType, x: torch.Tensor) -> Callable[[], Any]:
        tunnel = attr.NoiseTunnel(getattr(attr, class_name)(bench.module))
        kwargs = {key: value for key, value in settings.items() if key != "base"}  # base settings pass through
        return lambda: tunnel.attribute(x, target=bench.targets, **kwargs)

    return [_captum_case("NoiseTunnel", settings, make, bench)]


def _captum_layer_gradcam(explainer: Any, bench: BenchModel) -> list[PeerCase]:
    size = tuple(bench.images.shape[-2:])

    def make(attr: ModuleType, x: torch.Tensor) -> Callable[[], Any]:
        method = attr.LayerGradCam(bench.module, _layer_of(explainer, bench))

        def call() -> torch.Tensor:
            maps = method.attribute(x, target=bench.targets, relu_attributions=explainer.relu)
            return attr.LayerAttribution.interpolate(maps, size, "bilinear")

        return call

    return [_captum_case("LayerGradCam", {"relu_attributions": explainer.relu, "interpolate": "bilinear"}, make, bench)]


def _captum_guided_gradcam(explainer: Any, bench: BenchModel) -> list[PeerCase]:
    def make(attr: ModuleType, x: torch.Tensor) -> Callable[[], Any]:
        method = attr.GuidedGradCam(bench.module, _layer_of(explainer, bench))
        return lambda: method.attribute(x, target=bench.targets, interpolate_mode="bilinear")

    return [_captum_case("GuidedGradCam", {"interpolate_mode": "bilinear"}, make, bench)]


def _captum_lrp(explainer: Any, bench: BenchModel) -> list[PeerCase]:
    """Captum's LRP with its epsilon rule set explicitly on every layer it supports (subclasses too,
    e.g. the demo's zero-sum linear head), on a copy of the model (untimed set-up)."""
    if explainer.composite != "epsilon":
        return []

    def make(attr: ModuleType, x: torch.Tensor) -> Callable[[], Any]:
        import copy

        lrp_module = _import("captum.attr._core.lrp", "captum")
        rules = _import("captum.attr._utils.lrp_rules", "captum")
        model = copy.deepcopy(bench.module)
        supported = tuple(lrp_module.SUPPORTED_LAYERS_WITH_RULES)
        layers = [module for module in model.modules() if isinstance(module, supported)]
        method = attr.LRP(model)

        def call() -> torch.Tensor:
            for module in layers:  # Captum deletes the rules after each call
                module.rule = rules.EpsilonRule(epsilon=explainer.epsilon)
            return method.attribute(x, target=bench.targets)

        return call

    return [_captum_case("LRP", {"rule": "EpsilonRule", "epsilon": explainer.epsilon}, make, bench)]


def _captum_occlusion(explainer: Any, bench: BenchModel) -> list[PeerCase]:
    channels = bench.images.shape[1]
    settings = {
        "sliding_window_shapes": (channels, explainer.window, explainer.window),
        "strides": (channels, explainer.stride, explainer.stride),
        "baselines": explainer.baseline,
    }

    def variant(per_eval: int) -> Callable[[], tuple[Callable[[], Any], Callable[[], None]]]:
        def build() -> tuple[Callable[[], Any], Callable[[], None]]:
            attr = _import("captum.attr", "captum")
            method, x = attr.Occlusion(bench.module), bench.images.clone()
            return lambda: method.attribute(
                x, target=bench.targets, perturbations_per_eval=per_eval, **settings
            ), _no_close

        return build

    height, width = bench.images.shape[-2:]
    windows = bench.images.shape[0] * (
        len(window_masks(height, explainer.window, explainer.stride, torch.device("cpu")))
        * len(window_masks(width, explainer.window, explainer.stride, torch.device("cpu")))
    )
    # Batchings beyond the first that holds every window run the same single batch: not tried.
    sizes = [k for i, k in enumerate(CAPTUM_OCCLUSION_BATCHES) if i == 0 or CAPTUM_OCCLUSION_BATCHES[i - 1] < windows]
    variants = {f"perturbations_per_eval={k}": variant(k) for k in sizes}
    cases = [PeerCase("captum", "Occlusion", settings, variants)]
    if explainer.stride == explainer.window:
        cases.append(_captum_feature_ablation(explainer, bench))
    return cases


def _captum_feature_ablation(explainer: Any, bench: BenchModel) -> PeerCase:
    """Non-overlapping occlusion as Captum's FeatureAblation over a grid of window-sized features."""
    height, width = bench.images.shape[-2:]
    rows = torch.arange(height, device=bench.images.device) // explainer.window
    cols = torch.arange(width, device=bench.images.device) // explainer.window
    mask = (rows[:, None] * (int(cols.max()) + 1) + cols[None, :])[None, None]
    settings = {"feature_mask": "window grid", "perturbations_per_eval": explainer.chunk_size}

    def make(attr: ModuleType, x: torch.Tensor) -> Callable[[], Any]:
        method = attr.FeatureAblation(bench.module)
        return lambda: method.attribute(
            x,
            target=bench.targets,
            baselines=explainer.baseline,
            feature_mask=mask,
            perturbations_per_eval=explainer.chunk_size,
        )

    return _captum_case("FeatureAblation", settings, make, bench)


def _captum_surrogate(class_name: str) -> Callable[[Explainer, BenchModel], list[PeerCase]]:
    """Captum's Lime / KernelShap on our superpixels (SLIC inside the timed call, as ours), one
    image at a time, ``n_samples`` and ``perturbations_per_eval`` from our settings."""

    def cases(explainer: Any, bench: BenchModel) -> list[PeerCase]:
        settings: dict[str, Any] = {
            "n_samples": explainer.samples,
            "perturbations_per_eval": explainer.chunk_size,
            "baselines": explainer.baseline,
            "feature_mask": "our SLIC superpixels",
        }
        if class_name == "Lime":
            settings["interpretable_model"] = f"SkLearnRidge(alpha={explainer.alpha})"

        def make(attr: ModuleType, x: torch.Tensor) -> Callable[[], Any]:
            if class_name == "Lime":
                models = _import("captum._utils.models.linear_model", "captum")
                method = attr.Lime(bench.module, interpretable_model=models.SkLearnRidge(alpha=explainer.alpha))
            else:
                method = attr.KernelShap(bench.module)

            def call() -> list[torch.Tensor]:
                segments = explainer.segment(x)
                return [
                    method.attribute(
                        x[i : i + 1],
                        target=bench.targets[i],
                        feature_mask=segments[i : i + 1, None],
                        n_samples=explainer.samples,
                        perturbations_per_eval=explainer.chunk_size,
                        baselines=explainer.baseline,
                    )
                    for i in range(x.shape[0])
                ]

            return call

        return [_captum_case(class_name, settings, make, bench)]

    return cases


def _grad_cam_case(class_name: str) -> Callable[[Explainer, BenchModel], list[PeerCase]]:
    """pytorch-grad-cam's ``class_name`` on the same layer (``batch_size`` = our chunk size)."""

    def cases(explainer: Any, bench: BenchModel) -> list[PeerCase]:
        chunk = getattr(explainer, "chunk_size", None)
        settings = {"target_layers": [getattr(explainer, "target_layer", None) or bench.target_layer]}
        if chunk is not None:
            settings["batch_size"] = chunk

        def build() -> tuple[Callable[[], Any], Callable[[], None]]:
            module, _ = _pytorch_grad_cam()
            targets_module = _import("pytorch_grad_cam.utils.model_targets", "pytorch-grad-cam")
            cam = getattr(module, class_name)(model=bench.module, target_layers=[_layer_of(explainer, bench)])
            if chunk is not None:
                cam.batch_size = chunk
            outputs = [targets_module.ClassifierOutputTarget(t) for t in bench.targets]
            x = bench.images.clone()

            def call() -> np.ndarray:
                with contextlib.redirect_stderr(io.StringIO()):  # its tqdm progress bars
                    return cam(input_tensor=x, targets=outputs)

            return call, cam.activations_and_grads.release

        return [PeerCase("pytorch-grad-cam", class_name, settings, {"": build})]

    return cases


def _monai_cam(class_name: str) -> Callable[[Explainer, BenchModel], list[PeerCase]]:
    """MONAI's ``monai.visualize`` CAM class on the same layer, one target per image."""

    def cases(explainer: Any, bench: BenchModel) -> list[PeerCase]:
        layer = getattr(explainer, "target_layer", None) or bench.target_layer

        def build() -> tuple[Callable[[], Any], Callable[[], None]]:
            visualize = _import("monai.visualize", "monai")
            cam = getattr(visualize, class_name)(nn_module=bench.module, target_layers=layer)
            x = bench.images.clone()
            return lambda: [cam(x[i : i + 1], class_idx=t) for i, t in enumerate(bench.targets)], _no_close

        return [PeerCase("monai", class_name, {"target_layers": layer}, {"": build})]

    return cases


def _monai_occlusion(explainer: Any, bench: BenchModel) -> list[PeerCase]:
    settings = {
        "mask_size": explainer.window,
        "overlap": 1 - explainer.stride / explainer.window,
        "n_batch": explainer.chunk_size,
        "mode": explainer.baseline,  # a number: the value an occluded patch takes
        "activate": False,  # target logits, as ours
        "verbose": False,
    }

    def build() -> tuple[Callable[[], Any], Callable[[], None]]:
        visualize = _import("monai.visualize", "monai")
        method = visualize.OcclusionSensitivity(nn_module=bench.module, **settings)
        x = bench.images.clone()
        return lambda: method(x), _no_close

    return [PeerCase("monai", "OcclusionSensitivity", settings, {"": build})]


def _peer_table() -> dict[str, list[Callable[[Any, BenchModel], list[PeerCase]]]]:
    """Our registry name -> the peers' case builders (methods not listed have no peer)."""
    return {
        "saliency": [lambda e, b: _captum_simple("Saliency", abs=e.absolute)(e, b)],
        "input_x_gradient": [_captum_simple("InputXGradient")],
        "integrated_gradients": [_captum_ig],
        "smoothgrad": [_captum_smoothgrad],
        "guided_backprop": [_captum_simple("GuidedBackprop")],
        "deconvnet": [_captum_simple("Deconvolution")],
        "deeplift": [_captum_deeplift],
        "lrp": [_captum_lrp],
        "gradcam": [_captum_layer_gradcam, _grad_cam_case("GradCAM"), _monai_cam("GradCAM")],
        "gradcam_pp": [_grad_cam_case("GradCAMPlusPlus"), _monai_cam("GradCAMpp")],
        "scorecam": [_grad_cam_case("ScoreCAM")],
        "guided_gradcam": [_captum_guided_gradcam],
        "occlusion": [_captum_occlusion, _monai_occlusion],
        "lime": [_captum_surrogate("Lime")],
        "kernel_shap": [_captum_surrogate("KernelShap")],
    }


def peer_cases(explainer: Explainer, bench: BenchModel) -> list[PeerCase]:
    """The peers implementing ``explainer``'s method, at its settings."""
    return [case for builder in _peer_table().get(explainer.name, []) for case in builder(explainer, bench)]


# --- one (model, method) -----------------------------------------------------------------------------


def _json_settings(explainer: Explainer) -> dict[str, Any]:
    """The explainer's simple settings (numbers, strings, paths), for the record."""
    settings: dict[str, Any] = {}
    for key, value in vars(explainer).items():
        if isinstance(value, (bool, int, float, str)) or value is None:
            settings[key] = value
        elif isinstance(value, os.PathLike):
            settings[key] = os.fspath(value)
    return settings


def _figure(measurement: Measurement, images: int) -> dict[str, Any]:
    return {
        "status": "ok",
        "time_s_per_image": measurement.median_s / images,
        "best_s_per_image": min(measurement.seconds) / images,
        "times_s": measurement.seconds,
        "peak_mb": None if measurement.peak_bytes is None else measurement.peak_bytes / 2**20,
        "memory_missing": measurement.memory_missing,
        "forward_rows": measurement.rows,
        "grad_rows": measurement.grad_rows,
        "nograd_rows": measurement.nograd_rows,
    }


def _measure_peer(
    case: PeerCase, bench: BenchModel, device: torch.device, layer: InputLayer, timing: Timing
) -> dict[str, Any]:
    """The peer's best variant (fastest median); each variant's time listed."""
    record: dict[str, Any] = {"library": case.library, "name": case.name, "settings": _jsonable(case.settings)}
    best: dict[str, Any] | None = None
    variants: dict[str, float] = {}
    for label, build in case.variants.items():
        try:
            call, close = build()
        except PeerMissing as exc:
            return {**record, "status": f"not installed: {exc}"}
        except Exception as exc:  # a third-party peer failing is a result, not a crash of the bench
            return {**record, "status": f"failed: {type(exc).__name__}: {exc}"}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Captum announces every hook it sets
                figure = _figure(measure(call, device, layer, timing), bench.images.shape[0])
        except Exception as exc:  # noqa: BLE001 (reported in the table, see above)
            return {**record, "status": f"failed: {type(exc).__name__}: {str(exc)[:300]}"}
        finally:
            close()
        if label:
            variants[label] = figure["time_s_per_image"]
        if best is None or figure["time_s_per_image"] < best["time_s_per_image"]:
            best = {**figure, "variant": label or None}
    assert best is not None
    return {**record, **best, **({"variants_s_per_image": variants} if variants else {})}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def bench_method(
    name: str,
    params: Mapping[str, Any],
    bench: BenchModel,
    device: torch.device,
    layer: InputLayer,
    timing: Timing,
    progress: Progress,
) -> dict[str, Any]:
    """Ours and the peers for one method on one model."""
    record: dict[str, Any] = {"model": bench.name, "method": name}
    settings = dict(params)
    if "target_layer" in inspect.signature(explainer_class(name)).parameters:
        settings.setdefault("target_layer", bench.target_layer)
    try:
        explainer = get_explainer(name, **settings)
        with_passes = getattr(explainer, "explain_with_passes", None)
        first = None if with_passes is None else (lambda: with_passes(bench.module, bench.images, bench.targets))
        measurement = measure(
            lambda: explainer.explain(bench.module, bench.images, bench.targets), device, layer, timing, first
        )
    except ExplainerError as exc:
        progress(f"  ours: n/a: {exc}")
        return {**record, "status": f"n/a: {exc}", "peers": []}
    images = bench.images.shape[0]
    figure = _figure(measurement, images)
    figure.update(
        settings=_json_settings(explainer),
        targets=bench.targets,
        forward_only=not explainer.needs_gradients,
        forward_rows_per_image=measurement.rows / images,
    )
    if with_passes is not None:
        figure["reported_passes"] = int(sum(measurement.first_output[1]))
    progress(f"  ours: {_describe(figure)}")
    if not explainer.needs_gradients and bench.onnx_runner is not None:
        onnx_s = _time_on_runner(explainer, bench, timing) / images
        figure["onnx_time_s_per_image"] = onnx_s
        progress(f"  ours on ONNX Runtime (the node's forward path): {onnx_s:.3f} s/image")
    peers = []
    for case in peer_cases(explainer, bench):
        peer = _measure_peer(case, bench, device, layer, timing)
        if peer["status"] == "ok":
            peer["ours_speedup"] = peer["time_s_per_image"] / figure["time_s_per_image"]
            if "onnx_time_s_per_image" in figure:
                peer["ours_onnx_speedup"] = peer["time_s_per_image"] / figure["onnx_time_s_per_image"]
        progress(f"  {case.library} {case.name}: {_describe(peer)}")
        peers.append(peer)
    return {**record, **figure, "peers": peers}


def _time_on_runner(explainer: Any, bench: BenchModel, timing: Timing) -> float:
    """Median seconds of ``explainer`` on the ONNX runner (after one warm-up call): the same
    settings and images as on the torch module, only the forward passes run elsewhere."""

    def call() -> None:
        explainer.explain(bench.onnx_runner, bench.images, bench.targets)

    call()
    seconds: list[float] = []
    while len(seconds) < timing.repeats or (sum(seconds) < timing.min_seconds and len(seconds) < timing.max_calls):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def _describe(figure: Mapping[str, Any]) -> str:
    if figure["status"] != "ok":
        return figure["status"]
    memory = "n/a" if figure["peak_mb"] is None else f"{figure['peak_mb']:.0f} MB"
    return f"{figure['time_s_per_image']:.3f} s/image, peak {memory}, {figure['forward_rows']} rows"


# --- HiPe against RISE ---------------------------------------------------------------------------------


def deletion_auc(
    model: nn.Module, images: torch.Tensor, targets: Sequence[int], maps: torch.Tensor, baseline: float
) -> list[float]:
    """Per image: the area under the target probability as pixels are set to ``baseline`` in
    decreasing saliency order, ``DELETION_STEPS`` equal steps from none to all (trapezoid rule,
    fraction of pixels on the x axis, so 0..1). Lower means the map found what the model needs."""
    areas = []
    height, width = images.shape[-2:]
    pixels = height * width
    for image, target, saliency in zip(images, targets, maps):
        order = torch.argsort(saliency.flatten().to(images.device), descending=True, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(pixels, device=images.device)
        counts = torch.tensor([round(k * pixels / DELETION_STEPS) for k in range(DELETION_STEPS + 1)])
        removed = rank[None, :] < counts.to(images.device)[:, None]  # [steps + 1, H * W]
        removed = removed.view(-1, 1, height, width)
        batch = torch.where(removed, torch.full_like(image, baseline)[None], image[None])
        with torch.no_grad():
            probability = torch.softmax(model(batch).double(), dim=1)[:, target].cpu().numpy()
        areas.append(float(np.trapezoid(probability, dx=1.0 / DELETION_STEPS)))
    return areas


def compare_hipe_rise(
    count: int,
    params: Mapping[str, Mapping[str, Any]],
    device: torch.device,
    progress: Progress,
) -> dict[str, Any]:
    """HiPe and RISE (our settings, RISE 4,000 masks by default) on ``count`` phantom nodules with
    the demo model: forward rows, HiPe's own pass count, deletion AUC; a random map as reference."""
    bench = load_bench_model("demo", phantom_images(count, seed=IMAGE_SEED + 1), device)
    layer = input_layer(bench.module, bench.images[:1])
    rise = get_explainer("rise", **params.get("rise", {}))
    hipe = get_explainer("hipe", **params.get("hipe", {}))
    result: dict[str, Any] = {"model": "demo", "images": count, "targets": bench.targets}
    maps = {}
    for explainer in (rise, hipe):
        progress(f"HiPe vs RISE: {explainer.name} on {count} phantom nodule(s)")
        counter = RowCounter(layer)
        started = time.perf_counter()
        with counter:
            if explainer.name == "hipe":
                maps["hipe"], passes = explainer.explain_with_passes(bench.module, bench.images, bench.targets)
            else:
                maps["rise"] = explainer.explain(bench.module, bench.images, bench.targets)
        _synchronise(device)
        result[explainer.name] = {
            "settings": _json_settings(explainer),
            "seconds": time.perf_counter() - started,
            "forward_rows": counter.grad_rows + counter.nograd_rows,
        }
    result["hipe"]["reported_passes"] = [int(p) for p in passes]
    generator = torch.Generator().manual_seed(0)
    maps["random"] = torch.rand(bench.images.shape[0], *bench.images.shape[-2:], generator=generator)
    baseline = rise.baseline  # what RISE's masks fade to (HiPe's default is the same)
    for key, saliency in maps.items():
        areas = deletion_auc(bench.module, bench.images, bench.targets, saliency, baseline)
        result.setdefault(key, {})["deletion_auc"] = areas
        result[key]["deletion_auc_mean"] = float(np.mean(areas))
    result["pass_ratio"] = result["rise"]["forward_rows"] / max(1, result["hipe"]["forward_rows"])
    progress(
        f"HiPe vs RISE: {result['hipe']['forward_rows']} vs {result['rise']['forward_rows']} forward rows, "
        f"deletion AUC {result['hipe']['deletion_auc_mean']:.3f} vs {result['rise']['deletion_auc_mean']:.3f} "
        f"(random {result['random']['deletion_auc_mean']:.3f})"
    )
    return result


# --- the run -----------------------------------------------------------------------------------------


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


def parse_param(text: str) -> tuple[str, str, Any]:
    """``METHOD.SETTING=VALUE`` -> ``(method, setting, value)``; the value is JSON when it parses
    (numbers, true/false, null, lists), else the string."""
    key, sep, raw = text.partition("=")
    method, dot, setting = key.partition(".")
    if not sep or not dot or not method or not setting:
        raise ValueError(f"a setting must look like METHOD.SETTING=VALUE (e.g. rise.masks=1000), got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return method, setting, value


def check_request(
    methods: Sequence[str] | None, models: Sequence[str], images: int, repeats: int, compare_images: int
) -> list[str]:
    """The method names to run (all registered when ``methods`` is empty); a ``ValueError`` (an
    ``ExplainerError`` for an unknown method) before any work when a request cannot run."""
    names = list(methods) if methods else list(available_explainers())
    for name in names:
        explainer_class(name)
    for name in models:
        if name not in MODELS:
            raise ValueError(f"unknown bench model {name!r}; choose from {', '.join(MODELS)}")
    if not models:
        raise ValueError("no model to measure; choose from " + ", ".join(MODELS))
    if images < 1 or repeats < 1 or compare_images < 0:
        raise ValueError(
            f"images and repeats must be >= 1 and compare_images >= 0, got {images}, {repeats}, {compare_images}"
        )
    return names


def run_explain_bench(
    methods: Sequence[str] | None,
    models: Sequence[str],
    images: int,
    out: Path,
    progress: Progress,
    *,
    repeats: int = 3,
    min_timed_s: float = MIN_TIMED_S,
    device: str | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    compare_images: int = 3,
) -> dict[str, Any]:
    """Measure every (model, method); write ``explain.json`` and ``explain.png`` under ``out``.

    ``methods`` ``None`` means every registered explainer; ``params`` maps a method to settings
    that replace its defaults (the peers follow them); ``min_timed_s``: short calls are repeated
    until this much is timed (see :class:`Timing`). Returns what ``explain.json`` holds.
    """
    names = check_request(methods, models, images, repeats, compare_images)
    timing = Timing(repeats, min_timed_s)
    params = {key: dict(value) for key, value in (params or {}).items()}
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    figures: dict[str, Any] = {
        "device": device_description(target),
        "torch": torch.__version__,
        "settings": {
            "methods": names,
            "models": list(models),
            "images": images,
            "repeats": repeats,
            "min_timed_s": min_timed_s,
            "params": params,
            "compare_images": compare_images,
        },
        "memory": "cuda max_memory_allocated above the allocation before the call"
        if target.type == "cuda"
        else "peak RSS (VmHWM after clear_refs) above RSS before the call, after malloc_trim",
        "models": {},
        "results": [],
    }
    progress(f"bench explain on {figures['device']}")
    inputs = phantom_images(images)
    step, total = 0, len(names) * len(models)
    for model_name in models:
        progress(f"{model_name}: loading, measuring the runner's per-sample times")
        bench = load_bench_model(model_name, inputs, target)
        layer = input_layer(bench.module, bench.images[:1])
        forward_start = forward_time(bench, target)
        gradient_s, gradient_batch = gradient_time(bench, target)
        progress(
            f"{model_name}: {bench.parameters / 1e6:.2f} M parameters, forward {forward_start[0] * 1e3:.1f} ms/sample "
            f"(batch {forward_start[1]}), forward+backward {gradient_s * 1e3:.1f} ms/sample (batch {gradient_batch})"
        )
        records = []
        for name in names:
            step += 1
            progress(f"[{step}/{total}] {model_name}: {name}")
            records.append(bench_method(name, params.get(name, {}), bench, target, layer, timing, progress))
        # Forward and gradient times again after the methods; the faster is the floor (load on a
        # shared machine, or a GPU still at idle clocks at the start, only ever slows a run down).
        forward_end = forward_time(bench, target)
        forward_s, forward_batch = min(forward_start, forward_end)
        gradient_s, gradient_batch = min((gradient_s, gradient_batch), gradient_time(bench, target))
        onnx_s = onnx_forward_time(bench)[0] if bench.onnx_runner is not None else None
        runner = RunnerTimes(forward_s, forward_batch, gradient_s, gradient_batch, onnx_s)
        for record in records:
            add_floor(record, runner)
        figures["results"].extend(records)
        figures["models"][model_name] = {
            "parameters": bench.parameters,
            "input": list(bench.images.shape[1:]),
            "targets": bench.targets,
            "target_layer": bench.target_layer,
            "forward_s_per_sample": forward_s,
            "forward_batch": forward_batch,
            "forward_s_per_sample_before_after": [forward_start[0], forward_end[0]],
            "gradient_s_per_sample": gradient_s,
            "gradient_batch": gradient_batch,
            "onnx_forward_s_per_sample": onnx_s,
        }
        progress(
            f"{model_name}: forward {forward_end[0] * 1e3:.1f} ms/sample after the methods; time / floor: "
            + ", ".join(f"{r['method']} {r['floor_ratio']:.2f}" for r in records if r["status"] == "ok")
        )
        del bench
    if "demo" in models and {"rise", "hipe"} <= set(names) and compare_images > 0:
        figures["hipe_vs_rise"] = compare_hipe_rise(compare_images, params, target, progress)
    figures["goals"] = goals(figures)
    out.mkdir(parents=True, exist_ok=True)
    (out / "explain.json").write_text(json.dumps(_jsonable(figures), indent=2))
    plot_figures(figures, out / "explain.png")
    return figures


# --- goals, table, plot ----------------------------------------------------------------------------------


def _result(figures: Mapping[str, Any], model: str, method: str) -> dict[str, Any] | None:
    for record in figures["results"]:
        if record["model"] == model and record["method"] == method and record["status"] == "ok":
            return record
    return None


def _peer(record: Mapping[str, Any], library: str, name: str) -> dict[str, Any] | None:
    for peer in record["peers"]:
        if peer["library"] == library and peer["name"] == name and peer["status"] == "ok":
            return peer
    return None


def _perturbation(record: Mapping[str, Any]) -> bool:
    """A perturbation method: forward passes only, and many of them (CAM's one or two are not)."""
    return (
        record["status"] == "ok"
        and record["forward_only"]
        and record["forward_rows_per_image"] >= PERTURBATION_MIN_ROWS
        and record["floor_ratio"] is not None
    )


def goals(figures: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Issue #4's goals, each with what was measured and whether it is met."""
    found: list[dict[str, Any]] = []
    for model in figures["models"]:
        ig = _result(figures, model, "integrated_gradients")
        captum = ig and _peer(ig, "captum", "IntegratedGradients")
        if ig and captum:
            speedup = captum["time_s_per_image"] / ig["time_s_per_image"]
            memory = ig["peak_mb"] / captum["peak_mb"] if ig["peak_mb"] and captum["peak_mb"] else None
            found.append(
                {
                    "goal": f"integrated gradients >= {IG_SPEEDUP_GOAL}x Captum at <= {IG_MEMORY_GOAL:.0%} of its peak",
                    "model": model,
                    "measured": f"{speedup:.2f}x, memory {'n/a' if memory is None else f'{memory:.0%}'}",
                    "met": speedup >= IG_SPEEDUP_GOAL and memory is not None and memory <= IG_MEMORY_GOAL,
                }
            )
        occlusion = _result(figures, model, "occlusion")
        captum = occlusion and _peer(occlusion, "captum", "Occlusion")
        if occlusion and captum:
            speedup = captum["time_s_per_image"] / occlusion["time_s_per_image"]
            found.append(
                {
                    "goal": f"occlusion >= {OCCLUSION_SPEEDUP_GOAL}x Captum's best batching",
                    "model": model,
                    "measured": f"{speedup:.2f}x (Captum {captum['variant']})",
                    "met": speedup >= OCCLUSION_SPEEDUP_GOAL,
                }
            )
            if "onnx_time_s_per_image" in occlusion:
                speedup = captum["time_s_per_image"] / occlusion["onnx_time_s_per_image"]
                found.append(
                    {
                        "goal": f"occlusion on the node's ONNX path >= {OCCLUSION_SPEEDUP_GOAL}x "
                        "Captum's best batching",
                        "model": model,
                        "measured": f"{speedup:.2f}x (Captum {captum['variant']} on the torch module)",
                        "met": speedup >= OCCLUSION_SPEEDUP_GOAL,
                    }
                )
        for record in figures["results"]:
            if record["model"] == model and _perturbation(record):
                found.append(
                    {
                        "goal": f"{record['method']} within {FLOOR_GOAL - 1:.0%} of its forward-pass floor",
                        "model": model,
                        "measured": f"time/floor {record['floor_ratio']:.2f}",
                        "met": record["floor_ratio"] <= FLOOR_GOAL,
                    }
                )
                if record.get("onnx_floor_ratio") is not None:
                    found.append(
                        {
                            "goal": f"{record['method']} on the node's ONNX path within {FLOOR_GOAL - 1:.0%} of "
                            "its ONNX forward-pass floor",
                            "model": model,
                            "measured": f"time/floor {record['onnx_floor_ratio']:.2f}",
                            "met": record["onnx_floor_ratio"] <= FLOOR_GOAL,
                        }
                    )
    comparison = figures.get("hipe_vs_rise")
    if comparison:
        hipe, rise = comparison["hipe"]["deletion_auc_mean"], comparison["rise"]["deletion_auc_mean"]
        masks = comparison["rise"]["settings"]["n_masks"]
        found.append(
            {
                "goal": f"HiPe >= {PASS_RATIO_GOAL:.0f}x fewer forward passes than RISE({masks} masks), "
                f"deletion AUC at most {AUC_TOLERANCE:.2f}x RISE's",
                "model": "demo",
                "measured": f"{comparison['pass_ratio']:.1f}x fewer, AUC {hipe:.3f} vs {rise:.3f}",
                "met": comparison["pass_ratio"] >= PASS_RATIO_GOAL and hipe <= AUC_TOLERANCE * rise,
            }
        )
    return found


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 100 else f"{value:.0f}"


def _print_record(record: Mapping[str, Any], images: int) -> None:
    """Our line, then one line per peer (``ours x``: the peer's time over ours)."""
    if record["status"] != "ok":
        print(f"  {record['method']:24} {'pacs-xai':40} {record['status']}")
        return
    lines = [("pacs-xai", record, f"{_seconds(record['floor_s_per_image']):>8} {record['floor_ratio']:>7.2f} {'':>6}")]
    for peer in record["peers"]:
        label = f"{peer['library']} {peer['name']}"
        if peer.get("variant"):
            label += f" [{peer['variant'].replace('perturbations_per_eval', 'ppe')}]"
        extra = f"{'':>8} {'':>7} {peer['ours_speedup']:>6.2f}" if peer["status"] == "ok" else ""
        lines.append((label, peer, extra))
    for index, (label, entry, extra) in enumerate(lines):
        method = record["method"] if index == 0 else ""
        if entry["status"] != "ok":
            print(f"  {method:24} {label[:40]:40} {entry['status'][:100]}")
            continue
        peak = "-" if entry["peak_mb"] is None else f"{entry['peak_mb']:.0f}"
        line = (
            f"  {method:24} {label[:40]:40} {_seconds(entry['time_s_per_image']):>8} "
            f"{_seconds(entry['best_s_per_image']):>8} {peak:>8} {entry['forward_rows'] / images:>8.0f} {extra}"
        )
        print(line.rstrip())
    if "onnx_time_s_per_image" in record:
        onnx_floor = record.get("onnx_floor_s_per_image")
        ratio = record.get("onnx_floor_ratio")
        print(
            f"  {'':24} {'pacs-xai on ONNX Runtime (node path)':40} {_seconds(record['onnx_time_s_per_image']):>8} "
            f"{'':>8} {'':>8} {'':>8} {'-' if onnx_floor is None else _seconds(onnx_floor):>8} "
            f"{'-' if ratio is None else f'{ratio:.2f}':>7}"
        )


def print_figures(figures: Mapping[str, Any]) -> None:
    """The table: ours and each peer per (model, method), the HiPe/RISE comparison, the goals."""
    print(f"bench explain on {figures['device']}, torch {figures['torch']}; memory: {figures['memory']}")
    for model, info in figures["models"].items():
        print(
            f"\n{model}: {info['parameters'] / 1e6:.2f} M parameters, {figures['settings']['images']} image(s) "
            f"{'x'.join(map(str, info['input']))}, forward {info['forward_s_per_sample'] * 1e3:.1f} ms/sample, "
            f"forward+backward {info['gradient_s_per_sample'] * 1e3:.1f} ms/sample"
        )
        print(
            f"  {'method':24} {'implementation':40} {'s/image':>8} {'best':>8} {'peak MB':>8} {'rows/img':>8} "
            f"{'floor s':>8} {'t/floor':>7} {'ours x':>6}"
        )
        for record in figures["results"]:
            if record["model"] == model:
                _print_record(record, figures["settings"]["images"])
    comparison = figures.get("hipe_vs_rise")
    if comparison:
        print(f"\nHiPe vs RISE on {comparison['images']} phantom nodule(s), demo model:")
        for key in ("hipe", "rise", "random"):
            entry = comparison[key]
            rows = entry.get("forward_rows")
            print(
                f"  {key:7} forward rows {'-' if rows is None else rows:>7}  deletion AUC "
                f"{entry['deletion_auc_mean']:.3f}  ({', '.join(f'{a:.3f}' for a in entry['deletion_auc'])})"
            )
        print(f"  RISE / HiPe forward rows: {comparison['pass_ratio']:.1f}")
    if figures["goals"]:
        print("\ngoals (issue #4):")
        for goal in figures["goals"]:
            print(f"  [{'met' if goal['met'] else 'NOT met'}] {goal['model']}: {goal['goal']}: {goal['measured']}")


def plot_figures(figures: Mapping[str, Any], path: Path) -> None:
    """Horizontal bars (PIL), log time axis: s/image of ours and of each peer per (model, method)."""
    from PIL import Image, ImageDraw, ImageFont

    rows: list[tuple[str, list[tuple[str, float]]]] = []
    for record in figures["results"]:
        if record["status"] != "ok":
            continue
        bars = [("pacs-xai", record["time_s_per_image"])]
        bars += [(f"{p['library']} {p['name']}", p["time_s_per_image"]) for p in record["peers"] if p["status"] == "ok"]
        rows.append((f"{record['model']}: {record['method']}", bars))
    values = [value for _, bars in rows for _, value in bars if value > 0] or [1.0]
    low, high = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))
    high = max(high, low + 1)
    bar, left, span = 16, 300, 560
    height = 70 + sum(len(bars) * bar + 10 for _, bars in rows) + 30
    image = Image.new("RGB", (left + span + 260, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    draw.text((10, 10), f"explainers, seconds per image (log scale), {figures['device']}", fill="black", font=font)
    colours = {
        "pacs-xai": (220, 90, 30),
        "captum": (60, 90, 180),
        "pytorch-grad-cam": (60, 150, 80),
        "monai": (140, 80, 160),
    }

    def x_of(value: float) -> int:
        return left + int(span * (math.log10(max(value, 10.0**low)) - low) / (high - low))

    for decade in range(low, high + 1):
        x = x_of(10.0**decade)
        draw.line((x, 40, x, height - 25), fill=(220, 220, 220))
        draw.text((x - 10, height - 22), f"1e{decade}", fill="black", font=font)
    y = 45
    for label, bars in rows:
        draw.text((10, y + 2), label[:44], fill="black", font=font)
        for name, value in bars:
            colour = colours.get(name.split(" ")[0], (120, 120, 120))
            draw.rectangle((left, y, x_of(value), y + bar - 3), fill=colour)
            draw.text((x_of(value) + 4, y), f"{name} {value:.3g} s", fill="black", font=font)
            y += bar
        y += 10
    image.save(path)
