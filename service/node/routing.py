"""Routing: which model, explainers, outputs and destinations take each received instance.

The configuration's ``routes`` are ordered rules (:class:`~service.node.config.RouteConfig`). A rule
takes an instance when every attribute its ``match`` names matches (:class:`Matcher`); the first
rule that takes it wins, unless that rule says ``continue: true``, in which case the later rules
are tried too (an instance may then be explained by several models). Without ``routes`` there is
one implicit rule named ``default``: the configured ``model`` (or the demo model) for the series
its card's ``applies_to`` names, with the ``explain`` section's methods and outputs, to every
destination; that is what the node did before routing existed.

Each model card is loaded once (:class:`ModelRegistry`, keyed by the card file) and shared by every
rule that names it; each distinct (card, methods, outputs, settings) gets one
:class:`~service.node.pipeline.ExplainPipeline` (a 2D card, frame by frame) or one
:class:`~service.node.volume.VolumePipeline` (a card with ``input.kind: volume``: the processor
gives it the whole series as one volume). The explicit rules are the site's decision: the
card's own ``applies_to`` is not applied again to what they route.

What no rule takes is not kept: the processor journals it as skipped ("not routed"), deletes its
spool file and counts it (see :mod:`service.node.processor`). A PACS that sends whole studies also
sends objects no model reads (SR, presentation states, key object selections, RT objects,
waveforms, encapsulated PDF); they are accepted like any instance and leave the same way.

Texts shown in logs and the journal carry UIDs and coded attributes only; the free-text
attributes (Series Description, Protocol Name) are shown only by ``pacs-xai route`` on the
operator's own files.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from dicom_io.errors import DicomInputError
from dicom_io.pixels import read_every_element
from service.explain import ExplainerError, get_explainer
from service.explain.registry import available_explainers
from service.inference.card import ModelCard, ModelCardError
from service.inference.deployed import DeployedModel, PoolSettings
from service.inference.pool import PoolMetrics
from service.inference.triton import TritonSettings
from service.models import demo_card_path
from service.node.config import ConfigError, DestinationConfig, NodeConfig, RangeConfig, RouteMatchConfig
from service.node.pipeline import ExplainPipeline, PipelineConfigError, card_settings
from service.node.volume import VOLUME_OUTPUTS, VolumePipeline, volume_methods

log = logging.getLogger(__name__)

#: The name of the implicit rule of a configuration without ``routes``.
DEFAULT_ROUTE = "default"
#: ``pacsxai_instances_discarded_total{reason}``: an object without pixels (SR, PR, KOS, RT plan or
#: structure set, waveform, PDF) or an image, that no rule takes.
DISCARD_REASONS = ("not_an_image", "no_route")

#: Text attributes: (match key, DICOM keyword shown, free text that may describe a patient).
_TEXT_ATTRIBUTES = (
    ("modality", "Modality", False),
    ("body_part_examined", "BodyPartExamined", False),
    ("sop_class_uid", "SOPClassUID", False),
    ("series_description", "SeriesDescription", True),
    ("protocol_name", "ProtocolName", True),
    ("manufacturer", "Manufacturer", False),
    ("calling_ae_title", "calling AE title", False),
)
#: Count attributes: (match key, name shown).
_RANGE_ATTRIBUTES = (("rows", "Rows"), ("columns", "Columns"), ("instances", "instances in the series"))
_LITERAL_UID = re.compile(r"[0-9.]+")


class RouteError(ConfigError):
    """A routing rule cannot be used; the message names the rule (index and name) and the value."""


@dataclass(frozen=True)
class InstanceFacts:
    """What routing looks at for one instance: its header attributes and where it came from.

    Absent text attributes are ``""``; absent Rows/Columns are ``None``. ``instances`` is the number
    of instances of its series: in the node, those journaled so far (earlier batches of the series
    included); in ``pacs-xai route``, the files given.
    """

    sop_instance_uid: str
    series_instance_uid: str
    modality: str = ""
    body_part_examined: str = ""
    sop_class_uid: str = ""
    series_description: str = ""
    protocol_name: str = ""
    manufacturer: str = ""
    calling_ae_title: str = ""
    rows: int | None = None
    columns: int | None = None
    instances: int = 1

    @classmethod
    def from_dataset(cls, ds: Dataset, *, instances: int = 1, calling_ae_title: str = "") -> InstanceFacts:
        """The facts of a dataset (a header read without pixels is enough)."""

        def text(keyword: str) -> str:
            try:
                value = ds.get(keyword, "")
            except (ValueError, TypeError):  # a malformed element fails only when read
                return ""
            return str(value or "").strip()

        def count(keyword: str) -> int | None:
            try:
                value = ds.get(keyword)
                return None if value is None else int(value)
            except (ValueError, TypeError):
                return None

        return cls(
            sop_instance_uid=text("SOPInstanceUID"),
            series_instance_uid=text("SeriesInstanceUID"),
            modality=text("Modality"),
            body_part_examined=text("BodyPartExamined"),
            sop_class_uid=text("SOPClassUID"),
            series_description=text("SeriesDescription"),
            protocol_name=text("ProtocolName"),
            manufacturer=text("Manufacturer"),
            calling_ae_title=calling_ae_title.strip(),
            rows=count("Rows"),
            columns=count("Columns"),
            instances=instances,
        )

    @property
    def is_image(self) -> bool:
        """Whether the object has an image matrix (Rows present): SR, KOS, PR, waveforms, PDF have none."""
        return self.rows is not None


def read_header(path: str | os.PathLike) -> Dataset:
    """The dataset at ``path`` without its pixel data, every element converted (a lying VR or length
    fails here, naming the element: :func:`~dicom_io.pixels.read_every_element`);
    :class:`DicomInputError` naming the file otherwise."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many kinds on damaged files; its text may quote a value
        raise DicomInputError(
            f"{os.fspath(path)}: cannot read the DICOM header ({type(exc).__name__}); resend the original file"
        ) from exc
    read_every_element(ds, os.fspath(path))
    return ds


