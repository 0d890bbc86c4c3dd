"""deploy/docker/docker-compose.yml brought up for real by podman-compose: the simulator and the
exporter from the project's image, Prometheus and Alertmanager; Prometheus scrapes the exporter
and reaches Alertmanager; both healthchecks pass; then the stack is torn down.

The project's image is what deploy/docker/smoke-test.sh builds (.ci/run runs it before the
tests). Where Docker Hub is out of reach, Prometheus and Alertmanager run as stand-in images
of Debian's own binaries, under the names the compose file gives. Grafana is left out: it
has neither an image nor a Debian package here (tests/test_dashboard.py covers its queries).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode
from urllib.request import urlopen

import pytest
import yaml

from tests.conftest import require, require_tool

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "deploy/docker/docker-compose.yml"
SERVICES = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))["services"]
PROJECT = "mpe-compose-test"
BASE_IMAGE = "docker.io/library/python:3.11-slim"  # the Dockerfile's, as smoke-test.sh leaves it
# What each stand-in runs: Debian's binary, and what its official image's CMD passes.
STAND_INS = {
    "prometheus": (
        "prometheus",
        "/prometheus",
        ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"],
    ),
    "alertmanager": (
        "prometheus-alertmanager",
        "/alertmanager",
        ["--config.file=/etc/alertmanager/alertmanager.yml", "--storage.path=/alertmanager"],
    ),
}
# Debian's Alertmanager reads its default notification templates from here.
ALERTMANAGER_TEMPLATES = Path("/usr/share/prometheus/alertmanager")


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def compose(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman-compose", "-p", PROJECT, "-f", str(COMPOSE_FILE), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def published_ports() -> list[int]:
    ports = []
    for service in ("simulator", "exporter", "prometheus", "alertmanager"):
        ports += [int(entry.split(":")[1]) for entry in SERVICES[service].get("ports", [])]
    return ports


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def make_stand_in(service: str, tmp_path: Path) -> None:
    """The official image, pulled; else Debian's binary on the project's base image."""
    image = SERVICES[service]["image"]
    if podman("image", "exists", image).returncode == 0:
        return
    if podman("pull", "-q", image, timeout=120).returncode == 0:
        return
    binary, data, command = STAND_INS[service]
    path = require_tool(binary)
    context = tmp_path / service
    context.mkdir()
    shutil.copy(path, context / "binary")
    extra = ""
    if service == "alertmanager" and ALERTMANAGER_TEMPLATES.is_dir():
        shutil.copytree(ALERTMANAGER_TEMPLATES, context / "templates")
        extra = f"COPY templates {ALERTMANAGER_TEMPLATES}\n"
    name = Path(data).name
    (context / "Containerfile").write_text(
        f"FROM {BASE_IMAGE}\n"
        f"COPY binary /bin/{name}\n{extra}"
        f"RUN mkdir -p {data} /etc/{name} && chown 65534:65534 {data}\n"
        f"USER 65534:65534\nWORKDIR {data}\n"
        f'ENTRYPOINT ["/bin/{name}"]\nCMD {json.dumps(command)}\n'
    )
    built = podman("build", "-q", "--format", "docker", "-t", image, str(context))
    assert built.returncode == 0, built.stderr


def query(expr: str) -> list[dict[str, object]]:
    url = "http://127.0.0.1:9090/api/v1/query?" + urlencode({"query": expr})
    with urlopen(url, timeout=5) as answer:
        result: list[dict[str, object]] = json.load(answer)["data"]["result"]
    return result


def eventually(check: str, predicate: object, timeout: float = 120) -> None:
    """Poll ``predicate`` (a no-argument callable) until it is true; fail naming ``check``."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError as err:  # Prometheus not up yet
            last = err
        time.sleep(1)
    pytest.fail(f"{check} not within {timeout:.0f} s (last error: {last})")


def value(expr: str) -> float | None:
    result = query(expr)
    if not result:
        return None
    sample = result[0]["value"]
    assert isinstance(sample, list)
    return float(sample[1])


@pytest.fixture
def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    require_tool("podman")
    require_tool("podman-compose")
    if "CONTAINERS_CONF" not in os.environ:
        monkeypatch.setenv("CONTAINERS_CONF", str(REPO / "deploy/docker/containers.conf"))
    image = SERVICES["exporter"]["image"]
    require(
        podman("image", "exists", image).returncode == 0,
        f"no image {image}: build it with `bash deploy/docker/smoke-test.sh` (.ci/run does)",
    )
    busy = [port for port in published_ports() if not port_is_free(port)]
    require(not busy, f"the compose file's host ports are in use: {busy}")
    for service in STAND_INS:
        make_stand_in(service, tmp_path)
    up = compose("up", "-d", "prometheus")  # and what it depends on: all but Grafana
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield
    finally:
        # The simulator's anonymous volume (the image's VOLUME) too: down -v leaves it.
        mounts = podman(
            "inspect", "--format", "{{range .Mounts}}{{.Name}} {{end}}", f"{PROJECT}_simulator_1"
        ).stdout.split()
        compose("down", "-v")
        if mounts:
            podman("volume", "rm", "-f", *mounts)


def test_compose_stack_runs_and_prometheus_scrapes_the_exporter(stack: None) -> None:
    eventually(
        "Prometheus scraping the exporter (up == 1)",
        lambda: value('up{job="mailpartner-exporter"}') == 1,
    )
    # The exporter found the simulator by its service name, with the key from the secret.
    eventually("mailpartner_up == 1 in Prometheus", lambda: value("mailpartner_up") == 1)
    eventually(
        "the compose file's messages in Prometheus",
        lambda: value('count(mailpartner_message_recipients{campaign="welcome"})') is not None,
    )
    with urlopen("http://127.0.0.1:9090/api/v1/alertmanagers", timeout=5) as answer:
        active = json.load(answer)["data"]["activeAlertmanagers"]
    assert [am["url"] for am in active] == ["http://alertmanager:9093/api/v2/alerts"]
    # Both healthchecks as the engine runs them: the simulator's own, the image's on the
    # exporter. (Prometheus rules loaded: the alerts file is mounted where prometheus.yml says.)
    for service in ("simulator", "exporter"):
        check = podman("healthcheck", "run", f"{PROJECT}_{service}_1")
        assert check.returncode == 0, f"{service}: {check.stdout}{check.stderr}"
    with urlopen("http://127.0.0.1:9090/api/v1/rules", timeout=5) as answer:
        groups = json.load(answer)["data"]["groups"]
    assert any(rule["name"] == "MailPartnerExporterDown" for g in groups for rule in g["rules"])
