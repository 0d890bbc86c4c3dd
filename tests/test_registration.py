"""POST/DELETE /api/v1/messages: a sending application registers each message it sends.

Over real HTTP: the in-process exporter for the answers and their effect on polling, a real
process for persistence across a restart and for the web config's basic auth.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import bcrypt
import pytest
import requests
import yaml

from exporter.app import Exporter, load_runnable
from exporter.config.model import PollingConfig
from exporter.domain import MessageSpec
from exporter.simulator import SimulatorServer, World
from exporter.sources.bulk_status import BulkStatusSource
from exporter.state import StateStore
from exporter.tracker import MessageBook
from tests.conftest import TEST_KEY
from tests.stack import start_exporter, wait_until


@pytest.fixture
def upstream() -> Iterator[SimulatorServer]:
    with SimulatorServer(World(seed=3), api_key=TEST_KEY) as server:
        yield server


def write_config(tmp_path: Path, url: str, **extra: Any) -> Path:
    path = tmp_path / "config.yaml"
    document = {"api": {"base_url": url, "api_key": TEST_KEY}, **extra}
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture
def exporter(upstream: SimulatorServer, tmp_path: Path) -> Iterator[tuple[Exporter, str]]:
    path = write_config(tmp_path, upstream.url, state={"path": ":memory:"})
    exporter = Exporter(load_runnable(str(path), demo=False), str(path))
    server = exporter.serve("127.0.0.1:0", "/metrics", registration=True)
    yield exporter, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def value(exporter: Exporter, name: str, **labels: str) -> float | None:
    return exporter.registry.get_sample_value(name, labels)


def test_a_registered_message_is_polled_and_exposed_with_its_labels(
    exporter: tuple[Exporter, str], upstream: SimulatorServer
) -> None:
    app, url = exporter
    message = upstream.world.send(40).message_id
    body = {"id": message, "labels": {"campaign": "black-friday"}, "sent_at": 1795687200}
    answer = requests.post(f"{url}/api/v1/messages", json=body, timeout=5)
    assert answer.status_code == 201
    assert answer.json() == {
        "status": "success",
        "data": {**body, "sent_at": 1795687200.0, "source": "bulk_status"},
        # This fixture keeps the state in memory, and the answer says what that means.
        "warnings": [
            'not saved: state.path is ":memory:"; this registration will not survive a restart'
        ],
    }
    assert app.poller.poll_all()
    labels = {"message_id": message, "campaign": "black-friday"}
    assert value(app, "mailpartner_message_poll_success", **labels) == 1
    assert value(app, "mailpartner_message_sent_timestamp_seconds", **labels) == 1795687200
    assert upstream.stats().polls == {message: 1}

    again = requests.post(f"{url}/api/v1/messages", json=body, timeout=5)
    assert again.status_code == 200  # as it was: nothing changes
    listed = requests.get(f"{url}/api/v1/messages", timeout=5).json()
    assert listed["data"] == [{**body, "sent_at": 1795687200.0, "source": "bulk_status"}]


def test_a_changed_registration_relabels_and_delete_stops_tracking(
    exporter: tuple[Exporter, str], upstream: SimulatorServer
) -> None:
    app, url = exporter
    message = upstream.world.send(10).message_id
    requests.post(f"{url}/api/v1/messages", json={"id": message}, timeout=5)
    assert app.poller.poll_all()
    changed = {"id": message, "labels": {"campaign": "late"}}
    assert requests.post(f"{url}/api/v1/messages", json=changed, timeout=5).status_code == 201
    assert value(app, "mailpartner_message_poll_success", message_id=message, campaign="late") == 1
    assert value(app, "mailpartner_message_poll_success", message_id=message) is None

    gone = requests.delete(f"{url}/api/v1/messages/{message}", timeout=5)
    assert gone.status_code == 200
    assert (
        value(app, "mailpartner_message_poll_success", message_id=message, campaign="late") is None
    )
    again = requests.delete(f"{url}/api/v1/messages/{message}", timeout=5)
    assert again.status_code == 404
    assert again.json() == {"status": "error", "errorType": "not_found", "error": "not registered"}


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        (
            b'{"id": "7", "labels": {"bad-name": "x"}}',
            400,
            "request body: labels.bad-name: is not a valid Prometheus label name"
            " ([a-zA-Z_][a-zA-Z0-9_]*)",
        ),
        (
            b'{"id": "7", "labels": {"message_id": "x"}}',
            400,
            "request body: labels.message_id: shadows a label the exporter or Prometheus sets"
            " itself; choose another name",
        ),
        (b'{"labels": {}}', 400, "request body: id: is required"),
        (
            b'{"id": "has space"}',
            400,
            "request body: id: must be 1 to 128 characters without spaces, control or"
            " bidirectional characters",
        ),
        (
            json.dumps({"id": "9" * 129}).encode(),
            400,
            "request body: id: must be 1 to 128 characters without spaces, control or"
            " bidirectional characters",
        ),
        (
            json.dumps({"id": "evil\u202egpj.exe"}).encode(),
            400,
            "request body: id: must be 1 to 128 characters without spaces, control or"
            " bidirectional characters",
        ),
        (
            json.dumps({"id": "7", "labels": {f"l{i}": "x" for i in range(11)}}).encode(),
            400,
            "request body: labels: has 11 labels; a message takes at most 10",
        ),
        (
            json.dumps({"id": "7", "labels": {"campaign": "x" * 60000}}).encode(),
            400,
            "request body: labels.campaign: is 60000 characters long; label values take at"
            " most 128",
        ),
        (
            json.dumps({"id": "7", "labels": {"campaign": "a\u2066b"}}).encode(),
            400,
            "request body: labels.campaign: has a control or bidirectional character",
        ),
        (
            json.dumps({"id": "7", "labels": {"campaign": "a\nb"}}).encode(),
            400,
            "request body: labels.campaign: has a control or bidirectional character",
        ),
        *[
            (
                b'{"id": "7", "sent_at": %s}' % raw,
                400,
                f"request body: sent_at: {shown} is not a time between 2000 and 2100"
                " (epoch seconds or RFC 3339)",
            )
            for raw, shown in [
                (b"NaN", "nan"),
                (b"Infinity", "inf"),
                (b"-Infinity", "-inf"),
                (b"1e300", "1e+300"),
                (b"-1000000000000", "-1000000000000"),
                (b"253402300800", "253402300800"),
                (b"1764151200000", "1764151200000"),
                (b'"9999-12-31T23:59:59Z"', "253402300799.0"),
                (b'"1999-12-31T23:59:59Z"', "946684799.0"),
            ]
        ],
        (
            b'{"id": "7", "sent_at": "yesterday"}',
            400,
            "request body: sent_at: 'yesterday' is not an RFC 3339 time such as"
            " 2026-11-26T10:00:00Z",
        ),
        (b'{"id": "7", "colour": "red"}', 400, "request body: colour: unknown key"),
        (
            b'{"id": "7", "source": "fax"}',
            400,
            "request body: source: 'fax' is not an enabled bulk-status source",
        ),
        (b'["7"]', 400, "request body: must be a mapping, not a list"),
        (b"{not json", 400, "the body is not JSON"),
        (b"x" * 70000, 413, "send one JSON object of at most 65536 bytes, with Content-Length"),
    ],
)
def test_a_bad_registration_is_refused_like_a_bad_config(
    exporter: tuple[Exporter, str], body: bytes, status: int, error: str
) -> None:
    app, url = exporter
    answer = requests.post(f"{url}/api/v1/messages", data=body, timeout=5)
    assert answer.status_code == status
    assert answer.json() == {"status": "error", "errorType": "bad_data", "error": error}
    assert app.book.snapshot()[0] == ()


def test_other_methods_are_refused(exporter: tuple[Exporter, str]) -> None:
    _, url = exporter
    assert requests.put(f"{url}/api/v1/messages", json={}, timeout=5).status_code == 405
    answer = requests.post(f"{url}/api/v1/messages/7", json={}, timeout=5)
    assert (answer.status_code, answer.headers["Allow"]) == (405, "DELETE")


def test_registration_needs_the_web_config_password(
    upstream: SimulatorServer, tmp_path: Path
) -> None:
    path = write_config(tmp_path, upstream.url, state={"path": ":memory:"})
    web = tmp_path / "web.yml"
    hashed = bcrypt.hashpw(b"s3cret-pass", bcrypt.gensalt(4)).decode()
    web.write_text(f"basic_auth_users:\n  sender: {hashed}\n")
    app = Exporter(load_runnable(str(path), demo=False), str(path))
    server = app.serve("127.0.0.1:0", "/metrics", str(web), registration=True)
    try:
        endpoint = f"http://127.0.0.1:{server.server_port}/api/v1/messages"
        body = {"id": "77"}
        assert requests.post(endpoint, json=body, timeout=5).status_code == 401
        wrong = ("sender", "wrong")
        assert requests.post(endpoint, json=body, auth=wrong, timeout=5).status_code == 401
        assert requests.delete(f"{endpoint}/77", timeout=5).status_code == 401
        assert app.book.snapshot()[0] == ()
        right = ("sender", "s3cret-pass")
        assert requests.post(endpoint, json=body, auth=right, timeout=5).status_code == 201
        assert [m.spec.id for m in app.book.snapshot()[0]] == ["77"]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.e2e
def test_registrations_survive_a_restart(upstream: SimulatorServer, tmp_path: Path) -> None:
    message = upstream.world.send(25).message_id
    path = write_config(tmp_path, upstream.url, state={"path": str(tmp_path / "state.db")})
    first = start_exporter(tmp_path, "--config.file", str(path), "--web.enable-registration")
    try:
        body = {"id": message, "labels": {"campaign": "kept"}}
        answer = requests.post(f"{first.url}/api/v1/messages", json=body, timeout=5)
        assert answer.status_code == 201
        wait_until(lambda: upstream.stats().polls.get(message), 10, "the first poll")
    finally:
        first.process.send_signal(signal.SIGTERM)
        assert first.process.wait(10) == 0

    second = start_exporter(tmp_path, "--config.file", str(path))
    try:
        listed = requests.get(f"{second.url}/api/v1/messages", timeout=5).json()
        assert [m["id"] for m in listed["data"]] == [message]
        metrics = requests.get(f"{second.url}/metrics", timeout=5).text
        series = f'mailpartner_message_poll_success{{campaign="kept",message_id="{message}"}}'
        assert series in metrics
    finally:
        second.stop()


@pytest.mark.e2e
def test_a_registration_is_on_disk_within_seconds_and_survives_a_kill(
    upstream: SimulatorServer, tmp_path: Path
) -> None:
    message = upstream.world.send(5).message_id
    state = tmp_path / "state.db"
    path = write_config(tmp_path, upstream.url, state={"path": str(state)})
    first = start_exporter(tmp_path, "--config.file", str(path), "--web.enable-registration")
    try:
        endpoint = f"{first.url}/api/v1/messages"
        assert requests.post(endpoint, json={"id": message}, timeout=5).status_code == 201

        def saved() -> bool:
            with contextlib.closing(sqlite3.connect(f"file:{state}?mode=ro", uri=True)) as db:
                try:
                    rows = db.execute("SELECT id FROM registered").fetchall()
                except sqlite3.OperationalError:  # not created yet
                    return False
            return rows == [(message,)]

        # On disk when the answer comes, not at the next 10 s housekeeping turn.
        assert saved()
    finally:
        first.process.kill()  # no shutdown save
        first.process.wait(10)
        first.stop()

    second = start_exporter(tmp_path, "--config.file", str(path))
    try:
        listed = requests.get(f"{second.url}/api/v1/messages", timeout=5).json()
        assert [m["id"] for m in listed["data"]] == [message]
    finally:
        second.stop()


def test_registrations_end_with_their_messages(upstream: SimulatorServer, tmp_path: Path) -> None:
    mine, theirs = "7000", "7001"  # shard 0 of 2 owns 7000, not 7001
    for message in (mine, theirs):
        upstream.world.send(5, message_id=message, sent_at=upstream.world.clock() - 3600)
    path = write_config(
        tmp_path,
        upstream.url,
        state={"path": ":memory:"},
        shard={"count": 2, "index": 0},
        polling={"retention": "1h"},
    )
    app = Exporter(load_runnable(str(path), demo=False), str(path))
    source = app.sources["bulk_status"]
    assert isinstance(source, BulkStatusSource)
    assert app.holder.config.shard.owns(mine) and not app.holder.config.shard.owns(theirs)
    for message in (mine, theirs):
        source.register(MessageSpec(message, MappingProxyType({})))
    # Everything reported: one poll settles it, the recheck makes it final.
    upstream.world.clock = lambda: time.time() + 3 * 86400
    assert app.poller.poll_all()
    assert app.poller.poll_all()
    assert [m.phase for m in app.book.snapshot()[0]] == ["final"]
    final_at = app.book.snapshot()[0][0].final_at
    assert final_at is not None

    source.tick(final_at + 1800)  # within retention: both kept
    assert [s.id for s in source.registered()] == [mine, theirs]
    source.tick(final_at + 3601)  # mine past retention
    assert [s.id for s in source.registered()] == [theirs]
    source.tick(time.time() + 48 * 3600 + 3601)  # theirs older than any message is kept
    assert source.registered() == ()


def test_ids_are_decoded_once_from_the_path(exporter: tuple[Exporter, str]) -> None:
    """``%41`` in a registered ID is deleted as ``%2541``, and UTF-8 IDs as their bytes."""
    app, url = exporter
    for message in ("pct%41x", "ümlaut", "a/b"):
        answer = requests.post(f"{url}/api/v1/messages", json={"id": message}, timeout=5)
        assert answer.status_code == 201, answer.text
    for message, path in [("pct%41x", "pct%2541x"), ("ümlaut", "%C3%BCmlaut"), ("a/b", "a%2Fb")]:
        gone = requests.delete(f"{url}/api/v1/messages/{path}", timeout=5)
        assert gone.json() == {"status": "success", "data": {"id": message}}, path
    assert app.book.snapshot()[0] == ()


def test_write_endpoints_are_off_unless_enabled(upstream: SimulatorServer, tmp_path: Path) -> None:
    path = write_config(tmp_path, upstream.url, state={"path": ":memory:"})
    exporter = Exporter(load_runnable(str(path), demo=False), str(path))
    server = exporter.serve("127.0.0.1:0", "/metrics")
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        posted = requests.post(f"{url}/api/v1/messages", json={"id": "77"}, timeout=5)
        assert posted.status_code == 404
        assert "--web.enable-registration" in posted.json()["error"]
        deleted = requests.delete(f"{url}/api/v1/messages/77", timeout=5)
        assert deleted.status_code == 404
        assert "--web.enable-registration" in deleted.json()["error"]
        assert exporter.book.snapshot()[0] == ()
        listed = requests.get(f"{url}/api/v1/messages", timeout=5)
        assert listed.json() == {"status": "success", "data": []}
        loaded = exporter.holder.status
        reloaded = requests.post(f"{url}/-/reload", timeout=5)
        assert reloaded.status_code == 403
        assert "--web.enable-lifecycle" in reloaded.text
        assert exporter.holder.status is loaded  # nothing was reloaded
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.e2e
def test_the_flags_open_the_write_endpoints_and_sighup_always_reloads(
    upstream: SimulatorServer, tmp_path: Path
) -> None:
    path = write_config(tmp_path, upstream.url, state={"path": ":memory:"})
    closed = start_exporter(tmp_path, "--config.file", str(path))
    try:
        assert requests.post(f"{closed.url}/-/reload", timeout=5).status_code == 403
        post = requests.post(f"{closed.url}/api/v1/messages", json={"id": "77"}, timeout=5)
        assert post.status_code == 404
        closed.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "configuration reloaded" in closed.log.read_text(), 10, "SIGHUP reload")
    finally:
        closed.stop()
    flags = ("--web.enable-lifecycle", "--web.enable-registration")
    opened = start_exporter(tmp_path, "--config.file", str(path), *flags)
    try:
        assert requests.post(f"{opened.url}/-/reload", timeout=5).status_code == 200
        post = requests.post(f"{opened.url}/api/v1/messages", json={"id": "77"}, timeout=5)
        assert post.status_code == 201
    finally:
        opened.stop()


def test_registrations_saved_before_the_limits_are_dropped_at_start(
    upstream: SimulatorServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A state file written before the limits existed still loads; what breaks them goes."""
    state = tmp_path / "state.db"
    path = write_config(tmp_path, upstream.url, state={"path": str(state)})
    store = StateStore(str(state), source="bulk_status")
    empty = MessageBook(PollingConfig()).export(time.time())
    bad = [
        MessageSpec("huge", MappingProxyType({"campaign": "x" * 60_000})),
        MessageSpec("negative", sent_at=-1e12),
        MessageSpec("far", sent_at=253402300800.0),
        MessageSpec("bidi\u202e", MappingProxyType({})),
        MessageSpec("many", MappingProxyType({f"l{i}": "v" for i in range(11)})),
    ]
    good = MessageSpec("kept", MappingProxyType({"campaign": "c"}), sent_at=time.time())
    store.save(dataclasses.replace(empty, registered=(bad[0], good, *bad[1:])))
    store.close()

    exporter = Exporter(load_runnable(str(path), demo=False), str(path))
    try:
        assert [spec.id for spec in exporter.bulk_sources()["bulk_status"].registered()] == ["kept"]
        dropped = [
            r for r in caplog.records if r.getMessage() == "registration in the state file dropped"
        ]
        assert sorted(r.message_id for r in dropped) == sorted(s.id for s in bad)
        assert [m.spec.id for m in exporter.book.snapshot()[0]] == ["kept"]
    finally:
        for source in exporter.sources.values():
            source.close()


