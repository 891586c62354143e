"""``pacs-xai bench explain --volume``: 3D Grad-CAM and 3D occlusion against MONAI in the same run.

The model is MONAI's ``DenseNet121(spatial_dims=3)`` (seeded random weights: pretrained ones cannot
be downloaded here, and the cost does not depend on them), the input a phantom chest CT resampled
to ``size``³ by the node's volume path. For each method, ours and MONAI's at matched settings:

- Grad-CAM at ``class_layers.relu`` (the last feature map, 3³ at 96³): ours against
  ``monai.visualize.GradCAM`` (raw map, no post-processing);
- occlusion with a ``window``³ cube at ``stride`` filled with ``baseline``: ours against
  ``monai.visualize.OcclusionSensitivity(mask_size=window, overlap=1 - stride / window,
  mode=baseline, activate=False, n_batch=16)``, whose map is the occluded logit (ours is the drop,
  so the clean logit minus MONAI's). ``(size - window)`` must be a multiple of ``stride``: MONAI
  shifts the last window inside the volume, ours crops it at the border, as Captum's does. Ours
  runs incrementally (each layer recomputes only the region the window reaches:
  :mod:`service.explain.incremental`) and once more with whole forward passes, to show where the
  speed-up comes from;

each measured as :func:`service.tools.bench.measure.measure` does (wall time: the median of
``repeats`` calls after a warm-up, which counts when it takes 10 s or more; peak memory above the
memory in use before the call; rows through the input layer), and the Pearson correlation of the
two maps. Goals (the issue's): Grad-CAM at least as fast as MONAI's at no more than half its
peak memory; occlusion at least twice as fast. Writes ``explain-volume.json`` and
``explain-volume.png``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicom_io.pixels.volume import prepare_values
from service.explain.registry import get_explainer
from service.synthetic.volumes import make_ct_phantom
from service.tools.bench.explain import plot_figures
from service.tools.bench.measure import Measurement, Timing, device_description, input_layer, measure
from service.tools.bench.peers import import_peer
from service.tools.progress import Progress

#: The Grad-CAM layer of MONAI's DenseNet121: its last feature map, after the final ReLU.
TARGET_LAYER = "class_layers.relu"
GRADCAM_TIME_GOAL, GRADCAM_MEMORY_GOAL, OCCLUSION_SPEEDUP_GOAL = 1.0, 0.5, 2.0


def _figure(measurement: Measurement) -> dict[str, Any]:
    return {
        "status": "ok",
        "time_s_per_image": measurement.median_s,
        "timed_calls": len(measurement.seconds),
        "peak_mb": None if measurement.peak_bytes is None else measurement.peak_bytes / 1e6,
        "memory_missing": measurement.memory_missing,
        "rows": measurement.rows,
    }


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    stacked = torch.stack([a.detach().double().flatten(), b.detach().double().flatten()])
    return float(torch.corrcoef(stacked)[0, 1])


def bench_volume_input(size: int) -> torch.Tensor:
    """A phantom chest CT with a nodule on a ``size``³ grid covering the phantom, normalised."""
    phantom = make_ct_phantom(0, "nodule", seed=3)
    extent = np.asarray(phantom.hu.shape) * np.asarray(phantom.spacing)
    unit, _grid = prepare_values(phantom.hu, phantom.spacing, (size,) * 3, tuple(extent / size), (-1000.0, 400.0))
    return torch.from_numpy((unit - 0.4) / 0.3)[None, None]


def run_volume_bench(
    out_dir: Path,
    progress: Progress,
    *,
    size: int = 96,
    window: int = 16,
    stride: int = 16,
    baseline: float = 0.0,
    repeats: int = 1,
    device: str | None = None,
) -> dict[str, Any]:
    """Measure, write ``explain-volume.json`` and ``explain-volume.png`` into ``out_dir``, return the figures."""
    if (size - window) % stride or stride > window or window > size:
        raise ValueError(
            f"need stride <= window <= size and (size - window) a multiple of stride, got size {size}, "
            f"window {window}, stride {stride} (MONAI shifts a last window inside, ours crops it)"
        )
    nets = import_peer("monai.networks.nets", "monai")
    visualize = import_peer("monai.visualize", "monai")
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    model = nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=2).eval().to(torch_device)
    x = bench_volume_input(size).to(torch_device)
    with torch.no_grad():
        logits = model(x)
    target = int(logits.argmax(1))
    layer = input_layer(model, x)
    timing = Timing(repeats=repeats, min_seconds=0.0, max_calls=repeats)
    results = []

    progress(f"Grad-CAM at {TARGET_LAYER}, {size}³: pacs-xai")
    ours = get_explainer("gradcam", target_layer=TARGET_LAYER)
    mine = measure(lambda: ours.explain(model, x, [target]), torch_device, layer, timing)
    progress("Grad-CAM: MONAI")
    monai_cam = visualize.GradCAM(nn_module=model, target_layers=TARGET_LAYER, postprocessing=lambda maps: maps)
    theirs = measure(lambda: monai_cam(x, class_idx=target), torch_device, layer, timing)
    results.append(
        _record(
            f"densenet121-3d {size}x{size}x{size}",
            "gradcam",
            mine,
            theirs,
            "GradCAM",
            mine.first_output[0],
            theirs.first_output[0, 0],
        )
    )

    progress(f"occlusion, {window}³ window at stride {stride}: pacs-xai")
    occlusion = get_explainer("occlusion", window=window, stride=stride, baseline=baseline)
    mine = measure(lambda: occlusion.explain(model, x, [target]), torch_device, layer, timing)
    progress("occlusion: MONAI")
    monai_occlusion = visualize.OcclusionSensitivity(
        model,
        mask_size=window,
        n_batch=16,
        verbose=False,
        mode=float(baseline),
        overlap=1 - stride / window,
        activate=False,
    )
    theirs = measure(lambda: monai_occlusion(x), torch_device, layer, timing)
    expected = logits[0, target] - theirs.first_output[0][0, target]
    results.append(
        _record(
            f"densenet121-3d {size}x{size}x{size}",
            "occlusion",
            mine,
            theirs,
            "OcclusionSensitivity",
            mine.first_output[0],
            expected,
        )
    )
    progress("occlusion: pacs-xai with whole forward passes (incremental=False), where the speed-up comes from")
    whole = get_explainer("occlusion", window=window, stride=stride, baseline=baseline, incremental=False)
    mine_whole = measure(lambda: whole.explain(model, x, [target]), torch_device, layer, timing)
    results.append(
        _record(
            f"densenet121-3d {size}x{size}x{size}",
            "occlusion-whole-passes",
            mine_whole,
            theirs,
            "OcclusionSensitivity",
            mine_whole.first_output[0],
            expected,
        )
    )
    figures = {
        "device": device_description(torch_device),
        "torch": torch.__version__,
        "monai": str(getattr(import_peer("monai", "monai"), "__version__", "?")),
        "size": size,
        "settings": {"target_layer": TARGET_LAYER, "window": window, "stride": stride, "baseline": baseline},
        "results": results,
        "goals": goals(results),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "explain-volume.json").write_text(json.dumps(figures, indent=2), encoding="utf-8")
    plot_figures(figures, out_dir / "explain-volume.png")
    return figures


def _record(
    model: str,
    method: str,
    mine: Measurement,
    theirs: Measurement,
    name: str,
    ours_map: torch.Tensor,
    peer_map: torch.Tensor,
) -> dict[str, Any]:
    peer = {"library": "monai", "name": name, **_figure(theirs)}
    record = {"model": model, "method": method, **_figure(mine), "peers": [peer]}
    record["pearson_with_monai"] = _pearson(ours_map, peer_map)
    record["speedup_vs_monai"] = peer["time_s_per_image"] / record["time_s_per_image"]
    if record["peak_mb"] is not None and peer["peak_mb"]:
        record["memory_ratio_vs_monai"] = record["peak_mb"] / peer["peak_mb"]
    return record


def goals(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's goals, each with the figure and whether it is met."""
    found = []
    for record in results:
        if record["method"] == "gradcam":
            found.append(
                _goal("Grad-CAM at least as fast as MONAI's", record["speedup_vs_monai"], GRADCAM_TIME_GOAL, True)
            )
            ratio = record.get("memory_ratio_vs_monai")
            found.append(_goal("Grad-CAM peak memory at most half MONAI's", ratio, GRADCAM_MEMORY_GOAL, False))
        elif record["method"] == "occlusion":
            speedup = record["speedup_vs_monai"]
            found.append(
                _goal("occlusion at least 2x MONAI's OcclusionSensitivity", speedup, OCCLUSION_SPEEDUP_GOAL, True)
            )
    return found


