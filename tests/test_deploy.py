"""The deploy files work: each goes through the tool that reads it, or through the exporter.

promtool checks the Prometheus files, systemd-analyze the unit, `kubectl kustomize` builds the
Kubernetes variants (the assertions are on the objects it builds) and the exporter's own
--config.check reads every shipped configuration. No Docker engine runs here: of the Dockerfile
and the compose file, only what a container would get wrong is checked (users, ports, paths).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from exporter.cli import DEFAULT_LISTEN
from exporter.cli import parse_args as exporter_args
from exporter.config.loader import UPSTREAM_RATE_LIMIT, load_config
from exporter.config.model import PollingConfig
from exporter.simulator import SimulatorServer, World
from exporter.sources.registry import available
from exporter.web import parse_listen_address
from tests.conftest import require_tool

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "deploy" / "docker"
BASE, STATEFULSET = REPO / "deploy/kubernetes/base", REPO / "deploy/kubernetes/statefulset"
PROMETHEUS = REPO / "deploy" / "prometheus"
ALERTS, PROBE = PROMETHEUS / "alerts.yml", PROMETHEUS / "probe.yml"
UNIT = REPO / "deploy" / "systemd" / "mailpartner-exporter.service"
EXPORTER_PORT = parse_listen_address(DEFAULT_LISTEN)[1]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


COMPOSE = load_yaml(DOCKER / "docker-compose.yml")
SERVICES: dict[str, Any] = COMPOSE["services"]
DOCKER_CONFIG = (DOCKER / "config.yaml").read_text(encoding="utf-8")
COMPOSE_KEY = (DOCKER / COMPOSE["secrets"]["mailpartner_api_key"]["file"]).read_text().strip()
SECRET_EXAMPLE = load_yaml(BASE / "secret.example.yaml")
((SECRET_NAME, SECRET_KEY),) = SECRET_EXAMPLE["stringData"].items()
(PROBE_JOB,) = load_yaml(PROBE)["scrape_configs"]


def environment(**extra: str) -> dict[str, str]:
    # This checkout's exporter, whatever is installed; no key from the caller's environment
    # may stand in for the key file a config names.
    env = {k: v for k, v in os.environ.items() if k != "MAILPARTNER_API_KEY"}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def run(*command: object, **env: str) -> subprocess.CompletedProcess[str]:
    argv, variables = [str(part) for part in command], environment(**env)
    return subprocess.run(
        argv, capture_output=True, text=True, env=variables, timeout=60, check=False
    )


def with_key_file(text: str, key: str, tmp_path: Path) -> Path:
    """``text`` written to tmp_path, its api.api_key_file moved to a file there holding ``key``."""
    (tmp_path / "api_key").write_text(f"{key}\n", encoding="utf-8")
    old = yaml.safe_load(text)["api"]["api_key_file"]
    config = tmp_path / "config.yaml"
    config.write_text(text.replace(old, str(tmp_path / "api_key")), encoding="utf-8")
    return config


def served_port(args: list[str]) -> int:
    """The port the exporter serves on with these arguments, as its own parser reads them."""
    return parse_listen_address(exporter_args(args).listen_address)[1]


def alert_job() -> str:
    """The one ``job="..."`` the alert expressions select."""
    rules = [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]
    (job,) = {job for rule in rules for job in re.findall(r'\bjob="([^"]*)"', rule["expr"])}
    return str(job)


def targets(job: dict[str, Any]) -> list[str]:
    return [target for config in job["static_configs"] for target in config["targets"]]


# --- The exporter's configurations -----------------------------------------------------------


def shipped_config(name: str, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A shipped config, its key where it expects it, and the environment to run it in."""
    if name == "docker":  # the compose secret's file
        return with_key_file(DOCKER_CONFIG, COMPOSE_KEY, tmp_path), {}
    if name == "kubernetes":  # the example Secret's
        return with_key_file(configmap(BASE), SECRET_KEY, tmp_path), {}
    return REPO / "config.yaml", {"MAILPARTNER_API_KEY": "demo-key"}  # as its comment says


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["config.yaml", "docker", "kubernetes"])
def test_shipped_exporter_config_passes_config_check(name: str, tmp_path: Path) -> None:
    config, env = shipped_config(name, tmp_path)
    result = run(sys.executable, "-m", "exporter", "--config.file", config, "--config.check", **env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", "a shipped config should draw no warning"
    messages = len(load_yaml(config)["messages"])
    assert re.fullmatch(
        rf"{re.escape(str(config))}: OK, {messages} messages[ ,].*\n", result.stdout
    )


# --- Docker Compose (no engine here: the files are checked against each other) ---------------


def binds(service: str) -> dict[Path, str]:
    """host path -> container path of each bind mount (short syntax) of a compose service."""
    volumes = [volume.split(":") for volume in SERVICES[service].get("volumes", [])]
    return {(DOCKER / v[0]).resolve(): v[1] for v in volumes if v[0].startswith((".", "/"))}


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_compose_host_paths_exist_and_ports_stay_on_loopback(service: str) -> None:
    definition = SERVICES[service]
    paths = list(binds(service))
    if build := definition.get("build"):
        paths += [(DOCKER / build["context"]).resolve(), REPO / build["dockerfile"]]
    for secret in definition.get("secrets", []):
        paths.append((DOCKER / COMPOSE["secrets"][secret["source"]]["file"]).resolve())
    for path in paths:
        assert path.is_relative_to(REPO), f"{service}: {path} is outside the repository"
        assert path.exists(), f"{service}: {path} does not exist"
    for port in definition.get("ports", []):
        assert str(port).startswith("127.0.0.1:"), f"{service} publishes {port} beyond loopback"


def test_compose_exporter_finds_its_config_and_key_where_compose_puts_them() -> None:
    exporter = SERVICES["exporter"]
    # It keeps the image's ENTRYPOINT and CMD: the mounted config, the default port.
    assert "entrypoint" not in exporter and "command" not in exporter
    assert binds("exporter")[DOCKER / "config.yaml"] == exporter_args(image_cmd()).config_file
    (secret,) = exporter["secrets"]
    target = secret.get("target", f"/run/secrets/{secret['source']}")
    assert target == yaml.safe_load(DOCKER_CONFIG)["api"]["api_key_file"]
    # The simulator runs from the same image, a program the package installs.
    assert SERVICES["simulator"]["build"] == exporter["build"]
    assert SERVICES["simulator"]["entrypoint"][0] in SCRIPTS


@pytest.mark.e2e
def test_compose_exporter_polls_every_message_of_the_compose_simulator(tmp_path: Path) -> None:
    """The simulator started as compose starts it; the exporter's config and key as mounted."""
    base_url = yaml.safe_load(DOCKER_CONFIG)["api"]["base_url"]
    _, *args = SERVICES["simulator"]["entrypoint"]
    listen = args.index("--listen") + 1
    assert urlsplit(base_url).hostname in SERVICES
    assert urlsplit(base_url).port == int(args[listen].rpartition(":")[2])
    args[listen] = "127.0.0.1:0"  # any free port: the machine may be shared
    command = [sys.executable, "-m", "exporter.simulator", *args]
    simulator = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=environment())
    try:
        assert simulator.stdout is not None
        served = re.search(r"listening on (\S+);", simulator.stdout.readline())
        assert served, "the simulator did not start"
        config = with_key_file(DOCKER_CONFIG.replace(base_url, served[1]), COMPOSE_KEY, tmp_path)
        result = run(sys.executable, "-m", "exporter", "--config.file", config, "--once")
    finally:
        simulator.terminate()
        simulator.communicate(timeout=10)
    assert result.returncode == 0, result.stderr  # --once: non-zero if any poll failed
    succeeded = r'^mailpartner_message_poll_success{.*message_id="(\w+)".*} 1'
    polled = set(re.findall(succeeded, result.stdout, flags=re.MULTILINE))
    assert polled == {str(message["id"]) for message in load_yaml(config)["messages"]}


