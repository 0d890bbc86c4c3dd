"""The deploy files work: each goes through the tool that reads it, or through the exporter.

promtool checks the Prometheus files, systemd-analyze the unit, `kubectl kustomize` builds the
Kubernetes variants (the assertions are on the objects it builds) and the exporter's own
--config.check reads every shipped configuration. No Docker engine runs here: of the Dockerfile
and the compose file, only what a container would get wrong is checked (users, ports, paths).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections import Counter
from pathlib import Path
from types import ModuleType
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
from tests.stack import free_port

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "deploy" / "docker"
BASE, STATEFULSET = REPO / "deploy/kubernetes/base", REPO / "deploy/kubernetes/statefulset"
PROMETHEUS = REPO / "deploy" / "prometheus"
ALERTS, PROBE = PROMETHEUS / "alerts.yml", PROMETHEUS / "probe.yml"
ALERTS_TEST = PROMETHEUS / "alerts_test.yml"
GENERATE = REPO / "deploy/kubernetes/generate.py"
RUNBOOK = REPO / "docs" / "runbook.md"
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
    if name == "systemd":  # the credential systemd hands over
        systemd = (REPO / "deploy/systemd/config.yaml").read_text(encoding="utf-8")
        return with_key_file(systemd, "k", tmp_path), {}
    return REPO / "config.yaml", {"MAILPARTNER_API_KEY": "demo-key"}  # as its comment says


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["config.yaml", "docker", "kubernetes", "systemd"])
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


def image_user() -> tuple[int, int]:
    """The final stage's USER, uid and gid."""
    (user,) = final_stage("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit(), f"USER {user} should be numeric: Kubernetes' runAsNonRoot checks it"
    assert gid.isdigit(), f"USER {user} should name its group: the pods' fsGroup is that group"
    return int(uid), int(gid)


def image_volumes() -> list[str]:
    """The final stage's VOLUME paths, in either form."""
    paths: list[str] = []
    for volume in final_stage("VOLUME"):
        paths += json.loads(volume) if volume.startswith("[") else volume.split()
    return paths


def test_dockerfile_runs_the_exporter_as_non_root_on_its_port_without_config_or_key() -> None:
    assert image_user()[0] != 0
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


def require_kubectl() -> str:
    """kubectl, or a skip, in CI too: no registry CI reaches has a kubectl recent enough
    (Debian's kubernetes-client 1.20 predates kustomize's ``labels:``), so where it is missing
    the other tests render the kustomizations from the files (resource_files) instead."""
    if KUBECTL is None:
        pytest.skip("kubectl is not installed (no registry here has a recent one)")
    return KUBECTL


def ident(document: dict[str, Any]) -> tuple[str, str]:
    return document["kind"], document["metadata"]["name"]


# What resource_files can render of a kustomization without kubectl.
BY_HAND = {"apiVersion", "kind", "resources", "patches", "labels"}


def labelled(document: dict[str, Any], selectors: bool) -> list[dict[str, str]]:
    """The label maps kustomize's ``labels:`` writes to in ``document`` (with
    ``includeSelectors``: the selectors, pod templates and claim templates too)."""
    spec = document.get("spec", {})
    maps = [document["metadata"].get("labels", {})]
    if selectors and document["kind"] == "Service":
        maps.append(spec.get("selector", {}))
    if selectors and document["kind"] in {"Deployment", "StatefulSet"}:
        maps += [spec["selector"]["matchLabels"], spec["template"]["metadata"]["labels"]]
        maps += [
            claim["metadata"].get("labels", {}) for claim in spec.get("volumeClaimTemplates", [])
        ]
    return maps


def resource_files(directory: Path) -> list[dict[str, Any]]:
    """What kustomize builds from ``directory``, by hand, where kubectl is missing.

    It renders what these kustomizations do: list resources (bases included), delete objects
    with ``$patch: delete`` patches, and add ``labels:`` that each file carries already. It
    refuses anything else (images, namespaces, merge patches, a label missing from a file):
    test_kubectl_kustomize_builds_the_same_objects shows, where kubectl runs, that what it
    renders is what kubectl builds."""
    kustomization = load_yaml(directory / "kustomization.yaml")
    assert kustomization.keys() <= BY_HAND, f"{directory}: needs kubectl to render"
    objects: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        path = directory / resource
        objects += resource_files(path) if path.is_dir() else [load_yaml(path)]
    for patch in kustomization.get("patches", []):
        deleted = yaml.safe_load(patch["patch"])
        assert deleted.pop("$patch") == "delete", f"{directory}: only deletions render by hand"
        kept = [document for document in objects if ident(document) != ident(deleted)]
        assert len(kept) == len(objects) - 1, f"{directory}: {ident(deleted)} is not there"
        objects = kept
    for label in kustomization.get("labels", []):
        selectors = label.get("includeSelectors", False)
        for document in objects:
            for labels in labelled(document, selectors):
                assert subset(label["pairs"], labels), (
                    f"{directory}: {ident(document)} lacks {label}"
                )
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
    """Where kubectl is missing the other tests read the files (resource_files): they see
    what kubectl would build, PVC deletion and claim templates included."""
    kubectl = require_kubectl()
    for directory in (BASE, STATEFULSET):
        result = run(kubectl, "kustomize", directory)
        assert result.returncode == 0, result.stderr
        built = [document for document in yaml.safe_load_all(result.stdout) if document]
        assert sorted(built, key=ident) == sorted(resource_files(directory), key=ident), directory


@pytest.mark.e2e
def test_kustomizations_build_the_stack_without_a_secret_or_namespace() -> None:
    """The Secret is the user's to create: an applied example would replace their key."""
    kinds = {d: Counter(kind for kind, _ in map(ident, kustomize(d))) for d in (BASE, STATEFULSET)}
    common = {"ConfigMap": 1, "Service": 1, "ServiceMonitor": 1, "PrometheusRule": 1}
    assert kinds[BASE] == {**common, "Deployment": 1, "PersistentVolumeClaim": 1}
    # The StatefulSet's claims come from its volumeClaimTemplates, one per pod.
    assert kinds[STATEFULSET] == {**common, "Service": 2, "StatefulSet": 1}
    for document in kustomize(BASE) + kustomize(STATEFULSET):
        assert "namespace" not in document["metadata"], "an overlay sets it"


@pytest.mark.e2e
def test_service_and_probes_reach_the_port_the_exporter_serves() -> None:
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


@pytest.mark.e2e
def test_deployment_runs_one_locked_down_non_root_pod() -> None:
    deployment = one(BASE, "Deployment")
    # A second poller would double the requests counted against the API's per-IP limit.
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]["securityContext"]
    assert (pod["runAsNonRoot"], pod["runAsUser"]) == (True, image_user()[0])
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