@dataclass(frozen=True)
class Mismatch:
    """The first attribute of a rule that an instance does not have: its name, its value, what was expected."""

    attribute: str
    value: str | int | None
    expected: str
    free_text: bool = False
    relation: str = "does not match"

    def describe(self, *, reveal_free_text: bool = True) -> str:
        """``Modality 'CT' does not match 'CR|DX'``, ``Rows 128 is not >= 512``; free text is hidden
        unless ``reveal_free_text``."""
        if self.value is None or self.value == "":
            shown = "absent"
        elif self.free_text and not reveal_free_text:
            shown = "(free text, not shown)"
        else:
            shown = repr(self.value)
        return f"{self.attribute} {shown} {self.relation} {self.expected}"


def _compile(expressions: str | tuple[str, ...]) -> tuple[re.Pattern[str], ...]:
    """Full-match, case-insensitive patterns; a bare UID (digits and dots) matches only itself."""
    items = (expressions,) if isinstance(expressions, str) else expressions
    return tuple(re.compile(re.escape(item) if _LITERAL_UID.fullmatch(item) else item, re.IGNORECASE) for item in items)


def _shown(expressions: str | tuple[str, ...]) -> str:
    return repr(expressions) if isinstance(expressions, str) else f"any of {list(expressions)}"


def _shown_range(bounds: RangeConfig) -> str:
    if bounds.min is not None and bounds.max is not None:
        return f"in {bounds.min}..{bounds.max}"
    if bounds.min is None and bounds.max is None:
        return "present"
    return f">= {bounds.min}" if bounds.min is not None else f"<= {bounds.max}"


