"""Malformed and odd upstream bodies: each one has a defined outcome, never a crash.

``tests/corpus/`` holds the small bodies, one file each, and ``expected.yaml`` their
outcome: ``parsed`` (with the aggregate a documented coercion gives), ``invalid_response``
(with a substring of the message) or ``api_error`` (with the code). Bodies too large to
commit (a 10 MB status, 100,000 levels of nesting, a body over the size cap) are made here.
"""

from __future__ import annotations

import gzip
import io
import json
import time
import tracemalloc
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.aggregate import MessageAggregate, ReportAggregator
from exporter.client import ApiError, PollError, TransportError
from exporter.domain import State, StatusMap
from exporter.parse import Body, InvalidResponse, UpstreamError, parse_json, parse_xml
from tests.conftest import TEST_KEY, CraftedServer, make_client, make_config

CORPUS = Path(__file__).parent / "corpus"
EXPECTED_FILE = "expected.yaml"
EXPECTED: dict[str, dict[str, Any]] = yaml.safe_load(
    (CORPUS / EXPECTED_FILE).read_text(encoding="utf-8")
)
FILES = sorted(p.name for p in CORPUS.iterdir() if p.name != EXPECTED_FILE)
PARSERS: dict[str, Callable[[Body, ReportAggregator], None]] = {
    "json": parse_json,
    "xml": parse_xml,
}
OUTCOMES = frozenset({"parsed", "invalid_response", "api_error"})


Crafted = Callable[[Callable[[str], CraftedServer.Reply]], CraftedServer]


def states_of(result: MessageAggregate) -> dict[str, int]:
    return {str(state): count for state, count in result.states.items()}


def assert_aggregate(result: MessageAggregate, expected: Mapping[str, Any]) -> None:
    assert states_of(result) == expected["states"]
    assert dict(result.statuses) == expected["statuses"]
    assert result.cost == pytest.approx(expected["cost"])
    assert result.unsubscribed == expected["unsubscribed"]
    assert result.last_report == expected["last_report"]


def check_parse(raw: bytes, expected: Mapping[str, Any]) -> None:
    """Parse ``raw`` as ``expected`` says, with a fresh aggregator; assert exactly its outcome.

    ``pytest.raises`` names one exception type: any other escapes and fails the test.
    """
    parser = PARSERS[expected["format"]]
    aggregator = ReportAggregator(StatusMap.default())
    outcome = expected["outcome"]
    if outcome == "parsed":
        parser(io.BytesIO(raw), aggregator)
        assert_aggregate(aggregator.result(), expected)
    elif outcome == "invalid_response":
        with pytest.raises(InvalidResponse) as invalid:
            parser(io.BytesIO(raw), aggregator)
        assert expected["problem"] in str(invalid.value)
    else:
        with pytest.raises(UpstreamError) as upstream:
            parser(io.BytesIO(raw), aggregator)
        assert upstream.value.code == expected["code"]


def test_every_corpus_file_has_an_expectation_and_vice_versa() -> None:
    assert len(FILES) >= 40
    assert sorted(EXPECTED) == FILES
    for name, expected in EXPECTED.items():
        assert expected["outcome"] in OUTCOMES, name
        assert expected["format"] == Path(name).suffix.lstrip("."), name
        assert (CORPUS / name).stat().st_size < 20_000, name
        if expected["outcome"] == "parsed":
            assert set(expected["states"]) == {str(s) for s in State}, name


@pytest.mark.parametrize("name", FILES)
def test_corpus_file_has_its_defined_outcome(name: str) -> None:
    check_parse((CORPUS / name).read_bytes(), EXPECTED[name])


def _json_envelope(reports: bytes) -> bytes:
    return (
        b'{"success": true, "code": 200, "messageId": "1", "StatutResponseList": ['
        + reports
        + b"]}"
    )


def _xml_envelope(records: bytes) -> bytes:
    return (
        b"<?xml version='1.0' encoding='UTF-8'?><result><entry>true</entry><entry>200</entry>"
        b"<entry>1</entry><entry>" + records + b"</entry></result>"
    )


def _xml_record(status: bytes) -> bytes:
    fields = [b"a@x", b"t", status, b"1", b"true", b"1764150000"]
    return b"<entry>" + b"".join(b"<entry>" + f + b"</entry>" for f in fields) + b"</entry>"


