"""Real processes on loopback for end-to-end tests: the exporter, Prometheus, Alertmanager."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import requests
import yaml

from tests.conftest import require_tool

REPO = Path(__file__).parent.parent
T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], T | None], within: float, what: str) -> T:
    """Poll ``check`` until it returns something; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            result = check()
        except requests.ConnectionError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within}s")
        time.sleep(0.05)


class Service:
    """A child process serving HTTP on a free loopback port, stopped at ``stop()``."""

    def __init__(
        self,
        command: list[str],
        port: int,
        ready_path: str,
        log: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.url = f"http://{host}:{port}"
        self.log = log
        self._out = log.open("w")
        self.process = subprocess.Popen(
            command,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, **(env or {})},
        )
        wait_until(lambda: self._ready(ready_path), 30, f"{command[0]} ready")

    def _ready(self, path: str) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"exited with {self.process.returncode}:\n{self.log.read_text()}")
        return requests.get(self.url + path, timeout=1).status_code == 200

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self._out.close()


def start_exporter(
    tmp: Path,
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
) -> Service:
    """The exporter on ``host:port`` (any loopback address; a free port unless given)."""
    port = port or free_port(host)
    command = [sys.executable, "-m", "exporter", "--web.listen-address", f"{host}:{port}", *args]
    log = tmp / f"exporter-{host}-{port}.log"
    return Service(command, port, "/-/ready", log, env, cwd, host)


class Prometheus(Service):
    def __init__(self, tmp: Path, config: dict[str, Any]) -> None:
        port = free_port()
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        super().__init__(
            [
                require_tool("prometheus"),
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            port,
            "/-/ready",
            tmp / "prometheus.log",
        )

    def query(self, expr: str) -> dict[str, Any]:
        """An instant query; the whole API answer (``status``, ``data`` or ``error``)."""
        answer = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        return dict(answer.json())


class Alertmanager(Service):
    def __init__(self, tmp: Path, config: dict[str, Any]) -> None:
        port = free_port()
        (tmp / "alertmanager.yml").write_text(yaml.safe_dump(config))
        super().__init__(
            [
                require_tool("prometheus-alertmanager"),
                f"--config.file={tmp / 'alertmanager.yml'}",
                f"--storage.path={tmp / 'am'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--cluster.listen-address=",
            ],
            port,
            "/-/ready",
            tmp / "alertmanager.log",
        )


class SecuredService(Service):
    """A ``Service`` behind TLS and basic auth (``--web.config.file``): ready once
    ``ready_path`` answers 200 over HTTPS, with ``auth``, its certificate checked against
    ``ca_file``; ``url`` is its ``https://`` address."""

    def __init__(
        self,
        command: list[str],
        port: int,
        ready_path: str,
        log: Path,
        ca_file: Path,
        auth: tuple[str, str],
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.ca_file = ca_file
        self.auth = auth
        self._secured = f"https://{host}:{port}"
        super().__init__(command, port, ready_path, log, env, cwd, host)
        self.url = self._secured

    def _ready(self, path: str) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"exited with {self.process.returncode}:\n{self.log.read_text()}")
        answer = requests.get(
            self._secured + path, verify=str(self.ca_file), auth=self.auth, timeout=1
        )
        return answer.status_code == 200


def start_secured_exporter(
    tmp: Path,
    web_config: Path,
    ca_file: Path,
    auth: tuple[str, str],
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> SecuredService:
    """The exporter on a free loopback port with ``--web.config.file web_config``."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "exporter",
        "--web.listen-address",
        f"127.0.0.1:{port}",
        "--web.config.file",
        str(web_config),
        *args,
    ]
    log = tmp / f"exporter-secured-{port}.log"
    return SecuredService(command, port, "/-/ready", log, ca_file, auth, env, cwd)