class Matcher:
    """A rule's ``match`` section compiled once; :meth:`first_mismatch` checks an instance against it."""

    def __init__(self, match: RouteMatchConfig) -> None:
        self.match = match
        self._text = [
            (key, keyword, free, _compile(getattr(match, key)), _shown(getattr(match, key)))
            for key, keyword, free in _TEXT_ATTRIBUTES
            if getattr(match, key) is not None
        ]
        self._ranges = [
            (key, name, getattr(match, key)) for key, name in _RANGE_ATTRIBUTES if getattr(match, key) is not None
        ]

    def first_mismatch(self, facts: InstanceFacts) -> Mismatch | None:
        """``None`` when the instance has every attribute the rule asks for, else the first that differs."""
        for key, keyword, free, patterns, shown in self._text:
            value = getattr(facts, key)
            if not any(pattern.fullmatch(value) for pattern in patterns):
                return Mismatch(keyword, value, shown, free)
        for key, name, bounds in self._ranges:
            value = getattr(facts, key)
            if not bounds.contains(value):
                return Mismatch(name, value, _shown_range(bounds), relation="is not")
        return None


@dataclass(frozen=True)
class RouteRule:
    """One compiled rule: what it takes and what it names (no model loaded yet)."""

    index: int
    name: str
    matcher: Matcher
    card_path: Path
    methods: tuple[str, ...] | None = None
    outputs: tuple[str, ...] | None = None
    method_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    destinations: tuple[DestinationConfig, ...] = ()
    continue_: bool = False
    #: The rule of a config without ``routes``, made from ``model`` and ``explain``.
    implicit: bool = False
    #: For a volume card's ``sc`` output: only the slices with the most positive attribution
    #: (None: one Secondary Capture per source slice).
    key_slices: int | None = None

    @property
    def label(self) -> str:
        """How errors name the rule: ``routes[1] (ct-head)``, or the sections the implicit rule comes from."""
        return "model/explain (no routes configured)" if self.implicit else f"routes[{self.index}] ({self.name})"


@dataclass(frozen=True)
class RuleVerdict:
    """What one rule said about an instance: taken, or the first mismatch, or not reached."""

    rule: RouteRule
    taken: bool
    mismatch: Mismatch | None = None
    #: An earlier rule took the instance without ``continue``: this one was not consulted.
    not_reached: bool = False

    def describe(self, *, reveal_free_text: bool = True) -> str:
        if self.taken:
            return f"{self.rule.name}: taken"
        if self.not_reached:
            return f"{self.rule.name}: not reached (an earlier rule took it; no continue)"
        assert self.mismatch is not None
        return f"{self.rule.name}: {self.mismatch.describe(reveal_free_text=reveal_free_text)}"


#: What every rule says about an object without pixels: no model reads it, whatever the rule's match.
NOT_AN_IMAGE = Mismatch("Rows", None, "not an image: no rule takes an object without pixels", relation="-")


def evaluate(rules: Sequence[RouteRule], facts: InstanceFacts) -> list[RuleVerdict]:
    """Every rule's verdict on ``facts``, in order: first match wins unless it says ``continue``.

    An object without an image matrix (no Rows: SR, KOS, presentation state, waveform, PDF, RT
    plan) is taken by no rule, not even one that matches everything: no model reads it.
    """
    if not facts.is_image:
        return [RuleVerdict(rule, taken=False, mismatch=NOT_AN_IMAGE) for rule in rules]
    verdicts: list[RuleVerdict] = []
    stopped = False
    for rule in rules:
        if stopped:
            verdicts.append(RuleVerdict(rule, taken=False, not_reached=True))
            continue
        mismatch = rule.matcher.first_mismatch(facts)
        verdicts.append(RuleVerdict(rule, taken=mismatch is None, mismatch=mismatch))
        if mismatch is None and not rule.continue_:
            stopped = True
    return verdicts


def select(rules: Sequence[RouteRule], facts: InstanceFacts) -> list[RouteRule]:
    """The rules that take ``facts``, in order (empty: no rule takes it)."""
    return [verdict.rule for verdict in evaluate(rules, facts) if verdict.taken]


def why_not_routed(verdicts: Iterable[RuleVerdict]) -> str:
    """One line for the journal and logs: each rule's first mismatch, free text hidden."""
    return "; ".join(verdict.describe(reveal_free_text=False) for verdict in verdicts) or "no routes"


def card_file(path: str | os.PathLike) -> Path:
    """The card's YAML file, absolute (a folder means its ``model.yaml``): the identity of a model."""
    resolved = Path(path).expanduser().resolve()
    return resolved / "model.yaml" if resolved.is_dir() else resolved


