"""The model card: a YAML file beside the weights that says what the model is and how to feed it.

A card is validated completely when it is loaded (schema, files present, sha256 of each weight
file and of each auxiliary file), so a wrong card stops the node at start-up, not at the first
study. Whether the class list matches the model's output size is checked when a runner loads the
weights (:func:`service.inference.backends.load_runner`).

``auxiliary`` lists networks trained against the model that explainers use (not inference), by
kind: ``saliency_masker`` is the masking network of the ``realtime_saliency`` explainer. An
explainer names the kind it reads (``Explainer.card_files``) and the node's pipeline passes the
file to it when the configuration does not set one. ``healthy_appearance`` is the VAE of
healthy-tissue replacement (:mod:`service.explain.healthy`), read by every method that takes
``perturbation: healthy``; ``healthy_appearance_onnx`` its ONNX export, listed so that the card
vouches for both files. ``ood_statistics`` holds the feature
statistics and threshold of the out-of-distribution signal (:mod:`service.trust.ood`, written by
``pacs-xai model calibrate``); it needs ``torch`` weights, because the features are read with a
forward hook on the eager module.

``trust`` sets how the node judges whether a result can be believed (every key optional; the
defaults below apply when a key or the section is absent):

- ``shortcut.share`` (fraction 0..1, default 0.55) and ``shortcut.concentration`` (ratio, default
  1.8): an explanation is flagged "shortcut suspected" when the share of its positive
  attribution outside the anatomy and that share divided by the area fraction of the region both
  reach them (:mod:`service.trust.shortcut`); ``shortcut.edge_band`` (fraction of each side,
  default 0.08) is the width of the edge band counted as outside the anatomy;
- ``ood.layer``: the module whose input is the feature vector of the OOD signal (default: the
  last ``nn.Linear``); ``ood.distance``: a Mahalanobis distance that overrides the threshold
  calibrated with ``auxiliary.ood_statistics``.

``output.activation: sigmoid`` makes a multi-label model: ``output.thresholds`` gives the
probability at which each class counts as present (0.5 where a class is not listed), and
``explain.findings`` which findings of an image are explained, each into its own Secondary Capture
and Parametric Map, a segment of the frame's Segmentation, and a group of the SR that lists every
class: ``top_k`` (with ``top_k: 1``, the default, the predicted class, as a single-label model),
``all_positive`` (every class at or above its threshold) or a list of class names. A network whose
constructor does not take ``num_classes``/``in_channels`` names its keyword ``arguments`` beside its
``architecture`` (what ``pacs-xai model init`` writes for a MONAI bundle). A card is written for a
hospital's own model by ``pacs-xai model init`` and tried on a sample by ``pacs-xai model check``.

Example of a multi-label card (as ``pacs-xai model init --torchxrayvision DenseNet`` writes it)::

    name: torchxrayvision-densenet
    version: 1.0.0
    weights:
      torch: {file: model.pth, sha256: 0b4c..., architecture: "torchxrayvision.models:DenseNet"}
    input: {channels: 1, rows: 224, columns: 224, mean: [0.5], std: [0.00048828125]}  # [-1024, 1024]
    output:
      activation: sigmoid
      classes: [Atelectasis, Consolidation, ...]
      thresholds: {Atelectasis: 0.5, Consolidation: 0.5, ...}
    target_layer: features
    explain: {findings: all_positive}

Example (``service/models/demo/model.yaml``)::

    name: pacs-xai-demo-chest
    version: 1.0.0
    weights:
      onnx: {file: demo.onnx, sha256: 3f1c...}
      torchscript: {file: demo.pt, sha256: 9ab2...}
      torch: {file: demo.pth, sha256: 41d0..., architecture: "service.models.demo.network:DemoNet"}
    auxiliary:
      saliency_masker: {file: saliency-masker.pt, sha256: 7c4e...}
      healthy_appearance: {file: healthy-appearance.pt, sha256: 2b9f...}
      healthy_appearance_onnx: {file: healthy-appearance.onnx, sha256: 8e01...}
      ood_statistics: {file: ood-statistics.npz, sha256: 5d2a...}
    input: {channels: 1, rows: 224, columns: 224, aspect: letterbox, windowing: dicom,
            mean: [0.5], std: [0.25]}
    output: {activation: softmax, classes: [normal, nodule, effusion]}
    target_layer: features.block4
    applies_to: {modalities: [CR, DX], body_parts: [CHEST]}
    defaults: {methods: [gradcam], outputs: [sc]}
    trust:
      shortcut: {share: 0.55, concentration: 1.8, edge_band: 0.08}
      ood: {layer: classifier}
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, field_validator, model_validator

from dicom_io.pixels import InputSpec

#: onnx: ONNX Runtime, forward only. torchscript: a scripted module. torch: a state dict loaded
#: into an eager ``nn.Module`` named by ``architecture``; the form CAM methods need, because
#: TorchScript modules take no forward hooks.
Runtime = Literal["onnx", "torchscript", "torch"]
#: How logits become probabilities: softmax over the classes, or a sigmoid per class (multi-label).
Activation = Literal["softmax", "sigmoid"]
#: Kinds of networks trained against the model for an explainer. saliency_masker: the masking
#: network of realtime_saliency (``pacs-xai demo train-saliency``). healthy_appearance: a VAE
#: trained on normal images at the card's input grid, whose reconstruction fills removed regions in
#: the ``healthy`` perturbation of occlusion, RISE, HiPe and the optimisation methods, and in
#: healthy_perturbation (``pacs-xai demo train-healthy``, ``pacs-xai model train-healthy``);
#: healthy_appearance_onnx: its ONNX export (h(x) on ONNX Runtime), which it names. Another
#: kind is one more name here and a ``card_files`` entry on its explainer. ood_statistics: the
#: out-of-distribution signal's feature statistics (``pacs-xai model calibrate``).
AuxiliaryKind = Literal["saliency_masker", "healthy_appearance", "healthy_appearance_onnx", "ood_statistics"]


class ModelCardError(ValueError):
    """The model card or its weight files are wrong; the message names the value and the file."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WeightsFile(_Strict):
    """One serialised form of the model."""

    file: str = Field(description="Path of the weights, relative to the card's folder.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Lower-case hex SHA-256 of the file.")
    architecture: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="For runtime torch: 'package.module:callable', built as callable(num_classes=K, in_channels=C) "
        "or, where 'arguments' is given, as callable(**arguments).",
    )
    arguments: dict[str, JsonValue] | None = Field(
        default=None,
        description="For runtime torch: the keyword arguments of the architecture callable (JSON values), for a "
        "network whose constructor does not take num_classes and in_channels (a MONAI bundle's network_def, "
        "a TorchXRayVision class).",
    )


