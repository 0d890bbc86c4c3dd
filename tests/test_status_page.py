"""The status page as a person sees it: rendered by headless Chromium, checked against /metrics;
and it, with the JSON answers, whatever times and costs the messages hold."""

from __future__ import annotations

import dataclasses
import datetime as dt
import html
import io
import json
import math
import os
import re
import subprocess
from collections.abc import Iterable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from types import MappingProxyType
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest
import requests
import yaml
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from exporter.aggregate import MessageAggregate
from exporter.app import Exporter, load_runnable
from exporter.calendar import PARIS
from exporter.client import BULK_STATUS, ME
from exporter.collector import MailPartnerCollector, ProcessCollector
from exporter.config.holder import ConfigHolder
from exporter.domain import MessageSpec, State
from exporter.landing import refresh_seconds, render_landing
from exporter.registration import PATH, messages_app
from exporter.simulator import SimulatorServer
from exporter.state import StoredMessage
from exporter.stats import RequestStats
from exporter.tracker import MessageBook
from exporter.web import create_app, serve
from exporter.wording import age_in_words
from exporter.wsgi import StartResponse, WSGIApp, respond, respond_json
from tests.conftest import (
    START,
    TEST_KEY,
    FakeClock,
    bulk_status_poller,
    make_client,
    make_config,
    require_tool,
)
from tests.scenario import scenario
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
def test_rendered_table_matches_the_metrics(scenario_url: str, tmp_path: Path) -> None:
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
    return dict(re.findall(r'<tr data-message-id="([^"]*)"[^>]*>(.*)</tr>', page))


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
    assert '<td class="n">0.042</td>' in shown["good"]
    assert (
        '<time datetime="2026-11-26T09:59:00Z" title="2026-11-26T09:59:00Z">'
        "1&nbsp;min 30&nbsp;s ago</time>"
    ) in shown["good"]
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


def test_a_message_the_api_does_not_know_is_marked_not_found() -> None:
    book = MessageBook(make_config("http://127.0.0.1:9/v1").polling)
    book.sync([MessageSpec("typo", sent_at=START - 3600), MessageSpec("kept")], START)
    book.start_poll("typo", START)
    book.record_failure("typo", "API error code 4: Message introuvable", START, not_found=True)
    page = render_landing(book, "/metrics", FakeClock(START + 60))
    shown = rows(page)
    assert row_classes(page) == {"typo": {"final", "not-found"}, "kept": {"active"}}
    # Phase, then a marker in words; the poll is not "failing": it will not be retried.
    assert cell_texts(shown["typo"])[2:3] + cell_texts(shown["typo"])[10:] == [
        "final \u2716 not found",
        "1 min ago",
        "API error code 4: Message introuvable",
    ]
    assert "not found" not in shown["kept"]


def test_a_deferred_send_shows_when_it_is_scheduled_for() -> None:
    book = MessageBook(make_config("http://127.0.0.1:9/v1").polling)
    tuesday = dt.datetime(2026, 12, 1, 8, 0, tzinfo=PARIS).timestamp()
    book.sync([MessageSpec("later", scheduled_at=tuesday)], START)  # a Thursday
    shown = rows(render_landing(book, "/metrics", FakeClock(tuesday - 5 * 86400 + 1800)))
    assert (
        '<td>scheduled for <time class="at" datetime="2026-12-01T07:00:00Z"'
        ' title="2026-12-01T07:00:00Z">'
        "Tue 08:00</time></td>"
    ) in shown["later"]
    assert cell_texts(shown["later"])[9] == "in 4 days 23 h"  # Sent


def test_rows_are_newest_first_by_the_time_the_page_names() -> None:
    book = MessageBook(make_config("http://127.0.0.1:9/v1").polling)
    book.sync([MessageSpec("unsent")], START - 300)  # registered without sent_at 5 min ago
    book.sync(
        [
            MessageSpec("unsent"),
            MessageSpec("old", sent_at=START - 600),
            MessageSpec("new", sent_at=START - 60),
            MessageSpec("deferred", scheduled_at=START + 3600),
        ],
        START,
    )
    page = render_landing(book, "/metrics", FakeClock(START))
    shown = rows(page)
    assert list(shown) == ["deferred", "new", "unsent", "old"]
    assert [cell_texts(row)[9] for row in shown.values()] == [
        "in 1 h",
        "1 min ago",
        "5 min ago",
        "10 min ago",
    ]
    assert texts("th", page)[9] == "Sent"
    assert texts("p", page)[1].startswith("Newest first by Sent: when a message went out")


