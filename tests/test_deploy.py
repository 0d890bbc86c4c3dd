"""The deploy files (Docker, Kubernetes, systemd) agree with each other and with the exporter.

No Docker engine, kubectl or kustomize is needed here: every file is parsed, and every name,
path and port one file takes from another is checked against it, so a rename on either side
fails. Where kubectl or kustomize is installed, the StatefulSet variant is also built with it.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from exporter.app import apply_shard_flags
from exporter.cli import DEFAULT_LISTEN
from exporter.cli import parse_args as exporter_args
from exporter.config import ApiConfig, Config, load_config
from exporter.config.duration import parse_duration
from exporter.config.loader import UPSTREAM_RATE_LIMIT
from exporter.shard import AUTO, Shard, ShardFlags
from exporter.simulator import DemoCampaign, World
from exporter.simulator.cli import parse_args as simulator_args
from exporter.web import parse_listen_address
from tests.conftest import require_tool

REPO = Path(__file__).parent.parent
DOCKER = REPO / "deploy" / "docker"
KUBERNETES = REPO / "deploy" / "kubernetes"
BASE = KUBERNETES / "base"
STATEFULSET = KUBERNETES / "statefulset"
PROMETHEUS = REPO / "deploy" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
PROBE = PROMETHEUS / "probe.yml"
UNIT = REPO / "deploy" / "systemd" / "mailpartner-exporter.service"

EXPORTER_PORT = parse_listen_address(DEFAULT_LISTEN)[1]
CONFIG_PATH = "/etc/mailpartner-exporter/config.yaml"
JOB = "mailpartner-exporter"
PROBE_JOB = "mailpartner-probe"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def alert_jobs() -> set[str]:
    """Every ``job="..."`` the alert expressions select."""
    groups = load_yaml(ALERTS)["groups"]
    return {
        job
        for group in groups
        for rule in group["rules"]
        for job in re.findall(r'\bjob\s*=\s*"([^"]*)"', rule["expr"])
    }


def config_with_key_file(text: str, old_path: str, tmp_path: Path) -> Path:
    """``text`` written to tmp_path with its key file path replaced by a real file's."""
    assert old_path in text, f"{old_path} is not in the config"
    key = tmp_path / "api_key"
    key.write_text("demo-key\n", encoding="utf-8")
    config = tmp_path / "config.yaml"
    config.write_text(text.replace(old_path, str(key)), encoding="utf-8")
    return config


def served_port(args: list[str]) -> int:
    """The port the exporter serves on with these arguments, as its own parser reads them."""
    return parse_listen_address(exporter_args(args).listen_address)[1]


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


# --- Docker Compose --------------------------------------------------------------------------

COMPOSE = load_yaml(DOCKER / "docker-compose.yml")
SERVICES: dict[str, Any] = COMPOSE["services"]


def binds(service: dict[str, Any]) -> Iterator[tuple[Path, str]]:
    """(host path, container path) of each bind mount (short syntax) of a compose service."""
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith((".", "/")):
            yield (DOCKER / source).resolve(), target


def bind_target(service: str, host: Path) -> str:
    targets = [target for source, target in binds(SERVICES[service]) if source == host.resolve()]
    assert len(targets) == 1, f"{service} should mount {host.relative_to(REPO)} once: {targets}"
    return targets[0]


def argv(service: dict[str, Any], key: str) -> list[str]:
    value = service.get(key, [])
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def simulator_options() -> Any:
    """The simulator service's options, as its own command line parser reads them."""
    program, *args = argv(SERVICES["simulator"], "entrypoint")
    assert program == "mailpartner-simulator"
    return simulator_args(args)