@pytest.mark.e2e
@pytest.mark.parametrize("directory", [BASE, STATEFULSET], ids=["deployment", "statefulset"])
def test_state_file_is_on_a_writable_volume_that_no_two_pods_share(directory: Path) -> None:
    built = kustomize(directory)
    (workload,) = [d for d in built if d["kind"] in {"Deployment", "StatefulSet"}]
    pod, exporter = workload["spec"]["template"]["spec"], container(workload)
    state = Path(yaml.safe_load(configmap(directory))["state"]["path"])
    # The image's volume, where its user may write; the root filesystem stays read-only.
    assert str(state.parent) in image_volumes()
    assert exporter["securityContext"]["readOnlyRootFilesystem"] is True
    (mount,) = [m for m in exporter["volumeMounts"] if m["mountPath"] == str(state.parent)]
    assert not mount.get("readOnly", False)
    # A fresh volume's root belongs to root: fsGroup hands it to the image's group.
    assert pod["securityContext"]["fsGroup"] == image_user()[1]
    claims = [d for d in built if d["kind"] == "PersistentVolumeClaim"]
    if workload["kind"] == "Deployment":
        # One claim, for one pod at a time (one replica, Recreate: see the test above).
        (claim,) = claims
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        claim_name = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
        assert claim_name == claim["metadata"]["name"]
        access = claim["spec"]["accessModes"]
    else:
        # A claim per pod from the template (the pod template has no volume of that name,
        # and the base's claim is gone), so no two shards share a state file.
        assert claims == []
        assert mount["name"] not in {volume["name"] for volume in pod["volumes"]}
        templates = {c["metadata"]["name"]: c for c in workload["spec"]["volumeClaimTemplates"]}
        access = templates[mount["name"]]["spec"]["accessModes"]
    assert access == ["ReadWriteOnce"]


