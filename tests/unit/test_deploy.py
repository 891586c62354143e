"""The deployment files: deploy/ (compose, Kubernetes, Grafana, Prometheus) and the Dockerfile.

Docker and Kubernetes do not run here, so this checks what can be checked without them: every
YAML and JSON file parses; the node configs load with the node's own loader (and the model card
they name loads); every metric name that the dashboard, the alert rules and the autoscaler query
is one the node exports; and the pieces agree with each other (ports, AE titles, hosts, paths,
probes, mounts). Where promtool or kubectl is installed, the alert rules' unit tests run and the
kustomizations build; without them those checks are skipped.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from service.inference.card import ModelCard
from service.models import demo_card_path
from service.node.config import NodeConfig, load_config
from service.node.metrics import STAGES, JournalCollector, create_metrics
from service.node.queue.stream import QueueCollector
from tests.helpers import REPO_ROOT

ROOT = REPO_ROOT
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "pacs-xai-dashboard.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"

#: The node configs shipped for each way of running the image.
NODE_CONFIGS = {
    "docker": DEPLOY / "docker" / "node.yaml",
    "compose": COMPOSE / "node.yaml",
    "k8s": K8S / "base" / "node.yaml",
}
METRIC_TOKEN = re.compile(r"pacsxai_[a-z_]+")


# --- helpers ------------------------------------------------------------------------------------


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _load_yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


@pytest.fixture(autouse=True)
def _no_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    """The configs are checked as written: no PACS_XAI_* variable of the caller's shell applies."""
    for name in list(os.environ):
        if name.startswith("PACS_XAI_"):
            monkeypatch.delenv(name)


def _config(name: str) -> NodeConfig:
    return load_config(NODE_CONFIGS[name])