def default_card_path(config: NodeConfig) -> Path:
    """The card of the ``model`` section: ``model.card``, else the demo model's."""
    return card_file(config.model.card or demo_card_path())


def compile_rules(config: NodeConfig, load_card: Callable[[Path], ModelCard] = ModelCard.load) -> tuple[RouteRule, ...]:
    """The configuration's rules, compiled; without ``routes``, the implicit ``default`` rule (which
    reads the default card's ``applies_to``, so ``load_card`` is called once)."""
    by_name = {d.name: d for d in config.destinations}
    if not config.routes:
        card_path = default_card_path(config)
        try:
            applies = load_card(card_path).applies_to
        except ModelCardError as exc:
            raise RouteError(f"model.card: {exc}") from None
        match = RouteMatchConfig(
            modality=tuple(re.escape(m) for m in applies.modalities) or None,
            sop_class_uid=applies.sop_classes or None,
            body_part_examined=tuple(re.escape(b) for b in applies.body_parts) or None,
        )
        return (
            RouteRule(
                index=0,
                name=DEFAULT_ROUTE,
                matcher=Matcher(match),
                card_path=card_path,
                methods=config.explain.methods,
                outputs=config.explain.outputs,
                method_params=config.explain.method_params,
                destinations=tuple(config.destinations),
                implicit=True,
            ),
        )
    rules = []
    for index, route in enumerate(config.routes):
        names = route.destinations
        rules.append(
            RouteRule(
                index=index,
                name=route.name,
                matcher=Matcher(route.match),
                card_path=card_file(route.model) if route.model is not None else default_card_path(config),
                methods=route.methods or config.explain.methods,
                outputs=route.outputs or config.explain.outputs,
                method_params={**config.explain.method_params, **route.method_params},
                destinations=tuple(config.destinations) if names is None else tuple(by_name[n] for n in names),
                continue_=route.continue_,
                key_slices=route.key_slices,
            )
        )
    return tuple(rules)


def triton_settings(config: NodeConfig) -> TritonSettings | None:
    """The Triton client settings of ``model.triton_url``, or ``None``: the model runs in this process.

    No client-side request cap: the server's own ``max_batch_size`` bounds each request (the client
    reads it), and ``pool.max_batch`` already bounds the predictions' calls; a cap below the server's
    would only add round trips, since Triton's dynamic batcher merges the requests again."""
    if not config.model.triton_url:
        return None
    return TritonSettings(config.model.triton_url, timeout_seconds=config.model.triton_timeout_seconds)


class ModelRegistry:
    """Deployed models keyed by card file: each card loads once, whatever number of rules name it."""

    def __init__(
        self,
        *,
        device: str = "auto",
        pool: PoolSettings | None = None,
        metrics: PoolMetrics | None = None,
        triton: TritonSettings | None = None,
    ) -> None:
        self._device = device
        self._pool = pool
        self._metrics = metrics
        self._triton = triton
        self._models: dict[Path, DeployedModel] = {}

    def add(self, path: str | os.PathLike, model: DeployedModel) -> None:
        """Use an already loaded ``model`` for the card at ``path``."""
        self._models[card_file(path)] = model

    def get(self, path: str | os.PathLike) -> DeployedModel:
        """The model of the card at ``path``, loaded (and validated) on first use."""
        key = card_file(path)
        model = self._models.get(key)
        if model is None:
            model = DeployedModel.from_card_path(
                key, device=self._device, pool=self._pool, metrics=self._metrics, triton=self._triton
            )
            self._models[key] = model
        return model

    def models(self) -> list[DeployedModel]:
        """The loaded models, in loading order."""
        return list(self._models.values())

    def close(self) -> None:
        """Stop every model's inference pool."""
        for model in self._models.values():
            model.close()


#: What a rule runs: frame by frame (a 2D card) or the whole series as one volume (a volume card).
Pipeline = ExplainPipeline | VolumePipeline


