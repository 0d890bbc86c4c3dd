"""The command line, run for real: --once against the simulator, --demo serving /metrics."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from exporter.cli import parse_args
from exporter.simulator import Faults, SimulatorServer, World
from tests.conftest import TEST_KEY, require_tool

REPO = Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
        env={**os.environ, "MAILPARTNER_API_KEY": TEST_KEY, **(env or {})},
    )


@pytest.fixture
def live_simulator() -> Iterator[SimulatorServer]:
    """The simulator on real time, as the exporter process sees it."""
    with SimulatorServer(World(seed=3), api_key=TEST_KEY) as server:
        yield server


def write_config(path: Path, url: str, *ids: str, extra: str = "") -> Path:
    messages = "".join(f"  - {{id: '{i}', labels: {{campaign: c{i}}}}}\n" for i in ids)
    path.write_text(f"api: {{base_url: '{url}', timeout: 2s}}\n{extra}messages:\n{messages}")
    return path


def test_once_prints_the_exposition_and_exits_0(
    live_simulator: SimulatorServer, tmp_path: Path
) -> None:
    a = live_simulator.world.send(400, sent_at=time.time() - 3600)
    b = live_simulator.world.send(50)
    config = write_config(tmp_path / "c.yaml", live_simulator.url, a.message_id, b.message_id)
    result = run("--once", "--config.file", str(config))
    assert result.returncode == 0, result.stderr
    truth = live_simulator.world.truth(a.message_id)
    delivered = truth.statuses.get("Delivered", 0)
    assert (
        f'mailpartner_message_recipients{{campaign="c{a.message_id}",message_id='
        f'"{a.message_id}",state="delivered"}} {delivered:.1f}'
    ) in result.stdout.splitlines()
    assert 'mailpartner_api_requests_total{endpoint="bulk-status"} 2.0' in result.stdout
    assert live_simulator.stats().polls == {a.message_id: 1, b.message_id: 1}


def test_once_exits_1_when_a_poll_fails_and_still_prints(
    live_simulator: SimulatorServer, tmp_path: Path
) -> None:
    a = live_simulator.world.send(10)
    config = write_config(tmp_path / "c.yaml", live_simulator.url, a.message_id, "999999")
    result = run("--once", "--config.file", str(config))
    assert result.returncode == 1
    assert (
        'mailpartner_message_poll_success{campaign="c999999",message_id="999999"} 0.0'
        in result.stdout
    )
    assert 'mailpartner_api_errors_total{code="4",endpoint="bulk-status"} 1.0' in result.stdout
    assert "level=warn" in result.stderr and "message_id=999999" in result.stderr


def test_json_logs(live_simulator: SimulatorServer, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", live_simulator.url, "999999")
    result = run("--once", "--log.format", "json", "--config.file", str(config))
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    failed = next(line for line in lines if line["msg"] == "poll failed")
    assert failed["level"] == "warn" and failed["message_id"] == "999999"
    assert failed["err"] == "API error code 4: Message introuvable"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", failed["ts"])


def test_the_key_appears_in_no_output_on_any_failure_path(
    live_simulator: SimulatorServer, tmp_path: Path
) -> None:
    a = live_simulator.world.send(10)
    outputs = []
    config = write_config(tmp_path / "c.yaml", live_simulator.url, a.message_id)
    for fault in (
        Faults(http_status=500),
        Faults(invalid_body=True),
        Faults(error_code=10),
        Faults(latency=3.0),
    ):
        live_simulator.faults = fault
        result = run("--once", "--log.level", "debug", "--config.file", str(config))
        assert result.returncode == 1
        outputs += [result.stdout, result.stderr]
    refused = write_config(tmp_path / "r.yaml", f"http://127.0.0.1:{free_port()}/v1", "1")
    for args in (
        ["--once", "--log.level", "debug", "--config.file", str(refused)],
        ["--config.check", "--config.file", str(refused)],
    ):
        result = run(*args)
        outputs += [result.stdout, result.stderr]
    text = "\n".join(outputs)
    for expected in ("http_500", "invalid_response", "code 10", "timeout", "connection"):
        assert expected in text
    assert TEST_KEY not in text
    assert "apiKey=<redacted>" in text or "apiKey" not in text


@pytest.fixture
def demo() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "exporter", "--demo", "--web.listen-address", f"127.0.0.1:{port}"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "MAILPARTNER_API_KEY"},
    )
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    assert process.wait(10) == 0
    assert process.stderr is not None and "shutting down" in process.stderr.read()


def scrape_until(url: str, ready: re.Pattern[str], within: float) -> str:
    deadline = time.monotonic() + within
    while True:
        try:
            text = requests.get(f"{url}/metrics", timeout=1).text
            if ready.search(text):
                return text
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"no {ready.pattern} within {within}s")
        time.sleep(0.1)


def test_demo_serves_per_message_series_within_5_seconds(demo: str) -> None:
    started = time.monotonic()
    text = scrape_until(
        demo,
        re.compile(
            r'mailpartner_message_poll_success\{.*message_id="300"'
            r".*\} 1\.0"
        ),
        within=5,
    )
    assert time.monotonic() - started < 5
    ids = set(re.findall(r'mailpartner_message_recipients\{.*?message_id="([^"]+)"', text))
    assert {"300", "301"} <= ids and len(ids) >= 8  # config.yaml's two and the demo's sends
    assert "mailpartner_up 1.0" in text
    page = requests.get(demo, timeout=2).text
    assert all(f'data-message-id="{i}"' in page for i in ids)


def test_demo_exposition_passes_promtool(demo: str) -> None:
    promtool = require_tool("promtool")
    scrape_until(demo, re.compile("mailpartner_up 1.0"), within=5)
    body = requests.get(f"{demo}/metrics", timeout=2).content
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_delivered_counts_grow_while_the_exporter_runs(
    live_simulator: SimulatorServer, tmp_path: Path
) -> None:
    send = live_simulator.world.send(3000)
    config = write_config(
        tmp_path / "c.yaml",
        live_simulator.url,
        send.message_id,
        extra="polling:\n  schedule: [{until: 48h, every: 1s}]\n",
    )
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "exporter",
            "--config.file",
            str(config),
            "--web.listen-address",
            f"127.0.0.1:{port}",
        ],
        env={**os.environ, "MAILPARTNER_API_KEY": TEST_KEY},
        stderr=subprocess.DEVNULL,
    )
    try:
        pattern = re.compile(r'mailpartner_recipients_total\{state="delivered"\} (\S+)')
        url = f"http://127.0.0.1:{port}"
        first = float(pattern.findall(scrape_until(url, pattern, within=5))[0])
        later = scrape_until(url, re.compile(rf'state="delivered"\}} (?!{first}\b)'), within=10)
        assert float(pattern.findall(later)[0]) > first
    finally:
        process.terminate()
        process.wait(10)


def test_flags_follow_prometheus_conventions() -> None:
    args = parse_args([])
    assert (
        args.config_file,
        args.listen_address,
        args.telemetry_path,
        args.log_level,
        args.log_format,
    ) == ("config.yaml", ":10027", "/metrics", "info", "logfmt")
    with pytest.raises(SystemExit):
        parse_args(["--web.listen-address", "nonsense"])
    with pytest.raises(SystemExit):
        parse_args(["--log.level", "verbose"])


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0 and re.fullmatch(
        r"mailpartner-exporter \d+\.\d+\.\d+\n", result.stdout
    )