def test_compose_monitoring_finds_its_files_and_services() -> None:
    prometheus = load_yaml(DOCKER / "prometheus.yml")
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert targets(jobs[alert_job()]) == [f"exporter:{served_port(image_cmd())}"]
    (manager,) = prometheus["alerting"]["alertmanagers"]
    assert targets(manager) == ["alertmanager:9093"]
    assert {"exporter", "alertmanager"} <= set(SERVICES)
    # Mounted where the official images read them by default.
    assert binds("prometheus")[DOCKER / "prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert prometheus["rule_files"] == [binds("prometheus")[ALERTS]]
    alertmanager = binds("alertmanager")[PROMETHEUS / "alertmanager.yml"]
    assert alertmanager == "/etc/alertmanager/alertmanager.yml"
    provisioning = REPO / "grafana" / "provisioning"
    assert binds("grafana")[provisioning] == "/etc/grafana/provisioning"
    dashboards = binds("grafana")[REPO / "grafana"]
    for path in (provisioning / "dashboards").glob("*.y*ml"):
        for provider in load_yaml(path)["providers"]:
            assert provider["options"]["path"].startswith(dashboards), path
    for path in (provisioning / "datasources").glob("*.y*ml"):
        for source in load_yaml(path)["datasources"]:
            if source["type"] == "prometheus":
                url = urlsplit(source["url"])
                assert (url.hostname, url.port) == ("prometheus", 9090), path
                assert url.hostname in SERVICES


# --- Prometheus ------------------------------------------------------------------------------


@pytest.mark.e2e
def test_prometheus_files_pass_promtool(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    checks = [("rules", ALERTS), ("config", PROMETHEUS / "prometheus.yml"), ("config", PROBE)]
    # The docker one with its rules where the container has them mounted; prometheus.yml with
    # probe.yml's job added as its comment says (promtool refuses a job name twice).
    extra_jobs = {DOCKER / "prometheus.yml": [], PROMETHEUS / "prometheus.yml": [PROBE_JOB]}
    for number, (source, jobs) in enumerate(extra_jobs.items()):
        prometheus = load_yaml(source)
        prometheus |= {"rule_files": [str(ALERTS)]}
        prometheus["scrape_configs"] += jobs
        copy = tmp_path / f"prometheus-{number}.yml"
        copy.write_text(yaml.safe_dump(prometheus), encoding="utf-8")
        checks.append(("config", copy))
    for check, path in checks:
        result = run(promtool, "check", check, path)
        assert result.returncode == 0, f"{path}: {result.stdout}{result.stderr}"
        assert "SUCCESS" in result.stdout + result.stderr


def relabel(labels: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, str]:
    """What Prometheus makes of a target's ``labels`` with these (default regex) replace rules."""
    for rule in rules:
        assert rule.keys() <= {"source_labels", "target_label", "replacement"}, rule
        value = ";".join(labels[name] for name in rule.get("source_labels", []))
        replacement = rule.get("replacement", "$1").replace("$1", value)
        labels = {**labels, rule["target_label"]: replacement}
    return labels


def seconds(duration: str) -> int:
    return int(duration[:-1]) * {"s": 1, "m": 60, "h": 3600}[duration[-1]]


def test_probe_job_asks_the_exporter_about_messages_in_time() -> None:
    assert PROBE_JOB["job_name"] != alert_job(), "the alerts' job is the exporter's /metrics"
    prometheus = load_yaml(PROMETHEUS / "prometheus.yml")
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    (exporter,) = targets(jobs[alert_job()])
    assert int(exporter.rpartition(":")[2]) == EXPORTER_PORT
    # Each target, a message ID, becomes a /probe?message_id= scrape of that exporter.
    assert PROBE_JOB["metrics_path"] == "/probe"
    assert relabel({"__address__": "300"}, PROBE_JOB["relabel_configs"]) == {
        "__address__": exporter,
        "__param_message_id": "300",
        "message_id": "300",
    }
    # /probe's series carry message_id too: honoured, not renamed to exported_message_id.
    assert PROBE_JOB["honor_labels"] is True
    # config.yaml's messages, which `mailpartner-exporter --demo` answers for.
    config = load_yaml(REPO / "config.yaml")
    probed = targets(PROBE_JOB)
    assert probed and set(probed) <= {str(message["id"]) for message in config["messages"]}
    # Prometheus sends scrape_timeout as X-Prometheus-Scrape-Timeout-Seconds. Above api.timeout,
    # a slow API ends in the exporter (mailpartner_probe_success 0), not in Prometheus cutting
    # the scrape; under the 5-minute staleness lookback, probed series do not gap.
    timeout, interval = seconds(PROBE_JOB["scrape_timeout"]), seconds(PROBE_JOB["scrape_interval"])
    assert seconds(config["api"]["timeout"]) < timeout < interval < 300


# --- Dockerfile (no engine here: what a built image would get wrong) -------------------------


def final_stage(instruction: str) -> list[str]:
    """The arguments of each ``instruction`` of the final stage, continuation lines joined."""
    lines = (DOCKER / "Dockerfile").read_text(encoding="utf-8").splitlines()
    text = re.sub(r"\\\n", " ", "\n".join(line for line in lines if not line.startswith("#")))
    *_, stage = re.split(r"^FROM\s.*$", text, flags=re.MULTILINE)
    return re.findall(rf"^\s*{instruction}\s+(.*?)\s*$", stage, flags=re.MULTILINE)


def image_cmd() -> list[str]:
    (cmd,) = final_stage("CMD")
    return list(json.loads(cmd))  # the exec form: no shell in between


def image_uid() -> int:
    (user,) = final_stage("USER")
    uid = user.split(":")[0]
    assert uid.isdigit(), f"USER {user} should be numeric: Kubernetes' runAsNonRoot checks it"
    return int(uid)


def test_dockerfile_runs_the_exporter_as_non_root_on_its_port_without_config_or_key() -> None:
    assert image_uid() != 0
    assert json.loads(final_stage("ENTRYPOINT")[0])[0] in SCRIPTS
    text = (DOCKER / "Dockerfile").read_text(encoding="utf-8")
    for copy in re.findall(r"^(?:COPY|ADD)\s+(.*)$", text, flags=re.MULTILINE):
        *sources, _ = [part for part in copy.split() if not part.startswith("--")]
        if "--from=" not in copy:
            assert all((REPO / source).exists() for source in sources), f"COPY {copy}"
    # Into the final image: nothing of the build context that is or holds a config or key.
    for copy in final_stage("COPY") + final_stage("ADD"):
        *sources, _ = [part for part in copy.split() if not part.startswith("--")]
        baked = [s for s in sources if re.search(r"^\.?/?$|config\.ya?ml|key|secret|deploy", s)]
        assert "--from=" in copy or not baked, f"{copy}: a config or key in the image"
    assert served_port(image_cmd()) == EXPORTER_PORT
    assert final_stage("EXPOSE") == [str(EXPORTER_PORT)]
    (healthcheck,) = final_stage("HEALTHCHECK")
    assert f"127.0.0.1:{EXPORTER_PORT}/-/healthy" in healthcheck
    # The slim Python image has neither: the check would always fail.
    assert "curl" not in healthcheck and "wget" not in healthcheck


# --- Kubernetes ------------------------------------------------------------------------------

KUBECTL = shutil.which("kubectl")


def ident(document: dict[str, Any]) -> tuple[str, str]:
    return document["kind"], document["metadata"]["name"]


def resource_files(directory: Path) -> list[dict[str, Any]]:
    """What kustomize builds from ``directory``, by hand: these kustomizations only list
    resources and delete one (the labels `labels:` adds are in the files already)."""
    kustomization = load_yaml(directory / "kustomization.yaml")
    objects: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        path = directory / resource
        objects += resource_files(path) if path.is_dir() else [load_yaml(path)]
    for patch in kustomization.get("patches", []):
        deleted = yaml.safe_load(patch["patch"])
        assert deleted.pop("$patch") == "delete", "only deletions are applied by hand"
        objects = [document for document in objects if ident(document) != ident(deleted)]
    return objects


@functools.cache
def kustomize(directory: Path) -> list[dict[str, Any]]:
    """What `kubectl kustomize directory` builds: by kubectl where installed, else from the
    files (CI machines may lack kubectl, which Debian does not package)."""
    if KUBECTL is None:
        return resource_files(directory)
    result = run(KUBECTL, "kustomize", directory)
    assert result.returncode == 0, result.stderr
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def one(directory: Path, kind: str) -> dict[str, Any]:
    (document,) = [document for document in kustomize(directory) if document["kind"] == kind]
    return document


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (exporter,) = workload["spec"]["template"]["spec"]["containers"]
    return exporter  # type: ignore[no-any-return]


def subset(small: dict[str, str], big: dict[str, str]) -> bool:
    return bool(small) and small.items() <= big.items()


def configmap(directory: Path) -> str:
    return str(one(directory, "ConfigMap")["data"]["config.yaml"])


@pytest.mark.e2e
def test_kubectl_kustomize_builds_the_same_objects() -> None:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: the Kubernetes tests read the files instead")
    for directory in (BASE, STATEFULSET):
        built, by_hand = kustomize(directory), resource_files(directory)
        assert sorted(built, key=ident) == sorted(by_hand, key=ident), directory


@pytest.mark.e2e
def test_kustomizations_build_the_stack_without_a_secret_or_namespace() -> None:
    """The Secret is the user's to create: an applied example would replace their key."""
    kinds = {d: Counter(kind for kind, _ in map(ident, kustomize(d))) for d in (BASE, STATEFULSET)}
    common = {"ConfigMap": 1, "Service": 1, "ServiceMonitor": 1, "PrometheusRule": 1}
    assert kinds[BASE] == {**common, "Deployment": 1}
    assert kinds[STATEFULSET] == {**common, "Service": 2, "StatefulSet": 1}
    for document in kustomize(BASE) + kustomize(STATEFULSET):
        assert "namespace" not in document["metadata"], "an overlay sets it"


@pytest.mark.e2e
def test_service_servicemonitor_and_probes_reach_the_port_the_exporter_serves() -> None:
    deployment, service = one(BASE, "Deployment"), one(BASE, "Service")
    pods = deployment["spec"]["template"]["metadata"]["labels"]
    assert subset(deployment["spec"]["selector"]["matchLabels"], pods)
    assert subset(service["spec"]["selector"], pods)
    exporter = container(deployment)
    ports = {port["name"]: port["containerPort"] for port in exporter["ports"]}
    assert ports == {"http": served_port(exporter["args"])}
    for port in service["spec"]["ports"]:
        assert ports.get(port["targetPort"], port["targetPort"]) == ports["http"]
    for probe, path in (("livenessProbe", "/-/healthy"), ("readinessProbe", "/-/ready")):
        get = exporter[probe]["httpGet"]
        assert (get["path"], ports.get(get["port"], get["port"])) == (path, ports["http"])
    monitor = one(BASE, "ServiceMonitor")
    assert subset(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
        assert endpoint.get("path", "/metrics") == "/metrics"
    # Without jobLabel the operator names the job after the Service: the alerts' job.
    assert "jobLabel" not in monitor["spec"]
    assert service["metadata"]["name"] == alert_job()


@pytest.mark.e2e
def test_deployment_runs_one_locked_down_non_root_pod() -> None:
    deployment = one(BASE, "Deployment")
    # A second poller would double the requests counted against the API's per-IP limit.
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]["securityContext"]
    assert (pod["runAsNonRoot"], pod["runAsUser"]) == (True, image_uid())
    exporter = container(deployment)
    context = exporter["securityContext"]
    assert (context["runAsNonRoot"], context["readOnlyRootFilesystem"]) == (True, True)
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    for seccomp in (pod["seccompProfile"], context["seccompProfile"]):
        assert seccomp == {"type": "RuntimeDefault"}
    assert {"cpu", "memory"} <= set(exporter["resources"]["requests"])
    assert "memory" in exporter["resources"]["limits"]


@pytest.mark.e2e
def test_configmap_and_secret_are_mounted_where_the_exporter_reads_them() -> None:
    deployment, config = one(BASE, "Deployment"), one(BASE, "ConfigMap")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container(deployment)["volumeMounts"]}
    assert set(mounts) <= set(volumes)
    (name,) = [name for name, volume in volumes.items() if "configMap" in volume]
    assert volumes[name]["configMap"]["name"] == config["metadata"]["name"]
    (file_name,) = config["data"]
    config_file = exporter_args(container(deployment)["args"]).config_file
    assert f"{mounts[name]}/{file_name}" == config_file
    # The Secret the README has users create, mounted where the config reads the key.
    (name,) = [name for name, volume in volumes.items() if "secret" in volume]
    assert volumes[name]["secret"]["secretName"] == SECRET_EXAMPLE["metadata"]["name"]
    key_file = yaml.safe_load(configmap(BASE))["api"]["api_key_file"]
    assert key_file == f"{mounts[name]}/{SECRET_NAME}"


def generate(*args: str) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, REPO / "deploy/kubernetes/generate.py", *args)


