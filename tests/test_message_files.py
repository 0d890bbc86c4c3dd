"""message_files in the running exporter: files another process writes are picked up whole,
without a restart; a broken file keeps its messages polled; the config's entry wins."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import requests
import yaml

from exporter.app import Exporter, load_runnable
from exporter.domain import MessageSpec
from exporter.simulator import SimulatorServer, World
from exporter.sources.bulk_status import FILE_CHECK_INTERVAL, BulkStatusSource
from tests.conftest import TEST_KEY, FakeClock
from tests.stack import start_exporter, wait_until


@pytest.fixture
def upstream() -> Iterator[SimulatorServer]:
    with SimulatorServer(World(seed=4), api_key=TEST_KEY) as server:
        yield server


def atomic_write(path: Path, document: Any) -> None:
    """Write a temporary file beside ``path``, then rename it over: readers see all or nothing."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(
        json.dumps(document) if path.suffix == ".json" else yaml.safe_dump(document)
    )
    os.replace(temporary, path)


def config(tmp_path: Path, url: str, **extra: Any) -> Path:
    path = tmp_path / "config.yaml"
    document = {
        "api": {"base_url": url, "api_key": TEST_KEY},
        "message_files": ["messages.d/*.yaml", "messages.d/*.json"],
        "state": {"path": ":memory:"},
        **extra,
    }
    path.write_text(yaml.safe_dump(document))
    (tmp_path / "messages.d").mkdir(exist_ok=True)
    return path


def tracked(exporter: Exporter) -> dict[str, dict[str, str]]:
    return {m.spec.id: dict(m.spec.labels) for m in exporter.book.snapshot()[0]}


def test_files_are_followed_as_they_change(upstream: SimulatorServer, tmp_path: Path) -> None:
    a, b, c = (upstream.world.send(20).message_id for _ in range(3))
    folder = tmp_path / "messages.d"
    path = config(tmp_path, upstream.url, messages=[{"id": c, "labels": {"campaign": "config"}}])
    atomic_write(folder / "sends.yaml", {"messages": [{"id": a, "labels": {"campaign": "x"}}]})
    exporter = Exporter(load_runnable(str(path), demo=False), str(path))
    source = exporter.sources["bulk_status"]
    assert isinstance(source, BulkStatusSource)
    assert tracked(exporter) == {a: {"campaign": "x"}, c: {"campaign": "config"}}  # at startup

    # A bare list in JSON; the config's own entry for c wins over the file's.
    atomic_write(folder / "more.json", [{"id": b}, {"id": c, "labels": {"campaign": "file"}}])
    now = time.time()  # the source's clock; each tick below is past the next file check
    source.tick(now + FILE_CHECK_INTERVAL)
    assert tracked(exporter) == {a: {"campaign": "x"}, b: {}, c: {"campaign": "config"}}
    assert exporter.poller.poll_all()
    assert upstream.stats().polls == {a: 1, b: 1, c: 1}

    # Broken in place: a keeps being polled with the labels it had.
    (folder / "sends.yaml").write_text("messages: [{id: 1, labels: {bad-name: x}}]\n")
    source.tick(now + 2 * FILE_CHECK_INTERVAL)
    assert tracked(exporter)[a] == {"campaign": "x"}
    value = exporter.registry.get_sample_value
    assert value("mailpartner_exporter_message_file_errors_total") == 1
    assert value("mailpartner_exporter_message_files") == 2
    assert value("mailpartner_exporter_discovered_messages") == 3
    assert value("mailpartner_exporter_message_file_duplicates") == 0

    # Deleted: its messages go, their series with them.
    (folder / "sends.yaml").unlink()
    source.tick(now + 3 * FILE_CHECK_INTERVAL)
    assert set(tracked(exporter)) == {b, c}
    assert value("mailpartner_message_poll_success", {"message_id": a, "campaign": "x"}) is None


def test_a_new_file_is_polled_at_the_next_file_check(
    upstream: SimulatorServer, tmp_path: Path, clock: FakeClock
) -> None:
    message = upstream.world.send(15).message_id
    path = config(tmp_path, upstream.url)
    exporter = Exporter(load_runnable(str(path), demo=False), str(path), clock=clock)
    atomic_write(tmp_path / "messages.d" / "new.yaml", [{"id": message, "labels": {"app": "shop"}}])
    clock.advance(FILE_CHECK_INTERVAL)
    # One turn of the poll loop: it checks the files, then polls what is due.
    exporter.poller.run_pending()
    assert exporter.poller.drain(30)
    assert upstream.stats().polls == {message: 1}
    value = exporter.registry.get_sample_value
    assert value("mailpartner_message_poll_success", {"app": "shop", "message_id": message}) == 1


