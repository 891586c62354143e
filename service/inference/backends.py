"""Runners: ONNX Runtime and TorchScript behind one interface (:class:`~service.inference.runner.Runner`).

The device is chosen when the runner loads: CUDA when it is there (ONNX Runtime's
``CUDAExecutionProvider``, torch's ``cuda``), the CPU otherwise; the choice is logged. Loading also
checks that the model's output size equals the card's class count, with one forward pass of
zeros, so a wrong card is an error at start-up.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch

from service.inference.architecture import build_module
from service.inference.card import ModelCard, ModelCardError, Runtime

log = logging.getLogger(__name__)

DevicePreference = Literal["auto", "cpu", "cuda"]


class OnnxRunner:
    """An ONNX Runtime session; forward-only (``torch_module`` is ``None``)."""

    def __init__(self, path: str, *, device: DevicePreference = "auto", threads: int | None = None) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise ModelCardError(
                f"device 'cuda' asked for, but ONNX Runtime offers only {available}; "
                "install onnxruntime-gpu (the 'gpu' extra) or use device 'auto'"
            )
        use_cuda = device != "cpu" and "CUDAExecutionProvider" in available
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self._session = ort.InferenceSession(path, sess_options=options, providers=providers)
        self._input_name = self._session.get_inputs()[0].name
        self._device = self._session.get_providers()[0]

    @property
    def device(self) -> str:
        return self._device

    @property
    def torch_module(self) -> None:
        return None

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Logits float32 ``[B, K]`` for a normalised float32 batch ``[B, C, H, W]``."""
        inputs = np.ascontiguousarray(batch, dtype=np.float32)
        return np.asarray(self._session.run(None, {self._input_name: inputs})[0], dtype=np.float32)


class _TorchModuleRunner:
    """A torch module in eval mode on the chosen device; differentiable, so gradient explainers can use it."""

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self._device = device
        self._module = module.to(device).eval()

    @property
    def device(self) -> str:
        return str(self._device)

    @property
    def torch_module(self) -> torch.nn.Module:
        return self._module

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Logits float32 ``[B, K]`` for a normalised float32 batch ``[B, C, H, W]``."""
        with torch.no_grad():
            inputs = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self._device)
            return self._module(inputs).float().cpu().numpy()


def _torch_device(device: DevicePreference) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelCardError("device 'cuda' asked for, but torch sees no CUDA device; use device 'auto'")
    return torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")


class TorchScriptRunner(_TorchModuleRunner):
    """A TorchScript module. Takes gradients, but no forward hooks (so no CAM methods)."""

    def __init__(self, path: str, *, device: DevicePreference = "auto") -> None:
        target = _torch_device(device)
        super().__init__(torch.jit.load(path, map_location=target), target)


class TorchRunner(_TorchModuleRunner):
    """An eager ``nn.Module`` rebuilt from its architecture and a state dict (``weights_only`` load).

    Eager modules take forward hooks, so every explainer, CAM methods included, can use them.
    The architecture is built by :func:`service.inference.architecture.build_module` (with the
    card's ``arguments`` where it gives them).
    """

    def __init__(
        self,
        path: str,
        architecture: str,
        *,
        num_classes: int,
        in_channels: int,
        arguments: Mapping[str, object] | None = None,
        device: DevicePreference = "auto",
    ) -> None:
        target = _torch_device(device)
        module = build_module(architecture, arguments=arguments, num_classes=num_classes, in_channels=in_channels)
        module.load_state_dict(torch.load(path, map_location=target, weights_only=True))
        super().__init__(module, target)


AnyRunner = OnnxRunner | TorchScriptRunner | TorchRunner

#: Runtimes that can back-propagate to the input, in order of preference: eager torch (it takes
#: forward hooks, so the CAM family runs on it too), then TorchScript.
GRADIENT_RUNTIMES: tuple[Runtime, ...] = ("torch", "torchscript")


def gradient_runtime(card: ModelCard) -> Runtime:
    """The card's first runtime that can back-propagate; a clear error for a card without one."""
    for runtime in GRADIENT_RUNTIMES:
        if runtime in card.weights:
            return runtime
    raise ModelCardError(
        f"model card {card.name} ships only {', '.join(sorted(card.weights))} weights; methods that back-propagate "
        "need a torch or torchscript runtime in the card's weights: add one, or use a forward-only method (occlusion)"
    )


def load_runner(card: ModelCard, runtime: Runtime, *, device: DevicePreference = "auto") -> AnyRunner:
    """Load ``runtime``'s weights of ``card`` and check the output size against the class list."""
    path = str(card.weights_path(runtime))
    runner: AnyRunner
    try:
        if runtime == "onnx":
            runner = OnnxRunner(path, device=device)
        elif runtime == "torchscript":
            runner = TorchScriptRunner(path, device=device)
        else:
            runner = TorchRunner(
                path,
                str(card.weights[runtime].architecture),
                num_classes=len(card.output.classes),
                in_channels=card.input.channels,
                arguments=card.weights[runtime].arguments,
                device=device,
            )
    except ModelCardError:
        raise
    except Exception as exc:  # the backends raise their own types; say which file failed, keep the cause
        raise ModelCardError(f"model card {card.name}: cannot load {runtime} weights {path}: {exc}") from exc
    shape = [1, *card.input.shape()]
    try:
        outputs = runner.forward(np.zeros(shape, dtype=np.float32))
    except Exception as exc:  # the network refuses the card's input: name the size, keep the cause
        raise ModelCardError(
            f"model card {card.name}: the {runtime} model refuses an input of shape {shape} "
            f"(input.channels {card.input.channels}, input.rows {card.input.rows}, input.columns "
            f"{card.input.columns}): {str(exc).strip().splitlines()[0][:300]}; give the size and channels the network "
            "was trained on"
        ) from exc
    if outputs.ndim != 2 or outputs.shape[1] != len(card.output.classes):
        raise ModelCardError(
            f"model card {card.name}: {runtime} model returns shape {list(outputs.shape)} for one image, "
            f"but the card lists {len(card.output.classes)} classes {list(card.output.classes)}"
        )
    if card.target_layer and runner.torch_module is not None and runtime == "torch":
        check_target_layer(card, runner.torch_module)
    log.info("model %s %s loaded with %s on %s", card.name, card.version, runtime, runner.device)
    return runner


def check_target_layer(card: ModelCard, module: torch.nn.Module) -> None:
    """The card's ``target_layer`` names a submodule of the eager network; a clear error otherwise,
    listing the layers nearest the output."""
    names = [name for name, _ in module.named_modules() if name]
    if card.target_layer not in names:
        raise ModelCardError(
            f"model card {card.name}: target_layer {card.target_layer!r} is not a layer of "
            f"{type(module).__name__}; the last layers are: {', '.join(repr(n) for n in names[-8:])} "
            "(pacs-xai model init finds the last spatial feature block)"
        )
