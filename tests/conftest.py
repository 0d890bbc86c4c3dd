"""Shared test pieces: a settable clock, the simulator on loopback, configs pointing at it."""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from exporter.client import BULK_STATUS, MailPartnerClient
from exporter.config.model import ApiConfig, Config, PollingConfig, ScheduleStep
from exporter.domain import MessageSpec
from exporter.poller import Poller
from exporter.secret import Redactor, Secret
from exporter.simulator import SimulatorServer, World
from exporter.sources.base import SourceContext
from exporter.sources.bulk_status import BulkStatusSource
from exporter.stats import RequestStats
from exporter.upstream import Upstream

START = 1795687200.0  # 2026-11-26T10:00:00Z
# A key no test output may ever contain: see tests/test_secrets.py and .ci/run.
TEST_KEY = "test-key-5f1c9e0a7b"


class FakeClock:
    """A clock tests move by hand; shared by the simulator and the exporter."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class InlineExecutor(Executor):
    """Runs each poll at once, in the caller's thread: fake-clock tests stay in step."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # pragma: no cover - surfaced through the future
            future.set_exception(e)
        return future


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own folder, so state files and the like never land in the repo."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def simulator(clock: FakeClock) -> Iterator[SimulatorServer]:
    with SimulatorServer(World(seed=7, clock=clock), api_key=TEST_KEY) as server:
        yield server


# The schedule the tests' expectations are written against (simple round numbers).
TEST_POLLING = PollingConfig(
    schedule=(
        ScheduleStep(until=600, every=30),
        ScheduleStep(until=7200, every=120),
        ScheduleStep(until=172800, every=900),
    )
)


def make_config(base_url: str, *messages: MessageSpec, **api: Any) -> Config:
    fields = {"base_url": base_url, "api_key": Secret(TEST_KEY), "timeout": 5.0, **api}
    return Config(
        file="test.yaml", api=ApiConfig(**fields), polling=TEST_POLLING, messages=messages
    )


def with_polling(config: Config, **polling: Any) -> Config:
    return dataclasses.replace(config, polling=dataclasses.replace(config.polling, **polling))


def make_client(config: Config, stats: RequestStats | None = None) -> MailPartnerClient:
    return MailPartnerClient(
        config.api,
        requests.Session(),
        stats or RequestStats([BULK_STATUS]),
        Redactor(config.api.api_key),
    )


def bulk_status_poller(
    config: Config,
    client: Any,
    clock: Callable[[], float],
    executor: Executor | None = None,
) -> tuple[BulkStatusSource, Poller]:
    """The real bulk_status source tracking ``config``'s messages through ``client`` (a
    ``MailPartnerClient``, or a fake with ``stats`` and ``bulk_status``), and a poller over
    it alone; polls run inline unless ``executor`` says otherwise, retries are not spread."""
    upstream = Upstream(config.api, client, client.stats, clock())
    source = BulkStatusSource(SourceContext(config, upstream, clock, jitter=lambda: 1.0), {})
    return source, Poller([source], clock=clock, executor=executor or InlineExecutor())


# The Debian package each tool comes in (.ci/run installs them).
DEBIAN_PACKAGES = {
    "promtool": "prometheus",
    "prometheus": "prometheus",
    "amtool": "prometheus-alertmanager",
    "prometheus-alertmanager": "prometheus-alertmanager",
    "chromium": "chromium",
    "systemd-analyze": "systemd",
    "podman": "podman",
    "podman-compose": "podman-compose",
    "php": "php-cli",
    "htpasswd": "apache2-utils",
}


def require(condition: bool, reason: str) -> None:
    """Skip with ``reason`` where the condition fails; in CI, fail instead."""
    if not condition:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


def require_tool(name: str) -> str:
    """Path of a Debian tool; skip where it is missing, but fail in CI (CI=true)."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is not installed; .ci/run must install it")
        pytest.skip(f"{name} is not installed (Debian package {DEBIAN_PACKAGES.get(name, name)})")
    return path


class CraftedServer:
    """A loopback HTTP server answering every GET with ``reply(path)``'s chunks."""

    Reply = tuple[int, dict[str, str], Iterable[bytes]]

    def __init__(self, reply: Callable[[str], CraftedServer.Reply]) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                outer.paths.append(self.path)
                status, headers, chunks = reply(self.path)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                for chunk in chunks:
                    self.wfile.write(chunk)
                    self.wfile.flush()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.paths: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def crafted() -> Iterator[Callable[[Callable[[str], CraftedServer.Reply]], CraftedServer]]:
    servers: list[CraftedServer] = []

    def start(reply: Callable[[str], CraftedServer.Reply]) -> CraftedServer:
        servers.append(CraftedServer(reply))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def scenario_url() -> Iterator[str]:
    """tests/scenario.py's known messages served on a loopback socket."""
    from tests.scenario import serve_scenario  # noqa: PLC0415 - it imports this module

    yield from serve_scenario()
