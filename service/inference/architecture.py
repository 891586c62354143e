"""Eager torch networks named by a model card: import the architecture, build it, find its CAM layer.

A card's ``weights.torch.architecture`` is ``package.module:callable``; the callable is called with
the card's ``arguments`` when it gives them (a MONAI bundle's ``network_def``, a TorchXRayVision
class), else as ``callable(num_classes=K, in_channels=C)``.

Model libraries that import torchvision (TorchXRayVision, pytorch-grad-cam) meet a torchvision
wheel built for another torch: its C++ ops do not load beside this CPU torch, and
``torchvision/_meta_registrations.py`` fails on ``register_fake("torchvision::nms")``.
:func:`torchvision_shim` declares the two op schemas it registers fake kernels for (``nms`` and
``qnms``, as in torchvision's C++ sources) in that case only, so the pure-Python parts load; no
network a card names calls those ops.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from functools import cache
from types import ModuleType

import torch
from torch import nn

from service.inference.card import ModelCardError

__all__ = [
    "build_module",
    "cam_target_layer",
    "import_architecture",
    "spatial_layers",
    "torchvision_shim",
]


@cache
def torchvision_shim() -> tuple[torch.library.Library, ...]:
    """Import torchvision, declaring its two fake-kernel op schemas first where this torch lacks them.

    Returns the libraries holding the declarations (cached: a definition lives as long as its
    library object); empty where torchvision loaded as it is. Raises ImportError without torchvision.
    """
    libraries: list[torch.library.Library] = []
    try:
        import torchvision  # noqa: F401
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        _forget_modules("torchvision")  # the failed import left half-initialised modules behind
        for op in ("nms", "qnms"):
            library = torch.library.Library("torchvision", "FRAGMENT")
            library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            libraries.append(library)
        import torchvision  # noqa: F401,F811
    return tuple(libraries)


def _forget_modules(package: str) -> None:
    for name in [n for n in sys.modules if n == package or n.startswith(f"{package}.")]:
        del sys.modules[name]


def import_architecture(module_name: str) -> ModuleType:
    """Import the module of an architecture; through :func:`torchvision_shim` where it imports torchvision."""
    try:
        return importlib.import_module(module_name)
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    _forget_modules(module_name.split(".")[0])
    torchvision_shim()
    return importlib.import_module(module_name)


def build_module(
    architecture: str,
    *,
    arguments: Mapping[str, object] | None = None,
    num_classes: int,
    in_channels: int,
) -> nn.Module:
    """The network ``package.module:callable`` called with ``arguments`` (or num_classes/in_channels).

    A clear :class:`ModelCardError` names the architecture when the module or callable is missing or
    the call fails.
    """
    module_name, _, attribute = architecture.partition(":")
    try:
        factory = getattr(import_architecture(module_name), attribute)
    except ImportError as exc:
        raise ModelCardError(
            f"architecture {architecture!r}: cannot import {module_name!r} ({exc}); install the package that "
            "defines the network"
        ) from exc
    except AttributeError:
        raise ModelCardError(f"architecture {architecture!r}: module {module_name!r} has no {attribute!r}") from None
    kwargs = dict(arguments) if arguments is not None else {"num_classes": num_classes, "in_channels": in_channels}
    try:
        network = factory(**kwargs)
    except Exception as exc:
        raise ModelCardError(f"architecture {architecture!r} cannot be built with arguments {kwargs}: {exc}") from exc
    if not isinstance(network, nn.Module):
        raise ModelCardError(
            f"architecture {architecture!r} returned a {type(network).__name__}, not a torch nn.Module"
        )
    return network


def _spatial_outputs(module: nn.Module, example: torch.Tensor) -> dict[str, torch.Tensor]:
    """Dotted name -> output of every submodule whose output is a 4-D tensor with H or W > 1, in the
    order the outputs were produced by one forward pass (a module called twice: at its last call)."""
    produced: dict[str, torch.Tensor] = {}
    names = {id(sub): name for name, sub in module.named_modules() if name}
    handles = []

    def record(sub: nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor) and output.ndim == 4 and max(output.shape[2:]) > 1:
            name = names[id(sub)]
            produced.pop(name, None)
            produced[name] = output

    for name, sub in module.named_modules():
        if name:
            handles.append(sub.register_forward_hook(record))
    try:
        with torch.no_grad():
            module(example)
    finally:
        for handle in handles:
            handle.remove()
    return produced


def spatial_layers(module: nn.Module, example: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """(dotted name, output shape) of every submodule whose output is a 4-D ``[B, C, H, W]`` tensor
    with H or W > 1, in the order the outputs were produced by one forward pass of ``example``.

    A module called twice appears once, at its last call. The root module is left out.
    """
    return [(name, tuple(output.shape)) for name, output in _spatial_outputs(module, example).items()]


def cam_target_layer(module: nn.Module, example: torch.Tensor) -> str | None:
    """The CAM target layer: the last spatial feature block. That is the last submodule, in execution
    order, whose output is a spatial feature map (4-D, H or W > 1); where that is a container whose
    output is its last block's own output (a ``features`` Sequential ending with ``block4``), the
    innermost such block that still has submodules. ``None`` where there is no spatial output."""
    produced = _spatial_outputs(module, example)
    if not produced:
        return None
    order = list(produced)
    modules = dict(module.named_modules())
    chosen = order[-1]
    for name in reversed(order[:-1]):
        inside = name.startswith(f"{chosen}.")
        if not inside:
            break
        if produced[name] is produced[chosen] and any(True for _ in modules[name].children()):
            chosen = name
    return chosen
