"""The node's configuration: one YAML file, environment overrides, command-line flags on top.

Precedence, highest first: command-line flags (``pacs-xai serve --port ...``), environment
variables with prefix ``PACS_XAI_`` and ``__`` between levels (``PACS_XAI_LISTENER__PORT=11113``),
the YAML file, the defaults below. With no file at all the node runs on the defaults: the demo
model, AE title PACSXAI on port 11112, data in ``./var``.

Every field carries a description; ``pacs-xai config example`` prints them all as a commented
YAML file, so the example can never fall behind the code. A wrong config is one error at
start-up that lists every problem with its place in the file and the value found.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from pydicom.uid import UID

from dicom_io.compression import LOSSLESS_SYNTAXES, lossless_syntax
from dicom_io.net.scp import DEFAULT_MAX_INSTANCE_BYTES
from dicom_io.net.scu import Destination
from dicom_io.output_kinds import OUTPUT_KINDS

#: AE titles: 1-16 characters of the default repertoire, no backslash or control characters.
_AE_TITLE = r"^[^\\\x00-\x1f]{1,16}$"


#: Most processes of one kind (receivers or workers) a node runs.
MAX_PROCESSES = 64


def _check_processes(value: int | str) -> int | str:
    # 0 (a box of only workers, or only receivers) is checked against queue.redis_url by NodeConfig.
    if value != "auto" and not (isinstance(value, int) and 0 <= value <= MAX_PROCESSES):
        raise ValueError(f"processes must be 'auto' or an integer 0-{MAX_PROCESSES}, got {value!r}")
    return value


def available_cores(cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPU cores this process may use, at least 1: its CPU affinity, capped by a cgroup v2 CPU quota
    (a container's CPU limit: ``cpu.max`` = "200000 100000" is 2 cores) when there is one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):  # no cgroup v2 quota here
        pass
    return max(1, cores)


def resolve_processes(config: NodeConfig, cores: int | None = None) -> tuple[int, int]:
    """(receiver processes, worker processes) with ``auto`` resolved from ``cores`` (default: the
    cores available): receivers min(4, cores), workers min(8, cores)."""
    cores = available_cores() if cores is None else cores
    receivers = config.listener.processes
    workers = config.workers.processes
    return (
        min(4, cores) if receivers == "auto" else int(receivers),
        min(8, cores) if workers == "auto" else int(workers),
    )


class ConfigError(ValueError):
    """The configuration cannot be used; the message lists each problem."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenerConfig(_Section):
    """The DICOM listener (Storage SCP)."""

    ae_title: str = Field(
        "PACSXAI", pattern=_AE_TITLE, description="Our AE title; associations calling another are rejected."
    )
    bind_address: str = Field("127.0.0.1", description="Address to listen on; 0.0.0.0 for every interface.")
    port: int = Field(11112, ge=0, le=65535, description="TCP port for DICOM (0 picks a free one).")
    max_associations: int = Field(10, ge=1, description="Associations served at the same time.")
    max_pdu: int = Field(0, ge=0, description="Maximum PDU length we receive, bytes; 0 = unlimited.")
    acse_timeout: float = Field(30, gt=0, description="Seconds to wait for association messages.")
    dimse_timeout: float = Field(60, gt=0, description="Seconds to wait for DIMSE messages.")
    network_timeout: float = Field(60, gt=0, description="Seconds of network silence before an association is aborted.")
    max_associations_per_host: int | None = Field(
        None,
        ge=1,
        description="Connections one calling address may hold at once; omit for max_associations - 2 (at least 1).",
    )
    max_instance_bytes: int = Field(
        DEFAULT_MAX_INSTANCE_BYTES,
        ge=1,
        description="Largest data set accepted by C-STORE, bytes; a larger one is answered 0xA700 and never kept.",
    )
    processes: int | Literal["auto"] = Field(
        "auto",
        description="Receiver processes sharing the DICOM port (SO_REUSEPORT), each its own AE; auto = "
        "min(4, cores). With listener.processes and workers.processes both 1 the node is one process.",
    )

    @field_validator("processes")
    @classmethod
    def _processes_in_range(cls, value: int | str) -> int | str:
        return _check_processes(value)

    @model_validator(mode="after")
    def _per_host_within_total(self) -> ListenerConfig:
        if self.max_associations_per_host is not None and self.max_associations_per_host > self.max_associations:
            raise ValueError(
                f"max_associations_per_host ({self.max_associations_per_host}) is larger than max_associations "
                f"({self.max_associations}): lower it or raise max_associations"
            )
        return self