def test_compose_has_the_stack() -> None:
    assert {"simulator", "exporter", "prometheus", "alertmanager", "grafana"} <= set(SERVICES)


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_compose_host_paths_exist_in_the_repo(service: str) -> None:
    definition = SERVICES[service]
    paths = [source for source, _ in binds(definition)]
    build = definition.get("build")
    if build is not None:
        context = (DOCKER / build["context"]).resolve()
        paths += [context, context / build["dockerfile"]]
    for path in paths:
        assert path.is_relative_to(REPO), f"{service}: {path} is outside the repository"
        assert path.exists(), f"{service}: {path.relative_to(REPO)} does not exist"
    for secret in definition.get("secrets", []):
        name = secret["source"] if isinstance(secret, dict) else secret
        assert (DOCKER / COMPOSE["secrets"][name]["file"]).is_file(), name


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_compose_publishes_on_loopback_only(service: str) -> None:
    for port in SERVICES[service].get("ports", []):
        assert str(port).startswith("127.0.0.1:"), f"{service} publishes {port} beyond loopback"


def test_simulator_and_exporter_run_the_built_image() -> None:
    exporter, simulator = SERVICES["exporter"], SERVICES["simulator"]
    assert exporter["image"] == simulator["image"]
    assert exporter["build"] == simulator["build"]
    assert simulator_options().demo_sends
    # The exporter keeps the image's ENTRYPOINT and CMD, so it serves on the default port.
    assert "entrypoint" not in exporter
    assert "command" not in exporter


def test_exporter_polls_the_simulator_with_its_key() -> None:
    config = load_yaml(DOCKER / "config.yaml")
    url = urlsplit(config["api"]["base_url"])
    assert url.hostname == "simulator"
    assert url.hostname in SERVICES
    assert url.port == simulator_options().listen[1]
    assert url.path == "/v1"
    # The key the exporter reads is the one the simulator accepts.
    secret_file = DOCKER / COMPOSE["secrets"]["mailpartner_api_key"]["file"]
    assert secret_file.read_text(encoding="utf-8").strip() == simulator_options().api_key


def test_compose_secret_is_where_the_config_reads_the_key() -> None:
    (secret,) = SERVICES["exporter"]["secrets"]
    if isinstance(secret, str):
        secret = {"source": secret}
    target = secret.get("target", secret["source"])
    if not target.startswith("/"):
        target = f"/run/secrets/{target}"
    assert target == load_yaml(DOCKER / "config.yaml")["api"]["api_key_file"]


def test_compose_config_is_mounted_where_the_image_reads_it() -> None:
    target = bind_target("exporter", DOCKER / "config.yaml")
    assert exporter_args(dockerfile_json("CMD")).config_file == target


def test_compose_config_passes_config_check(tmp_path: Path) -> None:
    text = (DOCKER / "config.yaml").read_text(encoding="utf-8")
    key_file = load_yaml(DOCKER / "config.yaml")["api"]["api_key_file"]
    config = config_with_key_file(text, key_file, tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "exporter", "--config.check", f"--config.file={config}"],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_config_watches_the_simulators_demo_sends(tmp_path: Path) -> None:
    text = (DOCKER / "config.yaml").read_text(encoding="utf-8")
    key_file = load_yaml(DOCKER / "config.yaml")["api"]["api_key_file"]
    config = load_config(config_with_key_file(text, key_file, tmp_path), environ={})
    # What the simulator service's `mailpartner-simulator --demo-sends` creates at start.
    sends = DemoCampaign(World(seed=simulator_options().seed)).start()
    assert [(m.id, dict(m.labels)) for m in config.messages] == [
        (send.message_id, {"campaign": send.campaign}) for send in sends
    ]


def test_prometheus_scrapes_the_exporter_under_the_alerts_job() -> None:
    prometheus = load_yaml(DOCKER / "prometheus.yml")
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert alert_jobs() == {JOB}, "the alerts select another job than the one scraped"
    job = jobs[JOB]
    assert job.get("scrape_interval", prometheus["global"]["scrape_interval"]) == "15s"
    targets = [target for config in job["static_configs"] for target in config["targets"]]
    assert [host_port(target) for target in targets] == [("exporter", image_port())]
    assert "exporter" in SERVICES