# kubernetes-validate ships Kubernetes' API schemas (OpenAPI, per minor version) in its wheel.
# Pinned: the Kubernetes version whose API the manifests must fit, that of the kubectl here.
KUBERNETES_VERSION = "1.32"

# Run in a child Python whose every use of the network raises: the schemas must come from the
# package, as on a CI machine without network.
VALIDATE_OFFLINE = """
import json, sys
import kubernetes_validate
from kubernetes_validate.utils import SchemaNotFoundError

def no_network(event, args):
    if event.startswith("socket.") or event.startswith("urllib."):
        raise RuntimeError(f"kubernetes-validate used the network: {event} {args}")

sys.addaudithook(no_network)
results = {}
for key, document in json.load(sys.stdin).items():
    try:
        results[key] = kubernetes_validate.validate(document, sys.argv[1], strict=True)
    except SchemaNotFoundError:
        results[key] = "no schema"
    except kubernetes_validate.ValidationError as e:
        results[key] = f"invalid at {'.'.join(map(str, e.path))}: {e.message}"
json.dump(results, sys.stdout)
"""

# Kubernetes' own kinds among the manifests, whose schemas kubernetes-validate has, and the
# Prometheus Operator's.
API_KINDS = {"Deployment", "StatefulSet", "PersistentVolumeClaim", "Service", "ConfigMap", "Secret"}
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}