@dataclass(frozen=True)
class RouteTarget:
    """A rule with what it runs: the pipeline (model, explainers, outputs) and its destinations."""

    rule: RouteRule
    pipeline: Pipeline

    @property
    def name(self) -> str:
        return self.rule.name

    @property
    def is_volume(self) -> bool:
        """Whether the rule explains whole series as one volume (its card has ``input.kind: volume``)."""
        return isinstance(self.pipeline, VolumePipeline)

    @property
    def destinations(self) -> tuple[DestinationConfig, ...]:
        return self.rule.destinations


class Router:
    """The compiled rules with their pipelines; :meth:`route` says which take an instance."""

    def __init__(self, targets: Sequence[RouteTarget]) -> None:
        if not targets:
            raise RouteError("a router needs at least one route")
        self.targets = tuple(targets)
        self.rules = tuple(target.rule for target in self.targets)
        #: Whether any rule matches on ``instances`` (then the caller counts the series' instances).
        self.reads_instance_count = any(rule.matcher.match.instances is not None for rule in self.rules)
        self._by_name = {target.name: target for target in self.targets}

    @classmethod
    def build(cls, config: NodeConfig, models: ModelRegistry) -> Router:
        """Compile the rules, load each card once and build each distinct pipeline once; a wrong rule
        or card is a :class:`RouteError` naming the rule and the value."""
        rules = compile_rules(config, lambda path: models.get(path).card)
        pipelines: dict[tuple, Pipeline] = {}
        targets = []
        for rule in rules:
            try:
                model = models.get(rule.card_path)
            except ModelCardError as exc:
                raise RouteError(f"{rule.label}: {exc}") from None
            card = model.card
            methods = rule.methods or card.defaults.methods
            outputs = rule.outputs or card.defaults.outputs
            key = (
                rule.card_path,
                methods,
                outputs,
                repr(sorted((k, sorted(v.items())) for k, v in rule.method_params.items())),
                rule.key_slices,
            )
            if key not in pipelines:
                try:
                    pipelines[key] = _pipeline(model, methods, outputs, rule)
                except (ExplainerError, PipelineConfigError, ModelCardError, ValueError) as exc:
                    raise RouteError(f"{rule.label}: {exc}") from None
            targets.append(RouteTarget(rule, pipelines[key]))
        return cls(targets)

    @classmethod
    def single(cls, pipeline: Pipeline, destinations: Sequence[DestinationConfig]) -> Router:
        """One rule named ``default`` that takes everything: the given pipeline (which applies its
        card's ``applies_to`` itself) to every destination."""
        rule = RouteRule(
            index=0,
            name=DEFAULT_ROUTE,
            matcher=Matcher(RouteMatchConfig()),
            card_path=Path(pipeline.model.card.folder) / "model.yaml",
            destinations=tuple(destinations),
        )
        return cls([RouteTarget(rule, pipeline)])

    def route(self, facts: InstanceFacts) -> tuple[list[RouteTarget], list[RuleVerdict]]:
        """The targets that take ``facts`` (in rule order) and every rule's verdict."""
        verdicts = evaluate(self.rules, facts)
        return [self._by_name[v.rule.name] for v in verdicts if v.taken], verdicts

    def pipelines(self) -> list[Pipeline]:
        """Each distinct pipeline once, in rule order."""
        seen: dict[int, Pipeline] = {}
        for target in self.targets:
            seen.setdefault(id(target.pipeline), target.pipeline)
        return list(seen.values())

    def models(self) -> list[DeployedModel]:
        """Each model the rules use once, in rule order."""
        seen: dict[int, DeployedModel] = {}
        for pipeline in self.pipelines():
            seen.setdefault(id(pipeline.model), pipeline.model)
        return list(seen.values())


def _pipeline(model: DeployedModel, methods: Sequence[str], outputs: Sequence[str], rule: RouteRule) -> Pipeline:
    """The pipeline of a rule: a volume card's whole series at once, a 2D card's frame by frame."""
    if model.card.input.kind == "volume":
        return VolumePipeline(
            model,
            methods,
            outputs,
            method_params=rule.method_params,
            key_slices=rule.key_slices,
            enforce_applies_to=False,
        )
    if rule.key_slices is not None:
        raise PipelineConfigError(
            f"key_slices is for volume models; {model.card.name} takes input.kind: {model.card.input.kind}"
        )
    return ExplainPipeline(model, methods, outputs, method_params=rule.method_params, enforce_applies_to=False)