@pytest.mark.e2e  # a real process, and the real FILE_CHECK_INTERVAL
def test_a_running_exporter_picks_up_a_new_file_within_seconds(
    upstream: SimulatorServer, tmp_path: Path
) -> None:
    message = upstream.world.send(15).message_id
    path = config(tmp_path, upstream.url)
    process = start_exporter(tmp_path, "--config.file", str(path))
    try:
        atomic_write(
            tmp_path / "messages.d" / "new.yaml", [{"id": message, "labels": {"app": "shop"}}]
        )
        series = f'mailpartner_message_poll_success{{app="shop",message_id="{message}"}} 1.0'
        wait_until(
            lambda: series in requests.get(f"{process.url}/metrics", timeout=5).text,
            FILE_CHECK_INTERVAL + 10,
            "the new file's message polled",
        )
    finally:
        process.stop()


def test_the_config_beats_a_file_which_beats_a_registration(
    upstream: SimulatorServer, tmp_path: Path
) -> None:
    a, b = (upstream.world.send(5).message_id for _ in range(2))
    path = config(tmp_path, upstream.url, messages=[{"id": a, "labels": {"from": "config"}}])
    atomic_write(
        tmp_path / "messages.d" / "f.yaml",
        [{"id": a, "labels": {"from": "file"}}, {"id": b, "labels": {"from": "file"}}],
    )
    exporter = Exporter(load_runnable(str(path), demo=False), str(path))
    source = exporter.sources["bulk_status"]
    assert isinstance(source, BulkStatusSource)
    for message in (a, b):
        source.register(MessageSpec(message, MappingProxyType({"from": "registration"})))
    assert tracked(exporter) == {a: {"from": "config"}, b: {"from": "file"}}

    (tmp_path / "messages.d" / "f.yaml").unlink()
    source.tick(time.time() + FILE_CHECK_INTERVAL)
    assert tracked(exporter) == {a: {"from": "config"}, b: {"from": "registration"}}

    # Demo sends come last: one never relabels a registration, a registration relabels one.
    c = upstream.world.send(5).message_id
    source.add(MessageSpec(b, MappingProxyType({"from": "demo"})))
    source.add(MessageSpec(c, MappingProxyType({"from": "demo"})))
    assert tracked(exporter) == {
        a: {"from": "config"},
        b: {"from": "registration"},
        c: {"from": "demo"},
    }
    source.register(MessageSpec(c, MappingProxyType({"from": "registration"})))
    assert tracked(exporter)[c] == {"from": "registration"}
    # And a full pass over every origin agrees with the one-message updates.
    before = tracked(exporter)
    source.sync(time.time())
    assert tracked(exporter) == before


def test_a_reload_that_adds_a_glob_keeps_the_file_messages_running(
    upstream: SimulatorServer, tmp_path: Path
) -> None:
    message = upstream.world.send(5).message_id
    path = config(tmp_path, upstream.url, message_files=["messages.d/*.yaml"])
    atomic_write(tmp_path / "messages.d" / "a.yaml", [{"id": message}])
    exporter = Exporter(load_runnable(str(path), demo=False), str(path))
    assert exporter.poller.poll_all()
    before = exporter.book.get(message)
    assert before is not None and before.poll_ok

    config(tmp_path, upstream.url, message_files=["messages.d/*.yaml", "more.d/*.json"])
    assert exporter.reload() is None
    after = exporter.book.get(message)
    assert after is not None  # never dropped and added back as new
    assert (after.first_seen, after.poll_ok, after.last_success) == (
        before.first_seen,
        True,
        before.last_success,
    )


def test_glob_characters_in_the_config_folder_are_taken_literally(
    upstream: SimulatorServer, tmp_path: Path
) -> None:
    message = upstream.world.send(5).message_id
    folder = tmp_path / "x[prod]"
    folder.mkdir()
    path = config(folder, upstream.url)
    atomic_write(folder / "messages.d" / "a.yaml", [{"id": message}])
    exporter = Exporter(load_runnable(str(path), demo=False), str(path))
    assert tracked(exporter) == {message: {}}