def _goal(text: str, value: float | None, target: float, higher_is_better: bool) -> dict[str, Any]:
    met = None if value is None else (value >= target if higher_is_better else value <= target)
    return {"goal": text, "value": value, "target": target, "met": met}


def print_volume_figures(figures: dict[str, Any]) -> None:
    print(f"device: {figures['device']}, torch {figures['torch']}, monai {figures['monai']}")
    for record in figures["results"]:
        peer = record["peers"][0]
        mine_mb = "n/a" if record["peak_mb"] is None else f"{record['peak_mb']:.0f} MB"
        peer_mb = "n/a" if peer["peak_mb"] is None else f"{peer['peak_mb']:.0f} MB"
        print(
            f"{record['model']} {record['method']}: pacs-xai {record['time_s_per_image']:.2f} s, {mine_mb}, "
            f"{record['rows']} rows; monai {peer['name']} {peer['time_s_per_image']:.2f} s, {peer_mb}, "
            f"{peer['rows']} rows; "
            f"speed-up {record['speedup_vs_monai']:.2f}x, Pearson {record['pearson_with_monai']:.4f}"
        )
    for goal in figures["goals"]:
        value = "n/a" if goal["value"] is None else f"{goal['value']:.2f}"
        verdict = {True: "met", False: "NOT met", None: "not measured"}[goal["met"]]
        print(f"goal: {goal['goal']}: {value} (target {goal['target']}) {verdict}")


__all__ = ["bench_volume_input", "goals", "print_volume_figures", "run_volume_bench"]