def _parsed(fmt: str, statuses: dict[str, int], cost: float = 0.0, **more: Any) -> dict[str, Any]:
    states = dict.fromkeys((str(s) for s in State), 0)
    for status, count in statuses.items():
        states[str(StatusMap.default().state_of(status))] += count
    fields = {"unsubscribed": 0, "last_report": None, **more}
    return {
        "outcome": "parsed",
        "format": fmt,
        "states": states,
        "statuses": statuses,
        "cost": cost,
        **fields,
    }


TEN_MB = 10 * 1024 * 1024
DEEP = 100_000


def _generated() -> Iterator[tuple[str, Callable[[], bytes], dict[str, Any]]]:
    yield (
        "json-status-10mb",
        lambda: _json_envelope(b'{"status": "Delivered' + b"x" * TEN_MB + b'", "cost": 1}'),
        _parsed("json", {"delivered" + "x" * 55: 1}, 1.0),
    )
    yield (
        "json-email-10mb-ignored",
        lambda: _json_envelope(b'{"email": "' + b"a" * TEN_MB + b'", "status": "Delivered"}'),
        _parsed("json", {"delivered": 1}),
    )
    yield (
        "xml-status-10mb",
        lambda: _xml_envelope(_xml_record(b"Waiting" + b"y" * TEN_MB)),
        _parsed("xml", {"waiting" + "y" * 57: 1}, 1.0, unsubscribed=1, last_report=1764150000.0),
    )
    yield (
        "xml-status-10mb-cdata",
        lambda: _xml_envelope(_xml_record(b"<![CDATA[" + b"<" * TEN_MB + b"]]>")),
        _parsed("xml", {"<" * 64: 1}, 1.0, unsubscribed=1, last_report=1764150000.0),
    )
    yield (
        "json-nesting-100k-in-status",
        lambda: _json_envelope(b'{"status": ' + b"[" * DEEP + b"]" * DEEP + b"}"),
        {"outcome": "invalid_response", "format": "json", "problem": "nested deeper than 32"},
    )
    yield (
        "json-nesting-100k-objects-unclosed",
        lambda: b'{"success": true, "x": ' + b'{"a": ' * DEEP,
        {"outcome": "invalid_response", "format": "json", "problem": "nested deeper than 32"},
    )
    yield (
        "xml-nesting-100k",
        lambda: b"<result>" + b"<entry>" * DEEP + b"</entry>" * DEEP + b"</result>",
        {"outcome": "invalid_response", "format": "xml", "problem": "nested deeper than 32"},
    )
    yield (
        "json-10k-distinct-statuses",
        lambda: _json_envelope(b",".join(b'{"status": "s%05d"}' % i for i in range(10_000))),
        {
            **_parsed("json", {}),
            "states": {"delivered": 0, "failed": 0, "pending": 0, "unknown": 10_000},
            # all tied at 1: the first 19 by name are kept, the rest folded into other
            "statuses": {**{f"s{i:05d}": 1 for i in range(19)}, "other": 10_000 - 19},
        },
    )


GENERATED = list(_generated())


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("name", "make", "expected"), GENERATED, ids=[g[0] for g in GENERATED])
def test_generated_large_body_has_its_defined_outcome(
    name: str, make: Callable[[], bytes], expected: dict[str, Any]
) -> None:
    check_parse(make(), expected)


@pytest.mark.timeout(20)
def test_an_xml_entity_bomb_neither_hangs_nor_expands() -> None:
    raw = (CORPUS / "xml-entity-bomb-billion-laughs.xml").read_bytes()
    assert len(raw) < 2048  # 10**9 "lol"s once expanded: 3 GB
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(InvalidResponse, match="amplification"):
            parse_xml(io.BytesIO(raw), ReportAggregator(StatusMap.default()))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # expat stops the expansion after about 8 MiB of output; what Python holds of it
    # until then (a list of small strings) peaks near 50 MB.
    assert peak < 128 * 1024 * 1024
    assert time.perf_counter() - started < 15


# ---------------------------------------------------------------- through the real client


@pytest.fixture(scope="module")
def corpus_server() -> Iterator[CraftedServer]:
    """One loopback server for the whole corpus: ``crafted``'s server, but shared by the
    module, as stopping one takes half a second. ``messageId`` names the file it answers
    with, with status 200, or as ``<status>~<file>`` with another status."""

    def reply(path: str) -> CraftedServer.Reply:
        message_id = path.split("messageId=", 1)[1].split("&", 1)[0]
        status, _, name = message_id.rpartition("~")
        raw = (CORPUS / name).read_bytes()
        return int(status or 200), {"Content-Length": str(len(raw))}, [raw]

    server = CraftedServer(reply)
    yield server
    server.close()


