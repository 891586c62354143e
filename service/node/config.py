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

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from dicom_io.net.scp import DEFAULT_MAX_INSTANCE_BYTES
from dicom_io.net.scu import Destination
from dicom_io.writers import OUTPUT_KINDS

#: AE titles: 1-16 characters of the default repertoire, no backslash or control characters.
_AE_TITLE = r"^[^\\\x00-\x1f]{1,16}$"


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

    def to_destination(self) -> Destination:
        return Destination(ae_title=self.ae_title, host=self.host, port=self.port)


class AssemblyConfig(_Section):
    """When a series counts as complete."""

    idle_seconds: float = Field(
        5.0, gt=0, description="Ready this long after its last instance, once its associations ended."
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
        description="At start-up, explain one synthetic radiograph with every configured method and output "
        "(in the background, nothing kept), so the first study does not pay for lazy initialisation.",
    )


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
        unknown = [kind for kind in outputs or () if kind not in OUTPUT_KINDS]
        if unknown:
            raise ValueError(f"unknown output kind(s) {unknown}; choose from {list(OUTPUT_KINDS)}")
        return outputs


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

    pipeline: int = Field(1, ge=1, le=64, description="Series processed at the same time.")


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
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Data folder.")
    send: SendConfig = Field(default_factory=SendConfig, description="Retry policy.")
    workers: WorkersConfig = Field(default_factory=WorkersConfig, description="Worker threads.")
    pool: PoolConfig = Field(default_factory=PoolConfig, description="Inference pool (micro-batching).")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Metrics and health endpoints.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Logging.")

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
        raise ConfigError(f"configuration ({where}) is invalid:\n{_describe(exc)}") from None
    return config


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        found = error.get("input")
        shown = "{...}" if isinstance(found, dict) else repr(found)
        lines.append(f"  - {where}: {error['msg']} (found {shown[:80]})")
    return "\n".join(lines)


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


def _yaml_value(value: Any) -> str:
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return re.sub(r"\n\.\.\.$", "", text)
