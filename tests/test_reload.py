"""Reload: SIGHUP and POST /-/reload validate first, swap whole, keep the old config on error."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from exporter.app import Exporter, load_runnable
from exporter.simulator import SimulatorServer, World
from tests.conftest import TEST_KEY
from tests.stack import start_exporter, wait_until


@pytest.fixture
def upstream() -> Iterator[SimulatorServer]:
    with SimulatorServer(World(seed=11), api_key=TEST_KEY) as server:
        yield server


def write(path: Path, url: str, *ids: str, **api: object) -> None:
    path.write_text(
        yaml.safe_dump(
            {
                "api": {"base_url": url, "api_key": TEST_KEY, **api},
                "messages": [{"id": i, "labels": {"campaign": f"c{i}"}} for i in ids],
            }
        )
    )


def value(exporter: Exporter, name: str, **labels: str) -> float | None:
    return exporter.registry.get_sample_value(name, labels)


@pytest.fixture
def running(
    upstream: SimulatorServer, tmp_path: Path
) -> Iterator[tuple[Exporter, Path, list[str]]]:
    ids = [upstream.world.send(100).message_id for _ in range(3)]
    path = tmp_path / "config.yaml"
    write(path, upstream.url, ids[0], ids[1])
    exporter = Exporter(load_runnable(str(path), demo=False), str(path))
    assert exporter.poller.poll_all()
    yield exporter, path, ids


def test_added_messages_poll_and_removed_ones_vanish_at_once(
    running: tuple[Exporter, Path, list[str]], upstream: SimulatorServer
) -> None:
    exporter, path, (a, b, c) = running
    delivered_before = value(
        exporter, "mailpartner_recipients_total", campaign="", state="delivered"
    )
    assert value(exporter, "mailpartner_message_final", message_id=b, campaign=f"c{b}") == 0

    write(path, upstream.url, a, c)
    assert exporter.reload() is None
    assert value(exporter, "mailpartner_message_final", message_id=b, campaign=f"c{b}") is None
    assert exporter.poller.poll_all()
    assert value(exporter, "mailpartner_message_poll_success", message_id=c, campaign=f"c{c}") == 1
    # b's recipients stay counted; c's are added
    delivered = value(exporter, "mailpartner_recipients_total", campaign="", state="delivered")
    assert delivered is not None and delivered_before is not None
    assert delivered >= delivered_before
    assert value(exporter, "mailpartner_exporter_config_last_reload_successful") == 1


def test_a_broken_config_is_refused_and_the_old_one_kept(
    running: tuple[Exporter, Path, list[str]], upstream: SimulatorServer
) -> None:
    exporter, path, (a, b, _) = running
    before = value(exporter, "mailpartner_exporter_config_last_reload_success_timestamp_seconds")
    path.write_text("api: {timeout: soon}\nmessages: [{id: x}, {id: x}]\n")
    error = exporter.reload()
    assert error is not None
    assert error.splitlines() == [
        f"{path}: api.timeout: 'soon' is not a duration (use e.g. 30s, 2m, 1h30m, 7d)",
        f"{path}: messages[1].id: message 'x' is already listed at messages[0]",
    ]
    assert value(exporter, "mailpartner_exporter_config_last_reload_successful") == 0
    assert (
        value(exporter, "mailpartner_exporter_config_last_reload_success_timestamp_seconds")
        == before
    )
    assert {m.spec.id for m in exporter.book.snapshot()[0]} == {a, b}
    assert exporter.poller.poll_all()  # still polling with the old config

    write(path, upstream.url, a)
    assert exporter.reload() is None
    assert value(exporter, "mailpartner_exporter_config_last_reload_successful") == 1


def test_reload_applies_new_api_settings(
    running: tuple[Exporter, Path, list[str]], upstream: SimulatorServer, tmp_path: Path
) -> None:
    exporter, path, (a, _, _) = running
    write(path, upstream.url, a, format="xml", max_requests_per_minute=60)
    assert exporter.reload() is None
    assert value(exporter, "mailpartner_exporter_request_budget_per_minute") == 60
    assert exporter.poller.poll_all()


def test_post_reload_over_http(
    running: tuple[Exporter, Path, list[str]], upstream: SimulatorServer
) -> None:
    exporter, path, (a, _, c) = running
    server = exporter.serve("127.0.0.1:0", "/metrics", lifecycle=True)
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        assert requests.get(f"{url}/-/reload", timeout=5).status_code == 405
        write(path, upstream.url, a, c)
        answer = requests.post(f"{url}/-/reload", timeout=5)
        assert (answer.status_code, answer.text) == (200, "Reloaded\n")
        path.write_text("api: {colour: blue}\n")
        answer = requests.post(f"{url}/-/reload", timeout=5)
        assert answer.status_code == 500
        assert answer.text == f"{path}: api.colour: unknown key\n"
        assert (
            "mailpartner_exporter_config_last_reload_successful 0.0"
            in requests.get(f"{url}/metrics", timeout=5).text
        )
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.e2e
def test_sighup_reloads_a_running_process_and_sigterm_ends_it(
    upstream: SimulatorServer, tmp_path: Path
) -> None:
    a, b = (upstream.world.send(50).message_id for _ in range(2))
    path = tmp_path / "config.yaml"
    write(path, upstream.url, a)
    process = start_exporter(tmp_path, "--config.file", str(path))
    try:

        def metrics() -> str:
            return requests.get(f"{process.url}/metrics", timeout=5).text

        wait_until(lambda: f'message_id="{a}"' in metrics(), 10, "first message")
        write(path, upstream.url, a, b)
        process.process.send_signal(signal.SIGHUP)
        wait_until(
            lambda: (
                f'mailpartner_message_poll_success{{campaign="c{b}",message_id="{b}"}}'
                f" 1.0" in metrics()
            ),
            10,
            "the added message polled",
        )

        path.write_text("polling: {retention: forever}\n")
        process.process.send_signal(signal.SIGHUP)
        wait_until(
            lambda: "mailpartner_exporter_config_last_reload_successful 0.0" in metrics(),
            10,
            "the failed reload reported",
        )
        assert f'message_id="{b}"' in metrics()  # the old config still runs
    finally:
        process.process.send_signal(signal.SIGTERM)
        assert process.process.wait(10) == 0
        process.stop()
    log = process.log.read_text()
    assert "configuration reloaded" in log and "reload failed" in log
    assert "shutting down" in log