# What a person reading the page notices: how old things are, what a cost is, which rows are in
# trouble, and a summary of the API, the budget and the credits above the table.

FRIDAY_21H = dt.datetime(2026, 12, 4, 21, 0, tzinfo=PARIS).timestamp()  # quiet hours


def texts(tag: str, markup: str) -> list[str]:
    """Each ``tag`` element's text as a person reads it (tags dropped, entities decoded, a
    no-break space read as a space)."""
    found = re.findall(rf"<{tag}\b[^>]*>(.*?)</{tag}>", markup, re.S)
    return [
        " ".join(html.unescape(re.sub(r"<[^>]*>", "", text)).replace("\xa0", " ").split())
        for text in found
    ]


def cell_texts(row: str) -> list[str]:
    return texts("td", row)


MINUTE, HOUR, DAY = 60, 3600, 86400
AGES = {  # each boundary, and either side of it
    "zero": (0, "just now"),
    "under a second": (0.999, "just now"),
    "under a second ahead": (-0.999, "just now"),
    "a second": (1, "1 s ago"),
    "under a minute": (59.999, "59 s ago"),
    "a minute": (MINUTE, "1 min ago"),
    "a minute and a second": (MINUTE + 1, "1 min 1 s ago"),
    "5 min 12.5 s": (312.5, "5 min 12 s ago"),
    "under an hour": (HOUR - 0.001, "59 min 59 s ago"),
    "an hour": (HOUR, "1 h ago"),
    "an hour and 59 s": (HOUR + 59, "1 h ago"),  # a third unit is left out
    "2 h 5 min": (2 * HOUR + 5 * MINUTE + 30, "2 h 5 min ago"),
    "under a day": (DAY - 1, "23 h 59 min ago"),
    "a day": (DAY, "1 day ago"),
    "a day and 59 min": (DAY + 59 * MINUTE, "1 day ago"),
    "1 day 23 h 16.479 s": (DAY + 23 * HOUR + 16.479, "1 day 23 h ago"),
    "4 days": (4 * DAY + 30 * MINUTE, "4 days ago"),
    "400 days": (400 * DAY + 2 * HOUR, "400 days 2 h ago"),
    "a second ahead": (-1, "in 1 s"),
    "12 min ahead": (-12 * MINUTE - 0.5, "in 12 min"),
    "2 days 11 h ahead": (-(2 * DAY + 11 * HOUR + 59), "in 2 days 11 h"),
}


@pytest.mark.parametrize(("seconds", "said"), AGES.values(), ids=AGES.keys())
def test_ages_read_in_words_in_two_units_at_most(seconds: float, said: str) -> None:
    assert age_in_words(seconds) == said


def test_the_sent_column_reads_in_words_with_the_exact_time_in_its_title() -> None:
    book = MessageBook(make_config("http://127.0.0.1:9/v1").polling)
    book.sync([MessageSpec("m", sent_at=START - 7530.25)], START)
    (row,) = rows(render_landing(book, "/metrics", FakeClock(START))).values()
    assert cell_texts(row)[9] == "2 h 5 min ago"
    # A number and its unit never part at the end of a line; the whole time is in the title.
    assert '<time datetime="2026-11-26T07:54:29Z" title="2026-11-26T07:54:29Z">2&nbsp;h' in row


def test_costs_are_rounded_and_trimmed() -> None:
    book = MessageBook(make_config("http://127.0.0.1:9/v1").polling)
    costs = {"noisy": 3.149999999999989, "small": 0.0105, "whole": 2.0, "tiny": 0.00004}
    book.sync([MessageSpec(name, sent_at=START) for name in costs], START)
    for name, cost in costs.items():
        book.start_poll(name, START)
        book.record_success(
            name, MessageAggregate(dict.fromkeys(State, 1), {}, cost, 0, START), START
        )
    shown = rows(render_landing(book, "/metrics", FakeClock(START)))
    assert {name: cell_texts(row)[8] for name, row in shown.items()} == {
        "noisy": "3.15",
        "small": "0.0105",
        "whole": "2",
        "tiny": "0",
    }


