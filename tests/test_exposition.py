"""The fast /metrics renderer writes exactly what prometheus_client's generate_latest writes."""

from __future__ import annotations

import gzip
import random
import zlib
from collections.abc import Callable, Iterable
from io import BytesIO
from pathlib import Path
from types import MappingProxyType
from wsgiref.util import setup_testing_defaults

import requests
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.registry import CollectorRegistry

from exporter.aggregate import MessageAggregate
from exporter.client import BULK_STATUS
from exporter.collector import (
    MESSAGE_FAMILIES,
    MailPartnerCollector,
    MessageView,
    message_samples,
    message_view,
)
from exporter.domain import MessageSpec, State
from exporter.exposition import MessageLines, Samples, TextExposition
from exporter.stats import RequestStats
from exporter.tracker import MessageBook
from exporter.web import create_app, serve
from tests.conftest import FakeClock, make_config
from tests.scenario import scenario

EXPECTED = Path(__file__).parent / "expected" / "exposition.txt"
# Label values and statuses that need escaping, or look like the format's own syntax.
NASTY = ['say "hi"', "back\\slash", "two\nlines", "\\n", '\\"', "é ü 中", "} 1.0", "a,b=c", ""]


def plain(exposition: TextExposition) -> bytes:
    return b"".join(exposition.plain())


def gunzip_one_member(parts: list[bytes]) -> bytes:
    """Decode as one gzip member: browsers ignore anything after the first."""
    decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
    data = decoder.decompress(b"".join(parts)) + decoder.flush()
    assert decoder.eof and not decoder.unused_data
    return data


def random_book(rng: random.Random, count: int) -> tuple[CollectorRegistry, MessageBook, FakeClock]:
    clock = FakeClock()
    specs = [random_spec(rng, i) for i in range(count)]
    config = make_config("http://127.0.0.1:9/v1", *specs)
    book = MessageBook(config.polling, jitter=lambda: 1.0)
    book.sync(specs, clock())
    for spec in specs:
        poll(rng, book, spec.id, clock())
    stats = RequestStats([BULK_STATUS])
    stats.request_started(BULK_STATUS)
    stats.request_finished(BULK_STATUS, 0.2, "timeout", up=False)
    registry = CollectorRegistry(auto_describe=True)  # as the exporter has it: name[] works
    registry.register(MailPartnerCollector(book, stats, lambda: config.api, clock))
    return registry, book, clock


def random_spec(rng: random.Random, index: int) -> MessageSpec:
    labels = {name: rng.choice(NASTY) for name in rng.sample(["campaign", "team", "z"], 2)}
    message_id = str(index) + rng.choice(["", "x", "\\", '"q"'])
    sent_at = rng.choice([None, 1795687200.0 - rng.randint(0, 200_000)])
    return MessageSpec(message_id, MappingProxyType(labels), sent_at=sent_at)


def poll(rng: random.Random, book: MessageBook, message_id: str, now: float) -> None:
    """Whatever a poll can do: nothing yet, a failure, or a success with some report."""
    outcome = rng.random()
    if outcome < 0.1:
        return
    book.start_poll(message_id, now)
    if outcome < 0.25:
        book.record_failure(message_id, "http_502: HTTP 502", now)
        return
    statuses = {s: rng.randint(0, 10**6) for s in rng.sample([*NASTY, "delivered", "ko"], 5)}
    states = {state: rng.randint(0, 500) for state in State}
    if rng.random() < 0.3:
        states[State.PENDING] = 0
    aggregate = MessageAggregate(
        states=MappingProxyType(states),
        statuses=MappingProxyType(dict(sorted(statuses.items()))),
        cost=rng.choice([0.0, rng.random() * 10 ** rng.randint(-3, 9)]),
        unsubscribed=rng.randint(0, 50),
        last_report=rng.choice([None, now - rng.random() * 10**6]),
    )
    book.record_success(message_id, aggregate, now)


def test_scenario_renders_exactly_as_generate_latest() -> None:
    registry, _, _ = scenario()
    exposition = TextExposition(registry)
    assert plain(exposition) == generate_latest(registry) == EXPECTED.read_bytes()
    for _ in range(2):  # the second time from what the first kept
        assert gunzip_one_member(exposition.gzipped()) == EXPECTED.read_bytes()
    # OpenMetrics, as a Prometheus asks first: the same samples in that format, byte for byte.
    openmetrics = generate_openmetrics(registry)
    assert b"".join(exposition.plain(openmetrics=True)) == openmetrics
    assert gunzip_one_member(exposition.gzipped(openmetrics=True)) == openmetrics
    assert openmetrics.endswith(b"# EOF\n") and openmetrics.count(b"# EOF") == 1


def test_random_books_render_exactly_as_generate_latest_as_they_change() -> None:
    rng = random.Random(5)
    registry, book, clock = random_book(rng, 600)
    exposition = TextExposition(registry)
    for _ in range(6):
        expected = generate_latest(registry)
        assert b'\\"' in expected and b"\\\\" in expected and b"\\n" in expected
        assert plain(exposition) == expected
        assert gzip.decompress(b"".join(exposition.gzipped())) == expected
        openmetrics = generate_openmetrics(registry)
        assert b"".join(exposition.plain(openmetrics=True)) == openmetrics
        assert gzip.decompress(b"".join(exposition.gzipped(openmetrics=True))) == openmetrics
        clock.advance(rng.randint(1, 4000))
        messages, _ = book.snapshot()
        for message in rng.sample(messages, 40):
            poll(rng, book, message.spec.id, clock())
        kept = [m.spec for m in messages if rng.random() < 0.95]
        book.sync([*kept, *(random_spec(rng, 1000 + i) for i in range(rng.randint(0, 9)))], clock())
    clock.advance(10**5)  # nothing changed but the time: polls are overdue now
    assert plain(exposition) == generate_latest(registry)
    assert b"mailpartner_exporter_overdue_messages 0.0" not in generate_latest(registry)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.text(), st.text(min_size=1)), min_size=1, max_size=6))