@dataclass(frozen=True)
class CheckedRule:
    """A rule as ``pacs-xai config check`` sees it: its card and what it will run."""

    rule: RouteRule
    card: ModelCard
    methods: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass
class RulesCheck:
    """The outcome of :func:`check_rules`: the rules that can run, every error and every warning."""

    rules: list[CheckedRule] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check_rules(config: NodeConfig, load_card: Callable[[Path], ModelCard] = ModelCard.load) -> RulesCheck:
    """Every rule of ``config`` checked without loading a runner: its card loads (files, sha256),
    its methods exist and accept their settings with the card's; each problem is one line naming
    the rule (index and name) and the value. Each card is read once."""
    check = RulesCheck()
    cards: dict[Path, ModelCard | str] = {}

    def card_of(path: Path) -> ModelCard | str:
        if path not in cards:
            try:
                cards[path] = load_card(path)
            except ModelCardError as exc:
                cards[path] = str(exc)
        return cards[path]

    try:
        rules = compile_rules(config, lambda path: _loaded(card_of(path)))
    except RouteError as exc:
        check.errors.append(str(exc))
        return check
    for rule in rules:
        card = card_of(rule.card_path)
        if isinstance(card, str):
            check.errors.append(f"{rule.label}: {card}")
            continue
        methods = rule.methods or card.defaults.methods
        outputs = rule.outputs or card.defaults.outputs
        for method in methods:
            try:
                get_explainer(method, **{**card_settings(card, method), **rule.method_params.get(method, {})})
            except (ExplainerError, ModelCardError, TypeError, ValueError) as exc:
                check.errors.append(f"{rule.label}: method {method!r}: {exc}")
        check.errors.extend(f"{rule.label}: {problem}" for problem in _volume_problems(card, methods, outputs, rule))
        unknown = [name for name in rule.method_params if name not in methods]
        if unknown:
            check.warnings.append(f"{rule.label}: method_params for {unknown}, which the route does not run")
        match = rule.matcher.match
        if card.applies_to.modalities and match.modality is None and match.sop_class_uid is None:
            check.warnings.append(
                f"{rule.label}: takes every modality, but its card {card.name} applies to "
                f"{list(card.applies_to.modalities)}; add match.modality"
            )
        check.rules.append(CheckedRule(rule, card, tuple(methods), tuple(outputs)))
    for index, rule in enumerate(rules[:-1]):
        if not rule.continue_ and not _restricts(rule.matcher.match):
            later = ", ".join(r.name for r in rules[index + 1 :])
            check.warnings.append(f"{rule.label}: matches everything, so the later rules never run ({later})")
    return check


def _volume_problems(card: ModelCard, methods: Sequence[str], outputs: Sequence[str], rule: RouteRule) -> list[str]:
    """What a volume card's rule asks for that the volume pipeline does not have (and key_slices on a 2D card)."""
    if card.input.kind != "volume":
        return [] if rule.key_slices is None else [f"key_slices is for volume models; {card.name} is 2D"]
    problems = []
    flat = [method for method in methods if method in available_explainers() and method not in volume_methods()]
    if flat:
        problems.append(
            f"{', '.join(flat)} cannot explain volumes ({card.name} takes input.kind: volume); "
            f"methods that can: {', '.join(volume_methods())}"
        )
    unknown = [kind for kind in outputs if kind not in VOLUME_OUTPUTS]
    if unknown:
        problems.append(f"output kind(s) {unknown} not made for volumes; available: {list(VOLUME_OUTPUTS)}")
    return problems


def _loaded(card: ModelCard | str) -> ModelCard:
    if isinstance(card, str):
        raise RouteError(f"model.card: {card}")
    return card


def _restricts(match: RouteMatchConfig) -> bool:
    """Whether a ``match`` section names any attribute at all."""
    return any(getattr(match, key) is not None for key in RouteMatchConfig.model_fields)
