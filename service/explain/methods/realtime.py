"""Real-time saliency (Dabkowski & Gal, 2017): a masking network trained once, one forward pass per map.

The masker is a small encoder-decoder. Its encoder has the demo classifier's layout (conv blocks
down to a 28 x 28 feature map at 224² input); at that bottleneck a class *selector* (one
embedding vector per class) gates the features as the paper's feature filter does,
``Y = X * sigmoid(<X, e_c> + b_c)`` per location, so the mask follows the requested class; an
upsampler brings ``Y`` back to 56², where it meets the encoder's 56² features (skip connection)
and the class evidence ``<X, e_c> + b_c`` itself (upsampled bilinearly); then a 1x1
convolution gives mask logits, which are upsampled bilinearly to the input size and squashed by
a sigmoid: a mask ``m`` in (0, 1), near 1 where the region must be *preserved* for the
classifier to keep its answer (see :mod:`service.tools.demo.train_saliency` for the objective).

At run time only the masker runs: the classifier is never called, so :class:`RealtimeSaliency`
works with any model argument, ONNX runners included. A masker belongs to the one classifier it
was trained against: the model card names it (``auxiliary.saliency_masker``, file and sha256,
checked when the card loads) and the node passes it to the explainer; its file records that
model's name, version and weights digest, its class count and input shape. Class count and input
shape are checked against the batch and targets; the classifier itself can only be checked where
that is cheap: for a torch module (or a runner exposing one) the output size of its last
``nn.Linear`` must equal the masker's class count. A runner without a torch module (ONNX) cannot
be checked; pair it with the masker trained for it.
"""

from __future__ import annotations

import copy
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from service.explain.base import Explainer, ExplainerError, ModelLike
from service.explain.stored import load_payload, save_payload
from service.inference.runner import Runner
from service.models.demo.network import conv_block

#: File name of a masker beside its model (the demo card's folder holds the shipped one).
MASKER_FILE = "saliency-masker.pt"
#: The model card's ``auxiliary`` entry that names a model's masker.
CARD_ENTRY = "saliency_masker"
#: Marks a masker file; a different value means some other checkpoint.
FILE_FORMAT = "pacs-xai-saliency-masker"
FORMAT_VERSION = 1
#: How to rebuild a masker file (named in the errors).
TRAIN_COMMAND = "pacs-xai demo train-saliency"


def _up_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 convolution with bias and ReLU (no batch norm: the same behaviour in training and use)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1), nn.ReLU(inplace=True))