def marked_book(clock: FakeClock) -> MessageBook:
    """On a Friday evening: a healthy message, one whose last poll failed, one held until
    Monday, one final (not found) and one deferred to Tuesday."""
    book = MessageBook(make_config("http://127.0.0.1:9/v1").polling)
    now = clock()
    tuesday = dt.datetime(2026, 12, 8, 8, 0, tzinfo=PARIS).timestamp()
    book.sync(
        [
            MessageSpec("healthy", sent_at=now - 600, transactional=True),
            MessageSpec("failing", sent_at=now - 500, transactional=True),
            MessageSpec("held", sent_at=now - 400),
            MessageSpec("gone", sent_at=now - 3600),
            MessageSpec("deferred", scheduled_at=tuesday),
        ],
        now,
    )
    some = MessageAggregate(dict.fromkeys(State, 0) | {State.PENDING: 5}, {}, 0.05, 0, None)
    for name in ("healthy", "failing", "held"):
        book.start_poll(name, now)
        book.record_success(name, some, now)
    clock.advance(60)
    book.start_poll("failing", clock())
    book.record_failure("failing", "timeout: no answer within 5s", clock())
    book.start_poll("gone", clock())
    book.record_failure("gone", "API error code 4: Message introuvable", clock(), not_found=True)
    clock.advance(60)
    return book


def row_classes(page: str) -> dict[str, set[str]]:
    found = re.findall(r'<tr data-message-id="([^"]*)" class="([^"]*)">', page)
    return {message_id: set(classes.split()) for message_id, classes in found}


def test_failing_and_not_found_rows_are_marked_in_words_and_colour() -> None:
    clock = FakeClock(FRIDAY_21H)
    page = render_landing(marked_book(clock), "/metrics", clock)
    shown = rows(page)
    assert list(shown) == ["deferred", "held", "failing", "healthy", "gone"]  # newest first
    assert row_classes(page) == {
        "healthy": {"active"},
        "failing": {"active", "failing"},
        "held": {"held"},
        "gone": {"final", "not-found"},
        "deferred": {"scheduled"},
    }
    # Not colour alone: the last poll says it failed, and the error is beside it.
    assert cell_texts(shown["failing"])[10:] == [
        "\u26a0 failed 1 min ago",
        "timeout: no answer within 5s",
    ]
    assert "failed" not in "".join(cell_texts(shown["healthy"]))
    assert cell_texts(shown["gone"])[2] == "final \u2716 not found"
    assert "failed" not in "".join(cell_texts(shown["gone"]))
    # Held and deferred rows: when the send goes out, and how soon.
    assert cell_texts(shown["held"])[2] == "held until Mon 08:00 (in 2 days 10 h)"
    assert [cell_texts(shown["deferred"])[i] for i in (2, 9)] == [
        "scheduled for Tue 08:00",
        "in 3 days 10 h",
    ]
    # What the markers mean is said above the table.
    assert (
        "\u26a0 failed: its last poll failed \u00b7 \u2716 not found: the API does not know its ID"
        in (texts("p", page)[2])
    )
    style = re.search(r"<style>(.*)</style>", page, re.S)
    assert style is not None
    for kind in ("failing", "not-found", "held", "scheduled", "final"):  # each looks different
        assert re.search(rf"tr\.{kind} td\{{[^}}]*(color|background)", style.group(1)), kind


def test_long_ids_labels_and_errors_are_cut_with_the_whole_in_a_title() -> None:
    long_id, error = "id-" + "7" * 200, "connection: " + "x" * 1000
    labels = {f"label_{n}": "v" * 60 for n in range(4)}
    book = MessageBook(make_config("http://127.0.0.1:9/v1").polling)
    book.sync([MessageSpec(long_id, MappingProxyType(labels), sent_at=START)], START)
    book.start_poll(long_id, START)
    book.record_failure(long_id, error, START)
    (row,) = rows(render_landing(book, "/metrics", FakeClock(START))).values()
    every = ", ".join(f"{k}={v}" for k, v in labels.items())
    for whole in (long_id, every, error):
        (cut,) = re.findall(rf'<span title="{re.escape(whole)}">([^<]*)&hellip;</span>', row)
        assert whole.startswith(cut) and len(cut) < 200


def view(app: WSGIApp) -> str:
    """The page at ``/``, as a browser gets it."""
    environ: dict[str, Any] = {"PATH_INFO": "/", "wsgi.input": io.BytesIO()}
    setup_testing_defaults(environ)
    return b"".join(app(environ, lambda status, headers, exc_info=None: None)).decode()