def test_a_deferred_send_is_registered_with_its_scheduled_time(
    exporter: tuple[Exporter, str],
) -> None:
    app, url = exporter
    later = time.time() + 3600
    body = {"id": "8800", "labels": {"campaign": "promo"}, "scheduled_at": later}
    answer = requests.post(f"{url}/api/v1/messages", json=body, timeout=5)
    assert answer.status_code == 201
    assert answer.json()["data"]["scheduled_at"] == later
    listed = requests.get(f"{url}/api/v1/messages", timeout=5).json()["data"]
    assert [m.get("scheduled_at") for m in listed] == [later]
    tracked = app.book.get("8800")
    assert tracked is not None and tracked.next_poll == later  # nothing before it


@pytest.mark.e2e
def test_a_deferred_transactional_registration_survives_a_restart(
    upstream: SimulatorServer, tmp_path: Path
) -> None:
    path = write_config(tmp_path, upstream.url, state={"path": str(tmp_path / "state.db")})
    later = time.time() + 7200
    body = {"id": "8801", "scheduled_at": later, "transactional": True}
    first = start_exporter(tmp_path, "--config.file", str(path), "--web.enable-registration")
    try:
        answer = requests.post(f"{first.url}/api/v1/messages", json=body, timeout=5)
        assert answer.status_code == 201
    finally:
        first.stop()
    second = start_exporter(tmp_path, "--config.file", str(path))
    try:
        (listed,) = requests.get(f"{second.url}/api/v1/messages", timeout=5).json()["data"]
        assert (listed["scheduled_at"], listed["transactional"]) == (later, True)
        assert "scheduled for <time" in requests.get(second.url, timeout=5).text
    finally:
        second.stop()
