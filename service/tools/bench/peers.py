"""The peers ``bench explain`` runs beside each method: Captum, pytorch-grad-cam and MONAI at the
method's own settings, each built lazily (a peer that is not installed is reported, not fatal).
"""

from __future__ import annotations

import contextlib
import importlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from service.explain.base import Explainer, chunk_size_for
from service.explain.hooks import resolve_module
from service.explain.methods.windows import window_masks
from service.inference.architecture import torchvision_shim
from service.tools.bench.models import BenchModel

#: Captum occlusion is tried at these ``perturbations_per_eval`` values; the fastest is reported.
CAPTUM_OCCLUSION_BATCHES = (16, 64, 256)
#: Captum integrated gradients' internal batch in the issue's reference measurement.
CAPTUM_IG_INTERNAL_BATCH = 50


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


def import_peer(module: str, library: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise PeerMissing(f"{library} is not installed ({exc})") from exc


def _no_close() -> None:
    """Nothing to release."""


@cache
def pytorch_grad_cam() -> tuple[ModuleType, tuple[torch.library.Library, ...]]:
    """``pytorch_grad_cam``, imported through the torchvision shim the model cards use
    (:func:`service.inference.architecture.torchvision_shim`; the tests use it too, through
    tests/helpers.py). The shim's libraries are returned (and cached) because a definition lives
    only as long as its library object."""
    try:
        libraries = torchvision_shim()
    except ImportError as exc:
        raise PeerMissing(f"pytorch-grad-cam is not installed (torchvision: {exc})") from exc
    return import_peer("pytorch_grad_cam", "pytorch-grad-cam"), libraries


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
        attr = import_peer("captum.attr", "captum")
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
    if explainer.base_explainer.name not in _NOISE_TUNNEL_BASES:
        return []
    class_name, base_settings = _NOISE_TUNNEL_BASES[explainer.base_explainer.name]
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

        lrp_module = import_peer("captum.attr._core.lrp", "captum")
        rules = import_peer("captum.attr._utils.lrp_rules", "captum")
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
            attr = import_peer("captum.attr", "captum")
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


def _chunk(explainer: Any, bench: BenchModel) -> int:
    """The inputs per forward pass our method uses on this model: the peers get the same."""
    return chunk_size_for(explainer.chunk_size, bench.module)


def _captum_feature_ablation(explainer: Any, bench: BenchModel) -> PeerCase:
    """Non-overlapping occlusion as Captum's FeatureAblation over a grid of window-sized features."""
    height, width = bench.images.shape[-2:]
    rows = torch.arange(height, device=bench.images.device) // explainer.window
    cols = torch.arange(width, device=bench.images.device) // explainer.window
    mask = (rows[:, None] * (int(cols.max()) + 1) + cols[None, :])[None, None]
    settings = {"feature_mask": "window grid", "perturbations_per_eval": _chunk(explainer, bench)}

    def make(attr: ModuleType, x: torch.Tensor) -> Callable[[], Any]:
        method = attr.FeatureAblation(bench.module)
        return lambda: method.attribute(
            x,
            target=bench.targets,
            baselines=explainer.baseline,
            feature_mask=mask,
            perturbations_per_eval=_chunk(explainer, bench),
        )

    return _captum_case("FeatureAblation", settings, make, bench)


def _captum_surrogate(class_name: str) -> Callable[[Explainer, BenchModel], list[PeerCase]]:
    """Captum's Lime / KernelShap on our superpixels (SLIC inside the timed call, as ours), one
    image at a time, ``n_samples`` and ``perturbations_per_eval`` from our settings."""

    def cases(explainer: Any, bench: BenchModel) -> list[PeerCase]:
        settings: dict[str, Any] = {
            "n_samples": explainer.samples,
            "perturbations_per_eval": _chunk(explainer, bench),
            "baselines": explainer.baseline,
            "feature_mask": "our SLIC superpixels",
        }
        if class_name == "Lime":
            settings["interpretable_model"] = f"SkLearnRidge(alpha={explainer.alpha})"

        def make(attr: ModuleType, x: torch.Tensor) -> Callable[[], Any]:
            if class_name == "Lime":
                models = import_peer("captum._utils.models.linear_model", "captum")
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
                        perturbations_per_eval=_chunk(explainer, bench),
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
        chunk = _chunk(explainer, bench) if hasattr(explainer, "chunk_size") else None
        settings = {"target_layers": [getattr(explainer, "target_layer", None) or bench.target_layer]}
        if chunk is not None:
            settings["batch_size"] = chunk

        def build() -> tuple[Callable[[], Any], Callable[[], None]]:
            module, _ = pytorch_grad_cam()
            targets_module = import_peer("pytorch_grad_cam.utils.model_targets", "pytorch-grad-cam")
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
            visualize = import_peer("monai.visualize", "monai")
            cam = getattr(visualize, class_name)(nn_module=bench.module, target_layers=layer)
            x = bench.images.clone()
            return lambda: [cam(x[i : i + 1], class_idx=t) for i, t in enumerate(bench.targets)], _no_close

        return [PeerCase("monai", class_name, {"target_layers": layer}, {"": build})]

    return cases


def _monai_occlusion(explainer: Any, bench: BenchModel) -> list[PeerCase]:
    settings = {
        "mask_size": explainer.window,
        "overlap": 1 - explainer.stride / explainer.window,
        "n_batch": _chunk(explainer, bench),
        "mode": explainer.baseline,  # a number: the value an occluded patch takes
        "activate": False,  # target logits, as ours
        "verbose": False,
    }

    def build() -> tuple[Callable[[], Any], Callable[[], None]]:
        visualize = import_peer("monai.visualize", "monai")
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