class AllowedCallerConfig(_Section):
    """A calling AE allowed to associate."""

    ae_title: str = Field(pattern=_AE_TITLE, description="Calling AE title.")
    host: str | None = Field(None, description="Only from this IP address; omit for any host.")


class TlsConfig(_Section):
    """TLS for the listener. With client_ca set, clients must present a certificate signed by it."""

    certificate: Path = Field(description="Server certificate (PEM).")
    private_key: Path = Field(description="Server private key (PEM).")
    client_ca: Path | None = Field(None, description="CA bundle (PEM) for client certificates: enables mutual TLS.")

    @model_validator(mode="after")
    def _files_exist(self) -> TlsConfig:
        for name in ("certificate", "private_key", "client_ca"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"tls.{name}: file not found: {path}")
        return self


class DestinationConfig(_Section):
    """Where results are sent (a PACS, a workstation)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Name used in the journal, logs and metrics.")
    ae_title: str = Field(pattern=_AE_TITLE, description="The destination's AE title.")
    host: str = Field(description="Host name or IP address.")
    port: int = Field(ge=1, le=65535, description="TCP port.")
    outputs: tuple[str, ...] | None = Field(
        None, description=f"Output kinds sent here ({', '.join(OUTPUT_KINDS)}); omit for all."
    )
    transfer_syntaxes: tuple[str, ...] = Field(
        # Deflated by default: OHIF (3.x, from Orthanc's DICOMweb) showed no image for a JPEG-LS RGB
        # Secondary Capture (the browser test found it); deflate leaves the pixels plain for every viewer.
        ("deflated",),
        description=f"Lossless compressed transfer syntaxes proposed to this destination, preferred first "
        f"({', '.join(LOSSLESS_SYNTAXES)}); uncompressed is always proposed last. Outputs are stored "
        "compressed in the first pixel codec the destinations list (deflated is used on the wire only); "
        "[] sends everything uncompressed. Check a pixel codec with the site's viewers before listing it.",
    )

    @field_validator("transfer_syntaxes")
    @classmethod
    def _known_syntaxes(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        for name in names:
            lossless_syntax(name)
        return names

    def syntaxes(self) -> tuple[UID, ...]:
        """The transfer syntaxes of :attr:`transfer_syntaxes`."""
        return tuple(lossless_syntax(name) for name in self.transfer_syntaxes)

    def to_destination(self) -> Destination:
        return Destination(ae_title=self.ae_title, host=self.host, port=self.port, transfer_syntaxes=self.syntaxes())


class AssemblyConfig(_Section):
    """When a series counts as complete."""

    idle_seconds: float = Field(
        5.0,
        gt=0,
        description="Ready this long after its last instance, once its associations ended or moved on to "
        "another series.",
    )
    max_wait_seconds: float = Field(300.0, gt=0, description="Ready at the latest this long after its first instance.")

    @model_validator(mode="after")
    def _max_wait_not_below_idle(self) -> AssemblyConfig:
        if self.max_wait_seconds < self.idle_seconds:
            raise ValueError(
                f"max_wait_seconds ({self.max_wait_seconds}) must be >= idle_seconds ({self.idle_seconds})"
            )
        return self


class ModelConfig(_Section):
    """The deployed model."""

    card: Path | None = Field(None, description="Model card YAML (or its folder); omit for the built-in demo model.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto uses CUDA when present.")
    warm_up: bool = Field(
        True,
        description="At start-up, explain one synthetic radiograph (a small synthetic CT series for a volume "
        "card) with every configured method and output (in the background, nothing kept), so the first study "
        "does not pay for lazy initialisation.",
    )
    triton_url: str | None = Field(
        None,
        description="gRPC host:port of a Triton Inference Server serving this node's model graphs (pacs-xai triton "
        "export/serve); omit to run the model in each worker process with the in-process pool.",
    )
    triton_timeout_seconds: float = Field(60.0, gt=0, description="Seconds one request to Triton may take.")


class ExplainConfig(_Section):
    """Which explainers run and which objects are written."""

    methods: tuple[str, ...] | None = Field(
        None, description="Explainer registry names; omit for the model card's defaults."
    )
    outputs: tuple[str, ...] | None = Field(
        None, description=f"Output kinds ({', '.join(OUTPUT_KINDS)}); omit for the card's."
    )
    method_params: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-method settings, e.g. {occlusion: {window: 32}}."
    )

    @field_validator("outputs")
    @classmethod
    def _known_outputs(cls, outputs: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return _known_output_kinds(outputs)


def _known_output_kinds(outputs: tuple[str, ...] | None) -> tuple[str, ...] | None:
    unknown = [kind for kind in outputs or () if kind not in OUTPUT_KINDS]
    if unknown:
        raise ValueError(f"unknown output kind(s) {unknown}; choose from {list(OUTPUT_KINDS)}")
    return outputs


class RangeConfig(_Section):
    """An inclusive range of a count (pixels, instances); omit an end for no bound."""

    min: int | None = Field(None, ge=0, description="Smallest value taken; omit for no lower bound.")
    max: int | None = Field(None, ge=0, description="Largest value taken; omit for no upper bound.")

    @model_validator(mode="after")
    def _ordered(self) -> RangeConfig:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) must be <= max ({self.max})")
        return self

    def contains(self, value: int | None) -> bool:
        """Whether ``value`` lies in the range (an absent value lies in no bounded range)."""
        if value is None:
            return self.min is None and self.max is None
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


#: A text matcher: one regular expression, or a list of them (any may match).
TextMatcher = str | tuple[str, ...]


class RouteMatchConfig(_Section):
    """Which instances a route takes: every key given must match (AND); an omitted key matches anything.

    Text keys are Python regular expressions that must match the whole value, ignoring case
    (``CR|DX``, ``.*chest.*``); a list means any of them. An absent attribute is the empty text.
    """

    modality: TextMatcher | None = Field(None, description="Modality (0008,0060), e.g. 'CR|DX'.")
    body_part_examined: TextMatcher | None = Field(None, description="Body Part Examined (0018,0015), e.g. CHEST.")
    sop_class_uid: TextMatcher | None = Field(
        None, description="SOP Class UID (0008,0016); a bare UID (digits and dots) matches only itself."
    )
    series_description: TextMatcher | None = Field(None, description="Series Description (0008,103E).")
    protocol_name: TextMatcher | None = Field(None, description="Protocol Name (0018,1030).")
    manufacturer: TextMatcher | None = Field(None, description="Manufacturer (0008,0070).")
    calling_ae_title: TextMatcher | None = Field(None, description="AE title of the sender that stored the instance.")
    rows: RangeConfig | None = Field(None, description="Rows (0028,0010) of the image, {min, max}.")
    columns: RangeConfig | None = Field(None, description="Columns (0028,0011) of the image, {min, max}.")
    instances: RangeConfig | None = Field(
        None, description="Instances of the series received so far (re-sent ones once), {min, max}."
    )

    @field_validator(
        "modality",
        "body_part_examined",
        "sop_class_uid",
        "series_description",
        "protocol_name",
        "manufacturer",
        "calling_ae_title",
    )
    @classmethod
    def _valid_expressions(cls, value: TextMatcher | None) -> TextMatcher | None:
        for expression in (value,) if isinstance(value, str) else value or ():
            try:
                re.compile(expression)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {expression!r} ({exc})") from None
        return value


class RouteConfig(_Section):
    """One routing rule: which instances (``match``) go to which model, methods, outputs, destinations."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field(
        pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Name used in logs and metrics (the 'route' label)."
    )
    match: RouteMatchConfig = Field(
        default_factory=RouteMatchConfig, description="Attributes the instance must have; omit to take everything."
    )
    model: Path | None = Field(
        None, description="Model card YAML (or its folder) for this route; omit for model.card (or the demo model)."
    )
    methods: tuple[str, ...] | None = Field(None, description="Explainers; omit for explain.methods, else the card's.")
    outputs: tuple[str, ...] | None = Field(
        None, description=f"Output kinds ({', '.join(OUTPUT_KINDS)}); omit for explain.outputs, else the card's."
    )
    method_params: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-method settings, over explain.method_params."
    )
    destinations: tuple[str, ...] | None = Field(
        None, description="Names of destinations that get this route's results; omit for all."
    )
    continue_: bool = Field(
        False,
        alias="continue",
        description="After taking an instance, go on to the later rules too (else the first match wins).",
    )
    key_slices: int | None = Field(
        None,
        ge=1,
        description="Volume models only: the sc output for just this many slices, those with the most positive "
        "attribution; omit for one Secondary Capture per source slice.",
    )

    @field_validator("outputs")
    @classmethod
    def _known_outputs(cls, outputs: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return _known_output_kinds(outputs)


class StorageConfig(_Section):
    """Where the spool, quarantine, outbox and journal live."""

    data_dir: Path = Field(Path("var"), description="Folder for spool/, journal.sqlite; created when missing.")
    durability: Literal["power-loss", "process-crash"] = Field(
        "power-loss",
        description="What an acknowledged instance survives. power-loss: every file and journal commit is "
        "fsynced before Success (safe against power failure; the disk's fsync time bounds images/s). "
        "process-crash: no fsync, the OS flushes (safe against SIGKILL and node crashes, not power loss; "
        "several times faster on slow disks).",
    )


class SendConfig(_Section):
    """Sending results: retries with exponential backoff and jitter, then the dead letter."""

    calling_ae_title: str | None = Field(
        None, pattern=_AE_TITLE, description="Our AE title when sending; omit for the listener's."
    )
    max_attempts: int = Field(8, ge=1, description="Attempts before an output goes to the dead letter.")
    base_delay_seconds: float = Field(2.0, gt=0, description="First retry delay; doubles each attempt.")
    max_delay_seconds: float = Field(300.0, gt=0, description="Cap on the retry delay.")


class WorkersConfig(_Section):
    """Threads of the running node."""

    pipeline: int = Field(1, ge=1, le=64, description="Series processed at the same time (threads per worker process).")
    processes: int | Literal["auto"] = Field(
        "auto",
        description="Worker processes (decode, infer, explain, encode, store), taking ready series from the "
        "journal; auto = min(8, cores). With listener.processes and workers.processes both 1 the node is one "
        "process, as before.",
    )

    @field_validator("processes")
    @classmethod
    def _processes_in_range(cls, value: int | str) -> int | str:
        return _check_processes(value)


class PoolConfig(_Section):
    """The inference pool: forward passes of all studies and explainers micro-batched per device."""

    max_batch: int = Field(32, ge=1, le=4096, description="Images per forward pass at most.")
    max_wait_ms: float = Field(5.0, ge=0, description="How long a forward pass waits for more images, ms.")
    max_queue: int = Field(1024, ge=1, description="Images queued at most; then callers wait (back-pressure).")

    @model_validator(mode="after")
    def _queue_holds_a_batch(self) -> PoolConfig:
        if self.max_queue < self.max_batch:
            raise ValueError(f"max_queue ({self.max_queue}) must be >= max_batch ({self.max_batch})")
        return self


class MetricsConfig(_Section):
    """Prometheus metrics and health endpoints (/metrics, /healthz, /readyz) on their own port."""

    enabled: bool = Field(True, description="Serve the HTTP endpoints.")
    bind_address: str = Field("127.0.0.1", description="Address for the HTTP endpoints; 0.0.0.0 for every interface.")
    port: int = Field(9110, ge=0, le=65535, description="HTTP port (0 picks a free one).")


class QueueConfig(_Section):
    """The work queue across machines (Redis Streams); off unless ``redis_url`` is set.

    With it, receivers publish each journaled instance to ``stream`` and workers (on any machine)
    read it through the consumer group ``group``; see docs/operations.md (running with Redis).
    """

    redis_url: str | None = Field(
        None,
        description="redis://host:6379/0 (rediss:// for TLS); omit for the embedded node (the journal alone).",
    )
    stream: str = Field("pacsxai:instances", min_length=1, description="The stream of journaled instances.")
    group: str = Field("pacsxai-workers", min_length=1, description="The workers' consumer group.")
    node_name: str | None = Field(
        None,
        description="This node's name in the messages it publishes (whose journal holds the instance); "
        "default: the host name. Unique per intake box.",
    )
    reclaim_idle_seconds: float = Field(
        120.0,
        gt=0,
        description="A message pending this long with a consumer is taken over by another (XAUTOCLAIM): "
        "how long a dead worker's messages wait. A live worker refreshes what it holds every "
        "refresh_seconds, however long its series wait (assembly.max_wait_seconds) and run.",
    )
    refresh_seconds: float | None = Field(
        None,
        gt=0,
        description="How often a worker resets the idle time of the messages it holds (XCLAIM JUSTID to "
        "itself) so that no other worker reclaims them; at most a third of reclaim_idle_seconds. "
        "Default: a quarter of it.",
    )
    check_seconds: float = Field(
        2.0,
        gt=0,
        description="How often a receiving node looks for an emptied Redis (then refills it from the journal) "
        "and reads the done notes of workers on other machines (their results, for its sender).",
    )
    read_count: int = Field(64, ge=1, le=10000, description="Messages one read takes at most.")

    @model_validator(mode="after")
    def _refresh_well_within_reclaim(self) -> QueueConfig:
        if self.refresh_seconds is not None and self.refresh_seconds * 3 > self.reclaim_idle_seconds:
            raise ValueError(
                f"queue.refresh_seconds ({self.refresh_seconds:g}) must be at most a third of "
                f"queue.reclaim_idle_seconds ({self.reclaim_idle_seconds:g}), or a live worker's messages "
                "may be reclaimed by another worker and its series processed twice: set refresh_seconds to "
                f"{self.reclaim_idle_seconds / 3:g} or less, or reclaim_idle_seconds to "
                f"{self.refresh_seconds * 3:g} or more (or leave refresh_seconds out: a quarter of it)"
            )
        return self

    @property
    def refresh_period(self) -> float:
        """``refresh_seconds``, or a quarter of ``reclaim_idle_seconds`` when not set."""
        return (
            default_refresh_seconds(self.reclaim_idle_seconds) if self.refresh_seconds is None else self.refresh_seconds
        )


def default_refresh_seconds(reclaim_idle_seconds: float) -> float:
    """How often a queue consumer refreshes what it holds when ``queue.refresh_seconds`` is not
    set: a quarter of ``reclaim_idle_seconds``, so three refreshes can be late before a reclaim."""
    return reclaim_idle_seconds / 4


class LoggingConfig(_Section):
    """Logs never carry patient data: UIDs at most."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    json_format: bool = Field(False, alias="json", description="One JSON object per line.")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class NodeConfig(BaseSettings):
    """The whole configuration of ``pacs-xai serve``."""

    model_config = SettingsConfigDict(env_prefix="PACS_XAI_", env_nested_delimiter="__", extra="forbid", frozen=True)

    listener: ListenerConfig = Field(default_factory=ListenerConfig, description="The DICOM listener.")
    allowed_callers: tuple[AllowedCallerConfig, ...] = Field(
        (), description="Calling AEs allowed to associate; empty = any."
    )
    tls: TlsConfig | None = Field(None, description="TLS for the listener; omit for plain TCP.")
    destinations: tuple[DestinationConfig, ...] = Field(
        (), description="Where results go; empty = results stay in the outbox."
    )
    assembly: AssemblyConfig = Field(default_factory=AssemblyConfig, description="Series completion timers.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The deployed model.")
    explain: ExplainConfig = Field(default_factory=ExplainConfig, description="Explainers and outputs.")
    routes: tuple[RouteConfig, ...] = Field(
        (),
        description="Ordered routing rules: the first that matches an instance takes it (continue: true goes on). "
        "Empty: one route named 'default' takes what model.card applies to, with model and explain.",
    )
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Data folder.")
    send: SendConfig = Field(default_factory=SendConfig, description="Retry policy.")
    workers: WorkersConfig = Field(default_factory=WorkersConfig, description="Worker threads.")
    pool: PoolConfig = Field(default_factory=PoolConfig, description="Inference pool (micro-batching).")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Metrics and health endpoints.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Logging.")
    queue: QueueConfig = Field(
        default_factory=QueueConfig, description="Work queue across machines (Redis Streams); off by default."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file arrives as init kwargs; the environment must win over it.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _unique_destination_names(self) -> NodeConfig:
        names = [d.name for d in self.destinations]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"destination names must be unique, repeated: {duplicates}")
        return self

    @model_validator(mode="after")
    def _no_processes_only_with_a_queue(self) -> NodeConfig:
        receivers, workers = self.listener.processes, self.workers.processes
        if (receivers == 0 or workers == 0) and self.queue.redis_url is None:
            raise ValueError(
                f"listener.processes={receivers!r}, workers.processes={workers!r}: 0 needs queue.redis_url "
                "(a box of only receivers or only workers shares its work through Redis); set it or use 1 or more"
            )
        if receivers == 0 and workers == 0:
            raise ValueError("listener.processes and workers.processes are both 0: the node would do nothing")
        return self

    @model_validator(mode="after")
    def _routes_name_known_destinations(self) -> NodeConfig:
        names = [route.name for route in self.routes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"route names must be unique, repeated: {duplicates}")
        known = {d.name for d in self.destinations}
        for index, route in enumerate(self.routes):
            unknown = [name for name in route.destinations or () if name not in known]
            if unknown:
                raise ValueError(
                    f"routes[{index}] ({route.name}): destinations {unknown} are not configured; "
                    f"configured: {sorted(known) or 'none'}"
                )
        return self


class _WithoutEnvironment(NodeConfig):
    """A NodeConfig validated from given values only: how flags are laid over file + environment."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> NodeConfig:
    """The configuration from ``path`` (None: defaults only), the environment and ``overrides``.

    ``overrides`` uses the file's nesting (``{"listener": {"port": 11113}}``) and wins over all.
    """
    raw: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(
                f"config file not found: {path} (print an example with: pacs-xai config example)"
            ) from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must be a YAML mapping, got {type(loaded).__name__}")
        raw = loaded or {}
    try:
        config = NodeConfig(**raw)  # the environment wins over the file here
        if overrides:
            config = _WithoutEnvironment(**_merge(config.model_dump(by_alias=True), overrides))
    except ValidationError as exc:
        raise ConfigError(f"configuration ({where}) is invalid:\n{_describe(exc, raw)}") from None
    return config


def load_resolved_config(path: str | Path) -> NodeConfig:
    """A configuration written by ``write_resolved_config``: taken as it is, the environment not
    applied again (the supervisor applied it and resolved the port and process counts)."""
    try:
        return _WithoutEnvironment(**json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the resolved configuration {path}: {exc}") from exc


def write_resolved_config(config: NodeConfig, path: Path, **sections: dict[str, Any]) -> Path:
    """Write ``config`` as JSON with ``sections`` laid over it (e.g. ``listener={"port": 11112}``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_merge(config.model_dump(mode="json", by_alias=True), sections), indent=1))
    return path


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(exc: ValidationError, raw: dict[str, Any] | None = None) -> str:
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        where = _name_the_route(where, error["loc"], raw or {})
        found = error.get("input")
        shown = "{...}" if isinstance(found, dict) else repr(found)
        lines.append(f"  - {where}: {error['msg']} (found {shown[:80]})")
    return "\n".join(lines)


def _name_the_route(where: str, loc: tuple[Any, ...], raw: dict[str, Any]) -> str:
    """``routes.1.match.modality`` -> ``routes[1] (ct-head).match.modality``: the rule's index and name."""
    if len(loc) < 2 or loc[0] != "routes" or not isinstance(loc[1], int):
        return where
    routes = raw.get("routes")
    name = None
    if isinstance(routes, list) and loc[1] < len(routes) and isinstance(routes[loc[1]], dict):
        name = routes[loc[1]].get("name")
    rest = "".join(f".{part}" for part in loc[2:])
    return f"routes[{loc[1]}]" + (f" ({name})" if name else "") + rest


def example_config() -> str:
    """A complete, commented YAML config with every field at its default (and sample lists)."""
    lines = [
        "# pacs-xai node configuration. Every key is optional; shown values are the defaults.",
        "# Environment overrides: PACS_XAI_<SECTION>__<KEY>, e.g. PACS_XAI_LISTENER__PORT=11113.",
        "",
    ]
    samples: dict[str, list[dict[str, Any]]] = {
        "allowed_callers": [{"ae_title": "ORTHANC", "host": "127.0.0.1"}],
        "destinations": [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}],
    }
    for name, field in NodeConfig.model_fields.items():
        lines.append(f"# {field.description}")
        annotation = field.annotation
        if name in samples:
            lines.append(f"{name}:")
            item_model = AllowedCallerConfig if name == "allowed_callers" else DestinationConfig
            for sample in samples[name]:
                first = True
                for key, sub in item_model.model_fields.items():
                    value = sample.get(key, sub.default)
                    prefix = "  - " if first else "    "
                    lines.append(f"{prefix}{key}: {_yaml_value(value)}  # {sub.description}")
                    first = False
        elif name == "routes":
            lines.extend(_routes_example())
        elif name == "tls":
            lines.append("# tls:")
            for key, sub in TlsConfig.model_fields.items():
                lines.append(f"#   {key}: /etc/pacs-xai/{key}.pem  # {sub.description}")
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.append(f"{name}:")
            for key, sub in annotation.model_fields.items():
                shown_key = sub.alias or key
                default = sub.get_default(call_default_factory=True)
                lines.append(f"  {shown_key}: {_yaml_value(default)}  # {sub.description}")
        lines.append("")
    return "\n".join(lines)


def _routes_example() -> list[str]:
    """The ``routes`` section of the example, commented out: two rules, every key described once."""
    route, match = RouteConfig.model_fields, RouteMatchConfig.model_fields
    sample_match = {
        "modality": "CR|DX",
        "body_part_examined": ["CHEST", "THORAX", ""],
        "rows": {"min": 512},
        "calling_ae_title": "ORTHANC",
    }
    lines = ["# routes:"]
    lines.append(f"#   - name: chest-xray  # {route['name'].description}")
    lines.append(f"#     match:  # {route['match'].description}")
    for key, value in sample_match.items():
        lines.append(f"#       {key}: {_yaml_value(value)}  # {match[key].description}")
    for key, sub in match.items():
        if key not in sample_match:
            lines.append(f"#       # {key}: ...  # {sub.description}")
    lines.append(f"#     model: /models/chest/model.yaml  # {route['model'].description}")
    lines.append(f"#     methods: [gradcam]  # {route['methods'].description}")
    lines.append(f"#     outputs: [sc, sr]  # {route['outputs'].description}")
    lines.append(f"#     method_params: {{}}  # {route['method_params'].description}")
    lines.append(f"#     destinations: [pacs]  # {route['destinations'].description}")
    lines.append(f"#     continue: false  # {route['continue_'].description}")
    lines.append("#   - name: ct-head")
    lines.append("#     match: {modality: CT, series_description: '.*head.*', instances: {min: 20}}")
    lines.append("#     model: /models/head-ct/model.yaml")
    lines.append("routes: []")
    return lines


def _yaml_value(value: Any) -> str:
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return re.sub(r"\n\.\.\.$", "", text)
