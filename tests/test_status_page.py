"""The status page as a person sees it: rendered by headless Chromium, checked against /metrics;
and it, with the JSON answers, whatever times and costs the messages hold."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import re
import subprocess
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from exporter.aggregate import MessageAggregate
from exporter.calendar import PARIS
from exporter.domain import MessageSpec, State
from exporter.landing import render_landing
from exporter.registration import PATH, messages_app
from exporter.state import StoredMessage
from exporter.tracker import MessageBook
from exporter.web import create_app, serve
from exporter.wsgi import respond_json
from tests.conftest import (
    START,
    FakeClock,
    bulk_status_poller,
    make_client,
    make_config,
    require_tool,
)
from tests.stack import REPO

# CI keeps what lands here; locally it is git-ignored.
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", REPO / "test-artifacts"))


class _Rows(HTMLParser):
    """Per message row: its ID and the numbers in its state cells, as rendered."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, dict[str, str]] = {}
        self.order: list[str] = []
        self._row: str | None = None
        self._state: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "tr" and found.get("data-message-id"):
            self._row = found["data-message-id"]
            self.order.append(self._row or "")
            self.rows[self._row or ""] = {}
        elif tag == "td" and found.get("data-state") and self._row:
            self._state = found["data-state"]

    def handle_data(self, data: str) -> None:
        if self._row and self._state:
            self.rows[self._row][self._state] = data.strip()
            self._state = None


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    # Flags that keep Chromium off the network it cannot reach here.
    return subprocess.run(
        [
            require_tool("chromium"),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        timeout=90,
        check=False,
    )


@pytest.mark.e2e
def test_rendered_table_matches_the_metrics_and_is_screenshotted(
    scenario_url: str, tmp_path: Path
) -> None:
    rendered = chromium(tmp_path / "profile", "--dump-dom", scenario_url)
    assert rendered.returncode == 0, rendered.stderr.decode()[-2000:]
    parser = _Rows()
    parser.feed(rendered.stdout.decode())
    assert parser.order == ["301", "302", "300"]  # newest send first

    exposition = requests.get(f"{scenario_url}/metrics", timeout=5).text
    polled: dict[str, dict[str, str]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == "mailpartner_message_recipients":
                polled.setdefault(sample.labels["message_id"], {})[sample.labels["state"]] = str(
                    int(sample.value)
                )
    assert (
        parser.rows["300"]
        == polled["300"]
        == {"delivered": "2", "failed": "0", "pending": "0", "unknown": "0"}
    )
    assert parser.rows["301"] == polled["301"]
    # 302 was never polled: the page says so instead of showing zeros
    assert set(parser.rows["302"].values()) == {"\u2013"}  # an en dash

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "status-page.png"
    shot.unlink(missing_ok=True)
    taken = chromium(
        tmp_path / "profile", "--window-size=1400,500", f"--screenshot={shot}", scenario_url
    )
    assert taken.returncode == 0, taken.stderr.decode()[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(shot.read_bytes()[16:20], "big") == 1400  # PNG width


# Times no check let through: registered before registrations were checked, or read back from
# a state file written then. Each once made "/" answer 500 for everyone until it went away.
BAD_TIMES = {
    "nan": math.nan,
    "inf": math.inf,
    "-inf": -math.inf,
    "1e300": 1e300,
    "-1e12": -1e12,  # year -29719
    "year-10000": 253402300800.0,  # the first second after 9999-12-31
}


def rows(page: str) -> dict[str, str]:
    """Each message's table row, by its ID, in page order."""
    return dict(re.findall(r'<tr data-message-id="([^"]*)">(.*)</tr>', page))


def book_with(field: str, value: float) -> MessageBook:
    """Messages "good", sent a minute ago and polled, and "bad", with ``value`` as ``field``."""
    specs = [MessageSpec("good", sent_at=START - 60), MessageSpec("bad", sent_at=START - 120)]
    if field == "sent_at":
        specs[1] = MessageSpec("bad", sent_at=value)
    book = MessageBook(make_config("http://127.0.0.1:9/v1").polling)
    if field == "first_seen":  # from a state file, for a message with no sent_at
        specs[1] = MessageSpec("bad")
        stored = StoredMessage("bad", value, "active", None, None, None)
        book.restore(dataclasses.replace(book.export(START), messages={"bad": stored}))
    book.sync(specs, START)
    book.start_poll("good", START)
    book.start_poll("bad", value if field == "last_poll" else START)
    cost, report = (value, START) if field == "cost" else (0.042, value)
    values = MessageAggregate(dict.fromkeys(State, 1), {}, cost, 0, report)
    if field != "last_poll":
        book.record_success("bad", values, START)
    book.record_success("good", dataclasses.replace(values, cost=0.042, last_report=START), START)
    return book


@pytest.mark.parametrize("value", BAD_TIMES.values(), ids=BAD_TIMES.keys())
@pytest.mark.parametrize("field", ["sent_at", "first_seen", "last_poll", "cost", "last_report"])
def test_status_page_renders_whatever_a_message_holds(field: str, value: float) -> None:
    shown = rows(render_landing(book_with(field, value), "/metrics", FakeClock(START + 30)))
    assert set(shown) == {"good", "bad"}
    assert '<td class="n">0.0420</td>' in shown["good"]
    assert (
        '<time datetime="2026-11-26T09:59:00Z" title="2026-11-26T09:59:00Z">1m30s ago'
        in (shown["good"])
    )
    if field == "cost":  # the number as it is, in a cell no wider than a date
        (cost,) = re.findall(r'<td class="n">([^<]*)</td>', shown["bad"])
        assert len(cost) <= 20 and (float(cost) == value or cost == "nan" == str(value))
    elif field != "last_report":  # not on the page
        assert f'<span title="not a valid time">invalid ({value})</span>' in shown["bad"]


def test_a_message_sent_at_nan_leaves_the_others_newest_first() -> None:
    book = MessageBook(make_config("http://127.0.0.1:9/v1").polling)
    sent = {"b": START - 120, "nan": math.nan, "c": START - 30, "a": START - 60, "d": START - 9}
    book.sync([MessageSpec(name, sent_at=at) for name, at in sent.items()], START)
    assert list(rows(render_landing(book, "/metrics", FakeClock(START)))) == [
        "d",
        "c",
        "a",
        "b",
        "nan",
    ]


def strict_json(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_json_answers_write_non_finite_numbers_as_null() -> None:
    started: list[tuple[str, list[tuple[str, str]]]] = []
    payload = {"a": [math.nan, {"b": math.inf, "c": "NaN"}], "d": (1.5, -math.inf), "e": 1e300}
    body = b"".join(respond_json(lambda *a: started.append(a), "200 OK", payload))
    assert strict_json(body.decode()) == {
        "a": [None, {"b": None, "c": "NaN"}],
        "d": [1.5, None],
        "e": 1e300,
    }
    assert started == [
        ("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    ]


@pytest.fixture
def registered_badly() -> Iterator[str]:
    """An exporter's page and registrations on a loopback socket, with one message registered
    for each bad time (as before registrations were checked) and one good one."""
    clock = FakeClock()
    config = make_config("http://127.0.0.1:9/v1")
    source, _ = bulk_status_poller(config, make_client(config), clock)
    for name, value in BAD_TIMES.items():
        source.register(MessageSpec(name, sent_at=value))
    source.register(MessageSpec("good", sent_at=START - 60))
    registrations = messages_app(lambda: {"bulk_status": source})
    app = create_app(CollectorRegistry(), source.book, clock=clock, more={PATH: registrations})
    server = serve(app, "127.0.0.1:0")
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_bad_times_take_down_neither_the_page_nor_the_registrations(registered_badly: str) -> None:
    page = requests.get(registered_badly, timeout=5)
    assert page.status_code == 200
    assert set(rows(page.text)) == {*BAD_TIMES, "good"}
    listed = requests.get(registered_badly + PATH, timeout=5)
    assert listed.status_code == 200
    assert {m["id"]: m["sent_at"] for m in strict_json(listed.text)["data"]} == {
        "nan": None,
        "inf": None,
        "-inf": None,
        "1e300": 1e300,
        "-1e12": -1e12,
        "year-10000": 253402300800.0,
        "good": START - 60,
    }


def test_a_message_the_api_does_not_know_shows_as_not_found() -> None:
    book = MessageBook(make_config("http://127.0.0.1:9/v1").polling)
    book.sync([MessageSpec("typo", sent_at=START - 3600), MessageSpec("kept")], START)
    book.start_poll("typo", START)
    book.record_failure("typo", "API error code 4: Message introuvable", START, not_found=True)
    shown = rows(render_landing(book, "/metrics", FakeClock(START)))
    assert "<td>final (not found)</td>" in shown["typo"]
    assert "not found" not in shown["kept"]


def test_a_deferred_send_shows_when_it_is_scheduled_for() -> None:
    book = MessageBook(make_config("http://127.0.0.1:9/v1").polling)
    tuesday = dt.datetime(2026, 12, 1, 8, 0, tzinfo=PARIS).timestamp()
    book.sync([MessageSpec("later", scheduled_at=tuesday)], START)  # a Thursday
    shown = rows(render_landing(book, "/metrics", FakeClock(tuesday - 5 * 86400)))
    assert (
        '<td>scheduled for <time datetime="2026-12-01T07:00:00Z" title="2026-12-01T07:00:00Z">'
        "Tue 08:00</time></td>"
    ) in shown["later"]