def cards(page: str) -> dict[str, list[str]]:
    """The summary's cards: each title, and its lines as read."""
    found = re.findall(r'<div class="card[^"]*"><h3>([^<]*)</h3>(.*?)</div>', page)
    return {title: texts("p", body) for title, body in found}


def test_the_summary_says_how_the_api_is_and_why() -> None:
    registry, book, clock = scenario()  # 301's last poll failed (HTTP 502), then a code 10
    summary = cards(view(create_app(registry, book, clock=clock)))
    scheduled = registry.get_sample_value("mailpartner_exporter_scheduled_requests_per_minute")
    assert scheduled == pytest.approx(4.017, abs=1e-3)  # shown to a tenth
    assert summary == {
        "Mail Partner API": [
            "\u2716 down (mailpartner_up)",
            "Errors since start: code 10 1 · http_502 1",
            "429 pauses since start: 0",
            "Last failed poll: 301, just now: http_502: HTTP 502",
        ],
        "Request budget": [
            "Sent: \u2013 (just started)",
            "Scheduled: 4/min (under 1% of the budget)",
            "Budget: 600/min (api.max_requests_per_minute)",
        ],
        "Messages": [
            "3 tracked (mailpartner_exporter_messages)",
            "active 2 · settled 1 · final 0 · held 0 · scheduled 0",
            "\u26a0 last poll failed: 1",
        ],
    }  # and no credits: the account source is off


def test_the_summary_counts_the_requests_of_the_last_minute() -> None:
    clock = FakeClock()
    config = make_config("http://127.0.0.1:9/v1", max_requests_per_minute=120)
    stats = RequestStats([BULK_STATUS, ME])
    book = MessageBook(config.polling)
    registry = CollectorRegistry()
    registry.register(MailPartnerCollector(book, None, lambda: config.api, clock))
    registry.register(ProcessCollector(stats, ConfigHolder(config, clock())))
    app = create_app(registry, book, clock=clock)

    def requests_sent(count: int, error: str | None = None) -> None:
        for _ in range(count):
            stats.request_started(BULK_STATUS)
            stats.request_finished(BULK_STATUS, 0.1, error, up=error is None, api_error=True)

    first = cards(view(app))
    assert first["Mail Partner API"][0] == "\u2013 no request yet (mailpartner_up)"
    assert first["Request budget"][0] == "Sent: \u2013 (just started)"
    clock.advance(30)
    requests_sent(30)
    assert cards(view(app))["Request budget"] == [
        "Sent: 30 in the last 30 s (60/min, 50% of the budget)",
        "Scheduled: 0/min (0% of the budget)",
        "Budget: 120/min (api.max_requests_per_minute)",
    ]
    clock.advance(40)
    requests_sent(9)
    requests_sent(1, "429")
    summary = cards(view(app))
    assert (
        summary["Request budget"][0]
        == "Sent: 40 in the last 1 min 10 s (34.3/min, 29% of the budget)"
    )
    assert summary["Mail Partner API"][0::2] == [
        "\u2716 down (mailpartner_up)",
        "429 pauses since start: 1",
    ]
    clock.advance(30)
    requests_sent(5)
    summary = cards(view(app))
    # From the view a minute or more before (at 30 s): the first 30 requests are out.
    assert (
        summary["Request budget"][0]
        == "Sent: 15 in the last 1 min 10 s (12.9/min, 11% of the budget)"
    )
    assert summary["Mail Partner API"][0] == "\u2714 up (mailpartner_up)"