def test_prometheus_rule_files_are_the_mounted_alerts() -> None:
    prometheus = load_yaml(DOCKER / "prometheus.yml")
    assert prometheus["rule_files"] == [bind_target("prometheus", ALERTS)]
    assert bind_target("prometheus", DOCKER / "prometheus.yml") == "/etc/prometheus/prometheus.yml"


def test_prometheus_alerts_go_to_the_alertmanager_service() -> None:
    prometheus = load_yaml(DOCKER / "prometheus.yml")
    targets = [
        target
        for manager in prometheus["alerting"]["alertmanagers"]
        for config in manager["static_configs"]
        for target in config["targets"]
    ]
    assert targets == ["alertmanager:9093"]
    assert "alertmanager" in SERVICES
    alertmanager_yml = REPO / "deploy" / "prometheus" / "alertmanager.yml"
    assert bind_target("alertmanager", alertmanager_yml) == "/etc/alertmanager/alertmanager.yml"


def test_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    prometheus = load_yaml(DOCKER / "prometheus.yml")
    prometheus["rule_files"] = [str(ALERTS)]  # where the container has it mounted
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus), encoding="utf-8")
    result = subprocess.run(
        [promtool, "check", "config", str(config)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_gets_its_provisioning_dashboards_and_prometheus() -> None:
    grafana = SERVICES["grafana"]
    environment = grafana["environment"]
    assert environment["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert environment["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    provisioning = REPO / "grafana" / "provisioning"
    assert bind_target("grafana", provisioning) == "/etc/grafana/provisioning"
    dashboards = bind_target("grafana", REPO / "grafana")
    assert dashboards == "/var/lib/grafana/dashboards"
    # The provisioning files the mount brings in point back at the mounts and the services.
    for path in (provisioning / "dashboards").glob("*.y*ml"):
        for provider in load_yaml(path)["providers"]:
            assert provider["options"]["path"].startswith(dashboards), path
    for path in (provisioning / "datasources").glob("*.y*ml"):
        for source in load_yaml(path)["datasources"]:
            if source["type"] == "prometheus":
                url = urlsplit(source["url"])
                assert (url.hostname, url.port) == ("prometheus", 9090), path
                assert url.hostname in SERVICES


# --- Prometheus: probing single messages (probe.yml) -----------------------------------------


def probe_job() -> dict[str, Any]:
    (job,) = load_yaml(PROBE)["scrape_configs"]
    assert isinstance(job, dict)
    return job


def exporter_target() -> str:
    """The address deploy/prometheus/prometheus.yml scrapes the exporter at."""
    prometheus = load_yaml(PROMETHEUS / "prometheus.yml")
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    (target,) = [target for config in jobs[JOB]["static_configs"] for target in config["targets"]]
    assert isinstance(target, str)
    return target


def test_probe_config_passes_promtool_alone_and_in_prometheus_yml(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    # Added to prometheus.yml as its comment says: promtool also refuses a job name twice.
    prometheus = load_yaml(PROMETHEUS / "prometheus.yml")
    prometheus["rule_files"] = [str(ALERTS)]
    prometheus["scrape_configs"] += load_yaml(PROBE)["scrape_configs"]
    combined = tmp_path / "prometheus.yml"
    combined.write_text(yaml.safe_dump(prometheus), encoding="utf-8")
    for config in (PROBE, combined):
        result = subprocess.run(
            [promtool, "check", "config", str(config)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_probe_job_sends_message_ids_to_the_exporter_prometheus_yml_scrapes() -> None:
    job = probe_job()
    assert job["job_name"] == PROBE_JOB
    assert PROBE_JOB not in alert_jobs(), "the alerts' job is the exporter's /metrics"
    target = exporter_target()
    assert host_port(target)[1] == EXPORTER_PORT
    assert job["metrics_path"] == "/probe"
    assert job["relabel_configs"] == [
        {"source_labels": ["__address__"], "target_label": "__param_message_id"},
        {"source_labels": ["__param_message_id"], "target_label": "message_id"},
        {"target_label": "__address__", "replacement": target},
    ]
    # /probe's series carry message_id too: honoured, not renamed to exported_message_id.
    assert job["honor_labels"] is True


def test_probe_timeout_leaves_the_exporter_its_api_timeout() -> None:
    """Prometheus sends scrape_timeout as X-Prometheus-Scrape-Timeout-Seconds.

    Above the exporter's default api.timeout, a slow API ends in the exporter, which answers
    mailpartner_probe_success 0, rather than in Prometheus cutting the scrape.
    """
    job = probe_job()
    timeout = parse_duration(job["scrape_timeout"])
    assert ApiConfig().timeout < timeout < parse_duration(job["scrape_interval"])
    # Under the 5-minute staleness lookback, so the probed series do not gap between scrapes.
    assert parse_duration(job["scrape_interval"]) < 300


def test_probe_targets_are_messages_the_demo_answers() -> None:
    targets = [t for config in probe_job()["static_configs"] for t in config["targets"]]
    assert targets
    tracked = {str(message["id"]) for message in load_yaml(REPO / "config.yaml")["messages"]}
    # config.yaml's messages: `mailpartner-exporter --demo` answers for them.
    assert set(targets) <= tracked


# --- Dockerfile ------------------------------------------------------------------------------


def dockerfile_stages(path: Path = DOCKER / "Dockerfile") -> list[list[tuple[str, str]]]:
    """(INSTRUCTION, arguments) per build stage, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[list[tuple[str, str]]] = []
    for line in filter(str.strip, logical):
        instruction, _, arguments = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        elif stages:
            stages[-1].append((instruction.upper(), arguments.strip()))
    return stages


def final_stage(name: str) -> list[str]:
    return [arguments for instruction, arguments in dockerfile_stages()[-1] if instruction == name]


def dockerfile_json(name: str) -> list[str]:
    (arguments,) = final_stage(name)
    value = yaml.safe_load(arguments)  # the exec form is a JSON array
    assert isinstance(value, list), f"{name} should use the exec form: {arguments}"
    return value


def test_dockerfile_is_multi_stage_on_python_slim() -> None:
    text = (DOCKER / "Dockerfile").read_text(encoding="utf-8")
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    assert froms == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]
    build, final = dockerfile_stages()
    assert any("pip wheel" in arguments for name, arguments in build if name == "RUN")
    # The final stage installs the built wheels and nothing from an index.
    (install,) = [arguments for name, arguments in final if "pip install" in arguments]
    assert "--no-index" in install
    assert "from=build" in install


def test_dockerfile_build_copies_exist() -> None:
    for instruction, arguments in dockerfile_stages()[0]:
        if instruction == "COPY":
            *sources, _ = arguments.split()
            for source in sources:
                assert (REPO / source).exists(), source


def test_dockerfile_runs_as_a_numeric_non_root_user() -> None:
    *_, user = final_stage("USER")
    uid = user.split(":")[0]
    assert uid.isdigit(), f"USER {user} should be numeric (Kubernetes runAsNonRoot checks it)"
    assert int(uid) != 0
    deployment = kubernetes_doc("deployment.yaml")["spec"]["template"]["spec"]
    assert deployment["securityContext"]["runAsUser"] == int(uid)


def image_port() -> int:
    return served_port(dockerfile_json("CMD"))


def test_dockerfile_exposes_and_probes_the_exporter_port() -> None:
    assert image_port() == EXPORTER_PORT
    assert final_stage("EXPOSE") == [str(image_port())]
    (healthcheck,) = final_stage("HEALTHCHECK")
    assert f"127.0.0.1:{image_port()}/-/healthy" in healthcheck
    assert "urllib" in healthcheck
    assert "curl" not in healthcheck
    assert "wget" not in healthcheck


def test_dockerfile_entrypoint_and_cmd() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert dockerfile_json("ENTRYPOINT") == ["mailpartner-exporter"]
    assert "mailpartner-exporter" in scripts["scripts"]
    assert "mailpartner-simulator" in scripts["scripts"]
    assert dockerfile_json("CMD") == [f"--config.file={CONFIG_PATH}"]
    assert exporter_args(dockerfile_json("CMD")).config_file == CONFIG_PATH


def test_dockerfile_bakes_in_no_config_or_key() -> None:
    for instruction, arguments in dockerfile_stages()[-1]:
        if instruction in {"COPY", "ADD"}:
            lowered = arguments.lower()
            for forbidden in ("config.yaml", "key", "secret", "deploy/"):
                assert forbidden not in lowered, f"{instruction} {arguments}"


# --- Kubernetes ------------------------------------------------------------------------------


def kubernetes_doc(name: str) -> dict[str, Any]:
    document = load_yaml(BASE / name)
    assert isinstance(document, dict), name
    return document


def container() -> dict[str, Any]:
    (exporter,) = kubernetes_doc("deployment.yaml")["spec"]["template"]["spec"]["containers"]
    return exporter


def subset(small: dict[str, str], big: dict[str, str]) -> bool:
    return bool(small) and all(big.get(key) == value for key, value in small.items())


def test_kustomization_resources_exist_without_the_secret_example() -> None:
    kustomization = kubernetes_doc("kustomization.yaml")
    resources = kustomization["resources"]
    assert "namespace" not in kustomization
    for resource in resources:
        assert (BASE / resource).is_file(), resource
    assert "secret.example.yaml" not in resources
    on_disk = {path.name for path in BASE.glob("*.yaml")}
    assert set(resources) == on_disk - {"kustomization.yaml", "secret.example.yaml"}
    (labels,) = kustomization["labels"]
    assert labels["pairs"] == {"app.kubernetes.io/name": "mailpartner-exporter"}


def test_deployment_shape() -> None:
    deployment = kubernetes_doc("deployment.yaml")
    assert deployment["spec"]["replicas"] == 1
    assert container()["image"] == "mailpartner-exporter:latest"
    assert container()["args"] == [f"--config.file={CONFIG_PATH}"]
    resources = container()["resources"]
    assert set(resources["requests"]) == {"cpu", "memory"}
    assert set(resources["limits"]) >= {"memory"}


def test_deployment_selects_its_own_pods() -> None:
    spec = kubernetes_doc("deployment.yaml")["spec"]
    assert subset(spec["selector"]["matchLabels"], spec["template"]["metadata"]["labels"])


def test_service_selects_the_deployments_pods() -> None:
    service = kubernetes_doc("service.yaml")
    pods = kubernetes_doc("deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    assert service["metadata"]["name"] == "mailpartner-exporter"
    assert subset(service["spec"]["selector"], pods)


def test_service_port_is_the_container_port() -> None:
    (port,) = kubernetes_doc("service.yaml")["spec"]["ports"]
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert ports == {"http": served_port(container()["args"])}
    assert port["name"] == "http"
    assert port["targetPort"] in {"http", ports["http"]}


def test_servicemonitor_scrapes_the_service_under_the_alerts_job() -> None:
    monitor = kubernetes_doc("servicemonitor.yaml")
    service = kubernetes_doc("service.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "ServiceMonitor"
    assert subset(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    names = {port["name"] for port in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in names
        assert endpoint.get("path", "/metrics") == "/metrics"
    # Without jobLabel the operator names the job after the Service: the alerts' job.
    assert "jobLabel" not in monitor["spec"]
    assert alert_jobs() == {service["metadata"]["name"]}


def test_deployment_mounts_the_configmap_and_the_secret() -> None:
    pod = kubernetes_doc("deployment.yaml")["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    configmap = kubernetes_doc("configmap.yaml")
    secret = kubernetes_doc("secret.example.yaml")
    assert secret["kind"] == "Secret"
    assert configmap["kind"] == "ConfigMap"
    sources = {
        (kind, volume[kind].get("name") or volume[kind].get("secretName"))
        for volume in volumes.values()
        for kind in ("configMap", "secret")
        if kind in volume
    }
    assert sources == {
        ("configMap", configmap["metadata"]["name"]),
        ("secret", secret["metadata"]["name"]),
    }
    for mount in container()["volumeMounts"]:
        assert mount["name"] in volumes


def mount_of(kind: str) -> str:
    pod = kubernetes_doc("deployment.yaml")["spec"]["template"]["spec"]
    (name,) = [volume["name"] for volume in pod["volumes"] if kind in volume]
    (path,) = [mount["mountPath"] for mount in container()["volumeMounts"] if mount["name"] == name]
    return path


def test_configmap_config_is_valid_and_reads_the_secret(tmp_path: Path) -> None:
    configmap = kubernetes_doc("configmap.yaml")
    (file_name,) = configmap["data"]
    config_file = exporter_args(container()["args"]).config_file
    assert f"{mount_of('configMap')}/{file_name}" == config_file
    text = configmap["data"][file_name]
    key_file = yaml.safe_load(text)["api"]["api_key_file"]
    secret = kubernetes_doc("secret.example.yaml")
    (secret_key,) = secret.get("stringData") or secret["data"]
    assert secret_key == "api_key"
    assert key_file == f"{mount_of('secret')}/{secret_key}"
    config = load_config(config_with_key_file(text, key_file, tmp_path), environ={})
    assert config.api.api_key is not None


def test_probes_hit_healthy_and_ready_on_the_http_port() -> None:
    exporter = container()
    assert exporter["livenessProbe"]["httpGet"] == {"path": "/-/healthy", "port": "http"}
    assert exporter["readinessProbe"]["httpGet"] == {"path": "/-/ready", "port": "http"}
    assert "http" in {port["name"] for port in exporter["ports"]}


def test_pod_is_locked_down() -> None:
    pod = kubernetes_doc("deployment.yaml")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    context = container()["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert "add" not in context["capabilities"]
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}


def generate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(KUBERNETES / "generate.py"), *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        timeout=60,
    )


def test_prometheusrule_is_up_to_date_with_the_alerts() -> None:
    result = generate("--check")
    assert result.returncode == 0, result.stderr
    rule = kubernetes_doc("prometheusrule.yaml")
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"]["groups"] == load_yaml(ALERTS)["groups"]
    header = (BASE / "prometheusrule.yaml").read_text(encoding="utf-8").splitlines()[0]
    assert header.startswith("# GENERATED by deploy/kubernetes/generate.py")


def test_generate_check_fails_on_a_stale_rule(tmp_path: Path) -> None:
    output = tmp_path / "prometheusrule.yaml"
    assert generate("--check", f"--output={output}").returncode == 1  # missing
    assert generate(f"--output={output}").returncode == 0
    assert generate("--check", f"--output={output}").returncode == 0
    output.write_text(output.read_text(encoding="utf-8").replace("for: 5m", "for: 6m"))
    result = generate("--check", f"--output={output}")
    assert result.returncode == 1
    assert "out of date" in result.stderr


# --- Kubernetes: the sharded StatefulSet variant ----------------------------------------------


def overlay_doc(name: str) -> dict[str, Any]:
    document = load_yaml(STATEFULSET / name)
    assert isinstance(document, dict), name
    return document


def overlay_resources() -> dict[str, dict[str, Any]]:
    """kind -> the overlay's own resource of that kind (one each)."""
    documents = [
        overlay_doc(resource)
        for resource in overlay_doc("kustomization.yaml")["resources"]
        if (STATEFULSET / resource).is_file()
    ]
    kinds = {document["kind"]: document for document in documents}
    assert len(kinds) == len(documents), "one resource of each kind"
    return kinds


def statefulset() -> dict[str, Any]:
    return overlay_resources()["StatefulSet"]


def shard_container() -> dict[str, Any]:
    (exporter,) = statefulset()["spec"]["template"]["spec"]["containers"]
    return exporter


def headless_service() -> dict[str, Any]:
    return overlay_resources()["Service"]


def test_statefulset_overlay_resources_exist() -> None:
    kustomization = overlay_doc("kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    assert "../base" in resources
    assert (STATEFULSET / "../base" / "kustomization.yaml").is_file()
    for resource in resources:
        assert (STATEFULSET / resource).exists(), resource
    on_disk = {path.name for path in STATEFULSET.glob("*.yaml")} - {"kustomization.yaml"}
    assert {r for r in resources if r != "../base"} == on_disk
    assert set(overlay_resources()) == {"StatefulSet", "Service"}


def test_statefulset_overlay_deletes_the_base_deployment() -> None:
    (patch,) = overlay_doc("kustomization.yaml")["patches"]
    deleted = yaml.safe_load(patch["patch"])
    assert deleted["$patch"] == "delete"
    base = kubernetes_doc("deployment.yaml")
    assert "deployment.yaml" in kubernetes_doc("kustomization.yaml")["resources"]
    assert (deleted["apiVersion"], deleted["kind"]) == (base["apiVersion"], base["kind"])
    assert deleted["metadata"]["name"] == base["metadata"]["name"]
    # The StatefulSet takes the Deployment's name: pods are <name>-0, <name>-1, ...
    assert statefulset()["metadata"]["name"] == base["metadata"]["name"]


def shard_flags() -> ShardFlags:
    args = exporter_args(shard_container()["args"])
    return ShardFlags(args.shard_count, args.shard_index)


def test_statefulset_has_one_pod_per_shard_indexed_by_its_ordinal() -> None:
    flags = shard_flags()
    replicas = statefulset()["spec"]["replicas"]
    assert replicas > 1
    assert flags.count == str(replicas)
    assert flags.index == AUTO
    # Each pod, named <statefulset>-<ordinal>, takes a different shard: all of them together.
    name = statefulset()["metadata"]["name"]
    shards = [
        apply_shard_flags(Config("x"), flags, {"HOSTNAME": f"{name}-{ordinal}"}).shard
        for ordinal in range(replicas)
    ]
    assert shards == [Shard(replicas, index) for index in range(replicas)]


def test_statefulset_pod_template_is_the_base_deployments_plus_the_shard_flags() -> None:
    template = statefulset()["spec"]["template"]
    base = kubernetes_doc("deployment.yaml")["spec"]["template"]
    (exporter,) = template["spec"]["containers"]
    args = exporter["args"]
    assert args[: len(container()["args"])] == container()["args"]
    extra = args[len(container()["args"]) :]
    assert sorted(arg.split("=")[0] for arg in extra) == ["--shard.count", "--shard.index"]
    # Same probes, resources, security contexts, mounts and volumes as the base.
    assert {**template, "spec": {**template["spec"], "containers": []}} == {
        **base,
        "spec": {**base["spec"], "containers": []},
    }
    assert {**exporter, "args": container()["args"]} == container()


def test_statefulset_selects_its_pods_and_the_services_find_them() -> None:
    spec = statefulset()["spec"]
    pods = spec["template"]["metadata"]["labels"]
    assert subset(spec["selector"]["matchLabels"], pods)
    assert spec["selector"] == kubernetes_doc("deployment.yaml")["spec"]["selector"]
    # The base's Service (the one scraped, under the alerts' job) selects the shards.
    assert subset(kubernetes_doc("service.yaml")["spec"]["selector"], pods)
    # The governing Service is headless, in the overlay, and selects them too.
    service = headless_service()
    assert spec["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    assert subset(service["spec"]["selector"], pods)
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in shard_container()["ports"]}


def test_servicemonitor_does_not_scrape_the_shards_twice() -> None:
    selector = kubernetes_doc("servicemonitor.yaml")["spec"]["selector"]["matchLabels"]
    assert subset(selector, kubernetes_doc("service.yaml")["metadata"]["labels"])
    assert not subset(selector, headless_service()["metadata"].get("labels", {}))


def test_statefulset_shards_share_the_budget_of_one_egress_ip() -> None:
    """Pods usually leave through one NAT address: their budgets must add up under the limit."""
    text = kubernetes_doc("configmap.yaml")["data"]["config.yaml"]
    per_shard = yaml.safe_load(text)["api"]["max_requests_per_minute"]
    assert statefulset()["spec"]["replicas"] * per_shard <= UPSTREAM_RATE_LIMIT


def test_statefulset_overlay_builds(tmp_path: Path) -> None:
    """Where kubectl (or kustomize) is installed, the overlay builds into the expected set."""
    kubectl, kustomize = shutil.which("kubectl"), shutil.which("kustomize")
    if kubectl is None and kustomize is None:
        pytest.skip("neither kubectl nor kustomize is installed")
    command = [kubectl, "kustomize"] if kubectl else [str(kustomize), "build"]
    result = subprocess.run(
        [*command, str(STATEFULSET)], capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0, result.stderr
    built = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    kinds = Counter(doc["kind"] for doc in built)
    assert kinds == Counter(
        {
            "ConfigMap": 1,
            "Service": 2,
            "StatefulSet": 1,
            "ServiceMonitor": 1,
            "PrometheusRule": 1,
        }
    )
    (built_set,) = [doc for doc in built if doc["kind"] == "StatefulSet"]
    assert built_set == statefulset()


# --- systemd ---------------------------------------------------------------------------------


def unit() -> dict[str, dict[str, list[str]]]:
    """section -> key -> every value given (systemd keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


HARDENING = {
    "Type": "simple",
    "Restart": "on-failure",
    "DynamicUser": "yes",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
    "StateDirectory": "mailpartner-exporter",
    "WorkingDirectory": "/var/lib/mailpartner-exporter",
}


@pytest.mark.parametrize("key", sorted(HARDENING))
def test_systemd_unit_setting(key: str) -> None:
    assert unit()["Service"].get(key) == [HARDENING[key]]


def test_systemd_unit_reloads_with_the_signal_the_exporter_reloads_on() -> None:
    # tests/test_reload.py shows a running exporter reloading on SIGHUP.
    assert unit()["Service"]["ExecReload"] == ["/bin/kill -HUP $MAINPID"]


def test_systemd_unit_filters_system_calls() -> None:
    assert "@system-service" in unit()["Service"]["SystemCallFilter"]


def test_systemd_unit_runs_the_exporter_on_its_config() -> None:
    (exec_start,) = unit()["Service"]["ExecStart"]
    program, *args = shlex.split(exec_start)
    assert program == "/usr/local/bin/mailpartner-exporter"
    assert args == [f"--config.file={CONFIG_PATH}"]
    assert exporter_args(args).config_file == CONFIG_PATH


def test_systemd_unit_hands_over_the_key_as_a_credential() -> None:
    (credential,) = unit()["Service"]["LoadCredential"]
    name, _, source = credential.partition(":")
    assert source == "/etc/mailpartner-exporter/api_key"
    # The comment tells what api.api_key_file must be: where systemd puts the credential.
    path = f"/run/credentials/{UNIT.name}/{name}"
    assert re.search(rf"api_key_file:\s*{re.escape(path)}\s*$", UNIT.read_text(), re.MULTILINE)
    assert unit()["Install"]["WantedBy"] == ["multi-user.target"]


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that ExecStart exists: point it at a stand-in, keep everything else.
    program = tmp_path / "mailpartner-exporter"
    program.write_text("#!/bin/sh\n", encoding="utf-8")
    program.chmod(0o755)
    copy = tmp_path / UNIT.name
    text = UNIT.read_text(encoding="utf-8")
    copy.write_text(text.replace("/usr/local/bin/mailpartner-exporter", str(program)))
    result = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, check=False, timeout=60
    )
    # Unknown keys and bad values are only warnings (exit 0): any line about the unit fails.
    complaints = [line for line in result.stderr.splitlines() if UNIT.name in line]
    assert result.returncode == 0, result.stderr
    assert complaints == []