class AuxiliaryFile(_Strict):
    """A network trained against this model, used by an explainer; checked like the weights."""

    file: str = Field(description="Path of the file, relative to the card's folder.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Lower-case hex SHA-256 of the file.")


class InputSection(_Strict):
    """What the model takes: size, channels, pixel policy, normalisation (x - mean) / std.

    ``kind: image`` (the default) takes one frame at a time, ``[C, rows, columns]``. ``kind:
    volume`` takes a whole CT or MR series as one volume ``[C, slices, rows, columns]``: the
    instances sorted along the slice normal and resampled to ``spacing`` (mm between slices,
    rows, columns; centred, padded with the low end of ``window``), modality values (CT:
    Hounsfield units) mapped from ``window`` (low, high) to [0, 1] and clipped; ``min_slices``
    is the fewest a series may have.
    """

    kind: Literal["image", "volume"] = "image"
    channels: Literal[1, 3] = 1
    rows: int = Field(gt=0, le=4096)
    columns: int = Field(gt=0, le=4096)
    aspect: Literal["letterbox", "stretch"] = "letterbox"
    windowing: Literal["dicom", "percentile"] = "dicom"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    slices: int | None = Field(default=None, gt=0, le=1024, description="Volumes: voxels along the slice normal.")
    spacing: tuple[float, float, float] | None = Field(
        default=None, description="Volumes: voxel spacing in mm (between slices, rows, columns)."
    )
    window: tuple[float, float] | None = Field(
        default=None, description="Volumes: modality values (CT: HU) that become 0 and 1, (low, high)."
    )
    min_slices: int = Field(default=8, gt=0, description="Volumes: the fewest slices a series may have.")

    @model_validator(mode="after")
    def _volume_settings(self) -> InputSection:
        volume_only = {"slices": self.slices, "spacing": self.spacing, "window": self.window}
        if self.kind == "image":
            given = [name for name, value in volume_only.items() if value is not None]
            if given:
                raise ValueError(f"input.{', input.'.join(given)} apply to input.kind: volume only (kind is image)")
            return self
        missing = [name for name, value in volume_only.items() if value is None]
        if missing:
            raise ValueError(f"input.kind: volume needs input.{', input.'.join(missing)}")
        assert self.spacing is not None and self.window is not None
        if min(self.spacing) <= 0:
            raise ValueError(f"input.spacing must be positive mm, got {list(self.spacing)}")
        if self.window[0] >= self.window[1]:
            raise ValueError(f"input.window must be (low, high) with low < high, got {list(self.window)}")
        if self.channels != 1:
            raise ValueError(f"input.kind: volume takes one channel, got channels: {self.channels}")
        return self

    def shape(self) -> tuple[int, ...]:
        """One sample's shape: ``(C, rows, columns)``, or ``(C, slices, rows, columns)`` for a volume."""
        if self.kind == "volume":
            assert self.slices is not None
            return (self.channels, self.slices, self.rows, self.columns)
        return (self.channels, self.rows, self.columns)

    @model_validator(mode="after")
    def _normalisation_per_channel(self) -> InputSection:
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, self.channels):
                raise ValueError(f"input.{name} has {len(values)} values; give 1 or {self.channels} (one per channel)")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"input.std must be > 0, got {list(self.std)}")
        return self

    def normalise(self, model_inputs: np.ndarray) -> np.ndarray:
        """``(x - mean) / std`` per channel on ``[B, C, H, W]`` (``[B, C, D, H, W]``) inputs in [0, 1] (float32)."""
        shape = (1, -1) + (1,) * (model_inputs.ndim - 2)
        mean = np.asarray(self.mean, dtype=np.float32).reshape(shape)
        std = np.asarray(self.std, dtype=np.float32).reshape(shape)
        return ((model_inputs - mean) / std).astype(np.float32)

    def value_range(self) -> tuple[float, float]:
        """The lowest and highest model input that pixel values 0..1 become under (x - mean) / std,
        over all channels: the inputs a real image can produce."""
        ends = self.normalise(
            np.array([0.0, 1.0], dtype=np.float32).reshape(2, 1, 1, 1) * np.ones((1, self.channels, 1, 1))
        )
        return float(ends.min()), float(ends.max())

    def spec(self) -> InputSpec:
        """The pixel pipeline's view of this section."""
        return InputSpec(
            rows=self.rows,
            columns=self.columns,
            channels=self.channels,
            aspect=self.aspect,
            windowing=self.windowing,
        )