def validate_offline(documents: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Each document's outcome: the version validated against, "no schema" or the error."""
    result = subprocess.run(
        [sys.executable, "-c", VALIDATE_OFFLINE, KUBERNETES_VERSION],
        input=json.dumps(documents),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


@pytest.mark.e2e
def test_every_kubernetes_object_validates_offline_against_the_pinned_api() -> None:
    documents = {
        f"{directory.name}: {kind}/{name}": document
        for directory in (BASE, STATEFULSET)
        for document in kustomize(directory)
        for kind, name in [ident(document)]
    }
    documents["secret.example.yaml: Secret"] = SECRET_EXAMPLE
    # Strict: an unknown field is an error, not silently dropped as the API server drops it.
    typo = json.loads(json.dumps(one(BASE, "PersistentVolumeClaim")))
    typo["spec"]["accesModes"] = typo["spec"].pop("accessModes")
    results = validate_offline({**documents, "typo": typo})
    assert re.fullmatch(r"invalid at spec: .*'accesModes' was unexpected.*", results.pop("typo"))
    assert {document["kind"] for document in documents.values()} == API_KINDS | OPERATOR_KINDS
    assert results == {
        key: KUBERNETES_VERSION if document["kind"] in API_KINDS else "no schema"
        for key, document in documents.items()
    }


# The Prometheus Operator's resources are CRDs: kubernetes-validate has Kubernetes' own API only
# ("no schema" above), and the Operator's CRD schemas, in its release bundle, cannot be fetched
# offline. So they are checked for what the Operator reads of them, field by field. Fields of
# its monitoring.coreos.com/v1 API that these tests know: another name is a typo, which the
# API server would prune without a word (a CRD's schema drops unknown fields).
SERVICEMONITOR_FIELDS = {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels"}
ENDPOINT_FIELDS = {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels"}
GROUP_FIELDS = {"name", "interval", "rules"}
RULE_FIELDS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}


@pytest.mark.e2e
@pytest.mark.parametrize("directory", [BASE, STATEFULSET], ids=["deployment", "statefulset"])
def test_operator_resources_hold_what_the_prometheus_operator_reads(directory: Path) -> None:
    monitor, rule = one(directory, "ServiceMonitor"), one(directory, "PrometheusRule")
    for resource in (monitor, rule):
        assert resource["apiVersion"] == "monitoring.coreos.com/v1"
        assert resource["metadata"]["name"] and "namespace" not in resource["metadata"]
    # The ServiceMonitor finds, in its own namespace, exactly one Service: the one named as the
    # alerts' job (without jobLabel the Operator names the job after the Service). Matching
    # the StatefulSet's headless Service too would scrape every shard twice, under another job.
    spec = monitor["spec"]
    assert spec.keys() <= SERVICEMONITOR_FIELDS and "jobLabel" not in spec
    assert "namespaceSelector" not in spec
    services = [d for d in kustomize(directory) if d["kind"] == "Service"]
    selector = spec["selector"]["matchLabels"]
    (service,) = [s for s in services if subset(selector, s["metadata"].get("labels", {}))]
    assert service["metadata"]["name"] == alert_job()
    for endpoint in spec["endpoints"]:
        assert endpoint.keys() <= ENDPOINT_FIELDS
        assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
        assert endpoint.get("path", "/metrics") == "/metrics"
        assert re.fullmatch(r"\d+[smh]", endpoint.get("interval", "30s"))
    # The PrometheusRule's groups are alerts.yml's, which promtool checks (see
    # test_prometheusrule_is_up_to_date_with_the_alerts and test_prometheus_files_pass_promtool).
    assert rule["spec"].keys() == {"groups"}
    for group in rule["spec"]["groups"]:
        assert group.keys() <= GROUP_FIELDS and group["name"] and group["rules"]
        for alert in group["rules"]:
            assert alert.keys() <= RULE_FIELDS and isinstance(alert["expr"], str), alert
            assert all(isinstance(v, str) for v in alert.get("annotations", {}).values())


def generate(*args: str) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, GENERATE, *args)


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


# --- Runbook links: runbook_url on every alert ----------------------------------------------


@functools.cache
def generator() -> ModuleType:
    """deploy/kubernetes/generate.py, a script of its own, loaded as a module."""
    spec = importlib.util.spec_from_file_location("generate", GENERATE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def runbook_urls(document: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(alert, runbook_url) of each alert of a rule file, or expected alert of a test file."""
    if "tests" in document:
        return [
            (check["alertname"], alert["exp_annotations"].get("runbook_url"))
            for case in document["tests"]
            for check in case["alert_rule_test"]
            for alert in check.get("exp_alerts") or []
        ]
    rules = [rule for group in document["groups"] for rule in group["rules"]]
    return [(rule["alert"], rule["annotations"].get("runbook_url")) for rule in rules]


def test_runbook_anchors_are_the_ones_github_gives_its_headings() -> None:
    markdown = (
        "# Runbook: mailpartner-exporter alerts\n\n## MailPartnerExporterDown\ntext\n"
        "## Held and deferred messages (no alert)\n```sh\n# a comment, no heading\n```\n"
        "### `state.path` on a volume ###\n## Notes\n## Notes\n"
    )
    assert generator().github_anchors(markdown) == [
        ("Runbook: mailpartner-exporter alerts", "runbook-mailpartner-exporter-alerts"),
        ("MailPartnerExporterDown", "mailpartnerexporterdown"),
        ("Held and deferred messages (no alert)", "held-and-deferred-messages-no-alert"),
        ("`state.path` on a volume", "statepath-on-a-volume"),
        ("Notes", "notes"),
        ("Notes", "notes-1"),
    ]


def test_every_alert_links_to_its_runbook_section_under_one_base_url() -> None:
    """In alerts.yml, the PrometheusRule and the expectations of alerts_test.yml alike."""
    headings = generator().github_anchors(RUNBOOK.read_text(encoding="utf-8"))
    anchors = dict(reversed(headings))  # of a repeated heading, the first: a link reaches it
    links = runbook_urls(load_yaml(ALERTS))
    (base,) = {str(url).partition("#")[0] for _, url in links}
    assert urlsplit(base).scheme in {"http", "https"} and urlsplit(base).hostname, base
    for alert, _ in links:
        assert alert in anchors, f"docs/runbook.md has no section headed {alert}"
    wanted = {alert: f"{base}#{anchors[alert]}" for alert, _ in links}
    assert dict(links) == wanted
    rule = load_yaml(BASE / "prometheusrule.yaml")
    assert runbook_urls({"groups": rule["spec"]["groups"]}) == links
    tested = runbook_urls(load_yaml(ALERTS_TEST))
    assert tested and {alert for alert, _ in tested} == set(wanted)
    assert [url for _, url in tested] == [wanted[alert] for alert, _ in tested]


@pytest.mark.e2e
def test_runbook_base_url_relinks_every_alert_and_promtool_tests_still_pass(
    tmp_path: Path,
) -> None:
    promtool = require_tool("promtool")
    alerts, alerts_test = tmp_path / ALERTS.name, tmp_path / ALERTS_TEST.name
    shutil.copy(ALERTS, alerts)
    shutil.copy(ALERTS_TEST, alerts_test)
    output, base = tmp_path / "prometheusrule.yaml", "https://wiki.example.org/ops/runbook.html"
    paths = [f"--alerts={alerts}", f"--alerts-test={alerts_test}", f"--output={output}"]
    before = {
        path: path.read_text(encoding="utf-8")
        for path in (ALERTS, ALERTS_TEST, BASE / "prometheusrule.yaml")
    }
    result = generate(f"--runbook-base-url={base}", *paths)
    assert result.returncode == 0, result.stderr
    # Only the runbook_url lines changed, each now under the new base URL.
    for source, copy in ((ALERTS, alerts), (ALERTS_TEST, alerts_test)):
        old, new = before[source].splitlines(), copy.read_text(encoding="utf-8").splitlines()
        changed = [(a, b) for a, b in zip(old, new, strict=True) if a != b]
        assert len(changed) == len([line for line in old if "runbook_url:" in line]) > 0
        for a, b in changed:
            assert b == a.replace(a.split("runbook_url: ")[1].partition("#")[0], base)
    links = runbook_urls(load_yaml(alerts))
    assert all(str(url).startswith(f"{base}#") for _, url in links)
    assert load_yaml(output)["spec"]["groups"] == load_yaml(alerts)["groups"]
    # promtool compares every annotation of an expected alert: the tests moved with the rules.
    result = run(promtool, "test", "rules", alerts_test)
    assert result.returncode == 0, result.stdout + result.stderr
    # Now the copies' own base URL is the default, and the repository's files are untouched.
    assert generate("--check", *paths).returncode == 0
    assert {path: path.read_text(encoding="utf-8") for path in before} == before
    result = generate("--check", "--runbook-base-url=https://elsewhere.example.org/r.md", *paths)
    assert result.returncode == 1
    assert f"{alerts}: runbook_url out of date" in result.stderr


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("--runbook-base-url=ftp://git.example.com/runbook.md", "expected http(s)://host/"),
        ("--runbook-base-url=https://git.example.com/runbook.md#top", "without #"),
        ("--runbook-base-url=docs/runbook.md", "expected http(s)://host/"),
        ("--runbook={runbook}", "no section headed MailPartnerStateNotSaved"),
    ],
    ids=["not-http", "fragment", "relative", "no-section"],
)
def test_generate_refuses_a_link_that_cannot_work(
    argument: str, message: str, tmp_path: Path
) -> None:
    runbook = tmp_path / "runbook.md"
    text = RUNBOOK.read_text(encoding="utf-8")
    runbook.write_text(text.replace("## MailPartnerStateNotSaved", "## State not saved"))
    result = generate("--check", argument.format(runbook=runbook))
    assert result.returncode == 2
    assert message in result.stderr, result.stderr


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
    # Same probes, resources, security contexts and mounts as the base.
    assert {**container(statefulset), "args": base_args} == container(deployment)
    # The same pod but for the state volume: the base's pod mounts the base's one claim, each
    # shard the claim its template makes, of the same size and access.
    claim, (template,) = (
        one(BASE, "PersistentVolumeClaim"),
        statefulset["spec"]["volumeClaimTemplates"],
    )
    assert template["spec"] == claim["spec"]
    base_pod, pod = (workload["spec"]["template"] for workload in (deployment, statefulset))
    base_volumes = {volume["name"]: volume for volume in base_pod["spec"]["volumes"]}
    state = base_volumes.pop(template["metadata"]["name"])
    assert state["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"]}
    assert {**pod, "spec": {**pod["spec"], "containers": []}} == {
        **base_pod,
        "spec": {**base_pod["spec"], "containers": [], "volumes": list(base_volumes.values())},
    }
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


@pytest.mark.parametrize("name", ["config.yaml", "docker", "kubernetes", "systemd"])
def test_shipped_configs_keep_the_tuned_defaults_and_poll_the_account(
    name: str, tmp_path: Path
) -> None:
    """No shipped config may drift from the tuned schedule, or leave the credits unwatched,
    or keep its state anywhere but the state directory (the image's volume, the pod's claim,
    the unit's StateDirectory=); the repository's own keeps it beside where it runs."""
    config, _ = shipped_config(name, tmp_path)
    loaded = load_config(config, available(), environ={"MAILPARTNER_API_KEY": "k"})
    defaults = PollingConfig()
    for setting in ("schedule", "settled_recheck", "final_after", "unreported_every"):
        assert getattr(loaded.polling, setting) == getattr(defaults, setting), setting
    assert loaded.sources is not None
    assert {"bulk_status", "account"} <= {source.name for source in loaded.sources}
    state = Path(loaded.state_path)
    if name == "config.yaml":
        assert not state.is_absolute()
    else:
        assert state.parent == Path("/var/lib/mailpartner-exporter"), state


def test_compose_healthcheck_is_one_shell_string_that_passes_on_a_serving_simulator(
    tmp_path: Path,
) -> None:
    """CMD-SHELL with one string: podman-compose mangles the quoting of a CMD list, podman's
    Docker API splits its arguments on spaces. Run by sh against a simulator serving its
    /sim/stats, it exits 0; against a closed port, not. (tests/test_compose.py runs the stack.)"""
    kind, command = SERVICES["simulator"]["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    with SimulatorServer(World(seed=1), api_key="k") as simulator:
        port = urlsplit(simulator.url).port
        shell = command.replace("python", shlex.quote(sys.executable), 1)
        assert run("/bin/sh", "-c", shell.replace(":10028", f":{port}")).returncode == 0
    closed = run("/bin/sh", "-c", shell.replace(":10028", f":{free_port()}"))
    assert closed.returncode != 0


def test_the_readme_overlay_names_the_image_and_labels_the_rules(tmp_path: Path) -> None:
    """The README's overlay, built by kubectl against this base."""
    kubectl = require_kubectl()  # the README's overlay is more than resource_files reads
    readme = (REPO / "README.md").read_text()
    (overlay,) = re.findall(r"```yaml\n# my-overlay/kustomization.yaml\n(.*?)```", readme, re.S)
    (tmp_path / "my-overlay").mkdir()
    (tmp_path / "deploy").symlink_to(REPO / "deploy")
    (tmp_path / "my-overlay" / "kustomization.yaml").write_text(overlay)
    result = run(kubectl, "kustomize", tmp_path / "my-overlay")
    assert result.returncode == 0, result.stderr
    objects = {d["kind"]: d for d in yaml.safe_load_all(result.stdout) if d}
    image = container(objects["Deployment"])["image"]
    assert image == "registry.example.com/mailpartner-exporter:0.1.0"
    assert objects["PrometheusRule"]["metadata"]["labels"]["release"] == "kube-prometheus-stack"
