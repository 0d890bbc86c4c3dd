"""Parsing bulk-status bodies: the upstream page's examples are the test vectors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from exporter.aggregate import MessageAggregate, ReportAggregator
from exporter.domain import State, StatusMap
from exporter.parse import InvalidResponse, UpstreamError, parse_json, parse_xml

VECTORS = Path(__file__).parent / "vectors"
PARSERS = {"json": parse_json, "xml": parse_xml}


def aggregate(
    body: bytes, fmt: str = "json", status_map: StatusMap | None = None
) -> MessageAggregate:
    aggregator = ReportAggregator(status_map or StatusMap.default())
    PARSERS[fmt](io.BytesIO(body), aggregator)
    return aggregator.result()


def body(*reports: dict[str, object]) -> bytes:
    return json.dumps(
        {"success": True, "code": 200, "messageId": "1", "StatutResponseList": list(reports)}
    ).encode()


@pytest.mark.parametrize("fmt", ["json", "xml"])
def test_spec_success_example(fmt: str) -> None:
    result = aggregate((VECTORS / f"spec_success.{fmt}").read_bytes(), fmt)
    assert dict(result.states) == {
        State.DELIVERED: 2,
        State.FAILED: 0,
        State.PENDING: 0,
        State.UNKNOWN: 0,
    }
    assert dict(result.statuses) == {"delivered": 2}
    assert (result.cost, result.unsubscribed, result.last_report) == (2.0, 2, 1599061044.0)


@pytest.mark.parametrize("fmt", ["json", "xml"])
def test_spec_error_example(fmt: str) -> None:
    with pytest.raises(UpstreamError) as caught:
        aggregate((VECTORS / f"spec_error.{fmt}").read_bytes(), fmt)
    assert (caught.value.code, caught.value.message) == ("10", "Clé API incorrecte")


def test_states_follow_the_status_map_case_insensitively() -> None:
    result = aggregate(
        body(
            {"status": "Delivered"},
            {"status": "DELIVERED"},
            {"status": "Not delivered"},
            {"status": "ko"},
            {"status": "Waiting"},
            {"status": "Soft bounce"},
        )
    )
    assert dict(result.states) == {
        State.DELIVERED: 2,
        State.FAILED: 2,
        State.PENDING: 1,
        State.UNKNOWN: 1,
    }
    # raw statuses are lower-cased and never dropped
    assert dict(result.statuses) == {
        "delivered": 2,
        "not delivered": 1,
        "ko": 1,
        "waiting": 1,
        "soft bounce": 1,
    }


def test_more_than_twenty_statuses_fold_into_other() -> None:
    reports: list[dict[str, object]] = [
        {"status": f"s{i:02d}"} for i in range(25) for _ in range(i + 1)
    ]
    result = aggregate(body(*reports))
    assert len(result.statuses) == 20
    # the 19 most common survive, the 6 rarest (s00..s05: 1+2+...+6 = 21) are folded
    assert result.statuses["other"] == 21
    assert "s06" in result.statuses and "s05" not in result.statuses
    assert result.states[State.UNKNOWN] == sum(range(1, 26))


def test_empty_report_list_is_zero_recipients() -> None:
    assert aggregate(body()).recipients == 0
    empty_xml = (
        b"<result><entry>true</entry><entry>200</entry><entry>1</entry><entry></entry></result>"
    )
    assert aggregate(empty_xml, "xml").recipients == 0


@pytest.mark.parametrize(
    ("report", "cost", "unsubscribed", "last", "status"),
    [
        ({"status": "Delivered", "cost": "0.5"}, 0.5, 0, None, "delivered"),
        ({"status": "Delivered", "cost": None}, 0.0, 0, None, "delivered"),
        ({"status": "Delivered"}, 0.0, 0, None, "delivered"),
        ({"status": None, "stopMail": "true"}, 0.0, 1, None, "none"),
        ({"status": 5, "stopMail": 1}, 0.0, 1, None, "5"),
        ({"status": "x", "stopMail": "no", "date": 1764150000}, 0.0, 0, 1764150000.0, "x"),
        ({"status": "x", "date": "2026-11-26T10:00:00Z"}, 0.0, 0, None, "x"),
        ({"status": "x", "date": "garbage"}, 0.0, 0, None, "x"),
    ],
)
def test_documented_coercions(
    report: dict[str, object], cost: float, unsubscribed: int, last: float | None, status: str
) -> None:
    result = aggregate(body(report))
    assert (result.cost, result.unsubscribed, result.last_report) == (cost, unsubscribed, last)
    assert dict(result.statuses) == {status: 1}


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"", "malformed JSON"),
        (b'{"success": true, "code": 200, "StatutResponseList": [', "malformed JSON"),
        (b"<html><body>Bad gateway</body></html>", "malformed JSON"),
        (b"[]", "body is not a JSON object"),
        (b'{"success": true, "code": 200}', "success without a StatutResponseList"),
        (b'{"success": true, "StatutResponseList": {"a": 1}}', "StatutResponseList is not a list"),
        (b'{"success": true, "StatutResponseList": [1]}', "holds a number, not a report object"),
        (b'{"success": true, "StatutResponseList": [{"cost": "abc"}]}', "cost is not a number"),
        (b'{"success": true, "StatutResponseList": [{"cost": true}]}', "cost is not a number"),
        (b'{"success": true, "StatutResponseList": [{"status": ["a"]}]}', "status is not a string"),
        (b'{"success": false}', "success is False with code None"),
    ],
)
def test_invalid_json_bodies(raw: bytes, problem: str) -> None:
    with pytest.raises(InvalidResponse, match=problem):
        aggregate(raw)


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"", "malformed XML"),
        (b"<result><entry>true</entry>", "malformed XML"),
        (b"<html></html>", "XML root is <html>"),
        (b"<result></result>", "holds no entries"),
        (
            b"<result><entry>true</entry><entry>200</entry><entry>1</entry><entry><entry>"
            b"<entry>a</entry></entry></entry></result>",
            "does not hold six values",
        ),
    ],
)
def test_invalid_xml_bodies(raw: bytes, problem: str) -> None:
    with pytest.raises(InvalidResponse, match=problem):
        aggregate(raw, "xml")


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b'{"success": false, "code": 4, "message": "Message introuvable"}', "4"),
        (b'{"success": false, "code": "429", "message": "Too many requests"}', "429"),
        (b'{"code": 1, "message": "La Cl\\u00e9 API est requise", "success": false}', "1"),
        (b'{"success": true, "code": 429, "StatutResponseList": []}', "429"),
        (b'{"success": false, "code": "<script>"}', "invalid"),
    ],
)
def test_error_codes(raw: bytes, code: str) -> None:
    with pytest.raises(UpstreamError) as caught:
        aggregate(raw)
    assert caught.value.code == code


def test_hostile_nesting_is_refused_cheaply() -> None:
    deep = b'{"success": true, "StatutResponseList": [{"status": ' + b"[" * 100_000
    with pytest.raises(InvalidResponse, match="nested deeper than 32 levels"):
        aggregate(deep)
    with pytest.raises(InvalidResponse, match="nested deeper than 32 levels"):
        aggregate(b"<result>" + b"<entry>" * 100 + b"</entry>" * 100 + b"</result>", "xml")


def test_values_nested_inside_a_report_are_ignored_or_refused() -> None:
    result = aggregate(body({"status": "Delivered", "extra": {"a": [1, {"b": 2}]}, "cost": 2}))
    assert (dict(result.statuses), result.cost) == ({"delivered": 1}, 2.0)


def test_a_second_report_list_is_refused_not_counted_twice() -> None:
    raw = b'{"success": true, "StatutResponseList": [{}], "StatutResponseList": [{}]}'
    with pytest.raises(InvalidResponse, match="StatutResponseList appears twice"):
        aggregate(raw)


def test_byte_order_mark_whitespace_and_case_are_tolerated() -> None:
    raw = b"\xef\xbb\xbf" + body({"status": " Delivered ", "stopMail": "TRUE"})
    result = aggregate(raw)
    assert (dict(result.statuses), result.unsubscribed) == ({"delivered": 1}, 1)
    xml = (
        b"<result><entry>true</entry><entry>200</entry><entry>1</entry><entry><entry>"
        b"<entry>a</entry><entry>t</entry><entry> Delivered </entry><entry>1</entry>"
        b"<entry>TRUE</entry><entry>1</entry></entry></entry></result>"
    )
    assert aggregate(xml, "xml").unsubscribed == 1


def test_long_statuses_are_cut_to_64_characters() -> None:
    result = aggregate(body({"status": "x" * 10_000}))
    assert dict(result.statuses) == {"x" * 64: 1}