def _dockerfile(path: Path = ROOT / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = path.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    instructions = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _instruction(keyword: str) -> list[str]:
    return [rest for key, rest in _dockerfile() if key == keyword]


def _exec_form(rest: str) -> list[str]:
    value = json.loads(rest)
    assert isinstance(value, list), f"not in exec (JSON) form: {rest}"
    return value


def _dashboard_panels() -> list[dict]:
    def walk(panels: list[dict]):
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))

    return list(walk(json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"]))


def _dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    expressions = [target["expr"] for panel in _dashboard_panels() for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            expressions.append(query["query"] if isinstance(query, dict) else query)
    return expressions


def _alert_rules() -> list[dict]:
    return [rule for group in _load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def _k8s_objects(*relative: str) -> list[dict]:
    return [doc for name in relative for doc in _load_yaml_docs(K8S / name)]


def _one(objects: list[dict], kind: str) -> dict:
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


# --- everything parses --------------------------------------------------------------------------


def _data_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix in {".yml", ".yaml", ".json"})


def test_the_deploy_folder_has_its_files() -> None:
    names = {p.relative_to(DEPLOY).as_posix() for p in _data_files()}
    for expected in (
        "compose/docker-compose.yml",
        "compose/node.yaml",
        "compose/orthanc.json",
        "compose/prometheus.yml",
        "grafana/pacs-xai-dashboard.json",
        "prometheus/alerts.yml",
        "prometheus/prometheus.yml",
        "k8s/kustomization.yaml",
        "k8s/deployment.yaml",
        "k8s/pvc.yaml",
        "k8s/base/service.yaml",
        "k8s/scale-out/hpa.yaml",
        "k8s/prometheus-adapter-rules.yaml",
        "compose/docker-compose.triton.yml",
        "k8s/triton/deployment.yaml",
        "k8s/triton/service.yaml",
    ):
        assert expected in names


@pytest.mark.parametrize("path", _data_files(), ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_every_yaml_and_json_file_parses(path: Path) -> None:
    if path.suffix == ".json":
        with path.open(encoding="utf-8") as handle:
            assert json.load(handle)
    else:
        assert _load_yaml_docs(path), f"{path} is empty"


# --- node configs -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(NODE_CONFIGS))
def test_node_config_loads_with_the_real_loader(name: str) -> None:
    config = _config(name)
    # In a container both listeners face the network, and the data lives on the volume.
    assert config.listener.bind_address == "0.0.0.0"
    assert config.metrics.enabled and config.metrics.bind_address == "0.0.0.0"
    assert str(config.storage.data_dir) in {_exec_form(v)[0] for v in _instruction("VOLUME")}


@pytest.mark.parametrize("name", sorted(NODE_CONFIGS))
def test_the_model_card_a_config_names_loads(name: str) -> None:
    """No card path means the demo model inside the installed wheel; a path must name a card."""
    card_path = _config(name).model.card
    card = ModelCard.load(card_path or demo_card_path())  # also checks each sha256
    assert card.name and card.version


def test_the_image_installs_the_built_wheel_not_the_source_tree() -> None:
    """The wheel carries the default model; an editable install would hide a wheel without it."""
    runs = " ".join(_instruction("RUN"))
    assert "pip wheel" in runs and "/dist/pacs_xai-" in runs
    assert not re.search(r"pip install[^&]* -e ", runs), "the image must not install the source tree (-e)"
    copies = [shlex.split(rest) for rest in _instruction("COPY")]
    assert ["deploy/docker/node.yaml", "/etc/pacs-xai/node.yaml"] in copies
    assert ["--from=wheel", "/dist", "/dist"] in copies


# --- metric names -------------------------------------------------------------------------------


class _QuietQueue:
    """A queue whose stream is empty: what :class:`QueueCollector` reads, without a Redis."""

    def lag(self) -> tuple[int, int]:
        return 0, 0


@pytest.fixture(scope="module")
def exported() -> dict[str, dict[str, set[str]]]:
    """Every series name the node exports, with the label values seen on collected samples.

    Labelled counters and histograms have no samples until a label set is used, so the names come
    from each family's type as well as from the samples: counter -> _total, histogram ->
    _bucket/_sum/_count, gauge -> its name.
    """
    metrics = create_metrics()
    metrics.registry.register(JournalCollector(lambda: {}))
    metrics.registry.register(QueueCollector(_QuietQueue()))  # type: ignore[arg-type]
    names: dict[str, dict[str, set[str]]] = {}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    for family in metrics.registry.collect():
        for suffix in suffixes.get(family.type, ("",)):
            names.setdefault(family.name + suffix, {})
        for sample in family.samples:
            labels = names.setdefault(sample.name, {})
            for key, value in sample.labels.items():
                labels.setdefault(key, set()).add(value)
    assert "pacsxai_stage_seconds_bucket" in names and "pacsxai_instances_waiting" in names
    return names


def _check_names(expressions: list[str], exported: dict[str, dict[str, set[str]]], where: str) -> set[str]:
    used = {token for expression in expressions for token in METRIC_TOKEN.findall(expression)}
    unknown = sorted(used - set(exported))
    assert not unknown, f"{where} queries metrics the node does not export: {unknown}"
    return used


def _check_label_values(expressions: list[str], exported: dict[str, dict[str, set[str]]], where: str) -> None:
    """stage="..." names a real stage; other matchers, where the node's samples show the label."""
    for expression in expressions:
        for stage_op, stage_value in re.findall(r'\bstage\s*(=~|=)\s*"([^"]*)"', expression):
            values = stage_value.split("|") if stage_op == "=~" else [stage_value]
            assert set(values) <= set(STAGES), f"{where}: unknown stage in {expression!r}"
        for name, matchers in re.findall(r"(pacsxai_[a-z_]+)\{([^}]*)\}", expression):
            for label, value in re.findall(r'(\w+)\s*=\s*"([^"$]*)"', matchers):
                seen = exported[name].get(label)
                if seen:
                    assert value in seen, f"{where}: {name}{{{label}={value!r}}} never exported (only {seen})"


def test_every_metric_the_dashboard_queries_is_exported(exported) -> None:
    expressions = _dashboard_expressions()
    used = _check_names(expressions, exported, "the dashboard")
    _check_label_values(expressions, exported, "the dashboard")
    # The panels the operations guide promises.
    for name in (
        "pacsxai_instances_received_total",
        "pacsxai_associations_total",
        "pacsxai_series_processed_total",
        "pacsxai_instances_processed_total",
        "pacsxai_stage_seconds_bucket",
        "pacsxai_explain_seconds_bucket",
        "pacsxai_outbox_depth",
        "pacsxai_dead_letters",
        "pacsxai_predictions_total",
        "pacsxai_pool_batch_size_count",
        "pacsxai_pool_queue_depth",
        "pacsxai_model_info",
        "pacsxai_series_routed_total",
        "pacsxai_series_unrouted_total",
        "pacsxai_route_instances_total",
        "pacsxai_route_seconds_bucket",
        "pacsxai_instances_discarded_total",
        "pacsxai_volume_series_skipped_total",
    ):
        assert name in used, f"the dashboard has no panel on {name}"


def test_every_metric_the_alert_rules_query_is_exported(exported) -> None:
    expressions = [rule["expr"] for rule in _alert_rules()]
    used = _check_names(expressions, exported, "the alert rules")
    _check_label_values(expressions, exported, "the alert rules")
    assert {"pacsxai_dead_letters", "pacsxai_outbox_depth", "pacsxai_stage_seconds_bucket"} <= used


def test_the_autoscaler_metric_is_exported(exported) -> None:
    hpa = _one(_k8s_objects("scale-out/hpa.yaml"), "HorizontalPodAutoscaler")
    names = [metric["pods"]["metric"]["name"] for metric in hpa["spec"]["metrics"]]
    assert names == ["pacsxai_instances_waiting"]
    _check_names(names, exported, "the autoscaler")
    rule = _load_yaml(K8S / "prometheus-adapter-rules.yaml")["rules"]["custom"][0]
    _check_names([rule["seriesQuery"], rule["name"]["as"]], exported, "the prometheus-adapter rule")
    assert rule["name"]["as"] == names[0]
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_the_worker_autoscaler_reads_the_queue_backlog_the_adapter_serves(exported) -> None:
    hpa = _one(_k8s_objects("queue/hpa.yaml"), "HorizontalPodAutoscaler")
    worker = _one(_k8s_objects("queue/worker.yaml"), "Deployment")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", worker["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External" and metric["external"]["target"]["type"] == "AverageValue"
    (rule,) = _load_yaml(K8S / "prometheus-adapter-rules.yaml")["rules"]["external"]
    assert rule["name"]["as"] == metric["external"]["metric"]["name"]
    used = _check_names([rule["seriesQuery"], rule["metricsQuery"]], exported, "the external rule")
    assert used == {"pacsxai_queue_lag", "pacsxai_queue_pending"}


# --- dashboard and alerts -----------------------------------------------------------------------


def test_dashboard_structure() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = _dashboard_panels()
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip()
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_routing_panels_select_the_route_variable_and_group_by_route() -> None:
    """Every query on a metric with a ``route`` label honours the dashboard's Route variable (whose
    values come from that label) and shows one line per route."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["route"]["query"]["query"] == "label_values(pacsxai_route_instances_total, route)"
    expressions = [
        e
        for e in _dashboard_expressions()
        if re.search(r"pacsxai_(series_routed|route_)", e) and not e.startswith("label_values(")
    ]
    assert len(expressions) == 4
    for expression in expressions:
        assert 'route=~"$route"' in expression and re.search(r"by \((route|route, \w+)(, le)?\)", expression), (
            expression
        )


def test_the_stage_latency_panel_names_every_stage_the_node_records() -> None:
    """The panel groups by stage, so every stage shows up; its description tells the reader which ones."""
    (panel,) = [panel for panel in _dashboard_panels() if "pacsxai_stage_seconds_bucket" in str(panel.get("targets"))]
    described = re.fullmatch(r"Per stage: ([a-z_, ]+)\.", panel["description"])
    assert described, f"description {panel['description']!r} does not list the stages"
    assert tuple(described[1].split(", ")) == STAGES


def test_alert_rules_are_complete_and_select_the_scrape_job() -> None:
    rules = _alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for required in (
        "PacsXaiNodeDown",
        "PacsXaiDeadLettersGrowing",
        "PacsXaiOutboxStuck",
        "PacsXaiNoStudiesReceived",
        "PacsXaiLatencyHigh",
    ):
        assert required in names
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    jobs = set(re.findall(r'job="([^"]+)"', " ".join(rule["expr"] for rule in rules)))
    compose_jobs = {job["job_name"] for job in _load_yaml(COMPOSE / "prometheus.yml")["scrape_configs"]}
    k8s_jobs = {job["job_name"] for job in _load_yaml(DEPLOY / "prometheus" / "prometheus.yml")["scrape_configs"]}
    assert jobs == {"pacs-xai"} and jobs <= compose_jobs and jobs <= k8s_jobs


def test_the_operations_guide_lists_every_alert() -> None:
    guide = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    for rule in _alert_rules():
        assert f"`{rule['alert']}`" in guide


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not installed: run `make system-deps` (Debian package prometheus)")
    return path


def test_alert_rules_pass_their_promtool_unit_tests(tmp_path: Path) -> None:
    promtool = _promtool()
    rules = _load_yaml(ALERTS)
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)  # promtool compares annotations exactly; the tests cover expressions
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    shutil.copy(DEPLOY / "prometheus" / "alerts_test.yml", tmp_path / "alerts_test.yml")
    result = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    result = subprocess.run(
        [promtool, "test", "rules", str(tmp_path / "alerts_test.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_expressions_are_valid_promql(tmp_path: Path) -> None:
    promtool = _promtool()
    grafana_variables = {"$__rate_interval": "1m", "$__range": "1h", "$instance": ".*", "$route": ".*"}
    rules = []
    for index, expression in enumerate(_dashboard_expressions()):
        if expression.startswith("label_values("):
            continue  # a Grafana function, not PromQL
        for variable, value in grafana_variables.items():
            expression = expression.replace(variable, value)
        assert "$" not in expression, f"unknown Grafana variable in {expression}"
        rules.append({"record": f"dashboard:expr{index}", "expr": expression})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Dockerfile ---------------------------------------------------------------------------------


def test_dockerfile_entrypoint_is_a_console_script() -> None:
    (entrypoint,) = [_exec_form(rest) for rest in _instruction("ENTRYPOINT")]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert entrypoint[0] in scripts
    module, _, function = scripts[entrypoint[0]].partition(":")
    imported = __import__(module, fromlist=[function])
    assert callable(getattr(imported, function))


def test_dockerfile_cmd_serves_the_mounted_config() -> None:
    (cmd,) = [_exec_form(rest) for rest in _instruction("CMD")]
    assert cmd == ["serve", "--config", "/etc/pacs-xai/node.yaml"]
    from service.cli.main import build_parser

    args = build_parser().parse_args(cmd)
    assert str(args.config) == "/etc/pacs-xai/node.yaml"


def test_dockerfile_exposes_the_ports_of_every_config() -> None:
    exposed = {int(port.split("/")[0]) for rest in _instruction("EXPOSE") for port in rest.split()}
    for name in NODE_CONFIGS:
        config = _config(name)
        assert exposed == {config.listener.port, config.metrics.port}, name


def test_dockerfile_healthcheck_polls_healthz_on_the_metrics_port() -> None:
    (healthcheck,) = _instruction("HEALTHCHECK")
    assert "CMD" in healthcheck and "curl" not in healthcheck and "urllib" in healthcheck
    command = _exec_form(healthcheck[healthcheck.index("CMD") + 3 :].strip())
    assert command[:2] == ["python", "-c"]
    compile(command[2], "<healthcheck>", "exec")  # valid Python
    assert "/healthz" in command[2]
    default_port = re.search(r"PACS_XAI_METRICS__PORT', '(\d+)'", command[2]).group(1)
    assert {int(default_port)} == {_config(name).metrics.port for name in NODE_CONFIGS}


def test_dockerfile_runs_as_the_non_root_user_kubernetes_names() -> None:
    (user,) = _instruction("USER")
    uid = int(user.split(":")[0])
    assert uid != 0
    for workload in ("deployment.yaml", "scale-out/statefulset.yaml"):
        pod = _k8s_objects(workload)[0]["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == uid


# --- compose ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return _load_yaml(COMPOSE / "docker-compose.yml")


def _published(service: dict) -> set[int]:
    """Container ports of "host_ip:host:container" entries."""
    return {int(str(entry).split(":")[-1].split("/")[0]) for entry in service.get("ports", [])}


def _mounts(service: dict) -> dict[str, str]:
    """Container path -> host path (relative to deploy/compose) of a service's bind mounts."""
    mounts = {}
    for entry in service.get("volumes", []):
        source, target = entry.split(":")[:2]
        if source.startswith("."):
            mounts[target] = source
    return mounts


def test_compose_has_the_whole_stack(compose) -> None:
    assert {"orthanc", "pacs-xai", "pacs-xai-worker", "redis", "prometheus", "grafana", "ohif"} <= set(
        compose["services"]
    )
    assert (COMPOSE / compose["services"]["pacs-xai"]["build"]["context"]).resolve() == ROOT
    assert (ROOT / compose["services"]["pacs-xai"]["build"]["dockerfile"]).is_file()
    gpu = _load_yaml(COMPOSE / "docker-compose.gpu.yml")["services"]
    assert set(gpu) == {"pacs-xai-worker"}  # the model tier
    (device,) = gpu["pacs-xai-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def _tier_config(service: dict) -> NodeConfig:
    """compose/node.yaml as a service's environment changes it (PACS_XAI_* variables)."""
    overrides: dict[str, Any] = {}
    for name, value in (service.get("environment") or {}).items():
        section, _, key = name.removeprefix("PACS_XAI_").lower().partition("__")
        overrides.setdefault(section, {})[key] = value if not str(value).isdigit() else int(value)
    return load_config(NODE_CONFIGS["compose"], overrides)


def _named_volumes(service: dict) -> dict[str, str]:
    """Container path -> named volume of a service."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if not source.startswith("."):
            mounts[target] = source
    return mounts


def test_compose_runs_receivers_and_workers_as_two_tiers_on_a_durable_redis(compose) -> None:
    services = compose["services"]
    intake, worker, redis_service = services["pacs-xai"], services["pacs-xai-worker"], services["redis"]
    node = _config("compose")
    assert node.queue.redis_url is not None
    url = re.fullmatch(r"redis://([\w-]+):(\d+)/\d+", node.queue.redis_url)
    assert url and url.group(1) == "redis" and int(url.group(2)) == 6379  # redis-server's default port
    # Redis: AOF, every write fsynced before the reply, no RDB snapshots, on a named volume.
    command = redis_service["command"]
    assert command[0] == "redis-server"
    flags = dict(zip(command[1::2], command[2::2], strict=True))
    assert flags == {"--appendonly": "yes", "--appendfsync": "always", "--save": ""}
    assert _named_volumes(redis_service)["/data"] in compose["volumes"]
    assert re.fullmatch(r"redis:\$\{REDIS_VERSION:-\d+\.\d+\}", redis_service["image"])  # a pinned default
    # Tiers: receivers + sender without a model; workers without a listener; both valid configs.
    receiving, working = _tier_config(intake), _tier_config(worker)
    assert (receiving.listener.processes, receiving.workers.processes) == ("auto", 0)
    assert (working.listener.processes, working.workers.processes) == (0, "auto")
    assert not working.queue.node_name and receiving.queue.node_name  # each worker replica its host name
    assert worker["image"] == intake["image"] and {"redis"} <= set(intake["depends_on"]) & set(worker["depends_on"])
    # One spool on a shared volume, at the spool folder of the same data_dir.
    spool = str(PurePosixPath(str(node.storage.data_dir)) / "spool")
    assert _named_volumes(intake)[spool] == _named_volumes(worker)[spool] == "pacs-xai-spool"
    assert _named_volumes(intake)[str(node.storage.data_dir)] == "pacs-xai-data"
    assert str(node.storage.data_dir) not in _named_volumes(worker)  # a worker keeps nothing else
    assert any("install -d -o 10001 -g 10001 " + spool in rest for rest in _instruction("RUN"))
    # Prometheus scrapes every worker replica too (pacsxai_queue_lag comes from both tiers).
    (job,) = _load_yaml(COMPOSE / "prometheus.yml")["scrape_configs"]
    (dns,) = job["dns_sd_configs"]
    assert dns["names"] == ["pacs-xai-worker"] and dns["port"] == node.metrics.port


def test_compose_bind_mounts_exist(compose) -> None:
    for name, service in compose["services"].items():
        for target, source in _mounts(service).items():
            assert (COMPOSE / source).exists(), f"{name}: {source} (for {target}) is missing"


def test_compose_orthanc_modality_points_at_pacs_xai(compose) -> None:
    orthanc = json.loads((COMPOSE / "orthanc.json").read_text(encoding="utf-8"))
    node = _config("compose")
    modality = orthanc["DicomModalities"]["pacs-xai"]
    if isinstance(modality, list):  # [AET, host, port] is Orthanc's short form
        modality = dict(zip(("AET", "Host", "Port"), modality, strict=False))
    assert modality["Host"] in compose["services"]
    assert modality["Host"] == "pacs-xai"
    assert modality["Port"] == node.listener.port
    assert modality["AET"] == node.listener.ae_title
    assert node.listener.port in _published(compose["services"]["pacs-xai"])
    assert _mounts(compose["services"]["pacs-xai"])["/etc/pacs-xai/node.yaml"] == "./node.yaml"
    assert _mounts(compose["services"]["orthanc"])["/etc/orthanc/orthanc.json"] == "./orthanc.json"


def test_compose_pacs_xai_sends_to_orthanc_and_accepts_it(compose) -> None:
    orthanc = json.loads((COMPOSE / "orthanc.json").read_text(encoding="utf-8"))
    node = _config("compose")
    (destination,) = node.destinations
    assert destination.host == "orthanc" and destination.host in compose["services"]
    assert destination.port == orthanc["DicomPort"]
    assert destination.ae_title == orthanc["DicomAet"]
    assert orthanc["DicomAet"] in {caller.ae_title for caller in node.allowed_callers}
    assert orthanc["DicomAlwaysAllowStore"] is True  # the node's results are accepted
    assert {orthanc["DicomPort"], orthanc["HttpPort"]} <= _published(compose["services"]["orthanc"])


def test_compose_prometheus_scrapes_the_metrics_port(compose) -> None:
    prometheus = _load_yaml(COMPOSE / "prometheus.yml")
    node = _config("compose")
    (job,) = prometheus["scrape_configs"]
    targets = [target for static in job["static_configs"] for target in static["targets"]]
    assert targets == [f"pacs-xai:{node.metrics.port}"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert node.metrics.port in _published(compose["services"]["pacs-xai"])
    mounts = _mounts(compose["services"]["prometheus"])
    assert mounts["/etc/prometheus/prometheus.yml"] == "./prometheus.yml"
    for rule_file in prometheus["rule_files"]:
        assert (COMPOSE / mounts[rule_file]).resolve() == ALERTS


def test_compose_grafana_is_provisioned_with_prometheus_and_the_dashboard(compose) -> None:
    grafana = compose["services"]["grafana"]
    mounts = _mounts(grafana)
    (datasource,) = _load_yaml(COMPOSE / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    assert "9090" in str(compose["services"]["prometheus"]["ports"])
    (provider,) = _load_yaml(COMPOSE / "grafana/provisioning/dashboards/pacs-xai.yml")["providers"]
    dashboards_in_container = provider["options"]["path"]
    assert (COMPOSE / mounts[dashboards_in_container]).resolve() == DASHBOARD.parent
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_in_container}/{DASHBOARD.name}"
    assert mounts["/etc/grafana/provisioning/datasources"] == "./grafana/provisioning/datasources"
    assert mounts["/etc/grafana/provisioning/dashboards"] == "./grafana/provisioning/dashboards"


def test_compose_ohif_reads_orthanc_dicomweb_on_its_own_origin(compose) -> None:
    orthanc = json.loads((COMPOSE / "orthanc.json").read_text(encoding="utf-8"))
    assert orthanc["DicomWeb"]["Enable"] is True and orthanc["DicomWeb"]["Root"] == "/dicom-web/"
    assert compose["services"]["orthanc"]["environment"]["DICOM_WEB_PLUGIN_ENABLED"] == "true"
    ohif = compose["services"]["ohif"]
    assert ohif["image"].startswith("ohif/app:")
    mounts = _mounts(ohif)
    template = (COMPOSE / mounts["/usr/src/default.conf.template"]).read_text(encoding="utf-8")
    config_js = (COMPOSE / "ohif" / "app-config.js").read_text(encoding="utf-8")
    # nginx serves our app-config.js from where compose mounts it.
    alias = re.search(r"location = /app-config\.js \{[^}]*alias ([^;]+);", template).group(1)
    assert mounts[alias] == "./ohif/app-config.js"
    # The data source's roots are proxied to Orthanc's HTTP port, same paths.
    assert "@ohif/extension-default.dataSourcesModule.dicomweb" in config_js
    for key in ("qidoRoot", "wadoRoot"):
        assert re.search(rf"{key}: '/dicom-web'", config_js), key
    http = orthanc["HttpPort"]
    proxies = dict(re.findall(r"location (\S+) \{[^}]*?proxy_pass (\S+);", template))
    assert proxies["/dicom-web/"] == f"http://orthanc:{http}{orthanc['DicomWeb']['Root']}"
    assert proxies[orthanc["DicomWeb"]["WadoRoot"]] == f"http://orthanc:{http}{orthanc['DicomWeb']['WadoRoot']}"
    assert re.search(r"wadoUriRoot: '/wado'", config_js)
    assert "${PORT}" in template and str(ohif["environment"]["PORT"]) in str(ohif["ports"])
    # The credentials the proxy adds are a registered Orthanc user.
    for token in set(re.findall(r'Authorization "Basic ([A-Za-z0-9+/=]+)"', template)):
        user, _, password = base64.b64decode(token).decode().partition(":")
        assert orthanc["RegisteredUsers"].get(user) == password


# --- Kubernetes ---------------------------------------------------------------------------------


def _kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


@pytest.mark.parametrize("kustomization", _kustomizations(), ids=lambda p: p.parent.relative_to(DEPLOY).as_posix())
def test_kustomization_references_exist(kustomization: Path) -> None:
    spec = _load_yaml(kustomization)
    for resource in spec.get("resources", []):
        path = kustomization.parent / resource
        assert path.is_file() or (path / "kustomization.yaml").is_file(), resource
    for generator in spec.get("configMapGenerator", []):
        for file in generator["files"]:
            assert (kustomization.parent / file.split("=")[-1]).is_file(), file


@pytest.mark.parametrize("workload", ["deployment.yaml", "scale-out/statefulset.yaml"])
def test_workload_matches_the_node_config_and_the_image(workload: str) -> None:
    node = _config("k8s")
    obj = _k8s_objects(workload)[0]
    pod = obj["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"dicom": node.listener.port, "metrics": node.metrics.port}
    (cmd,) = [_exec_form(rest) for rest in _instruction("CMD")]
    assert container.get("args", cmd) == cmd
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert mounts["data"] == str(node.storage.data_dir)
    assert mounts["config"] == str(PurePosixPath(cmd[-1]).parent)
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    generators = _load_yaml(K8S / "base" / "kustomization.yaml")["configMapGenerator"]
    assert volumes["config"]["configMap"]["name"] in {g["name"] for g in generators}
    assert any(Path(f).name == PurePosixPath(cmd[-1]).name for g in generators for f in g["files"])
    if obj["kind"] == "Deployment":
        claim = _one(_k8s_objects("pvc.yaml"), "PersistentVolumeClaim")
        assert volumes["data"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        # One claim, one journal: one pod at a time.
        assert obj["spec"]["replicas"] == 1 and obj["spec"]["strategy"]["type"] == "Recreate"
    else:
        (template,) = obj["spec"]["volumeClaimTemplates"]
        assert template["metadata"]["name"] == "data" and "data" not in volumes


def _env(container: dict) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _tier(container: dict) -> NodeConfig:
    """base/node.yaml as a container's PACS_XAI_* variables change it (a pod-name reference as a name)."""
    overrides: dict[str, Any] = {}
    for name, value in _env(container).items():
        if name.startswith("PACS_XAI_"):
            section, _, key = name.removeprefix("PACS_XAI_").lower().partition("__")
            value = "pod-name" if isinstance(value, dict) else value
            overrides.setdefault(section, {})[key] = int(value) if value.isdigit() else value
    return load_config(NODE_CONFIGS["k8s"], overrides)


def test_queue_tiers_share_the_spool_claim_and_redis_and_keep_their_journals_apart() -> None:
    intake = _one(_k8s_objects("queue/intake.yaml"), "StatefulSet")
    worker = _one(_k8s_objects("queue/worker.yaml"), "Deployment")
    redis_set = _one(_k8s_objects("queue/redis.yaml"), "StatefulSet")
    claim = _one(_k8s_objects("queue/spool-pvc.yaml"), "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    node = _config("k8s")
    spool = str(PurePosixPath(str(node.storage.data_dir)) / "spool")
    tiers = {}
    for obj in (intake, worker):
        pod = obj["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts[spool]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        tiers[obj["kind"]] = (_tier(container), mounts, volumes, container)
        # The pod's name names its journal in the messages (unique, and stable for the StatefulSet).
        assert _env(container)["PACS_XAI_QUEUE__NODE_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        assert obj["spec"]["selector"]["matchLabels"].items() <= obj["spec"]["template"]["metadata"]["labels"].items()
    receiving, mounts, volumes, container = tiers["StatefulSet"]
    assert receiving.workers.processes == 0 and receiving.listener.processes == "auto"
    assert "data" not in volumes and intake["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert mounts[str(node.storage.data_dir)] == "data"  # its own journal, kept across restarts
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    working, mounts, volumes, container = tiers["Deployment"]
    assert working.listener.processes == 0
    assert "emptyDir" in volumes[mounts[str(node.storage.data_dir)]]  # keeps nothing of its own
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {p["name"] for p in container["ports"]} == {"metrics"}
    assert receiving.queue.redis_url == working.queue.redis_url
    # The URL names the Redis Service and its port; Redis is durable: AOF, fsync always, no RDB.
    service = next(o for o in _k8s_objects("queue/redis.yaml") if o["kind"] == "Service")
    url = re.fullmatch(r"redis://([\w-]+):(\d+)/\d+", str(receiving.queue.redis_url))
    assert (
        url and url.group(1) == service["metadata"]["name"] and int(url.group(2)) == service["spec"]["ports"][0]["port"]
    )
    (redis_container,) = redis_set["spec"]["template"]["spec"]["containers"]
    args = redis_container["args"]
    flags = dict(zip(args[1::2], args[2::2], strict=True))
    assert {"--appendonly": "yes", "--appendfsync": "always", "--save": ""}.items() <= flags.items()
    (data_mount,) = redis_container["volumeMounts"]
    assert flags["--dir"] == data_mount["mountPath"]
    assert redis_set["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == data_mount["name"]
    assert re.fullmatch(r"redis:\d+\.\d+", redis_container["image"])  # a pinned tag


def test_service_routes_dicom_and_metrics_with_client_affinity() -> None:
    node = _config("k8s")
    service = _one(_k8s_objects("base/service.yaml"), "Service")
    ports = {port["targetPort"]: port["port"] for port in service["spec"]["ports"]}
    assert ports == {"dicom": node.listener.port, "metrics": node.metrics.port}
    assert service["spec"]["sessionAffinity"] == "ClientIP"
    timeout = service["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"]
    assert timeout > node.assembly.max_wait_seconds
    labels = _k8s_objects("deployment.yaml")[0]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_autoscaler_targets_the_statefulset() -> None:
    hpa = _one(_k8s_objects("scale-out/hpa.yaml"), "HorizontalPodAutoscaler")
    statefulset = _one(_k8s_objects("scale-out/statefulset.yaml"), "StatefulSet")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("StatefulSet", statefulset["metadata"]["name"])
    assert (
        statefulset["spec"]["serviceName"]
        == _one(_k8s_objects("scale-out/service-headless.yaml"), "Service")["metadata"]["name"]
    )


def test_kubernetes_scrape_config_keeps_the_metrics_port() -> None:
    prometheus = _load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    (job,) = prometheus["scrape_configs"]
    keep = {tuple(r["source_labels"]): r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"}
    assert keep[("__meta_kubernetes_pod_container_port_name",)] == "metrics"
    labels = _k8s_objects("deployment.yaml")[0]["spec"]["template"]["metadata"]["labels"]
    assert keep[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)] == labels["app.kubernetes.io/name"]
    targets = {r.get("target_label") for r in job["relabel_configs"]}
    assert {"namespace", "pod"} <= targets  # what prometheus-adapter maps onto pods
    assert (DEPLOY / "prometheus" / prometheus["rule_files"][0]).resolve() == ALERTS


def _kustomize() -> list[str]:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    pytest.skip("neither kustomize nor kubectl installed")


@pytest.mark.parametrize("folder", ["k8s", "k8s/scale-out", "k8s/queue"])
def test_kustomization_builds(folder: str) -> None:
    command = _kustomize()
    result = subprocess.run([*command, str(DEPLOY / folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    kinds = sorted(obj["kind"] for obj in objects)
    workload = "Deployment" if folder == "k8s" else "StatefulSet"
    assert workload in kinds and "Service" in kinds and "ConfigMap" in kinds
    if folder == "k8s/queue":  # DICOM to the intake pods only; the worker Deployment and Redis beside them
        service = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "pacs-xai")
        workers = next(o for o in objects if o["kind"] == "Deployment")
        assert service["spec"]["selector"]["app.kubernetes.io/component"] == "dicom-node"
        assert not service["spec"]["selector"].items() <= workers["spec"]["template"]["metadata"]["labels"].items()
        objects = [o for o in objects if o["metadata"]["name"] != "pacs-xai-redis"]
    assert all(obj["metadata"].get("namespace") == "pacs-xai" for obj in objects if obj["kind"] != "Namespace")
    configmap = _one(objects, "ConfigMap")
    pod = _one(objects, workload)["spec"]["template"]["spec"]
    (config_volume,) = [volume for volume in pod["volumes"] if volume["name"] == "config"]
    assert config_volume["configMap"]["name"] == configmap["metadata"]["name"]  # the hashed name
    node = NodeConfig(**yaml.safe_load(configmap["data"]["node.yaml"]))
    assert node.listener.port == _config("k8s").listener.port


# --- the Triton tier ----------------------------------------------------------------------------

TRITON_DOCKERFILE = DEPLOY / "docker" / "Dockerfile.triton"


def _triton_command() -> list[str]:
    """ENTRYPOINT + CMD of the Triton image."""
    instructions = _dockerfile(TRITON_DOCKERFILE)
    (entrypoint,) = [_exec_form(rest) for key, rest in instructions if key == "ENTRYPOINT"]
    (cmd,) = [_exec_form(rest) for key, rest in instructions if key == "CMD"]
    return entrypoint + cmd


def _serve_arguments(arguments: list[str]):
    """The server's own parser reads the arguments (service/tools/triton/serve.py, stdlib only)."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--address")
    for port in ("--grpc-port", "--http-port", "--metrics-port"):
        parser.add_argument(port, type=int)
    parsed = parser.parse_args(arguments)
    source = (ROOT / "service" / "tools" / "triton" / "serve.py").read_text(encoding="utf-8")
    for option in ("--address", "--grpc-port", "--http-port", "--metrics-port"):
        assert f'"{option}"' in source, f"serve.py has no {option}"
    return parsed


def _export_folder(command: list[str]) -> str:
    """The --out of a `pacs-xai triton export` command, checked with pacs-xai's own parser."""
    from service.cli.main import build_parser

    assert command[0] == "pacs-xai"
    args = build_parser().parse_args(command[1:])
    assert (args.command, args.triton_command) == ("triton", "export")
    return args.out


def test_the_triton_image_serves_with_the_script_of_this_tree_and_the_torch_of_the_node() -> None:
    copies = [shlex.split(rest) for key, rest in _dockerfile(TRITON_DOCKERFILE) if key == "COPY"]
    command = _triton_command()
    assert ["service/tools/triton/serve.py", command[1]] in copies
    runs = " ".join(rest for key, rest in _dockerfile(TRITON_DOCKERFILE) if key == "RUN")
    # torch.export programs are read by the release that wrote them: the node's pinned torch.
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    torch_pin = re.search(r"^TORCH\s*:=\s*(\S+)", makefile, re.MULTILINE).group(1)
    assert torch_pin in runs and "nvidia-pytriton==" in runs
    arguments = _serve_arguments(command[2:])
    exposed = {int(port) for key, rest in _dockerfile(TRITON_DOCKERFILE) if key == "EXPOSE" for port in rest.split()}
    assert {arguments.grpc_port, arguments.http_port, arguments.metrics_port} == exposed
    assert arguments.address == "0.0.0.0"


def test_compose_triton_overlay_wires_the_export_the_server_and_the_node() -> None:
    overlay = _load_yaml(COMPOSE / "docker-compose.triton.yml")
    services = overlay["services"]
    assert set(services) == {"triton-export", "triton", "pacs-xai"}
    triton, export = services["triton"], services["triton-export"]
    assert (COMPOSE / triton["build"]["context"] / triton["build"]["dockerfile"]).resolve() == TRITON_DOCKERFILE
    (device,) = triton["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    # The export writes the folder the server reads, on the same volume.
    out = _export_folder(export["entrypoint"] + export["command"])
    arguments = _serve_arguments(_triton_command()[2:])
    assert out == arguments.folder
    volume = {entry.split(":")[1]: entry.split(":")[0] for entry in export["volumes"]}[out]
    assert f"{volume}:{arguments.folder}:ro" in triton["volumes"] and volume in overlay["volumes"]
    assert export["image"] == _load_yaml(COMPOSE / "docker-compose.yml")["services"]["pacs-xai"]["image"]
    assert triton["depends_on"]["triton-export"]["condition"] == "service_completed_successfully"
    # The node reaches the server's gRPC port by its service name, through the real config loader.
    node = services["pacs-xai"]
    url = node["environment"]["PACS_XAI_MODEL__TRITON_URL"]
    assert url == f"triton:{arguments.grpc_port}"
    config = NodeConfig(**{**_load_yaml(COMPOSE / "node.yaml"), "model": {"triton_url": url}})
    assert config.model.triton_url == url
    assert node["depends_on"]["triton"]["condition"] == "service_healthy"
    # ... with the client installed in the node image (the triton extra, a real one of pyproject.toml).
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    assert any(r.startswith("tritonclient[grpc]") for r in extras["triton"])
    assert re.search(r"pacs_xai-\*\.whl\)\[[a-z,]*\btriton\b", " ".join(_instruction("RUN")))


def test_kubernetes_triton_deployment_asks_for_a_gpu_and_serves_what_its_init_container_exports() -> None:
    deployment = _one(_k8s_objects("triton/deployment.yaml"), "Deployment")
    service = _one(_k8s_objects("triton/service.yaml"), "Service")
    pod = deployment["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    (export,) = pod["initContainers"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert server["image"] == "pacs-xai-triton" and export["image"] == "pacs-xai"
    arguments = _serve_arguments(server["args"])
    assert server["args"] == _triton_command()[2:]  # the image's CMD, spelled out
    out = _export_folder(export["command"])
    mounts = {m["name"]: m["mountPath"] for m in export["volumeMounts"]}
    assert mounts["graphs"] == out == arguments.folder
    assert {m["name"]: m["mountPath"] for m in server["volumeMounts"]}["graphs"] == out
    ports = {port["name"]: port["containerPort"] for port in server["ports"]}
    assert ports == {"grpc": arguments.grpc_port, "http": arguments.http_port, "metrics": arguments.metrics_port}
    assert {port["targetPort"] for port in service["spec"]["ports"]} == set(ports)
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert server["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}


def test_kubernetes_triton_kustomization_builds() -> None:
    command = _kustomize()
    result = subprocess.run([*command, str(K8S / "triton")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert sorted(obj["kind"] for obj in objects) == ["Deployment", "Service"]
    assert all(obj["metadata"]["namespace"] == "pacs-xai" for obj in objects)