@pytest.mark.e2e
def test_prometheusrule_is_up_to_date_with_the_alerts() -> None:
    result = generate("--check")
    assert result.returncode == 0, result.stderr
    rule = one(BASE, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == load_yaml(ALERTS)["groups"]
    header = (BASE / "prometheusrule.yaml").read_text(encoding="utf-8").splitlines()[0]
    assert header.startswith("# GENERATED by deploy/kubernetes/generate.py")


@pytest.mark.e2e
def test_generate_check_fails_on_a_stale_rule(tmp_path: Path) -> None:
    output = tmp_path / "prometheusrule.yaml"
    assert generate("--check", f"--output={output}").returncode == 1  # missing
    assert generate(f"--output={output}").returncode == 0
    assert generate("--check", f"--output={output}").returncode == 0
    output.write_text(output.read_text(encoding="utf-8").replace("for: 5m", "for: 6m"))
    result = generate("--check", f"--output={output}")
    assert result.returncode == 1
    assert "out of date" in result.stderr


# --- Kubernetes: the sharded StatefulSet overlay ---------------------------------------------


@pytest.mark.e2e
def test_statefulset_replaces_the_deployment_with_its_pods_plus_shard_flags() -> None:
    statefulset, deployment = one(STATEFULSET, "StatefulSet"), one(BASE, "Deployment")
    # Its pods are <name>-<ordinal>, the names --shard.index=auto reads.
    assert statefulset["metadata"]["name"] == deployment["metadata"]["name"]
    args, base_args = container(statefulset)["args"], container(deployment)["args"]
    assert args[: len(base_args)] == base_args
    extra = sorted(arg.split("=")[0] for arg in args[len(base_args) :])
    assert extra == ["--shard.count", "--shard.index"]
    # Same probes, resources, security contexts, mounts and volumes as the base.
    assert {**container(statefulset), "args": base_args} == container(deployment)
    templates = [w["spec"]["template"] for w in (statefulset, deployment)]
    pods = [{**t, "spec": {**t["spec"], "containers": []}} for t in templates]
    assert pods[0] == pods[1]
    # Pods usually leave through one NAT address: their budgets must add up under the limit.
    per_shard = yaml.safe_load(configmap(STATEFULSET))["api"]["max_requests_per_minute"]
    assert statefulset["spec"]["replicas"] * per_shard <= UPSTREAM_RATE_LIMIT


@pytest.mark.e2e
def test_statefulset_pods_poll_every_message_once_between_them(tmp_path: Path) -> None:
    statefulset = one(STATEFULSET, "StatefulSet")
    replicas, name = statefulset["spec"]["replicas"], statefulset["metadata"]["name"]
    assert replicas > 1
    ids = [str(n) for n in range(1000, 1100)]
    text = yaml.safe_load(configmap(STATEFULSET)) | {"messages": [{"id": i} for i in ids]}
    config = with_key_file(yaml.safe_dump(text), SECRET_KEY, tmp_path)
    # Each pod as Kubernetes starts it, its name in HOSTNAME; the last --config.file wins.
    args = [*container(statefulset)["args"], "--config.file", config, "--config.check"]
    owned = 0
    for ordinal in range(replicas):
        result = run(sys.executable, "-m", "exporter", *args, HOSTNAME=f"{name}-{ordinal}")
        assert result.returncode == 0, result.stderr
        shard = re.search(rf"(\d+) in shard {ordinal} of 0\.\.{replicas - 1},", result.stdout)
        assert shard, f"pod {ordinal}: {result.stdout}"
        owned += int(shard[1])
    assert owned == len(ids)


@pytest.mark.e2e
def test_statefulset_pods_are_scraped_once_through_the_base_service() -> None:
    statefulset = one(STATEFULSET, "StatefulSet")
    pods = statefulset["spec"]["template"]["metadata"]["labels"]
    assert subset(statefulset["spec"]["selector"]["matchLabels"], pods)
    services = {d["metadata"]["name"]: d for d in kustomize(STATEFULSET) if d["kind"] == "Service"}
    governing = services.pop(statefulset["spec"]["serviceName"])
    (scraped,) = services.values()
    assert governing["spec"]["clusterIP"] == "None"
    assert subset(governing["spec"]["selector"], pods) and subset(scraped["spec"]["selector"], pods)
    names = {port["name"] for port in container(statefulset)["ports"]}
    assert {port["targetPort"] for port in governing["spec"]["ports"]} <= names
    # The ServiceMonitor selects the scraped Service only: matching the headless one too
    # would scrape every shard a second time, under another job.
    selector = one(STATEFULSET, "ServiceMonitor")["spec"]["selector"]["matchLabels"]
    assert subset(selector, scraped["metadata"]["labels"])
    assert not subset(selector, governing["metadata"].get("labels", {}))


# --- systemd ---------------------------------------------------------------------------------

# What `systemd-analyze security` may still flag, and why the exporter needs it.
ACCEPTED_EXPOSURE = {
    "PrivateNetwork=": "it polls the API and serves /metrics",
    "IPAddressDeny=": "the API's addresses are not known in advance",
    "RestrictAddressFamilies=~AF_(INET|INET6)": "the same",
    "RestrictAddressFamilies=~AF_UNIX": "logging to the journal",
    "RootDirectory=/RootImage=": "it runs the pip-installed program from the host",
    "ProcSubset=": "prometheus_client's process metrics read /proc/stat (boot time)",
    "DeviceAllow=": "ProtectClock=yes's own rule (char-rtc, read-only)",
}


def unit(key: str) -> str:
    (value,) = re.findall(rf"^{key}=(.*)$", UNIT.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return str(value)


@pytest.mark.e2e
def test_systemd_unit_verifies_and_is_sandboxed(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    # verify insists that ExecStart exists: point it at a stand-in, keep everything else.
    program = tmp_path / "mailpartner-exporter"
    program.write_text("#!/bin/sh\n", encoding="utf-8")
    program.chmod(0o755)
    copy = tmp_path / UNIT.name
    copy.write_text(
        UNIT.read_text().replace("/opt/mailpartner-exporter/bin/mailpartner-exporter", str(program))
    )
    result = run(analyze, "verify", copy)
    # Unknown keys and bad values are only warnings (exit 0): any line about the unit fails.
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if UNIT.name in line] == []
    result = run(analyze, "security", "--offline=true", "--json=short", copy)
    assert result.returncode == 0, result.stderr
    flagged = {check["name"] for check in json.loads(result.stdout) if not check["set"]}
    assert flagged <= ACCEPTED_EXPOSURE.keys(), f"exposed: {flagged - ACCEPTED_EXPOSURE.keys()}"


def test_systemd_unit_runs_reloads_and_keys_the_exporter() -> None:
    program, *args = unit("ExecStart").split()
    assert Path(program).name in SCRIPTS
    assert exporter_args(args).config_file == exporter_args(image_cmd()).config_file
    # tests/test_reload.py shows a running exporter reloading on SIGHUP.
    assert unit("ExecReload") == "/bin/sh -c 'kill -HUP $MAINPID'"  # no procps needed
    assert unit("Restart") == "on-failure"
    # A relative state.path lands in the one folder DynamicUser may write to.
    assert unit("WorkingDirectory") == f"/var/lib/{unit('StateDirectory')}"
    # The header tells what api.api_key_file must be: where systemd puts the credential.
    path = f"/run/credentials/{UNIT.name}/{unit('LoadCredential').partition(':')[0]}"
    assert re.search(rf"api_key_file:\s*{re.escape(path)}\s*$", UNIT.read_text(), re.MULTILINE)
    # `systemctl enable` needs an [Install] section.
    assert unit("WantedBy") == "multi-user.target"


@pytest.mark.parametrize("name", ["config.yaml", "docker", "kubernetes"])
def test_shipped_configs_keep_the_tuned_defaults_and_poll_the_account(
    name: str, tmp_path: Path
) -> None:
    """No shipped config may drift from the tuned schedule, or leave the credits unwatched."""
    config, _ = shipped_config(name, tmp_path)
    loaded = load_config(config, available(), environ={"MAILPARTNER_API_KEY": "k"})
    defaults = PollingConfig()
    for setting in ("schedule", "settled_recheck", "final_after", "unreported_every"):
        assert getattr(loaded.polling, setting) == getattr(defaults, setting), setting
    assert loaded.sources is not None
    assert {"bulk_status", "account"} <= {source.name for source in loaded.sources}


def test_compose_healthchecks_run_and_have_no_space_in_an_argument(tmp_path: Path) -> None:
    """podman's Docker API splits exec-form arguments on spaces: none may have one. The
    simulator's check, run against a simulator serving its /sim/stats, exits 0."""
    check = SERVICES["simulator"]["healthcheck"]["test"]
    assert check[0] == "CMD" and all(" " not in arg for arg in check[1:])
    with SimulatorServer(World(seed=1), api_key="k") as simulator:
        port = urlsplit(simulator.url).port
        program = [sys.executable, *check[2:]]
        program[-1] = program[-1].replace("127.0.0.1:10028", f"127.0.0.1:{port}")
        assert subprocess.run(program, check=False, timeout=10).returncode == 0


def test_the_readme_overlay_names_the_image_and_labels_the_rules(tmp_path: Path) -> None:
    """The README's overlay, built by kubectl against this base."""
    if KUBECTL is None:
        pytest.skip("kubectl is not installed (not a Debian package: the build is not run)")
    readme = (REPO / "README.md").read_text()
    (overlay,) = re.findall(r"```yaml\n# my-overlay/kustomization.yaml\n(.*?)```", readme, re.S)
    (tmp_path / "my-overlay").mkdir()
    (tmp_path / "deploy").symlink_to(REPO / "deploy")
    (tmp_path / "my-overlay" / "kustomization.yaml").write_text(overlay)
    result = run(KUBECTL, "kustomize", tmp_path / "my-overlay")
    assert result.returncode == 0, result.stderr
    objects = {d["kind"]: d for d in yaml.safe_load_all(result.stdout) if d}
    image = container(objects["Deployment"])["image"]
    assert image == "registry.example.com/mailpartner-exporter:0.1.0"
    assert objects["PrometheusRule"]["metadata"]["labels"]["release"] == "kube-prometheus-stack"
