"""The healthy-appearance file and the operator h(x) the perturbation methods fill removed regions from.

A healthy-appearance model belongs to a model card's input section, not to its weights: it is
trained on normal images only (``pacs-xai demo train-healthy`` for the demo model, ``pacs-xai
model train-healthy --normals DIR --card CARD`` for a site's own) through the card's pixel path,
at the card's input grid and in its normalised units ``(x - mean) / std``. The card names it
(``auxiliary.healthy_appearance``, file and sha256, checked when the card loads) and the node
passes it to every explainer whose ``card_files`` asks for it.

The file (``healthy-appearance.pt``, ``torch.load(weights_only=True)``) holds the VAE's state
dict, its architecture, ``detail_sigma`` (see :mod:`service.explain.healthy.network`), the
normalisation it was trained in, the training figures, and the name and sha256 of its ONNX export
beside it (``healthy-appearance.onnx``, the whole operator h(x) as one graph; the card lists it
too, ``auxiliary.healthy_appearance_onnx``), so the pair is checked even where a path is given
without a card. :class:`HealthyAppearance` computes h(x) on torch, or on ONNX Runtime
where the classifier runs there (a forward-only method on the node's ONNX path): the same
operator, equal to about 1e-5 of the image's range.
"""

from __future__ import annotations

import copy
import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from service.explain.base import ExplainerError, ModelLike
from service.explain.healthy.network import HealthyAppearanceNet, HealthyVAE
from service.explain.stored import load_payload, save_payload

#: File names of a healthy-appearance model beside its model card.
HEALTHY_FILE = "healthy-appearance.pt"
ONNX_FILE = "healthy-appearance.onnx"
#: The model card's ``auxiliary`` entries that name it and its ONNX export.
CARD_ENTRY = "healthy_appearance"
ONNX_CARD_ENTRY = "healthy_appearance_onnx"
#: Marks a healthy-appearance file; a different value means some other checkpoint.
FILE_FORMAT = "pacs-xai-healthy-appearance"
FORMAT_VERSION = 1
#: How to make one (named in the errors).
TRAIN_COMMANDS = (
    "`pacs-xai demo train-healthy` (demo model) or `pacs-xai model train-healthy --normals DIR --card CARD`"
)

HealthyRuntime = Literal["torch", "onnx"]


@dataclass(frozen=True)
class HealthyModelInfo:
    """What a healthy-appearance file says about itself."""

    in_channels: int
    rows: int
    columns: int
    encoder_widths: tuple[int, ...]
    decoder_widths: tuple[int, ...]
    latent: int
    detail_sigma: float
    #: The card normalisation ``(x - mean) / std`` whose units h(x) is in.
    mean: tuple[float, ...]
    std: tuple[float, ...]
    #: The ONNX export beside the file and its sha256; ``None`` when there is none.
    onnx_file: str | None
    onnx_sha256: str | None
    #: Everything else recorded (training settings and figures, the card it was trained for).
    metadata: dict[str, Any]