def test_the_running_exporter_shows_its_credits_and_budget(
    simulator: SimulatorServer, tmp_path: Path
) -> None:
    send = simulator.world.send(40)
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "api": {"base_url": simulator.url, "api_key": TEST_KEY},
                "messages": [{"id": send.message_id}],
                "sources": {"account": {"every": "5m", "low_credits": {"creditMail": 200000}}},
            }
        )
    )
    exporter = Exporter(load_runnable(str(path), demo=False), str(path))
    assert exporter.poller.poll_all()
    server = exporter.serve("127.0.0.1:0", "/metrics")
    try:
        page = requests.get(f"http://127.0.0.1:{server.server_port}/", timeout=5).text
    finally:
        server.shutdown()
        server.server_close()
    summary = cards(page)
    credits = {
        s.labels["field"]: s.value
        for m in exporter.registry.collect()
        if m.name == "mailpartner_account_credits"
        for s in m.samples
    }
    # The simulator's answer: 40 recipients sent, at 0.0105 each, still waiting.
    assert credits == {"balance": 499.58, "creditMail": 99960, "solde": 499.58, "toSend": 40}
    assert summary["Account credits"] == [
        "balance: 499.58",
        "\u26a0 creditMail: 99960, below 200000 (low_credits)",
        "solde: 499.58",
        "toSend: 40",
    ]
    assert summary["Mail Partner API"][0] == "\u2714 up (mailpartner_up)"
    scheduled = exporter.registry.get_sample_value(
        "mailpartner_exporter_scheduled_requests_per_minute"
    )
    assert scheduled is not None and scheduled < 6  # one young message (or held: real time)
    share = "under 1" if scheduled else "0"
    assert summary["Request budget"][1:] == [
        f"Scheduled: {round(scheduled, 1):g}/min ({share}% of the budget)",
        "Budget: 600/min (api.max_requests_per_minute)",
    ]
    phases = {
        s.labels["phase"]: int(s.value)
        for m in exporter.registry.collect()
        if m.name == "mailpartner_exporter_messages"
        for s in m.samples
    }
    assert sum(phases.values()) == 1
    assert summary["Messages"] == [
        "1 tracked (mailpartner_exporter_messages)",
        " · ".join(f"{phase} {count}" for phase, count in phases.items()),
    ]
    assert TEST_KEY not in page


REFRESHES = {  # the query string: the seconds between reloads, or None for none
    "none": ("", None),
    "30": ("refresh=30", 30),
    "the least": ("refresh=5", 5),
    "under the least": ("refresh=4", 5),
    "zero": ("refresh=0", 5),
    "the most": ("refresh=3600", 3600),
    "over the most": ("refresh=3601", 3600),
    "a thousand digits": ("refresh=" + "9" * 1000, 3600),
    "leading zeros": ("refresh=0007", 7),
    "among others": ("a=1&refresh=60", 60),
    "twice: the last": ("refresh=10&refresh=20", 20),
    "empty": ("refresh=", None),
    "a word": ("refresh=abc", None),
    "negative": ("refresh=-30", None),
    "a fraction": ("refresh=30.5", None),
    "an exponent": ("refresh=1e3", None),
    "fullwidth digits": ("refresh=%EF%BC%93%EF%BC%90", None),
}


@pytest.mark.parametrize(("query", "seconds"), REFRESHES.values(), ids=REFRESHES.keys())
def test_the_refresh_asked_for_is_held_within_5_s_and_an_hour(
    query: str, seconds: int | None
) -> None:
    assert refresh_seconds(query) == seconds


def refresh_of(page: str) -> tuple[list[str], list[str]]:
    """The page's reload ``<meta>`` contents, and its auto-refresh switch: text, then link."""
    metas = re.findall(r'<meta http-equiv="refresh" content="([^"]*)">', page)
    found = re.search(r'<span class="refresh">(.*?)</span>', page, re.S)
    assert found is not None
    link = re.findall(r'<a href="([^"]*)">', found.group(1))
    return metas, [*texts("span", found.group(0)), *link]


def test_the_page_reloads_itself_only_when_asked() -> None:
    book = MessageBook(make_config("http://127.0.0.1:9/v1").polling)
    book.sync([MessageSpec("m", sent_at=START)], START)

    def page(query: str) -> str:
        return render_landing(book, "/metrics", FakeClock(START), query=query)

    assert refresh_of(page("")) == ([], ["Auto-refresh off (turn on: every 30 s)", "/?refresh=30"])
    assert refresh_of(page("refresh=30")) == (
        ["30"],
        ["Auto-refresh every 30 s (turn off)", "/"],
    )
    assert refresh_of(page("refresh=7200"))[0] == ["3600"]
    assert refresh_of(page("refresh=7200"))[1][0] == "Auto-refresh every 1 h (turn off)"
    # Anything else is no reason for an error page: the page, not reloading.
    assert page("refresh=%3Cscript%3E") == page("")