class OutputSection(_Strict):
    """What the model returns: logits for ``classes``, turned into probabilities by ``activation``.

    ``thresholds`` (probability 0..1 per class name; :data:`DEFAULT_THRESHOLD` for a class not
    listed) says when a finding is present: for a sigmoid (multi-label) model each class on its own,
    e.g. a TorchXRayVision model's operating points.
    """

    activation: Activation = "softmax"
    classes: tuple[str, ...] = Field(min_length=1)
    thresholds: dict[str, float] = Field(default_factory=dict)

    @field_validator("classes")
    @classmethod
    def _unique(cls, classes: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(classes)) != len(classes):
            raise ValueError(f"output.classes has duplicates: {list(classes)}")
        if any(not name.strip() for name in classes):
            raise ValueError(f"output.classes has an empty name: {list(classes)}")
        return classes

    @model_validator(mode="after")
    def _thresholds_name_classes(self) -> OutputSection:
        unknown = sorted(set(self.thresholds) - set(self.classes))
        if unknown:
            raise ValueError(f"output.thresholds names {unknown}, which are not in output.classes {list(self.classes)}")
        bad = {name: value for name, value in self.thresholds.items() if not 0.0 < value < 1.0}
        if bad:
            raise ValueError(f"output.thresholds must be probabilities in (0, 1), got {bad}")
        return self

    def threshold(self, class_name: str) -> float:
        """The probability at or above which ``class_name`` counts as present."""
        return self.thresholds.get(class_name, DEFAULT_THRESHOLD)