class SaliencyMasker(nn.Module):
    """``(image [B, C, H, W], class [B]) -> mask [B, 1, H, W]`` in [0, 1] (1 = keep this region).

    ``widths`` are the encoder channels at 1/2 and 1/4 (first entry), 1/4 (second) and 1/8 of
    the input size (third); with the default ``(16, 32, 64)`` the encoder has exactly the layout
    of ``DemoNet.features`` (``encoder.stem`` ... ``encoder.block4``), so the demo classifier's
    weights can initialise it. ``decoder_width`` channels in the upsampler; the mask is computed
    at 1/4 of the input size and upsampled bilinearly. H and W must be multiples of 8. The mask
    logits are bounded softly (``b * tanh(z / b)``, ``b = logit_bound``), so the mask stays inside
    [sigmoid(-b), sigmoid(b)] and never saturates to a flat plateau of 1.0 in float32: the mask's
    peak stays where the masker is most sure (a plateau would leave the peak to argmax's tie-break).
    """

    def __init__(
        self,
        num_classes: int = 3,
        in_channels: int = 1,
        widths: tuple[int, int, int] = (16, 32, 64),
        decoder_width: int = 32,
        logit_bound: float = 6.0,
    ) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.num_classes = num_classes
        self.logit_bound = float(logit_bound)
        self.encoder = nn.Sequential(
            OrderedDict(
                stem=conv_block(in_channels, w1, stride=2),  # 1/2
                block1=conv_block(w1, w1),
                pool1=nn.MaxPool2d(2),  # 1/4
                block2=conv_block(w1, w2),
                pool2=nn.MaxPool2d(2),  # 1/8
                block3=conv_block(w2, w3),
                block4=conv_block(w3, w3),
            )
        )
        #: The class selector: one embedding per class at the bottleneck, and a bias per class.
        self.selector = nn.Embedding(num_classes, w3)
        self.selector_bias = nn.Embedding(num_classes, 1)
        nn.init.normal_(self.selector.weight, std=1 / math.sqrt(w3))
        nn.init.zeros_(self.selector_bias.weight)
        self.bottleneck = _up_block(w3, decoder_width)
        self.upsample = _up_block(decoder_width + w2 + 1, decoder_width)
        self.head = nn.Conv2d(decoder_width, 1, kernel_size=1)

    def mask_logits(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Mask logits ``[B, 1, H / 4, W / 4]`` (before upsampling and sigmoid), softly bounded to +-logit_bound."""
        features = images
        skip = images
        for name, layer in self.encoder.named_children():
            features = layer(features)
            if name == "block2":
                skip = features
        selector = self.selector(classes)[:, :, None, None]
        bias = self.selector_bias(classes)[:, :, None, None]
        evidence = (features * selector).sum(dim=1, keepdim=True) + bias  # class evidence per location
        flow = self.bottleneck(features * torch.sigmoid(evidence))
        flow = F.interpolate(flow, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        evidence = F.interpolate(evidence, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        flow = self.upsample(torch.cat([flow, skip, evidence], dim=1))
        return self.logit_bound * torch.tanh(self.head(flow) / self.logit_bound)

    def forward(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return self.logits_to_mask(self.mask_logits(images, classes), images.shape[-2:])

    @staticmethod
    def logits_to_mask(logits: torch.Tensor, size: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """Mask ``[B, 1, *size]``: the logits upsampled bilinearly to ``size``, then a sigmoid."""
        return torch.sigmoid(F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False))


@dataclass(frozen=True)
class MaskerInfo:
    """What a masker file says about itself and the classifier it was trained for."""

    num_classes: int
    in_channels: int
    rows: int
    columns: int
    widths: tuple[int, int, int]
    decoder_width: int
    logit_bound: float
    #: Everything else recorded (model name/version/sha256, classes, training figures).
    metadata: dict[str, Any]


def save_masker(path: str | Path, masker: SaliencyMasker, rows: int, columns: int, metadata: dict[str, Any]) -> Path:
    """Write ``masker`` (float32 state dict) and its metadata to ``path``; returns the path."""
    encoder = masker.encoder
    widths = (encoder.stem[0].out_channels, encoder.block2[0].out_channels, encoder.block4[0].out_channels)
    payload = {
        "format": FILE_FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": {
            "num_classes": masker.num_classes,
            "in_channels": encoder.stem[0].in_channels,
            "widths": list(widths),
            "decoder_width": masker.bottleneck[0].out_channels,
            "logit_bound": masker.logit_bound,
        },
        "input": {"rows": rows, "columns": columns},
        "metadata": metadata,
        "state_dict": {key: value.detach().cpu().clone() for key, value in masker.state_dict().items()},
    }
    return save_payload(payload, path)


def load_masker(path: str | Path) -> tuple[SaliencyMasker, MaskerInfo]:
    """The masker stored at ``path`` (eval mode, CPU, no gradients) and its :class:`MaskerInfo`."""
    payload = load_payload(
        path,
        what="saliency masker",
        file_format=FILE_FORMAT,
        format_version=FORMAT_VERSION,
        remake=f"`{TRAIN_COMMAND} --out DIR`",
    )
    try:
        architecture, size = payload["architecture"], payload["input"]
        info = MaskerInfo(
            num_classes=int(architecture["num_classes"]),
            in_channels=int(architecture["in_channels"]),
            rows=int(size["rows"]),
            columns=int(size["columns"]),
            widths=tuple(int(w) for w in architecture["widths"]),  # type: ignore[arg-type]
            decoder_width=int(architecture["decoder_width"]),
            logit_bound=float(architecture["logit_bound"]),
            metadata=dict(payload.get("metadata") or {}),
        )
        masker = SaliencyMasker(info.num_classes, info.in_channels, info.widths, info.decoder_width, info.logit_bound)
        masker.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ExplainerError(f"saliency masker {path} is damaged or inconsistent: {exc}") from exc
    masker.eval()
    masker.requires_grad_(False)
    return masker, info


def _model_class_count(model: ModelLike) -> int | None:
    """Output size of the last ``nn.Linear`` of the model's torch module; ``None`` when not cheaply known."""
    module = model if isinstance(model, nn.Module) else getattr(model, "torch_module", None)
    if not isinstance(module, nn.Module):
        return None
    linears = [layer for layer in module.modules() if isinstance(layer, nn.Linear)]
    return linears[-1].out_features if linears else None


class RealtimeSaliency(Explainer):
    """Real-time saliency (Dabkowski & Gal, 2017): the trained masker's mask for the target class.

    ``masker`` is the masker file trained for the model; the node fills it in from the model
    card's ``auxiliary.saliency_masker`` (the demo card names the one ``pacs-xai demo
    train-saliency`` trained for the demo model). The map is the mask itself, ``[B, H, W]`` in
    (0, 1) (0.0025 to 0.9975 with the default logit bound): higher means the classifier needs
    that region to keep the target class (for a class the masker deems absent from the image it
    comes out near 0 everywhere). One masker forward pass per batch, the classifier never runs
    (see the module docstring for which checks that leaves). The file is read once per explainer
    instance, at the first call; nothing random.
    """

    name: ClassVar[str] = "realtime_saliency"
    needs_gradients: ClassVar[bool] = False
    #: The masker is a 2D network trained for the demo radiograph model.
    supports_volumes: ClassVar[bool] = False
    card_files: ClassVar[Mapping[str, str]] = MappingProxyType({"masker": CARD_ENTRY})

    def __init__(self, masker: str | os.PathLike[str] | None = None) -> None:
        if masker is None:
            raise ExplainerError(
                f"realtime_saliency needs the saliency masker trained for the model: set the model card's "
                f"auxiliary.{CARD_ENTRY} (`{TRAIN_COMMAND} --out CARD_FOLDER` writes it) or the masker setting"
            )
        if not isinstance(masker, str | os.PathLike):
            raise ExplainerError(f"masker must be a path to a saliency masker file, got {masker!r}")
        path = Path(masker)
        if not path.is_file():
            raise ExplainerError(
                f"saliency masker file not found: {path}; create it with `{TRAIN_COMMAND} --out {path.parent}`"
            )
        self.masker_path = path
        self._lock = threading.Lock()
        self._loaded: tuple[SaliencyMasker, MaskerInfo] | None = None
        self._on_device: dict[torch.device, SaliencyMasker] = {}

    def info(self) -> MaskerInfo:
        """The masker's metadata (loads the file on first use)."""
        return self._load()[1]

    def _load(self) -> tuple[SaliencyMasker, MaskerInfo]:
        with self._lock:
            if self._loaded is None:
                self._loaded = load_masker(self.masker_path)
            return self._loaded

    def _masker_on(self, device: torch.device) -> SaliencyMasker:
        """The masker on ``device`` (a copy per non-CPU device, made once)."""
        masker, _ = self._load()
        if device.type == "cpu":
            return masker
        with self._lock:
            if device not in self._on_device:
                self._on_device[device] = copy.deepcopy(masker).to(device)
            return self._on_device[device]

    def _check(self, model: ModelLike, batch: torch.Tensor, targets: torch.Tensor, info: MaskerInfo) -> None:
        if not isinstance(model, (nn.Module, Runner)):
            raise ExplainerError(f"model must be a torch.nn.Module or a Runner, got {type(model).__name__}")
        _, channels, rows, columns = batch.shape
        if (channels, rows, columns) != (info.in_channels, info.rows, info.columns):
            raise ExplainerError(
                f"saliency masker {self.masker_path.name} takes {info.in_channels} x {info.rows} x {info.columns} "
                f"inputs (channels x rows x columns), got {channels} x {rows} x {columns}"
            )
        if targets.numel() and int(targets.max()) >= info.num_classes:
            raise ExplainerError(
                f"targets {targets.tolist()} out of range for saliency masker {self.masker_path.name} "
                f"with {info.num_classes} classes"
            )
        classes = _model_class_count(model)
        if classes is not None and classes != info.num_classes:
            raise ExplainerError(
                f"model {type(model).__name__} has {classes} output classes but saliency masker "
                f"{self.masker_path.name} was trained for a {info.num_classes}-class model; "
                f"train one for this model with `{TRAIN_COMMAND}`"
            )

    def _explain(self, model: ModelLike, batch: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        _, info = self._load()
        self._check(model, batch, targets, info)
        masker = self._masker_on(batch.device)
        with torch.no_grad():
            masks = masker(batch.detach().to(torch.float32), targets)
        return masks[:, 0]
