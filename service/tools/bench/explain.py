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

All methods, ours and the peers', get the eager torch module, so the comparison is between
implementations on the same model. Forward-only methods run on the ONNX runner too where the card
ships one, and each record's ``node_path`` says which of the two the node gives the method
(``DeployedModel.model_for``: occlusion the torch module, for its incremental inference; the
others the ONNX pool); the table marks it "(node path)".
"""

from __future__ import annotations

import inspect
import json
import math
import os
import statistics
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from service.explain.base import Explainer, ExplainerError
from service.explain.registry import available_explainers, explainer_class, get_explainer
from service.node.pipeline import card_settings
from service.tools.bench.measure import (
    MIN_TIMED_S,
    InputLayer,
    Measurement,
    RowCounter,
    RunnerTimes,
    Timing,
    add_floor,
    device_description,
    forward_time,
    gradient_time,
    input_layer,
    measure,
    onnx_forward_time,
    synchronise,
)
from service.tools.bench.models import IMAGE_SEED, MODELS, BenchModel, load_bench_model, phantom_images
from service.tools.bench.peers import PeerCase, PeerMissing, peer_cases
from service.tools.evaluate.variants import split_variant, variant_settings
from service.tools.progress import Progress

DELETION_STEPS = 20
#: Where the node runs a forward-only method (the ``node_path`` of a record).
NODE_ON_MODULE, NODE_ON_ONNX = "torch module (incremental inference)", "ONNX Runtime pool"
#: Goals of issue #4.
IG_SPEEDUP_GOAL, IG_MEMORY_GOAL = 2.0, 0.25
OCCLUSION_SPEEDUP_GOAL = 1.5
FLOOR_GOAL = 1.10
#: Forward rows per image from which a forward-only method counts as a perturbation method.
PERTURBATION_MIN_ROWS = 10
PASS_RATIO_GOAL = 10.0
#: "Comparable deletion AUC": HiPe's at most this factor above RISE's (lower AUC is better).
AUC_TOLERANCE = 1.10


# --- one (model, method) -----------------------------------------------------------------------------


def _json_settings(explainer: Explainer) -> dict[str, Any]:
    """The explainer's simple settings (numbers, strings, paths), for the record; a wrapped
    explainer (SmoothGrad's base) as its registry name and settings."""
    settings: dict[str, Any] = {}
    for key, value in vars(explainer).items():
        if isinstance(value, (bool, int, float, str)) or value is None:
            settings[key] = value
        elif isinstance(value, os.PathLike):
            settings[key] = os.fspath(value)
        elif isinstance(value, Explainer):
            settings[key] = {"name": value.name, **_json_settings(value)}
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
    method, variant = split_variant(name)  # a variant (occlusion:healthy) has settings of its own, no peers
    settings = dict(params)
    if "target_layer" in inspect.signature(explainer_class(method)).parameters:
        settings.setdefault("target_layer", bench.target_layer)
    if bench.card is not None:  # files trained against the model, e.g. realtime_saliency's masker
        settings = {**card_settings(bench.card, method), **settings}
    try:
        explainer = get_explainer(method, **settings)
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
        # What the node hands the method (DeployedModel.model_for): the torch module where the
        # method asks for it (occlusion's incremental inference), else the ONNX pool.
        check = explainer.module_preference()
        figure["node_path"] = NODE_ON_MODULE if check is not None and check(bench.module) else NODE_ON_ONNX
        onnx_s = _time_on_runner(explainer, bench, timing) / images
        figure["onnx_time_s_per_image"] = onnx_s
        progress(f"  ours on ONNX Runtime: {onnx_s:.3f} s/image; the node runs it on the {figure['node_path']}")
    peers = []
    for case in peer_cases(explainer, bench) if variant is None else []:
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
        synchronise(device)
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
        split_variant(name)
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
            records.append(bench_method(name, variant_settings(name, params), bench, target, layer, timing, progress))
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
                        "goal": f"occlusion on ONNX Runtime >= {OCCLUSION_SPEEDUP_GOAL}x Captum's best batching",
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
                            "goal": f"{record['method']} on ONNX Runtime within {FLOOR_GOAL - 1:.0%} of "
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
    ours = "pacs-xai (node path)" if record.get("node_path") == NODE_ON_MODULE else "pacs-xai"
    lines = [(ours, record, f"{_seconds(record['floor_s_per_image']):>8} {record['floor_ratio']:>7.2f} {'':>6}")]
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
        label = "pacs-xai on ONNX Runtime" + (" (node path)" if record.get("node_path") == NODE_ON_ONNX else "")
        print(
            f"  {'':24} {label:40} {_seconds(record['onnx_time_s_per_image']):>8} "
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
