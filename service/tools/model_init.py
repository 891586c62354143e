"""``pacs-xai model init``: a validated model card from a model as a hospital brings it.

Sources: an ONNX file; a torch network ``package.module:callable`` with a checkpoint (a state dict,
or a whole TorchScript file); a MONAI bundle folder (``configs/inference.json`` and
``models/model.pt``: the network from ``network_def`` through MONAI's ``ConfigParser``, the class
names and input from ``configs/metadata.json``, the intensity scaling and size from the
``preprocessing`` transforms where it gives them); a TorchXRayVision class (its 224² input, its
[-1024, 1024] pixel scaling, its pathology list, sigmoid outputs with one threshold per pathology).

The weight files are written into the card's folder and hashed (sha256 of every file). For an eager
network the CAM target layer is found (:func:`service.inference.architecture.cam_target_layer`:
the last spatial feature block) and, with ``export_onnx``, an ONNX copy is exported and checked
against torch on random and phantom inputs (max abs difference of the logits, reported). The card
is then loaded as the node loads it (schema, files, sha256, output size against the class list,
the input size, the target layer), so a card that is written is a card that loads.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from dicom_io.pixels import prepare_frames
from service.inference.architecture import build_module, cam_target_layer, import_architecture
from service.inference.backends import load_runner
from service.inference.card import DEFAULT_THRESHOLD, InputSection, ModelCard, ModelCardError, sha256_of
from service.synthetic.phantoms import make_phantom
from service.tools.progress import Progress

#: The card's file name inside its folder.
CARD_FILE = "model.yaml"
#: ONNX Runtime may differ from torch by float32 rounding; more than this (on logits) fails the export.
EXPORT_TOLERANCE = 1e-3
#: TorchXRayVision's pixel range: [0, 1] display values become [-1024, 1024].
XRV_RANGE = 2048.0


class ModelInitError(ValueError):
    """The model cannot become a card; the message names the value and what to do."""


@dataclass(frozen=True)
class CardSettings:
    """What the command line says about the model; ``None`` means "find it out from the source"."""

    name: str | None = None
    version: str = "1.0.0"
    description: str = ""
    classes: tuple[str, ...] | None = None
    activation: str | None = None
    threshold: float | None = None
    rows: int | None = None
    columns: int | None = None
    channels: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    windowing: str = "dicom"
    aspect: str = "letterbox"
    target_layer: str | None = None
    findings: str | tuple[str, ...] | None = None
    top_k: int | None = None
    methods: tuple[str, ...] | None = None
    outputs: tuple[str, ...] = ("sc",)
    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()


@dataclass
class InitReport:
    """What ``model init`` did: the card, where the numbers came from, the export check."""

    card_path: Path
    card: ModelCard
    source: str
    #: "random" / "phantom" -> max abs difference of ONNX Runtime vs torch logits.
    export_differences: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class _Draft:
    """The card being built: the settings completed from the source."""

    settings: CardSettings
    weights: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    description: str = ""
    thresholds: dict[str, float] = field(default_factory=dict)


# --- sources ------------------------------------------------------------------------------------------------


def init_from_onnx(
    onnx_file: Path, out_dir: Path, settings: CardSettings, *, progress: Progress | None = None
) -> InitReport:
    """A card for an ONNX file: input size and channels from its graph where fixed, classes from its output."""
    import onnxruntime as ort

    started = time.perf_counter()
    onnx_file = _existing(onnx_file, "ONNX file")
    try:
        session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelInitError(f"{onnx_file} is not an ONNX model ONNX Runtime can load: {exc}") from exc
    shape = session.get_inputs()[0].shape
    fixed = [value if isinstance(value, int) else None for value in shape]
    if len(shape) != 4:
        raise ModelInitError(
            f"{onnx_file}: input {session.get_inputs()[0].name} has shape {shape}; expected [B, C, H, W]"
        )
    settings = _fill(settings, channels=fixed[1], rows=fixed[2], columns=fixed[3])
    settings = _require_size(settings, f"the ONNX input is {shape}")
    probe = np.zeros((1, settings.channels, settings.rows, settings.columns), dtype=np.float32)
    try:
        outputs = session.run(None, {session.get_inputs()[0].name: probe})[0]
    except Exception as exc:
        raise ModelInitError(
            f"{onnx_file} refuses an input of shape {list(probe.shape)} (give --size and --channels it takes): {exc}"
        ) from exc
    draft = _Draft(_with_classes(settings, int(np.asarray(outputs).shape[-1])))
    out_dir.mkdir(parents=True, exist_ok=True)
    target = _copy_into(onnx_file, out_dir, "model.onnx")
    draft.weights["onnx"] = {"file": target.name}
    draft.notes.append("ONNX only: forward-only methods (occlusion, RISE, ...); gradient and CAM methods need torch")
    _progress(progress, f"ONNX model: input {shape}, {len(draft.settings.classes or ())} outputs")
    return _write(draft, out_dir, "onnx", {}, started)


def init_from_torch(
    architecture: str | None,
    checkpoint: Path,
    out_dir: Path,
    settings: CardSettings,
    *,
    arguments: Mapping[str, Any] | None = None,
    export_onnx: bool = False,
    progress: Progress | None = None,
) -> InitReport:
    """A card for a torch network: ``architecture`` ``package.module:callable`` with a state-dict
    ``checkpoint``, or a whole TorchScript ``checkpoint`` (``architecture`` may then be None)."""
    started = time.perf_counter()
    checkpoint = _existing(checkpoint, "checkpoint")
    scripted = _load_torchscript(checkpoint)
    if scripted is not None:
        return _init_torchscript(scripted, checkpoint, out_dir, settings, export_onnx, started, progress)
    if architecture is None:
        raise ModelInitError(
            f"{checkpoint} is a state dict, not a TorchScript file: give the network as --torch package.module:callable"
        )
    state = _state_dict(checkpoint)
    settings = _require_size(settings, "a state dict does not say it")
    if arguments is None and settings.classes is None:
        raise ModelInitError(
            f"{architecture} is built as {architecture.partition(':')[2]}(num_classes=K, in_channels=C): give the "
            "class names with --classes (or the callable's own arguments with --arguments)"
        )
    module = build_module(
        architecture,
        arguments=arguments,
        num_classes=len(settings.classes or ()),
        in_channels=settings.channels or 1,
    )
    _load_state(module, state, checkpoint)
    return _finish_eager(module, architecture, arguments, out_dir, settings, "torch", export_onnx, started, progress)


def init_from_monai_bundle(
    bundle: Path,
    out_dir: Path,
    settings: CardSettings,
    *,
    export_onnx: bool = False,
    progress: Progress | None = None,
) -> InitReport:
    """A card for a MONAI bundle: ``configs/inference.json`` (``network_def``, ``preprocessing``),
    ``configs/metadata.json`` (class names, input channels and size) and ``models/model.pt``."""
    started = time.perf_counter()
    try:
        from monai.bundle import ConfigParser
    except ImportError as exc:
        raise ModelInitError(f"a MONAI bundle needs monai (pip install 'pacs-xai[models]'): {exc}") from exc
    config = _existing(bundle / "configs" / "inference.json", "MONAI bundle config")
    weights = _existing(bundle / "models" / "model.pt", "MONAI bundle weights")
    parser = ConfigParser()
    parser.read_config(str(config))
    metadata_file = bundle / "configs" / "metadata.json"
    metadata = json.loads(metadata_file.read_text(encoding="utf-8")) if metadata_file.is_file() else {}
    if "network_def" not in parser.get():
        raise ModelInitError(f"{config} has no network_def; a bundle names its network there")
    raw = parser["network_def"]
    arguments = {}
    for key in raw:
        if key.startswith("_"):
            continue
        value = parser.get_parsed_content(f"network_def::{key}")
        if not _json_plain(value):
            raise ModelInitError(
                f"{config}: network_def {key} resolves to {type(value).__name__}, not a plain value; "
                "export the network as TorchScript and use --torch with the .pt file"
            )
        arguments[key] = value.tolist() if isinstance(value, tuple) else value
    module = parser.get_parsed_content("network_def")
    architecture = f"{type(module).__module__}:{type(module).__qualname__}"
    settings = _from_monai_metadata(settings, metadata, arguments)
    settings, notes = _from_monai_preprocessing(settings, parser)
    settings = _require_size(settings, "neither metadata.json nor a Resize transform gives it")
    _load_state(module, _state_dict(weights), weights)
    _progress(progress, f"MONAI bundle network {architecture} with {arguments}")
    report = _finish_eager(
        module, architecture, arguments, out_dir, settings, "monai-bundle", export_onnx, started, progress
    )
    report.notes.extend(notes)
    return report


def init_from_torchxrayvision(
    class_name: str,
    out_dir: Path,
    settings: CardSettings,
    *,
    checkpoint: Path | None = None,
    export_onnx: bool = False,
    progress: Progress | None = None,
) -> InitReport:
    """A card for a TorchXRayVision class (``DenseNet``): 224², pixels scaled to [-1024, 1024], its
    pathology list, sigmoid outputs. Its pretrained weights are downloaded by the library, which
    needs the network: give them as a state-dict ``checkpoint`` (its ``op_threshs`` become the
    card's thresholds); without one the weights are random (stated in the card)."""
    started = time.perf_counter()
    try:
        xrv = import_architecture("torchxrayvision")
    except ImportError as exc:
        raise ModelInitError(
            f"TorchXRayVision is not installed ({exc}); pip install --no-deps torchxrayvision"
        ) from exc
    factory = getattr(xrv.models, class_name, None)
    if class_name != "DenseNet" or factory is None:
        raise ModelInitError(
            f"TorchXRayVision class {class_name!r}: only 'DenseNet' builds without downloading weights; for another "
            "class save its state dict and use --torch torchxrayvision.models:<Class> --checkpoint FILE"
        )
    pathologies = tuple(
        name or f"unused_{index}" for index, name in enumerate(settings.classes or xrv.datasets.default_pathologies)
    )
    module = factory(weights=None, num_classes=len(pathologies), in_channels=1)
    thresholds: dict[str, float] = {}
    notes = []
    if checkpoint is not None:
        state = dict(_state_dict(_existing(checkpoint, "checkpoint")))
        operating = state.pop("op_threshs", None)
        if operating is not None:
            thresholds = {
                name: float(value)
                for name, value in zip(pathologies, operating.tolist())
                if value == value and 0.0 < value < 1.0
            }
        _load_state(module, state, checkpoint)
    else:
        notes.append("random weights: TorchXRayVision's pretrained weights cannot be downloaded here")
    settings = _fill(
        settings,
        classes=pathologies,
        activation="sigmoid",
        rows=224,
        columns=224,
        channels=1,
        mean=(0.5,),
        std=(1.0 / XRV_RANGE,),
        name=f"torchxrayvision-{class_name.lower()}",
        findings="all_positive",
        description=(
            f"TorchXRayVision {class_name} ({'weights from ' + checkpoint.name if checkpoint else 'RANDOM weights'}): "
            "224x224 grayscale, pixels scaled to [-1024, 1024], sigmoid per pathology."
        ),
    )
    architecture = f"torchxrayvision.models:{class_name}"
    report = _finish_eager(
        module, architecture, None, out_dir, settings, "torchxrayvision", export_onnx, started, progress, thresholds
    )
    report.notes.extend(notes)
    return report


# --- the eager network: target layer, state dict, ONNX export ------------------------------------------------


def _finish_eager(
    module: nn.Module,
    architecture: str,
    arguments: Mapping[str, Any] | None,
    out_dir: Path,
    settings: CardSettings,
    source: str,
    export_onnx: bool,
    started: float,
    progress: Progress | None,
    thresholds: Mapping[str, float] | None = None,
) -> InitReport:
    module.eval()
    settings = _require_size(settings, "give --size")
    example = torch.zeros(1, settings.channels or 1, settings.rows or 1, settings.columns or 1)
    try:
        with torch.no_grad():
            logits = module(example)
    except Exception as exc:
        raise ModelInitError(
            f"the network refuses an input of shape {list(example.shape)} (--size {settings.rows}x{settings.columns}, "
            f"--channels {settings.channels}): {str(exc).strip().splitlines()[0][:300]}"
        ) from exc
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        raise ModelInitError(
            f"the network returns {type(logits).__name__} {getattr(logits, 'shape', '')}: expected logits [B, K]"
        )
    draft = _Draft(_with_classes(settings, int(logits.shape[1])))
    draft.thresholds.update(thresholds or {})
    layer = settings.target_layer or cam_target_layer(module, example)
    if layer is None:
        draft.notes.append("no layer with a spatial output: CAM methods cannot run on this network")
    else:
        _progress(progress, f"CAM target layer: {layer}")
    draft.settings = replace(draft.settings, target_layer=layer)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / "model.pth"
    torch.save(module.state_dict(), state_path)
    entry: dict[str, Any] = {"file": state_path.name, "architecture": architecture}
    if arguments is not None:
        entry["arguments"] = dict(arguments)
    draft.weights["torch"] = entry
    differences = _export(module, draft, out_dir, progress) if export_onnx else {}
    return _write(draft, out_dir, source, differences, started)


def _init_torchscript(
    scripted: torch.jit.ScriptModule,
    checkpoint: Path,
    out_dir: Path,
    settings: CardSettings,
    export_onnx: bool,
    started: float,
    progress: Progress | None,
) -> InitReport:
    settings = _require_size(settings, "a TorchScript file does not say it")
    example = torch.zeros(1, settings.channels or 1, settings.rows or 1, settings.columns or 1)
    try:
        with torch.no_grad():
            logits = scripted(example)
    except Exception as exc:
        raise ModelInitError(
            f"the TorchScript network refuses an input of shape {list(example.shape)}: "
            f"{str(exc).strip().splitlines()[0][:300]}"
        ) from exc
    draft = _Draft(_with_classes(settings, int(logits.shape[-1])))
    out_dir.mkdir(parents=True, exist_ok=True)
    target = _copy_into(checkpoint, out_dir, "model.pt")
    draft.weights["torchscript"] = {"file": target.name}
    draft.notes.append(
        "TorchScript takes no forward hooks: CAM methods need the eager network (--torch package.module:callable "
        "with a state dict); the gradient methods run"
    )
    _progress(progress, "TorchScript network")
    differences = _export(scripted, draft, out_dir, progress) if export_onnx else {}
    return _write(draft, out_dir, "torchscript", differences, started)


def _export(module: nn.Module, draft: _Draft, out_dir: Path, progress: Progress | None) -> dict[str, float]:
    """Export ``model.onnx`` (dynamic batch) and compare ONNX Runtime with torch on a random batch and
    a phantom radiograph; refuse an export that differs by more than :data:`EXPORT_TOLERANCE`."""
    import onnxruntime as ort

    settings = draft.settings
    shape = (2, settings.channels or 1, settings.rows or 1, settings.columns or 1)
    path = out_dir / "model.onnx"
    _progress(progress, "exporting ONNX (torch.onnx, dynamo) ...")
    try:
        with tempfile.TemporaryDirectory() as scratch:
            exported = Path(scratch) / "model.onnx"
            torch.onnx.export(
                module,
                (torch.zeros(shape),),
                str(exported),
                dynamo=True,
                external_data=False,
                input_names=["image"],
                output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
            )
            shutil.copyfile(exported, path)
    except ImportError as exc:
        raise ModelInitError(f"ONNX export needs the 'export' extra (pip install 'pacs-xai[export]'): {exc}") from exc
    except Exception as exc:
        raise ModelInitError(f"torch cannot export this network to ONNX: {str(exc).strip()[:400]}") from exc
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    section = InputSection(
        channels=settings.channels or 1,
        rows=settings.rows or 1,
        columns=settings.columns or 1,
        mean=settings.mean or (0.0,),
        std=settings.std or (1.0,),
        windowing=settings.windowing,
        aspect=settings.aspect,
    )
    generator = np.random.default_rng(0)
    random = section.normalise(generator.random(shape, dtype=np.float32))
    phantom = make_phantom(0, "nodule", modality="DX").dataset
    phantom_input = section.normalise(
        np.stack([frame.model_input for frame in prepare_frames(phantom, section.spec())])
    )
    differences = {}
    for label, batch in (("random", random), ("phantom", phantom_input)):
        with torch.no_grad():
            expected = module(torch.from_numpy(batch)).numpy()
        found = session.run(None, {session.get_inputs()[0].name: batch})[0]
        difference = float(np.abs(found - expected).max())
        scale = max(1.0, float(np.abs(expected).max()))
        differences[label] = difference
        if difference > EXPORT_TOLERANCE * scale:
            path.unlink()
            raise ModelInitError(
                f"the ONNX export differs from torch by {difference:.3g} on the {label} input (logits up to "
                f"{scale:.3g}, tol. {EXPORT_TOLERANCE:g} x that); no ONNX weights written: leave out --export-onnx"
            )
    draft.weights["onnx"] = {"file": path.name}
    return differences


# --- writing and checking the card ----------------------------------------------------------------------------


def _write(draft: _Draft, out_dir: Path, source: str, differences: dict[str, float], started: float) -> InitReport:
    settings = draft.settings
    classes = list(settings.classes or ())
    activation = settings.activation or "softmax"
    threshold = settings.threshold if settings.threshold is not None else DEFAULT_THRESHOLD
    thresholds = {name: draft.thresholds.get(name, threshold) for name in classes}
    findings: object = settings.findings or ("all_positive" if activation == "sigmoid" else "top_k")
    if isinstance(findings, tuple):
        findings = list(findings)
    explain: dict[str, Any] = {"findings": findings}
    if settings.top_k is not None:
        explain["top_k"] = settings.top_k
    forward_only = set(draft.weights) == {"onnx"}
    methods = settings.methods or (("occlusion",) if forward_only or not settings.target_layer else ("gradcam",))
    weights = {
        runtime: {**entry, "sha256": sha256_of(out_dir / entry["file"])} for runtime, entry in draft.weights.items()
    }
    for entry in weights.values():  # file and sha256 first, as the shipped cards have them
        for key in ("architecture", "arguments"):
            if key in entry:
                entry[key] = entry.pop(key)
    card: dict[str, Any] = {
        "name": settings.name or out_dir.resolve().name,
        "version": settings.version,
        "description": settings.description
        or draft.description
        or f"Model card written by pacs-xai model init from a {source} model.",
        "weights": {runtime: weights[runtime] for runtime in ("onnx", "torchscript", "torch") if runtime in weights},
        "input": {
            "channels": settings.channels,
            "rows": settings.rows,
            "columns": settings.columns,
            "aspect": settings.aspect,
            "windowing": settings.windowing,
            "mean": list(settings.mean or (0.0,)),
            "std": list(settings.std or (1.0,)),
        },
        "output": {"activation": activation, "classes": classes, "thresholds": thresholds},
    }
    if settings.target_layer:
        card["target_layer"] = settings.target_layer
    applies: dict[str, list[str]] = {}
    if settings.modalities:
        applies["modalities"] = list(settings.modalities)
    if settings.body_parts:
        applies["body_parts"] = [part.upper() for part in settings.body_parts]
    if applies:
        card["applies_to"] = applies
    card["defaults"] = {"methods": list(methods), "outputs": list(settings.outputs)}
    card["explain"] = explain
    card_path = out_dir / CARD_FILE
    card_path.write_text(yaml.safe_dump(card, sort_keys=False, allow_unicode=True), encoding="utf-8")
    try:
        loaded = verify_card(card_path)
    except ModelCardError:
        card_path.unlink()
        raise
    return InitReport(card_path, loaded, source, differences, draft.notes, time.perf_counter() - started)


def verify_card(card_path: Path) -> ModelCard:
    """Load the card as the node does and load every runtime it lists (output size against the class
    list, the input size, the target layer): the :class:`ModelCardError` of the first wrong value."""
    card = ModelCard.load(card_path)
    for runtime in card.weights:
        load_runner(card, runtime, device="cpu")
    return card


# --- small helpers ---------------------------------------------------------------------------------------------


def _progress(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


def _existing(path: Path, what: str) -> Path:
    if not Path(path).is_file():
        raise ModelInitError(f"{what} not found: {path}")
    return Path(path)


def _copy_into(path: Path, out_dir: Path, name: str) -> Path:
    target = out_dir / name
    if path.resolve() != target.resolve():
        shutil.copyfile(path, target)
    return target


def _fill(settings: CardSettings, **found: Any) -> CardSettings:
    """The settings with each ``None`` replaced by what the source says (the command line wins)."""
    changes = {key: value for key, value in found.items() if value is not None and getattr(settings, key) in (None, "")}
    return replace(settings, **changes)


def _require_size(settings: CardSettings, why: str) -> CardSettings:
    settings = _fill(settings, channels=1)
    if settings.rows is None or settings.columns is None:
        raise ModelInitError(f"the input size is unknown ({why}): give --size ROWSxCOLUMNS")
    return settings


def _with_classes(settings: CardSettings, outputs: int) -> CardSettings:
    """Class names: as given (their count must be the output size), else class_0 ... class_{K-1}."""
    if settings.classes is None:
        return replace(settings, classes=tuple(f"class_{index}" for index in range(outputs)))
    if len(settings.classes) != outputs:
        raise ModelInitError(
            f"{len(settings.classes)} class names {list(settings.classes)} for a network with {outputs} outputs; "
            f"give {outputs} names"
        )
    return settings


def _load_torchscript(path: Path) -> torch.jit.ScriptModule | None:
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception:  # not a TorchScript archive: a state dict, tried next
        return None


def _state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    """The state dict in a checkpoint: the file itself, or its 'state_dict' / 'model' entry."""
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelInitError(
            f"{path} is neither a TorchScript file nor a state dict torch can load safely: {exc}"
        ) from exc
    for key in ("state_dict", "model", "network"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ModelInitError(f"{path} holds a {type(loaded).__name__}, not a state dict of tensors")
    return loaded


def _load_state(module: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ModelInitError(
            f"the state dict {path} does not fit {type(module).__name__}: {' '.join(first)[:400]}"
        ) from None


def _json_plain(value: object) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_json_plain(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and _json_plain(item) for key, item in value.items())
    return False


def _from_monai_metadata(
    settings: CardSettings, metadata: Mapping[str, Any], arguments: Mapping[str, Any]
) -> CardSettings:
    """Class names and input from ``network_data_format`` in metadata.json, channels from the network."""
    data_format = metadata.get("network_data_format", {})
    inputs = next(iter(data_format.get("inputs", {}).values()), {})
    outputs = next(iter(data_format.get("outputs", {}).values()), {})
    channel_def = outputs.get("channel_def") or {}
    classes = tuple(str(channel_def[key]) for key in sorted(channel_def, key=int)) if channel_def else None
    spatial = inputs.get("spatial_shape") or []
    fixed = [int(v) for v in spatial if isinstance(v, int) or (isinstance(v, str) and v.isdigit())]
    rows, columns = (fixed[0], fixed[1]) if len(fixed) == 2 and len(spatial) == 2 else (None, None)
    channels = inputs.get("num_channels") or arguments.get("in_channels")
    activation = "sigmoid" if outputs.get("is_onehot") is False and outputs.get("format") == "labels" else None
    return _fill(settings, classes=classes, rows=rows, columns=columns, channels=channels, activation=activation)


def _from_monai_preprocessing(settings: CardSettings, parser: Any) -> tuple[CardSettings, list[str]]:
    """Size and normalisation from the bundle's preprocessing transforms, where it gives them.

    ``Resize(d)`` / ``Resized`` ``spatial_size`` -> rows, columns; ``ScaleIntensity(d)`` (minv, maxv)
    and ``ScaleIntensityRange(d)`` (b_min, b_max) map [0, 1] onto the output range: mean/std such that
    (x - mean) / std spans it; ``NormalizeIntensity(d)`` with numbers subtrahend/divisor -> mean/std.
    A CT window (a_min/a_max) cannot be carried: the node windows by the DICOM window; a note says so.
    """
    notes: list[str] = []
    try:
        transforms = parser["preprocessing"]["transforms"]
    except (KeyError, TypeError):
        return settings, notes
    found: dict[str, Any] = {}
    for index, transform in enumerate(transforms):
        if not isinstance(transform, dict):
            continue
        target = str(transform.get("_target_", "")).split(".")[-1].rstrip("d")

        def value(key: str, index: int = index, transform: dict = transform) -> Any:
            if key not in transform:
                return None
            return parser.get_parsed_content(f"preprocessing::transforms::{index}::{key}")

        if target == "Resize":
            size = value("spatial_size")
            if isinstance(size, (list, tuple)) and len(size) == 2 and all(int(v) > 0 for v in size):
                found["rows"], found["columns"] = int(size[0]), int(size[1])
        elif target in ("ScaleIntensity", "ScaleIntensityRange"):
            low = value("minv" if target == "ScaleIntensity" else "b_min")
            high = value("maxv" if target == "ScaleIntensity" else "b_max")
            low = 0.0 if low is None else float(low)
            high = 1.0 if high is None else float(high)
            if high > low:
                std = 1.0 / (high - low)
                found["mean"], found["std"] = (-low * std + 0.0,), (std,)  # + 0.0: no "-0.0" in the card
            if target == "ScaleIntensityRange" and value("a_min") is not None:
                notes.append(
                    f"the bundle windows intensities to [{value('a_min')}, {value('a_max')}]; the node windows by the "
                    "DICOM window (input.windowing), check that it matches"
                )
        elif target == "NormalizeIntensity":
            subtrahend, divisor = value("subtrahend"), value("divisor")
            if isinstance(subtrahend, (int, float)) and isinstance(divisor, (int, float)) and divisor > 0:
                found["mean"], found["std"] = (float(subtrahend),), (float(divisor),)
            else:
                notes.append("NormalizeIntensity without fixed numbers (per-image statistics): not carried to the card")
    return _fill(settings, **found), notes