#: The threshold of a class the card's ``output.thresholds`` does not list.
DEFAULT_THRESHOLD = 0.5


class ExplainSection(_Strict):
    """Which findings of an image are explained (each gets its own outputs).

    ``findings``: ``top_k`` (the ``top_k`` most probable classes; the default, 1, explains the
    predicted class as a single-label model does), ``all_positive`` (every class at or above its
    threshold, highest first, at most ``max_findings``), or a list of class names (always
    explained, whatever their probability).
    """

    findings: Literal["all_positive", "top_k"] | tuple[str, ...] = "top_k"
    top_k: int = Field(default=1, ge=1)
    max_findings: int = Field(default=32, ge=1, description="Cap on the findings explained per image.")

    def per_finding(self) -> bool:
        """True when an image may have several explained findings: every output then names its finding
        (and its derived UIDs include it)."""
        return not (self.findings == "top_k" and self.top_k == 1)


class AppliesTo(_Strict):
    """Which series the model is meant for; an empty list means any value."""

    modalities: tuple[str, ...] = ()
    sop_classes: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()


class Defaults(_Strict):
    """Explainers and output kinds produced when the configuration names none."""

    methods: tuple[str, ...] = ("gradcam",)
    outputs: tuple[str, ...] = ("sc",)


class ShortcutSettings(_Strict):
    """When an explanation is flagged "shortcut suspected" (:mod:`service.trust.shortcut`).

    The defaults were measured on the shipped demo models, 60 held-out honest phantoms against 30
    held-out token-carrying nodules of the cheating model, Grad-CAM and occlusion: honest shares
    at most 0.46 and concentrations at most 1.48; cheating shares at least 0.68 and
    concentrations at least 2.14. ``pacs-xai evaluate`` may calibrate them on a site's honest
    data (:func:`service.trust.shortcut.thresholds_from_honest`, e.g. the 99th percentile).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    share: float = Field(
        default=0.55, ge=0.0, le=1.0, description="Least share (fraction 0..1) of positive attribution outside."
    )
    concentration: float = Field(
        default=1.8, ge=0.0, description="Least share / area fraction of the region outside the anatomy."
    )
    edge_band: float = Field(
        default=0.08, ge=0.0, lt=0.5, description="Edge band counted as outside, fraction of each side."
    )


class OodSettings(_Strict):
    """The out-of-distribution signal (:mod:`service.trust.ood`); its statistics are ``auxiliary.ood_statistics``."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    layer: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][\w.]*$",
        description="Module whose input is the feature vector (dotted name); default: the last nn.Linear.",
    )
    distance: float | None = Field(
        default=None, gt=0.0, description="Mahalanobis distance overriding the calibrated threshold."
    )


class TrustSection(_Strict):
    """How the node judges whether a result can be believed."""

    shortcut: ShortcutSettings = ShortcutSettings()
    ood: OodSettings = OodSettings()


