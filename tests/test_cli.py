"""The command line, run for real: --once against the simulator, --demo serving /metrics,
SIGINT and SIGTERM at every stage.

Every test that starts the exporter's process is marked ``e2e``: interpreter start-up alone
costs a good part of a second. A served exporter is awaited on ``/-/ready`` before any time
is measured.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
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
# What a SIGINT or SIGTERM promises: exit 0 within this long, whatever the exporter was doing.
STOPS_WITHIN = 5.0
# An upstream that holds every answer for longer than the tests run: its threads end with the
# process, without writing to connections closed long since.
HANGING = Faults(latency=3600.0)


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


@pytest.mark.e2e
def test_demo_runs_without_a_config_file_and_a_named_one_must_exist(tmp_path: Path) -> None:
    """Where there is no config.yaml (a container, another folder), --demo runs on the
    defaults: its own sends and the account, and reloads them. A --config.file named on
    purpose must exist, even one named config.yaml."""
    exporter = start_exporter(tmp_path, "--demo", cwd=tmp_path)
    try:
        text = scrape_until(exporter.url, re.compile(r"mailpartner_account_credits\{"), 10)
        assert 'mailpartner_message_recipients{campaign="welcome",message_id="1000"' in text
        assert requests.post(f"{exporter.url}/-/reload", timeout=5).status_code == 200
        text = requests.get(f"{exporter.url}/metrics", timeout=5).text
        assert "mailpartner_exporter_config_last_reload_successful 1.0" in text
    finally:
        exporter.stop()
    assert exporter.process.returncode == 0, exporter.log.read_text()
    for name in ("typo.yaml", "config.yaml"):
        named = subprocess.run(
            [sys.executable, "-m", "exporter", "--demo", "--config.file", name],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert (named.returncode, named.stderr) == (
            1,
            f"{name}: cannot read: No such file or directory\n",
        )


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


# --- SIGINT and SIGTERM --------------------------------------------------------------------
# Each test signals at a moment it has seen come (requests in flight upstream, a log line, the
# process's own handler in place), and times the exit from the signal.


@pytest.fixture
def hanging_simulator(live_simulator: SimulatorServer) -> SimulatorServer:
    """The simulator answering nothing: every poll stays in flight."""
    live_simulator.faults = HANGING
    return live_simulator


def hanging_config(tmp_path: Path, simulator: SimulatorServer, count: int = 3) -> Path:
    ids = [simulator.world.send(10).message_id for _ in range(count)]
    return write_config(tmp_path / "c.yaml", simulator.url, *ids, timeout="2m")


def polls_in_flight(simulator: SimulatorServer, count: int) -> None:
    wait_until(lambda: sum(simulator.stats().polls.values()) >= count, 10, f"{count} polls")


def exporter_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "exporter", *args]


def exporter_env() -> dict[str, str]:
    return {**os.environ, "MAILPARTNER_API_KEY": TEST_KEY}


def stopped(
    process: subprocess.Popen[str], *signals: signal.Signals
) -> tuple[int, float, str, str | None]:
    """Send ``signals`` one after the other; the exit status, the time from the first signal
    to the exit, what the process wrote to standard error, and to its output if piped."""
    signalled = time.monotonic()
    for signum in signals:
        process.send_signal(signum)
    out, err = process.communicate(timeout=STOPS_WITHIN + 10)
    return process.returncode, time.monotonic() - signalled, err, out


def messages(log: str) -> list[str]:
    """The ``msg`` of every logfmt line."""
    return [m.strip('"') for m in re.findall(r' msg=("[^"]*"|\S+)', log)]


def assert_quiet(code: int, took: float, log: str) -> None:
    assert (code, took < STOPS_WITHIN) == (0, True), (code, took, log)
    assert "Traceback" not in log and TEST_KEY not in log, log


def handles_sigterm(pid: int) -> bool:
    """Whether the process has its own SIGTERM handler in place: from then on, a signal is
    the program's to handle (before it, the interpreter is still starting)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.M)[1], 16)  # type: ignore[index]
    return bool(caught >> (signal.SIGTERM - 1) & 1)


@pytest.mark.e2e
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
@pytest.mark.parametrize("after", [0.0, 0.15, 0.3])
def test_a_signal_during_start_up_exits_0_quietly(
    hanging_simulator: SimulatorServer, tmp_path: Path, signum: signal.Signals, after: float
) -> None:
    """From the program's first line on: while it imports (a third of a second), loads its
    configuration, builds the exporter, starts serving a hanging upstream. Which of these a
    moment falls in depends on the machine; every one ends the same way."""
    config = hanging_config(tmp_path, hanging_simulator)
    listen = f"127.0.0.1:{free_port()}"
    command = exporter_command("--config.file", str(config), "--web.listen-address", listen)
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=exporter_env()) as p:
        wait_until(lambda: handles_sigterm(p.pid), 10, "the exporter's signal handlers")
        time.sleep(after)  # a moment further into start-up, not a wait for something
        code, took, log, _ = stopped(p, signum)
    assert_quiet(code, took, log)
    said = [m for m in messages(log) if m.startswith("interrupted") or m == "shutting down"]
    assert said in (
        ["interrupted during start-up"],  # before the exporter was built
        ["interrupted during start-up; state saved"],  # before it served
        ["shutting down"],  # once it served
    ), log