def test_any_label_value_or_status_renders_as_generate_latest(
    values: list[tuple[str, str]],
) -> None:
    clock = FakeClock()
    specs = [
        MessageSpec(str(i), MappingProxyType({"campaign": value}))
        for i, (value, _) in enumerate(values)
    ]
    config = make_config("http://127.0.0.1:9/v1", *specs)
    book = MessageBook(config.polling)
    book.sync(specs, clock())
    for spec, (_, status) in zip(specs, values, strict=True):
        book.start_poll(spec.id, clock())
        states = MappingProxyType(dict.fromkeys(State, 1))
        book.record_success(
            spec.id, MessageAggregate(states, MappingProxyType({status: 1}), 0.5, 0, None), clock()
        )
    registry = CollectorRegistry()
    registry.register(
        MailPartnerCollector(book, RequestStats([BULK_STATUS]), lambda: config.api, clock)
    )
    assert plain(TextExposition(registry)) == generate_latest(registry)


def counting_lines() -> tuple[MessageLines[MessageView], list[str]]:
    rendered: list[str] = []

    def samples(view: MessageView) -> tuple[Samples, ...]:
        rendered.append(view.spec.id)
        return message_samples(view)

    return MessageLines(MESSAGE_FAMILIES, message_view, samples), rendered


def test_a_message_is_rendered_again_only_when_its_series_change() -> None:
    rng = random.Random(1)
    _, book, clock = random_book(rng, 300)
    lines, rendered = counting_lines()
    before = lines.chunks(book.snapshot()[0])
    assert len(rendered) == 300
    rendered.clear()
    message_id = book.snapshot()[0][7].spec.id
    book.start_poll(message_id, clock())  # a new TrackedMessage, with the same series
    assert lines.chunks(book.snapshot()[0]) == before and rendered == []
    clock.advance(60)
    states = dict.fromkeys(State, 1)
    book.record_success(message_id, MessageAggregate(states, {}, 1.0, 0, None), clock())
    after = lines.chunks(book.snapshot()[0])
    assert rendered == [message_id]
    changed = [
        (old, new)
        for old_family, new_family in zip(before, after, strict=True)
        for old, new in zip(old_family, new_family, strict=True)
        if old is not new
    ]
    assert len(changed) == len(MESSAGE_FAMILIES)  # the chunk holding that message, no other


def test_lines_of_messages_gone_are_forgotten() -> None:
    _, book, clock = random_book(random.Random(2), 50)
    lines, _ = counting_lines()
    lines.chunks(book.snapshot()[0])
    assert len(lines) == 50
    messages, _ = book.snapshot()
    book.sync([m.spec for m in messages[:10]], clock())
    lines.chunks(book.snapshot()[0])
    assert len(lines) == 10


# What Prometheus 2.x and 3.x send when they scrape.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def test_both_formats_prometheus_reads_go_the_fast_way_and_all_answers_agree() -> None:
    registry, book, clock = random_book(random.Random(4), 100)
    app = create_app(registry, book, clock=clock)
    headers, body = get(app)
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert int(headers["Content-Length"]) == len(body) and body == generate_latest(registry)
    headers, packed = get(app, headers={"Accept-Encoding": "gzip, deflate"})
    assert headers["Content-Encoding"] == "gzip" and gzip.decompress(packed) == body
    scrape = {"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"}
    headers, packed = get(app, headers=scrape)
    assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert gzip.decompress(packed) == generate_openmetrics(registry)
    # Everything else is prometheus_client's own answer.
    headers, _ = get(app, headers={"Accept": "text/plain; version=1.0.0"})
    assert "escaping=underscores" in headers["Content-Type"]
    assert get(app, query="name[]=mailpartner_up")[1] == (
        b"# HELP mailpartner_up 1 if the most recent API request succeeded (a message-level "
        b"error such as code 4 still counts as the API answering).\n"
        b"# TYPE mailpartner_up gauge\nmailpartner_up 0.0\n"  # the last request failed
    )
    headers, empty = get(app, method="HEAD")  # a GET without its body, the fast way too
    assert headers["status"] == "200 OK" and empty == b""
    assert headers["Content-Length"] == str(len(body))


def get(
    app: Callable[..., Iterable[bytes]],
    query: str = "",
    headers: dict[str, str] | None = None,
    method: str = "GET",
) -> tuple[dict[str, str], bytes]:
    environ: dict[str, object] = {
        "PATH_INFO": "/metrics",
        "QUERY_STRING": query,
        "REQUEST_METHOD": method,
        "wsgi.input": BytesIO(),
    }
    setup_testing_defaults(environ)
    environ.update({f"HTTP_{k.upper().replace('-', '_')}": v for k, v in (headers or {}).items()})
    answer: dict[str, str] = {}

    def start_response(status: str, response_headers: list[tuple[str, str]]) -> None:
        answer.update(response_headers, status=status)

    body = b"".join(app(environ, start_response))
    return answer, body


def test_gzip_over_a_socket_decodes_to_the_plain_exposition() -> None:
    registry, book, clock = random_book(random.Random(3), 400)
    server = serve(create_app(registry, book, clock=clock), "127.0.0.1:0")
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with requests.Session() as session:
            packed = session.get(url, timeout=10)
            identity = session.get(url, headers={"Accept-Encoding": "identity"}, timeout=10)
    finally:
        server.shutdown()
        server.server_close()
    assert packed.headers["Content-Encoding"] == "gzip"
    assert packed.content == identity.content == generate_latest(registry)