class ModelCard(_Strict):
    """A validated model card. Use :meth:`load`; ``folder`` is where the weight paths resolve."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    version: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._+-]+$")
    description: str = ""
    weights: dict[Runtime, WeightsFile] = Field(min_length=1)
    auxiliary: dict[AuxiliaryKind, AuxiliaryFile] = Field(
        default_factory=dict, description="Networks trained against the model that explainers use, by kind."
    )
    input: InputSection
    output: OutputSection
    target_layer: str | None = Field(default=None, description="Layer for CAM-family explainers (dotted module name).")
    applies_to: AppliesTo = AppliesTo()
    defaults: Defaults = Defaults()
    explain: ExplainSection = ExplainSection()
    trust: TrustSection = TrustSection()
    folder: Path = Field(default=Path("."), exclude=True)

    @model_validator(mode="after")
    def _torch_weights_name_their_architecture(self) -> ModelCard:
        torch_weights = self.weights.get("torch")
        if torch_weights is not None and torch_weights.architecture is None:
            raise ValueError("weights.torch needs 'architecture: package.module:ClassName' to rebuild the module")
        return self

    @model_validator(mode="after")
    def _findings_name_classes(self) -> ModelCard:
        findings = self.explain.findings
        if isinstance(findings, tuple):
            unknown = [name for name in findings if name not in self.output.classes]
            if unknown:
                raise ValueError(
                    f"explain.findings names {unknown}, which are not in output.classes {list(self.output.classes)}"
                )
        return self

    @model_validator(mode="after")
    def _ood_statistics_need_torch_weights(self) -> ModelCard:
        if "ood_statistics" in self.auxiliary and "torch" not in self.weights:
            raise ValueError(
                "auxiliary.ood_statistics needs weights.torch: the OOD features are read with a forward hook on the "
                f"eager module, and this card has only {', '.join(sorted(self.weights))} weights"
            )
        return self

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        """Read, validate and check the weight and auxiliary files of the card at ``path``."""
        card_path = Path(path)
        if card_path.is_dir():
            card_path = card_path / "model.yaml"
        try:
            text = card_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ModelCardError(f"model card not found: {card_path}") from None
        return cls._from_text(text, card_path)

    @classmethod
    def _from_text(cls, text: str, card_path: Path) -> ModelCard:
        """Validate the card ``text`` as if it were read from ``card_path`` (files resolve beside it)."""
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ModelCardError(f"model card {card_path} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ModelCardError(f"model card {card_path} must be a YAML mapping, got {type(raw).__name__}")
        try:
            card = cls(**raw, folder=card_path.parent)
        except ValidationError as exc:
            raise ModelCardError(f"model card {card_path} is invalid:\n{_explain(exc)}") from None
        card.verify_weights()
        card.verify_auxiliary()
        return card

    def weights_path(self, runtime: Runtime) -> Path:
        """Absolute path of the weights for ``runtime``; a clear error if the card has none."""
        if runtime not in self.weights:
            raise ModelCardError(
                f"model card {self.name} has no {runtime!r} weights; it has: {', '.join(sorted(self.weights))}"
            )
        return (self.folder / self.weights[runtime].file).resolve()

    def auxiliary_path(self, kind: str) -> Path:
        """Absolute path of the ``auxiliary`` file of ``kind``; a clear error if the card has none."""
        if kind not in self.auxiliary:
            listed = ", ".join(sorted(self.auxiliary)) or "none"
            raise ModelCardError(f"model card {self.name} has no auxiliary.{kind}; it has: {listed}")
        return (self.folder / self.auxiliary[kind].file).resolve()

    def verify_weights(self) -> None:
        """Every weight file exists and has the sha256 the card states."""
        for runtime, entry in self.weights.items():
            self._verify_file(
                f"{runtime} weights",
                self.weights_path(runtime),
                entry.sha256,
                "the weights changed without a new card (retrain or update the card)",
            )

    def verify_auxiliary(self) -> None:
        """Every auxiliary file exists and has the sha256 the card states."""
        for kind, entry in self.auxiliary.items():
            self._verify_file(
                f"auxiliary.{kind}",
                self.auxiliary_path(kind),
                entry.sha256,
                "the file changed without a new card entry (retrain it, which updates the entry, or update the card)",
            )

    def _verify_file(self, label: str, path: Path, expected: str, remedy: str) -> None:
        if not path.is_file():
            raise ModelCardError(f"model card {self.name}: {label} file missing: {path}")
        digest = sha256_of(path)
        if digest != expected:
            raise ModelCardError(
                f"model card {self.name}: sha256 of {path} is {digest}, the card says {expected} for {label}; {remedy}"
            )

    def class_index(self, name: str) -> int:
        """Index of class ``name`` in ``output.classes``; an error listing the valid names otherwise."""
        classes = self.output.classes
        if name not in classes:
            raise ModelCardError(f"unknown class {name!r} for model {self.name}; valid names: {', '.join(classes)}")
        return classes.index(name)

    def findings_to_explain(self, probabilities: Sequence[float]) -> list[int]:
        """Class indices to explain for one image, from its probabilities (card order), by
        ``explain.findings``: most probable first for ``top_k`` and ``all_positive``."""
        values = np.asarray(probabilities, dtype=np.float64)
        if values.shape != (len(self.output.classes),):
            raise ModelCardError(
                f"model card {self.name}: {values.shape} probabilities for {len(self.output.classes)} classes"
            )
        policy = self.explain
        order = [int(i) for i in np.argsort(-values, kind="stable")]
        if isinstance(policy.findings, tuple):
            return [self.class_index(name) for name in policy.findings]
        if policy.findings == "top_k":
            return order[: policy.top_k]
        classes = self.output.classes
        positive = [i for i in order if values[i] >= self.output.threshold(classes[i])]
        return positive[: policy.max_findings]

    def is_present(self, class_index: int, probability: float) -> bool:
        """Whether the class counts as present at ``probability`` (0..1): at or above its threshold."""
        return float(probability) >= self.output.threshold(self.output.classes[class_index])

    def applies_to_dataset(self, modality: str, sop_class_uid: str, body_part: str) -> str | None:
        """``None`` when the model applies to a series with these attributes, else the reason it does not."""
        rules = self.applies_to
        if rules.modalities and modality not in rules.modalities:
            return f"modality {modality or '(none)'} not in {list(rules.modalities)}"
        if rules.sop_classes and sop_class_uid not in rules.sop_classes:
            return f"SOP class {sop_class_uid} not in the card's list"
        if rules.body_parts and body_part.upper() not in rules.body_parts:
            return f"body part {body_part or '(none)'} not in {list(rules.body_parts)}"
        return None


def set_auxiliary_file(card_path: str | Path, kind: AuxiliaryKind, file: str | Path) -> ModelCard:
    """Point the card's ``auxiliary.<kind>`` at ``file`` (inside the card's folder) with the file's
    sha256 and rewrite the card, the rest of it as it was; returns the card as loaded. The new card
    is validated completely first: a card that would not load is not written."""
    card_path = Path(card_path)
    if card_path.is_dir():
        card_path = card_path / "model.yaml"
    if kind not in get_args(AuxiliaryKind):
        raise ModelCardError(f"unknown auxiliary kind {kind!r}; known: {', '.join(get_args(AuxiliaryKind))}")
    path = Path(file).resolve()
    try:
        relative = path.relative_to(card_path.parent.resolve())
    except ValueError:
        raise ModelCardError(
            f"auxiliary.{kind} file {path} is not inside the folder of the model card {card_path}"
        ) from None
    raw = yaml.safe_load(card_path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise ModelCardError(f"model card {card_path} must be a YAML mapping, got {type(raw).__name__}")
    auxiliary = {**(raw.get("auxiliary") or {}), kind: {"file": relative.as_posix(), "sha256": sha256_of(path)}}
    updated: dict[str, object] = {}
    for key, value in raw.items():
        if key != "auxiliary":
            updated[key] = value
        if key == "weights":  # the auxiliary files follow the weights
            updated["auxiliary"] = auxiliary
    updated.setdefault("auxiliary", auxiliary)
    text = yaml.safe_dump(updated, sort_keys=False)
    ModelCard._from_text(text, card_path)
    card_path.write_text(text, encoding="utf-8")
    return ModelCard.load(card_path)


def sha256_of(path: Path) -> str:
    """Lower-case hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _explain(exc: ValidationError) -> str:
    """One line per problem: where in the card, what is wrong, the value found."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        found = error.get("input")
        shown = repr(found) if not isinstance(found, dict) else "{...}"
        lines.append(f"  - {where}: {error['msg']} (found {shown[:80]})")
    return "\n".join(lines)