# A page that loads the status page in a 1280 x 900 frame, then writes what Chromium laid out
# into its own DOM, for --dump-dom to print.
MEASURE = """<!doctype html><html><head><script>
function measure(frame) {
  const page = frame.contentDocument;
  const cells = [...page.querySelectorAll("th, td")];
  document.getElementById("layout").textContent = JSON.stringify({
    width: page.documentElement.clientWidth,
    scrolled: page.documentElement.scrollWidth,
    right: Math.max(...[...page.querySelectorAll("tr > :last-child")].map(
      (cell) => cell.getBoundingClientRect().right)),
    cut: cells.filter((cell) => cell.scrollWidth > cell.clientWidth).map(
      (cell) => cell.textContent.slice(0, 40)),
    outside: [...page.body.querySelectorAll("*")].filter(
      (element) => element.getBoundingClientRect().right > page.documentElement.clientWidth
    ).map((element) => element.tagName + " " + element.textContent.slice(0, 40)),
  });
}
</script></head><body style="margin:0">
<iframe src="/" onload="measure(this)" style="width:1280px;height:900px;border:0"></iframe>
<pre id="layout"></pre></body></html>"""


class CraftedCredits:
    """The account source's series, as it writes them: one field below its threshold, and a
    long field name (they are the API's, undocumented)."""

    def collect(self) -> Iterator[Metric]:
        for name, values in (
            ("mailpartner_account_credits", {"creditMail": 99960, "solde": 499.58}),
            ("mailpartner_account_credits_low_threshold", {"creditMail": 200000}),
        ):
            family = Metric(name, "crafted", "gauge")
            for field, value in values.items():
                family.add_sample(name, {"field": field}, value)
            if name.endswith("credits"):
                long_field = "creditMailTransactionnelInternationalPrioritaire" * 2
                family.add_sample(name, {"field": long_field}, 1234567.891)
            yield family


@pytest.fixture
def crowded_url() -> Iterator[str]:
    """The page at its most crowded: long IDs, labels and errors, big counts, every kind of
    row, a failing API, credits; plus ``/measure``."""
    clock = FakeClock(FRIDAY_21H)
    book = marked_book(clock)
    labels = MappingProxyType({"campaign": "black-friday-" + "x" * 50, "team": "crm", "batch": "7"})
    long_id = "campaign-2026-" + "0123456789" * 8
    book.add(MessageSpec(long_id, labels, sent_at=clock() - 90000, transactional=True), clock())
    book.start_poll(long_id, clock())
    many = MessageAggregate(dict.fromkeys(State, 1234567), {}, 98765.4321, 0, clock())
    book.record_success(long_id, many, clock())
    book.start_poll(long_id, clock())
    url = "https://api.mailpartner.fr/v1/bulk-status?apiKey=<redacted>&messageId=" + "9" * 300
    book.record_failure(long_id, f"connection: cannot reach {url}", clock())
    stats = RequestStats([BULK_STATUS, ME])
    for error in (None, "timeout", "connection", "invalid_response", "429"):
        stats.request_started(BULK_STATUS)
        stats.request_finished(BULK_STATUS, 1.0, error, up=error is None, api_error=error == "429")
    config = make_config("http://127.0.0.1:9/v1")
    registry = CollectorRegistry()
    registry.register(MailPartnerCollector(book, None, lambda: config.api, clock))
    registry.register(ProcessCollector(stats, ConfigHolder(config, clock())))
    registry.register(CraftedCredits())

    def measure(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        return respond(start_response, "200 OK", MEASURE, "text/html; charset=utf-8")

    server = serve(
        create_app(registry, book, clock=clock, more={"/measure": measure}), "127.0.0.1:0"
    )
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.mark.e2e
def test_the_crowded_page_fits_a_1280_px_window(crowded_url: str, tmp_path: Path) -> None:
    rendered = chromium(tmp_path / "profile", "--dump-dom", f"{crowded_url}/measure")
    assert rendered.returncode == 0, rendered.stderr.decode()[-2000:]
    found = re.search(r'<pre id="layout">(.*?)</pre>', rendered.stdout.decode(), re.S)
    assert found is not None and found.group(1), rendered.stdout.decode()[-2000:]
    layout = json.loads(html.unescape(found.group(1)))
    assert 1260 <= layout["width"] <= 1280  # the frame, less a scroll bar
    assert layout["scrolled"] <= layout["width"]  # no sideways scrolling
    assert layout["right"] <= layout["width"]  # "Last error" on screen
    assert layout["outside"] == []  # nothing, long IDs and errors included, reaches past it
    assert layout["cut"] == []  # and no heading or cell spills over its neighbour

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "status-page-1280.png"
    shot.unlink(missing_ok=True)
    taken = chromium(
        tmp_path / "profile", "--window-size=1280,900", f"--screenshot={shot}", crowded_url
    )
    assert taken.returncode == 0, taken.stderr.decode()[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(shot.read_bytes()[16:20], "big") == 1280  # PNG width