def poll(url: str, message_id: str, fmt: str = "json", **api: Any) -> MessageAggregate:
    client = make_client(make_config(url, format=fmt, **api))
    return client.bulk_status(message_id, ReportAggregator(StatusMap.default()))


def poll_failure(url: str, message_id: str, fmt: str = "json", **api: Any) -> PollError:
    """The ``PollError`` a poll ends in; any other exception escapes and fails the test."""
    with pytest.raises(PollError) as caught:
        poll(url, message_id, fmt, **api)
    assert TEST_KEY not in str(caught.value)
    return caught.value


@pytest.mark.parametrize("name", FILES)
def test_corpus_file_through_the_real_client(corpus_server: CraftedServer, name: str) -> None:
    expected = EXPECTED[name]
    fmt = expected["format"]
    if expected["outcome"] == "parsed":
        assert_aggregate(poll(corpus_server.url, name, fmt), expected)
        return
    error = poll_failure(corpus_server.url, name, fmt)
    if expected["outcome"] == "invalid_response":
        assert isinstance(error, TransportError)
        assert error.label == "invalid_response"
        assert expected["problem"] in str(error)
    else:
        assert isinstance(error, ApiError)
        assert error.label == expected["code"]


def _reports(count: int) -> bytes:
    return _json_envelope(b",".join([b'{"status": "Delivered", "cost": 1}'] * count))


@pytest.mark.parametrize("encoding", ["identity", "gzip"])
def test_a_body_over_the_size_cap_is_refused_through_the_client(
    crafted: Crafted, encoding: str
) -> None:
    cap = 64 * 1024
    raw = _reports(20_000)  # about 700 KB decoded
    sent = gzip.compress(raw) if encoding == "gzip" else raw
    headers = {"Content-Length": str(len(sent))}
    if encoding == "gzip":
        headers["Content-Encoding"] = "gzip"
        assert len(sent) < cap  # the cap is on the decoded body
    server = crafted(lambda path: (200, headers, [sent]))
    error = poll_failure(server.url, "1", max_response_bytes=cap)
    assert isinstance(error, TransportError)
    assert str(error) == f"invalid_response: response body larger than {cap} bytes"
    assert poll(server.url, "1", max_response_bytes=len(raw)).recipients == 20_000


def test_a_corpus_body_one_byte_over_the_cap(corpus_server: CraftedServer) -> None:
    name = "json-spec-success-baseline.json"
    size = (CORPUS / name).stat().st_size
    error = poll_failure(corpus_server.url, name, max_response_bytes=size - 1)
    assert error.label == "invalid_response"
    assert poll(corpus_server.url, name, max_response_bytes=size).recipients == 2


@pytest.mark.parametrize(
    ("status", "name"),
    [
        (502, "json-html-502-bad-gateway.json"),
        (503, "json-html-maintenance-page.json"),
        (500, "json-truncated-mid-list.json"),
        (500, "json-non-utf8-latin1-status.json"),
        (500, "json-utf16-body.json"),
        (500, "json-lone-low-surrogate-escape.json"),
        (500, "json-empty-body.json"),
    ],
)
def test_odd_bodies_behind_an_http_error_status(
    corpus_server: CraftedServer, status: int, name: str
) -> None:
    assert poll_failure(corpus_server.url, f"{status}~{name}").label == f"http_{status}"


def test_an_api_error_body_behind_an_http_error_status(crafted: Crafted) -> None:
    raw = json.dumps({"success": False, "code": "E_KEY", "message": "x" * 1000}).encode()
    server = crafted(lambda path: (403, {"Content-Length": str(len(raw))}, [raw]))
    error = poll_failure(server.url, "1")
    assert isinstance(error, ApiError) and error.label == "invalid"


@pytest.mark.parametrize("opener", [b"[", b'{"a": '])
def test_a_deeply_nested_body_behind_an_http_error_status(crafted: Crafted, opener: bytes) -> None:
    raw = opener * (60_000 // len(opener))  # under the 64 KiB the client reads of it
    server = crafted(lambda path: (500, {"Content-Length": str(len(raw))}, [raw]))
    assert poll_failure(server.url, "1").label == "http_500"


@pytest.mark.timeout(20)
def test_an_xml_entity_bomb_through_the_client(corpus_server: CraftedServer) -> None:
    error = poll_failure(corpus_server.url, "xml-entity-bomb-billion-laughs.xml", "xml")
    assert error.label == "invalid_response"
    assert "amplification" in str(error)