@pytest.mark.e2e
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_signal_while_start_up_waits_on_its_configuration_exits_0(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """A start-up held up for good (its configuration on a hung network mount, here a pipe
    nobody writes to) is interrupted, not waited for."""
    config = tmp_path / "config.yaml"
    os.mkfifo(config)
    command = exporter_command("--config.file", str(config))
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=exporter_env()) as p:
        # Once the exporter has the pipe open, it waits in read().
        writer = wait_until(lambda: _open_writer(config), 10, "the exporter reading its config")
        try:
            code, took, log, _ = stopped(p, signum)
        finally:
            os.close(writer)
    assert_quiet(code, took, log)
    assert messages(log) == ["interrupted during start-up"], log
    assert f"signal={signum.name}" in log


@pytest.mark.e2e
def test_a_reload_asked_for_during_start_up_does_not_kill_it(
    tmp_path: Path, hanging_simulator: SimulatorServer
) -> None:
    """SIGHUP (a `systemctl reload` racing a start) while the configuration is still being
    read: the exporter goes on starting with what it reads, and serves."""
    text = hanging_config(tmp_path, hanging_simulator).read_text()
    config = tmp_path / "config.yaml"
    os.mkfifo(config)
    port = free_port()
    command = exporter_command(
        "--config.file", str(config), "--web.listen-address", f"127.0.0.1:{port}"
    )
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=exporter_env()) as p:
        try:
            writer = wait_until(lambda: _open_writer(config), 10, "the exporter reading it")
            p.send_signal(signal.SIGHUP)  # left at its default, it would end the process now
            with os.fdopen(writer, "w") as pipe:
                pipe.write(text)
            ready = f"http://127.0.0.1:{port}/-/ready"
            wait_until(lambda: requests.get(ready, timeout=1).ok, 10, "the exporter ready")
        finally:
            p.send_signal(signal.SIGTERM)
            _, err = p.communicate(timeout=10)
    assert p.returncode == 0, err


def _open_writer(fifo: Path) -> int | None:
    """The write end of ``fifo`` once a reader has it open, else None."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as e:
        if e.errno != errno.ENXIO:  # no reader yet
            raise
        return None


@pytest.mark.e2e
def test_ctrl_c_during_once_exits_0_at_once_and_saves_the_state(
    hanging_simulator: SimulatorServer, tmp_path: Path
) -> None:
    """Ctrl-C, then SIGTERM for good measure, with eight requests hanging: no exposition is
    printed (it would be incomplete), the state file is written, the second signal changes
    nothing."""
    config = hanging_config(tmp_path, hanging_simulator, count=8)
    command = exporter_command("--once", "--config.file", str(config))
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=exporter_env(),
        cwd=tmp_path,
    ) as process:
        polls_in_flight(hanging_simulator, 8)
        code, took, log, printed = stopped(process, signal.SIGINT, signal.SIGTERM)
    assert_quiet(code, took, log)
    assert printed == ""
    assert messages(log)[-1:] == ["interrupted during --once; state saved"], log
    assert "signal=SIGINT" in log and "poll failed" not in log
    # Saved on the way out: the eight messages, though none was ever answered (the schema
    # alone, written at start-up, holds no row).
    with closing(sqlite3.connect(tmp_path / "mailpartner-exporter.db")) as db:
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (8,)
        assert db.execute("SELECT count(*) FROM sources").fetchone() == (1,)


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("presses", "last"),
    [
        (1, "cutting off the requests still in flight"),
        (2, "interrupted during shutdown; state saved"),
    ],
    ids=["once", "twice"],
)
def test_ctrl_c_while_serving_shuts_down_within_5_s(
    hanging_simulator: SimulatorServer, tmp_path: Path, presses: int, last: str
) -> None:
    """The first Ctrl-C gives polls in flight 2 s to finish, then cuts them off; a second
    ends that wait at once, the state saved."""
    config = hanging_config(tmp_path, hanging_simulator)
    exporter = start_exporter(tmp_path, "--config.file", str(config), env=exporter_env())
    try:
        polls_in_flight(hanging_simulator, 3)
        exporter.process.send_signal(signal.SIGINT)
        signalled = time.monotonic()
        if presses == 2:
            wait_until(lambda: "shutting down" in exporter.log.read_text(), 5, "shutting down")
            exporter.process.send_signal(signal.SIGINT)
        code = exporter.process.wait(STOPS_WITHIN + 10)
        took = time.monotonic() - signalled
    finally:
        exporter.stop()
    log = exporter.log.read_text()
    assert_quiet(code, took, log)
    assert messages(log)[-2:] == ["shutting down", last]