def file_sha256(path: Path) -> str:
    """Lower-case hex SHA-256 of a file (as the model card records it)."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def save_healthy_model(
    path: str | Path,
    operator: HealthyAppearanceNet,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    metadata: dict[str, Any],
    onnx_path: Path | None = None,
) -> Path:
    """Write ``operator`` (float32 state dict), its settings and ``metadata`` to ``path``; an
    ``onnx_path`` beside it is recorded with its sha256."""
    out = Path(path)
    vae = operator.vae
    onnx: dict[str, str] | None = None
    if onnx_path is not None:
        if onnx_path.resolve().parent != out.resolve().parent:
            raise ValueError(f"the ONNX export {onnx_path} must lie beside {out}")
        onnx = {"file": onnx_path.name, "sha256": file_sha256(onnx_path)}
    payload = {
        "format": FILE_FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": {
            "in_channels": vae.in_channels,
            "rows": vae.rows,
            "columns": vae.columns,
            "encoder_widths": list(vae.encoder_widths),
            "decoder_widths": list(vae.decoder_widths),
            "latent": vae.latent,
            "detail_sigma": operator.detail_sigma,
        },
        "normalisation": {"mean": [float(m) for m in mean], "std": [float(s) for s in std]},
        "onnx": onnx,
        "metadata": metadata,
        "state_dict": {key: value.detach().cpu().clone() for key, value in vae.state_dict().items()},
    }
    return save_payload(payload, out)


def load_healthy_model(path: str | Path) -> tuple[HealthyAppearanceNet, HealthyModelInfo]:
    """The operator stored at ``path`` (eval mode, CPU, no gradients) and its :class:`HealthyModelInfo`."""
    payload = load_payload(
        path, what="healthy-appearance", file_format=FILE_FORMAT, format_version=FORMAT_VERSION, remake=TRAIN_COMMANDS
    )
    try:
        architecture, normalisation, onnx = payload["architecture"], payload["normalisation"], payload["onnx"]
        info = HealthyModelInfo(
            in_channels=int(architecture["in_channels"]),
            rows=int(architecture["rows"]),
            columns=int(architecture["columns"]),
            encoder_widths=tuple(int(w) for w in architecture["encoder_widths"]),
            decoder_widths=tuple(int(w) for w in architecture["decoder_widths"]),
            latent=int(architecture["latent"]),
            detail_sigma=float(architecture["detail_sigma"]),
            mean=tuple(float(m) for m in normalisation["mean"]),
            std=tuple(float(s) for s in normalisation["std"]),
            onnx_file=None if onnx is None else str(onnx["file"]),
            onnx_sha256=None if onnx is None else str(onnx["sha256"]),
            metadata=dict(payload.get("metadata") or {}),
        )
        vae = HealthyVAE(
            info.in_channels, info.rows, info.columns, info.encoder_widths, info.decoder_widths, info.latent
        )
        vae.load_state_dict(payload["state_dict"])
        operator = HealthyAppearanceNet(vae, info.detail_sigma)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ExplainerError(f"healthy-appearance file {path} is damaged or inconsistent: {exc}") from exc
    operator.eval()
    operator.requires_grad_(False)
    return operator, info


class HealthyAppearance:
    """h(x) of the healthy-appearance file at ``path``: loaded at the first call, then kept (thread-safe).

    ``images`` are ``[B, C, H, W]`` in the card's normalised units at its input grid; h(x) comes
    back with the same shape, dtype and device. Each image's h(x) is its own, bit for bit its single
    run's (the images go through one at a time), and nothing is random.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ExplainerError(f"healthy-appearance file not found: {self.path}; make it with {TRAIN_COMMANDS}")
        self._lock = threading.Lock()
        self._loaded: tuple[HealthyAppearanceNet, HealthyModelInfo] | None = None
        self._on_device: dict[torch.device, HealthyAppearanceNet] = {}
        self._session: Any = None  # onnxruntime.InferenceSession, made at the first ONNX call

    def info(self) -> HealthyModelInfo:
        """The file's settings and metadata (loads it on first use)."""
        return self._load()[1]

    def for_model(self, images: torch.Tensor, model: ModelLike) -> torch.Tensor:
        """h(``images``) on the runtime that matches ``model``: torch beside a torch module, ONNX
        Runtime beside a runner (the node's ONNX path), torch where the file has no ONNX export."""
        return self(images, "torch" if isinstance(model, nn.Module) else "onnx")

    def __call__(self, images: torch.Tensor, runtime: HealthyRuntime = "torch") -> torch.Tensor:
        if runtime not in ("torch", "onnx"):
            raise ExplainerError(f"runtime must be 'torch' or 'onnx', got {runtime!r}")
        operator, info = self._load()
        self._check(images, info)
        inputs = images.detach().to(torch.float32)
        with torch.no_grad():
            # One image at a time: a batched convolution rounds differently (~1e-6), and the
            # explainers' perturbed inputs x * m + h(x) * (1 - m) must be bit for bit those of the
            # single runs (a max-pool over a flat phantom region routes gradients by such ties).
            if runtime == "onnx" and info.onnx_file is not None:
                session = self._onnx_session(info)
                name = session.get_inputs()[0].name
                arrays = [np.ascontiguousarray(image.cpu().numpy()) for image in inputs.split(1)]
                parts = [torch.from_numpy(np.asarray(session.run(None, {name: array})[0])) for array in arrays]
            else:
                network = self._operator_on(images.device)
                parts = [network(image) for image in inputs.split(1)]
        return torch.cat(parts).to(images.device, images.dtype)

    def _load(self) -> tuple[HealthyAppearanceNet, HealthyModelInfo]:
        with self._lock:
            if self._loaded is None:
                self._loaded = load_healthy_model(self.path)
            return self._loaded

    def _operator_on(self, device: torch.device) -> HealthyAppearanceNet:
        """The operator on ``device`` (a copy per non-CPU device, made once)."""
        operator, _ = self._load()
        if device.type == "cpu":
            return operator
        with self._lock:
            if device not in self._on_device:
                self._on_device[device] = copy.deepcopy(operator).to(device)
            return self._on_device[device]

    def _onnx_session(self, info: HealthyModelInfo) -> Any:
        """The ONNX Runtime session (CPU) of the export named in the file, its sha256 checked once."""
        with self._lock:
            if self._session is None:
                onnx_path = self.path.parent / str(info.onnx_file)
                if not onnx_path.is_file():
                    raise ExplainerError(
                        f"the ONNX export {onnx_path} named by healthy-appearance file {self.path.name} is missing"
                    )
                digest = file_sha256(onnx_path)
                if digest != info.onnx_sha256:
                    raise ExplainerError(
                        f"sha256 of {onnx_path} is {digest}, {self.path.name} records {info.onnx_sha256}; "
                        f"the export changed without its model: retrain with {TRAIN_COMMANDS}"
                    )
                import onnxruntime  # only where h(x) runs on ONNX Runtime, as service.inference.backends does

                self._session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
            return self._session

    def _check(self, images: torch.Tensor, info: HealthyModelInfo) -> None:
        if images.ndim != 4:
            raise ExplainerError(f"h(x) takes a batch [B, C, H, W], got shape {tuple(images.shape)}")
        _, channels, rows, columns = images.shape
        if (channels, rows, columns) != (info.in_channels, info.rows, info.columns):
            raise ExplainerError(
                f"healthy-appearance model {self.path.name} takes {info.in_channels} x {info.rows} x {info.columns} "
                f"inputs (channels x rows x columns), got {channels} x {rows} x {columns}; it belongs to another "
                f"model card's input grid"
            )


def configured_healthy(method: str, perturbation: str, healthy_model: object) -> HealthyAppearance | None:
    """The ``healthy_model`` setting of a perturbation method: a :class:`HealthyAppearance` for a
    path (``None`` when unset); an error when ``perturbation`` is ``"healthy"`` and there is none."""
    if healthy_model is None:
        if perturbation == "healthy":
            raise ExplainerError(
                f"{method} with perturbation 'healthy' needs a healthy-appearance model: set the model card's "
                f"auxiliary.{CARD_ENTRY} (made by {TRAIN_COMMANDS}) or the healthy_model setting"
            )
        return None
    if isinstance(healthy_model, HealthyAppearance):
        return healthy_model
    if not isinstance(healthy_model, str | os.PathLike):
        raise ExplainerError(f"healthy_model must be a path to a healthy-appearance file, got {healthy_model!r}")
    return HealthyAppearance(healthy_model)
