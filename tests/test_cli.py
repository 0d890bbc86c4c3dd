"""The command line, run for real: --once against the simulator, --demo serving /metrics.

Every test that starts the exporter's process is marked ``e2e``: interpreter start-up alone
costs a good part of a second. A served exporter is awaited on ``/-/ready`` before any time
is measured.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from exporter import calendar
from exporter.cli import parse_args
from exporter.simulator import Faults, SimulatorServer, World
from tests.conftest import TEST_KEY, require_tool
from tests.stack import REPO, free_port, start_exporter, wait_until

# What --demo promises: per-message series this long after the exporter is ready.
DEMO_SERIES_WITHIN = 5.0


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


def write_config(path: Path, url: str, *ids: str, extra: str = "", timeout: str = "2s") -> Path:
    messages = "".join(f"  - {{id: '{i}', labels: {{campaign: c{i}}}}}\n" for i in ids)
    path.write_text(f"api: {{base_url: '{url}', timeout: {timeout}}}\n{extra}messages:\n{messages}")
    return path


@pytest.mark.e2e
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


@pytest.mark.e2e
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


@pytest.mark.e2e
def test_json_logs(live_simulator: SimulatorServer, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", live_simulator.url, "999999")
    result = run("--once", "--log.format", "json", "--config.file", str(config))
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    failed = next(line for line in lines if line["msg"] == "poll failed")
    assert failed["level"] == "warn" and failed["message_id"] == "999999"
    assert failed["err"] == "API error code 4: Message introuvable"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", failed["ts"])


@pytest.mark.e2e
def test_the_key_appears_in_no_output_on_any_failure_path(
    live_simulator: SimulatorServer, tmp_path: Path
) -> None:
    a = live_simulator.world.send(10)
    outputs = []
    config = write_config(tmp_path / "c.yaml", live_simulator.url, a.message_id)
    # The timeout case needs no 2 s wait: the simulator holds its answer far longer still.
    short = write_config(tmp_path / "t.yaml", live_simulator.url, a.message_id, timeout="250ms")
    for fault, path in (
        (Faults(http_status=500), config),
        (Faults(invalid_body=True), config),
        (Faults(error_code=10), config),
        (Faults(latency=3.0), short),
    ):
        live_simulator.faults = fault
        result = run("--once", "--log.level", "debug", "--config.file", str(path))
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
def demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``--demo`` with the repository's config.yaml and no key, once it answers /-/ready."""
    monkeypatch.delenv("MAILPARTNER_API_KEY", raising=False)  # the demo needs no account
    exporter = start_exporter(tmp_path, "--demo", cwd=REPO)
    yield exporter.url
    exporter.stop()
    assert exporter.process.returncode == 0, exporter.log.read_text()
    assert "shutting down" in exporter.log.read_text()


def scrape_until(url: str, ready: re.Pattern[str], within: float) -> str:
    """The first exposition at ``url`` that matches ``ready``; fail after ``within`` seconds."""

    def scraped() -> str | None:
        text = requests.get(f"{url}/metrics", timeout=within).text
        return text if ready.search(text) else None

    return wait_until(scraped, within, f"{ready.pattern} at {url}/metrics")


@pytest.mark.e2e
def test_demo_serves_per_message_series_within_5_seconds(demo: str) -> None:
    ready = time.monotonic()  # the fixture has just seen /-/ready answer
    text = scrape_until(
        demo,
        re.compile(
            r'mailpartner_message_poll_success\{.*message_id="300"'
            r".*\} 1\.0"
        ),
        within=DEMO_SERIES_WITHIN,
    )
    assert time.monotonic() - ready < DEMO_SERIES_WITHIN
    ids = set(re.findall(r'mailpartner_message_recipients\{.*?message_id="([^"]+)"', text))
    assert {"300", "301"} <= ids and len(ids) >= 8  # config.yaml's two and the demo's sends
    assert "mailpartner_up 1.0" in text
    page = requests.get(demo, timeout=10).text
    assert all(f'data-message-id="{i}"' in page for i in ids)
    # The deferred demo send waits for its time; out of working hours (Europe/Paris), the
    # latest campaign waits for the next opening.
    assert "<td>scheduled for <time" in page
    assert "held until <time" in page  # the send deferred into the night, at any hour
    if calendar.held(time.time()):
        assert "<td>held until <time" in page


@pytest.mark.e2e
def test_demo_exposition_passes_promtool(demo: str) -> None:
    promtool = require_tool("promtool")
    scrape_until(demo, re.compile("mailpartner_up 1.0"), within=DEMO_SERIES_WITHIN)
    body = requests.get(f"{demo}/metrics", timeout=10).content
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.e2e
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
    exporter = start_exporter(
        tmp_path, "--config.file", str(config), env={"MAILPARTNER_API_KEY": TEST_KEY}
    )
    try:
        # The message's campaign (write_config labels it c<ID>), counted by the aggregates.
        total = (
            rf'mailpartner_recipients_total\{{campaign="c{send.message_id}",state="delivered"\}}'
        )
        pattern = re.compile(total + r" (\S+)")
        # Generous guards from readiness: polls every 1 s, and the world delivers as it goes.
        first = pattern.findall(scrape_until(exporter.url, pattern, within=5))[0]
        changed = re.compile(total + rf" (?!{re.escape(first)}\n)")
        later = scrape_until(exporter.url, changed, within=10)
        assert float(pattern.findall(later)[0]) > float(first)
    finally:
        exporter.stop()


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


@pytest.mark.e2e
def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0 and re.fullmatch(
        r"mailpartner-exporter \d+\.\d+\.\d+\n", result.stdout
    )


def test_config_check_counts_and_checks_the_message_files(tmp_path: Path) -> None:
    (tmp_path / "messages.d").mkdir()
    config = tmp_path / "c.yaml"
    config.write_text(
        f'api: {{api_key: {TEST_KEY}}}\nmessage_files: ["messages.d/*.yaml"]\n'
        'messages: [{id: "1"}, {id: "2"}]\n'
    )
    (tmp_path / "messages.d" / "a.yaml").write_text('messages: [{id: "2"}, {id: "3"}, {id: "4"}]\n')
    result = run("--config.check", "--config.file", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"{config}: OK, 4 messages (2 in the config, 3 in 1 message files), sources: bulk_status\n"
    )
    bad = tmp_path / "messages.d" / "b.yaml"
    bad.write_text('messages: [{id: "7", labels: {bad-name: x}}]\n')
    result = run("--config.check", "--config.file", str(config))
    assert result.returncode == 1
    assert (
        f"{bad}: messages[0].labels.bad-name: is not a valid Prometheus label name" in result.stderr
    )
